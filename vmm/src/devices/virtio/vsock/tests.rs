//! Protocol tests of the muxer with real guest memory, virtio-queue's mock rings and real unix
//! sockets: the "guest" is this test writing descriptor chains.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::muxer::{MuxerConfig, VsockMuxer};
use super::packet::{op, shutdown, Header, HDR_SIZE, HOST_CID, TYPE_STREAM};

const GUEST_CID: u64 = 3;
const QSIZE: u16 = 256;
const MEM_SIZE: usize = 0x100_0000;
const TXQ_BASE: u64 = 0x1_0000;
const RXQ_BASE: u64 = 0x2_0000;
const TX_DATA: u64 = 0x10_0000;
const RX_DATA: u64 = 0x80_0000;
static SEQ: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy)]
enum Layout {
    /// Header and payload in one descriptor (Linux >= 6.2 small packets).
    Single,
    /// 44-byte header descriptor + one payload descriptor (what `VsockPacket` handles).
    HeaderData,
    /// Header split over two descriptors, payload over several small ones.
    Scattered,
}

struct Rig {
    mem: &'static GuestMemoryMmap,
    txq: MockSplitQueue<'static, GuestMemoryMmap>,
    rxq: MockSplitQueue<'static, GuestMemoryMmap>,
    tx: Queue,
    rx: Queue,
    mux: VsockMuxer,
    dir: PathBuf,
    tx_desc: u16,
    rx_desc: u16,
    rx_used_seen: u16,
    /// head index -> (addr, len) of offered single-descriptor RX buffers
    rx_bufs: Vec<(u64, u32)>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rig_with(f: impl FnOnce(&mut MuxerConfig)) -> Rig {
    // Leaked so the mock queues can borrow it for 'static; a few MiB per test.
    let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
    ));
    let txq = MockSplitQueue::create(mem, GuestAddress(TXQ_BASE), QSIZE);
    let rxq = MockSplitQueue::create(mem, GuestAddress(RXQ_BASE), QSIZE);
    let tx = txq.create_queue::<Queue>().unwrap();
    let rx = rxq.create_queue::<Queue>().unwrap();
    let dir = std::env::temp_dir().join(format!(
        "husk-vsock-unit-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = MuxerConfig::new(GUEST_CID, dir.join("v.sock"));
    f(&mut cfg);
    let mux = VsockMuxer::new(cfg).unwrap();
    Rig {
        mem,
        txq,
        rxq,
        tx,
        rx,
        mux,
        dir,
        tx_desc: 0,
        rx_desc: 0,
        rx_used_seen: 0,
        rx_bufs: vec![(0, 0); QSIZE as usize],
    }
}

fn rig() -> Rig {
    rig_with(|_| {})
}

fn hdr(op_: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op: op_,
        buf_alloc: 256 * 1024,
        ..Default::default()
    }
}

impl Rig {
    fn uds(&self) -> PathBuf {
        self.dir.join("v.sock")
    }

    /// Queues one raw chain on TX (descriptors given as (addr, len, write-only)).
    fn push_tx_raw(&mut self, descs: &[(u64, u32, bool)]) {
        if self.tx_desc as usize + descs.len() > QSIZE as usize {
            // Every earlier chain has been consumed: reuse the table from the start.
            self.tx_desc = 0;
        }
        let base = self.tx_desc;
        let mut raw = Vec::new();
        for (i, &(addr, len, w)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = if last {
                0
            } else {
                (base + i as u16 + 1) % QSIZE
            };
            raw.push(RawDescriptor::from(SplitDescriptor::new(
                addr, len, flags, next,
            )));
        }
        assert!(
            base as usize + raw.len() <= QSIZE as usize,
            "test uses too many TX descriptors"
        );
        self.txq.add_desc_chains(&raw, base).unwrap();
        self.tx_desc = (base + raw.len() as u16) % QSIZE;
    }

    /// Puts a packet on TX in the given layout and lets the muxer process the queue.
    fn send(&mut self, mut h: Header, data: &[u8], layout: Layout) {
        h.len = data.len() as u32;
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(data);
        // Fresh area per packet (the rig is reset before TX_DATA runs into RX_DATA).
        let addr = TX_DATA + u64::from(self.tx_desc) * 0x1000 % (RX_DATA - TX_DATA - 0x2_0000);
        self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        let descs: Vec<(u64, u32, bool)> = match layout {
            Layout::Single => vec![(addr, bytes.len() as u32, false)],
            Layout::HeaderData if data.is_empty() => vec![(addr, HDR_SIZE as u32, false)],
            Layout::HeaderData => vec![
                (addr, HDR_SIZE as u32, false),
                (addr + HDR_SIZE as u64, data.len() as u32, false),
            ],
            Layout::Scattered => {
                let mut v = vec![
                    (addr, 20, false),
                    (addr + 20, (HDR_SIZE - 20) as u32, false),
                ];
                let mut off = HDR_SIZE;
                let piece = (data.len() / 5).max(1);
                while off < bytes.len() {
                    let n = piece.min(bytes.len() - off);
                    v.push((addr + off as u64, n as u32, false));
                    off += n;
                }
                v
            }
        };
        self.push_tx_raw(&descs);
        self.process_tx();
    }

    fn process_tx(&mut self) {
        self.mux.process_tx_queue(self.mem, &mut self.tx).unwrap();
    }

    /// Offers `n` single-descriptor RX buffers of `size` bytes.
    fn offer_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let idx = self.rx_desc;
            let addr = RX_DATA + u64::from(idx) * 0x1_0000 % (MEM_SIZE as u64 - RX_DATA - 0x1_0000);
            self.rx_bufs[idx as usize] = (addr, size);
            let d = RawDescriptor::from(SplitDescriptor::new(
                addr,
                size,
                VRING_DESC_F_WRITE as u16,
                0,
            ));
            self.rxq.add_desc_chains(&[d], idx).unwrap();
            self.rx_desc = (idx + 1) % QSIZE;
        }
    }

    /// Polls and expects exactly one packet for the guest, of type `op_`; returns it.
    #[track_caller]
    fn poll_one(&mut self, op_: u16) -> (Header, Vec<u8>) {
        let mut p = self.poll();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0.op, op_);
        p.remove(0)
    }

    /// Runs host events and RX; returns the packets the guest received.
    fn poll(&mut self) -> Vec<(Header, Vec<u8>)> {
        self.mux.process_host_events();
        self.mux.process_rx_queue(self.mem, &mut self.rx).unwrap();
        self.take_rx()
    }

    fn take_rx(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let used_idx = self.rxq.used().idx().load();
        while self.rx_used_seen != used_idx {
            let e = self
                .rxq
                .used()
                .ring()
                .ref_at((self.rx_used_seen % QSIZE) as usize)
                .unwrap()
                .load();
            self.rx_used_seen = self.rx_used_seen.wrapping_add(1);
            let (addr, _) = self.rx_bufs[e.id() as usize];
            let len = e.len() as usize;
            if len == 0 {
                out.push((Header::default(), Vec::new()));
                continue;
            }
            let mut b = vec![0u8; len];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            let h = Header::from_bytes(b[..HDR_SIZE].try_into().unwrap());
            assert_eq!(
                h.len as usize,
                len - HDR_SIZE,
                "used len matches header len"
            );
            out.push((h, b[HDR_SIZE..].to_vec()));
        }
        out
    }

    /// Host client connects; returns the client and the guest-side view (host port).
    fn host_connect(&mut self, guest_port: u32) -> (UnixStream, u32) {
        let mut c = UnixStream::connect(self.uds()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        self.offer_rx(1, 4096);
        let p = self.poll();
        assert_eq!(p.len(), 1);
        let (h, _) = &p[0];
        assert_eq!(h.op, op::REQUEST);
        assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, GUEST_CID));
        assert_eq!(h.dst_port, guest_port);
        assert_eq!(h.type_, TYPE_STREAM);
        assert!(h.src_port >= 1 << 30);
        assert_eq!(h.buf_alloc, self.mux.config().conn_buf_size);
        let hp = h.src_port;
        let mut resp = hdr(op::RESPONSE, guest_port, hp);
        resp.buf_alloc = 64 * 1024;
        self.send(resp, &[], Layout::HeaderData);
        let mut line = [0u8; 64];
        let n = c.read(&mut line).unwrap();
        assert_eq!(&line[..n], format!("OK {hp}\n").as_bytes());
        (c, hp)
    }
}

fn read_n(c: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    c.read_exact(&mut v).unwrap();
    v
}

#[test]
fn host_initiated_handshake_and_data_both_ways() {
    let mut r = rig();
    let (mut c, hp) = r.host_connect(1024);
    c.write_all(b"ping").unwrap();
    r.offer_rx(4, 4096);
    let p = r.poll_one(op::RW);
    assert_eq!(p.1, b"ping");
    assert_eq!((p.0.src_port, p.0.dst_port), (hp, 1024));
    r.send(hdr(op::RW, 1024, hp), b"pong", Layout::HeaderData);
    assert_eq!(read_n(&mut c, 4), b"pong");
    assert_eq!(r.mux.connection_count(), 1);
}

#[test]
fn every_tx_layout_delivers_the_exact_payload() {
    let mut r = rig();
    let (mut c, hp) = r.host_connect(1024);
    for (i, layout) in [Layout::Single, Layout::HeaderData, Layout::Scattered]
        .into_iter()
        .enumerate()
    {
        let data: Vec<u8> = (0..60_000u32).map(|x| (x * 7 + i as u32) as u8).collect();
        r.send(hdr(op::RW, 1024, hp), &data, layout);
        assert_eq!(read_n(&mut c, data.len()), data, "layout {i}");
    }
}

#[test]
fn rx_packet_spread_over_several_descriptors() {
    let mut r = rig();
    let (mut c, hp) = r.host_connect(1024);
    c.write_all(&[0xab; 100]).unwrap();
    // One chain: 10-byte piece, 50-byte piece, 100-byte piece.
    let idx = r.rx_desc;
    let base = RX_DATA + 0x40_0000;
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(
            base,
            10,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            idx + 1,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            base + 10,
            50,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            idx + 2,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            base + 60,
            100,
            VRING_DESC_F_WRITE as u16,
            0,
        )),
    ];
    r.rxq.add_desc_chains(&descs, idx).unwrap();
    r.rx_bufs[idx as usize] = (base, 160);
    r.rx_desc += 3;
    let p = r.poll_one(op::RW);
    assert_eq!(p.0.dst_port, 1024);
    assert_eq!(p.0.src_port, hp);
    assert_eq!(p.1, vec![0xab; 100]);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut r = rig();
    let (mut c, hp) = r.host_connect(1024);
    // The guest announces an 8 KiB buffer.
    let mut cu = hdr(op::CREDIT_UPDATE, 1024, hp);
    cu.buf_alloc = 8192;
    r.send(cu, &[], Layout::HeaderData);
    c.write_all(&vec![1u8; 20_000]).unwrap();
    r.offer_rx(32, 4096);
    let p = r.poll();
    let data: usize = p
        .iter()
        .filter(|(h, _)| h.op == op::RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(data, 8192, "sent exactly the credit");
    assert_eq!(
        p.last().unwrap().0.op,
        op::CREDIT_REQUEST,
        "asks for credit once"
    );
    assert!(
        r.poll().is_empty(),
        "nothing more without credit, and no spinning"
    );
    // The guest consumed 8 KiB.
    let mut cu = hdr(op::CREDIT_UPDATE, 1024, hp);
    cu.buf_alloc = 8192;
    cu.fwd_cnt = 8192;
    r.send(cu, &[], Layout::HeaderData);
    let p = r.poll();
    let data: usize = p
        .iter()
        .filter(|(h, _)| h.op == op::RW)
        .map(|(_, d)| d.len())
        .sum();
    assert_eq!(data, 8192);
}

#[test]
fn guest_credit_request_gets_update_and_packets_carry_fwd_cnt() {
    let mut r = rig();
    let (mut c, hp) = r.host_connect(1024);
    r.send(hdr(op::RW, 1024, hp), &[5u8; 1000], Layout::Single);
    assert_eq!(read_n(&mut c, 1000), vec![5u8; 1000]);
    r.send(hdr(op::CREDIT_REQUEST, 1024, hp), &[], Layout::HeaderData);
    r.offer_rx(2, 4096);
    let p = r.poll_one(op::CREDIT_UPDATE);
    assert_eq!(p.0.fwd_cnt, 1000);
}

#[test]
fn blocked_host_reader_buffers_then_flushes_and_updates_credit() {
    let mut r = rig_with(|c| c.conn_buf_size = 256 * 1024);
    let (mut c, hp) = r.host_connect(1024);
    // 300 kB while the client does not read: more than the host socket takes, less than the
    // 256 KiB credit plus what the socket takes.
    let chunk = vec![9u8; 60_000];
    let sent = 5 * chunk.len();
    for _ in 0..5 {
        r.send(hdr(op::RW, 1024, hp), &chunk, Layout::HeaderData);
    }
    assert_eq!(r.mux.connection_count(), 1);
    r.offer_rx(16, 4096);
    let mut updates = r.poll();
    // Now drain the host side; EPOLLOUT must flush everything without further guest action.
    let mut got = 0usize;
    let mut buf = vec![0u8; 65536];
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    while let Ok(n) = c.read(&mut buf) {
        assert!(n > 0 && buf[..n].iter().all(|&b| b == 9));
        got += n;
        updates.extend(r.poll());
    }
    assert_eq!(got, sent, "all guest bytes reached the host");
    updates.extend(r.poll());
    let last_cu = updates
        .iter()
        .filter(|(h, _)| h.op == op::CREDIT_UPDATE)
        .map(|(h, _)| h.fwd_cnt)
        .max();
    assert!(
        last_cu.is_some(),
        "unsolicited credit update once the guest's view ran low"
    );
    r.send(hdr(op::CREDIT_REQUEST, 1024, hp), &[], Layout::HeaderData);
    let p = r.poll_one(op::CREDIT_UPDATE);
    assert_eq!(
        p.0.fwd_cnt as usize, sent,
        "fwd_cnt counts bytes the host took"
    );
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mut r = rig_with(|c| c.conn_buf_size = 4096);
    let (c, hp) = r.host_connect(1024);
    let chunk = vec![1u8; 60_000];
    r.offer_rx(8, 4096);
    let mut reset = false;
    for _ in 0..100 {
        r.send(hdr(op::RW, 1024, hp), &chunk, Layout::HeaderData);
        if r.poll().iter().any(|(h, _)| h.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "credit overrun must reset the connection");
    assert_eq!(r.mux.connection_count(), 0);
    drop(c);
}

#[test]
fn guest_initiated_connect_and_refusal() {
    let mut r = rig();
    let l = UnixListener::bind(format!("{}_5000", r.uds().display())).unwrap();
    r.send(hdr(op::REQUEST, 40000, 5000), &[], Layout::HeaderData);
    r.offer_rx(4, 4096);
    let p = r.poll_one(op::RESPONSE);
    assert_eq!((p.0.src_port, p.0.dst_port), (5000, 40000));
    let (mut s, _) = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    r.send(hdr(op::RW, 40000, 5000), b"hello host", Layout::Single);
    assert_eq!(read_n(&mut s, 10), b"hello host");
    s.write_all(b"hello guest").unwrap();
    let p = r.poll();
    assert_eq!(p[0].1, b"hello guest");
    // Nobody at port 5001: RST.
    r.send(hdr(op::REQUEST, 40001, 5001), &[], Layout::HeaderData);
    let p = r.poll_one(op::RST);
    assert_eq!((p.0.src_port, p.0.dst_port), (5001, 40001));
}

#[test]
fn half_close_in_both_directions_then_full_close() {
    let mut r = rig();
    let (mut c, hp) = r.host_connect(1024);
    r.offer_rx(8, 4096);
    // Host stops sending: guest gets SHUTDOWN SEND.
    c.shutdown(Shutdown::Write).unwrap();
    let p = r.poll_one(op::SHUTDOWN);
    assert_eq!(p.0.flags, shutdown::SEND);
    // The guest can still send.
    r.send(hdr(op::RW, 1024, hp), b"still here", Layout::HeaderData);
    assert_eq!(read_n(&mut c, 10), b"still here");
    // Guest stops sending: the host sees EOF.
    let mut sh = hdr(op::SHUTDOWN, 1024, hp);
    sh.flags = shutdown::SEND;
    r.send(sh, &[], Layout::HeaderData);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(r.mux.connection_count(), 1);
    // Full shutdown from the guest: we answer RST and drop the connection.
    sh.flags = shutdown::SEND | shutdown::RCV;
    r.send(sh, &[], Layout::HeaderData);
    r.poll_one(op::RST);
    assert_eq!(r.mux.connection_count(), 0);
}

#[test]
fn guest_rst_closes_host_socket() {
    let mut r = rig();
    let (mut c, hp) = r.host_connect(1024);
    r.send(hdr(op::RST, 1024, hp), &[], Layout::HeaderData);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert_eq!(r.mux.connection_count(), 0);
    // Packets for the dead connection get RST, an RST gets nothing.
    r.offer_rx(4, 4096);
    r.send(hdr(op::RW, 1024, hp), b"late", Layout::HeaderData);
    r.send(hdr(op::RST, 1024, hp), &[], Layout::HeaderData);
    r.poll_one(op::RST);
}

#[test]
fn refused_or_unanswered_connect_closes_client() {
    let mut r = rig_with(|c| c.connect_timeout = Duration::from_millis(200));
    // Refused by the guest.
    let mut c = UnixStream::connect(r.uds()).unwrap();
    c.write_all(b"CONNECT 7\n").unwrap();
    r.offer_rx(4, 4096);
    let p = r.poll();
    let hp = p[0].0.src_port;
    r.send(hdr(op::RST, 7, hp), &[], Layout::HeaderData);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "no OK for a refused connect");
    // Not answered at all: closed at the timeout, and the guest is told.
    let mut c = UnixStream::connect(r.uds()).unwrap();
    c.write_all(b"CONNECT 8\n").unwrap();
    let p = r.poll();
    assert_eq!(p[0].0.op, op::REQUEST);
    std::thread::sleep(Duration::from_millis(400));
    r.poll_one(op::RST);
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    // Garbage instead of CONNECT.
    let mut c = UnixStream::connect(r.uds()).unwrap();
    c.write_all(b"HELLO\n").unwrap();
    r.poll();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(r.mux.connection_count(), 0);
}

#[test]
fn connection_limit_is_enforced() {
    let mut r = rig_with(|c| c.max_connections = 2);
    let (_a, _) = r.host_connect(1);
    let (_b, _) = r.host_connect(2);
    let mut c = UnixStream::connect(r.uds()).unwrap();
    c.write_all(b"CONNECT 3\n").unwrap();
    r.offer_rx(4, 4096);
    assert!(r.poll().is_empty());
    // Closed unread: EOF or a reset, never an answer.
    let mut rest = Vec::new();
    assert!(c.read_to_end(&mut rest).map_or(true, |n| n == 0));
    let _l = UnixListener::bind(format!("{}_6000", r.uds().display())).unwrap();
    r.send(hdr(op::REQUEST, 41000, 6000), &[], Layout::HeaderData);
    r.poll_one(op::RST);
    assert_eq!(r.mux.connection_count(), 2);
}

#[test]
fn local_ports_are_unique() {
    let mut r = rig();
    let (_a, p1) = r.host_connect(1024);
    let (_b, p2) = r.host_connect(1024);
    assert_ne!(p1, p2);
}

#[test]
fn malformed_tx_chains_are_consumed_without_effect() {
    let mut r = rig();
    let (mut c, hp) = r.host_connect(1024);
    r.offer_rx(16, 4096);
    let used_before = r.txq.used().idx().load();
    // Descriptor outside guest memory.
    r.push_tx_raw(&[(MEM_SIZE as u64 + 0x1000, 44, false)]);
    // Address overflow.
    r.push_tx_raw(&[(u64::MAX - 10, 44, false)]);
    // Shorter than a header.
    r.push_tx_raw(&[(TX_DATA, 20, false)]);
    // Header announcing more payload than present / more than allowed.
    let mut h = hdr(op::RW, 1024, hp);
    h.len = 1000;
    r.mem
        .write_slice(&h.to_bytes(), GuestAddress(TX_DATA))
        .unwrap();
    r.push_tx_raw(&[(TX_DATA, 44, false), (TX_DATA + 44, 10, false)]);
    h.len = 10 * 1024 * 1024;
    r.mem
        .write_slice(&h.to_bytes(), GuestAddress(TX_DATA + 0x1000))
        .unwrap();
    r.push_tx_raw(&[(TX_DATA + 0x1000, 44, false)]);
    // Header fine, payload descriptor outside memory.
    h.len = 100;
    r.mem
        .write_slice(&h.to_bytes(), GuestAddress(TX_DATA + 0x2000))
        .unwrap();
    r.push_tx_raw(&[
        (TX_DATA + 0x2000, 44, false),
        (MEM_SIZE as u64 - 50, 100, false),
    ]);
    r.process_tx();
    let used_after = r.txq.used().idx().load();
    assert_eq!(
        used_after.wrapping_sub(used_before),
        6,
        "every chain returned"
    );
    assert!(r.poll().is_empty(), "nothing reached the guest");
    // The connection still works.
    r.send(hdr(op::RW, 1024, hp), b"ok", Layout::HeaderData);
    assert_eq!(read_n(&mut c, 2), b"ok");
}

#[test]
fn bad_addresses_and_types_get_rst() {
    let mut r = rig();
    r.offer_rx(8, 4096);
    let mut h = hdr(op::REQUEST, 1, 2);
    h.dst_cid = 7;
    r.send(h, &[], Layout::HeaderData);
    let mut h = hdr(op::REQUEST, 1, 2);
    h.src_cid = 9;
    r.send(h, &[], Layout::HeaderData);
    let mut h = hdr(op::REQUEST, 1, 2);
    h.type_ = 2;
    r.send(h, &[], Layout::HeaderData);
    // Unknown op on an unknown connection.
    r.send(hdr(99, 1, 2), &[], Layout::HeaderData);
    // RST with a bad address: never answered.
    let mut h = hdr(op::RST, 1, 2);
    h.dst_cid = 7;
    r.send(h, &[], Layout::HeaderData);
    let p = r.poll();
    assert_eq!(p.len(), 4);
    assert!(p
        .iter()
        .all(|(h, _)| h.op == op::RST && h.dst_cid == GUEST_CID));
    assert_eq!(r.mux.connection_count(), 0);
}

#[test]
fn unexpected_ops_reset_the_connection() {
    let mut r = rig();
    let (mut c, hp) = r.host_connect(1024);
    r.offer_rx(4, 4096);
    // A second REQUEST on a live connection.
    r.send(hdr(op::REQUEST, 1024, hp), &[], Layout::HeaderData);
    let p = r.poll();
    assert_eq!(p[0].0.op, op::RST);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert_eq!(r.mux.connection_count(), 0);
}

#[test]
fn bad_rx_chain_does_not_lose_the_packet() {
    let mut r = rig();
    let mut c = UnixStream::connect(r.uds()).unwrap();
    c.write_all(b"CONNECT 1024\n").unwrap();
    // First RX buffer points outside memory, second is too small, third is fine.
    let idx = r.rx_desc;
    let bad = [
        RawDescriptor::from(SplitDescriptor::new(
            MEM_SIZE as u64 + 0x10000,
            4096,
            VRING_DESC_F_WRITE as u16,
            0,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            RX_DATA,
            16,
            VRING_DESC_F_WRITE as u16,
            0,
        )),
    ];
    r.rxq.add_desc_chains(&bad, idx).unwrap();
    r.rx_desc += 2;
    r.rx_bufs[idx as usize] = (0, 0);
    r.rx_bufs[idx as usize + 1] = (RX_DATA, 16);
    r.offer_rx(1, 4096);
    let p = r.poll();
    assert_eq!(p.len(), 3);
    assert_eq!(p[0].1.len() + p[1].1.len(), 0, "bad chains returned empty");
    assert_eq!(p[2].0.op, op::REQUEST);
}

#[test]
fn stale_listener_socket_is_replaced_and_live_one_refused() {
    let dir = std::env::temp_dir().join(format!("husk-vsock-unit-stale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("v.sock");
    drop(UnixListener::bind(&path).unwrap());
    let m = VsockMuxer::new(MuxerConfig::new(GUEST_CID, &path)).unwrap();
    assert!(VsockMuxer::new(MuxerConfig::new(GUEST_CID, &path)).is_err());
    drop(m);
    assert!(!path.exists(), "muxer removes its socket");
    assert!(
        VsockMuxer::new(MuxerConfig::new(2, &path)).is_err(),
        "CID 2 is the host"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reset_forgets_connections() {
    let mut r = rig();
    let (mut c, hp) = r.host_connect(1024);
    r.mux.reset();
    assert_eq!(r.mux.connection_count(), 0);
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    r.offer_rx(2, 4096);
    r.send(hdr(op::RW, 1024, hp), b"x", Layout::HeaderData);
    assert_eq!(r.poll()[0].0.op, op::RST);
    // The listener still works.
    let (_c2, _) = r.host_connect(1024);
}

/// A guest that writes an avail index more than a queue's worth ahead of
/// the device (issue 14): the muxer must fail the queue, on TX and on RX,
/// instead of looping forever over a ring it cannot read.
#[test]
fn corrupted_avail_index_fails_the_device_instead_of_spinning() {
    let t = std::time::Instant::now();
    // RX: a connect to a port nobody serves leaves an RST pending for the
    // guest, then the RX ring's index jumps past the queue size.
    let mut r = rig();
    r.send(hdr(op::REQUEST, 40001, 5001), &[], Layout::HeaderData);
    assert!(r.mux.has_pending_rx());
    r.rxq.avail().idx().store(QSIZE + 7);
    let e = r.mux.process_rx_queue(r.mem, &mut r.rx).unwrap_err();
    assert!(e.to_string().contains("virtqueue"), "{e}");
    // TX: one real chain, then an index far past it.
    let mut r = rig();
    r.push_tx_raw(&[(TX_DATA, HDR_SIZE as u32, false)]);
    r.txq.avail().idx().store(QSIZE * 3);
    let e = r.mux.process_tx_queue(r.mem, &mut r.tx).unwrap_err();
    assert!(e.to_string().contains("virtqueue"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}
