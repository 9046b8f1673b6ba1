//! The `husk-vmm` binary as huskd uses it: JSON config, own session, pid file, control socket
//! with status and shutdown, clean removal of its files.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;
use common::TempDir;

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
        husk_vmm::test_guest::elf(husk_vmm::test_guest::MARK_AND_SPIN),
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
    let mut child = Command::new(env!("CARGO_BIN_EXE_husk-vmm"))
        .arg("--config")
        .arg(&cfg_path)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !(sock.exists() && pid_file.exists()) {
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("control socket / pid file never appeared");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid as u32, child.id());
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
    let pause = request(&sock, r#"{"op":"pause"}"#);
    assert_eq!(pause["ok"], false);

    let bye = request(&sock, r#"{"op":"shutdown"}"#);
    assert_eq!(bye["ok"], true);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
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
