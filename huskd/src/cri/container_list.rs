//! ListContainers with its filters (id and pod prefixes, state, labels).

use k8s_cri::v1 as cri;
use tonic::Status;

use super::helpers::{container_state_cri, label_match};
use super::Husk;

pub(super) async fn list_containers(
    h: &Husk,
    req: cri::ListContainersRequest,
) -> Result<cri::ListContainersResponse, Status> {
    let filter = req.filter.unwrap_or_default();
    let containers = h
        .state
        .containers()
        .into_iter()
        .filter(|c| filter.id.is_empty() || c.id.starts_with(&filter.id))
        .filter(|c| {
            filter.pod_sandbox_id.is_empty() || c.pod_id.starts_with(&filter.pod_sandbox_id)
        })
        .filter(|c| {
            filter
                .state
                .as_ref()
                .is_none_or(|s| s.state == container_state_cri(c.state))
        })
        .filter(|c| label_match(&c.config.labels, &filter.label_selector))
        .map(|c| cri::Container {
            id: c.id.clone(),
            pod_sandbox_id: c.pod_id.clone(),
            metadata: c.config.metadata.clone(),
            image: c.config.image.clone(),
            image_ref: c.image_id.clone(),
            state: container_state_cri(c.state),
            created_at: c.created_at_ns,
            labels: c.config.labels.clone(),
            annotations: c.config.annotations.clone(),
            image_id: c.image_id.clone(),
        })
        .collect();
    Ok(cri::ListContainersResponse { containers })
}
