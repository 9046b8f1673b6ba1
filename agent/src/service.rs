//! The `husk.agent.v1.Agent` ttrpc service and the STREAM handshake.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use husk_proto::agent::{
    self, ContainerRef, ContainerStatsResponse, CreateContainerRequest, CreateSandboxRequest,
    DestroySandboxRequest, Empty, ExecProcessRequest, HealthRequest, HealthResponse, ProcessRef,
    RemoveContainerRequest, ResizeTerminalRequest, SignalProcessRequest, StreamAccept, StreamHello,
    StreamKind, UpdateContainerRequest, WaitProcessResponse,
};
use husk_proto::ttrpc::Status;
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::container::{Containers, StdioRequest};
use crate::error::{AgentError, Result};
use crate::spec;
use crate::stdio::{BoxConn, Slot};

/// What the agent may do to the machine it runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 of a VM: mounts the share, sets the hostname, powers off.
    Vm,
    /// A process on a host (tests): leaves the machine alone; "power off"
    /// ends the agent process.
    Host,
}

struct Sandbox {
    id: String,
    share_mounted: bool,
}

pub struct AgentService {
    mode: Mode,
    pub containers: Containers,
    sandbox: tokio::sync::Mutex<Option<Sandbox>>,
}

pub fn boottime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a live, writable value.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn stdio_req(s: Option<agent::StdioConfig>) -> StdioRequest {
    let s = s.unwrap_or_default();
    StdioRequest {
        stdin: s.stdin,
        terminal: s.terminal,
    }
}

fn process_ref(r: Option<ProcessRef>, field: &str) -> Result<ProcessRef> {
    r.ok_or_else(|| AgentError::InvalidArgument(format!("{field}: missing")))
}

impl AgentService {
    pub fn new(mode: Mode, containers: Containers) -> Self {
        AgentService {
            mode,
            containers,
            sandbox: Default::default(),
        }
    }

    async fn require_sandbox(&self) -> Result<()> {
        if self.sandbox.lock().await.is_none() {
            return Err(AgentError::FailedPrecondition(
                "CreateSandbox has not been called".into(),
            ));
        }
        Ok(())
    }

    async fn create_sandbox_impl(&self, req: CreateSandboxRequest) -> Result<()> {
        spec::validate_id("sandbox_id", &req.sandbox_id)?;
        if !req.hostname.is_empty() {
            spec::validate_hostname(&req.hostname)?;
        }
        if self.mode == Mode::Vm || !req.share_tag.is_empty() {
            spec::validate_share_tag(&req.share_tag)?;
        }
        if let Some(network) = &req.network {
            crate::network::validate(network)?;
        }
        let mut sandbox = self.sandbox.lock().await;
        if let Some(s) = sandbox.as_ref() {
            return Err(AgentError::AlreadyExists(format!(
                "sandbox {:?} already exists",
                s.id
            )));
        }
        let mut share_mounted = false;
        match self.mode {
            Mode::Vm => {
                // Before the mount: a failure here leaves nothing that a
                // retry would trip over (configuring is idempotent).
                if let Some(network) = &req.network {
                    crate::network::configure(network).await?;
                }
                let dir = Path::new(husk_proto::GUEST_SHARE_DIR);
                std::fs::create_dir_all(dir).map_err(|e| {
                    AgentError::Internal(format!("creating {}: {e}", dir.display()))
                })?;
                nix::mount::mount(
                    Some(req.share_tag.as_str()),
                    dir,
                    Some("virtiofs"),
                    nix::mount::MsFlags::empty(),
                    None::<&str>,
                )
                .map_err(|e| {
                    AgentError::Internal(format!(
                        "mounting virtio-fs tag {:?} at {}: {e}",
                        req.share_tag,
                        dir.display()
                    ))
                })?;
                share_mounted = true;
                if !req.hostname.is_empty() {
                    nix::unistd::sethostname(&req.hostname)
                        .map_err(|e| AgentError::Internal(format!("sethostname: {e}")))?;
                }
            }
            Mode::Host => {
                info!(
                    "not in a VM: the share is not mounted, the hostname and the network are not set"
                )
            }
        }
        info!(sandbox = req.sandbox_id, "sandbox created");
        *sandbox = Some(Sandbox {
            id: req.sandbox_id,
            share_mounted,
        });
        Ok(())
    }

    async fn destroy_sandbox_impl(&self, req: DestroySandboxRequest) -> Result<()> {
        let mut errors = Vec::new();
        for id in self.containers.ids() {
            if let Err(e) = self.containers.remove(&id, true).await {
                errors.push(format!("{id}: {e}"));
            }
        }
        let mut sandbox = self.sandbox.lock().await;
        if let Some(s) = sandbox.as_ref() {
            if s.share_mounted {
                if let Err(e) = nix::mount::umount(husk_proto::GUEST_SHARE_DIR) {
                    warn!("unmounting the share: {e}; detaching it");
                    if let Err(e) = nix::mount::umount2(
                        husk_proto::GUEST_SHARE_DIR,
                        nix::mount::MntFlags::MNT_DETACH,
                    ) {
                        errors.push(format!("unmounting {}: {e}", husk_proto::GUEST_SHARE_DIR));
                    }
                }
            }
        }
        *sandbox = None;
        nix::unistd::sync();
        if req.poweroff {
            let mode = self.mode;
            // After the answer has gone out.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                match mode {
                    Mode::Vm => crate::pid1::power_off(),
                    Mode::Host => {
                        info!("poweroff requested: exiting");
                        std::process::exit(0);
                    }
                }
            });
        }
        if errors.is_empty() {
            info!("sandbox destroyed");
            Ok(())
        } else {
            Err(AgentError::Internal(format!(
                "destroying the sandbox: {}",
                errors.join("; ")
            )))
        }
    }

    /// Handles one STREAM connection: handshake, then bytes.
    pub async fn handle_stream(&self, mut conn: BoxConn) {
        let hello: std::io::Result<StreamHello> = match tokio::time::timeout(
            Duration::from_secs(10),
            husk_proto::stream::read_msg(&mut conn, 4096),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => {
                warn!("stream connection sent no hello within 10 s");
                return;
            }
        };
        let hello = match hello {
            Ok(h) => h,
            Err(e) => {
                warn!("bad stream hello: {e}");
                return;
            }
        };
        if hello.kind == StreamKind::PortForward as i32 {
            port_forward(&hello, conn).await;
            return;
        }
        let slot = self.stream_slot(&hello);
        let (accept, target) = match slot {
            Ok(t) => (
                StreamAccept {
                    error: String::new(),
                },
                Some(t),
            ),
            Err(e) => (
                StreamAccept {
                    error: e.to_string(),
                },
                None,
            ),
        };
        if husk_proto::stream::write_msg(&mut conn, &accept)
            .await
            .is_err()
        {
            return;
        }
        match target {
            Some((process, kind)) => {
                let slot = match kind {
                    StreamKind::Stdin => process.stdio.stdin.as_ref(),
                    StreamKind::Stdout => Some(&process.stdio.stdout),
                    StreamKind::Stderr => process.stdio.stderr.as_ref(),
                    StreamKind::Unspecified | StreamKind::PortForward => None,
                };
                if let Some(slot) = slot {
                    attach(slot, conn).await;
                }
            }
            None => {
                warn!("stream refused: {}", accept.error);
                let _ = conn.shutdown().await;
            }
        }
    }

    fn stream_slot(
        &self,
        hello: &StreamHello,
    ) -> Result<(Arc<crate::container::Process>, StreamKind)> {
        let r = hello
            .process
            .as_ref()
            .ok_or_else(|| AgentError::InvalidArgument("process: missing".into()))?;
        let kind = StreamKind::try_from(hello.kind)
            .ok()
            .filter(|k| *k != StreamKind::Unspecified)
            .ok_or_else(|| {
                AgentError::InvalidArgument(format!("kind: {} is not a stream kind", hello.kind))
            })?;
        let p = self.containers.process(&r.container_id, &r.exec_id)?;
        let present = match kind {
            StreamKind::Stdin => p.stdio.stdin.is_some(),
            StreamKind::Stdout => true,
            StreamKind::Stderr => p.stdio.stderr.is_some(),
            StreamKind::Unspecified | StreamKind::PortForward => false,
        };
        if !present {
            return Err(AgentError::FailedPrecondition(format!(
                "process {:?}/{:?} has no {} stream (stdin not requested, or stderr of a terminal)",
                r.container_id,
                r.exec_id,
                kind.as_str_name()
            )));
        }
        Ok((p, kind))
    }
}

/// PORT_FORWARD: connects to localhost:port (IPv4, then IPv6) in this
/// network namespace, the pod's, so a server bound to the pod's loopback
/// is reachable; answers the hello, then copies both ways until either
/// side closes. Each direction is a fixed buffer, so the stream's
/// back-pressure reaches the host as the vsock stream's.
async fn port_forward(hello: &StreamHello, mut conn: BoxConn) {
    let port = match u16::try_from(hello.port) {
        Ok(p) if p != 0 => p,
        _ => {
            let msg = format!("port: {} is not a TCP port", hello.port);
            let _ = husk_proto::stream::write_msg(&mut conn, &StreamAccept { error: msg }).await;
            return;
        }
    };
    let connect = async {
        match tokio::net::TcpStream::connect((std::net::Ipv4Addr::LOCALHOST, port)).await {
            Ok(s) => Ok(s),
            Err(e4) => tokio::net::TcpStream::connect((std::net::Ipv6Addr::LOCALHOST, port))
                .await
                .map_err(|_| e4),
        }
    };
    let tcp = match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let error = format!("connecting to localhost:{port} in the pod: {e}");
            let _ = husk_proto::stream::write_msg(&mut conn, &StreamAccept { error }).await;
            return;
        }
        Err(_) => {
            let error = format!("connecting to localhost:{port} in the pod: timed out");
            let _ = husk_proto::stream::write_msg(&mut conn, &StreamAccept { error }).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    let ok = StreamAccept {
        error: String::new(),
    };
    if husk_proto::stream::write_msg(&mut conn, &ok).await.is_err() {
        return;
    }
    let mut tcp = tcp;
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut tcp).await;
}

async fn attach(slot: &Slot, conn: BoxConn) {
    slot.attach(conn).await;
}

#[async_trait::async_trait]
impl agent::Agent for AgentService {
    async fn health(&self, _req: HealthRequest) -> Result<HealthResponse, Status> {
        let kernel_release = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(HealthResponse {
            agent_version: husk_proto::AGENT_VERSION.to_owned(),
            kernel_release,
            uptime_ms: boottime_ms(),
        })
    }

    async fn create_sandbox(&self, req: CreateSandboxRequest) -> Result<Empty, Status> {
        self.create_sandbox_impl(req).await?;
        Ok(Empty {})
    }

    async fn destroy_sandbox(&self, req: DestroySandboxRequest) -> Result<Empty, Status> {
        self.destroy_sandbox_impl(req).await?;
        Ok(Empty {})
    }

    async fn create_container(&self, req: CreateContainerRequest) -> Result<Empty, Status> {
        self.require_sandbox().await?;
        self.containers
            .create(&req.container_id, &req.oci_spec_json, stdio_req(req.stdio))
            .await?;
        Ok(Empty {})
    }

    async fn start_container(&self, req: ContainerRef) -> Result<Empty, Status> {
        self.containers.start(&req.container_id).await?;
        Ok(Empty {})
    }

    async fn remove_container(&self, req: RemoveContainerRequest) -> Result<Empty, Status> {
        self.containers.remove(&req.container_id, req.force).await?;
        Ok(Empty {})
    }

    async fn update_container(&self, req: UpdateContainerRequest) -> Result<Empty, Status> {
        self.containers
            .update(&req.container_id, &req.resources_json)
            .await?;
        Ok(Empty {})
    }

    async fn container_stats(&self, req: ContainerRef) -> Result<ContainerStatsResponse, Status> {
        let s = self.containers.stats(&req.container_id).await?;
        Ok(ContainerStatsResponse {
            timestamp_unix_nanos: unix_nanos(SystemTime::now()),
            cpu_usage_ns: s.cpu_usage_ns,
            memory_usage_bytes: s.memory_usage_bytes,
            memory_working_set_bytes: s.memory_working_set_bytes,
            memory_rss_bytes: s.memory_rss_bytes,
            pids: s.pids,
        })
    }

    async fn exec_process(&self, req: ExecProcessRequest) -> Result<Empty, Status> {
        self.containers
            .exec(
                &req.container_id,
                &req.exec_id,
                &req.process_json,
                stdio_req(req.stdio),
            )
            .await?;
        Ok(Empty {})
    }

    async fn signal_process(&self, req: SignalProcessRequest) -> Result<Empty, Status> {
        let r = process_ref(req.process, "process")?;
        self.containers
            .signal(&r.container_id, &r.exec_id, req.signal)
            .await?;
        Ok(Empty {})
    }

    async fn wait_process(&self, req: ProcessRef) -> Result<WaitProcessResponse, Status> {
        let p = self.containers.process(&req.container_id, &req.exec_id)?;
        let e = p.wait().await?;
        Ok(WaitProcessResponse {
            exit_code: e.code,
            oom_killed: e.oom_killed,
            exited_at_unix_nanos: unix_nanos(e.at),
        })
    }

    async fn resize_terminal(&self, req: ResizeTerminalRequest) -> Result<Empty, Status> {
        let r = process_ref(req.process, "process")?;
        let rows = u16::try_from(req.rows)
            .map_err(|_| AgentError::InvalidArgument(format!("rows: {} > 65535", req.rows)))?;
        let cols = u16::try_from(req.cols)
            .map_err(|_| AgentError::InvalidArgument(format!("cols: {} > 65535", req.cols)))?;
        let p = self.containers.process(&r.container_id, &r.exec_id)?;
        let tty = p.stdio.tty.as_ref().ok_or_else(|| {
            AgentError::FailedPrecondition(format!(
                "process {:?}/{:?} has no terminal",
                r.container_id, r.exec_id
            ))
        })?;
        crate::stdio::resize(tty, rows, cols)
            .map_err(|e| AgentError::Internal(format!("TIOCSWINSZ: {e}")))?;
        Ok(Empty {})
    }
}
