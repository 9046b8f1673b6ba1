//! Exec, Attach and PortForward: the CRI streaming calls answer with a URL
//! of the streaming server (`husk-streaming`), which then calls back into
//! [`StreamRuntime`] to start the process in the pod VM.

use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use husk_proto::agent::StdioConfig;
use husk_runtime::sandbox::Sandbox;
use husk_streaming::{
    AttachRequest, BoxFuture, Duplex, ExecRequest, PortForwardRequest, Process, ProcessIo,
    RequestError, Started, TermSize,
};
use k8s_cri::v1 as cri;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::Status;
use tracing::Instrument;

use super::container_exec_sync::start_exec;
use super::errors::sandbox_error;
use super::helpers::{find_container, find_pod, live_sandbox, record_pod_field};
use super::Husk;
use crate::logs::Stream;
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
    h: &Husk,
    req: cri::AttachRequest,
) -> Result<cri::AttachResponse, Status> {
    let c = running_container(h, &req.container_id)?;
    if req.stdin && !c.config.stdin {
        return Err(Status::invalid_argument(format!(
            "stdin: container {} was created without stdin",
            c.id
        )));
    }
    // The container's terminal decides, as it does for containerd.
    let tty = c.config.tty;
    let url = h
        .streaming()?
        .get_attach(AttachRequest {
            container_id: c.id,
            tty,
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr && !tty,
        })
        .map_err(request_error)?;
    Ok(cri::AttachResponse { url })
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
        let streams = start_exec(&h, &c, &sandbox, &exec_id, &req.cmd, stdio)
            .instrument(span)
            .await?;
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

impl StreamRuntime {
    async fn start_attach(&self, req: AttachRequest) -> Result<Started, Status> {
        let h = self
            .husk
            .upgrade()
            .ok_or_else(|| Status::unavailable("huskd is shutting down"))?;
        let c = running_container(&h, &req.container_id)?;
        let sandbox = live_sandbox(&h, &c.pod_id)?;
        let live = h.live(&c.id).ok_or_else(|| {
            Status::failed_precondition(format!(
                "container {}: its streams are gone (huskd restarted since it was created)",
                c.id
            ))
        })?;
        let stdin = match (&live.stdin, req.stdin) {
            (Some(s), true) => Some(Box::new(SharedStdin {
                stream: s.clone(),
                once: c.config.stdin_once,
            }) as _),
            _ => None,
        };
        let out = |kind, wanted: bool| {
            wanted
                .then(|| Box::new(live.output.subscribe(kind)) as Box<dyn AsyncRead + Send + Unpin>)
        };
        tracing::info!(pod = %c.pod_id, container = %c.id, stdin = req.stdin, tty = req.tty, "attach session started");
        Ok(Started {
            io: ProcessIo {
                stdin,
                stdout: out(Stream::Stdout, req.stdout),
                stderr: out(Stream::Stderr, req.stderr),
            },
            process: Arc::new(AttachedContainer {
                sandbox,
                container_id: c.id,
                exit: live.exit.clone(),
                detached: tokio::sync::Notify::new(),
            }),
        })
    }
}

impl husk_streaming::Runtime for StreamRuntime {
    fn attach(&self, req: AttachRequest) -> BoxFuture<'_, Result<Started, String>> {
        Box::pin(async move {
            self.start_attach(req)
                .await
                .map_err(|s| s.message().to_string())
        })
    }

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
        Box::pin(resize(
            &self.sandbox,
            &self.container_id,
            &self.exec_id,
            size,
        ))
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

/// The container's stdin, shared by attach sessions one after another.
/// Closing it (the client's stdin ended) closes the container's stdin only
/// with `stdin_once`; otherwise the next session may write again.
struct SharedStdin {
    stream: Arc<tokio::net::UnixStream>,
    once: bool,
}

impl AsyncWrite for SharedStdin {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        loop {
            std::task::ready!(self.stream.poll_write_ready(cx))?;
            match self.stream.try_write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if self.once {
            let _ = nix::sys::socket::shutdown(
                self.stream.as_raw_fd(),
                nix::sys::socket::Shutdown::Write,
            );
        }
        Poll::Ready(Ok(()))
    }
}

/// An attach session's view of the container: it "exits" when the
/// container does, or when the client detaches (the container goes on).
struct AttachedContainer {
    sandbox: Arc<Sandbox>,
    container_id: String,
    exit: tokio::sync::watch::Receiver<Option<husk_runtime::sandbox::ExitInfo>>,
    detached: tokio::sync::Notify,
}

impl Process for AttachedContainer {
    fn wait(&self) -> BoxFuture<'_, Result<i32, String>> {
        Box::pin(async move {
            let mut exit = self.exit.clone();
            tokio::select! {
                r = exit.wait_for(|e| e.is_some()) => {
                    Ok(r.ok().and_then(|e| e.as_ref().map(|e| e.exit_code)).unwrap_or(0))
                }
                () = self.detached.notified() => Ok(0),
            }
        })
    }

    fn resize(&self, size: TermSize) -> BoxFuture<'_, ()> {
        Box::pin(resize(&self.sandbox, &self.container_id, "", size))
    }

    fn kill(&self) -> BoxFuture<'_, ()> {
        // Detach: the container is the user's, not the session's.
        self.detached.notify_one();
        Box::pin(async {})
    }
}

/// A terminal resize; a failure (the process is gone) only matters to the
/// log.
async fn resize(sandbox: &Sandbox, container_id: &str, exec_id: &str, size: TermSize) {
    let r = sandbox
        .resize(container_id, exec_id, size.height.into(), size.width.into())
        .await;
    if let Err(e) = r {
        tracing::debug!(%e, "terminal resize");
    }
}
