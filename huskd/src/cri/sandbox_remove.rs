//! RemovePodSandbox: a running pod is stopped forcibly first (CRI), then
//! its containers, directory, network and record go.

use std::sync::Arc;

use k8s_cri::v1 as cri;
use tonic::Status;

use super::container_remove::release_container_host;
use super::errors::state_error;
use super::helpers::find_pod_opt;
use super::pod_network::release_network;
use super::sandbox_stop::stop_pod_inner;
use super::Husk;
use crate::state::PodRecord;
use husk_runtime::sandbox::reap_orphan_dir;

pub(super) async fn remove_pod_sandbox(
    h: &Arc<Husk>,
    req: cri::RemovePodSandboxRequest,
) -> Result<cri::RemovePodSandboxResponse, Status> {
    let Some(p) = find_pod_opt(h, "pod_sandbox_id", &req.pod_sandbox_id)? else {
        return Ok(cri::RemovePodSandboxResponse {});
    };
    // In a task of its own, as a stop (sandbox_stop::stop_detached): a
    // caller that goes away does not cancel a removal halfway.
    let h = h.clone();
    tokio::spawn(async move { remove(&h, p).await })
        .await
        .map_err(|e| Status::internal(format!("the pod removal task failed: {e}")))??;
    Ok(cri::RemovePodSandboxResponse {})
}

async fn remove(h: &Husk, p: PodRecord) -> Result<(), Status> {
    let lock = h.pod_lock(&p.id);
    {
        let _g = lock.lock().await;
        // CRI: removing a running pod stops it forcibly first.
        stop_pod_inner(h, &p.id, "removed by RemovePodSandbox").await;
        for c in h.state.containers_of(&p.id) {
            release_container_host(h, &c, None);
            h.state
                .remove_container(&c.id)
                .map_err(|e| state_error(&e))?;
            h.drop_live(&c.id);
        }
        reap_orphan_dir(&p.sandbox_dir).await;
        if !super::pod_network::HostNamespaces::of(&p.config).network {
            release_network(h, &p.id, p.network.as_ref()).await;
        }
        h.state.remove_pod(&p.id).map_err(|e| state_error(&e))?;
    }
    h.forget_pod_lock(&p.id);
    Ok(())
}
