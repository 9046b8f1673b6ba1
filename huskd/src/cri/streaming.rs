//! Exec, Attach and PortForward: the CRI streaming calls answer with a URL
//! of the streaming server (`husk-streaming`), which then calls back into
//! [`StreamRuntime`] to start the process in the pod VM.

use std::sync::{Arc, Weak};

use husk_proto::agent::StdioConfig;
use husk_runtime::sandbox::Sandbox;
use husk_streaming::{
    BoxFuture, Duplex, ExecRequest, PortForwardRequest, Process, ProcessIo, RequestError, Started,
    TermSize,
};
use k8s_cri::v1 as cri;
use tonic::Status;

use super::container_exec_sync::start_exec;
use super::errors::sandbox_error;
use super::helpers::{find_container, find_pod, live_sandbox, record_pod_field};
use super::Husk;
use crate::state::{ContainerRecord, ContainerState};

pub(super) async fn exec(h: &Husk, req: cri::ExecRequest) -> Result<cri::ExecResponse, Status> {
    let c = running_container(h, &req.container_id)?;
    if req.cmd.is_empty() {
        return Err(Status::invalid_argument("cmd is empty"));
    }
    let url = h
        .streaming()?
        .get_exec(ExecRequest {
            container_id: c.id,
            cmd: req.cmd,
            tty: req.tty,
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
        })
        .map_err(request_error)?;
    Ok(cri::ExecResponse { url })
}

pub(super) async fn attach(
    _h: &Husk,
    _req: cri::AttachRequest,
) -> Result<cri::AttachResponse, Status> {
    Err(Status::unimplemented(
        "Attach is not implemented by husk yet (Exec and PortForward are)",
    ))
}

pub(super) async fn port_forward(
    h: &Husk,
    req: cri::PortForwardRequest,
) -> Result<cri::PortForwardResponse, Status> {
    let pod = find_pod(h, "pod_sandbox_id", &req.pod_sandbox_id)?;
    record_pod_field(&pod.id);
    live_sandbox(h, &pod.id)?;
    let mut ports = Vec::with_capacity(req.port.len());
    for (i, p) in req.port.iter().enumerate() {
        let port = u16::try_from(*p)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Status::invalid_argument(format!("port[{i}]: {p} is not a TCP port")))?;
        ports.push(port);
    }
    let url = h
        .streaming()?
        .get_port_forward(PortForwardRequest {
            pod_sandbox_id: pod.id,
            ports,
        })
        .map_err(request_error)?;
    Ok(cri::PortForwardResponse { url })
}

fn running_container(h: &Husk, id: &str) -> Result<ContainerRecord, Status> {
    let c = find_container(h, id)?;
    record_pod_field(&c.pod_id);
    if c.state != ContainerState::Running {
        return Err(Status::failed_precondition(format!(
            "container {} is not running",
            c.id
        )));
    }
    Ok(c)
}

fn request_error(e: RequestError) -> Status {
    match e {
        RequestError::Invalid(m) => Status::invalid_argument(m),
        RequestError::Token(husk_streaming::tokens::TokenError::Full(_)) => {
            Status::resource_exhausted(e.to_string())
        }
        RequestError::Token(_) => Status::internal(e.to_string()),
    }
}

/// What the streaming server calls to start processes. Holds huskd weakly:
/// the server lives inside it.
pub(crate) struct StreamRuntime {
    husk: Weak<Husk>,
}

impl StreamRuntime {
    pub(crate) fn new(husk: &Arc<Husk>) -> Self {
        Self {
            husk: Arc::downgrade(husk),
        }
    }

    async fn start(&self, req: ExecRequest) -> Result<Started, Status> {
        let h = self
            .husk
            .upgrade()
            .ok_or_else(|| Status::unavailable("huskd is shutting down"))?;
        // The container may have stopped since Exec returned the URL.
        let c = running_container(&h, &req.container_id)?;
        let sandbox = live_sandbox(&h, &c.pod_id)?;
        let exec_id = format!("exec-{}", &super::new_id()[..16]);
        let stdio = StdioConfig {
            stdin: req.stdin,
            terminal: req.tty,
        };
        let span =
            tracing::info_span!("stream_exec", pod = %c.pod_id, container = %c.id, exec = %exec_id);
        let _e = span.enter();
        let streams = start_exec(&h, &c, &sandbox, &exec_id, &req.cmd, stdio).await?;
        tracing::info!(cmd = ?req.cmd, tty = req.tty, stdin = req.stdin, "exec session started");
        Ok(Started {
            io: ProcessIo {
                stdin: streams.stdin.map(|s| Box::new(s) as _),
                stdout: Some(Box::new(streams.stdout)),
                stderr: streams.stderr.map(|s| Box::new(s) as _),
            },
            process: Arc::new(ExecProcess {
                sandbox,
                container_id: c.id,
                exec_id,
            }),
        })
    }
}

impl husk_streaming::Runtime for StreamRuntime {
    fn port_forward(
        &self,
        pod: String,
        port: u16,
    ) -> BoxFuture<'_, Result<Box<dyn Duplex>, String>> {
        Box::pin(async move {
            let h = self.husk.upgrade().ok_or("huskd is shutting down")?;
            let sandbox = live_sandbox(&h, &pod).map_err(|s| s.message().to_string())?;
            match sandbox.port_forward(port).await {
                Ok(s) => Ok(Box::new(s) as Box<dyn Duplex>),
                // The agent's own words ("connection refused") are what the
                // client needs; the rest of the chain names the sandbox.
                Err(husk_runtime::sandbox::SandboxError::Agent {
                    source: husk_runtime::agent::AgentError::PortRefused { reason, .. },
                    ..
                }) => Err(reason),
                Err(e) => Err(e.to_string()),
            }
        })
    }

    fn exec(&self, req: ExecRequest) -> BoxFuture<'_, Result<Started, String>> {
        Box::pin(async move { self.start(req).await.map_err(|s| s.message().to_string()) })
    }
}

struct ExecProcess {
    sandbox: Arc<Sandbox>,
    container_id: String,
    exec_id: String,
}

impl Process for ExecProcess {
    fn wait(&self) -> BoxFuture<'_, Result<i32, String>> {
        Box::pin(async move {
            self.sandbox
                .wait(&self.container_id, &self.exec_id)
                .await
                .map(|e| e.exit_code)
                .map_err(|e| sandbox_error(&e).message().to_string())
        })
    }

    fn resize(&self, size: TermSize) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let r = self
                .sandbox
                .resize(
                    &self.container_id,
                    &self.exec_id,
                    size.height.into(),
                    size.width.into(),
                )
                .await;
            if let Err(e) = r {
                tracing::debug!(%e, "terminal resize");
            }
        })
    }

    fn kill(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self
                .sandbox
                .signal(&self.container_id, &self.exec_id, libc::SIGKILL)
                .await;
        })
    }
}
