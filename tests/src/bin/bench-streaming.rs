//! bench-streaming [N]: the CRI streaming path through a real huskd and pod
//! VM. Prints medians over N rounds of
//! - an exec of `true`: ExecSync (the baseline), and Exec + the streaming
//!   session over SPDY (`v4.channel.k8s.io`) and over WebSocket
//!   (`v5.channel.k8s.io`), from the CRI call to the exit status;
//! - 1 MiB of stdin through `cat` and back over each transport;
//! - port-forward throughput: a 32 MiB HTTP GET from a busybox httpd bound
//!   to the pod's 127.0.0.1, with host loopback TCP measured in the same
//!   run as the ceiling.

#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use husk_streaming::client;
use husk_testkit::bench::{median, rounds};
use husk_tests::pods::{
    container_config, create_container, pod_config, pull, run_pod, stop_remove_pod, BenchHuskd,
};
use k8s_cri::v1 as cri;
use tonic::transport::Channel;

type Rt = cri::runtime_service_client::RuntimeServiceClient<Channel>;

const TRANSFER: usize = 32 << 20;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64()
}

async fn exec_url(rt: &mut Rt, ctr: &str, cmd: &[&str], stdin: bool) -> Result<String> {
    Ok(rt
        .exec(cri::ExecRequest {
            container_id: ctr.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty: false,
            stdin,
            stdout: true,
            stderr: true,
        })
        .await
        .context("Exec")?
        .into_inner()
        .url)
}

/// One streamed exec over `transport` from the CRI call to the status.
async fn streamed(
    rt: &mut Rt,
    ctr: &str,
    cmd: &[&str],
    stdin: Option<&[u8]>,
    websocket: bool,
) -> Result<(Duration, client::ExecOutput)> {
    let t = Instant::now();
    let url = exec_url(rt, ctr, cmd, stdin.is_some()).await?;
    let out = if websocket {
        client::exec_websocket(&url, stdin).await?
    } else {
        client::exec(&url, stdin, false).await?
    };
    let d = t.elapsed();
    ensure!(
        out.exit_code() == Some(0),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.status)
    );
    Ok((d, out))
}

/// Host loopback TCP for the same bytes, the ceiling.
fn loopback_sample() -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let tx = std::thread::spawn(move || -> Result<()> {
        let (mut s, _) = l.accept()?;
        let buf = vec![0x5au8; 64 << 10];
        for _ in 0..TRANSFER / buf.len() {
            s.write_all(&buf)?;
        }
        Ok(())
    });
    let t = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    let mut got = 0;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let d = t.elapsed();
    tx.join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    ensure!(got == TRANSFER, "loopback: {got} bytes");
    Ok(mib_s(TRANSFER, d))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let n = rounds(20)?;
    let mut b = BenchHuskd::start().await?;
    let (mut rt, mut img) = b.huskd.clients().await?;
    let log_dir = b.dirs.top.path().join("logs");
    let image = b.registry.push_busybox("busybox:bench")?;
    pull(&mut img, &image).await?;

    let (mut sync, mut spdy, mut ws) = (Vec::new(), Vec::new(), Vec::new());
    let (mut spdy_cat, mut ws_cat) = (Vec::new(), Vec::new());
    let (mut forward, mut loopback) = (Vec::new(), Vec::new());
    let r: Result<()> = async {
        let pcfg = pod_config("stream", 0, &log_dir);
        let pod = run_pod(&mut rt, &pcfg).await?;
        let web = format!(
            "mkdir -p /www && head -c {TRANSFER} /dev/zero > /www/big \
             && exec httpd -f -p 127.0.0.1:8080 -h /www"
        );
        let ccfg = container_config("web", &image, &["sh", "-c", &web], "web.log");
        let ctr = create_container(&mut rt, &pod, &pcfg, ccfg).await?;
        rt.start_container(cri::StartContainerRequest {
            container_id: ctr.clone(),
        })
        .await
        .context("StartContainer")?;
        // httpd listens once the file is written.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = rt
                .exec_sync(cri::ExecSyncRequest {
                    container_id: ctr.clone(),
                    cmd: ["wget", "-q", "--spider", "http://127.0.0.1:8080/big"]
                        .map(String::from)
                        .to_vec(),
                    timeout: 10,
                })
                .await
                .context("ExecSync wget")?
                .into_inner();
            if r.exit_code == 0 {
                break;
            }
            ensure!(Instant::now() < deadline, "the pod's httpd never listened");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let data: Vec<u8> = (0..1u32 << 20).map(|i| i as u8).collect();
        for i in 0..n {
            let t = Instant::now();
            let r = rt
                .exec_sync(cri::ExecSyncRequest {
                    container_id: ctr.clone(),
                    cmd: vec!["true".into()],
                    timeout: 60,
                })
                .await
                .context("ExecSync")?
                .into_inner();
            ensure!(r.exit_code == 0, "ExecSync true: {}", r.exit_code);
            sync.push(ms(t.elapsed()));
            spdy.push(ms(streamed(&mut rt, &ctr, &["true"], None, false).await?.0));
            ws.push(ms(streamed(&mut rt, &ctr, &["true"], None, true).await?.0));
            for (websocket, v) in [(false, &mut spdy_cat), (true, &mut ws_cat)] {
                let (d, out) = streamed(&mut rt, &ctr, &["cat"], Some(&data), websocket).await?;
                ensure!(out.stdout == data, "cat: {} bytes back", out.stdout.len());
                v.push(ms(d));
            }
            if i < 5 {
                let url = rt
                    .port_forward(cri::PortForwardRequest {
                        pod_sandbox_id: pod.clone(),
                        port: vec![8080],
                    })
                    .await
                    .context("PortForward")?
                    .into_inner()
                    .url;
                let t = Instant::now();
                let (resp, err) =
                    client::port_forward(&url, 8080, b"GET /big HTTP/1.0\r\n\r\n").await?;
                let d = t.elapsed();
                ensure!(
                    err.is_empty() && resp.len() > TRANSFER,
                    "port-forward: {} bytes, error {}",
                    resp.len(),
                    String::from_utf8_lossy(&err)
                );
                forward.push(mib_s(TRANSFER, d));
                loopback.push(tokio::task::spawn_blocking(loopback_sample).await??);
            }
        }
        stop_remove_pod(&mut rt, &pod).await?;
        b.dirs.assert_sandboxes_gone()
    }
    .await;
    b.huskd.finish(r, 60).await?;

    println!(
        "bench-streaming: {n} rounds on one pod; {}",
        b.env.hypervisor.description()
    );
    println!("{:<56} {:>12}", "median", "value");
    let row = |k: &str, v: f64, unit: &str| println!("{k:<56} {v:>9.1} {unit}");
    row("ExecSync `true` (baseline)", median(&sync), "ms");
    row("Exec + SPDY session, `true`", median(&spdy), "ms");
    row("Exec + WebSocket session, `true`", median(&ws), "ms");
    row(
        "  SPDY / ExecSync",
        median(&spdy) / median(&sync) * 100.0,
        "%",
    );
    row(
        "  WebSocket / ExecSync",
        median(&ws) / median(&sync) * 100.0,
        "%",
    );
    row("Exec + SPDY, 1 MiB through `cat`", median(&spdy_cat), "ms");
    row(
        "Exec + WebSocket, 1 MiB through `cat`",
        median(&ws_cat),
        "ms",
    );
    row(
        "port-forward, 32 MiB HTTP GET from the pod's 127.0.0.1",
        median(&forward),
        "MiB/s",
    );
    row(
        "TCP host loopback (ceiling, same run)",
        median(&loopback),
        "MiB/s",
    );
    row(
        "  port-forward / loopback",
        median(&forward) / median(&loopback) * 100.0,
        "%",
    );
    Ok(())
}
