//! StopPodSandbox: containers killed, their host side released, the VM
//! stopped, the network released; the record stays (NotReady).

use std::sync::Arc;
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

/// Each container's SIGKILL through the agent: a guest that does not
/// answer this fast is not waited for (the VM is stopped anyway).
const KILL_RPC_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the killed containers get to report their exits (output
/// drained to the logs) before the VM goes.
const KILLED_EXIT_WAIT: Duration = Duration::from_secs(5);

pub(super) async fn stop_pod_sandbox(
    h: &Arc<Husk>,
    req: cri::StopPodSandboxRequest,
) -> Result<cri::StopPodSandboxResponse, Status> {
    let Some(p) = find_pod_opt(h, "pod_sandbox_id", &req.pod_sandbox_id)? else {
        return Ok(cri::StopPodSandboxResponse {});
    };
    stop_detached(h, p.id, "stopped by StopPodSandbox").await;
    Ok(cri::StopPodSandboxResponse {})
}

/// [`stop_pod_inner`] under the pod's lock, in a task of its own: a caller
/// that goes away (its gRPC deadline passed) does not cancel a stop
/// halfway, which could leave a VM running or a network set up.
pub(super) async fn stop_detached(h: &Arc<Husk>, pod_id: String, reason: &'static str) {
    let h = h.clone();
    let task = tokio::spawn(async move {
        let lock = h.pod_lock(&pod_id);
        let _g = lock.lock().await;
        stop_pod_inner(&h, &pod_id, reason).await;
    });
    if let Err(e) = task.await {
        tracing::error!(error = %e, "the pod stop task failed");
    }
}

/// Stops a pod: its containers are killed, their rootfs and mounts
/// released, the VM stopped. The record stays (NotReady). Never fails:
/// what cannot be cleaned is logged and retried by RemovePodSandbox.
/// Bounded even when the guest never answers: the containers are killed
/// concurrently, each kill waits at most [`KILL_RPC_TIMEOUT`], and exits
/// are awaited only from a guest that took the kills.
pub(super) async fn stop_pod_inner(h: &Husk, pod_id: &str, reason: &str) {
    let containers = h.state.containers_of(pod_id);
    let sandbox = h.sandbox(pod_id);
    if let Some(sb) = &sandbox {
        let running: Vec<_> = containers
            .iter()
            .filter(|c| c.state == ContainerState::Running)
            .collect();
        let kills = running
            .iter()
            .map(|c| tokio::time::timeout(KILL_RPC_TIMEOUT, sb.signal(&c.id, "", libc::SIGKILL)));
        let answered = futures_util::future::join_all(kills)
            .await
            .into_iter()
            .all(|r| r.is_ok());
        if answered {
            futures_util::future::join_all(
                running
                    .iter()
                    .map(|c| wait_exit(h, &c.id, KILLED_EXIT_WAIT)),
            )
            .await;
        } else {
            tracing::warn!("the guest did not answer the containers' kill; stopping the VM");
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
    // A pod on the host's network has none of its own.
    if let Some(p) = h.state.pod(pod_id) {
        if !super::pod_network::HostNamespaces::of(&p.config).network {
            release_network(h, pod_id, p.network.as_ref()).await;
        }
    }
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
