//! ExecSync: a process in the container, its output collected (bounded),
//! killed at the caller's timeout.

use std::time::Duration;

use husk_proto::agent::StdioConfig;
use k8s_cri::v1 as cri;
use tokio::io::AsyncReadExt;
use tonic::Status;

use super::errors::sandbox_error;
use super::helpers::{find_container, live_sandbox, record_pod_field};
use super::{spec, Husk};
use crate::state::{ContainerRecord, ContainerState};
use husk_runtime::sandbox::{ProcessStdio, Sandbox};

/// Most output ExecSync keeps per stream (as containerd).
const EXEC_OUTPUT_LIMIT: usize = 16 * 1024 * 1024;

pub(super) async fn exec_sync(
    h: &Husk,
    req: cri::ExecSyncRequest,
) -> Result<cri::ExecSyncResponse, Status> {
    let c = find_container(h, &req.container_id)?;
    record_pod_field(&c.pod_id);
    if req.cmd.is_empty() {
        return Err(Status::invalid_argument("cmd is empty"));
    }
    if c.state != ContainerState::Running {
        return Err(Status::failed_precondition(format!(
            "container {} is not running",
            c.id
        )));
    }
    let stdio = StdioConfig {
        stdin: false,
        terminal: false,
    };
    // The caller's timeout covers the whole exec, its start included: a
    // process that never gets going (a container that broke its own user
    // database, say) must not hold the call for the agent's RPC timeout.
    let exec_id = format!("exec-{}", &super::new_id()[..16]);
    let sandbox = live_sandbox(h, &c.pod_id)?;
    let run = async {
        let streams = start_exec(h, &c, &sandbox, &exec_id, &req.cmd, stdio).await?;
        let read = |s: Option<tokio::net::UnixStream>| async move {
            let mut out = Vec::new();
            if let Some(s) = s {
                let _ = s.take(EXEC_OUTPUT_LIMIT as u64).read_to_end(&mut out).await;
            }
            out
        };
        let (stdout, stderr, exit) = tokio::join!(
            read(Some(streams.stdout)),
            read(streams.stderr),
            sandbox.wait(&c.id, &exec_id)
        );
        let exit = exit.map_err(|e| sandbox_error(&e))?;
        Ok::<_, Status>(cri::ExecSyncResponse {
            stdout,
            stderr,
            exit_code: exit.exit_code,
        })
    };
    if req.timeout > 0 {
        match tokio::time::timeout(Duration::from_secs(req.timeout as u64), run).await {
            Ok(r) => r,
            Err(_) => {
                let _ = sandbox.signal(&c.id, &exec_id, libc::SIGKILL).await;
                Err(Status::deadline_exceeded(format!(
                    "ExecSync in container {}: command timed out after {}s",
                    c.id, req.timeout
                )))
            }
        }
    } else {
        run.await
    }
}

/// Starts `cmd` in the running container `c` as process `exec_id` (user and
/// environment as the container's) and opens the streams `stdio` asks for.
pub(super) async fn start_exec(
    h: &Husk,
    c: &ContainerRecord,
    sandbox: &Sandbox,
    exec_id: &str,
    cmd: &[String],
    stdio: StdioConfig,
) -> Result<ProcessStdio, Status> {
    let image = h
        .images
        .status(&c.image_id)
        .ok()
        .flatten()
        .map(|i| i.config)
        .unwrap_or_default();
    let rootfs = sandbox
        .container_rootfs(&c.id)
        .map_err(|e| sandbox_error(&e))?;
    let user = spec::resolve_user_off_thread(&c.config, &image, &rootfs).await?;
    let process = spec::exec_process(&c.config, &image, &user, cmd)?;
    sandbox
        .exec(&c.id, exec_id, &process, stdio)
        .await
        .map_err(|e| sandbox_error(&e))?;
    sandbox
        .attach_stdio(&c.id, exec_id, stdio)
        .await
        .map_err(|e| sandbox_error(&e))
}
