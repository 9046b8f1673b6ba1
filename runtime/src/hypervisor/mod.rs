//! Hypervisor backends: the part of a sandbox that runs the VM.
//!
//! A backend turns a [`VmConfig`] into a running VM and hands back a [`Vm`]
//! handle that owns every process the backend started for it. The sandbox
//! starts what is backend-independent itself (virtiofsd) and passes its
//! socket in the config; the backend serves the hybrid vsock socket however
//! it likes (QEMU: through the husk-vsock vhost-user backend; the builtin
//! VMM will serve it in-process).

pub mod probe;
pub mod qemu;
pub mod qmp;

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::process::{SpawnError, WaitSocketError};

pub use probe::{probe_accel, Accel, AccelProbe};
pub use qemu::{Qemu, QemuPaths};

/// Longest path a unix socket address can carry (sun_path minus the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Everything a backend needs to boot one pod VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Sandbox id, for logs and the VMM's process name.
    pub id: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Appended to the backend's own kernel command line.
    pub kernel_params: Vec<String>,
    /// The virtio-fs device; `None` boots without a share.
    pub virtio_fs: Option<VirtioFsConfig>,
    pub vsock: HybridVsockConfig,
    /// Guest serial console output goes here.
    pub console_log: PathBuf,
    /// Private directory for the backend's sockets and logs.
    pub sandbox_dir: PathBuf,
}

/// A vhost-user virtio-fs backend (virtiofsd) already listening.
#[derive(Debug, Clone)]
pub struct VirtioFsConfig {
    pub socket: PathBuf,
    pub tag: String,
}

/// The Firecracker-style hybrid vsock the backend must serve.
#[derive(Debug, Clone)]
pub struct HybridVsockConfig {
    /// Host-to-guest: `CONNECT <port>\n` on this socket. Guest-to-host: the
    /// backend connects to `<uds>_<port>`.
    pub uds: PathBuf,
    pub guest_cid: u32,
}

impl VmConfig {
    /// Checks what would otherwise fail obscurely inside the VMM.
    pub fn validate(&self) -> Result<(), HypervisorError> {
        let bad = |m: String| Err(HypervisorError::InvalidConfig(m));
        if self.vcpus == 0 {
            return bad("vcpus must be at least 1".into());
        }
        if self.memory_mib < 64 {
            return bad(format!("memory_mib {} is below 64", self.memory_mib));
        }
        if self.vsock.guest_cid < 3 {
            return bad(format!(
                "guest cid {} is reserved (must be >= 3)",
                self.vsock.guest_cid
            ));
        }
        // The longest derived socket is the ready listener `<uds>_1023`.
        let uds_len = self.vsock.uds.as_os_str().len() + "_65535".len();
        if uds_len > MAX_SOCKET_PATH {
            return bad(format!(
                "hybrid vsock path {} is too long for a unix socket ({uds_len} > {MAX_SOCKET_PATH}); use a shorter state dir",
                self.vsock.uds.display()
            ));
        }
        for p in self.kernel_params.iter() {
            if p.is_empty() || p.contains(char::is_whitespace) {
                return bad(format!(
                    "kernel parameter {p:?} is empty or contains whitespace"
                ));
            }
        }
        Ok(())
    }
}

/// A VM backend (QEMU, later the builtin husk-vmm).
#[async_trait::async_trait]
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// Short backend name: "qemu", "builtin".
    fn name(&self) -> &'static str;
    /// Why this backend and accelerator were chosen, for logs and Status.
    fn description(&self) -> &str;
    /// Starts the VM. On error nothing the backend started is left running.
    async fn launch(&self, config: &VmConfig) -> Result<Box<dyn Vm>, HypervisorError>;
}

/// A running VM and the processes that serve it.
#[async_trait::async_trait]
pub trait Vm: Send + std::fmt::Debug {
    /// (role, pid) of every process the backend started for this VM.
    fn pids(&self) -> Vec<(&'static str, u32)>;
    /// When the VMM process was exec'd (after its helpers were ready).
    fn launched_at(&self) -> Instant;
    /// The VMM's own log (its stderr), quoted when the VM fails.
    fn log_file(&self) -> Option<PathBuf>;
    /// Reaps the VMM if it has exited; `None` while it runs.
    fn try_exit(&mut self) -> Result<Option<ExitStatus>, HypervisorError>;
    /// Waits until the VMM exits (the guest powered off or crashed).
    async fn wait(&mut self) -> Result<ExitStatus, HypervisorError>;
    /// Asks the VMM to quit, kills it after `timeout`, then stops its helpers.
    /// Safe to call again; returns the VMM's exit status.
    async fn shutdown(&mut self, timeout: Duration) -> Result<ExitStatus, HypervisorError>;
    /// Kills the VMM and its helpers at once.
    async fn kill(&mut self) -> Result<ExitStatus, HypervisorError>;
}

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HypervisorChoice {
    /// The builtin VMM where hardware virtualization and the VMM exist,
    /// otherwise QEMU.
    #[default]
    Auto,
    Qemu,
    Builtin,
}

impl FromStr for HypervisorChoice {
    type Err = HypervisorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "qemu" => Ok(Self::Qemu),
            "builtin" | "husk-vmm" => Ok(Self::Builtin),
            _ => Err(HypervisorError::InvalidConfig(format!(
                "unknown hypervisor {s:?} (auto, qemu, builtin)"
            ))),
        }
    }
}

/// Picks and builds a backend. `paths` are QEMU's binaries (resolved by
/// [`QemuPaths::resolve`] or given explicitly).
pub fn select(
    choice: HypervisorChoice,
    qemu_paths: impl FnOnce() -> Result<QemuPaths, crate::config::MissingComponent>,
) -> Result<Box<dyn Hypervisor>, HypervisorError> {
    let probe = probe_accel();
    match choice {
        HypervisorChoice::Builtin => Err(HypervisorError::BuiltinUnavailable(format!(
            "husk-vmm does not implement the Hypervisor trait yet; use qemu ({})",
            probe.reason
        ))),
        HypervisorChoice::Auto | HypervisorChoice::Qemu => {
            let paths = qemu_paths()?;
            let h = Qemu::new(paths, probe);
            tracing::info!(hypervisor = h.description(), "hypervisor selected");
            Ok(Box::new(h))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("builtin VMM unavailable: {0}")]
    BuiltinUnavailable(String),
    #[error(transparent)]
    Missing(#[from] crate::config::MissingComponent),
    #[error("invalid VM config: {0}")]
    InvalidConfig(String),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Socket(#[from] WaitSocketError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("QMP: {0}")]
    Qmp(String),
}

impl HypervisorError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
