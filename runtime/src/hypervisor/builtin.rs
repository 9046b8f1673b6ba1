//! The builtin backend: one `husk-vmm` process per sandbox (crate `vmm/`).
//!
//! husk-vmm serves everything the sandbox needs in-process: the serial
//! console (to the sandbox's console log), virtio-rng, the Firecracker-style
//! hybrid vsock on the sandbox's vsock socket (so the ready listener and
//! `CONNECT` work exactly as with QEMU + husk-vsock, and no husk-vsock is
//! started), and virtio-fs as a vhost-user frontend of the sandbox's
//! virtiofsd. Its configuration is a JSON file in the sandbox directory.
//!
//! husk-vmm leaves huskd's session at start (setsid) and has no parent-death
//! signal, so it survives huskd crashing or restarting; its pid file and
//! control socket in the sandbox directory are how it is found again. Only an
//! explicit [`Vm::shutdown`]/[`Vm::kill`], or dropping the handle (the
//! sandbox library's last-resort clean-up, same as for QEMU), ends it.
//!
//! husk-vmm has no ACPI: the guest resets through the i8042 (`reboot=k`),
//! which husk-vmm treats as "the VM is done". `husk.vmm=builtin` on the
//! kernel command line tells the agent to end the VM with a reboot instead
//! of a power-off (which without ACPI would only halt the CPUs).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt as _, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tracing::Instrument;

use super::adopted::{AdoptedControl, AdoptedVm};
use super::probe::{host_tsc_rate, Accel, AccelProbe};
use super::{Backend, Hypervisor, HypervisorError, Vm, VmConfig, VmRecord, MAX_SOCKET_PATH};
use crate::components::{self, MissingComponent};
use crate::process::SpawnError;

use husk_vmm_api::{Devices, FsConfig, NetConfig, VsockConfig};
/// The control socket's protocol, for callers of [`control_request`].
pub use husk_vmm_api::{Reply, Request, Status, VmState};

/// Kernel parameter that tells the agent it runs under husk-vmm.
pub const BUILTIN_KERNEL_PARAM: &str = "husk.vmm=builtin";

/// How long husk-vmm may take from exec to its control socket (it builds the
/// VM first: memory, kernel load, vhost-user handshake with virtiofsd).
const CONTROL_SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// CPU features PVM's instruction emulator cannot execute, hidden from the
/// guest when there is no hardware virtualization (same list as husk-vmm's
/// Linux boot test).
const PVM_CLEARCPUID: &str =
    "clearcpuid=cx16,bmi1,bmi2,avx,avx2,xsave,aes,pclmulqdq,rdrand,rdseed,adx,sha_ni";

/// The husk-vmm binary.
#[derive(Debug, Clone)]
pub struct BuiltinPaths {
    pub husk_vmm: PathBuf,
}

impl BuiltinPaths {
    /// `explicit` if given, else `husk-vmm` on PATH, next to this executable
    /// or in the install prefixes.
    pub fn resolve(explicit: Option<&Path>) -> Result<Self, MissingComponent> {
        Ok(Self {
            husk_vmm: components::find_binary(
                "husk-vmm",
                "husk-vmm",
                explicit,
                &components::husk_binary_dirs(),
                components::HINT_MAKE_BUILD,
            )?,
        })
    }
}

/// Files husk-vmm uses in the sandbox directory.
#[derive(Debug, Clone)]
pub struct BuiltinFiles {
    /// The VM configuration (JSON, [`husk_vmm_api::VmConfig`]).
    pub config: PathBuf,
    /// Control socket: newline-delimited JSON, ops status/shutdown/pause/resume.
    pub control: PathBuf,
    /// husk-vmm's pid, written once the VM runs.
    pub pid: PathBuf,
    /// husk-vmm's stderr.
    pub log: PathBuf,
}

impl BuiltinFiles {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            config: dir.join("vm.json"),
            control: dir.join("vmm.sock"),
            pid: dir.join("vmm.pid"),
            log: dir.join("husk-vmm.log"),
        }
    }
}

/// The guest kernel command line under husk-vmm.
///
/// `hardware` is false only when the backend was built explicitly on a host
/// without VT-x/SVM (PVM); the extra parameters then keep the guest off
/// instructions KVM's emulator lacks and give it the TSC rate (as for TCG).
pub fn kernel_cmdline(hardware: bool, tsc_khz: Option<u64>, extra: &[String]) -> String {
    let mut p: Vec<String> = vec![
        "console=ttyS0".into(),
        // No ACPI: reboot through the keyboard controller, the one reset
        // path husk-vmm emulates; panic=-1 reboots at once, which husk-vmm
        // reports as a crash when the console shows a panic.
        "reboot=k".into(),
        "panic=-1".into(),
        // husk-vmm's i8042 implements only the reset line: no mouse port,
        // no multiplexer, no LEDs to probe.
        "i8042.noaux".into(),
        "i8042.nomux".into(),
        "i8042.dumbkbd".into(),
        "quiet".into(),
        BUILTIN_KERNEL_PARAM.into(),
    ];
    if !hardware {
        p.push("noxsave".into());
        p.push(PVM_CLEARCPUID.into());
        if let Some(khz) = tsc_khz {
            p.push(format!("tsc_early_khz={khz}"));
        }
    }
    p.extend(extra.iter().cloned());
    p.join(" ")
}

/// husk-vmm's configuration for `config` (pure, for testing).
pub fn vmm_config(
    config: &VmConfig,
    files: &BuiltinFiles,
    cmdline: &str,
) -> Result<husk_vmm_api::VmConfig, HypervisorError> {
    let vcpus = u8::try_from(config.vcpus).map_err(|_| {
        HypervisorError::InvalidConfig(format!(
            "husk-vmm supports at most 255 vCPUs, not {}",
            config.vcpus
        ))
    })?;
    let fs = config
        .virtio_fs
        .iter()
        .map(|f| FsConfig {
            tag: f.tag.clone(),
            socket: f.socket.clone(),
            queue_size: None,
        })
        .collect();
    let net = config
        .net
        .iter()
        .map(|n| NetConfig {
            tap: n.tap.clone(),
            mac: Some(n.mac.clone()),
        })
        .collect();
    Ok(husk_vmm_api::VmConfig {
        id: config.id.clone(),
        kernel: config.kernel.clone(),
        initrd: Some(config.initrd.clone()),
        cmdline: cmdline.to_string(),
        vcpus,
        memory_mib: config.memory_mib.into(),
        serial_log: Some(config.console_log.clone()),
        serial_log_max_bytes: Some(config.console_log_max_bytes),
        control_socket: Some(files.control.clone()),
        pid_file: Some(files.pid.clone()),
        hide_emulator_unsupported_cpuid: None,
        devices: Devices {
            rng: true,
            vsock: Some(VsockConfig {
                guest_cid: config.vsock.guest_cid.into(),
                uds_path: config.vsock.uds.clone(),
            }),
            fs,
            net,
        },
    })
}

/// The builtin backend.
#[derive(Debug)]
pub struct Builtin {
    paths: BuiltinPaths,
    hardware: bool,
    description: String,
}

impl Builtin {
    /// A backend for this host as `probe` describes it. [`super::select`]
    /// refuses the builtin backend without hardware virtualization; building
    /// it here directly is for tests and experiments on such hosts (a stock
    /// Linux guest will not boot there in reasonable time).
    pub fn new(paths: BuiltinPaths, probe: &AccelProbe) -> Self {
        let hardware = probe.accel == Accel::Kvm;
        let description = if hardware {
            "builtin (kvm): hardware virtualization available".to_string()
        } else {
            format!(
                "builtin (kvm-pvm, instruction emulator): {}; a stock Linux guest will not boot in reasonable time",
                probe.why
            )
        };
        Self {
            paths,
            hardware,
            description,
        }
    }

    pub fn paths(&self) -> &BuiltinPaths {
        &self.paths
    }

    /// Whether the host has VT-x/SVM behind /dev/kvm.
    pub fn hardware(&self) -> bool {
        self.hardware
    }

    /// The kernel command line this backend gives `config`'s guest.
    pub fn cmdline_for(&self, config: &VmConfig) -> String {
        let tsc = if self.hardware {
            None
        } else {
            host_tsc_rate().map(|r| r.khz)
        };
        kernel_cmdline(self.hardware, tsc, &config.kernel_params)
    }
}

#[async_trait::async_trait]
impl Hypervisor for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn description(&self) -> &str {
        &self.description
    }

    async fn launch(&self, config: &VmConfig) -> Result<Box<dyn Vm>, HypervisorError> {
        let span = tracing::info_span!("husk_vmm_launch", sandbox = %config.id);
        self.launch_inner(config).instrument(span).await
    }
}

impl Builtin {
    async fn launch_inner(&self, config: &VmConfig) -> Result<Box<dyn Vm>, HypervisorError> {
        config.validate()?;
        let files = BuiltinFiles::in_dir(&config.sandbox_dir);
        if files.control.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(HypervisorError::InvalidConfig(format!(
                "control socket path {} is too long",
                files.control.display()
            )));
        }
        if !self.hardware {
            tracing::warn!("husk-vmm without hardware virtualization: the guest runs in KVM's instruction emulator");
        }
        let cmdline = self.cmdline_for(config);
        let json = serde_json::to_string(&vmm_config(config, &files, &cmdline)?).map_err(|e| {
            HypervisorError::InvalidConfig(format!("husk-vmm config for {}: {e}", config.id))
        })?;
        write_private(&files.config, json.as_bytes())
            .map_err(|e| HypervisorError::io(format!("write {}", files.config.display()), e))?;

        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&files.log)
            .map_err(|source| SpawnError::Log {
                path: files.log.clone(),
                source,
            })?;
        let log2 = log
            .try_clone()
            .map_err(|e| HypervisorError::io("duplicate the husk-vmm log fd", e))?;
        let mut cmd = Command::new(&self.paths.husk_vmm);
        // No process group or session of ours: husk-vmm calls setsid itself
        // (which a group leader could not), and nothing ties it to huskd.
        cmd.arg("--config")
            .arg(&files.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its log is quoted in errors: no terminal colour codes.
            .env("NO_COLOR", "1")
            // ... and no error backtrace (RUST_BACKTRACE=1 in huskd's
            // environment would give one), which would push the error itself
            // out of the quoted tail. Panics keep RUST_BACKTRACE's setting.
            .env("RUST_LIB_BACKTRACE", "0")
            .kill_on_drop(false);
        if let Some(net) = &config.net {
            super::exec_in_netns(&mut cmd, &net.netns).map_err(|e| {
                HypervisorError::io(format!("open network namespace {}", net.netns.display()), e)
            })?;
        }
        tracing::debug!(config = %json, "starting husk-vmm");
        let child = cmd.spawn().map_err(|source| SpawnError::Exec {
            name: "husk-vmm",
            program: self.paths.husk_vmm.clone(),
            source,
        })?;
        let launched_at = Instant::now();
        let pid = child.id().ok_or_else(|| SpawnError::Exec {
            name: "husk-vmm",
            program: self.paths.husk_vmm.clone(),
            source: std::io::Error::other("child exited before its pid was read"),
        })?;
        let mut vm = BuiltinVm {
            id: config.id.clone(),
            pid,
            child,
            status: None,
            files,
            vsock_uds: config.vsock.uds.clone(),
            launched_at,
            detached: false,
        };
        // On error `vm` is dropped, which kills husk-vmm.
        vm.wait_until_running(CONTROL_SOCKET_TIMEOUT).await?;
        tracing::info!(husk_vmm = pid, hardware = self.hardware, "VM launched");
        Ok(Box::new(vm))
    }
}

fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)
}

/// The last lines of husk-vmm's log, for errors.
fn log_tail(path: &Path) -> String {
    const MAX: u64 = 4096;
    let Ok(mut f) = std::fs::File::open(path) else {
        return "(no log)".into();
    };
    use std::io::{Seek, SeekFrom};
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX)));
    let mut buf = Vec::new();
    let _ = f.take(MAX).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

const ROLE_VMM: &str = "husk-vmm";

/// The builtin backend's part of a [`VmRecord`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct BuiltinState {
    /// The sandbox directory, where husk-vmm keeps its files ([`BuiltinFiles`]).
    dir: PathBuf,
    /// The hybrid vsock socket husk-vmm serves (removed after a kill).
    vsock_uds: PathBuf,
}

/// The builtin backend's entry points for adoption and orphan cleanup.
pub static BACKEND: Backend = Backend {
    name: "builtin",
    adopt: |record, id, timeout| Box::pin(adopt(record, id, timeout)),
    reap_orphan: |dir, timeout| {
        Box::pin(async move {
            if !BuiltinFiles::in_dir(dir).config.exists() {
                return;
            }
            match stop_orphan(dir, timeout).await {
                Ok(Some(pid)) => {
                    tracing::info!(pid, dir = %dir.display(), "stopped a husk-vmm left from a previous huskd")
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, dir = %dir.display(), "stopping a leftover husk-vmm")
                }
            }
        })
    },
};

/// Takes over a husk-vmm from its record: the recorded process must still
/// run, and its control socket must answer `status` with that pid.
async fn adopt(
    record: &VmRecord,
    id: &str,
    timeout: Duration,
) -> Result<Box<dyn Vm>, HypervisorError> {
    let st: BuiltinState = record.state()?;
    let files = BuiltinFiles::in_dir(&st.dir);
    let vm = AdoptedVm::adopt(
        id,
        record,
        ROLE_VMM,
        &[],
        Box::new(BuiltinControl {
            files: files.clone(),
            vsock_uds: st.vsock_uds,
        }),
        files.log.clone(),
    )?;
    let r = control_request(&files.control, Request::Status, timeout)
        .await
        .map_err(|e| HypervisorError::Adopt(format!("husk-vmm control socket: {e}")))?;
    let pid = r.status.as_ref().map(|s| s.pid);
    if !r.ok || pid != Some(vm.vmm_pid()) {
        return Err(HypervisorError::Adopt(format!(
            "husk-vmm status reply {r} does not match pid {}",
            vm.vmm_pid()
        )));
    }
    Ok(Box::new(vm))
}

/// `shutdown` on an adopted husk-vmm's control socket.
#[derive(Debug)]
struct BuiltinControl {
    files: BuiltinFiles,
    vsock_uds: PathBuf,
}

#[async_trait::async_trait]
impl AdoptedControl for BuiltinControl {
    async fn quit(&self, timeout: Duration) -> Result<(), HypervisorError> {
        let r = control_request(&self.files.control, Request::Shutdown, timeout).await?;
        if !r.ok {
            return Err(HypervisorError::Qmp(format!(
                "husk-vmm refused shutdown: {r}"
            )));
        }
        Ok(())
    }

    /// husk-vmm removes its socket and pid file on a clean exit; after a
    /// kill they are stale.
    fn stale_files(&self) -> Vec<PathBuf> {
        vec![
            self.files.control.clone(),
            self.files.pid.clone(),
            self.vsock_uds.clone(),
        ]
    }
}

/// One husk-vmm process.
#[derive(Debug)]
pub struct BuiltinVm {
    id: String,
    pid: u32,
    child: Child,
    status: Option<ExitStatus>,
    files: BuiltinFiles,
    vsock_uds: PathBuf,
    launched_at: Instant,
    /// Handed over to a later huskd: `Drop` leaves it running.
    detached: bool,
}

impl BuiltinVm {
    pub fn files(&self) -> &BuiltinFiles {
        &self.files
    }

    /// Polls until husk-vmm has its control socket up and its pid file
    /// written (both come after the VM is built and before the vCPUs run),
    /// or fails with its log if it exits first.
    async fn wait_until_running(&mut self, timeout: Duration) -> Result<(), HypervisorError> {
        use std::os::unix::fs::FileTypeExt;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit()? {
                // A guest that powers off or resets at once can take husk-vmm
                // down cleanly before this loop saw its control socket. The
                // VM did run: that is the guest's exit, for the caller to
                // report as one (with the console), not a failed start.
                if status.success() && log_tail(&self.files.log).contains("VM running") {
                    return Ok(());
                }
                return Err(HypervisorError::VmmExited {
                    status: status.to_string(),
                    log: log_tail(&self.files.log),
                });
            }
            let sock_ok = std::fs::symlink_metadata(&self.files.control)
                .is_ok_and(|m| m.file_type().is_socket());
            if sock_ok {
                if let Ok(s) = std::fs::read_to_string(&self.files.pid) {
                    if s.trim().parse::<u32>().ok() == Some(self.pid) {
                        return Ok(());
                    }
                    return Err(HypervisorError::InvalidConfig(format!(
                        "pid file {} says {:?}, husk-vmm is pid {}",
                        self.files.pid.display(),
                        s.trim(),
                        self.pid
                    )));
                }
            }
            if Instant::now() >= deadline {
                return Err(HypervisorError::VmmExited {
                    status: format!("no control socket within {timeout:?}"),
                    log: log_tail(&self.files.log),
                });
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// One request on the control socket.
    pub async fn control(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<Reply, HypervisorError> {
        control_request(&self.files.control, request, timeout).await
    }

    fn signal_kill(&self) {
        if self.status.is_some() {
            return;
        }
        // The child is not reaped, so its pid cannot have been reused.
        if let Err(e) = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        ) {
            if e != nix::errno::Errno::ESRCH {
                tracing::warn!(pid = self.pid, %e, "kill husk-vmm failed");
            }
        }
    }

    /// What husk-vmm removes itself on a clean exit, removed after a kill.
    fn remove_files(&self) {
        for p in [&self.files.control, &self.files.pid, &self.vsock_uds] {
            match std::fs::remove_file(p) {
                Ok(()) => tracing::debug!(path = %p.display(), "removed a file husk-vmm left"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(path = %p.display(), %e, "removing"),
            }
        }
    }

    async fn reap(&mut self) -> Result<ExitStatus, HypervisorError> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let s = self
            .child
            .wait()
            .await
            .map_err(|e| HypervisorError::io("wait for husk-vmm", e))?;
        self.status = Some(s);
        Ok(s)
    }
}

/// One request on a husk-vmm control socket.
pub async fn control_request(
    path: &Path,
    request: Request,
    timeout: Duration,
) -> Result<Reply, HypervisorError> {
    let what = format!("husk-vmm control {request} on {}", path.display());
    let fut = async {
        let mut s = tokio::net::UnixStream::connect(path).await?;
        s.write_all(request.line().as_bytes()).await?;
        let mut reply = String::new();
        // Replies are one short line; bound it anyway.
        let mut r = BufReader::new(s).take(64 * 1024);
        r.read_line(&mut reply).await?;
        serde_json::from_str::<Reply>(&reply).map_err(std::io::Error::other)
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(HypervisorError::io(what, e)),
        Err(_) => Err(HypervisorError::io(
            what,
            std::io::Error::new(std::io::ErrorKind::TimedOut, "no reply"),
        )),
    }
}

/// Stops a husk-vmm that outlived the huskd that started it (found through
/// the pid file in `sandbox_dir`): `shutdown` on its control socket, SIGKILL
/// after `timeout`, then its files are removed. Returns the pid it stopped,
/// or `None` if no husk-vmm of this sandbox runs. The pid is only signalled
/// if its command line names this sandbox's config, so a reused pid is
/// never hit. It is not our child: whoever is its parent now reaps it.
pub async fn stop_orphan(
    sandbox_dir: &Path,
    timeout: Duration,
) -> Result<Option<u32>, HypervisorError> {
    let files = BuiltinFiles::in_dir(sandbox_dir);
    let pid = match std::fs::read_to_string(&files.pid) {
        Ok(s) => s.trim().parse::<u32>().ok(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(HypervisorError::io(
                format!("read {}", files.pid.display()),
                e,
            ))
        }
    };
    let is_ours = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains("husk-vmm") && c.contains(&*files.config.to_string_lossy())
        })
    };
    let live = crate::procfs::is_alive;
    let stopped = match pid {
        Some(pid) if is_ours(pid) && live(pid) => {
            tracing::info!(pid, dir = %sandbox_dir.display(), "stopping a husk-vmm left by a previous huskd");
            if let Err(e) = control_request(&files.control, Request::Shutdown, timeout / 2).await {
                tracing::warn!(%e, "control socket failed; killing");
            }
            let deadline = Instant::now() + timeout;
            while live(pid) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if live(pid) && is_ours(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
                while live(pid) && Instant::now() < deadline + Duration::from_secs(2) {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Some(pid)
        }
        _ => None,
    };
    for p in [&files.control, &files.pid] {
        let _ = std::fs::remove_file(p);
    }
    Ok(stopped)
}

#[async_trait::async_trait]
impl Vm for BuiltinVm {
    fn pids(&self) -> Vec<(&'static str, u32)> {
        vec![(ROLE_VMM, self.pid)]
    }

    fn record(&self) -> VmRecord {
        VmRecord {
            backend: BACKEND.name.into(),
            // Not reaped while we hold the child, so the pid is still ours.
            processes: crate::process::ProcessIdentity::of(ROLE_VMM, self.pid)
                .into_iter()
                .collect(),
            state: serde_json::json!(BuiltinState {
                dir: self
                    .files
                    .config
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
                vsock_uds: self.vsock_uds.clone(),
            }),
        }
    }

    fn launched_at(&self) -> Instant {
        self.launched_at
    }

    fn log_file(&self) -> Option<PathBuf> {
        Some(self.files.log.clone())
    }

    fn try_exit(&mut self) -> Result<Option<ExitStatus>, HypervisorError> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        let s = self
            .child
            .try_wait()
            .map_err(|e| HypervisorError::io("reap husk-vmm", e))?;
        self.status = s;
        Ok(s)
    }

    async fn wait(&mut self) -> Result<ExitStatus, HypervisorError> {
        self.reap().await
    }

    async fn shutdown(&mut self, timeout: Duration) -> Result<ExitStatus, HypervisorError> {
        let span = tracing::info_span!("husk_vmm_shutdown", sandbox = %self.id);
        async {
            let deadline = Instant::now() + timeout;
            if self.try_exit()?.is_none() {
                match self.control(Request::Shutdown, timeout / 2).await {
                    Ok(r) if r.ok => {}
                    Ok(r) => tracing::warn!(reply = %r, "husk-vmm refused shutdown, killing"),
                    Err(e) => tracing::warn!(%e, "husk-vmm control socket failed, killing"),
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let status = match tokio::time::timeout(left, self.reap()).await {
                Ok(r) => r?,
                Err(_) => {
                    tracing::warn!("husk-vmm did not stop in time, killing");
                    self.signal_kill();
                    self.reap().await?
                }
            };
            self.remove_files();
            Ok(status)
        }
        .instrument(span)
        .await
    }

    async fn kill(&mut self) -> Result<ExitStatus, HypervisorError> {
        self.signal_kill();
        let s = self.reap().await?;
        self.remove_files();
        Ok(s)
    }

    fn detach(mut self: Box<Self>) {
        self.detached = true;
    }
}

impl Drop for BuiltinVm {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        if self.status.is_none() {
            // Dropped without shutdown/kill (a failed or cancelled start, a
            // sandbox dropped without stop): kill it now, like every other
            // child of a sandbox. huskd dying does not run this.
            self.signal_kill();
            for _ in 0..200 {
                match self.child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        }
        // husk-vmm is gone: whatever it left is stale.
        self.remove_files();
    }
}

#[cfg(test)]
mod tests;
