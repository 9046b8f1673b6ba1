//! Exec through huskd's streaming server into a real pod VM (issue 11): the URL `Exec` returns,
//! SPDY with `v4.channel.k8s.io` (husk's own client) and WebSocket with `v5.channel.k8s.io` (the
//! Go client of `tests/go/stream-client`; crictl and critest are run by hand, see
//! docs/conformance.md), stdin through the guest and back byte-exact, the exit code, a terminal,
//! a missing binary, concurrent sessions, and tokens that cannot be replayed; port-forward to a
//! server bound to the pod's own loopback (which Kata cannot reach), 64 MiB byte-exact, and a
//! closed port reported on its request's error stream.

use std::time::Instant;

use anyhow::{ensure, Context, Result};
use husk_streaming::client;
use husk_testkit::go::run_stream_client;
use husk_tests::huskd::{Huskd, HuskdDirs};
use k8s_cri::v1 as cri;

use super::helpers::*;

async fn exec_url(rt: &mut Rt, ctr: &str, cmd: &[&str], tty: bool, stdin: bool) -> Result<String> {
    Ok(rt
        .exec(cri::ExecRequest {
            container_id: ctr.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            tty,
            stdin,
            stdout: true,
            stderr: !tty,
        })
        .await
        .context("Exec")?
        .into_inner()
        .url)
}

/// An exec of `cat` with stdin that ends with code 7.
async fn cat_url(rt: &mut Rt, ctr: &str) -> Result<String> {
    let cmd = ["sh", "-c", "cat; echo done >&2; exit 7"];
    exec_url(rt, ctr, &cmd, false, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cri_exec_streaming() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let s = setup()?;
    let dirs = HuskdDirs::new(&s.env, &[s.registry.host().as_str()])?;
    let huskd = Huskd::start(&dirs).await?;
    let (mut rt, mut img) = huskd.clients().await?;
    let pcfg = pod_config("stream", &dirs.top.path().join("logs/stream"));
    let image = s.image.clone();
    let r = guarded(&huskd, async {
        pull(&mut img, &image).await.context("PullImage")?;
        let pod = run_pod(&mut rt, &pcfg, "").await?;
        let ctr = create_start(
            &mut rt,
            &pod,
            &pcfg,
            container_config("main", &image, &["sleep", "3600"], "main/0.log"),
        )
        .await?;

        // 4 MiB of stdin through the guest's cat and back.
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
        let url = cat_url(&mut rt, &ctr).await?;
        let t = Instant::now();
        let out = client::exec(&url, Some(&data), false).await?;
        eprintln!(
            "4 MiB through exec stdin/stdout in {} ms",
            t.elapsed().as_millis()
        );
        ensure!(
            out.stdout == data,
            "stdout differs: {} bytes back",
            out.stdout.len()
        );
        ensure!(out.stderr == b"done\n", "stderr {:?}", out.stderr);
        ensure!(
            out.exit_code() == Some(7),
            "status {}",
            String::from_utf8_lossy(&out.status)
        );
        let replay = client::exec(&url, None, false).await;
        ensure!(
            replay
                .as_ref()
                .is_err_and(|e| e.to_string().contains("404")),
            "a used token must be refused: {replay:?}"
        );

        // The same over WebSocket with v5 (gorilla/websocket in Go, as
        // crictl --transport websocket): stdin ends with the v5 close signal.
        let url = cat_url(&mut rt, &ctr).await?;
        let t = Instant::now();
        let out = run_stream_client(&url, &["-i", "-ws", "v5.channel.k8s.io"], &data).await;
        eprintln!(
            "4 MiB through WebSocket exec stdin/stdout in {} ms",
            t.elapsed().as_millis()
        );
        ensure!(
            out.stdout == data && out.stderr == b"done\n" && out.status.code() == Some(7),
            "WebSocket exec: {} bytes back, stderr {:?}, {}",
            out.stdout.len(),
            String::from_utf8_lossy(&out.stderr),
            out.status
        );

        let url = exec_url(
            &mut rt,
            &ctr,
            &["sh", "-c", "tty && test -t 1 && echo on-a-tty"],
            true,
            true,
        )
        .await?;
        let out = client::exec(&url, Some(b""), true).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            text.contains("on-a-tty") && text.contains("/dev/pts/"),
            "tty: {text:?}"
        );

        let t = Instant::now();
        let url = exec_url(&mut rt, &ctr, &["/no/such/binary"], false, false).await?;
        let out = client::exec(&url, None, false).await?;
        let status = String::from_utf8_lossy(&out.status).to_string();
        eprintln!("missing binary: {} ms: {status}", t.elapsed().as_millis());
        ensure!(status.contains("Failure"), "{status}");
        ensure!(
            t.elapsed().as_secs() < 10,
            "missing binary took {:?}",
            t.elapsed()
        );

        let t = Instant::now();
        let mut sessions = Vec::new();
        for i in 0..20 {
            let url = exec_url(
                &mut rt,
                &ctr,
                &["sh", "-c", &format!("echo s{i}")],
                false,
                false,
            )
            .await?;
            sessions.push(tokio::spawn(async move {
                (i, client::exec(&url, None, false).await)
            }));
        }
        for s in sessions {
            let (i, out) = s.await?;
            let out = out?;
            ensure!(
                out.stdout == format!("s{i}\n").into_bytes(),
                "session {i}: {out:?}"
            );
            ensure!(out.exit_code() == Some(0));
        }
        eprintln!(
            "20 concurrent exec sessions in {} ms",
            t.elapsed().as_millis()
        );
        attach_to_container_stdio(&mut rt, &pod, &pcfg, &image).await?;
        port_forward_to_pod_localhost(&mut rt, &pod, &pcfg, &image, &ctr).await?;
        stop_remove_pod(&mut rt, &pod).await
    })
    .await;
    let end = terminate_clean(huskd, &dirs).await;
    r?;
    end
}

/// An HTTP server inside the pod bound to 127.0.0.1 only, reached through PortForward.
async fn port_forward_to_pod_localhost(
    rt: &mut Rt,
    pod: &str,
    pcfg: &cri::PodSandboxConfig,
    image: &str,
    probe_ctr: &str,
) -> Result<()> {
    let script = "mkdir -p /www && head -c 67108864 /dev/urandom > /www/big \
                  && echo hello-from-pod > /www/index.html \
                  && exec busybox httpd -f -p 127.0.0.1:8080 -h /www";
    let web = create_start(
        rt,
        pod,
        pcfg,
        container_config("web", image, &["sh", "-c", script], "web/0.log"),
    )
    .await?;
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = exec(
            rt,
            probe_ctr,
            &["wget", "-q", "-O", "-", "http://127.0.0.1:8080/index.html"],
            10,
        )
        .await?;
        if r.exit_code == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the pod's web server never came up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let url = port_forward_url(rt, pod).await?;
    let (resp, err) = client::port_forward(&url, 8080, b"GET /index.html HTTP/1.0\r\n\r\n").await?;
    let text = String::from_utf8_lossy(&resp);
    ensure!(
        err.is_empty(),
        "error stream: {}",
        String::from_utf8_lossy(&err)
    );
    ensure!(text.contains("hello-from-pod"), "response: {text:?}");
    // SPDY tunnelled in WebSocket, as crictl port-forward --transport websocket.
    let url = port_forward_url(rt, pod).await?;
    let out = run_stream_client(
        &url,
        &["-port", "8080", "-ws=tunnel"],
        b"GET /index.html HTTP/1.0\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains("hello-from-pod"),
        "tunnelled port-forward: {text:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let want = exec_ok(rt, &web, &["sha256sum", "/www/big"]).await?;
    let url = port_forward_url(rt, pod).await?;
    let t = Instant::now();
    let (resp, _) = client::port_forward(&url, 8080, b"GET /big HTTP/1.0\r\n\r\n").await?;
    let secs = t.elapsed().as_secs_f64();
    let body_at = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP header end")?
        + 4;
    let body = &resp[body_at..];
    ensure!(body.len() == 64 << 20, "body of {} bytes", body.len());
    use sha2::Digest;
    let got = hex::encode(sha2::Sha256::digest(body));
    ensure!(
        want.starts_with(&got),
        "sha256 differs: pod {want:?}, received {got}"
    );
    eprintln!(
        "64 MiB through port-forward in {:.2} s ({:.1} MiB/s)",
        secs,
        64.0 / secs
    );

    let url = port_forward_url(rt, pod).await?;
    let (resp, err) = client::port_forward(&url, 8081, b"x").await?;
    let err = String::from_utf8_lossy(&err);
    ensure!(
        resp.is_empty() && err.contains("refused"),
        "closed port: {err:?}"
    );
    eprintln!("closed port: {err}");
    Ok(())
}

async fn port_forward_url(rt: &mut Rt, pod: &str) -> Result<String> {
    Ok(rt
        .port_forward(cri::PortForwardRequest {
            pod_sandbox_id: pod.into(),
            port: vec![8080, 8081],
        })
        .await
        .context("PortForward")?
        .into_inner()
        .url)
}

/// Attach to a container created with stdin and stdin_once: its stdin gets what the session
/// sends, its output comes back, and the session ends when the container does.
async fn attach_to_container_stdio(
    rt: &mut Rt,
    pod: &str,
    pcfg: &cri::PodSandboxConfig,
    image: &str,
) -> Result<()> {
    let mut cfg = container_config(
        "reader",
        image,
        &[
            "sh",
            "-c",
            "while read l; do echo \"got $l\"; done; echo bye",
        ],
        "reader/0.log",
    );
    cfg.stdin = true;
    cfg.stdin_once = true;
    let ctr = create_start(rt, pod, pcfg, cfg).await?;
    let url = rt
        .attach(cri::AttachRequest {
            container_id: ctr.clone(),
            stdin: true,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .await
        .context("Attach")?
        .into_inner()
        .url;
    let out = client::exec(&url, Some(b"one\ntwo\n"), false).await?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text == "got one\ngot two\nbye\n", "attach output {text:?}");
    ensure!(
        out.exit_code() == Some(0),
        "status {}",
        String::from_utf8_lossy(&out.status)
    );
    Ok(())
}
