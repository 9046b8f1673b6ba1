//! Host mounts the runtime makes (container rootfs bind mounts under a
//! sandbox's share, overlay rootfs, network namespace files) and their
//! removal.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// What [`unmount`] does with a mount that is busy (open files or a
/// process's working directory on it, or mounts below it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenBusy {
    /// Retry for about half a second before detaching: for a caller that
    /// deletes what was mounted next and would rather it were really
    /// released (an overlay's upper dir).
    Wait,
    /// Detach at once: for a caller that must not block on holders it does
    /// not control (a VMM, CNI plugins, a container's processes).
    Detach,
}

const BUSY_RETRIES: u32 = 20;
const BUSY_PAUSE: Duration = Duration::from_millis(25);

/// Unmounts `target`; a busy mount is detached lazily (after retrying, as
/// `busy` says), so that it is gone from the mount table in any case. A
/// path that is not (or no longer) a mount point, or does not exist, counts
/// as unmounted: callers repeat cleanups after crashes.
pub fn unmount(target: &Path, busy: WhenBusy) -> io::Result<()> {
    let retries = match busy {
        WhenBusy::Wait => BUSY_RETRIES,
        WhenBusy::Detach => 0,
    };
    for attempt in 0..=retries {
        match umount2(target, MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => return Ok(()),
            Err(Errno::EBUSY) if attempt < retries => std::thread::sleep(BUSY_PAUSE),
            Err(Errno::EBUSY) => break,
            Err(e) => return Err(e.into()),
        }
    }
    if busy == WhenBusy::Wait {
        tracing::warn!(target = %target.display(), "mount still busy, detaching lazily");
    }
    match umount2(target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL | Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Bind-mounts `src` (recursively) onto `target`, private so that nothing
/// mounted later under the rootfs leaks back to `src`.
pub fn bind(src: &Path, target: &Path) -> io::Result<()> {
    bind_with(src, target, MsFlags::MS_REC)
}

/// Bind-mounts `src` onto `target` without what is mounted below `src`,
/// private. The new mount has `src`'s mount flags (read-only, nosuid, …).
pub fn bind_one(src: &Path, target: &Path) -> io::Result<()> {
    bind_with(src, target, MsFlags::empty())
}

fn bind_with(src: &Path, target: &Path, rec: MsFlags) -> io::Result<()> {
    mount(
        Some(src),
        target,
        None::<&str>,
        MsFlags::MS_BIND | rec,
        None::<&str>,
    )?;
    if let Err(e) = mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_PRIVATE | rec,
        None::<&str>,
    ) {
        let _ = unmount(target, WhenBusy::Detach);
        return Err(e.into());
    }
    Ok(())
}

/// Makes the bind mount at `target` read-only, keeping the nosuid, nodev
/// and noexec its source had (a remount as root would otherwise drop them).
/// Only this mount changes: submounts that came with a recursive bind keep
/// their own flags (CRI's non-recursive read-only).
pub fn remount_readonly(target: &Path) -> io::Result<()> {
    use nix::sys::statvfs::{statvfs, FsFlags};
    let have = statvfs(target)?.flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
    for (st, ms) in [
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
    ] {
        if have.contains(st) {
            flags |= ms;
        }
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>)?;
    Ok(())
}

/// Mount points at or below `dir` in this process's mount namespace,
/// deepest first.
pub fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(parse_mounts_under(&info, dir))
}

/// Parses mountinfo text (field 5 is the mount point, octal-escaped).
pub fn parse_mounts_under(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_octal(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// mountinfo escapes space, tab, newline and backslash as octal `\ooo`.
pub(crate) fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts everything at or below `dir` (lazily, deepest first, repeating
/// for stacked mounts) and returns what is still mounted afterwards.
pub fn unmount_all_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    for _ in 0..8 {
        let m = mounts_under(dir)?;
        if m.is_empty() {
            return Ok(m);
        }
        for p in &m {
            match unmount(p, WhenBusy::Detach) {
                Ok(()) => tracing::debug!(mount = %p.display(), "unmounted"),
                Err(e) => tracing::warn!(mount = %p.display(), %e, "umount failed"),
            }
        }
    }
    mounts_under(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// Runs `f` on a thread of its own in a private mount namespace, so that
    /// test mounts never reach the host; `None` without the privilege.
    fn in_private_mount_ns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        std::thread::spawn(move || {
            use nix::sched::{unshare, CloneFlags};
            unshare(CloneFlags::CLONE_FS | CloneFlags::CLONE_NEWNS).ok()?;
            let private = MsFlags::MS_REC | MsFlags::MS_PRIVATE;
            mount(None::<&str>, "/", None::<&str>, private, None::<&str>).ok()?;
            Some(f())
        })
        .join()
        .unwrap()
    }

    fn is_mount_point(p: &Path) -> bool {
        let dev = |p: &Path| std::fs::metadata(p).unwrap().dev();
        dev(p) != dev(p.parent().unwrap())
    }

    fn mount_tmpfs(target: &Path) {
        std::fs::create_dir_all(target).unwrap();
        mount(
            Some("tmpfs"),
            target,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        assert!(is_mount_point(target));
    }

    #[test]
    fn unmount_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("m");
        let done = in_private_mount_ns(move || {
            mount_tmpfs(&t);
            unmount(&t, WhenBusy::Wait).unwrap();
            assert!(!is_mount_point(&t));
            // Not a mount point any more (EINVAL), and no such path (ENOENT).
            unmount(&t, WhenBusy::Wait).unwrap();
            unmount(&t.join("missing"), WhenBusy::Detach).unwrap();
        });
        if done.is_none() {
            eprintln!("skipped: no privilege for a mount namespace");
        }
    }

    #[test]
    fn busy_mounts_are_detached() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let done = in_private_mount_ns(move || {
            for (name, busy) in [("d", WhenBusy::Detach), ("w", WhenBusy::Wait)] {
                let t = root.join(name);
                mount_tmpfs(&t);
                let open = std::fs::File::create(t.join("f")).unwrap();
                let started = std::time::Instant::now();
                unmount(&t, busy).unwrap();
                assert!(!is_mount_point(&t), "{busy:?}");
                if busy == WhenBusy::Wait {
                    assert!(started.elapsed() >= BUSY_PAUSE * BUSY_RETRIES);
                }
                drop(open);
            }
        });
        if done.is_none() {
            eprintln!("skipped: no privilege for a mount namespace");
        }
    }

    /// A read-only CRI volume: writes through the bind fail, its source
    /// stays writable, a submount keeps its own flags, and nosuid/nodev of
    /// the source survive the remount.
    #[test]
    fn readonly_bind_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let done = in_private_mount_ns(move || {
            let src = root.join("src");
            mount_tmpfs(&src);
            mount(
                None::<&str>,
                &src,
                None::<&str>,
                MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                None::<&str>,
            )
            .unwrap();
            mount_tmpfs(&src.join("sub"));
            let target = root.join("target");
            std::fs::create_dir_all(&target).unwrap();
            bind(&src, &target).unwrap();
            remount_readonly(&target).unwrap();
            let e = std::fs::write(target.join("f"), "x").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
            std::fs::write(src.join("f"), "x").unwrap();
            // Non-recursive: the submount stays writable.
            std::fs::write(target.join("sub/g"), "y").unwrap();
            let flags = nix::sys::statvfs::statvfs(&target).unwrap().flags();
            use nix::sys::statvfs::FsFlags;
            assert!(flags.contains(FsFlags::ST_RDONLY | FsFlags::ST_NOSUID | FsFlags::ST_NODEV));
        });
        assert!(done.is_some(), "needs root: a mount namespace");
    }

    #[test]
    fn parse() {
        let mi = "27 1 254:0 / / rw - ext4 /dev/vda rw\n\
                  90 27 254:0 /x /run/husk/sandboxes/a/share/containers/c/rootfs rw - ext4 /dev/vda rw\n\
                  91 90 0:5 / /run/husk/sandboxes/a/share/containers/c/rootfs/proc rw - proc proc rw\n\
                  92 27 254:0 /y /run/husk/sandboxes/ab rw - ext4 /dev/vda rw\n\
                  93 27 254:0 /y /run/husk/sandboxes/a/with\\040space rw - ext4 /dev/vda rw\n";
        let v = parse_mounts_under(mi, Path::new("/run/husk/sandboxes/a"));
        assert_eq!(
            v,
            vec![
                PathBuf::from("/run/husk/sandboxes/a/share/containers/c/rootfs/proc"),
                PathBuf::from("/run/husk/sandboxes/a/share/containers/c/rootfs"),
                PathBuf::from("/run/husk/sandboxes/a/with space"),
            ]
        );
    }
}
