//! bench-net [N]: pod networking through a real huskd and Debian's CNI
//! plugins (bridge + host-local + portmap, the test network of
//! husk_tests::cni). Prints medians over N rounds of
//! - RunPodSandbox, with the pod network's share of it (CNI ADD, tap, tc)
//!   beside the rest of the host-side work and the guest boot;
//! - StopPodSandbox + RemovePodSandbox (CNI DEL included);
//! - TCP throughput host -> pod (an HTTP POST into a busybox httpd CGI that
//!   reads it all) and pod -> host (busybox nc sending to a host listener),
//!   through the tap and tc redirect, with host loopback TCP measured in
//!   the same run as the ceiling.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use husk_testkit::bench::{median, rounds};
use husk_tests::pods::{
    container_config, create_container, pod_config, pull, run_pod, stop_remove_pod, verbose_status,
    BenchHuskd,
};
use k8s_cri::v1 as cri;

/// Bytes per throughput sample.
const TRANSFER: usize = 32 << 20;

fn mib_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

/// Sends `TRANSFER` bytes on `s` in 64 KiB writes.
fn send_all(s: &mut TcpStream) -> Result<()> {
    let buf = vec![0x5au8; 64 << 10];
    let mut left = TRANSFER;
    while left > 0 {
        let n = left.min(buf.len());
        s.write_all(&buf[..n])?;
        left -= n;
    }
    Ok(())
}

/// Reads until `TRANSFER` bytes arrived; the time from the first byte.
fn receive_all(s: &mut TcpStream) -> Result<Duration> {
    let mut buf = vec![0u8; 256 << 10];
    let mut got = 0;
    let mut first: Option<Instant> = None;
    while got < TRANSFER {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("connection closed after {got} of {TRANSFER} bytes");
        }
        first.get_or_insert_with(Instant::now);
        got += n;
    }
    Ok(first.map_or(Duration::ZERO, |t| t.elapsed()))
}

/// Host loopback TCP, the ceiling.
fn loopback_sample() -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rx = std::thread::spawn(move || -> Result<Duration> {
        let (mut s, _) = l.accept()?;
        receive_all(&mut s)
    });
    let mut s = TcpStream::connect(addr)?;
    send_all(&mut s)?;
    let d = rx
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    Ok(mib_s(TRANSFER, d))
}

/// POSTs `TRANSFER` bytes to the pod's CGI sink; the time until its answer
/// (it answers after reading the whole body).
fn host_to_pod_sample(pod: Ipv4Addr) -> Result<f64> {
    let addr = SocketAddr::from((pod, 8080));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let t = Instant::now();
    write!(
        s,
        "POST /cgi-bin/sink HTTP/1.0\r\nHost: {pod}\r\nContent-Type: application/octet-stream\r\nContent-Length: {TRANSFER}\r\n\r\n"
    )?;
    send_all(&mut s)?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let d = t.elapsed();
    ensure!(
        resp.contains(" 200 ") && resp.trim_end().ends_with("ok"),
        "sink answered: {resp:?}"
    );
    Ok(mib_s(TRANSFER, d))
}

async fn exec(
    rt: &mut cri::runtime_service_client::RuntimeServiceClient<tonic::transport::Channel>,
    id: &str,
    cmd: &str,
) -> Result<()> {
    let r = rt
        .exec_sync(cri::ExecSyncRequest {
            container_id: id.into(),
            cmd: vec!["sh".into(), "-c".into(), cmd.into()],
            timeout: 300,
        })
        .await?
        .into_inner();
    ensure!(
        r.exit_code == 0,
        "{cmd}: exit {}: {}",
        r.exit_code,
        String::from_utf8_lossy(&r.stderr)
    );
    Ok(())
}

fn ms_f(v: &serde_json::Value) -> Result<f64> {
    v.as_f64().with_context(|| format!("not a number: {v}"))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let n = rounds(5)?;
    let mut b = BenchHuskd::start().await?;
    let (mut rt, mut img) = b.huskd.clients().await?;
    let log_dir = b.dirs.top.path().join("logs");
    let image = b.registry.push_busybox("busybox:bench")?;
    pull(&mut img, &image).await?;

    let mut run = Vec::new();
    let mut net_setup = Vec::new();
    let mut boot = Vec::new();
    let mut host_other = Vec::new();
    let mut stop_remove = Vec::new();
    let mut to_pod = Vec::new();
    let mut from_pod = Vec::new();
    let mut loopback = Vec::new();
    let r: Result<()> = async {
        for i in 0..n {
            let pcfg = pod_config("net", i, &log_dir);
            let t = Instant::now();
            let pod = run_pod(&mut rt, &pcfg).await?;
            let run_ms = t.elapsed().as_secs_f64() * 1000.0;
            let (status, info) = verbose_status(&mut rt, &pod).await?;
            let ip: Ipv4Addr = status
                .as_ref()
                .and_then(|s| s.network.as_ref())
                .map(|n| n.ip.clone())
                .unwrap_or_default()
                .parse()
                .context("pod IP")?;
            let tm = &info["startTimingsMs"];
            let (net_ms, boot_ms) = (ms_f(&tm["networkSetup"])?, ms_f(&tm["guestBoot"])?);
            run.push(run_ms);
            net_setup.push(net_ms);
            boot.push(boot_ms);
            host_other.push(run_ms - boot_ms - net_ms);

            if i == 0 {
                // Throughput on the first pod only: every sample is a
                // TCG-bound guest, more rounds on one pod say the same.
                let sink = "mkdir -p /www/cgi-bin && printf '#!/bin/sh\\nhead -c \"$CONTENT_LENGTH\" >/dev/null\\necho Content-Type: text/plain\\necho\\necho ok\\n' > /www/cgi-bin/sink && chmod +x /www/cgi-bin/sink && exec httpd -f -p 8080 -h /www";
                let ccfg = container_config("sink", &image, &["sh", "-c", sink], "sink.log");
                let c = create_container(&mut rt, &pod, &pcfg, ccfg).await?;
                rt.start_container(cri::StartContainerRequest {
                    container_id: c.clone(),
                })
                .await
                .context("StartContainer")?;
                // httpd listens a moment after the container starts.
                let deadline = Instant::now() + Duration::from_secs(30);
                while TcpStream::connect_timeout(&(ip, 8080).into(), Duration::from_secs(2)).is_err() {
                    ensure!(Instant::now() < deadline, "pod httpd not listening");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                for _ in 0..3 {
                    to_pod.push(tokio::task::spawn_blocking(move || host_to_pod_sample(ip)).await??);
                    loopback.push(tokio::task::spawn_blocking(loopback_sample).await??);
                    let l = TcpListener::bind((b.dirs.net.gateway, 0))?;
                    let port = l.local_addr()?.port();
                    let rx = tokio::task::spawn_blocking(move || -> Result<Duration> {
                        let (mut s, _) = l.accept()?;
                        receive_all(&mut s)
                    });
                    exec(
                        &mut rt,
                        &c,
                        &format!("head -c {TRANSFER} /dev/zero | nc {} {port}", b.dirs.net.gateway),
                    )
                    .await?;
                    from_pod.push(mib_s(TRANSFER, rx.await??));
                }
            }
            let t = Instant::now();
            stop_remove_pod(&mut rt, &pod).await?;
            stop_remove.push(t.elapsed().as_secs_f64() * 1000.0);
            eprintln!("round {i}: RunPodSandbox {run_ms:.1} ms (network {net_ms:.1} ms, guest boot {boot_ms:.1} ms)");
        }
        b.dirs.assert_sandboxes_gone()
    }
    .await;
    b.huskd.finish(r, 60).await?;

    println!(
        "bench-net: {n} pods on a CNI bridge network (bridge + host-local + portmap); {}",
        b.env.hypervisor.description()
    );
    println!("{:<52} {:>12}", "median", "value");
    let row = |k: &str, v: f64, unit: &str| println!("{k:<52} {v:>9.1} {unit}");
    row("RunPodSandbox", median(&run), "ms");
    row(
        "  pod network set-up (CNI ADD, tap, tc)",
        median(&net_setup),
        "ms",
    );
    row("  other host-side work", median(&host_other), "ms");
    row("  guest boot", median(&boot), "ms");
    row(
        "StopPodSandbox + RemovePodSandbox",
        median(&stop_remove),
        "ms",
    );
    row(
        "  RunPodSandbox without the network (run - network)",
        median(&run) - median(&net_setup),
        "ms",
    );
    row(
        "TCP host -> pod (32 MiB HTTP POST)",
        median(&to_pod),
        "MiB/s",
    );
    row(
        "TCP pod -> host (32 MiB, busybox nc)",
        median(&from_pod),
        "MiB/s",
    );
    row(
        "TCP host loopback (ceiling, same run)",
        median(&loopback),
        "MiB/s",
    );
    row(
        "  host -> pod / loopback",
        median(&to_pod) / median(&loopback) * 100.0,
        "%",
    );
    Ok(())
}
