//! ReopenContainerLog (kubelet's log rotation).

use k8s_cri::v1 as cri;
use tonic::Status;

use super::helpers::{find_container, record_pod_field};
use super::Husk;
use crate::state::ContainerState;

pub(super) async fn reopen_container_log(
    h: &Husk,
    req: cri::ReopenContainerLogRequest,
) -> Result<cri::ReopenContainerLogResponse, Status> {
    let c = find_container(h, &req.container_id)?;
    record_pod_field(&c.pod_id);
    if c.state != ContainerState::Running {
        return Err(Status::failed_precondition(format!(
            "container {} is not running",
            c.id
        )));
    }
    let log = h.live(&c.id).and_then(|l| l.log).ok_or_else(|| {
        Status::failed_precondition(format!("container {} has no log file attached", c.id))
    })?;
    log.reopen()
        .map_err(|e| Status::internal(format!("reopening {}: {e}", log.path().display())))?;
    Ok(cri::ReopenContainerLogResponse {})
}
