//! virtio-net (virtio 1.x, 5.1) on a tap device: one RX and one TX queue, no offloads, no
//! mergeable buffers. The tap is opened with IFF_VNET_HDR and a 12-byte header, which is
//! exactly `virtio_net_hdr_v1`, so headers pass through unchanged.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::device::{
    deregister, read_config_bytes, register_all, take_queue, ActivateContext, ActivateError,
    Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::devices::bus::lock;
use crate::event_loop::{EventHandler, EventLoop};

pub const VIRTIO_ID_NET: u32 = 1;
const QUEUE_SIZE: u16 = 256;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VNET_HDR_LEN: usize = 12;
/// Header plus the largest frame without offloads (64 KiB covers any MTU a tap accepts).
const MAX_PACKET: usize = VNET_HDR_LEN + 65536;

const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("tap name {0:?} is empty or longer than 15 bytes")]
    Name(String),
    #[error("MAC address {0:?} is not six hex bytes")]
    Mac(String),
    #[error("opening tap {0}: {1}")]
    Tap(String, io::Error),
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

/// A tap device opened for virtio-net headers.
pub struct Tap {
    file: File,
    pub name: String,
}

impl Tap {
    /// Opens (creating if needed) tap `name`, non-blocking.
    pub fn open(name: &str) -> Result<Tap, NetError> {
        if name.is_empty() || name.len() > 15 {
            return Err(NetError::Name(name.into()));
        }
        let err = |e| NetError::Tap(name.into(), e);
        // SAFETY: a NUL-terminated path; the fd is checked and owned below.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: fd is freshly opened and owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        let hdr: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(err(io::Error::last_os_error()));
        }
        Ok(Tap {
            file,
            name: name.into(),
        })
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(NetError::Mac(s.into()));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| NetError::Mac(s.into()))?;
    }
    Ok(mac)
}

fn validate(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    writable: bool,
) -> Result<(), &'static str> {
    if descs.is_empty() {
        return Err("empty chain");
    }
    for d in descs {
        if d.is_write_only() != writable {
            return Err("descriptor direction");
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err("buffer outside guest memory");
        }
    }
    Ok(())
}

struct Worker {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    tap: File,
    interrupt: Arc<Interrupt>,
    event_loop: Arc<EventLoop>,
    /// A frame read from the tap that waits for an RX buffer.
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    tap_paused: bool,
    broken: bool,
}

impl Worker {
    fn fail(&mut self, what: String) {
        self.broken = true;
        self.interrupt.fail_device(&what);
    }

    fn tx(&mut self) {
        let mem = self.mem.clone();
        let chains: Vec<(u16, Vec<Descriptor>)> = match self.txq.iter(&mem) {
            Ok(it) => it.map(|c| (c.head_index(), c.collect())).collect(),
            Err(e) => return self.fail(format!("net TX queue: {e:?}")),
        };
        let any = !chains.is_empty();
        for (head, descs) in chains {
            match validate(&mem, &descs, false) {
                Ok(()) => {
                    let mut len = 0usize;
                    let mut ok = true;
                    for d in &descs {
                        let n = d.len() as usize;
                        if len + n > MAX_PACKET {
                            ok = false;
                            break;
                        }
                        if mem
                            .read_slice(&mut self.tx_buf[len..len + n], d.addr())
                            .is_err()
                        {
                            ok = false;
                            break;
                        }
                        len += n;
                    }
                    if ok && len > VNET_HDR_LEN {
                        // A full tap queue drops the frame, as a real NIC would.
                        if let Err(e) = self.tap.write(&self.tx_buf[..len]) {
                            tracing::debug!("tap write: {e}");
                        }
                    } else {
                        crate::guest_warn!("virtio-net: dropped malformed TX chain {head}");
                    }
                }
                Err(e) => crate::guest_warn!("virtio-net: rejected TX chain {head}: {e}"),
            }
            if let Err(e) = self.txq.add_used(&mem, head, 0) {
                return self.fail(format!("net TX used ring: {e:?}"));
            }
        }
        if any {
            self.interrupt.signal_used_queue();
        }
    }

    /// Moves frames from the tap into RX buffers until one side runs dry.
    fn rx(&mut self) {
        let mem = self.mem.clone();
        let mut used = false;
        loop {
            let len = match self.pending.take() {
                Some(l) => l,
                None => match self.tap.read(&mut self.rx_buf) {
                    Ok(l) => l,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!("tap read: {e}");
                        break;
                    }
                },
            };
            let chain = match self.rxq.iter(&mem) {
                Ok(mut it) => it.next().map(|c| (c.head_index(), c.collect::<Vec<_>>())),
                Err(e) => return self.fail(format!("net RX queue: {e:?}")),
            };
            let Some((head, descs)) = chain else {
                // No buffer: keep the frame and stop watching the tap until the guest adds
                // buffers, so a busy tap does not spin the device thread.
                self.pending = Some(len);
                self.pause_tap(true);
                break;
            };
            let mut written = 0usize;
            match validate(&mem, &descs, true) {
                Ok(()) => {
                    let cap: usize = descs.iter().map(|d| d.len() as usize).sum();
                    if cap >= len {
                        for d in &descs {
                            let n = (d.len() as usize).min(len - written);
                            if n == 0 {
                                break;
                            }
                            if mem
                                .write_slice(&self.rx_buf[written..written + n], d.addr())
                                .is_err()
                            {
                                written = 0;
                                break;
                            }
                            written += n;
                        }
                    } else {
                        tracing::debug!("virtio-net: RX buffer {cap} < frame {len}, dropped");
                    }
                }
                Err(e) => crate::guest_warn!("virtio-net: rejected RX chain {head}: {e}"),
            }
            if let Err(e) = self.rxq.add_used(&mem, head, written as u32) {
                return self.fail(format!("net RX used ring: {e:?}"));
            }
            used = true;
        }
        if used {
            self.interrupt.signal_used_queue();
        }
    }

    fn pause_tap(&mut self, pause: bool) {
        if self.tap_paused != pause {
            let ev = if pause {
                EventSet::empty()
            } else {
                EventSet::IN
            };
            if let Err(e) = self.event_loop.modify(self.tap.as_raw_fd(), ev) {
                tracing::warn!("tap epoll: {e}");
            }
            self.tap_paused = pause;
        }
    }
}

impl EventHandler for Worker {
    fn handle(&mut self, fd: RawFd, _events: EventSet) {
        if fd == self.rx_evt.as_raw_fd() {
            let _ = self.rx_evt.read();
        } else if fd == self.tx_evt.as_raw_fd() {
            let _ = self.tx_evt.read();
        }
        if self.broken {
            self.pause_tap(true);
            return;
        }
        if fd == self.tx_evt.as_raw_fd() {
            self.tx();
        } else if fd == self.rx_evt.as_raw_fd() {
            self.pause_tap(false);
            self.rx();
        } else {
            self.rx();
        }
    }
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    active: Option<(Arc<EventLoop>, Vec<RawFd>)>,
}

impl Net {
    pub fn new(tap: &str, mac: Option<&str>) -> Result<Net, NetError> {
        let mac = match mac {
            Some(m) => parse_mac(m)?,
            None => [0x52, 0x54, 0x00, 0x00, 0x00, 0x01],
        };
        Ok(Net {
            tap: Tap::open(tap)?,
            mac,
            active: None,
        })
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut queues = ctx.queues;
        let (rxq, rx_evt) = take_queue(&mut queues, 0)?;
        let (txq, tx_evt) = take_queue(&mut queues, 1)?;
        let tap = self.tap.file.try_clone().map_err(ActivateError::Events)?;
        let fds = vec![rx_evt.as_raw_fd(), tx_evt.as_raw_fd(), tap.as_raw_fd()];
        let worker = Arc::new(Mutex::new(Worker {
            mem: ctx.mem,
            rxq,
            txq,
            rx_evt,
            tx_evt,
            tap,
            interrupt: ctx.interrupt,
            event_loop: ctx.event_loop.clone(),
            pending: None,
            rx_buf: vec![0; MAX_PACKET],
            tx_buf: vec![0; MAX_PACKET],
            tap_paused: false,
            broken: false,
        }));
        register_all(&ctx.event_loop, &fds, worker.clone())?;
        {
            let mut w = lock(&worker);
            w.tx();
            w.rx();
        }
        self.active = Some((ctx.event_loop, fds));
        Ok(())
    }

    fn reset(&mut self) {
        deregister(&mut self.active);
    }
}
