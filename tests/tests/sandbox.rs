//! End-to-end: real VMs (QEMU, TCG on the development hosts), the real
//! agent, virtiofsd and husk-vsock. Needs root, the guest image and the
//! binaries (see husk_tests); anything missing fails the test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use husk_proto::agent::StdioConfig;
use husk_runtime::{Rootfs, Sandbox, SandboxError};
use husk_testkit::{busybox, read_all};
use husk_tests::{
    pattern, process_for, run_short_lived_container, sha256_hex, show_console_if_failed, spec_for,
    unique_id, LeakProbe, TestEnv,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One VM test at a time even without --test-threads=1: the hosts have two
/// cores and TCG boots are CPU-bound.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `body` against a fresh sandbox, then stops it and checks that
/// nothing is left, whether or not `body` failed.
async fn with_sandbox<F, Fut>(env: &TestEnv, prefix: &str, body: F) -> Result<()>
where
    F: FnOnce(Arc<Sandbox>) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let sb = Arc::new(Sandbox::start(env.sandbox_config(&unique_id(prefix))).await?);
    let probe = LeakProbe::of(&sb);
    let r = body(sb.clone()).await;
    show_console_if_failed(&sb, &r);
    let stop = sb.stop().await;
    // Idempotent.
    sb.stop().await.context("second stop")?;
    drop(sb);
    let clean = probe.assert_clean();
    r?;
    stop?;
    clean
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_run_exec_and_clean_stop() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::from_env()?;
    let rootfs = tempfile::tempdir()?;
    busybox::rootfs(rootfs.path())?;
    let host_rootfs = rootfs.path().to_path_buf();
    with_sandbox(&env, "run", |sb| async move {
        let t = sb.timings();
        eprintln!("sandbox {} up: {t:?} ({})", sb.id(), sb.hypervisor());
        let h = sb.health().await?;
        ensure!(
            !h.agent_version.is_empty() && !h.kernel_release.is_empty(),
            "health: {h:?}"
        );

        // A short-lived container: stdout, stderr and the exit code.
        run_short_lived_container(&sb, &host_rootfs).await?;
        ensure!(
            !sb.share_dir().join("containers/c1").exists(),
            "c1 rootfs dir left in the share"
        );

        // A long-running container and an exec into it.
        let stdio = StdioConfig {
            stdin: false,
            terminal: false,
        };
        let spec = spec_for(&["sh", "-c", "echo up; exec sleep 600"])?;
        sb.create_container("c2", spec, Rootfs::Bind(host_rootfs.clone()), stdio)
            .await?;
        let io2 = sb.attach_stdio("c2", "", stdio).await?;
        sb.start_container("c2").await?;
        let mut init_out = io2.stdout;
        let mut up = [0u8; 3];
        tokio::time::timeout(Duration::from_secs(30), init_out.read_exact(&mut up)).await??;
        ensure!(&up == b"up\n");

        let exec_stdio = StdioConfig {
            stdin: true,
            terminal: false,
        };
        let p = process_for(&[
            "sh",
            "-c",
            "read line; echo \"got $line\"; echo e-err >&2; exit 7",
        ])?;
        sb.exec("c2", "e1", &p, exec_stdio).await?;
        let eio = sb.attach_stdio("c2", "e1", exec_stdio).await?;
        let mut stdin = eio.stdin.context("stdin stream")?;
        stdin.write_all(b"ping\n").await?;
        stdin.shutdown().await?;
        let (out, err) = tokio::try_join!(read_all(Some(eio.stdout)), read_all(eio.stderr))?;
        let exit = tokio::time::timeout(Duration::from_secs(60), sb.wait("c2", "e1")).await??;
        ensure!(
            String::from_utf8_lossy(&out) == "got ping\n",
            "exec stdout {:?}",
            String::from_utf8_lossy(&out)
        );
        ensure!(
            String::from_utf8_lossy(&err) == "e-err\n",
            "exec stderr {:?}",
            String::from_utf8_lossy(&err)
        );
        ensure!(exit.exit_code == 7, "exec exit {exit:?}");

        let stats = sb.stats("c2").await?;
        eprintln!("c2 stats: {stats:?}");
        ensure!(stats.pids >= 1, "stats {stats:?}");

        sb.signal("c2", "", 9).await?;
        let exit = tokio::time::timeout(Duration::from_secs(60), sb.wait("c2", "")).await??;
        ensure!(exit.exit_code == 128 + 9, "killed init exit {exit:?}");
        sb.remove_container("c2", false).await?;
        // c3 stays: stop must clean up a container's bind mount itself.
        let spec = spec_for(&["sleep", "600"])?;
        sb.create_container("c3", spec, Rootfs::Bind(host_rootfs.clone()), stdio)
            .await?;
        sb.start_container("c3").await?;
        Ok(())
    })
    .await?;
    // The host rootfs survived the sandbox (it was only bind-mounted).
    ensure!(
        rootfs.path().join("bin/busybox").exists(),
        "host rootfs damaged"
    );
    Ok(())
}

/// An initramfs whose /init is not the agent.
fn broken_initrd(dir: &std::path::Path, init_script: &str) -> Result<std::path::PathBuf> {
    let busybox = std::fs::read(busybox::path()?).context("busybox-static")?;
    let mut c = husk_tests::cpio::Cpio::new();
    c.dir("dev").chardev("dev/console", 5, 1).dir("bin");
    c.file("bin/busybox", 0o755, &busybox);
    c.file("init", 0o755, init_script.as_bytes());
    let path = dir.join("broken.img");
    std::fs::write(&path, c.finish())?;
    Ok(path)
}

async fn expect_boot_failure(script: &str, timeout: Duration) -> Result<(SandboxError, Duration)> {
    let env = TestEnv::from_env()?;
    let d = tempfile::tempdir()?;
    let mut cfg = env.sandbox_config(&unique_id("broken"));
    cfg.guest.initrd = broken_initrd(d.path(), script)?;
    cfg.ready_timeout = timeout;
    let dir = cfg.state_dir.join(&cfg.id);
    let t = Instant::now();
    let r = Sandbox::start(cfg).await;
    let took = t.elapsed();
    let err = match r {
        Ok(sb) => {
            sb.stop().await?;
            bail!("a guest without an agent came up");
        }
        Err(e) => e,
    };
    LeakProbe {
        dir,
        pids: Vec::new(),
    }
    .assert_clean()?;
    Ok((err, took))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_that_never_answers_times_out_with_console_tail() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let script = "#!/bin/busybox sh\n/bin/busybox echo HUSK-BROKEN-INIT: no agent here\nexec /bin/busybox sleep 100000\n";
    let timeout = Duration::from_secs(20);
    let (err, took) = expect_boot_failure(script, timeout).await?;
    let msg = err.to_string();
    eprintln!("failed after {took:?}: {msg}");
    ensure!(matches!(err, SandboxError::BootTimeout { .. }), "{msg}");
    ensure!(
        msg.contains("HUSK-BROKEN-INIT"),
        "console tail missing: {msg}"
    );
    ensure!(took < timeout + Duration::from_secs(10), "took {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_that_dies_fails_fast_with_console_tail() -> Result<()> {
    let _serial = SERIAL.lock().await;
    // init exits: the kernel panics, panic=-1 reboots, -no-reboot ends QEMU.
    let script = "#!/bin/busybox sh\n/bin/busybox echo HUSK-DYING-INIT\nexit 1\n";
    let (err, took) = expect_boot_failure(script, Duration::from_secs(120)).await?;
    let msg = err.to_string();
    eprintln!("failed after {took:?}: {msg}");
    ensure!(matches!(err, SandboxError::BootExited { .. }), "{msg}");
    ensure!(
        msg.contains("HUSK-DYING-INIT") || msg.contains("Kernel panic"),
        "console tail missing: {msg}"
    );
    ensure!(took < Duration::from_secs(60), "took {took:?}");
    Ok(())
}

const STRESS_BYTES: usize = 64 << 20;
const STRESS_CONTAINERS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stress_stdin_stdout_64mib_concurrent_containers() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::from_env()?;
    let rootfs = tempfile::tempdir()?;
    busybox::rootfs(rootfs.path())?;
    with_sandbox(&env, "stress", |sb| async move {
        let stdio = StdioConfig {
            stdin: true,
            terminal: false,
        };
        let mut jobs = Vec::new();
        for i in 0..STRESS_CONTAINERS {
            let id = format!("cat{i}");
            sb.create_container(
                &id,
                spec_for(&["cat"])?,
                Rootfs::Bind(rootfs.path().into()),
                stdio,
            )
            .await?;
            let io = sb.attach_stdio(&id, "", stdio).await?;
            sb.start_container(&id).await?;
            let data = pattern(i as u64 + 1, STRESS_BYTES);
            let want = sha256_hex(&data);
            let sb = sb.clone();
            jobs.push(tokio::spawn(async move {
                let t = Instant::now();
                let mut stdin = io.stdin.context("stdin")?;
                let writer = async move {
                    for chunk in data.chunks(256 * 1024) {
                        stdin.write_all(chunk).await?;
                    }
                    stdin.shutdown().await?;
                    anyhow::Ok(())
                };
                let mut stdout = io.stdout;
                let reader = async move {
                    use sha2::Digest;
                    let mut h = sha2::Sha256::new();
                    let mut n = 0usize;
                    let mut buf = vec![0u8; 256 * 1024];
                    loop {
                        let k = stdout.read(&mut buf).await?;
                        if k == 0 {
                            break;
                        }
                        h.update(&buf[..k]);
                        n += k;
                    }
                    anyhow::Ok((n, hex::encode(h.finalize())))
                };
                let (_, (n, got)) = tokio::try_join!(writer, reader)?;
                let exit = sb.wait(&id, "").await?;
                let secs = t.elapsed().as_secs_f64();
                ensure!(n == STRESS_BYTES, "{id}: {n} bytes back of {STRESS_BYTES}");
                ensure!(got == want, "{id}: hash mismatch");
                ensure!(exit.exit_code == 0, "{id}: exit {exit:?}");
                eprintln!(
                    "{id}: 64 MiB in and out in {secs:.1} s ({:.1} MiB/s each way)",
                    64.0 / secs
                );
                anyhow::Ok(())
            }));
        }
        let all = async {
            for j in jobs {
                j.await??;
            }
            anyhow::Ok(())
        };
        // A stall shows up as this timeout rather than a hung test.
        tokio::time::timeout(Duration::from_secs(900), all)
            .await
            .context("stream stress stalled")??;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sandboxes_one_after_another() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::from_env()?;
    let mut totals = Vec::new();
    for i in 0..20 {
        let mut cfg = env.sandbox_config(&unique_id("seq"));
        cfg.ready_timeout = Duration::from_secs(60);
        let t = Instant::now();
        let sb = Sandbox::start(cfg)
            .await
            .with_context(|| format!("boot {i}"))?;
        let probe = LeakProbe::of(&sb);
        let h = sb.health().await;
        let stop = sb.stop().await;
        drop(sb);
        probe.assert_clean().with_context(|| format!("boot {i}"))?;
        h?;
        stop?;
        totals.push(t.elapsed());
    }
    totals.sort();
    eprintln!(
        "20 sandboxes: start+stop min {:?} median {:?} max {:?}",
        totals[0], totals[10], totals[19]
    );
    Ok(())
}
