//! Pod network namespaces: created by `unshare(CLONE_NEWNET)` on a dedicated
//! thread and kept alive by a bind mount of that thread's namespace file,
//! the way `ip netns add` does it, but in husk's own directory.
//!
//! Nothing here ever switches the namespace of a tokio worker thread: every
//! namespace change happens on a fresh `std::thread` that ends afterwards, so
//! no later task can run in a pod's namespace by accident.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{mount, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::mounts::{unmount, WhenBusy};

/// Serialises the check-and-bind-mount of the netns directory: two pods set
/// up at once must not stack two bind mounts of the directory onto itself.
static DIR_LOCK: Mutex<()> = Mutex::new(());

/// Runs `f` on a new OS thread and awaits its result without blocking the
/// async runtime. The thread is the only one that ever changes namespace.
pub(crate) async fn on_fresh_thread<T, F>(name: &str, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            // The receiver only goes away if the caller's future was dropped;
            // then nobody wants the result.
            let _ = tx.send(f());
        })?;
    rx.await
        .map_err(|_| io::Error::other("namespace thread panicked"))
}

/// Runs `f` on a fresh thread that has joined the network namespace bound
/// at `netns`. Netlink and tun sockets created inside `f` belong to that
/// namespace for their whole life.
pub(crate) async fn run_in_netns<T, F>(netns: &Path, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let netns = netns.to_path_buf();
    on_fresh_thread("husk-netns", move || -> io::Result<T> {
        let ns = fs::File::open(&netns)?;
        setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        Ok(f())
    })
    .await?
}

/// Makes `dir` a mount point with shared propagation, bind-mounting it onto
/// itself first when it is not one: a bind mount of an nsfs file below a
/// directory that is merely part of a larger shared mount could otherwise
/// propagate into, and be pinned by, other mount namespaces in ways the
/// unmount does not follow. iproute2 prepares /run/netns the same way.
fn prepare_dir(dir: &Path) -> io::Result<()> {
    let _guard = DIR_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    fs::create_dir_all(dir)?;
    let make_shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if is_mount_point(dir)? {
        return make_shared().map_err(io::Error::from);
    }
    mount(
        Some(dir),
        dir,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(io::Error::from)?;
    make_shared().map_err(io::Error::from)
}

/// Undoes [`prepare_dir`] once no pod network is left in `dir`: unmounts
/// its self-bind (lazily) and removes it with the empty record directory,
/// so that a huskd without pods leaves no mount behind. Returns whether it
/// did; a namespace still present keeps everything.
pub(crate) fn release_dir(dir: &Path) -> io::Result<bool> {
    let _guard = DIR_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let entries = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    for e in entries {
        let e = e?;
        let records = e.file_name() == ".cni" && fs::read_dir(e.path())?.next().is_none();
        if !records {
            return Ok(false);
        }
    }
    if is_mount_point(dir)? {
        unmount(dir, WhenBusy::Detach)?;
    }
    let _ = fs::remove_dir(dir.join(".cni"));
    fs::remove_dir(dir)?;
    Ok(true)
}

/// Whether `path` is the mount point of some mount in our mount namespace.
fn is_mount_point(path: &Path) -> io::Result<bool> {
    let path = fs::canonicalize(path)?;
    let info = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|mp| Path::new(&crate::mounts::unescape_octal(mp)) == path)
    }))
}

/// Creates a new network namespace bound at `path` (inside `dir`). Fails
/// with `AlreadyExists` when `path` exists, leaving it alone.
pub(crate) async fn create(dir: &Path, path: &Path) -> io::Result<()> {
    let dir = dir.to_path_buf();
    let path: PathBuf = path.to_path_buf();
    on_fresh_thread("husk-netns-new", move || -> io::Result<()> {
        prepare_dir(&dir)?;
        // The mount target; create_new refuses a leftover so that a failure
        // here never removes a namespace some other pod still uses.
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&path)?;
        let bind = || -> nix::Result<()> {
            // Only this thread moves to the new namespace; it ends right
            // after, and the bind mount keeps the namespace alive.
            unshare(CloneFlags::CLONE_NEWNET)?;
            mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        };
        if let Err(e) = bind() {
            let _ = fs::remove_file(&path);
            return Err(e.into());
        }
        Ok(())
    })
    .await?
}

/// Unmounts (lazily, so a VMM that still holds it does not block us) and
/// removes the namespace file. Absent or unmounted files are fine.
pub(crate) fn remove(path: &Path) -> io::Result<()> {
    unmount(path, WhenBusy::Detach)?;
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether `path` currently has a network namespace mounted on it.
pub(crate) fn is_netns(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use crate::mounts::unescape_octal;

    /// The mountinfo paths `is_mount_point` compares.
    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_octal("/a\\040b"), "/a b");
        assert_eq!(unescape_octal("/plain"), "/plain");
        assert_eq!(unescape_octal("/x\\134y"), "/x\\y");
        assert_eq!(unescape_octal("/trail\\04"), "/trail\\04");
    }
}
