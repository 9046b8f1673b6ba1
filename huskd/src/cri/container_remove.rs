//! RemoveContainer, and the release of a container's host side (its CRI
//! bind mounts, rootfs and directory in the share), shared with the pod
//! calls.

use k8s_cri::v1 as cri;
use tonic::Status;

use husk_runtime::sandbox::Sandbox;

use super::container_stop::stop_container;
use super::errors::{sandbox_error, state_error};
use super::helpers::{find_container_opt, record_pod_field};
use super::Husk;
use crate::state::{ContainerRecord, ContainerState};

pub(super) async fn remove_container_call(
    h: &Husk,
    req: cri::RemoveContainerRequest,
) -> Result<cri::RemoveContainerResponse, Status> {
    remove_container(h, &req.container_id).await?;
    Ok(cri::RemoveContainerResponse {})
}

async fn remove_container(h: &Husk, id: &str) -> Result<(), Status> {
    let Some(c) = find_container_opt(h, id)? else {
        return Ok(());
    };
    record_pod_field(&c.pod_id);
    if c.state == ContainerState::Running {
        stop_container(h, &c.id, 0).await?;
    }
    let lock = h.pod_lock(&c.pod_id);
    let _g = lock.lock().await;
    let sandbox = h.sandbox(&c.pod_id);
    if let Some(sb) = &sandbox {
        if let Err(e) = sb.remove_container(&c.id, true).await {
            let s = sandbox_error(&e);
            if s.code() != tonic::Code::NotFound {
                return Err(s);
            }
        }
    }
    release_container_host(h, &c, sandbox.as_deref());
    h.state
        .remove_container(&c.id)
        .map_err(|e| state_error(&e))?;
    h.drop_live(&c.id);
    Ok(())
}

/// Unmounts a container's CRI bind mounts and its rootfs, and removes its
/// directory in the share. Idempotent.
pub(super) fn release_container_host(h: &Husk, c: &ContainerRecord, sandbox: Option<&Sandbox>) {
    for m in &c.host_mounts {
        if let Err(e) = husk_runtime::mounts::unmount(m, husk_runtime::mounts::WhenBusy::Detach) {
            tracing::warn!(mount = %m.display(), error = %e, "unmounting a container mount");
        }
    }
    if h.images
        .rootfs_mounts()
        .iter()
        .any(|m| m.container_id == c.id)
    {
        if let Err(e) = h.images.release_rootfs(&c.id) {
            tracing::error!(container = %c.id, error = %e, "releasing the container rootfs");
        }
    }
    if let Some(sb) = sandbox {
        let paths = sb.paths();
        let dir = paths.container(&c.id);
        if dir.exists() {
            match husk_runtime::mounts::unmount_all_under(&dir) {
                Ok(left) if left.is_empty() => {
                    let _ = std::fs::remove_dir_all(paths.container_rw(&c.id));
                }
                Ok(left) => {
                    tracing::error!(?left, "mounts left in the container directory; keeping it")
                }
                Err(e) => tracing::error!(error = %e, "reading mountinfo"),
            }
        }
    }
}
