//! Hypervisor backends: the part of a sandbox that runs the VM.
//!
//! A backend turns a [`VmConfig`] into a running VM and hands back a [`Vm`]
//! handle that owns every process the backend started for it. The sandbox
//! starts what is backend-independent itself (virtiofsd) and passes its
//! socket in the config; the backend serves the hybrid vsock socket however
//! it likes (QEMU: through the husk-vsock vhost-user backend it starts; the
//! builtin husk-vmm in-process, so no husk-vsock runs with it).

pub mod adopted;
pub mod builtin;
pub mod host;
pub mod probe;
pub mod qemu;
pub mod qmp;

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::str::FromStr;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::process::{ProcessIdentity, SpawnError, WaitSocketError};

pub use adopted::{AdoptedControl, AdoptedVm};
pub use builtin::{Builtin, BuiltinPaths};
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
    /// The pod network's virtio-net device; `None` boots with loopback only.
    pub net: Option<NetDeviceConfig>,
    pub vsock: HybridVsockConfig,
    /// Guest serial console output goes here (and the older half to `<console_log>.1`).
    pub console_log: PathBuf,
    /// The most console output kept on disk, across both files; the newest is kept.
    pub console_log_max_bytes: u64,
    /// Private directory for the backend's sockets and logs.
    pub sandbox_dir: PathBuf,
    /// What the host backend needs of the pod; VM backends ignore it.
    pub host: HostPodConfig,
}

/// The host namespaces a pod shares, and its hostname, for the host
/// backend (a VM has its own kernel and shares none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPodConfig {
    /// The host's network namespace (hostNetwork), and with it the host's
    /// UTS namespace, as kubelet expects.
    pub network: bool,
    /// The host's IPC namespace (hostIPC).
    pub ipc: bool,
    /// The pod's hostname in its own UTS namespace (not with `network`).
    pub hostname: String,
}

/// A vhost-user virtio-fs backend (virtiofsd) already listening.
#[derive(Debug, Clone)]
pub struct VirtioFsConfig {
    pub socket: PathBuf,
    pub tag: String,
}

/// A virtio-net device backed by a tap in the pod's network namespace.
///
/// The VMM process itself runs in that namespace (it opens the tap by
/// name there), as Kata's does: only the VMM's network view changes, its
/// unix sockets are paths and keep working across namespaces.
#[derive(Debug, Clone)]
pub struct NetDeviceConfig {
    /// The bind-mounted network namespace file.
    pub netns: PathBuf,
    /// The tap's name inside `netns`.
    pub tap: String,
    /// The guest interface's MAC, "aa:bb:cc:dd:ee:ff".
    pub mac: String,
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
        if let Some(net) = &self.net {
            if net.tap.is_empty()
                || net.tap.len() > 15
                || !net
                    .tap
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return bad(format!(
                    "tap name {:?} must be 1 to 15 letters, digits, '_' or '-'",
                    net.tap
                ));
            }
            if !valid_mac(&net.mac) {
                return bad(format!(
                    "MAC {:?} is not of the form aa:bb:cc:dd:ee:ff",
                    net.mac
                ));
            }
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

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Makes `cmd` join the network namespace at `netns` between fork and
/// exec, so the VMM opens its tap there.
pub(crate) fn exec_in_netns(cmd: &mut tokio::process::Command, netns: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(netns)?;
    // SAFETY: the closure runs in the forked child before exec and calls only
    // setns(2), which is async-signal-safe; `ns` is moved into the closure,
    // so its fd stays open until the command is dropped (after spawn).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// A VM backend (QEMU or the builtin husk-vmm).
#[async_trait::async_trait]
pub trait Hypervisor: Send + Sync + std::fmt::Debug {
    /// Short backend name: "qemu", "builtin".
    fn name(&self) -> &'static str;
    /// Why this backend and accelerator were chosen, for logs and Status.
    fn description(&self) -> &str;
    /// Starts the VM. On error nothing the backend started is left running.
    async fn launch(&self, config: &VmConfig) -> Result<Box<dyn Vm>, HypervisorError>;

    /// Whether it boots the guest kernel and initrd (the host backend
    /// runs none).
    fn boots_guest(&self) -> bool {
        true
    }
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
    /// Forgets the VMM and its helpers without stopping them: huskd exits
    /// and a later huskd adopts them ([`adopt`]).
    fn detach(self: Box<Self>);
    /// What a later huskd needs to adopt this VM, stored with the pod.
    fn record(&self) -> VmRecord;
}

/// What a running VM leaves in its pod's record so that a later huskd can
/// take it over: the backend that launched it, the identity of each of its
/// host processes, and the backend's own state (socket paths and the
/// like), which nothing but that backend reads. Kata runtime-rs keeps the
/// same split (`hypervisor_persist`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    /// [`Backend::name`] of the backend that launched the VM.
    pub backend: String,
    /// The VMM and the helpers the backend started, as launched.
    pub processes: Vec<ProcessIdentity>,
    /// Backend-private state.
    #[serde(default)]
    pub state: serde_json::Value,
}

impl VmRecord {
    /// The backend's state as its own type.
    pub fn state<T: serde::de::DeserializeOwned>(&self) -> Result<T, HypervisorError> {
        serde_json::from_value(self.state.clone())
            .map_err(|e| HypervisorError::InvalidConfig(format!("{} VM record: {e}", self.backend)))
    }
}

/// [`Backend::adopt`]: (record, sandbox id, timeout) to the adopted VM.
pub type AdoptFn = for<'a> fn(
    &'a VmRecord,
    &'a str,
    Duration,
) -> BoxFuture<'a, Result<Box<dyn Vm>, HypervisorError>>;

/// A backend's entry points that need no configured [`Hypervisor`]: after
/// a restart the backend that launched a VM may no longer be the one its
/// handler resolves to (the config or the host changed), and a directory
/// left by a crash has no record at all.
pub struct Backend {
    /// As [`Hypervisor::name`] and [`VmRecord::backend`].
    pub name: &'static str,
    /// Takes over a VM from its record: its processes must still be those
    /// recorded, and its control channel must answer within the timeout.
    pub adopt: AdoptFn,
    /// Stops, as gracefully as the backend can, what a previous huskd left
    /// running for a sandbox directory that has no live VM. What still
    /// names the directory afterwards is killed by the caller.
    pub reap_orphan: for<'a> fn(&'a Path, Duration) -> BoxFuture<'a, ()>,
}

/// Every backend. Adding one is its module plus one line here.
pub static BACKENDS: &[&Backend] = &[&qemu::BACKEND, &builtin::BACKEND, &host::BACKEND];

/// Adopts the VM of `record` through the backend that launched it.
pub async fn adopt(
    record: &VmRecord,
    sandbox_id: &str,
    timeout: Duration,
) -> Result<Box<dyn Vm>, HypervisorError> {
    let backend = BACKENDS
        .iter()
        .find(|b| b.name == record.backend)
        .ok_or_else(|| {
            HypervisorError::InvalidConfig(format!("unknown backend {:?}", record.backend))
        })?;
    (backend.adopt)(record, sandbox_id, timeout).await
}

/// Lets every backend stop what it may have left for `dir`.
pub async fn reap_orphan(dir: &Path, timeout: Duration) {
    for b in BACKENDS {
        (b.reap_orphan)(dir, timeout).await;
    }
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

/// Helper binaries configured by the operator (`None`: search the usual
/// places). The front-end passes these through without knowing which
/// backend uses which.
#[derive(Debug, Clone, Default)]
pub struct ConfiguredBinaries {
    pub qemu: Option<PathBuf>,
    pub husk_vsock: Option<PathBuf>,
}

/// [`select`] with the operator's configured binaries.
pub fn select_configured(
    choice: HypervisorChoice,
    binaries: &ConfiguredBinaries,
) -> Result<Box<dyn Hypervisor>, HypervisorError> {
    select(choice, || {
        QemuPaths::resolve(
            binaries.qemu.as_deref(),
            None,
            binaries.husk_vsock.as_deref(),
        )
    })
}

/// Picks and builds a backend for this host. `qemu_paths` resolves QEMU's
/// binaries (by [`QemuPaths::resolve`] or given explicitly); husk-vmm is
/// looked up with [`BuiltinPaths::resolve`] when the builtin backend is
/// considered. See [`select_with`] for the rules.
pub fn select(
    choice: HypervisorChoice,
    qemu_paths: impl FnOnce() -> Result<QemuPaths, crate::components::MissingComponent>,
) -> Result<Box<dyn Hypervisor>, HypervisorError> {
    let probe = probe_accel();
    let h = select_with(choice, &probe, qemu_paths, || BuiltinPaths::resolve(None))?;
    tracing::info!(hypervisor = h.description(), "hypervisor selected");
    Ok(h)
}

/// The selection rules, for a given probe:
/// - `Auto`: husk-vmm where /dev/kvm has hardware virtualization and the
///   husk-vmm binary exists, else QEMU (KVM or TCG). The description says
///   which and why.
/// - `Qemu`: QEMU (KVM where available, else TCG).
/// - `Builtin`: husk-vmm, which needs hardware virtualization. Without it
///   (PVM, or no /dev/kvm) this is an error naming the probe's reason: a
///   stock Linux guest only crawls through KVM's instruction emulator there
///   (its decompressor even stops on an unemulated SHLX), so every pod would
///   fail only after the ready timeout. Failing here puts the reason in
///   huskd's log and Status and fails RunPodSandbox at once.
///   [`Builtin::new`] still builds the backend on such hosts for tests.
pub fn select_with(
    choice: HypervisorChoice,
    probe: &AccelProbe,
    qemu_paths: impl FnOnce() -> Result<QemuPaths, crate::components::MissingComponent>,
    builtin_paths: impl FnOnce() -> Result<BuiltinPaths, crate::components::MissingComponent>,
) -> Result<Box<dyn Hypervisor>, HypervisorError> {
    let hardware = probe.accel == Accel::Kvm;
    match choice {
        HypervisorChoice::Builtin => {
            if !hardware {
                return Err(HypervisorError::BuiltinUnavailable(format!(
                    "husk-vmm needs hardware virtualization (VT-x/SVM) and {}; a stock Linux guest does not boot in reasonable time in KVM's instruction emulator; use hypervisor \"qemu\" or \"auto\"",
                    probe.why
                )));
            }
            Ok(Box::new(Builtin::new(builtin_paths()?, probe)))
        }
        HypervisorChoice::Auto if hardware => match builtin_paths() {
            Ok(paths) => Ok(Box::new(Builtin::new(paths, probe))),
            Err(missing) => {
                tracing::warn!(%missing, "hardware virtualization available but husk-vmm missing; using QEMU");
                let why = format!("hardware virtualization available, but {missing}");
                Ok(Box::new(Qemu::with_description(
                    qemu_paths()?,
                    probe.clone(),
                    format!("qemu (kvm): {why}"),
                )))
            }
        },
        HypervisorChoice::Auto | HypervisorChoice::Qemu => {
            Ok(Box::new(Qemu::new(qemu_paths()?, probe.clone())))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("builtin VMM unavailable: {0}")]
    BuiltinUnavailable(String),
    #[error(transparent)]
    Missing(#[from] crate::components::MissingComponent),
    #[error("invalid VM config: {0}")]
    InvalidConfig(String),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Socket(#[from] WaitSocketError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("husk-vmm failed to start ({status}); its log:\n{log}")]
    VmmExited { status: String, log: String },
    #[error("QMP: {0}")]
    Qmp(String),
    #[error("adopting the VM: {0}")]
    Adopt(String),
}

impl HypervisorError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::components::MissingComponent;

    fn probe(hardware: bool) -> AccelProbe {
        probe::decide(&probe::HostFacts {
            dev_kvm: true,
            hw_virt_flag: hardware,
            pvm: !hardware,
        })
    }

    fn qemu() -> Result<QemuPaths, MissingComponent> {
        Ok(QemuPaths {
            qemu: "/q/qemu".into(),
            bios: "/q/qboot.rom".into(),
            husk_vsock: "/q/husk-vsock".into(),
        })
    }

    fn vmm() -> Result<BuiltinPaths, MissingComponent> {
        Ok(BuiltinPaths {
            husk_vmm: "/b/husk-vmm".into(),
        })
    }

    fn no_vmm() -> Result<BuiltinPaths, MissingComponent> {
        Err(MissingComponent {
            component: "husk-vmm",
            looked: "/nowhere".into(),
            hint: "build it",
        })
    }

    #[test]
    fn auto_picks_builtin_with_hardware_virtualization() {
        let h = select_with(HypervisorChoice::Auto, &probe(true), qemu, vmm).unwrap();
        assert_eq!(h.name(), "builtin");
        assert_eq!(
            h.description(),
            "builtin (kvm): hardware virtualization available"
        );
        // ... unless husk-vmm is missing: QEMU on KVM, saying why.
        let h = select_with(HypervisorChoice::Auto, &probe(true), qemu, no_vmm).unwrap();
        assert_eq!(h.name(), "qemu");
        assert!(
            h.description().starts_with(
                "qemu (kvm): hardware virtualization available, but husk-vmm not found (looked at: /nowhere)"
            ),
            "{}",
            h.description()
        );
    }

    #[test]
    fn auto_picks_qemu_tcg_on_pvm() {
        let h = select_with(HypervisorChoice::Auto, &probe(false), qemu, || {
            panic!("husk-vmm is not looked up without hardware virtualization")
        })
        .unwrap();
        assert_eq!(h.name(), "qemu");
        assert_eq!(
            h.description(),
            "qemu (tcg): /dev/kvm has no hardware virtualization (PVM)"
        );
    }

    #[test]
    fn forced_backends() {
        let h = select_with(HypervisorChoice::Qemu, &probe(true), qemu, vmm).unwrap();
        assert_eq!(h.name(), "qemu");
        assert_eq!(
            h.description(),
            "qemu (kvm): /dev/kvm with hardware virtualization"
        );
        let h = select_with(HypervisorChoice::Builtin, &probe(true), qemu, vmm).unwrap();
        assert_eq!(h.name(), "builtin");
        let e = select_with(HypervisorChoice::Builtin, &probe(true), qemu, no_vmm).unwrap_err();
        assert!(matches!(e, HypervisorError::Missing(_)), "{e}");
        let e = select_with(HypervisorChoice::Builtin, &probe(false), qemu, vmm).unwrap_err();
        let s = e.to_string();
        assert!(matches!(e, HypervisorError::BuiltinUnavailable(_)), "{s}");
        assert!(
            s.contains("/dev/kvm has no hardware virtualization (PVM)")
                && s.contains("use hypervisor \"qemu\""),
            "{s}"
        );
        // Missing QEMU is an error when QEMU is what was chosen.
        let e = select_with(
            HypervisorChoice::Qemu,
            &probe(false),
            || Err(no_vmm().unwrap_err()),
            vmm,
        )
        .unwrap_err();
        assert!(matches!(e, HypervisorError::Missing(_)), "{e}");
    }

    #[test]
    fn choice_parsing() {
        assert_eq!(
            "auto".parse::<HypervisorChoice>().unwrap(),
            HypervisorChoice::Auto
        );
        assert_eq!(
            "builtin".parse::<HypervisorChoice>().unwrap(),
            HypervisorChoice::Builtin
        );
        assert!("xen".parse::<HypervisorChoice>().is_err());
    }
}
