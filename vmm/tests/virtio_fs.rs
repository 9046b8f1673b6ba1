//! A guest virtio-fs driver (assembled here) completes FUSE_INIT with a real virtiofsd through
//! husk-vmm's vhost-user frontend.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest_config, Asm, TempDir, VIRTIO_BAR};
use husk_vmm::builder::launch;
use husk_vmm::config::FsConfig;
use husk_vmm::vstate::vcpu::VcpuStop;

const BAR: u64 = VIRTIO_BAR;
const DESC: u64 = 0x10_0000;
const AVAIL: u64 = 0x10_1000;
const USED: u64 = 0x10_2000;
const REQ: u64 = 0x11_0000;
const RESP: u64 = 0x11_1000;
const FUSE_INIT: u32 = 26;

struct Virtiofsd(Child);

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn virtiofsd_path() -> std::path::PathBuf {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let p = std::path::Path::new(&home).join(".cargo/bin/virtiofsd");
    assert!(
        p.exists(),
        "virtiofsd not found at {} (cargo install virtiofsd)",
        p.display()
    );
    p
}

#[test]
fn guest_completes_fuse_init_with_virtiofsd() {
    let dir = TempDir::new("fs");
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let sock = dir.path().join("fs.sock");
    let child = Command::new(virtiofsd_path())
        .arg(format!("--socket-path={}", sock.display()))
        .arg(format!("--shared-dir={}", shared.display()))
        .arg("--sandbox=none")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn virtiofsd");
    let mut fsd = Virtiofsd(child);
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "virtiofsd socket never appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut asm = Asm::new();
    asm.virtio_reset_ack();
    asm.print("tag ").print_hex(BAR + 0x2000, 4).print("\n");
    asm.store32(BAR + 8, 1)
        .store32(BAR + 0xc, 1)
        .store8(BAR + 0x14, 0xb);
    // Request queue (1) only.
    asm.virtio_queue(1, DESC, AVAIL, USED)
        .store8(BAR + 0x14, 0xf)
        .print("st ")
        .print_hex(BAR + 0x14, 1)
        .print("\n");
    // fuse_in_header + fuse_init_in (64 bytes, protocol 7.38).
    asm.store32(REQ, 40 + 64)
        .store32(REQ + 4, FUSE_INIT)
        .store64(REQ + 8, 1)
        .store64(REQ + 16, 0)
        .store64(REQ + 24, 0)
        .store64(REQ + 32, 0)
        .store32(REQ + 40, 7)
        .store32(REQ + 44, 38)
        .store32(REQ + 48, 0x2_0000);
    for off in (52..104).step_by(4) {
        asm.store32(REQ + off, 0);
    }
    // desc0: request (device-readable) → desc1: reply (device-writable).
    asm.store64(DESC, REQ)
        .store32(DESC + 8, 104)
        .store16(DESC + 12, 1)
        .store16(DESC + 14, 1)
        .store64(DESC + 16, RESP)
        .store32(DESC + 24, 256)
        .store16(DESC + 28, 2)
        .store16(DESC + 30, 0)
        .store16(AVAIL + 4, 0)
        .store16(AVAIL + 2, 1)
        .store16(BAR + 0x3000 + 4, 1)
        .wait16_eq(USED + 2, 1)
        .print("out ")
        .print_hex(RESP, 16)
        .print("\ninit ")
        .print_hex(RESP + 16, 8)
        .print("\n")
        .reset();

    let mut cfg = guest_config(&dir, &asm);
    cfg.devices.fs = vec![FsConfig {
        tag: "husk".into(),
        socket: sock.clone(),
        queue_size: None,
    }];
    let mut vmm = launch(&cfg).expect("launch");
    let out = vmm.wait(Some(Duration::from_secs(120)));
    let log = std::fs::read_to_string(dir.path().join("serial.log")).unwrap();
    let out = out.unwrap_or_else(|| panic!("guest did not finish; log:\n{log}"));
    assert_eq!(out.reason, VcpuStop::Reset, "log:\n{log}");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines[0], "tag 6875736b", "config space carries the tag");
    assert_eq!(
        lines[1], "st 0f",
        "DRIVER_OK, device activated; log:\n{log}"
    );
    let outh = lines[2].strip_prefix("out ").unwrap();
    // fuse_out_header: len (LE u32), error 0, unique 1.
    assert_eq!(&outh[8..16], "00000000", "FUSE_INIT error; log:\n{log}");
    assert_eq!(&outh[16..32], "0100000000000000", "unique; log:\n{log}");
    let init = lines[3].strip_prefix("init ").unwrap();
    assert_eq!(&init[0..8], "07000000", "FUSE major 7; log:\n{log}");
    drop(vmm);
    // virtiofsd leaves by itself once the frontend is gone.
    let t0 = Instant::now();
    while fsd.0.try_wait().unwrap().is_none() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        fsd.0.try_wait().unwrap().is_some(),
        "virtiofsd still running"
    );
}
