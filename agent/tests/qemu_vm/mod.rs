//! A real guest for the manual VM tests (vm_boot.rs, network.rs): the guest
//! image's kernel and initrd (with this agent as PID 1) under QEMU TCG, a
//! busybox root shared over virtiofsd, and the agent reached over hybrid
//! vsock through husk-vsock, as huskd reaches it.
//!
//! Environment: `HUSK_GUEST_DIR` (vmlinuz + initrd.img), `HUSK_VSOCK_BIN`,
//! `VIRTIOFSD`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::agent::{
    AgentClient, ContainerRef, CreateContainerRequest, CreateSandboxRequest, NetworkConfig,
    ProcessRef, ReadyNotice, StdioConfig, StreamAccept, StreamHello, StreamKind,
};
use husk_proto::stream::{read_msg, write_msg};
use husk_proto::ttrpc::Client;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// The agent's ttrpc port and its stream port.
pub const TTRPC_PORT: u32 = 1024;
pub const STREAM_PORT: u32 = 1025;
/// The one container of these tests, rooted at `share/c1/rootfs`.
pub const CONTAINER: &str = "c1";

/// One guest and its helpers; every process is killed on drop, so a failed
/// test leaves none behind.
pub struct QemuVm {
    pub dir: tempfile::TempDir,
    /// husk-vsock's hybrid vsock socket.
    pub uds: PathBuf,
    ready: UnixListener,
    helpers: Vec<Child>,
    qemu: Option<Child>,
}

impl QemuVm {
    /// Starts virtiofsd and husk-vsock on a fresh directory (prefix
    /// `prefix`) with a busybox root for the container, and returns them
    /// with the QEMU command line for the guest, for the caller to add its
    /// own devices to and pass to [`QemuVm::spawn`].
    pub async fn prepare(prefix: &str) -> (QemuVm, Command) {
        let guest =
            PathBuf::from(std::env::var("HUSK_GUEST_DIR").unwrap_or("/var/lib/husk/guest".into()));
        let vsock_bin = std::env::var("HUSK_VSOCK_BIN").unwrap_or("husk-vsock".into());
        let virtiofsd = std::env::var("VIRTIOFSD").unwrap_or(format!(
            "{}/.cargo/bin/virtiofsd",
            std::env::var("HOME").unwrap()
        ));
        let dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
        let d = dir.path().to_path_buf();
        let share = d.join("share");
        husk_testkit::busybox::minimal_rootfs(
            &share.join(CONTAINER).join("rootfs"),
            &["proc", "dev", "sys", "tmp"],
            &["sh"],
        )
        .unwrap();

        let log = |n: &str| std::fs::File::create(d.join(n)).unwrap();
        let mut helpers = Vec::new();
        helpers.push(
            Command::new(&virtiofsd)
                .args(["--socket-path", d.join("fs.sock").to_str().unwrap()])
                .args(["--shared-dir", share.to_str().unwrap(), "--sandbox", "none"])
                .stdout(log("virtiofsd.log"))
                .stderr(log("virtiofsd.err"))
                .spawn()
                .expect("virtiofsd"),
        );
        let uds = d.join("hv.sock");
        helpers.push(
            Command::new(&vsock_bin)
                .args(["--socket", d.join("vsock.sock").to_str().unwrap()])
                .args(["--uds", uds.to_str().unwrap(), "--guest-cid", "3"])
                .stdout(log("vsock.log"))
                .stderr(log("vsock.err"))
                .spawn()
                .expect("husk-vsock"),
        );
        // The agent's ready notice: a guest connection to port 1023 reaches
        // `<uds>_1023`, so it must be listening before the guest boots.
        let ready = UnixListener::bind(format!("{}_1023", uds.display())).unwrap();
        for s in ["fs.sock", "vsock.sock"] {
            let t = Instant::now();
            while !d.join(s).exists() {
                assert!(t.elapsed() < Duration::from_secs(10), "{s} never appeared");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }

        let mut append = "console=ttyS0 panic=-1 quiet".to_string();
        if let Some(k) = tsc_khz() {
            append.push_str(&format!(" tsc_early_khz={k}"));
        }
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args([
            "-accel",
            "tcg",
            "-M",
            "microvm,x-option-roms=off,memory-backend=mem,rtc=on",
        ])
        .args([
            "-bios",
            "/usr/share/qemu/qboot.rom",
            "-cpu",
            "max",
            "-m",
            "512",
            "-smp",
            "1",
        ])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args([
            "-chardev",
            &format!("socket,id=fs0,path={}", d.join("fs.sock").display()),
        ])
        .args([
            "-device",
            "vhost-user-fs-device,chardev=fs0,tag=husk,queue-size=1024",
        ])
        .args([
            "-chardev",
            &format!("socket,id=vsock0,path={}", d.join("vsock.sock").display()),
        ])
        .args(["-device", "vhost-user-vsock-device,chardev=vsock0"])
        .args([
            "-serial",
            &format!("file:{}", d.join("console.log").display()),
        ])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initrd.img"))
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(log("qemu.log"))
        .stderr(log("qemu.err"));
        let vm = QemuVm {
            dir,
            uds,
            ready,
            helpers,
            qemu: None,
        };
        (vm, qemu)
    }

    /// Starts the guest; returns QEMU's pid.
    pub fn spawn(&mut self, mut qemu: Command) -> u32 {
        let child = qemu.spawn().expect("qemu");
        let pid = child.id();
        self.qemu = Some(child);
        pid
    }

    /// Waits for the agent's ready notice, then connects its ttrpc client.
    pub async fn agent(&self) -> (ReadyNotice, AgentClient) {
        let (mut c, _) = self.ready.accept().await.unwrap();
        let notice: ReadyNotice = read_msg(&mut c, 1024).await.unwrap();
        let client = AgentClient::new(Client::new(self.connect(TTRPC_PORT).await));
        (notice, client)
    }

    /// Hybrid vsock: connect to the guest's `port` through husk-vsock.
    pub async fn connect(&self, port: u32) -> UnixStream {
        connect(&self.uds, port).await
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    /// Waits up to 30 s for the guest to power itself off.
    pub async fn wait_poweroff(&mut self) {
        let qemu = self.qemu.as_mut().expect("qemu was not started");
        let t = Instant::now();
        while qemu.try_wait().unwrap().is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "VM did not power off"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs the container `spec` to its end: creates it, takes its stdout,
    /// starts it; returns what it printed and its exit code.
    pub async fn run_container(
        &self,
        client: &AgentClient,
        spec: &serde_json::Value,
        t: Option<Duration>,
    ) -> (String, i32) {
        let create = Instant::now();
        client
            .create_container(
                CreateContainerRequest {
                    container_id: CONTAINER.into(),
                    oci_spec_json: serde_json::to_vec(spec).unwrap(),
                    stdio: Some(StdioConfig::default()),
                },
                t,
            )
            .await
            .unwrap();
        eprintln!("create took {:?}", create.elapsed());
        let mut out = self.connect(STREAM_PORT).await;
        let init = ProcessRef {
            container_id: CONTAINER.into(),
            exec_id: String::new(),
        };
        let hello = StreamHello {
            process: Some(init.clone()),
            kind: StreamKind::Stdout as i32,
            port: 0,
        };
        write_msg(&mut out, &hello).await.unwrap();
        let acc: StreamAccept = read_msg(&mut out, 4096).await.unwrap();
        assert_eq!(acc.error, "");
        client
            .start_container(
                ContainerRef {
                    container_id: CONTAINER.into(),
                },
                t,
            )
            .await
            .unwrap();
        let mut text = String::new();
        out.read_to_string(&mut text).await.unwrap();
        let w = client.wait_process(init, t).await.unwrap();
        (text, w.exit_code)
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        for c in self.helpers.iter_mut().chain(&mut self.qemu) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CreateSandbox as huskd sends it: the guest's hostname and the
/// virtiofs share, with `network` if the test has one.
pub async fn create_sandbox(
    client: &AgentClient,
    network: Option<NetworkConfig>,
    t: Option<Duration>,
) {
    client
        .create_sandbox(
            CreateSandboxRequest {
                sandbox_id: "vm1".into(),
                hostname: "vm1".into(),
                share_tag: "husk".into(),
                network,
            },
            t,
        )
        .await
        .unwrap();
}

/// A default OCI spec for the container: `args` in its busybox root on the
/// share, as the guest sees it.
pub fn container_spec(args: &[&str]) -> serde_json::Value {
    let mut spec = serde_json::to_value(libcontainer::oci_spec::runtime::Spec::default()).unwrap();
    spec["root"] = serde_json::json!({
        "path": format!("{}/{CONTAINER}/rootfs", husk_proto::GUEST_SHARE_DIR),
        "readonly": false,
    });
    spec["process"]["args"] = serde_json::json!(args);
    spec["process"]["env"] = serde_json::json!(["PATH=/bin"]);
    spec
}

async fn connect(uds: &Path, port: u32) -> UnixStream {
    let s = UnixStream::connect(uds).await.unwrap();
    let mut r = BufReader::new(s);
    r.get_mut()
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .unwrap();
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("OK "), "CONNECT {port}: {line:?}");
    r.into_inner()
}

/// The host's TSC rate from the kernel log: under TCG the guest reads the
/// host TSC, and without it the guest can hang calibrating against the PIT.
fn tsc_khz() -> Option<u64> {
    let out = Command::new("dmesg").output().ok()?;
    let log = String::from_utf8_lossy(&out.stdout);
    let line = log.lines().find(|l| l.contains("tsc: Detected "))?;
    let mhz = line
        .split("tsc: Detected ")
        .nth(1)?
        .split_whitespace()
        .next()?;
    let (i, f) = mhz.split_once('.').unwrap_or((mhz, "0"));
    Some(i.parse::<u64>().ok()? * 1000 + format!("{f:0<3}")[..3].parse::<u64>().ok()?)
}
