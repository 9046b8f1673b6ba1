//! bench-sandbox [N]: boots N sandboxes one after another and prints the
//! median launch-to-agent-ready time split into host set-up and guest boot,
//! next to a raw QEMU boot of the same kernel + initrd (no virtiofsd, no
//! vsock) measured in the same run, alternating, as the baseline.

#![forbid(unsafe_code)]

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_runtime::hypervisor::probe::{host_tsc_rate, probe_accel};
use husk_runtime::hypervisor::qemu::kernel_cmdline;
use husk_runtime::Sandbox;
use husk_testkit::bench::{median, rounds};
use husk_tests::{unique_id, TestEnv};
use tokio::io::{AsyncBufReadExt, BufReader};

struct Raw {
    first_line: Duration,
    agent_line: Duration,
}

/// Boots plain QEMU with the sandbox's machine shape minus the vhost-user
/// devices, console on a pipe, until the agent's first log line.
async fn raw_boot(env: &TestEnv, memory_mib: u32) -> Result<Raw> {
    let probe = probe_accel();
    let cmdline = kernel_cmdline(probe.accel, host_tsc_rate().map(|r| r.khz), &[]);
    let mem = format!("{memory_mib}M");
    let cpu = if probe.accel.as_str() == "kvm" {
        "host"
    } else {
        "max"
    };
    let mut cmd = tokio::process::Command::new(&env.qemu.qemu);
    cmd.args([
        "-machine",
        "microvm,x-option-roms=off,memory-backend=mem,rtc=on",
    ])
    .args([
        "-accel",
        probe.accel.as_str(),
        "-cpu",
        cpu,
        "-smp",
        "1",
        "-m",
        &mem,
    ])
    .args([
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
    ])
    .args([
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-display",
        "none",
        "-serial",
        "stdio",
    ])
    .arg("-bios")
    .arg(&env.qemu.bios)
    .arg("-kernel")
    .arg(&env.guest.kernel)
    .arg("-initrd")
    .arg(&env.guest.initrd)
    .args(["-append", &cmdline])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .process_group(0)
    .kill_on_drop(true);
    let t0 = Instant::now();
    let mut child = cmd.spawn().context("starting qemu")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut first = None;
    let r = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(l) = lines.next_line().await? {
            if l.trim().is_empty() {
                continue;
            }
            first.get_or_insert(t0.elapsed());
            if l.contains("husk-agent") {
                return anyhow::Ok(t0.elapsed());
            }
        }
        bail!("console closed before the agent logged")
    })
    .await;
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id().unwrap_or(0) as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = child.wait().await;
    let agent_line = r.context("raw boot timed out")??;
    Ok(Raw {
        first_line: first.unwrap_or(agent_line),
        agent_line,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let n = rounds(10)?;
    let env = TestEnv::from_env()?;
    let (mut setup, mut boot, mut guest_own, mut agent, mut total, mut stop) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let (mut raw_first, mut raw_agent) = (vec![], vec![]);
    for i in 0..n {
        let raw = raw_boot(&env, 256)
            .await
            .with_context(|| format!("raw boot {i}"))?;
        raw_first.push(raw.first_line);
        raw_agent.push(raw.agent_line);

        let cfg = env.sandbox_config(&unique_id("bench"));
        let sb = Sandbox::start(cfg)
            .await
            .with_context(|| format!("sandbox {i}"))?;
        let t = sb.timings();
        let ts = Instant::now();
        sb.stop().await?;
        stop.push(ts.elapsed());
        setup.push(t.host_setup);
        boot.push(t.guest_boot);
        guest_own.push(t.guest_boot_to_ready);
        agent.push(t.agent_setup);
        total.push(t.total);
        eprintln!(
            "run {i}: sandbox ready {} (setup {}, boot {}), raw agent line {}",
            ms(t.host_setup + t.guest_boot),
            ms(t.host_setup),
            ms(t.guest_boot),
            ms(raw.agent_line)
        );
    }
    let ready: Vec<Duration> = setup.iter().zip(&boot).map(|(a, b)| *a + *b).collect();
    let ready_med = median(&ready);
    let raw_agent_med = median(&raw_agent);
    let raw_first_med = median(&raw_first);
    let setup_med = median(&setup);
    let boot_med = median(&boot);
    println!(
        "bench-sandbox: {n} sandboxes, one after another; {}",
        env.hypervisor.description()
    );
    println!("{:<52} {:>10}", "median", "time");
    let row = |name: &str, d: Duration| println!("{name:<52} {:>10}", ms(d));
    row("sandbox launch -> agent ready", ready_med);
    row(
        "  host set-up (until QEMU exec'd, helper sockets up)",
        setup_med,
    );
    row("  guest boot (QEMU exec -> ready notice)", boot_med);
    row("  guest's own CLOCK_BOOTTIME at ready", median(&guest_own));
    row(
        "agent set-up (ttrpc connect + CreateSandbox)",
        median(&agent),
    );
    row("sandbox start total", median(&total));
    row("sandbox stop", median(&stop));
    row("raw QEMU: first console line", raw_first_med);
    row("raw QEMU: agent's first log line", raw_agent_med);
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64();
    println!(
        "ratio sandbox ready / raw agent first line: {:.2}",
        ratio(ready_med, raw_agent_med)
    );
    println!(
        "ratio guest boot / raw agent first line:    {:.2}",
        ratio(boot_med, raw_agent_med)
    );
    println!(
        "host set-up share of launch -> ready:       {:.1} %",
        100.0 * ratio(setup_med, ready_med)
    );
    Ok(())
}
