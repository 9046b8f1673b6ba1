//! The files of a sandbox directory (`<state_dir>/<id>/`), named once.
//! A backend's own files are its module's ([`crate::hypervisor`]).

use std::path::{Path, PathBuf};

/// Paths inside one sandbox directory.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    pub dir: PathBuf,
    /// The virtio-fs share, mounted in the guest at
    /// [`husk_proto::GUEST_SHARE_DIR`]: a read-only bind of [`Self::share_rw`]
    /// (see [`super::share`]). Mounts go here, so that virtiofsd sees them.
    pub share: PathBuf,
    /// The writable side of the share: huskd creates directories and pod
    /// files here. Not shared with the guest.
    pub share_rw: PathBuf,
    /// `share/containers`: one directory per container (mount points).
    pub containers: PathBuf,
    /// `share-rw/containers`: the same directories, for creating and
    /// removing them.
    pub containers_rw: PathBuf,
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
        let share_rw = dir.join("share-rw");
        Self {
            dir: dir.to_path_buf(),
            containers: share.join("containers"),
            containers_rw: share_rw.join("containers"),
            share,
            share_rw,
            vsock: dir.join("vsock"),
            virtiofsd_socket: dir.join("fs.sock"),
            virtiofsd_log: dir.join("virtiofsd.log"),
            console_log: dir.join("console.log"),
        }
    }

    /// A container's directory in the share (where its mounts go).
    pub fn container(&self, container_id: &str) -> PathBuf {
        self.containers.join(container_id)
    }

    /// A container's directory on the writable side (to create what will
    /// be mounted on, and to remove it).
    pub fn container_rw(&self, container_id: &str) -> PathBuf {
        self.containers_rw.join(container_id)
    }
}
