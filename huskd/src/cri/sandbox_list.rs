//! ListPodSandbox with its filters (id prefix, state, labels).

use k8s_cri::v1 as cri;
use tonic::Status;

use super::helpers::{label_match, pod_state_cri};
use super::sandbox_status::refresh_pod;
use super::Husk;

pub(super) async fn list_pod_sandbox(
    h: &Husk,
    req: cri::ListPodSandboxRequest,
) -> Result<cri::ListPodSandboxResponse, Status> {
    let filter = req.filter.unwrap_or_default();
    let mut pods = Vec::new();
    for p in h.state.pods() {
        pods.push(refresh_pod(h, p).await?);
    }
    let items = pods
        .into_iter()
        .filter(|p| filter.id.is_empty() || p.id.starts_with(&filter.id))
        .filter(|p| {
            filter
                .state
                .as_ref()
                .is_none_or(|s| s.state == pod_state_cri(p.state))
        })
        .filter(|p| label_match(&p.config.labels, &filter.label_selector))
        .map(|p| cri::PodSandbox {
            id: p.id.clone(),
            metadata: p.config.metadata.clone(),
            state: pod_state_cri(p.state),
            created_at: p.created_at_ns,
            labels: p.config.labels.clone(),
            annotations: p.config.annotations.clone(),
            runtime_handler: p.runtime_handler.clone(),
        })
        .collect();
    Ok(cri::ListPodSandboxResponse { items })
}
