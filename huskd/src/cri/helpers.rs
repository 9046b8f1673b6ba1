//! Lookups and CRI enum mappings shared by the calls.

use std::collections::HashMap;
use std::sync::Arc;

use husk_runtime::sandbox::Sandbox;
use k8s_cri::v1 as cri;
use tonic::Status;

use super::{validation, Husk};
use crate::state::{ContainerRecord, ContainerState, PodRecord, PodState, Resolved};

pub(super) fn record_pod_field(pod: &str) {
    tracing::Span::current().record("pod", pod);
}

pub(super) fn pod_state_cri(s: PodState) -> i32 {
    match s {
        PodState::Ready => cri::PodSandboxState::SandboxReady as i32,
        PodState::NotReady => cri::PodSandboxState::SandboxNotready as i32,
    }
}

pub(super) fn container_state_cri(s: ContainerState) -> i32 {
    match s {
        ContainerState::Created => cri::ContainerState::ContainerCreated as i32,
        ContainerState::Running => cri::ContainerState::ContainerRunning as i32,
        ContainerState::Exited => cri::ContainerState::ContainerExited as i32,
        ContainerState::Unknown => cri::ContainerState::ContainerUnknown as i32,
    }
}

/// Resolves a pod id (or unique prefix) that must exist.
pub(super) fn find_pod(h: &Husk, field: &str, id: &str) -> Result<PodRecord, Status> {
    validation::id(field, id)?;
    match h.state.resolve_pod(id) {
        Resolved::Found(full) => h
            .state
            .pod(&full)
            .ok_or_else(|| Status::not_found(format!("pod sandbox {id} not found"))),
        Resolved::NotFound => Err(Status::not_found(format!(
            "{field}: pod sandbox {id} not found"
        ))),
        Resolved::Ambiguous(n) => Err(Status::invalid_argument(format!(
            "{field}: {id} matches {n} pod sandboxes"
        ))),
    }
}

/// Like [`find_pod`], `None` for an unknown id (stop/remove succeed then).
pub(super) fn find_pod_opt(h: &Husk, field: &str, id: &str) -> Result<Option<PodRecord>, Status> {
    match find_pod(h, field, id) {
        Ok(p) => Ok(Some(p)),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s),
    }
}

pub(super) fn find_container(h: &Husk, id: &str) -> Result<ContainerRecord, Status> {
    validation::id("container_id", id)?;
    match h.state.resolve_container(id) {
        Resolved::Found(full) => h
            .state
            .container(&full)
            .ok_or_else(|| Status::not_found(format!("container {id} not found"))),
        Resolved::NotFound => Err(Status::not_found(format!(
            "container_id: container {id} not found"
        ))),
        Resolved::Ambiguous(n) => Err(Status::invalid_argument(format!(
            "container_id: {id} matches {n} containers"
        ))),
    }
}

pub(super) fn find_container_opt(h: &Husk, id: &str) -> Result<Option<ContainerRecord>, Status> {
    match find_container(h, id) {
        Ok(c) => Ok(Some(c)),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
        Err(s) => Err(s),
    }
}

pub(super) fn label_match(
    labels: &HashMap<String, String>,
    selector: &HashMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The live sandbox of a pod, or FailedPrecondition for a pod whose VM is
/// not running (stopped, or lost across a restart).
pub(super) fn live_sandbox(h: &Husk, pod_id: &str) -> Result<Arc<Sandbox>, Status> {
    h.sandbox(pod_id)
        .ok_or_else(|| Status::failed_precondition(format!("pod sandbox {pod_id} is not running")))
}
