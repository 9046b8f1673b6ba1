//! A guest virtio-net driver (assembled here) sends an Ethernet frame through the tap to a
//! host packet socket and receives the host's answer.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{guest_config, Asm, TempDir, VIRTIO_BAR};
use husk_vmm::builder::Vmm;
use husk_vmm::config::NetConfig;
use husk_vmm::vstate::vcpu::VcpuStop;

const BAR: u64 = VIRTIO_BAR;
const NOTIFY: u64 = BAR + 0x3000;
const RX_DESC: u64 = 0x10_0000;
const RX_AVAIL: u64 = 0x10_1000;
const RX_USED: u64 = 0x10_2000;
const TX_DESC: u64 = 0x10_4000;
const TX_AVAIL: u64 = 0x10_5000;
const TX_USED: u64 = 0x10_6000;
const RX_BUF: u64 = 0x11_0000;
const TX_BUF: u64 = 0x12_0000;
const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x01];

struct PacketSocket(i32);

impl PacketSocket {
    fn bind(ifname: &str) -> PacketSocket {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: valid C string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {ifname}");
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = index as i32;
        // SAFETY: sa is a properly sized sockaddr_ll.
        let r = unsafe {
            libc::bind(
                fd,
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: valid timeval for SO_RCVTIMEO.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        PacketSocket(fd)
    }

    fn recv(&self) -> Option<Vec<u8>> {
        let mut b = vec![0u8; 2048];
        // SAFETY: b is a valid writable buffer of its length.
        let n = unsafe { libc::recv(self.0, b.as_mut_ptr() as *mut libc::c_void, b.len(), 0) };
        (n > 0).then(|| {
            b.truncate(n as usize);
            b
        })
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: frame is a valid readable buffer of its length.
        let n = unsafe {
            libc::send(
                self.0,
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
            )
        };
        assert_eq!(
            n as usize,
            frame.len(),
            "send: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

#[test]
fn guest_frames_cross_the_tap_both_ways() {
    let dir = TempDir::new("net");
    let tap = format!("hsknet{}", std::process::id() % 100_000);
    let payload_out = b"husk guest to host..............";
    let payload_in = b"husk host to guest..............";

    let mut asm = Asm::new();
    asm.virtio_reset_ack();
    asm.print("mac ").print_hex(BAR + 0x2000, 6).print("\n");
    asm.store32(BAR + 8, 0)
        .store32(BAR + 0xc, 1 << 5)
        .store32(BAR + 8, 1)
        .store32(BAR + 0xc, 1)
        .store8(BAR + 0x14, 0xb);
    asm.virtio_queue(0, RX_DESC, RX_AVAIL, RX_USED)
        .virtio_queue(1, TX_DESC, TX_AVAIL, TX_USED);
    asm.store8(BAR + 0x14, 0xf);
    for i in 0..2u64 {
        let d = RX_DESC + i * 16;
        asm.store64(d, RX_BUF + i * 2048)
            .store32(d + 8, 2048)
            .store32(d + 12, 2)
            .store16(RX_AVAIL + 4 + i * 2, i as u16);
    }
    asm.store16(RX_AVAIL + 2, 2).store16(NOTIFY, 0);
    // virtio_net_hdr_v1 (12 zero bytes) + Ethernet frame.
    let mut frame = vec![0u8; 12];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&GUEST_MAC);
    frame.extend_from_slice(&ETHERTYPE.to_be_bytes());
    frame.extend_from_slice(payload_out);
    for (i, chunk) in frame.chunks(4).enumerate() {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        asm.store32(TX_BUF + 4 * i as u64, u32::from_le_bytes(w));
    }
    asm.store64(TX_DESC, TX_BUF)
        .store32(TX_DESC + 8, frame.len() as u32)
        .store32(TX_DESC + 12, 0)
        .store16(TX_AVAIL + 4, 0)
        .store16(TX_AVAIL + 2, 1)
        .store16(NOTIFY + 4, 1)
        .wait16_eq(TX_USED + 2, 1)
        .print("sent\n")
        .wait16_eq(RX_USED + 2, 1)
        .print("rx len ")
        .print_hex(RX_USED + 8, 4)
        .print(" type ")
        .print_hex(RX_BUF + 12 + 12, 2)
        .print(" data ")
        .print_hex(RX_BUF + 12 + 14, payload_in.len())
        .print("\n")
        .reset();

    let mut cfg = guest_config(&dir, &asm);
    cfg.devices.net = vec![NetConfig {
        tap: tap.clone(),
        mac: None,
    }];
    let mut vmm = Vmm::build(&cfg).expect("build");
    // Keep the host's own IPv6 chatter off the wire the test reads.
    std::fs::write(format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6"), "1").unwrap();
    let up = Command::new("ip")
        .args(["link", "set", "dev", &tap, "up"])
        .status()
        .unwrap();
    assert!(up.success());
    let sock = PacketSocket::bind(&tap);
    vmm.start().unwrap();

    let t0 = Instant::now();
    let got = loop {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no frame from the guest"
        );
        if let Some(f) = sock.recv() {
            if f.len() >= 14 && f[12..14] == ETHERTYPE.to_be_bytes() {
                break f;
            }
        }
    };
    assert_eq!(&got[0..6], &[0xff; 6]);
    assert_eq!(&got[6..12], &GUEST_MAC);
    assert_eq!(&got[14..14 + payload_out.len()], payload_out);

    let mut reply = GUEST_MAC.to_vec();
    reply.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    reply.extend_from_slice(&ETHERTYPE.to_be_bytes());
    reply.extend_from_slice(payload_in);
    sock.send(&reply);

    let out = vmm
        .wait(Some(Duration::from_secs(60)))
        .expect("guest did not finish");
    let log = std::fs::read_to_string(dir.path().join("serial.log")).unwrap();
    assert_eq!(out.reason, VcpuStop::Reset, "log:\n{log}");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines[0], "mac 525400000001");
    assert_eq!(lines[1], "sent");
    let hex: String = payload_in.iter().map(|b| format!("{b:02x}")).collect();
    let len = (12 + reply.len()) as u32;
    let len_hex: String = len
        .to_le_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        lines[2],
        format!("rx len {len_hex} type 88b5 data {hex}"),
        "log:\n{log}"
    );
}
