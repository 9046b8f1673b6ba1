//! The files of a sandbox directory (`<state_dir>/<id>/`), named once.
//! A backend's own files are its module's ([`crate::hypervisor`]).

use std::path::{Path, PathBuf};

/// Paths inside one sandbox directory.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    pub dir: PathBuf,
    /// The virtio-fs share, mounted in the guest at
    /// [`husk_proto::GUEST_SHARE_DIR`].
    pub share: PathBuf,
    /// `share/containers`: one directory per container.
    pub containers: PathBuf,
    /// The hybrid vsock socket (`<vsock>_<port>` for guest-initiated ports).
    pub vsock: PathBuf,
    /// virtiofsd's vhost-user socket.
    pub virtiofsd_socket: PathBuf,
    pub virtiofsd_log: PathBuf,
    /// The guest's serial console.
    pub console_log: PathBuf,
}

impl SandboxPaths {
    pub fn new(dir: &Path) -> Self {
        let share = dir.join("share");
        Self {
            dir: dir.to_path_buf(),
            containers: share.join("containers"),
            share,
            vsock: dir.join("vsock"),
            virtiofsd_socket: dir.join("fs.sock"),
            virtiofsd_log: dir.join("virtiofsd.log"),
            console_log: dir.join("console.log"),
        }
    }

    /// A container's directory in the share.
    pub fn container(&self, container_id: &str) -> PathBuf {
        self.containers.join(container_id)
    }
}
