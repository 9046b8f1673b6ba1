//! Measures husk-vmm's own cost: start-up time (wall and CPU) from nothing to the guest's
//! first instruction, and memory overhead (RSS minus the guest memory the guest touched) of a
//! running `husk-vmm` process. Prints Firecracker's published targets beside them.
//!
//! `husk-vmm-bench [ITERATIONS]`; expects the `husk-vmm` binary next to itself.
//!
//! In husk-tests rather than husk-vmm: its guest comes from husk-testkit,
//! which husk-vmm may only use in its tests.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use husk_testkit::bench::median;
use husk_testkit::guest::{elf, MARK_AND_SPIN};
use husk_vmm::builder::Vmm;
use husk_vmm::config::VmConfig;

fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{key} missing in /proc/{pid}/status"))
}

fn main() -> Result<()> {
    let iterations: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20);
    let dir = std::env::temp_dir().join(format!("husk-vmm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, elf(MARK_AND_SPIN))?;
    let cfg = VmConfig {
        id: "bench".into(),
        kernel,
        initrd: None,
        cmdline: String::new(),
        vcpus: 1,
        memory_mib: 128,
        serial_log: None,
        serial_log_max_bytes: None,
        control_socket: None,
        pid_file: None,
        hide_emulator_unsupported_cpuid: None,
        devices: Default::default(),
    };

    // Start-up, in process: configuration to the first guest instruction (its first port
    // write reaching the serial device).
    let mut wall = Vec::new();
    let mut cpu = Vec::new();
    for _ in 0..iterations {
        let c0 = cpu_time();
        let t0 = Instant::now();
        let mut vmm = Vmm::build(&cfg)?;
        vmm.start()?;
        while vmm.console().contents().is_empty() {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("guest produced no output in 10 s");
            }
            std::hint::spin_loop();
        }
        wall.push(t0.elapsed().as_secs_f64() * 1e3);
        cpu.push((cpu_time() - c0).as_secs_f64() * 1e3);
        drop(vmm);
    }

    // Memory: a real husk-vmm process running the same guest.
    let exe = std::env::current_exe()?
        .parent()
        .context("no exe dir")?
        .join("husk-vmm");
    let cfg_path = dir.join("vm.json");
    let mut run_cfg = cfg.clone();
    run_cfg.serial_log = Some(dir.join("serial.log"));
    std::fs::write(&cfg_path, serde_json::to_vec(&run_cfg)?)?;
    let mut child = std::process::Command::new(&exe)
        .arg("--config")
        .arg(&cfg_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("spawning {}", exe.display()))?;
    let t0 = Instant::now();
    while std::fs::metadata(dir.join("serial.log"))
        .map(|m| m.len())
        .unwrap_or(0)
        == 0
    {
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            bail!("husk-vmm guest produced no output");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    let pid = child.id();
    let rss = status_kib(pid, "VmRSS:")?;
    let shmem = status_kib(pid, "RssShmem:")?;
    let anon = status_kib(pid, "RssAnon:")?;
    let file = status_kib(pid, "RssFile:")?;
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "husk-vmm benchmark ({iterations} start-ups, 1 vCPU, 128 MiB, {})",
        if cfg!(debug_assertions) {
            "debug build"
        } else {
            "release build"
        }
    );
    println!(
        "  start-up to first guest instruction: median {:.2} ms wall, {:.2} CPU-ms (min {:.2} / max {:.2} ms wall)",
        median(&wall),
        median(&cpu),
        wall.iter().cloned().fold(f64::INFINITY, f64::min),
        wall.iter().cloned().fold(0.0, f64::max)
    );
    println!("    Firecracker published: 8 CPU-ms (VMM start to guest)");
    println!(
        "  memory overhead: {:.2} MiB (RSS {:.2} MiB - guest memory touched {:.2} MiB; anon {:.2} MiB, file {:.2} MiB)",
        (rss - shmem) as f64 / 1024.0,
        rss as f64 / 1024.0,
        shmem as f64 / 1024.0,
        anon as f64 / 1024.0,
        file as f64 / 1024.0
    );
    println!("    Firecracker published: 5 MiB");
    Ok(())
}
