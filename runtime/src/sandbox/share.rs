//! The virtio-fs share, read-only for the guest.
//!
//! virtiofsd serves `share/`, a read-only bind mount of `share-rw/`. The
//! guest (root in it included) can therefore create, rename, link or delete
//! nothing in the share's own directories: `containers/<id>/` and the mount
//! points huskd later mounts on stay what huskd made them, so no planted
//! symlink or renamed directory can steer a host mount, unmount or removal
//! elsewhere. What the guest must write is mounted over the read-only view,
//! each on its own: container root filesystems (overlays), CRI volumes
//! (read-write unless the CRI says otherwise) and the files made writable
//! with [`make_guest_writable`] (the pod's `/etc/hosts`). huskd creates
//! directories and files through `share-rw/`, which is never shared.

use std::io;
use std::path::Path;

use nix::mount::{mount, MsFlags};

use super::SandboxPaths;
use crate::mounts;

/// Creates `share-rw/containers` and mounts `share/` as its read-only view,
/// shared (in the propagation sense) so that a backend running the agent
/// in a mount namespace of its own sees the mounts made in it later.
pub fn create(paths: &SandboxPaths) -> io::Result<()> {
    std::fs::create_dir_all(&paths.containers_rw)?;
    std::fs::create_dir_all(&paths.share)?;
    mounts::bind(&paths.share_rw, &paths.share)?;
    let r = mounts::remount_readonly(&paths.share).and_then(|()| {
        mount(
            None::<&str>,
            &paths.share,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .map_err(io::Error::from)
    });
    if let Err(e) = r {
        let _ = mounts::unmount(&paths.share, mounts::WhenBusy::Detach);
        return Err(e);
    }
    Ok(())
}

/// Makes `rel` (a file or directory huskd created below `share-rw/`)
/// writable through the share, by binding it over its read-only view.
pub fn make_guest_writable(paths: &SandboxPaths, rel: &Path) -> io::Result<()> {
    mounts::bind(&paths.share_rw.join(rel), &paths.share.join(rel))
}
