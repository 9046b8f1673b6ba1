//! The QEMU backend: a `microvm` machine booted by qboot, KVM where the host
//! has hardware virtualization and TCG elsewhere, guest RAM in a shared
//! memfd so vhost-user backends can map it, virtio-fs through virtiofsd and
//! vsock through husk-vsock (vhost-user), serial console through husk-vsock to a capped log.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::adopted::{AdoptedControl, AdoptedVm};
use super::probe::{host_tsc_rate, Accel, AccelProbe};
use super::qmp::Qmp;
use super::{Backend, Hypervisor, HypervisorError, Vm, VmConfig, VmRecord};
use crate::components::{self, MissingComponent};
use crate::process::{wait_for_socket, ManagedChild};

/// How long husk-vsock may take to create its vhost-user socket.
const HELPER_SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

/// The binaries and firmware the QEMU backend runs.
#[derive(Debug, Clone)]
pub struct QemuPaths {
    pub qemu: PathBuf,
    /// qboot: a minimal firmware that jumps straight to the kernel; SeaBIOS
    /// costs seconds more under TCG.
    pub bios: PathBuf,
    pub husk_vsock: PathBuf,
}

impl QemuPaths {
    /// Explicit paths where given, else the usual locations.
    pub fn resolve(
        qemu: Option<&Path>,
        bios: Option<&Path>,
        husk_vsock: Option<&Path>,
    ) -> Result<Self, MissingComponent> {
        let qemu = components::find_binary(
            "QEMU (qemu-system-x86_64)",
            "qemu-system-x86_64",
            qemu,
            &["/usr/bin".into(), "/usr/libexec".into()],
            components::HINT_INSTALL_DEPS,
        )?;
        let bios = components::require_file(
            "qboot firmware",
            bios.unwrap_or(Path::new("/usr/share/qemu/qboot.rom")),
            components::HINT_INSTALL_DEPS,
        )?;
        let husk_vsock = components::find_binary(
            "husk-vsock",
            "husk-vsock",
            husk_vsock,
            &components::husk_binary_dirs(),
            components::HINT_MAKE_BUILD,
        )?;
        Ok(Self {
            qemu,
            bios,
            husk_vsock,
        })
    }
}

/// The QEMU backend.
#[derive(Debug)]
pub struct Qemu {
    paths: QemuPaths,
    probe: AccelProbe,
    description: String,
}

impl Qemu {
    pub fn new(paths: QemuPaths, probe: AccelProbe) -> Self {
        let description = probe.reason.clone();
        Self::with_description(paths, probe, description)
    }

    /// With a selection reason other than the probe's own.
    pub fn with_description(paths: QemuPaths, probe: AccelProbe, description: String) -> Self {
        Self {
            paths,
            probe,
            description,
        }
    }

    pub fn accel(&self) -> Accel {
        self.probe.accel
    }

    pub fn paths(&self) -> &QemuPaths {
        &self.paths
    }
}

/// Sockets the backend creates in the sandbox directory.
#[derive(Debug, Clone)]
pub struct QemuSockets {
    pub vhost_vsock: PathBuf,
    pub qmp: PathBuf,
    /// husk-vsock listens here for the guest's serial console and writes it to the capped
    /// console log: QEMU's own file chardev has no size limit.
    pub console: PathBuf,
}

impl QemuSockets {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            vhost_vsock: dir.join("vhost-vsock.sock"),
            qmp: dir.join("qmp.sock"),
            console: dir.join("console.sock"),
        }
    }
}

/// The guest kernel command line.
pub fn kernel_cmdline(accel: Accel, tsc_khz: Option<u64>, extra: &[String]) -> String {
    // panic=-1 reboots at once on a panic and -no-reboot turns that into a
    // QEMU exit, so a dead guest is noticed immediately.
    let mut p = vec![
        "console=ttyS0".to_string(),
        "panic=-1".into(),
        "quiet".into(),
    ];
    if accel == Accel::Tcg {
        // Without it a TCG guest sometimes spins forever in calibrate_delay
        // (ENVIRONMENT.md); under TCG the guest TSC is the host's.
        if let Some(khz) = tsc_khz {
            p.push(format!("tsc_early_khz={khz}"));
        }
    }
    p.extend(extra.iter().cloned());
    p.join(" ")
}

/// QEMU's argument list for `config` (pure, for testing).
pub fn qemu_args(
    config: &VmConfig,
    accel: Accel,
    bios: &Path,
    sockets: &QemuSockets,
    cmdline: &str,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |s: &str| a.push(s.into());
    let mem = format!("{}M", config.memory_mib);
    push("-name");
    push(&format!("husk-{},debug-threads=on", config.id));
    push("-machine");
    push("microvm,x-option-roms=off,memory-backend=mem,rtc=on");
    push("-accel");
    push(accel.as_str());
    push("-cpu");
    push(match accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    });
    push("-smp");
    push(&config.vcpus.to_string());
    push("-m");
    push(&mem);
    push("-object");
    push(&format!("memory-backend-memfd,id=mem,size={mem},share=on"));
    push("-nodefaults");
    push("-no-user-config");
    push("-no-reboot");
    push("-display");
    push("none");
    let path = |p: &Path| p.display().to_string();
    if let Some(fs) = &config.virtio_fs {
        push("-chardev");
        push(&format!("socket,id=fs0,path={}", path(&fs.socket)));
        push("-device");
        push(&format!(
            "vhost-user-fs-device,chardev=fs0,tag={},queue-size=1024",
            fs.tag
        ));
    }
    if let Some(net) = &config.net {
        // vhost=off: the host has no /dev/vhost-net (ENVIRONMENT.md); QEMU
        // moves the packets itself.
        push("-netdev");
        push(&format!(
            "tap,id=net0,ifname={},script=no,downscript=no,vhost=off",
            net.tap
        ));
        push("-device");
        push(&format!("virtio-net-device,netdev=net0,mac={}", net.mac));
    }
    push("-chardev");
    push(&format!(
        "socket,id=vsock0,path={}",
        path(&sockets.vhost_vsock)
    ));
    push("-device");
    push("vhost-user-vsock-device,chardev=vsock0");
    push("-chardev");
    push(&format!("socket,id=con0,path={}", path(&sockets.console)));
    push("-serial");
    push("chardev:con0");
    push("-qmp");
    push(&format!("unix:{},server=on,wait=off", path(&sockets.qmp)));
    push("-bios");
    a.push(bios.into());
    a.push("-kernel".into());
    a.push(config.kernel.clone().into());
    a.push("-initrd".into());
    a.push(config.initrd.clone().into());
    a.push("-append".into());
    a.push(cmdline.into());
    a
}

/// QEMU option values are comma-separated: a comma in a path or tag would
/// silently change their meaning.
fn check_no_commas(config: &VmConfig, sockets: &QemuSockets) -> Result<(), HypervisorError> {
    let mut items: Vec<(&str, String)> = vec![
        ("console log", config.console_log.display().to_string()),
        ("sandbox dir", sockets.qmp.display().to_string()),
    ];
    if let Some(fs) = &config.virtio_fs {
        items.push(("virtio-fs socket", fs.socket.display().to_string()));
        items.push(("virtio-fs tag", fs.tag.clone()));
    }
    for (what, v) in items {
        if v.contains(',') {
            return Err(HypervisorError::InvalidConfig(format!(
                "{what} {v:?} contains a comma"
            )));
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn description(&self) -> &str {
        &self.description
    }

    async fn launch(&self, config: &VmConfig) -> Result<Box<dyn Vm>, HypervisorError> {
        let span = tracing::info_span!("qemu_launch", sandbox = %config.id);
        self.launch_inner(config).instrument(span).await
    }
}

impl Qemu {
    async fn launch_inner(&self, config: &VmConfig) -> Result<Box<dyn Vm>, HypervisorError> {
        config.validate()?;
        let sockets = QemuSockets::in_dir(&config.sandbox_dir);
        check_no_commas(config, &sockets)?;
        for p in [&sockets.vhost_vsock, &sockets.qmp, &sockets.console] {
            if p.as_os_str().len() > super::MAX_SOCKET_PATH {
                return Err(HypervisorError::InvalidConfig(format!(
                    "socket path {} is too long",
                    p.display()
                )));
            }
        }
        let tsc = if self.probe.accel == Accel::Tcg {
            host_tsc_rate().map(|r| r.khz)
        } else {
            None
        };
        let cmdline = kernel_cmdline(self.probe.accel, tsc, &config.kernel_params);

        let mut vsock = ManagedChild::spawn(
            "husk-vsock",
            &self.paths.husk_vsock,
            [
                OsString::from("--socket"),
                sockets.vhost_vsock.clone().into(),
                "--uds".into(),
                config.vsock.uds.clone().into(),
                "--guest-cid".into(),
                config.vsock.guest_cid.to_string().into(),
                "--console-socket".into(),
                sockets.console.clone().into(),
                "--console-log".into(),
                config.console_log.clone().into(),
                "--console-max-bytes".into(),
                config.console_log_max_bytes.to_string().into(),
            ],
            &config.sandbox_dir.join("husk-vsock.log"),
        )?;
        // On any error below `vsock` (and `qemu`) are dropped, which kills them.
        wait_for_socket(&mut vsock, &sockets.vhost_vsock, HELPER_SOCKET_TIMEOUT).await?;

        let args = qemu_args(
            config,
            self.probe.accel,
            &self.paths.bios,
            &sockets,
            &cmdline,
        );
        tracing::debug!(?args, "starting qemu");
        let log = config.sandbox_dir.join("qemu.log");
        let mut cmd = tokio::process::Command::new(&self.paths.qemu);
        cmd.args(&args);
        if let Some(net) = &config.net {
            super::exec_in_netns(&mut cmd, &net.netns).map_err(|e| {
                HypervisorError::io(format!("open network namespace {}", net.netns.display()), e)
            })?;
        }
        let qemu = ManagedChild::spawn_command("qemu", &self.paths.qemu, cmd, &log)?;
        let launched_at = Instant::now();
        tracing::info!(
            qemu = qemu.pid(),
            husk_vsock = vsock.pid(),
            accel = self.probe.accel.as_str(),
            "VM launched"
        );
        // Our children are not reaped before this, so each pid is still
        // the process launched.
        let record = VmRecord {
            backend: BACKEND.name.into(),
            processes: [qemu.identity(ROLE_QEMU), vsock.identity(ROLE_VSOCK)]
                .into_iter()
                .flatten()
                .collect(),
            state: serde_json::to_value(QemuState {
                qmp: sockets.qmp.clone(),
                log: log.clone(),
            })
            .map_err(|e| HypervisorError::InvalidConfig(e.to_string()))?,
        };
        Ok(Box::new(QemuVm {
            id: config.id.clone(),
            qemu,
            vsock,
            qmp_path: sockets.qmp,
            log,
            launched_at,
            record,
        }))
    }
}

const ROLE_QEMU: &str = "qemu";
const ROLE_VSOCK: &str = "husk-vsock";

/// The QEMU backend's part of a [`VmRecord`].
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct QemuState {
    qmp: PathBuf,
    log: PathBuf,
}

/// The QEMU backend's entry points for adoption and orphan cleanup.
pub static BACKEND: Backend = Backend {
    name: "qemu",
    adopt: |record, id, _timeout| Box::pin(adopt(record, id)),
    // QEMU and husk-vsock hold nothing a kill loses: the caller's kill of
    // whatever names the directory is enough.
    reap_orphan: |_dir, _timeout| Box::pin(async {}),
};

/// Takes over a QEMU and its husk-vsock from their record. QMP is only
/// used to stop it, so the processes' identities are the whole check.
async fn adopt(record: &VmRecord, id: &str) -> Result<Box<dyn Vm>, HypervisorError> {
    let st: QemuState = record.state()?;
    let vm = AdoptedVm::adopt(
        id,
        record,
        ROLE_QEMU,
        &[ROLE_VSOCK],
        Box::new(QmpControl(st.qmp)),
        st.log,
    )?;
    Ok(Box::new(vm))
}

/// QMP `quit` for an adopted QEMU.
#[derive(Debug)]
struct QmpControl(PathBuf);

#[async_trait::async_trait]
impl AdoptedControl for QmpControl {
    async fn quit(&self, timeout: Duration) -> Result<(), HypervisorError> {
        let mut q = Qmp::connect(&self.0, timeout).await?;
        q.execute("quit", timeout).await?;
        Ok(())
    }
}

/// A running QEMU and its husk-vsock.
#[derive(Debug)]
pub struct QemuVm {
    id: String,
    qemu: ManagedChild,
    vsock: ManagedChild,
    qmp_path: PathBuf,
    log: PathBuf,
    launched_at: Instant,
    record: VmRecord,
}

impl QemuVm {
    async fn quit_via_qmp(&self, timeout: Duration) -> Result<(), HypervisorError> {
        QmpControl(self.qmp_path.clone()).quit(timeout).await
    }

    /// husk-vsock exits when QEMU disconnects; give it a moment, then kill.
    async fn stop_helpers(&mut self) -> Result<(), HypervisorError> {
        self.vsock
            .terminate(Duration::from_millis(500))
            .await
            .map_err(|e| HypervisorError::io("reap husk-vsock", e))?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Vm for QemuVm {
    fn pids(&self) -> Vec<(&'static str, u32)> {
        vec![(ROLE_QEMU, self.qemu.pid()), (ROLE_VSOCK, self.vsock.pid())]
    }

    fn record(&self) -> VmRecord {
        self.record.clone()
    }

    fn launched_at(&self) -> Instant {
        self.launched_at
    }

    fn log_file(&self) -> Option<PathBuf> {
        Some(self.log.clone())
    }

    fn try_exit(&mut self) -> Result<Option<ExitStatus>, HypervisorError> {
        self.qemu
            .try_wait()
            .map_err(|e| HypervisorError::io("reap qemu", e))
    }

    async fn wait(&mut self) -> Result<ExitStatus, HypervisorError> {
        self.qemu
            .wait()
            .await
            .map_err(|e| HypervisorError::io("wait for qemu", e))
    }

    async fn shutdown(&mut self, timeout: Duration) -> Result<ExitStatus, HypervisorError> {
        let span = tracing::info_span!("qemu_shutdown", sandbox = %self.id);
        async {
            let deadline = Instant::now() + timeout;
            if self.qemu.exit_status().is_none() {
                if let Err(e) = self.quit_via_qmp(timeout / 2).await {
                    tracing::warn!(%e, "QMP quit failed, killing QEMU");
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let status = match self.qemu.wait_timeout(left).await {
                Ok(Some(s)) => s,
                _ => {
                    tracing::warn!("QEMU did not quit in time, killing");
                    self.qemu
                        .kill()
                        .await
                        .map_err(|e| HypervisorError::io("kill qemu", e))?
                }
            };
            self.stop_helpers().await?;
            Ok(status)
        }
        .instrument(span)
        .await
    }

    async fn kill(&mut self) -> Result<ExitStatus, HypervisorError> {
        let status = self
            .qemu
            .kill()
            .await
            .map_err(|e| HypervisorError::io("kill qemu", e))?;
        self.vsock
            .kill()
            .await
            .map_err(|e| HypervisorError::io("kill husk-vsock", e))?;
        Ok(status)
    }

    fn detach(self: Box<Self>) {
        let this = *self;
        this.qemu.detach();
        this.vsock.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{HybridVsockConfig, VirtioFsConfig};

    fn cfg() -> VmConfig {
        VmConfig {
            id: "sb1".into(),
            vcpus: 2,
            memory_mib: 256,
            kernel: "/g/vmlinuz".into(),
            initrd: "/g/initrd.img".into(),
            kernel_params: vec!["husk.debug=1".into()],
            virtio_fs: Some(VirtioFsConfig {
                socket: "/s/fs.sock".into(),
                tag: "husk".into(),
            }),
            net: None,
            vsock: HybridVsockConfig {
                uds: "/s/vsock".into(),
                guest_cid: 3,
            },
            console_log: "/s/console.log".into(),
            console_log_max_bytes: 1 << 20,
            sandbox_dir: "/s".into(),
            host: Default::default(),
        }
    }

    fn joined(a: &[OsString]) -> String {
        a.iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn tcg_command_line() {
        let c = cfg();
        let cmdline = kernel_cmdline(Accel::Tcg, Some(2_596_124), &c.kernel_params);
        assert_eq!(
            cmdline,
            "console=ttyS0 panic=-1 quiet tsc_early_khz=2596124 husk.debug=1"
        );
        let a = qemu_args(
            &c,
            Accel::Tcg,
            Path::new("/q/qboot.rom"),
            &QemuSockets::in_dir(&c.sandbox_dir),
            &cmdline,
        );
        let s = joined(&a);
        for want in [
            "-machine microvm,x-option-roms=off,memory-backend=mem",
            "-accel tcg -cpu max -smp 2 -m 256M",
            "-object memory-backend-memfd,id=mem,size=256M,share=on",
            "-nodefaults",
            "-no-reboot",
            "-chardev socket,id=fs0,path=/s/fs.sock -device vhost-user-fs-device,chardev=fs0,tag=husk",
            "-chardev socket,id=vsock0,path=/s/vhost-vsock.sock -device vhost-user-vsock-device,chardev=vsock0",
            "-chardev socket,id=con0,path=/s/console.sock -serial chardev:con0",
            "-qmp unix:/s/qmp.sock,server=on,wait=off",
            "-bios /q/qboot.rom -kernel /g/vmlinuz -initrd /g/initrd.img",
        ] {
            assert!(s.contains(want), "missing {want:?} in {s}");
        }
        // The command line is a single argument.
        assert_eq!(a.last().unwrap(), &OsString::from(cmdline));
        assert!(!s.contains("-netdev"), "{s}");
    }

    #[test]
    fn net_device_is_a_tap_without_vhost() {
        let mut c = cfg();
        c.net = Some(super::super::NetDeviceConfig {
            netns: "/run/husk/netns/sb1".into(),
            tap: "tap0_husk".into(),
            mac: "0a:58:0a:01:00:05".into(),
        });
        c.validate().unwrap();
        let a = qemu_args(
            &c,
            Accel::Tcg,
            Path::new("/q/qboot.rom"),
            &QemuSockets::in_dir(&c.sandbox_dir),
            "",
        );
        let s = joined(&a);
        let want = "-netdev tap,id=net0,ifname=tap0_husk,script=no,downscript=no,vhost=off -device virtio-net-device,netdev=net0,mac=0a:58:0a:01:00:05";
        assert!(s.contains(want), "missing {want:?} in {s}");
        for (tap, mac) in [
            ("tap0_husk,x", "0a:58:0a:01:00:05"),
            ("a_tap_name_too_long", "0a:58:0a:01:00:05"),
            ("tap0", "0a:58:0a:01:00"),
            ("tap0", "0a:58:0a:01:00:zz"),
        ] {
            let n = c.net.as_mut().unwrap();
            n.tap = tap.into();
            n.mac = mac.into();
            assert!(c.validate().is_err(), "{tap} {mac} accepted");
        }
    }

    #[test]
    fn kvm_command_line() {
        let c = cfg();
        let cmdline = kernel_cmdline(Accel::Kvm, Some(1), &[]);
        assert_eq!(cmdline, "console=ttyS0 panic=-1 quiet");
        let s = joined(&qemu_args(
            &c,
            Accel::Kvm,
            Path::new("/b"),
            &QemuSockets::in_dir(Path::new("/s")),
            &cmdline,
        ));
        assert!(s.contains("-accel kvm -cpu host"), "{s}");
    }

    #[test]
    fn rejects_commas_and_long_paths() {
        let mut c = cfg();
        c.virtio_fs.as_mut().unwrap().tag = "a,b".into();
        assert!(check_no_commas(&c, &QemuSockets::in_dir(Path::new("/s"))).is_err());
        let mut c = cfg();
        c.vsock.uds = PathBuf::from(format!("/{}", "x".repeat(120)));
        assert!(c.validate().is_err());
        assert!(cfg().validate().is_ok());
    }
}
