//! StartContainer: a fresh exit channel, the agent's StartContainer, then
//! the exit watcher.

use std::sync::Arc;

use k8s_cri::v1 as cri;
use tokio::sync::watch;
use tonic::Status;

use super::container_io::watch_exit;
use super::errors::{sandbox_error, state_error};
use super::helpers::{find_container, live_sandbox, record_pod_field};
use super::{now_ns, Husk, LiveContainer};
use crate::state::ContainerState;

pub(super) async fn start_container_call(
    h: &Arc<Husk>,
    req: cri::StartContainerRequest,
) -> Result<cri::StartContainerResponse, Status> {
    start_container(h, &req.container_id).await?;
    Ok(cri::StartContainerResponse {})
}

async fn start_container(h: &Arc<Husk>, id: &str) -> Result<(), Status> {
    let c = find_container(h, id)?;
    record_pod_field(&c.pod_id);
    let lock = h.pod_lock(&c.pod_id);
    let _g = lock.lock().await;
    let c = h
        .state
        .container(&c.id)
        .ok_or_else(|| Status::not_found(format!("container {id} was removed")))?;
    if c.state != ContainerState::Created {
        return Err(Status::failed_precondition(format!(
            "container {} is {:?}, not Created",
            c.id, c.state
        )));
    }
    let sandbox = live_sandbox(h, &c.pod_id)?;
    // A fresh exit channel: the waiter below owns the sender.
    let (tx, rx) = watch::channel(None);
    let Some(live) = h.live(&c.id) else {
        return Err(Status::failed_precondition(format!(
            "container {}: its output streams are gone (huskd restarted since CreateContainer)",
            c.id
        )));
    };
    let io_done = live.io_done.clone();
    h.set_live(
        &c.id,
        LiveContainer {
            log: live.log,
            exit: rx,
            io_done: live.io_done,
            stdin: live.stdin,
            output: live.output,
        },
    );
    sandbox
        .start_container(&c.id)
        .await
        .map_err(|e| sandbox_error(&e))?;
    h.state
        .update_container(&c.id, |r| {
            r.state = ContainerState::Running;
            r.started_at_ns = now_ns();
        })
        .map_err(|e| state_error(&e))?;
    watch_exit(h.clone(), sandbox, &c, io_done, tx);
    Ok(())
}
