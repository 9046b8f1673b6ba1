//! The hybrid runtime (issue 13): a pod that asks for the host's network, PID and IPC namespaces
//! runs as OS containers on the host kernel under the default handler, next to a VM pod on the
//! same huskd; a handler with `host_namespaces = "refuse"` rejects it; exec, logs, a port bound
//! on the host, stop and remove work for it, and its containers outlive a SIGKILLed huskd and are
//! adopted by the next one. A pod of a `hypervisor = "none"` handler runs on the host kernel
//! with its own CNI network (an IP the host reaches) and its own hostname.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use husk_tests::huskd::{Huskd, HuskdDirs};
use husk_tests::pods::verbose_status;
use k8s_cri::v1 as cri;
use tonic::Code;

use super::helpers::*;

/// The host's network, PID and IPC namespaces.
fn host_namespaces() -> cri::NamespaceOption {
    let node = cri::NamespaceMode::Node as i32;
    cri::NamespaceOption {
        network: node,
        pid: node,
        ipc: node,
        ..Default::default()
    }
}

fn host_namespaces_pod(name: &str, log_dir: &std::path::Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(host_namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..pod_config(name, log_dir)
    }
}

/// A host pod's container with the pod's namespace options, as kubelet
/// sends them.
fn host_container(name: &str, image: &str, cmd: &[&str], log: &str) -> cri::ContainerConfig {
    let mut c = container_config(name, image, cmd, log);
    c.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            namespace_options: Some(host_namespaces()),
            ..Default::default()
        }),
        ..Default::default()
    });
    c
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// GET /index.html from `addr`, from the host.
fn http_get(addr: SocketAddr) -> Result<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

async fn wait_served(addr: SocketAddr, want: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match http_get(addr) {
            Ok(body) if body.contains(want) => return Ok(()),
            r => ensure!(
                Instant::now() < deadline,
                "{addr} does not serve {want:?} to the host: {r:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_hybrid_host_pods() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup()?;
    let dirs = HuskdDirs::new(&s.env, &[s.registry.host().as_str()])?;
    let mut huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let image = s.image.clone();
    let logs = dirs.top.path().join("logs");
    let hcfg = host_namespaces_pod("hostns", &logs.join("hostns"));
    let vcfg = pod_config("vm", &logs.join("vm"));
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let host_init = std::fs::read_to_string("/proc/1/comm")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut ids = None;
    let r = guarded(&huskd, async {
        pull(&mut img, &image).await.context("PullImage")?;
        let st = rt
            .status(cri::StatusRequest { verbose: true })
            .await
            .context("Status")?
            .into_inner();
        let info: serde_json::Value =
            serde_json::from_str(st.info.get("info").context("Status info")?)?;
        let policy = |h: &str| info["handlers"][h]["hostNamespaces"].clone();
        ensure!(
            policy("husk") == "host" && policy("big") == "refuse",
            "Status handlers: {}",
            info["handlers"]
        );
        expect_err(
            "a hostNetwork pod under a VM-only handler",
            rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(hcfg.clone()),
                runtime_handler: "big".into(),
            })
            .await,
            Code::InvalidArgument,
            &["namespace_options.network", "refuse"],
        )?;

        let vm_pod = run_pod(&mut rt, &vcfg, "").await?;
        let vm_ctr = create_start(
            &mut rt,
            &vm_pod,
            &vcfg,
            container_config("vm", &image, &["sleep", "3600"], "vm/0.log"),
        )
        .await?;
        let host_pod = run_pod(&mut rt, &hcfg, "").await?;
        let (_, info) = verbose_status(&mut rt, &host_pod).await?;
        ensure!(info["backend"] == "host", "host pod backend: {info}");
        let (_, info) = verbose_status(&mut rt, &vm_pod).await?;
        ensure!(
            info["backend"] == "qemu" || info["backend"] == "builtin",
            "VM pod backend: {info}"
        );

        let script = format!(
            "echo hello-from-host-pod; mkdir -p /www && echo served-by-host-pod > /www/index.html \
             && exec httpd -f -p 127.0.0.1:{port} -h /www"
        );
        let web = create_start(
            &mut rt,
            &host_pod,
            &hcfg,
            host_container("web", &image, &["sh", "-c", &script], "web/0.log"),
        )
        .await?;

        // The host's kernel, interfaces and processes; the VM pod has its own.
        let kernel = exec_ok(&mut rt, &web, &["cat", "/proc/sys/kernel/osrelease"]).await?;
        ensure!(
            kernel == host_kernel,
            "host pod kernel {kernel:?}, host {host_kernel:?}"
        );
        let vm_kernel = exec_ok(&mut rt, &vm_ctr, &["cat", "/proc/sys/kernel/osrelease"]).await?;
        ensure!(vm_kernel != host_kernel, "the VM pod runs the host kernel");
        let links = exec_ok(&mut rt, &web, &["ls", "/sys/class/net"]).await?;
        for l in std::fs::read_dir("/sys/class/net")? {
            let name = l?.file_name().to_string_lossy().into_owned();
            ensure!(
                links.split_whitespace().any(|n| n == name),
                "host interface {name} not seen by the hostNetwork pod: {links}"
            );
        }
        let init = exec_ok(&mut rt, &web, &["cat", "/proc/1/comm"]).await?;
        ensure!(
            init == host_init,
            "hostPID pod sees PID 1 {init:?}, host {host_init:?}"
        );
        let vm_init = exec_ok(&mut rt, &vm_ctr, &["cat", "/proc/1/comm"]).await?;
        ensure!(vm_init.trim() == "sleep", "VM pod's PID 1: {vm_init:?}");

        // A port bound in the pod is the host's; its output is in the CRI log.
        wait_served(local(port), "served-by-host-pod").await?;
        let log = std::fs::read_to_string(logs.join("hostns/web/0.log"))?;
        ensure!(log.contains("hello-from-host-pod"), "log: {log:?}");

        // An OS-container handler: the host kernel, the pod's own network
        // and UTS namespaces.
        let ocfg = pod_config("os-pod", &logs.join("os"));
        let os_pod = run_pod(&mut rt, &ocfg, "os").await?;
        let (st, info) = verbose_status(&mut rt, &os_pod).await?;
        ensure!(info["backend"] == "host", "os pod backend: {info}");
        let ip = st
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .context("os pod IP")?;
        let os_script = "mkdir -p /www && echo served-by-os-pod > /www/index.html \
                         && exec httpd -f -p 8080 -h /www";
        let os_web = create_start(
            &mut rt,
            &os_pod,
            &ocfg,
            container_config("web", &image, &["sh", "-c", os_script], "web/0.log"),
        )
        .await?;
        let kernel = exec_ok(&mut rt, &os_web, &["cat", "/proc/sys/kernel/osrelease"]).await?;
        ensure!(kernel == host_kernel, "os pod kernel {kernel:?}");
        let name = exec_ok(&mut rt, &os_web, &["hostname"]).await?;
        ensure!(name.trim() == "os-pod", "os pod hostname {name:?}");
        let addrs = exec_ok(&mut rt, &os_web, &["ip", "-o", "addr"]).await?;
        ensure!(addrs.contains(&ip), "os pod addresses {addrs:?} lack {ip}");
        wait_served(SocketAddr::new(ip.parse()?, 8080), "served-by-os-pod").await?;
        stop_remove_pod(&mut rt, &os_pod).await?;
        ids = Some((vm_pod, host_pod, web));
        Ok(())
    })
    .await;
    // huskd dies; the host pod's containers do not.
    huskd.kill()?;
    r?;
    let (vm_pod, host_pod, web) = ids.context("ids")?;
    wait_served(local(port), "served-by-host-pod").await?;

    let huskd = Huskd::start(&dirs).await?;
    let (mut rt, _) = huskd.clients().await?;
    let r = guarded(&huskd, async {
        ensure!(
            pod_state(&mut rt, &host_pod).await? == cri::PodSandboxState::SandboxReady as i32,
            "the host pod was not adopted"
        );
        let kernel = exec_ok(&mut rt, &web, &["cat", "/proc/sys/kernel/osrelease"]).await?;
        ensure!(kernel == host_kernel);
        stop_remove_pod(&mut rt, &host_pod).await?;
        ensure!(
            http_get(local(port)).is_err(),
            "the host pod's server still answers after RemovePodSandbox"
        );
        stop_remove_pod(&mut rt, &vm_pod).await?;
        dirs.assert_sandboxes_gone()?;
        Ok(())
    })
    .await;
    let end = terminate_clean(huskd, &dirs).await;
    r?;
    end
}
