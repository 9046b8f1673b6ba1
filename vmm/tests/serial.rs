//! A guest running under real KVM writes to COM1; the text reaches the serial log.

mod common;

use std::time::Duration;

use common::{guest_config, Asm, TempDir};
use husk_vmm::arch::x86_64::cpuid::Accel;
use husk_vmm::builder::launch;
use husk_vmm::vstate::vcpu::VcpuStop;

#[test]
fn guest_output_reaches_serial_log() {
    let dir = TempDir::new("serial");
    let mut asm = Asm::new();
    asm.print("hello from the guest\n").reset();
    let cfg = guest_config(&dir, &asm);
    let mut vmm = launch(&cfg).expect("launch");
    let out = vmm
        .wait(Some(Duration::from_secs(60)))
        .expect("guest did not finish within 60 s");
    assert_eq!(
        out.reason,
        VcpuStop::Reset,
        "console: {:?}",
        out.console_tail
    );
    let log = std::fs::read_to_string(dir.path().join("serial.log")).unwrap();
    assert_eq!(log, "hello from the guest\n");
}

#[test]
fn triple_fault_is_reported_as_crash_with_console_tail() {
    let dir = TempDir::new("crash");
    let mut asm = Asm::new();
    // A zero-limit IDT: the #UD cannot be delivered, nor the #DF: triple fault.
    let idt = asm.data(&[0u8; 10]);
    asm.print("about to crash\n").lidt_ud2(idt);
    let cfg = guest_config(&dir, &asm);
    let mut vmm = launch(&cfg).expect("launch");
    let out = vmm
        .wait(Some(Duration::from_secs(60)))
        .expect("guest did not finish within 60 s");
    assert!(out.is_crash(), "{out:?}");
    assert_eq!(
        out.console_tail.last().map(String::as_str),
        Some("about to crash")
    );
}

#[test]
fn cpuid_hides_what_the_emulator_cannot_run() {
    let dir = TempDir::new("cpuid");
    let mut asm = Asm::new();
    let buf = 0x10_0000;
    asm.cpuid(1, 0, buf)
        .print_hex(buf + 8, 4)
        .print("\n")
        .cpuid(7, 0, buf)
        .print_hex(buf + 4, 4)
        .print("\n")
        .reset();
    let mut cfg = guest_config(&dir, &asm);
    cfg.hide_emulator_unsupported_cpuid = Some(true);
    let mut vmm = launch(&cfg).expect("launch");
    let out = vmm.wait(Some(Duration::from_secs(60))).expect("timeout");
    assert_eq!(out.reason, VcpuStop::Reset);
    let log = std::fs::read_to_string(dir.path().join("serial.log")).unwrap();
    let words: Vec<u32> = log.lines().map(|l| u32::from_le_bytes(hex4(l))).collect();
    let (ecx1, ebx7) = (words[0], words[1]);
    eprintln!("guest cpuid 1.ecx={ecx1:#x} 7.ebx={ebx7:#x}");
    assert_ne!(ecx1 & (1 << 31), 0, "hypervisor bit set");
    if vmm.accel() == Accel::Hardware {
        assert_eq!(ecx1 & (1 << 13), 0, "CX16 hidden");
        assert_eq!(ecx1 & (1 << 26), 0, "XSAVE hidden");
        assert_eq!(ebx7 & (1 << 8), 0, "BMI2 hidden: {ebx7:#x}");
        assert_eq!(ebx7 & (1 << 3), 0, "BMI1 hidden");
    } else {
        // PVM does not intercept CPUID here: the guest sees the host's native leaf 7, which
        // has BMI2 on every host this runs on. If this starts failing, PVM began honouring
        // KVM_SET_CPUID2 and the branch above applies.
        assert_ne!(ebx7 & (1 << 8), 0, "PVM guest CPUID is native: {ebx7:#x}");
    }
}

fn hex4(s: &str) -> [u8; 4] {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    b
}

#[test]
fn two_vcpus_boot_and_stop_cleanly() {
    let dir = TempDir::new("smp");
    let mut asm = Asm::new();
    asm.print("bsp up\n").reset();
    let mut cfg = guest_config(&dir, &asm);
    cfg.vcpus = 2;
    let mut vmm = launch(&cfg).expect("launch");
    // The AP sits in the in-kernel LAPIC waiting for INIT/SIPI; stopping must still join it.
    let out = vmm
        .wait(Some(Duration::from_secs(60)))
        .expect("guest did not finish within 60 s");
    assert_eq!(out.reason, VcpuStop::Reset);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("serial.log")).unwrap(),
        "bsp up\n"
    );
}

#[test]
fn stop_handle_stops_a_spinning_guest() {
    let dir = TempDir::new("stop");
    let kernel = dir.path().join("spin.elf");
    std::fs::write(
        &kernel,
        husk_testkit::guest::elf(husk_testkit::guest::MARK_AND_SPIN),
    )
    .unwrap();
    let mut cfg = guest_config(&dir, &Asm::new());
    cfg.kernel = kernel;
    let mut vmm = launch(&cfg).expect("launch");
    assert!(
        vmm.wait(Some(Duration::from_millis(300))).is_none(),
        "guest spins"
    );
    vmm.stop_handle().request_stop();
    let out = vmm.wait(Some(Duration::from_secs(10))).expect("stopped");
    assert_eq!(out.reason, VcpuStop::Stopped);
    assert_eq!(out.console_tail, vec!["X".to_string()]);
}

/// The guest decides how much it writes; the log on the host stays under its cap and keeps the
/// newest output.
#[test]
fn a_console_flood_stays_under_the_log_cap() {
    let dir = TempDir::new("serial-flood");
    let mut asm = Asm::new();
    let flood = asm.data(&[b'x'; 20_000]);
    asm.out_bytes(common::COM1, flood, 20_000)
        .print("END\n")
        .reset();
    let mut cfg = guest_config(&dir, &asm);
    cfg.serial_log_max_bytes = Some(8192);
    let mut vmm = launch(&cfg).expect("launch");
    let out = vmm
        .wait(Some(Duration::from_secs(120)))
        .expect("guest did not finish within 120 s");
    assert_eq!(out.reason, VcpuStop::Reset);
    let log = dir.path().join("serial.log");
    let current = std::fs::read_to_string(&log).unwrap();
    let old = std::fs::metadata(husk_vmm::console_log::previous_path(&log))
        .map(|m| m.len())
        .unwrap_or(0);
    assert!(current.ends_with("END\n"), "{current:?}");
    assert!(old > 0, "20 KB never rotated an 8 KiB log");
    assert!(
        current.len() as u64 + old <= 8192,
        "{} + {old} bytes",
        current.len()
    );
}
