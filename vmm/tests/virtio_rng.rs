//! A guest virtio driver (assembled here) finds virtio-rng on the PCI bus through port I/O,
//! negotiates features, sets up a split queue, gets random bytes; then feeds the device
//! malformed descriptor chains (outside guest memory, read-only) which are refused while the
//! device keeps serving, and finally a corrupt avail index, which fails only that device.

mod common;

use common::{guest_config, run_to_reset, Asm, TempDir, VIRTIO_BAR};

const BAR: u64 = VIRTIO_BAR; // slot 1, BAR size 0x4000
const DESC: u64 = 0x10_0000;
const AVAIL: u64 = 0x10_1000;
const USED: u64 = 0x10_2000;
const BUF: u64 = 0x10_3000;
const SCRATCH: u64 = 0x10_4000;
const VIRTQ_DESC_F_WRITE: u16 = 2;

fn desc(asm: &mut Asm, i: u64, addr: u64, len: u32, flags: u16) {
    let d = DESC + i * 16;
    asm.store64(d, addr)
        .store32(d + 8, len)
        .store16(d + 12, flags)
        .store16(d + 14, 0);
}

/// Posts descriptor `i` as avail entry `i`, kicks queue 0, waits for used idx i+1, prints
/// the used length as hex.
fn submit(asm: &mut Asm, i: u64) {
    asm.store16(AVAIL + 4 + i * 2, i as u16)
        .store16(AVAIL + 2, i as u16 + 1)
        .store16(BAR + 0x3000, 0)
        .wait16_eq(USED + 2, i as u16 + 1)
        .print_hex(USED + 4 + i * 8 + 4, 4)
        .print("\n");
}

#[test]
fn guest_driver_uses_virtio_rng_and_malformed_chains_are_rejected() {
    let dir = TempDir::new("rng");
    let mut asm = Asm::new();
    // PCI: vendor/device of 00:01.0, then its BAR0.
    asm.out32(0xcf8, 0x8000_0800)
        .in32(0xcfc)
        .store_eax(SCRATCH)
        .print("id ")
        .print_hex(SCRATCH, 4)
        .print("\n");
    asm.out32(0xcf8, 0x8000_0810)
        .in32(0xcfc)
        .store_eax(SCRATCH)
        .print("bar ")
        .print_hex(SCRATCH, 4)
        .print("\n");
    // Device initialisation (virtio 1.x 3.1.1).
    asm.virtio_reset_ack();
    asm.store32(BAR, 1)
        .load32(BAR + 4)
        .store_eax(SCRATCH)
        .print("f1 ")
        .print_hex(SCRATCH, 4)
        .print("\n");
    asm.store32(BAR + 8, 0)
        .store32(BAR + 0xc, 0)
        .store32(BAR + 8, 1)
        .store32(BAR + 0xc, 1)
        .store8(BAR + 0x14, 0xb)
        .print("st ")
        .print_hex(BAR + 0x14, 1)
        .print("\n");
    asm.virtio_queue(0, DESC, AVAIL, USED)
        .store8(BAR + 0x14, 0xf);
    // 1: a good request.
    desc(&mut asm, 0, BUF, 16, VIRTQ_DESC_F_WRITE);
    submit(&mut asm, 0);
    asm.print("rnd ").print_hex(BUF, 16).print("\n");
    // 2: buffer outside guest memory (inside the MMIO hole).
    desc(&mut asm, 1, 0xf000_0000, 16, VIRTQ_DESC_F_WRITE);
    submit(&mut asm, 1);
    // 3: buffer straddling the end of RAM (64 MiB).
    desc(&mut asm, 2, 0x3ff_fff0, 0x100, VIRTQ_DESC_F_WRITE);
    submit(&mut asm, 2);
    // 4: read-only buffer.
    desc(&mut asm, 3, BUF + 0x100, 16, 0);
    submit(&mut asm, 3);
    // 5: the device still serves.
    desc(&mut asm, 4, BUF + 0x200, 32, VIRTQ_DESC_F_WRITE);
    submit(&mut asm, 4);
    // 6: an avail index far beyond the queue size: the queue is malformed.
    asm.store16(AVAIL + 2, 5 + 100)
        .store16(BAR + 0x3000, 0)
        .wait8_any(BAR + 0x14, 0x40)
        .print("broken ")
        .print_hex(BAR + 0x14, 1)
        .print("\n");
    asm.print("done\n").reset();

    let mut cfg = guest_config(&dir, &asm);
    cfg.devices.rng = true;
    let (vmm, log) = run_to_reset(&dir, &cfg);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(
        lines[0], "id f41a4410",
        "vendor 1af4, device 1044 (modern rng)"
    );
    assert_eq!(lines[1], "bar 044000c0", "64-bit BAR at 0xc0004000");
    assert_eq!(lines[2], "f1 01000000", "VIRTIO_F_VERSION_1 offered");
    assert_eq!(lines[3], "st 0b", "FEATURES_OK accepted");
    assert_eq!(lines[4], "10000000", "16 bytes returned");
    let rnd = lines[5].strip_prefix("rnd ").unwrap();
    assert_eq!(rnd.len(), 32);
    assert_ne!(rnd, "00000000000000000000000000000000");
    assert_eq!(lines[6], "00000000", "outside RAM refused");
    assert_eq!(lines[7], "00000000", "straddling end of RAM refused");
    assert_eq!(lines[8], "00000000", "read-only buffer refused");
    assert_eq!(lines[9], "20000000", "device keeps serving");
    assert_eq!(
        lines[10], "broken 4f",
        "DEVICE_NEEDS_RESET after a corrupt avail index"
    );
    assert_eq!(lines[11], "done");
    assert_eq!(vmm.rng_rejected(), 3);
}
