//! ContainerStatus.

use std::collections::HashMap;

use k8s_cri::v1 as cri;
use tonic::Status;

use super::helpers::{container_state_cri, find_container, record_pod_field};
use super::Husk;
use crate::state::ContainerRecord;

pub(super) async fn container_status(
    h: &Husk,
    req: cri::ContainerStatusRequest,
) -> Result<cri::ContainerStatusResponse, Status> {
    let c = find_container(h, &req.container_id)?;
    record_pod_field(&c.pod_id);
    Ok(container_status_of(h, &c, req.verbose))
}

fn container_status_of(
    h: &Husk,
    c: &ContainerRecord,
    verbose: bool,
) -> cri::ContainerStatusResponse {
    let image_spec = c.config.image.clone();
    let status = cri::ContainerStatus {
        id: c.id.clone(),
        metadata: c.config.metadata.clone(),
        state: container_state_cri(c.state),
        created_at: c.created_at_ns,
        started_at: c.started_at_ns,
        finished_at: c.finished_at_ns,
        exit_code: c.exit_code,
        image: image_spec,
        image_ref: c.image_id.clone(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        labels: c.config.labels.clone(),
        annotations: c.config.annotations.clone(),
        mounts: c.config.mounts.clone(),
        log_path: c.log_path.display().to_string(),
        resources: c
            .config
            .linux
            .as_ref()
            .and_then(|l| l.resources.clone())
            .map(|r| cri::ContainerResources {
                linux: Some(r),
                ..Default::default()
            }),
        image_id: c.image_id.clone(),
        ..Default::default()
    };
    let mut info = HashMap::new();
    if verbose {
        let live = h.live(&c.id).is_some();
        let v = serde_json::json!({
            "sandboxID": c.pod_id,
            "imageRef": c.image_ref,
            "hostMounts": c.host_mounts,
            "logAttached": live,
            "config": c.config,
        });
        info.insert("info".to_string(), v.to_string());
    }
    cri::ContainerStatusResponse {
        status: Some(status),
        info,
    }
}
