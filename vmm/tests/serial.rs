//! A guest running under real KVM writes to COM1; the text reaches the serial log.

mod common;

use std::time::Duration;

use common::{guest_config, Asm, TempDir};
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
    assert_eq!(out.reason, VcpuStop::Reset, "console: {:?}", out.console_tail);
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
