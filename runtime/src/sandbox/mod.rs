//! A pod sandbox: one VM with the agent in it, its helpers, and its state
//! directory on the host.
//!
//! Layout of `<state_dir>/<id>/` (mode 0700):
//! - `share/`: the virtio-fs share, mounted in the guest at
//!   [`husk_proto::GUEST_SHARE_DIR`]; container root filesystems at
//!   `share/containers/<container id>/rootfs`. A read-only bind of
//!   `share-rw/`, where huskd creates what the share holds ([`share`]).
//! - `fs.sock` (virtiofsd), `vsock` (hybrid vsock) and `vsock_1023` (ready
//!   listener).
//! - `console.log` (guest serial), `virtiofsd.log`.
//! - The backend's own files: QEMU: `vhost-vsock.sock` (husk-vsock, which the
//!   QEMU backend starts), `qmp.sock`, `husk-vsock.log`, `qemu.log`; builtin:
//!   `vm.json`, `vmm.sock` (control), `vmm.pid`, `husk-vmm.log` (husk-vmm
//!   serves the hybrid vsock itself, so no husk-vsock runs).

// SandboxError is large (it carries the agent's ttrpc status and console
// text) but only on failure paths that are rare next to a VM boot; callers
// (the CRI layer) match on its fields, so they stay unboxed.
#![allow(clippy::result_large_err)]

mod adopt;
mod containers;
mod paths;
pub mod share;

pub use adopt::{reap_orphan_dir, AdoptConfig, SandboxRecord};
pub use paths::SandboxPaths;

/// The role of virtiofsd among a sandbox's processes.
const ROLE_VIRTIOFSD: &str = "virtiofsd";

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use husk_proto::agent::{
    CreateSandboxRequest, DestroySandboxRequest, NetworkConfig, ReadyNotice, WaitProcessResponse,
};
use husk_proto::GUEST_SHARE_DIR;
use tokio::net::UnixStream;
use tracing::Instrument;

use crate::agent::{AgentConn, AgentError, ReadyListener};
use crate::components::{
    require_file, GuestImage, MissingComponent, HINT_GUEST_IMAGE, HINT_INSTALL_DEPS,
};
use crate::hypervisor::{
    HostPodConfig, HybridVsockConfig, Hypervisor, HypervisorError, NetDeviceConfig, VirtioFsConfig,
    Vm, VmConfig,
};
use crate::mounts;
use crate::process::{Helper, ManagedChild};
use crate::virtiofsd::{spawn_virtiofsd, VirtiofsdError};

/// Default parent of sandbox directories.
pub const DEFAULT_STATE_DIR: &str = "/run/husk/sandboxes";
/// virtio-fs tag of the share.
pub const SHARE_TAG: &str = "husk-share";
/// Console lines quoted in boot failures.
const CONSOLE_TAIL_LINES: usize = 20;
/// The guest console log's cap when the configuration gives none: 1 MiB.
pub const DEFAULT_CONSOLE_LOG_MAX_BYTES: u64 = 1 << 20;

/// How to start a sandbox. Build with [`SandboxConfig::new`], then adjust
/// fields.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Letters, digits, `-`, `_`, `.`; at most 64 characters.
    pub id: String,
    pub hostname: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub guest: GuestImage,
    /// Extra guest kernel parameters.
    pub kernel_params: Vec<String>,
    pub virtiofsd: PathBuf,
    pub hypervisor: Arc<dyn Hypervisor>,
    /// Parent of the sandbox directory.
    pub state_dir: PathBuf,
    /// Launch to agent ready notice.
    pub ready_timeout: Duration,
    /// Each agent rpc except WaitProcess (which blocks until the process exits).
    pub rpc_timeout: Duration,
    /// Connecting to the agent (hybrid handshake, stream handshake).
    pub connect_timeout: Duration,
    /// VMM quit (QMP quit or husk-vmm's control socket, then SIGKILL)
    /// during stop.
    pub stop_timeout: Duration,
    pub guest_cid: u32,
    /// The most guest console output kept on disk (the newest is kept).
    pub console_log_max_bytes: u64,
    /// The pod network, already set up on the host; `None` gives the guest
    /// loopback only (or, for a host pod, the host's network).
    pub network: Option<SandboxNetwork>,
    /// The host namespaces the pod shares (host backend only).
    pub host_namespaces: HostPodConfig,
}

/// A pod network as the sandbox needs it: the VM's virtio-net device and
/// what the agent configures on the guest interface.
#[derive(Debug, Clone)]
pub struct SandboxNetwork {
    pub device: NetDeviceConfig,
    pub guest: NetworkConfig,
    /// How long the host took to set the network up, for the timings.
    pub setup_time: Duration,
}

impl SandboxConfig {
    pub fn new(
        id: impl Into<String>,
        hypervisor: Arc<dyn Hypervisor>,
        guest: GuestImage,
        virtiofsd: PathBuf,
    ) -> Self {
        let id = id.into();
        Self {
            hostname: id.chars().take(63).collect(),
            id,
            vcpus: 1,
            memory_mib: 256,
            guest,
            kernel_params: Vec::new(),
            virtiofsd,
            hypervisor,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            // TCG boots take 3-6 s here; leave room for a loaded host.
            ready_timeout: Duration::from_secs(60),
            rpc_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            stop_timeout: Duration::from_secs(5),
            guest_cid: 3,
            console_log_max_bytes: DEFAULT_CONSOLE_LOG_MAX_BYTES,
            network: None,
            host_namespaces: HostPodConfig::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid {what} {value:?}: {why}")]
    InvalidId {
        what: &'static str,
        value: String,
        why: husk_proto::ids::IdError,
    },
    #[error("sandbox directory {0} already exists (stale sandbox?)")]
    Exists(PathBuf),
    #[error(transparent)]
    Missing(#[from] MissingComponent),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("sandbox {id}: {source}")]
    Hypervisor { id: String, source: HypervisorError },
    #[error("sandbox {id}: {source}")]
    Virtiofsd { id: String, source: VirtiofsdError },
    #[error("sandbox {id}: {source}")]
    Agent { id: String, source: AgentError },
    #[error("sandbox {id}: the VM exited during boot ({status}); VMM log:\n{vmm_log}\nconsole tail:\n{console}")]
    BootExited {
        id: String,
        status: String,
        vmm_log: String,
        console: String,
    },
    #[error("sandbox {id}: agent not ready within {timeout:?}; console tail:\n{console}")]
    BootTimeout {
        id: String,
        timeout: Duration,
        console: String,
    },
    #[error(
        "sandbox {id}: agent connection failed after boot: {source}; console tail:\n{console}"
    )]
    BootAgent {
        id: String,
        source: AgentError,
        console: String,
    },
    #[error("sandbox {id}: container {container_id}: {what}")]
    Container {
        id: String,
        container_id: String,
        what: String,
    },
    #[error("sandbox {id} is stopped")]
    Stopped { id: String },
    #[error("sandbox {id}: cannot adopt: {why}")]
    Adopt { id: String, why: String },
    #[error("sandbox {id}: mounts left under {dir}: {mounts:?}; not removing the directory")]
    MountsLeft {
        id: String,
        dir: PathBuf,
        mounts: Vec<PathBuf>,
    },
}

impl SandboxError {
    fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

/// Ids end up in paths and the guest's view: keep them boring.
pub fn validate_id(what: &'static str, value: &str) -> Result<(), SandboxError> {
    husk_proto::ids::validate(value).map_err(|why| SandboxError::InvalidId {
        what,
        value: value.into(),
        why,
    })
}

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone)]
pub enum Rootfs {
    /// The caller already filled [`Sandbox::container_rootfs`].
    InShare,
    /// Bind-mount this host directory there (unmounted on removal/stop).
    Bind(PathBuf),
}

/// How long each phase of [`Sandbox::start`] took.
#[derive(Debug, Clone, Copy, Default)]
pub struct SandboxTimings {
    /// Start until the VMM was exec'd with its helper sockets ready.
    pub host_setup: Duration,
    /// VMM exec until the agent's ready notice.
    pub guest_boot: Duration,
    /// The guest's own CLOCK_BOOTTIME at ready, from the notice.
    pub guest_boot_to_ready: Duration,
    /// Ready notice until CreateSandbox answered (ttrpc connect included).
    pub agent_setup: Duration,
    /// The host's pod network set-up before the sandbox started (CNI ADD,
    /// tap, redirect), as [`SandboxNetwork::setup_time`] reported it; not
    /// part of `total`.
    pub network_setup: Duration,
    pub total: Duration,
}

/// A process's stdio streams, as requested in its [`husk_proto::agent::StdioConfig`].
#[derive(Debug)]
pub struct ProcessStdio {
    pub stdin: Option<UnixStream>,
    pub stdout: UnixStream,
    /// `None` with a terminal (output is on stdout only).
    pub stderr: Option<UnixStream>,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// 128 + signal when killed by a signal.
    pub exit_code: i32,
    pub oom_killed: bool,
    pub exited_at_unix_nanos: u64,
}

impl From<WaitProcessResponse> for ExitInfo {
    fn from(r: WaitProcessResponse) -> Self {
        Self {
            exit_code: r.exit_code,
            oom_killed: r.oom_killed,
            exited_at_unix_nanos: r.exited_at_unix_nanos,
        }
    }
}

/// Processes of a running sandbox.
#[derive(Debug)]
struct Running {
    vm: Box<dyn Vm>,
    virtiofsd: Helper,
}

/// A running pod sandbox. Methods take `&self`; share it with `Arc`.
/// [`stop`](Self::stop) tears everything down; dropping a sandbox that was
/// not stopped kills its processes and removes its directory as a last
/// resort.
#[derive(Debug)]
pub struct Sandbox {
    id: String,
    dir: PathBuf,
    share_dir: PathBuf,
    agent: AgentConn,
    rpc_timeout: Duration,
    stop_timeout: Duration,
    hypervisor: String,
    ready: ReadyNotice,
    timings: SandboxTimings,
    pids: Vec<(&'static str, u32)>,
    /// What a later huskd needs to adopt this sandbox.
    record: SandboxRecord,
    running: tokio::sync::Mutex<Option<Running>>,
    /// Containers whose rootfs this sandbox bind-mounted.
    bound: StdMutex<HashSet<String>>,
    /// Handed over to a later huskd: `Drop` leaves the directory.
    detached: AtomicBool,
}

/// Cleans up a half-started sandbox on every early return of `start`.
struct StartGuard {
    dir: PathBuf,
    vm: Option<Box<dyn Vm>>,
    virtiofsd: Option<ManagedChild>,
    armed: bool,
}

impl StartGuard {
    async fn fail(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            let _ = vm.kill().await;
        }
        if let Some(mut v) = self.virtiofsd.take() {
            let _ = v.kill().await;
        }
        if let Err(e) = remove_sandbox_dir(&self.dir) {
            tracing::error!(%e, "cleaning up a failed sandbox start");
        }
        self.armed = false;
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if self.armed {
            // Dropped mid-start (cancelled future): children die with their
            // handles; the directory goes now.
            self.vm.take();
            self.virtiofsd.take();
            let _ = remove_sandbox_dir(&self.dir);
        }
    }
}

impl Sandbox {
    /// Boots the sandbox VM and prepares the agent (CreateSandbox). On any
    /// failure everything started is killed and the directory removed.
    pub async fn start(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        validate_id("sandbox id", &config.id)?;
        let span = tracing::info_span!("sandbox_start", sandbox = %config.id);
        Self::start_inner(config).instrument(span).await
    }

    async fn start_inner(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        let t0 = Instant::now();
        // Name a missing part before anything is created.
        if config.hypervisor.boots_guest() {
            require_file("guest kernel", &config.guest.kernel, HINT_GUEST_IMAGE)?;
            require_file("guest initrd", &config.guest.initrd, HINT_GUEST_IMAGE)?;
        }
        require_file("virtiofsd", &config.virtiofsd, HINT_INSTALL_DEPS)?;
        let id = config.id.clone();
        let dir = config.state_dir.join(&id);
        let share_dir = SandboxPaths::new(&dir).share;
        std::fs::create_dir_all(&config.state_dir)
            .map_err(|e| SandboxError::io(format!("create {}", config.state_dir.display()), e))?;
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SandboxError::Exists(dir))
            }
            Err(e) => return Err(SandboxError::io(format!("create {}", dir.display()), e)),
        }
        let mut guard = StartGuard {
            dir: dir.clone(),
            vm: None,
            virtiofsd: None,
            armed: true,
        };
        let r = Self::boot(&config, &dir, &share_dir, &mut guard, t0).await;
        match r {
            Ok(sb) => {
                guard.armed = false;
                Ok(sb)
            }
            Err(e) => {
                tracing::warn!(error = %e, "sandbox start failed, cleaning up");
                guard.fail().await;
                Err(e)
            }
        }
    }

    async fn boot(
        config: &SandboxConfig,
        dir: &Path,
        share_dir: &Path,
        guard: &mut StartGuard,
        t0: Instant,
    ) -> Result<Sandbox, SandboxError> {
        let id = config.id.clone();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| SandboxError::io(format!("chmod {}", dir.display()), e))?;
        }
        let paths = SandboxPaths::new(dir);
        share::create(&paths)
            .map_err(|e| SandboxError::io(format!("create {}", share_dir.display()), e))?;
        let uds = paths.vsock.clone();
        let console = paths.console_log.clone();
        let fs_sock = paths.virtiofsd_socket.clone();
        let vm_config = VmConfig {
            id: id.clone(),
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
            kernel: config.guest.kernel.clone(),
            initrd: config.guest.initrd.clone(),
            kernel_params: config.kernel_params.clone(),
            virtio_fs: Some(VirtioFsConfig {
                socket: fs_sock.clone(),
                tag: SHARE_TAG.into(),
            }),
            net: config.network.as_ref().map(|n| n.device.clone()),
            vsock: HybridVsockConfig {
                uds: uds.clone(),
                guest_cid: config.guest_cid,
            },
            console_log: console.clone(),
            console_log_max_bytes: config.console_log_max_bytes,
            sandbox_dir: dir.to_path_buf(),
            host: HostPodConfig {
                hostname: config.hostname.clone(),
                ..config.host_namespaces.clone()
            },
        };
        vm_config
            .validate()
            .map_err(|source| SandboxError::Hypervisor {
                id: id.clone(),
                source,
            })?;

        let ready = ReadyListener::bind(&uds).map_err(|source| SandboxError::Agent {
            id: id.clone(),
            source,
        })?;
        guard.virtiofsd = Some(
            spawn_virtiofsd(&config.virtiofsd, share_dir, &fs_sock, &paths.virtiofsd_log).map_err(
                |source| SandboxError::Virtiofsd {
                    id: id.clone(),
                    source,
                },
            )?,
        );
        let vm = config
            .hypervisor
            .launch(&vm_config)
            .await
            .map_err(|source| SandboxError::Hypervisor {
                id: id.clone(),
                source,
            })?;
        let launched_at = vm.launched_at();
        let vm = guard.vm.insert(vm);

        // Ready notice, unless the VM dies first.
        let notice = tokio::select! {
            r = ready.accept_ready(config.ready_timeout) => match r {
                Ok(n) => n,
                Err(AgentError::Timeout { .. }) => {
                    return Err(SandboxError::BootTimeout {
                        id, timeout: config.ready_timeout, console: console_tail(&console, CONSOLE_TAIL_LINES),
                    })
                }
                Err(source) => return Err(SandboxError::Agent { id, source }),
            },
            st = vm.wait() => {
                let status = match st { Ok(s) => s.to_string(), Err(e) => e.to_string() };
                let vmm_log = vm.log_file().map(|p| console_tail(&p, 10)).unwrap_or_default();
                return Err(SandboxError::BootExited { id, status, vmm_log, console: console_tail(&console, CONSOLE_TAIL_LINES) });
            }
        };
        drop(ready);
        let ready_at = Instant::now();
        tracing::info!(
            agent_version = %notice.agent_version,
            guest_boot_to_ready_ms = notice.boot_to_ready_ms,
            elapsed_ms = ready_at.duration_since(t0).as_millis() as u64,
            "agent ready"
        );

        let boot_err = |source| SandboxError::BootAgent {
            id: id.clone(),
            source,
            console: console_tail(&console, CONSOLE_TAIL_LINES),
        };
        let agent = AgentConn::connect(&uds, config.connect_timeout)
            .await
            .map_err(boot_err)?;
        agent
            .client()
            .create_sandbox(
                CreateSandboxRequest {
                    sandbox_id: id.clone(),
                    hostname: config.hostname.clone(),
                    share_tag: SHARE_TAG.into(),
                    network: config.network.as_ref().map(|n| n.guest.clone()),
                },
                Some(config.rpc_timeout),
            )
            .await
            .map_err(|source| {
                boot_err(AgentError::Rpc {
                    method: "CreateSandbox",
                    source,
                })
            })?;
        let done = Instant::now();

        let mut pids = vm.pids();
        let virtiofsd = guard.virtiofsd.take().expect("virtiofsd started above");
        pids.push((ROLE_VIRTIOFSD, virtiofsd.pid()));
        // Not reaped before this, so the pid is still the process launched.
        let record = SandboxRecord {
            vm: vm.record(),
            virtiofsd: virtiofsd.identity(ROLE_VIRTIOFSD).ok_or_else(|| {
                SandboxError::io(
                    "recording virtiofsd",
                    std::io::Error::other("virtiofsd exited during the sandbox start"),
                )
            })?,
        };
        let vm = guard.vm.take().expect("vm launched above");
        let timings = SandboxTimings {
            host_setup: launched_at.duration_since(t0),
            guest_boot: ready_at.duration_since(launched_at),
            guest_boot_to_ready: Duration::from_millis(notice.boot_to_ready_ms),
            agent_setup: done.duration_since(ready_at),
            network_setup: config
                .network
                .as_ref()
                .map_or(Duration::ZERO, |n| n.setup_time),
            total: done.duration_since(t0),
        };
        tracing::info!(?timings, "sandbox started");
        Ok(Sandbox {
            id,
            dir: dir.to_path_buf(),
            share_dir: share_dir.to_path_buf(),
            agent,
            rpc_timeout: config.rpc_timeout,
            stop_timeout: config.stop_timeout,
            hypervisor: config.hypervisor.description().to_string(),
            ready: notice,
            timings,
            pids,
            record,
            running: tokio::sync::Mutex::new(Some(Running {
                vm,
                virtiofsd: Helper::Child(virtiofsd),
            })),
            bound: StdMutex::new(HashSet::new()),
            detached: AtomicBool::new(false),
        })
    }

    /// Leaves the VM and its helpers running and the directory in place,
    /// and forgets them: huskd is exiting and a later one adopts the
    /// sandbox ([`adopt`](Self::adopt)). The agent connection closes when
    /// the sandbox is dropped.
    pub async fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
        if let Some(r) = self.running.lock().await.take() {
            r.vm.detach();
            r.virtiofsd.detach();
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The sandbox's state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The host side of the virtio-fs share (read-only: mount here, create
    /// through [`Self::share_rw_dir`]).
    pub fn share_dir(&self) -> &Path {
        &self.share_dir
    }

    /// The writable side of the share, never shared with the guest.
    pub fn share_rw_dir(&self) -> PathBuf {
        self.paths().share_rw
    }

    pub fn console_log(&self) -> PathBuf {
        SandboxPaths::new(&self.dir).console_log
    }

    /// The files of this sandbox's directory.
    pub fn paths(&self) -> SandboxPaths {
        SandboxPaths::new(&self.dir)
    }

    /// The hypervisor's description ("qemu (tcg): ...").
    pub fn hypervisor(&self) -> &str {
        &self.hypervisor
    }

    pub fn ready_notice(&self) -> &ReadyNotice {
        &self.ready
    }

    pub fn timings(&self) -> SandboxTimings {
        self.timings
    }

    /// (role, pid) of every host process of this sandbox, as started.
    pub fn pids(&self) -> &[(&'static str, u32)] {
        &self.pids
    }

    /// Host path of a container's root filesystem inside the share.
    pub fn container_rootfs(&self, container_id: &str) -> Result<PathBuf, SandboxError> {
        validate_id("container id", container_id)?;
        Ok(self
            .share_dir
            .join("containers")
            .join(container_id)
            .join("rootfs"))
    }

    /// Guest path of a container's root filesystem.
    pub fn guest_rootfs(container_id: &str) -> String {
        format!("{GUEST_SHARE_DIR}/containers/{container_id}/rootfs")
    }

    /// Stops the sandbox: DestroySandbox, QEMU quit (then SIGKILL), helpers
    /// stopped, mounts and the directory removed. Idempotent.
    pub async fn stop(&self) -> Result<(), SandboxError> {
        let span = tracing::info_span!("sandbox_stop", sandbox = %self.id);
        async {
            let running = self.running.lock().await.take();
            if let Some(mut r) = running {
                // Short: the guest is about to be killed anyway; this only
                // lets it stop containers and sync the share first.
                let t = self.rpc_timeout.min(Duration::from_secs(3));
                if let Err(e) = self
                    .agent
                    .client()
                    .destroy_sandbox(DestroySandboxRequest { poweroff: false }, Some(t))
                    .await
                {
                    tracing::warn!(%e, "DestroySandbox failed; stopping the VM anyway");
                }
                let vm_result = r.vm.shutdown(self.stop_timeout).await;
                // virtiofsd exits when the VMM disconnects.
                let _ = r.virtiofsd.terminate(Duration::from_secs(1)).await;
                match vm_result {
                    Ok(status) => tracing::info!(%status, "VM stopped"),
                    Err(e) => {
                        tracing::warn!(%e, "VM shutdown failed, killing");
                        let _ = r.vm.kill().await;
                    }
                }
                self.agent.client().inner().close();
            }
            self.bound.lock().unwrap_or_else(|e| e.into_inner()).clear();
            remove_sandbox_dir(&self.dir).map_err(|e| match e {
                RemoveError::MountsLeft(mounts) => SandboxError::MountsLeft {
                    id: self.id.clone(),
                    dir: self.dir.clone(),
                    mounts,
                },
                RemoveError::Io(what, e) => SandboxError::io(what, e),
            })
        }
        .instrument(span)
        .await
    }

    /// Whether the VM has been stopped (or exited on its own).
    pub async fn is_stopped(&self) -> bool {
        let mut g = self.running.lock().await;
        match g.as_mut() {
            None => true,
            Some(r) => matches!(r.vm.try_exit(), Ok(Some(_))),
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.detached.load(Ordering::SeqCst) {
            return;
        }
        if let Some(r) = self.running.get_mut().take() {
            tracing::warn!(sandbox = %self.id, "sandbox dropped without stop(); killing it");
            // ManagedChild's Drop SIGKILLs each process group.
            drop(r);
        }
        if self.dir.exists() {
            if let Err(e) = remove_sandbox_dir(&self.dir) {
                tracing::error!(sandbox = %self.id, ?e, "removing the sandbox directory");
            }
        }
    }
}

#[derive(Debug)]
enum RemoveError {
    MountsLeft(Vec<PathBuf>),
    Io(String, std::io::Error),
}

impl std::fmt::Display for RemoveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RemoveError::MountsLeft(m) => write!(f, "mounts left: {m:?}"),
            RemoveError::Io(w, e) => write!(f, "{w}: {e}"),
        }
    }
}

/// Unmounts everything below `dir`, then removes it, but only when no mount
/// is left: removing a directory tree through a bind mount would delete the
/// host files behind it.
fn remove_sandbox_dir(dir: &Path) -> Result<(), RemoveError> {
    if !dir.exists() {
        return Ok(());
    }
    let left = mounts::unmount_all_under(dir)
        .map_err(|e| RemoveError::Io("reading mountinfo".into(), e))?;
    if !left.is_empty() {
        return Err(RemoveError::MountsLeft(left));
    }
    std::fs::remove_dir_all(dir)
        .map_err(|e| RemoveError::Io(format!("remove {}", dir.display()), e))
}

/// The last `n` lines of a console log, sanitized (the guest wrote them).
pub fn console_tail(path: &Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    const MAX_READ: u64 = 16 * 1024;
    let Ok(mut f) = std::fs::File::open(path) else {
        return format!("(no file at {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX_READ)));
    let mut buf = Vec::new();
    let _ = f.take(MAX_READ).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            l.chars()
                .filter(|c| !c.is_control() || *c == '\t')
                .take(240)
                .collect::<String>()
        })
        .filter(|l| !l.trim().is_empty())
        .collect();
    if lines.is_empty() {
        return "(empty)".into();
    }
    let start = lines.len().saturating_sub(n);
    let mut out = Vec::new();
    // A panic's backtrace pushes its reason out of the tail; keep the reason.
    if let Some(p) = lines[..start]
        .iter()
        .rev()
        .find(|l| l.contains("Kernel panic"))
    {
        out.push(p.clone());
        out.push("...".to_string());
    }
    out.extend_from_slice(&lines[start..]);
    out.join("\n")
}

#[cfg(test)]
mod tests;
