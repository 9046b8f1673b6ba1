//! UpdateContainerResources: the guest cgroup of the container through the
//! agent, then the record.

use k8s_cri::v1 as cri;
use tonic::Status;

use super::errors::{sandbox_error, state_error};
use super::helpers::{find_container, live_sandbox, record_pod_field};
use super::{spec, Husk};
use crate::state::ContainerState;

pub(super) async fn update_container_resources(
    h: &Husk,
    req: cri::UpdateContainerResourcesRequest,
) -> Result<cri::UpdateContainerResourcesResponse, Status> {
    let c = find_container(h, &req.container_id)?;
    record_pod_field(&c.pod_id);
    let Some(linux) = req.linux else {
        return Ok(cri::UpdateContainerResourcesResponse {});
    };
    if !matches!(c.state, ContainerState::Created | ContainerState::Running) {
        return Err(Status::failed_precondition(format!(
            "container {} is not running",
            c.id
        )));
    }
    let sandbox = live_sandbox(h, &c.pod_id)?;
    let json = spec::resources_json(&linux).to_string().into_bytes();
    sandbox
        .update_container(&c.id, json)
        .await
        .map_err(|e| sandbox_error(&e))?;
    h.state
        .update_container(&c.id, |r| {
            r.config
                .linux
                .get_or_insert_with(Default::default)
                .resources = Some(linux);
        })
        .map_err(|e| state_error(&e))?;
    Ok(cri::UpdateContainerResourcesResponse {})
}
