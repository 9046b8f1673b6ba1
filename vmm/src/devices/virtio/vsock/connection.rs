//! One connection of the hybrid-vsock muxer (as Firecracker's `vsock/csm/connection.rs`): its
//! state machine, its credit accounting and the I/O on its host socket.
//!
//! The muxer owns what spans connections (the lookup tables, the epoll, the timer, the RX
//! round-robin, local port allocation) and is the only one that ends a connection; the methods
//! here say what the muxer has to do next instead of doing it.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use tracing::debug;

use super::muxer::MuxerConfig;
use super::packet::{op, shutdown, Header, HOST_CID, TYPE_STREAM};

pub(super) const SHUT_BOTH: u32 = shutdown::RCV | shutdown::SEND;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct ConnKey {
    pub(super) host_port: u32,
    pub(super) guest_port: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Host-initiated, REQUEST queued or sent, waiting for RESPONSE.
    Connecting,
    Established,
    /// The guest reset the connection; only flushing buffered bytes to the host remains.
    Draining,
}

pub(super) struct Conn {
    pub(super) key: ConnKey,
    pub(super) stream: UnixStream,
    pub(super) state: State,
    pub(super) host_initiated: bool,
    pub(super) deadline: Option<Instant>,
    // guest -> host
    pub(super) out_ctrl: Vec<u8>,
    pub(super) out_buf: VecDeque<u8>,
    pub(super) rx_cnt: Wrapping<u32>,
    pub(super) fwd_cnt: Wrapping<u32>,
    pub(super) fwd_cnt_sent: Wrapping<u32>,
    pub(super) peer_shut: u32,
    pub(super) host_wr_shut: bool,
    // host -> guest
    pub(super) peer_buf_alloc: u32,
    pub(super) peer_fwd_cnt: Wrapping<u32>,
    pub(super) tx_cnt: Wrapping<u32>,
    pub(super) host_readable: bool,
    pub(super) host_eof: bool,
    pub(super) host_hup: bool,
    pub(super) credit_requested: bool,
    pub(super) shut_want: u32,
    pub(super) shut_sent: u32,
    // queued control packets
    pub(super) want_request: bool,
    pub(super) want_response: bool,
    pub(super) want_credit_update: bool,
    pub(super) in_rx_queue: bool,
}

impl Conn {
    pub(super) fn new(
        key: ConnKey,
        stream: UnixStream,
        state: State,
        host_initiated: bool,
    ) -> Self {
        Conn {
            key,
            stream,
            state,
            host_initiated,
            deadline: None,
            out_ctrl: Vec::new(),
            out_buf: VecDeque::new(),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            peer_shut: 0,
            host_wr_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            // Data may have arrived before we registered; finding out costs one read.
            host_readable: true,
            host_eof: false,
            host_hup: false,
            credit_requested: false,
            shut_want: 0,
            shut_sent: 0,
            want_request: false,
            want_response: false,
            want_credit_update: false,
            in_rx_queue: false,
        }
    }

    /// Bytes the guest may still send us.
    pub(super) fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub(super) fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_shut & shutdown::RCV == 0
    }

    pub(super) fn has_rx_work(&self) -> bool {
        match self.state {
            State::Draining => false,
            State::Connecting => self.want_request,
            State::Established => {
                self.want_response
                    || self.want_credit_update
                    || self.shut_want & !self.shut_sent != 0
                    || (self.can_send_data() && (self.peer_credit() > 0 || !self.credit_requested))
            }
        }
    }

    pub(super) fn out_pending(&self) -> bool {
        !self.out_ctrl.is_empty() || !self.out_buf.is_empty()
    }

    /// Applies a packet the guest sent on this connection (`data_len` bytes of payload).
    pub(super) fn on_guest_packet(
        &mut self,
        hdr: &Header,
        data_len: usize,
        cfg: &MuxerConfig,
    ) -> Next {
        if Wrapping(hdr.fwd_cnt) != self.peer_fwd_cnt || hdr.buf_alloc != self.peer_buf_alloc {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match hdr.op {
            op::RESPONSE if self.state == State::Connecting => {
                self.state = State::Established;
                self.deadline = None;
                self.out_ctrl = format!("OK {}\n", self.key.host_port).into_bytes();
                debug!(
                    guest_port = self.key.guest_port,
                    "guest accepted host connection"
                );
                Next::Flush { arm_timer: false }
            }
            op::RW if self.state == State::Established && self.peer_shut & shutdown::SEND == 0 => {
                let len = data_len as u32;
                if self.out_buf.len() as u64 + u64::from(len) > u64::from(cfg.conn_buf_size) {
                    crate::guest_warn!(
                        guest_port = self.key.guest_port,
                        "guest overran its vsock credit; resetting"
                    );
                    return Next::Close { rst: true };
                }
                self.rx_cnt += Wrapping(len);
                Next::Deliver
            }
            op::CREDIT_UPDATE => Next::Nothing,
            op::CREDIT_REQUEST => {
                self.want_credit_update = true;
                Next::Nothing
            }
            op::SHUTDOWN if self.state == State::Established => {
                self.peer_shut |= hdr.flags & SHUT_BOTH;
                let closing = self.peer_shut == SHUT_BOTH;
                if closing {
                    self.deadline = Some(Instant::now() + cfg.close_timeout);
                }
                Next::Flush { arm_timer: closing }
            }
            op::RST => {
                if self.out_pending() && self.state == State::Established {
                    // Deliver what the guest sent before resetting, then close.
                    self.state = State::Draining;
                    self.deadline = Some(Instant::now() + cfg.close_timeout);
                    Next::Drain
                } else {
                    Next::Close { rst: false }
                }
            }
            _ => {
                debug!(?hdr, state = ?self.state, "unexpected vsock packet; resetting connection");
                Next::Close { rst: true }
            }
        }
    }

    /// Writes guest data to the host socket if nothing is queued before it, and queues what the
    /// socket does not take. An error means the host socket is broken.
    pub(super) fn send_to_host(&mut self, data: &[u8]) -> io::Result<()> {
        let mut rest = data;
        if !self.out_pending() {
            match write_retry(&mut self.stream, data) {
                Ok(n) => {
                    self.fwd_cnt += Wrapping(n as u32);
                    rest = &data[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        self.out_buf.extend(rest);
        Ok(())
    }

    /// Writes buffered host-bound bytes until done or EAGAIN, then acts on what that enables
    /// (half-close towards the host, finishing a close, a credit update to the guest).
    pub(super) fn flush(&mut self, cfg: &MuxerConfig) -> Flushed {
        let buf_alloc = cfg.conn_buf_size;
        if self.state == State::Connecting {
            return Flushed::Wait;
        }
        let mut failed = false;
        while !self.out_ctrl.is_empty() {
            match write_retry(&mut self.stream, &self.out_ctrl) {
                Ok(n) => {
                    self.out_ctrl.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        while !failed && self.out_ctrl.is_empty() && !self.out_buf.is_empty() {
            let (a, b) = self.out_buf.as_slices();
            let r = self
                .stream
                .write_vectored(&[IoSlice::new(a), IoSlice::new(b)]);
            match r {
                Ok(0) => failed = true,
                Ok(n) => {
                    self.out_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => failed = true,
            }
        }
        if self.out_buf.is_empty() && self.out_buf.capacity() > 64 * 1024 {
            self.out_buf.shrink_to(0);
        }
        if failed {
            debug!(
                guest_port = self.key.guest_port,
                "vsock host socket write failed"
            );
            return Flushed::Close { rst: true };
        }
        if self.out_pending() {
            return Flushed::Wait;
        }
        if self.state == State::Draining {
            return Flushed::Close { rst: false };
        }
        if self.peer_shut & shutdown::SEND != 0 && !self.host_wr_shut {
            self.host_wr_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        if self.peer_shut == SHUT_BOTH {
            // Orderly close from the guest, all delivered: our RST completes it.
            return Flushed::Close { rst: true };
        }
        // Tell the guest about freed buffer space once its view of it runs low.
        let perceived_free = buf_alloc.saturating_sub((self.rx_cnt - self.fwd_cnt_sent).0);
        if self.fwd_cnt != self.fwd_cnt_sent && perceived_free < buf_alloc / 2 {
            self.want_credit_update = true;
            return Flushed::CreditUpdate;
        }
        Flushed::Wait
    }

    /// The next packet this connection has for the guest, payload read into `buf`. An error
    /// means the host socket is broken.
    pub(super) fn rx_packet(
        &mut self,
        buf: &mut [u8],
        max_data: usize,
        cfg: &MuxerConfig,
    ) -> io::Result<Option<Header>> {
        let mut h = Header {
            src_cid: HOST_CID,
            dst_cid: cfg.guest_cid,
            src_port: self.key.host_port,
            dst_port: self.key.guest_port,
            type_: TYPE_STREAM,
            ..Default::default()
        };
        if self.state == State::Connecting {
            if !self.want_request {
                return Ok(None);
            }
            self.want_request = false;
            h.op = op::REQUEST;
        } else if self.state != State::Established {
            return Ok(None);
        } else if self.want_response {
            self.want_response = false;
            h.op = op::RESPONSE;
        } else {
            let credit = self.peer_credit();
            if self.can_send_data() && credit > 0 && max_data > 0 {
                let n = (credit as usize).min(max_data);
                loop {
                    match self.stream.read(&mut buf[..n]) {
                        Ok(0) => {
                            self.host_eof = true;
                            self.host_readable = false;
                            self.shut_want |= shutdown::SEND;
                            if self.host_hup {
                                self.shut_want |= shutdown::RCV;
                            }
                        }
                        Ok(n) => {
                            self.tx_cnt += Wrapping(n as u32);
                            h.op = op::RW;
                            h.len = n as u32;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            self.host_readable = false;
                        }
                        Err(e) => return Err(e),
                    }
                    break;
                }
            }
            if h.op == 0
                && self.can_send_data()
                && self.peer_credit() == 0
                && !self.credit_requested
            {
                self.credit_requested = true;
                h.op = op::CREDIT_REQUEST;
            }
            if h.op == 0 && self.shut_want & !self.shut_sent != 0 {
                h.op = op::SHUTDOWN;
                h.flags = self.shut_want;
                self.shut_sent = self.shut_want;
                if self.shut_want == SHUT_BOTH && self.deadline.is_none() {
                    // The guest answers a full shutdown with RST; do not wait forever.
                    self.deadline = Some(Instant::now() + cfg.close_timeout);
                }
            }
            if h.op == 0 && self.want_credit_update {
                h.op = op::CREDIT_UPDATE;
            }
        }
        if h.op == 0 {
            return Ok(None);
        }
        // Every packet carries our credit state.
        h.buf_alloc = cfg.conn_buf_size;
        h.fwd_cnt = self.fwd_cnt.0;
        self.fwd_cnt_sent = self.fwd_cnt;
        self.want_credit_update = false;
        Ok(Some(h))
    }
}

/// What the muxer does after [`Conn::on_guest_packet`] (then it reschedules the connection,
/// unless it closed it).
pub(super) enum Next {
    Nothing,
    /// Write what is queued for the host; first arm the timer for a deadline just set.
    Flush {
        arm_timer: bool,
    },
    /// Write the packet's payload to the host.
    Deliver,
    /// The guest reset the connection with data still queued for the host: forget its key
    /// (the guest may reuse it) and let the timer bound the flushing.
    Drain,
    Close {
        rst: bool,
    },
}

/// What the muxer does after [`Conn::flush`].
pub(super) enum Flushed {
    /// Nothing until the next event.
    Wait,
    Close {
        rst: bool,
    },
    /// A credit update is due: put the connection on the RX round-robin.
    CreditUpdate,
}

fn write_retry(s: &mut UnixStream, data: &[u8]) -> io::Result<usize> {
    loop {
        match s.write(data) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(0) if !data.is_empty() => return Err(io::ErrorKind::WriteZero.into()),
            r => return r,
        }
    }
}
