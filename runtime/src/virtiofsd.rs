//! Starting virtiofsd for a sandbox's share directory.
//!
//! Choices, measured with virtiofsd 1.14 on the development hosts:
//! - `--sandbox chroot`: container root filesystems are bind-mounted under
//!   the share after virtiofsd has started. In the default `namespace` mode
//!   virtiofsd works in a private copy of the mount table and does not see
//!   those later mounts when the host's mounts are private (they are here:
//!   `/` carries no `shared:` propagation); `chroot` stays in the host's
//!   mount namespace and confines path lookups to the share all the same.
//!   `none` would also work but drops the chroot.
//! - `--cache auto`: the guest may cache metadata and data for a short
//!   while and revalidates on open, so files the host changes later
//!   (container rootfs prepared by the runtime, future volumes) become
//!   visible, while a guest walking a rootfs does not pay one FUSE round
//!   trip (expensive under TCG) per lookup as with `never`. `always` would
//!   hide host-side changes.
//! - `--announce-submounts`: each bind-mounted rootfs appears as its own
//!   submount in the guest, so inode numbers of different host filesystems
//!   do not collide.
//! - The listening socket is created here and passed with `--fd`, so QEMU
//!   can connect as soon as it starts, with no polling for virtiofsd's
//!   socket.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::components::{self, MissingComponent};
use crate::process::{ManagedChild, SpawnError};

/// The fd number the listener gets in virtiofsd.
const CHILD_FD: i32 = 3;

/// Finds virtiofsd: explicit path, PATH, the distribution's libexec
/// locations, and cargo's install directory (`scripts/install-deps` uses
/// `cargo install virtiofsd`).
pub fn find_virtiofsd(explicit: Option<&Path>) -> Result<PathBuf, MissingComponent> {
    let mut dirs: Vec<PathBuf> = vec!["/usr/libexec".into(), "/usr/lib/qemu".into()];
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.push("/root/.cargo/bin".into());
    dirs.push("/usr/local/cargo/bin".into());
    components::find_binary(
        "virtiofsd",
        "virtiofsd",
        explicit,
        &dirs,
        components::HINT_INSTALL_DEPS,
    )
}

#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    #[error("cannot create virtiofsd socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Spawn(#[from] SpawnError),
}

/// virtiofsd's arguments (pure, for testing).
pub fn virtiofsd_args(shared_dir: &Path) -> Vec<String> {
    vec![
        format!("--fd={CHILD_FD}"),
        format!("--shared-dir={}", shared_dir.display()),
        "--sandbox=chroot".into(),
        "--cache=auto".into(),
        "--announce-submounts".into(),
        "--log-level=warn".into(),
    ]
}

/// Binds `socket` and starts virtiofsd serving `shared_dir` on it; its
/// output goes to `log`.
pub fn spawn_virtiofsd(
    binary: &Path,
    shared_dir: &Path,
    socket: &Path,
    log: &Path,
) -> Result<ManagedChild, VirtiofsdError> {
    let listener = UnixListener::bind(socket).map_err(|source| VirtiofsdError::Socket {
        path: socket.to_path_buf(),
        source,
    })?;
    let fd: OwnedFd = listener.into();
    let raw = fd.as_raw_fd();
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(virtiofsd_args(shared_dir));
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (dup2/fcntl), on an fd that stays open in the parent until spawn
    // returns. dup2 onto CHILD_FD yields an fd without FD_CLOEXEC; if the
    // listener already is CHILD_FD, clear the flag instead. Doing it in the
    // child keeps the listener out of other processes spawned concurrently.
    unsafe {
        cmd.pre_exec(move || {
            if raw == CHILD_FD {
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(raw, CHILD_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = ManagedChild::spawn_command("virtiofsd", binary, cmd, log)?;
    // The parent's copy closes here; virtiofsd holds its own.
    drop(fd);
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args() {
        let a = virtiofsd_args(Path::new("/run/husk/sandboxes/x/share")).join(" ");
        assert!(
            a.contains(
                "--fd=3 --shared-dir=/run/husk/sandboxes/x/share --sandbox=chroot --cache=auto"
            ),
            "{a}"
        );
    }

    /// virtiofsd accepts the passed listener: it stays up waiting for the
    /// front-end, and a connection to the socket is accepted.
    #[tokio::test]
    async fn starts_on_passed_fd() {
        let bin = find_virtiofsd(None).expect("virtiofsd (scripts/install-deps)");
        let d = tempfile::tempdir().unwrap();
        let share = d.path().join("share");
        std::fs::create_dir(&share).unwrap();
        let sock = d.path().join("fs.sock");
        let mut c = spawn_virtiofsd(&bin, &share, &sock, &d.path().join("log")).unwrap();
        let _s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let log = std::fs::read_to_string(d.path().join("log")).unwrap_or_default();
        assert!(c.try_wait().unwrap().is_none(), "virtiofsd exited: {log}");
        c.kill().await.unwrap();
    }
}
