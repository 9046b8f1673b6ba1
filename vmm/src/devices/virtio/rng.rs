//! virtio-rng (virtio 1.x, 5.4): one queue of device-writable buffers filled from the host's
//! random source.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::device::{ActivateContext, ActivateError, Interrupt, VirtioDevice};
use crate::devices::bus::lock;
use crate::event_loop::{EventHandler, EventLoop};

pub const VIRTIO_ID_RNG: u32 = 4;
const QUEUE_SIZE: u16 = 256;
/// Upper bound on what one request gets, so that a guest asking for gigabytes costs the VMM
/// neither memory nor time.
const MAX_REQUEST_BYTES: u32 = 64 * 1024;

/// Why a request was refused; the chain is returned with zero bytes written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("descriptor is not device-writable")]
    ReadOnly,
    #[error("buffer {0:#x}+{1:#x} lies outside guest memory")]
    OutOfRange(u64, u32),
    #[error("empty descriptor chain")]
    Empty,
}

struct Worker {
    mem: GuestMemoryMmap,
    queue: Queue,
    evt: EventFd,
    interrupt: Arc<Interrupt>,
    source: File,
    buf: Vec<u8>,
    broken: bool,
    /// Requests refused so far (exposed for tests and status).
    rejected: Arc<std::sync::atomic::AtomicU64>,
}

impl Worker {
    fn fill(
        &mut self,
        descs: &[virtio_queue::desc::split::Descriptor],
    ) -> Result<u32, RequestError> {
        if descs.is_empty() {
            return Err(RequestError::Empty);
        }
        // Validate the whole chain before writing anything.
        for d in descs {
            if !d.is_write_only() {
                return Err(RequestError::ReadOnly);
            }
            if !self.mem.check_range(d.addr(), d.len() as usize) {
                return Err(RequestError::OutOfRange(d.addr().0, d.len()));
            }
        }
        let mut total = 0u32;
        for d in descs {
            let n = d.len().min(MAX_REQUEST_BYTES - total) as usize;
            if n == 0 {
                break;
            }
            let chunk = &mut self.buf[..n];
            if let Err(e) = self.source.read_exact(chunk) {
                tracing::warn!("reading the host random source: {e}");
                break;
            }
            if self.mem.write_slice(chunk, d.addr()).is_err() {
                return Err(RequestError::OutOfRange(d.addr().0, d.len()));
            }
            total += n as u32;
        }
        Ok(total)
    }

    fn process(&mut self) {
        if self.broken {
            return;
        }
        let mem = self.mem.clone();
        let chains: Vec<_> = match self.queue.iter(&mem) {
            Ok(it) => it
                .map(|c| (c.head_index(), c.collect::<Vec<_>>()))
                .collect(),
            Err(e) => {
                self.broken = true;
                self.interrupt.fail_device(&format!("rng queue: {e:?}"));
                return;
            }
        };
        if chains.is_empty() {
            return;
        }
        for (head, descs) in chains {
            let len = match self.fill(&descs) {
                Ok(n) => n,
                Err(e) => {
                    self.rejected
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    crate::guest_warn!("virtio-rng: rejected request {head}: {e}");
                    0
                }
            };
            if let Err(e) = self.queue.add_used(&mem, head, len) {
                self.broken = true;
                self.interrupt.fail_device(&format!("rng used ring: {e:?}"));
                return;
            }
        }
        match self.queue.needs_notification(&mem) {
            Ok(true) => self.interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(e) => {
                self.broken = true;
                self.interrupt
                    .fail_device(&format!("rng notification: {e:?}"));
            }
        }
    }
}

impl EventHandler for Worker {
    fn handle(&mut self, _fd: RawFd, _events: EventSet) {
        // Drains the counter; EAGAIN only means a spurious wake-up.
        let _ = self.evt.read();
        self.process();
    }
}

/// The virtio-rng device.
pub struct Rng {
    active: Option<(Arc<EventLoop>, RawFd, Arc<Mutex<Worker>>)>,
    rejected: Arc<std::sync::atomic::AtomicU64>,
}

impl Rng {
    pub fn new() -> Self {
        Rng {
            active: None,
            rejected: Arc::default(),
        }
    }

    /// Requests the device refused (malformed chains).
    pub fn rejected_counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.rejected.clone()
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        super::device::VIRTIO_F_VERSION_1
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let (_, queue, evt) = ctx
            .queues
            .into_iter()
            .find(|(i, _, _)| *i == 0)
            .ok_or(ActivateError::MissingQueue(0))?;
        let source = File::open("/dev/urandom").map_err(ActivateError::Events)?;
        let fd = evt.as_raw_fd();
        let worker = Arc::new(Mutex::new(Worker {
            mem: ctx.mem,
            queue,
            evt,
            interrupt: ctx.interrupt,
            source,
            buf: vec![0; MAX_REQUEST_BYTES as usize],
            broken: false,
            rejected: self.rejected.clone(),
        }));
        ctx.event_loop
            .add(fd, EventSet::IN, worker.clone())
            .map_err(ActivateError::Events)?;
        // Buffers may have been posted before DRIVER_OK.
        lock(&worker).process();
        self.active = Some((ctx.event_loop, fd, worker));
        Ok(())
    }

    fn reset(&mut self) {
        if let Some((el, fd, _worker)) = self.active.take() {
            el.remove(fd);
        }
    }
}
