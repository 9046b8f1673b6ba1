//! StopContainer: SIGTERM, the grace period, then SIGKILL.

use std::time::Duration;

use k8s_cri::v1 as cri;
use tonic::Status;

use super::container_io::wait_exit;
use super::errors::sandbox_error;
use super::helpers::{find_container_opt, record_pod_field};
use super::Husk;
use crate::state::ContainerState;

/// StopContainer's wait after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

pub(super) async fn stop_container_call(
    h: &Husk,
    req: cri::StopContainerRequest,
) -> Result<cri::StopContainerResponse, Status> {
    stop_container(h, &req.container_id, req.timeout).await?;
    Ok(cri::StopContainerResponse {})
}

pub(super) async fn stop_container(h: &Husk, id: &str, timeout_s: i64) -> Result<(), Status> {
    let Some(c) = find_container_opt(h, id)? else {
        return Ok(());
    };
    record_pod_field(&c.pod_id);
    if c.state != ContainerState::Running {
        return Ok(());
    }
    let Some(sandbox) = h.sandbox(&c.pod_id) else {
        return Ok(());
    };
    let timeout = Duration::from_secs(timeout_s.max(0) as u64);
    if !timeout.is_zero() {
        match sandbox.signal(&c.id, "", libc::SIGTERM).await {
            Ok(()) => {}
            Err(e) if sandbox_error(&e).code() == tonic::Code::NotFound => {}
            Err(e) => tracing::warn!(error = %e, "SIGTERM failed"),
        }
        if wait_exit(h, &c.id, timeout).await {
            return Ok(());
        }
        tracing::info!(timeout_s, "container did not stop in time; SIGKILL");
    }
    match sandbox.signal(&c.id, "", libc::SIGKILL).await {
        Ok(()) => {}
        Err(e) if sandbox_error(&e).code() == tonic::Code::NotFound => {}
        Err(e) => return Err(sandbox_error(&e)),
    }
    if !wait_exit(h, &c.id, KILL_WAIT).await {
        return Err(Status::deadline_exceeded(format!(
            "container {} did not exit after SIGKILL",
            c.id
        )));
    }
    Ok(())
}
