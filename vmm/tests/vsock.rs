//! A guest vsock driver (assembled here) opens a stream to a host unix-socket listener through
//! the hybrid vsock (`<uds_path>_<port>`) and exchanges bytes both ways.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use common::{guest_config, run_to_reset, Asm, TempDir, VIRTIO_BAR};
use husk_vmm::config::VsockConfig;

const BAR: u64 = VIRTIO_BAR;
const NOTIFY: u64 = BAR + 0x3000;
// Queue 0 (rx) and 1 (tx) rings.
const RX_DESC: u64 = 0x10_0000;
const RX_AVAIL: u64 = 0x10_1000;
const RX_USED: u64 = 0x10_2000;
const TX_DESC: u64 = 0x10_4000;
const TX_AVAIL: u64 = 0x10_5000;
const TX_USED: u64 = 0x10_6000;
const RX_BUF: u64 = 0x11_0000; // 4 x 4 KiB
const TX_BUF: u64 = 0x12_0000; // 4 x 256 B
const HDR: u64 = 44;
const GUEST_CID: u64 = 3;
const GUEST_PORT: u32 = 1024;
const HOST_PORT: u32 = 5000;

/// Writes a vsock header at `at`.
fn header(asm: &mut Asm, at: u64, op: u16, len: u32, flags: u32) {
    asm.store64(at, GUEST_CID)
        .store64(at + 8, 2)
        .store32(at + 16, GUEST_PORT)
        .store32(at + 20, HOST_PORT)
        .store32(at + 24, len)
        .store16(at + 28, 1) // stream
        .store16(at + 30, op)
        .store32(at + 32, flags)
        .store32(at + 36, 65536) // buf_alloc
        .store32(at + 40, 0); // fwd_cnt
}

/// Sends TX packet `i` (header + payload already at TX_BUF + i*256, `len` bytes in total).
fn send(asm: &mut Asm, i: u64, len: u32) {
    let d = TX_DESC + i * 16;
    asm.store64(d, TX_BUF + i * 256)
        .store32(d + 8, len)
        .store32(d + 12, 0)
        .store16(TX_AVAIL + 4 + i * 2, i as u16)
        .store16(TX_AVAIL + 2, i as u16 + 1)
        .store16(NOTIFY + 4, 1);
}

/// Waits for RX packet `n` (0-based) and prints its op, length and payload bytes (hex).
fn receive(asm: &mut Asm, n: u64, payload: usize) {
    let buf = RX_BUF + n * 4096;
    asm.wait16_eq(RX_USED + 2, n as u16 + 1)
        .print("op ")
        .print_hex(buf + 30, 2)
        .print(" len ")
        .print_hex(buf + 24, 4)
        .print(" data ")
        .print_hex(buf + HDR, payload)
        .print("\n");
}

#[test]
fn guest_stream_to_host_listener_both_ways() {
    let dir = TempDir::new("vsock");
    let uds = dir.path().join("v.sock");
    let listener = UnixListener::bind(format!("{}_{HOST_PORT}", uds.display())).unwrap();
    let host = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        s.write_all(b"pong").unwrap();
        // After the guest's RST the muxer closes the stream.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        (b, rest)
    });

    let mut asm = Asm::new();
    asm.virtio_reset_ack();
    asm.store32(BAR + 8, 1)
        .store32(BAR + 0xc, 1)
        .store8(BAR + 0x14, 0xb);
    asm.virtio_queue(0, RX_DESC, RX_AVAIL, RX_USED)
        .virtio_queue(1, TX_DESC, TX_AVAIL, TX_USED);
    asm.store8(BAR + 0x14, 0xf);
    asm.print("cid ").print_hex(BAR + 0x2000, 8).print("\n");
    // Four device-writable RX buffers.
    for i in 0..4u64 {
        let d = RX_DESC + i * 16;
        asm.store64(d, RX_BUF + i * 4096)
            .store32(d + 8, 4096)
            .store32(d + 12, 2)
            .store16(RX_AVAIL + 4 + i * 2, i as u16);
    }
    asm.store16(RX_AVAIL + 2, 4).store16(NOTIFY, 0);
    // REQUEST → RESPONSE.
    header(&mut asm, TX_BUF, 1, 0, 0);
    send(&mut asm, 0, HDR as u32);
    receive(&mut asm, 0, 0);
    // RW "ping" → host; host answers "pong".
    header(&mut asm, TX_BUF + 256, 5, 4, 0);
    asm.store32(TX_BUF + 256 + HDR, u32::from_le_bytes(*b"ping"));
    send(&mut asm, 1, HDR as u32 + 4);
    receive(&mut asm, 1, 4);
    // RST closes the stream.
    header(&mut asm, TX_BUF + 512, 3, 0, 0);
    send(&mut asm, 2, HDR as u32);
    asm.wait16_eq(TX_USED + 2, 3).print("done\n").reset();

    let mut cfg = guest_config(&dir, &asm);
    cfg.devices.vsock = Some(VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: uds.clone(),
    });
    let (vmm, log) = run_to_reset(&dir, &cfg);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines[0], "cid 0300000000000000", "log:\n{log}");
    assert_eq!(
        lines[1], "op 0200 len 00000000 data ",
        "RESPONSE; log:\n{log}"
    );
    assert_eq!(
        lines[2], "op 0500 len 04000000 data 706f6e67",
        "RW 'pong'; log:\n{log}"
    );
    assert_eq!(lines[3], "done");
    drop(vmm);
    let (got, rest) = host.join().unwrap();
    assert_eq!(&got, b"ping");
    assert!(rest.is_empty());
    assert!(!uds.exists(), "hybrid socket removed with the VM");
}
