//! Boots the static agent as PID 1 of a QEMU (TCG) microVM and runs a
//! container in it over hybrid vsock. Manual: it needs a guest image built
//! with this agent, husk-vsock and virtiofsd, and takes a minute under TCG:
//!
//! HUSK_GUEST_DIR=/path/with/vmlinuz+initrd.img HUSK_VSOCK_BIN=/path/husk-vsock \
//!   cargo test -p husk-agent --test vm_boot -- --ignored --nocapture
//!
//! The host runtime's end-to-end tests cover this path for CI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use husk_proto::agent::{
    AgentClient, ContainerRef, CreateContainerRequest, CreateSandboxRequest, DestroySandboxRequest,
    HealthRequest, ProcessRef, ReadyNotice, StdioConfig, StreamAccept, StreamHello, StreamKind,
};
use husk_proto::stream::{read_msg, write_msg};
use husk_proto::ttrpc::Client;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

struct Kill(Vec<Child>);
impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

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

/// Hybrid vsock: connect to the guest's `port` through the VMM's socket.
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

#[tokio::test]
#[ignore = "manual: needs a guest image with this agent, husk-vsock, virtiofsd and a minute of QEMU TCG"]
async fn container_runs_in_a_vm() {
    let guest =
        PathBuf::from(std::env::var("HUSK_GUEST_DIR").unwrap_or("/var/lib/husk/guest".into()));
    let vsock_bin = std::env::var("HUSK_VSOCK_BIN").unwrap_or("husk-vsock".into());
    let virtiofsd = std::env::var("VIRTIOFSD").unwrap_or(format!(
        "{}/.cargo/bin/virtiofsd",
        std::env::var("HOME").unwrap()
    ));
    let dir = tempfile::Builder::new()
        .prefix("husk-agent-vm")
        .tempdir()
        .unwrap();
    let d = dir.path();
    let share = d.join("share");
    husk_testkit::busybox::minimal_rootfs(
        &share.join("c1/rootfs"),
        &["proc", "dev", "sys", "tmp"],
        &["sh"],
    )
    .unwrap();

    let log = |n: &str| std::fs::File::create(d.join(n)).unwrap();
    let mut kids = Kill(Vec::new());
    kids.0.push(
        Command::new(&virtiofsd)
            .args([
                "--socket-path",
                d.join("fs.sock").to_str().unwrap(),
                "--shared-dir",
                share.to_str().unwrap(),
            ])
            .args(["--sandbox", "none"])
            .stdout(log("virtiofsd.log"))
            .stderr(log("virtiofsd.err"))
            .spawn()
            .expect("virtiofsd"),
    );
    let uds = d.join("hv.sock");
    kids.0.push(
        Command::new(&vsock_bin)
            .args([
                "--socket",
                d.join("vsock.sock").to_str().unwrap(),
                "--uds",
                uds.to_str().unwrap(),
            ])
            .args(["--guest-cid", "3"])
            .stdout(log("vsock.log"))
            .stderr(log("vsock.err"))
            .spawn()
            .expect("husk-vsock"),
    );
    let ready = tokio::net::UnixListener::bind(format!("{}_1023", uds.display())).unwrap();
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
    let started = Instant::now();
    kids.0.push(
        Command::new("qemu-system-x86_64")
            .args([
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
            .stderr(log("qemu.err"))
            .spawn()
            .expect("qemu"),
    );
    let console = d.join("console.log");
    let result = tokio::time::timeout(Duration::from_secs(240), async {
        let (mut c, _) = ready.accept().await.unwrap();
        let notice: ReadyNotice = read_msg(&mut c, 1024).await.unwrap();
        eprintln!("ready after {:?}: {notice:?}", started.elapsed());
        let client = AgentClient::new(Client::new(connect(&uds, 1024).await));
        let t = Some(Duration::from_secs(60));
        eprintln!("{:?}", client.health(HealthRequest {}, t).await.unwrap());
        client
            .create_sandbox(CreateSandboxRequest { sandbox_id: "vm1".into(), hostname: "vm1".into(), share_tag: "husk".into(), network: None }, t)
            .await
            .unwrap();
        let mut spec: serde_json::Value = serde_json::to_value(libcontainer::oci_spec::runtime::Spec::default()).unwrap();
        spec["root"] = serde_json::json!({"path": format!("{}/c1/rootfs", husk_proto::GUEST_SHARE_DIR), "readonly": false});
        spec["process"]["args"] = serde_json::json!(["sh", "-c", "echo hello from $(hostname); exit 3"]);
        spec["process"]["env"] = serde_json::json!(["PATH=/bin"]);
        // Share the VM's UTS namespace: the output then shows the hostname
        // CreateSandbox set.
        spec.as_object_mut().unwrap().remove("hostname");
        let ns = spec["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "uts");
        let create = Instant::now();
        client
            .create_container(
                CreateContainerRequest {
                    container_id: "c1".into(),
                    oci_spec_json: serde_json::to_vec(&spec).unwrap(),
                    stdio: Some(StdioConfig::default()),
                },
                t,
            )
            .await
            .unwrap();
        eprintln!("create took {:?}", create.elapsed());
        let mut out = connect(&uds, 1025).await;
        let hello = StreamHello { process: Some(ProcessRef { container_id: "c1".into(), exec_id: String::new() }), kind: StreamKind::Stdout as i32 };
        write_msg(&mut out, &hello).await.unwrap();
        let acc: StreamAccept = read_msg(&mut out, 4096).await.unwrap();
        assert_eq!(acc.error, "");
        client.start_container(ContainerRef { container_id: "c1".into() }, t).await.unwrap();
        let mut text = String::new();
        out.read_to_string(&mut text).await.unwrap();
        let w = client.wait_process(ProcessRef { container_id: "c1".into(), exec_id: String::new() }, t).await.unwrap();
        eprintln!("output {text:?}, exit {}", w.exit_code);
        assert_eq!(text, "hello from vm1\n");
        assert_eq!(w.exit_code, 3);
        let stats = client.container_stats(ContainerRef { container_id: "c1".into() }, t).await.unwrap();
        eprintln!("{stats:?}");
        client.destroy_sandbox(DestroySandboxRequest { poweroff: true }, t).await.unwrap();
    })
    .await;
    if result.is_err() {
        panic!(
            "timed out; console:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
    }
    // The VM powers itself off.
    let qemu = kids.0.last_mut().unwrap();
    let t = Instant::now();
    while qemu.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "VM did not power off"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "console:\n{}",
        std::fs::read_to_string(&console).unwrap_or_default()
    );
}
