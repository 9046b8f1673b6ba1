//! Host mounts the runtime makes (container rootfs bind mounts under a
//! sandbox's share) and their removal.

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

/// Bind-mounts `src` (recursively) onto `target`, private so that nothing
/// mounted later under the rootfs leaks back to `src`.
pub fn bind(src: &Path, target: &Path) -> io::Result<()> {
    mount(
        Some(src),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    if let Err(e) = mount(
        None::<&str>,
        target,
        None::<&str>,
        MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        None::<&str>,
    ) {
        let _ = umount2(target, MntFlags::MNT_DETACH);
        return Err(e.into());
    }
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
            match umount2(p, MntFlags::MNT_DETACH) {
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
