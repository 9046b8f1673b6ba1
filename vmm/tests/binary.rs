//! The `husk-vmm` binary as huskd uses it: JSON config, own session, pid file, control socket
//! with status and shutdown, clean removal of its files.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::TempDir;

/// husk-vmm deliberately outlives its parent: a failing test must still kill it.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn request(sock: &std::path::Path, line: &str) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writeln!(s, "{line}").unwrap();
    let mut reply = String::new();
    BufReader::new(s).read_line(&mut reply).unwrap();
    serde_json::from_str(&reply).unwrap()
}

#[test]
fn binary_runs_in_own_session_and_obeys_control_socket() {
    let dir = TempDir::new("bin");
    let kernel = dir.path().join("spin.elf");
    std::fs::write(
        &kernel,
        husk_testkit::guest::elf(husk_testkit::guest::MARK_AND_SPIN),
    )
    .unwrap();
    let sock = dir.path().join("ctl.sock");
    let pid_file = dir.path().join("vmm.pid");
    let cfg = serde_json::json!({
        "id": "sandbox-1",
        "kernel": kernel,
        "memory_mib": 64,
        "serial_log": dir.path().join("serial.log"),
        "control_socket": sock,
        "pid_file": pid_file,
        "devices": {"rng": true}
    });
    let cfg_path = dir.path().join("vm.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
            .arg("--config")
            .arg(&cfg_path)
            .spawn()
            .unwrap(),
    );
    let t0 = Instant::now();
    while !(sock.exists() && pid_file.exists()) {
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.0.kill();
            panic!("control socket / pid file never appeared");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid as u32, child.0.id());
    // SAFETY: getsid only reads.
    let sid = unsafe { libc::getsid(pid) };
    assert_eq!(sid, pid, "husk-vmm leads its own session");

    let st = request(&sock, r#"{"op":"status"}"#);
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["status"]["id"], "sandbox-1");
    assert_eq!(st["status"]["pid"], pid);
    assert_eq!(st["status"]["state"], "running");
    let bad = request(&sock, r#"{"op":"explode"}"#);
    assert_eq!(bad["ok"], false);

    // The guest spins (`jmp $`): it burns CPU while running and none while paused.
    let busy = cpu_ticks_over(pid, Duration::from_millis(500));
    assert!(busy > 10, "running guest used {busy} ticks in 500 ms");
    let p = request(&sock, r#"{"op":"pause"}"#);
    assert_eq!(p["ok"], true, "{p}");
    assert_eq!(
        request(&sock, r#"{"op":"status"}"#)["status"]["state"],
        "paused"
    );
    let idle = cpu_ticks_over(pid, Duration::from_millis(500));
    assert!(idle <= 2, "paused guest used {idle} ticks in 500 ms");
    let r = request(&sock, r#"{"op":"resume"}"#);
    assert_eq!(r["ok"], true, "{r}");
    let busy = cpu_ticks_over(pid, Duration::from_millis(500));
    assert!(busy > 10, "resumed guest used {busy} ticks in 500 ms");

    let bye = request(&sock, r#"{"op":"shutdown"}"#);
    assert_eq!(bye["ok"], true);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.0.kill();
            panic!("husk-vmm did not exit after shutdown");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "control socket removed");
    assert!(!pid_file.exists(), "pid file removed");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("serial.log")).unwrap(),
        "X"
    );
}

/// utime+stime clock ticks (1/100 s) the process used over `d`.
fn cpu_ticks_over(pid: i32, d: Duration) -> u64 {
    let ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields 14 and 15 (utime, stime) are at 11 and 12 after the command name.
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    let a = ticks();
    std::thread::sleep(d);
    ticks() - a
}
