//! Transport-independent hybrid-vsock backend.
//!
//! [`VsockMuxer`] owns the host side of every guest stream connection: a unix listener at
//! `uds_path` for host-initiated connections (`CONNECT <port>\n` / `OK <hostport>\n`), and unix
//! sockets connected to `<uds_path>_<port>` for guest-initiated ones. It consumes packets from a
//! TX virtqueue and produces packets into an RX virtqueue; how the queues are notified is up to
//! the caller (the vhost-user adapter in [`super::vhost_user`], or husk-vmm's own device).
//!
//! Event model: every host socket sits edge-triggered (IN|OUT|RDHUP) in the muxer's own epoll,
//! whose fd the caller watches for readability. Readiness is remembered in per-connection flags,
//! so a connection that cannot progress (no guest credit, no RX buffers) simply waits for the
//! guest event that unblocks it: there is no re-arming of interest that could lose a wakeup and
//! nothing spins. Host-bound data is written directly; only what the host socket does not take
//! is buffered, and that buffer can never exceed the credit (`buf_alloc`) we advertised, so a
//! guest that overruns it is reset.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use tracing::{debug, info, warn};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

mod host_connect;

use super::connection::{Conn, ConnKey, Flushed, Next, State};
use super::packet::{
    op, read_tx_packet, shutdown, Header, RxBuffer, HOST_CID, MAX_PKT_DATA, TYPE_STREAM,
};
use host_connect::{bind_listener, connect_nonblocking};

/// Settings of a [`VsockMuxer`].
#[derive(Clone, Debug)]
pub struct MuxerConfig {
    /// The guest's CID (>= 3).
    pub guest_cid: u64,
    /// Path of the hybrid-vsock unix listener; guest-initiated connections go to
    /// `<uds_path>_<port>`.
    pub uds_path: PathBuf,
    /// Most simultaneous connections (host- and guest-initiated together).
    pub max_connections: usize,
    /// Per-connection receive buffer advertised to the guest (`buf_alloc`), in bytes. This is
    /// the bound on host-bound data buffered per connection.
    pub conn_buf_size: u32,
    /// How long a host-initiated connection waits for the guest's RESPONSE.
    pub connect_timeout: Duration,
    /// How long a host client may take to send its `CONNECT` line.
    pub handshake_timeout: Duration,
    /// How long a connection may stay in an orderly close (waiting for the guest's RST, or for
    /// the host to take the last buffered bytes).
    pub close_timeout: Duration,
}

impl MuxerConfig {
    /// Defaults for a guest CID and listener path.
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Self {
        MuxerConfig {
            guest_cid,
            uds_path: uds_path.into(),
            max_connections: 256,
            conn_buf_size: 256 * 1024,
            connect_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(10),
        }
    }
}

/// Errors of the muxer.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// Bad configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listener path is served by a live process.
    #[error("hybrid vsock socket {0} is in use by another process")]
    InUse(PathBuf),
    /// Creating the listener failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// Listener path.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
    /// epoll or timerfd failure.
    #[error("event setup failed: {0}")]
    Event(io::Error),
    /// The virtqueue itself is unusable (rings outside guest memory): the device must fail.
    #[error("virtqueue failure: {0}")]
    Queue(#[from] virtio_queue::Error),
}

/// Host side ports handed out to host-initiated connections start here (as in Firecracker's
/// scheme, far above the ports guests listen on).
const LOCAL_PORT_BASE: u32 = 1 << 30;
const MAX_PENDING_CLIENTS: usize = 64;
const MAX_CONNECT_LINE: usize = 32;
const TIMER_TICK: Duration = Duration::from_millis(100);
const TOKEN_LISTENER: u64 = 0;
const TOKEN_TIMER: u64 = 1;

struct PendingClient {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

enum Slot {
    Pending(PendingClient),
    Conn(Box<Conn>),
}

/// The hybrid-vsock backend. See the module documentation.
pub struct VsockMuxer {
    cfg: MuxerConfig,
    epoll: Epoll,
    listener: UnixListener,
    timer: TimerFd,
    timer_armed: bool,
    slots: HashMap<u64, Slot>,
    by_key: HashMap<ConnKey, u64>,
    next_token: u64,
    n_conns: usize,
    n_pending: usize,
    rx_queue: VecDeque<u64>,
    stray: VecDeque<Header>,
    next_local_port: u32,
    local_ports: HashSet<u32>,
    rx_data: Vec<u8>,
    tx_data: Vec<u8>,
}

impl VsockMuxer {
    /// Binds the hybrid-vsock listener and sets up the event machinery. A stale socket file at
    /// `uds_path` (nobody accepting) is replaced; a live one is an error.
    pub fn new(cfg: MuxerConfig) -> Result<Self, MuxerError> {
        if cfg.guest_cid < 3 || cfg.guest_cid > u64::from(u32::MAX) {
            return Err(MuxerError::Config(format!(
                "guest CID {} is reserved or too large",
                cfg.guest_cid
            )));
        }
        if cfg.max_connections == 0 || cfg.conn_buf_size < 4096 {
            return Err(MuxerError::Config(
                "max_connections must be > 0 and conn_buf_size >= 4096".into(),
            ));
        }
        let listener = bind_listener(&cfg.uds_path)?;
        let epoll = Epoll::new().map_err(MuxerError::Event)?;
        let timer = TimerFd::new().map_err(|e| MuxerError::Event(io::Error::from(e)))?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )
            .map_err(MuxerError::Event)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_TIMER),
            )
            .map_err(MuxerError::Event)?;
        info!(path = %cfg.uds_path.display(), guest_cid = cfg.guest_cid, "hybrid vsock listening");
        Ok(VsockMuxer {
            cfg,
            epoll,
            listener,
            timer,
            timer_armed: false,
            slots: HashMap::new(),
            by_key: HashMap::new(),
            next_token: 2,
            n_conns: 0,
            n_pending: 0,
            rx_queue: VecDeque::new(),
            stray: VecDeque::new(),
            next_local_port: LOCAL_PORT_BASE,
            local_ports: HashSet::new(),
            rx_data: vec![0; MAX_PKT_DATA],
            tx_data: vec![0; MAX_PKT_DATA],
        })
    }

    /// The configuration in use.
    pub fn config(&self) -> &MuxerConfig {
        &self.cfg
    }

    /// Number of live connections (not counting clients still sending their CONNECT line).
    pub fn connection_count(&self) -> usize {
        self.n_conns
    }

    /// Whether packets are waiting for RX buffers.
    pub fn has_pending_rx(&self) -> bool {
        !self.stray.is_empty() || !self.rx_queue.is_empty()
    }

    /// Forgets every connection (closing the host sockets, telling the guest nothing): for a
    /// device reset, after which the guest driver has no connection state either. The
    /// listener stays.
    pub fn reset(&mut self) {
        for (_, slot) in self.slots.drain() {
            let fd = match &slot {
                Slot::Pending(p) => p.stream.as_raw_fd(),
                Slot::Conn(c) => c.stream.as_raw_fd(),
            };
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
        self.by_key.clear();
        self.rx_queue.clear();
        self.stray.clear();
        self.local_ports.clear();
        self.n_conns = 0;
        self.n_pending = 0;
    }

    /// Handles everything ready on the host sockets without blocking. Call when
    /// [`AsRawFd::as_raw_fd`] is readable, then call [`Self::process_rx_queue`].
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("epoll_wait on the vsock muxer failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                self.dispatch(ev.data(), ev.event_set());
            }
            if n < events.len() {
                return;
            }
        }
    }

    /// Takes every packet the guest queued on TX and acts on it. Returns whether any chain was
    /// marked used (the caller then notifies the guest). Malformed chains are consumed and
    /// marked used with length 0. An error means the queue itself is broken.
    pub fn process_tx_queue<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<bool, MuxerError> {
        let mut used = false;
        let mut data = std::mem::take(&mut self.tx_data);
        let res = (|| loop {
            queue.disable_notification(mem)?;
            check_avail_ring(mem, queue)?;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                match read_tx_packet(mem, chain, &mut data) {
                    Ok(hdr) => {
                        let len = hdr.len as usize;
                        self.handle_guest_packet(&hdr, &data[..len]);
                    }
                    Err(e) => debug!("dropping TX chain {head}: {e}"),
                }
                queue.add_used(mem, head, 0)?;
                used = true;
            }
            if !queue.enable_notification(mem)? {
                return Ok(());
            }
        })();
        self.tx_data = data;
        res.map(|()| used)
    }

    /// Fills RX buffers with pending packets. Returns whether any chain was marked used.
    /// When buffers run out while packets are pending, queue notifications are left enabled so
    /// the guest's next refill kicks the device.
    pub fn process_rx_queue<M: GuestMemory>(
        &mut self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<bool, MuxerError> {
        let mut used = false;
        while self.has_pending_rx() {
            check_avail_ring(mem, queue)?;
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                if queue.enable_notification(mem)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            let buf = match RxBuffer::new(mem, chain) {
                Ok(b) if b.fits_header() => b,
                Ok(_) => {
                    debug!("RX chain {head} too small for a header");
                    queue.add_used(mem, head, 0)?;
                    used = true;
                    continue;
                }
                Err(e) => {
                    debug!("dropping RX chain {head}: {e}");
                    queue.add_used(mem, head, 0)?;
                    used = true;
                    continue;
                }
            };
            let Some(hdr) = self.next_rx_packet(buf.data_capacity()) else {
                // Nothing was ready after all (a socket turned out empty): give the buffer back.
                queue.go_to_previous_position();
                break;
            };
            let len = match buf.write(&hdr, &self.rx_data[..hdr.len as usize]) {
                Ok(l) => l,
                Err(e) => {
                    // Cannot happen for a buffer whose capacity we just measured; the packet is
                    // lost, so the connection cannot continue.
                    crate::guest_warn!("writing RX chain {head} failed: {e}");
                    self.reset_by_key(ConnKey {
                        host_port: hdr.src_port,
                        guest_port: hdr.dst_port,
                    });
                    0
                }
            };
            queue.add_used(mem, head, len)?;
            used = true;
        }
        Ok(used)
    }

    fn dispatch(&mut self, token: u64, ev: EventSet) {
        match token {
            TOKEN_LISTENER => self.accept_clients(),
            TOKEN_TIMER => self.on_timer(),
            _ => match self.slots.get_mut(&token) {
                Some(Slot::Pending(_)) => self.read_connect_line(token),
                Some(Slot::Conn(c)) => {
                    if ev.intersects(
                        EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                    ) {
                        c.host_readable = true;
                    }
                    if ev.contains(EventSet::HANG_UP) {
                        c.host_hup = true;
                        if c.host_eof {
                            c.shut_want |= shutdown::RCV;
                        }
                    }
                    if ev.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
                        self.flush_out(token);
                    }
                    self.schedule(token);
                }
                None => {}
            },
        }
    }

    fn register(&mut self, stream: &UnixStream) -> Option<u64> {
        let token = self.next_token;
        self.next_token += 1;
        let ev = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        match self.epoll.ctl(
            ControlOperation::Add,
            stream.as_raw_fd(),
            EpollEvent::new(ev, token),
        ) {
            Ok(()) => Some(token),
            Err(e) => {
                warn!("cannot watch a vsock host socket: {e}");
                None
            }
        }
    }

    fn deregister(&self, fd: RawFd) {
        // Closing the fd right after removes it from the epoll anyway; this only keeps a
        // duplicated fd (none exist) from lingering.
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    fn alloc_local_port(&mut self) -> Option<u32> {
        for _ in 0..=self.cfg.max_connections + 1 {
            let p = self.next_local_port;
            self.next_local_port = if p == u32::MAX {
                LOCAL_PORT_BASE
            } else {
                p + 1
            };
            if self.local_ports.insert(p) {
                return Some(p);
            }
        }
        None
    }

    fn insert_conn(&mut self, token: u64, c: Conn) {
        self.by_key.insert(c.key, token);
        self.slots.insert(token, Slot::Conn(Box::new(c)));
        self.n_conns += 1;
        self.schedule(token);
    }

    fn conn_mut(&mut self, token: u64) -> Option<&mut Conn> {
        match self.slots.get_mut(&token) {
            Some(Slot::Conn(c)) => Some(c),
            _ => None,
        }
    }

    /// Puts a connection on the RX round-robin if it has something to send.
    fn schedule(&mut self, token: u64) {
        if let Some(c) = self.conn_mut(token) {
            if !c.in_rx_queue && c.has_rx_work() {
                c.in_rx_queue = true;
                self.rx_queue.push_back(token);
            }
        }
    }

    fn push_rst(&mut self, hdr: Header) {
        // Bounded: RSTs only ever answer guest packets or end connections we own.
        if self.stray.len() >= self.cfg.max_connections * 2 + 256 {
            debug!("dropping RST: queue full");
            return;
        }
        self.stray.push_back(hdr);
    }

    fn rst_for(&self, host_port: u32, guest_port: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cfg.guest_cid,
            src_port: host_port,
            dst_port: guest_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Default::default()
        }
    }

    /// Removes a connection, closing its host socket; with `rst`, tells the guest.
    fn kill(&mut self, token: u64, rst: bool) {
        let Some(Slot::Conn(c)) = self.slots.remove(&token) else {
            return;
        };
        self.deregister(c.stream.as_raw_fd());
        if c.state != State::Draining {
            self.by_key.remove(&c.key);
        }
        if c.host_initiated {
            self.local_ports.remove(&c.key.host_port);
        }
        self.n_conns -= 1;
        if rst && c.state != State::Draining {
            let h = self.rst_for(c.key.host_port, c.key.guest_port);
            self.push_rst(h);
        }
        debug!(
            host_port = c.key.host_port,
            guest_port = c.key.guest_port,
            rst,
            "vsock connection closed"
        );
    }

    fn reset_by_key(&mut self, key: ConnKey) {
        if let Some(&t) = self.by_key.get(&key) {
            self.kill(t, true);
        }
    }

    fn handle_guest_packet(&mut self, hdr: &Header, data: &[u8]) {
        if hdr.src_cid != self.cfg.guest_cid || hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM
        {
            debug!(?hdr, "guest packet with bad address or type");
            if hdr.op != op::RST {
                let h = self.rst_for(hdr.dst_port, hdr.src_port);
                self.push_rst(h);
            }
            return;
        }
        let key = ConnKey {
            host_port: hdr.dst_port,
            guest_port: hdr.src_port,
        };
        let Some(&token) = self.by_key.get(&key) else {
            match hdr.op {
                op::REQUEST => self.guest_connect(hdr),
                op::RST => {}
                _ => {
                    debug!(?hdr, "packet for unknown vsock connection");
                    let h = self.rst_for(hdr.dst_port, hdr.src_port);
                    self.push_rst(h);
                }
            }
            return;
        };
        let Some(Slot::Conn(c)) = self.slots.get_mut(&token) else {
            return;
        };
        match c.on_guest_packet(hdr, data.len(), &self.cfg) {
            Next::Nothing => {}
            Next::Flush { arm_timer } => {
                if arm_timer {
                    self.arm_timer();
                }
                self.flush_out(token);
            }
            Next::Deliver => self.write_to_host(token, data),
            Next::Drain => {
                self.by_key.remove(&key);
                self.arm_timer();
            }
            Next::Close { rst } => return self.kill(token, rst),
        }
        self.schedule(token);
    }

    fn guest_connect(&mut self, hdr: &Header) {
        if self.n_conns >= self.cfg.max_connections {
            crate::guest_warn!(
                "too many vsock connections; refusing guest connect to port {}",
                hdr.dst_port
            );
            let h = self.rst_for(hdr.dst_port, hdr.src_port);
            return self.push_rst(h);
        }
        let path = format!("{}_{}", self.cfg.uds_path.display(), hdr.dst_port);
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                debug!(%path, "guest connect refused: {e}");
                let h = self.rst_for(hdr.dst_port, hdr.src_port);
                return self.push_rst(h);
            }
        };
        let Some(token) = self.register(&stream) else {
            let h = self.rst_for(hdr.dst_port, hdr.src_port);
            return self.push_rst(h);
        };
        let key = ConnKey {
            host_port: hdr.dst_port,
            guest_port: hdr.src_port,
        };
        let mut c = Conn::new(key, stream, State::Established, false);
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c.want_response = true;
        debug!(
            host_port = key.host_port,
            guest_port = key.guest_port,
            "guest connected out"
        );
        self.insert_conn(token, c);
    }

    fn write_to_host(&mut self, token: u64, data: &[u8]) {
        let Some(c) = self.conn_mut(token) else {
            return;
        };
        if let Err(e) = c.send_to_host(data) {
            debug!("write to vsock host socket failed: {e}");
            return self.kill(token, true);
        }
        // Whatever remains waits for EPOLLOUT; flushing now makes sure we saw EAGAIN, so the
        // edge cannot have happened already.
        self.flush_out(token);
    }

    /// Writes buffered host-bound bytes and acts on what that enables (see [`Conn::flush`]).
    fn flush_out(&mut self, token: u64) {
        let Some(Slot::Conn(c)) = self.slots.get_mut(&token) else {
            return;
        };
        match c.flush(&self.cfg) {
            Flushed::Wait => {}
            Flushed::Close { rst } => self.kill(token, rst),
            Flushed::CreditUpdate => self.schedule(token),
        }
    }

    /// Picks the next packet for the guest; payload goes to `self.rx_data`.
    fn next_rx_packet(&mut self, max_data: usize) -> Option<Header> {
        loop {
            if let Some(h) = self.stray.pop_front() {
                return Some(h);
            }
            let token = self.rx_queue.pop_front()?;
            let Some(c) = self.conn_mut(token) else {
                continue;
            };
            c.in_rx_queue = false;
            let pkt = self.conn_rx_packet(token, max_data);
            self.schedule(token);
            if pkt.is_some() {
                return pkt;
            }
        }
    }

    fn conn_rx_packet(&mut self, token: u64, max_data: usize) -> Option<Header> {
        let Some(Slot::Conn(c)) = self.slots.get_mut(&token) else {
            return None;
        };
        match c.rx_packet(&mut self.rx_data, max_data, &self.cfg) {
            Ok(Some(h)) => {
                if c.deadline.is_some() {
                    self.arm_timer();
                }
                Some(h)
            }
            Ok(None) => None,
            Err(e) => {
                debug!("read from vsock host socket failed: {e}");
                self.kill(token, true);
                None
            }
        }
    }

    fn arm_timer(&mut self) {
        if !self.timer_armed {
            match self.timer.reset(TIMER_TICK, Some(TIMER_TICK)) {
                Ok(()) => self.timer_armed = true,
                Err(e) => warn!("cannot arm vsock timer: {e}"),
            }
        }
    }

    fn on_timer(&mut self) {
        // Level-triggered and readable: this read does not block.
        let _ = self.timer.wait();
        let now = Instant::now();
        let mut expired_pending = Vec::new();
        let mut expired_conns = Vec::new();
        let mut any = false;
        for (&t, s) in &self.slots {
            match s {
                Slot::Pending(p) => {
                    any = true;
                    if p.deadline <= now {
                        expired_pending.push(t);
                    }
                }
                Slot::Conn(c) => {
                    if let Some(d) = c.deadline {
                        any = true;
                        if d <= now {
                            expired_conns.push((t, c.state));
                        }
                    }
                }
            }
        }
        for t in expired_pending {
            warn!("host client sent no CONNECT line in time");
            self.drop_pending(t);
        }
        for (t, state) in expired_conns {
            match state {
                State::Connecting => warn!("guest did not answer a host CONNECT in time"),
                _ => debug!("vsock connection close timed out"),
            }
            self.kill(t, state != State::Draining);
        }
        if !any && self.timer_armed {
            if let Err(e) = self.timer.clear() {
                warn!("cannot disarm vsock timer: {e}");
            } else {
                self.timer_armed = false;
            }
        }
    }
}

/// Fails on an avail ring whose index is more than a queue's worth ahead of
/// what the device consumed. virtio-queue's `pop_descriptor_chain` turns
/// that into `None` while `enable_notification` keeps reporting new
/// buffers, so a guest that wrote such an index would otherwise pin a host
/// core in the loops above forever; a broken ring fails the device.
fn check_avail_ring<M: GuestMemory>(mem: &M, queue: &Queue) -> Result<(), MuxerError> {
    let avail = queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire)?;
    let pending = avail - Wrapping(queue.next_avail());
    if pending.0 > queue.size() {
        return Err(MuxerError::Queue(
            virtio_queue::Error::InvalidAvailRingIndex,
        ));
    }
    Ok(())
}

impl AsRawFd for VsockMuxer {
    /// The fd to watch (EPOLLIN) for host-side activity.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl Drop for VsockMuxer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cfg.uds_path);
    }
}
