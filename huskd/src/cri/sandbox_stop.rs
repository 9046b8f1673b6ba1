//! StopPodSandbox: containers killed, their host side released, the VM
//! stopped, the network released; the record stays (NotReady).

use std::time::Duration;

use k8s_cri::v1 as cri;
use tonic::Status;

use super::container_io::wait_exit;
use super::container_remove::release_container_host;
use super::helpers::find_pod_opt;
use super::pod_network::release_network;
use super::{now_ns, Husk};
use crate::state::{ContainerState, PodState};
use husk_runtime::sandbox::reap_orphan_dir;

pub(super) async fn stop_pod_sandbox(
    h: &Husk,
    req: cri::StopPodSandboxRequest,
) -> Result<cri::StopPodSandboxResponse, Status> {
    let Some(p) = find_pod_opt(h, "pod_sandbox_id", &req.pod_sandbox_id)? else {
        return Ok(cri::StopPodSandboxResponse {});
    };
    let lock = h.pod_lock(&p.id);
    let _g = lock.lock().await;
    stop_pod_inner(h, &p.id, "stopped by StopPodSandbox").await;
    Ok(cri::StopPodSandboxResponse {})
}

/// Stops a pod: its containers are killed, their rootfs and mounts
/// released, the VM stopped. The record stays (NotReady). Never fails:
/// what cannot be cleaned is logged and retried by RemovePodSandbox.
pub(super) async fn stop_pod_inner(h: &Husk, pod_id: &str, reason: &str) {
    let containers = h.state.containers_of(pod_id);
    let sandbox = h.sandbox(pod_id);
    for c in &containers {
        if c.state == ContainerState::Running {
            if let Some(sb) = &sandbox {
                let _ = sb.signal(&c.id, "", libc::SIGKILL).await;
                wait_exit(h, &c.id, Duration::from_secs(5)).await;
            }
        }
    }
    for c in &containers {
        release_container_host(h, c, sandbox.as_deref());
        if matches!(c.state, ContainerState::Running | ContainerState::Created) {
            let _ = h.state.update_container(&c.id, |r| {
                if matches!(r.state, ContainerState::Running | ContainerState::Created) {
                    r.exit_code = if r.state == ContainerState::Created {
                        0
                    } else {
                        137
                    };
                    r.state = ContainerState::Exited;
                    r.finished_at_ns = now_ns();
                    r.reason = "PodStopped".into();
                    r.message = reason.into();
                }
            });
        }
    }
    match h.take_sandbox(pod_id) {
        Some(sb) => {
            if let Err(e) = sb.stop().await {
                tracing::error!(error = %e, "stopping the pod VM");
            }
        }
        None => {
            // No live VM (huskd restarted): reap what a previous huskd left.
            if let Some(p) = h.state.pod(pod_id) {
                reap_orphan_dir(&p.sandbox_dir).await;
            }
        }
    }
    // After the VM: its VMM holds the tap open until it exits.
    let net = h.state.pod(pod_id).and_then(|p| p.network);
    release_network(h, pod_id, net.as_ref()).await;
    if let Err(e) = h.state.update_pod(pod_id, |p| {
        p.state = PodState::NotReady;
        if p.reason.is_empty() {
            p.reason = reason.into();
        }
        p.pids.clear();
        p.sandbox = None;
    }) {
        tracing::error!(error = %e, "persisting the stopped pod");
    }
}
