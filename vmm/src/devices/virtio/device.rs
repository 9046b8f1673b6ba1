//! The interface between a virtio transport and a device model.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::event_loop::{EventHandler, EventLoop};

/// ISR bits (virtio 1.x, 4.1.4.5).
pub const ISR_QUEUE: u8 = 0x1;
pub const ISR_CONFIG: u8 = 0x2;

/// VIRTIO_F_VERSION_1: husk only speaks modern virtio.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// The device's interrupt: the ISR status byte plus an irqfd on its IOAPIC pin.
pub struct Interrupt {
    pub isr: AtomicU8,
    pub irqfd: EventFd,
    /// Set by a device that met a malformed queue: the transport reports
    /// DEVICE_NEEDS_RESET and the device stops serving until the driver resets it.
    pub needs_reset: AtomicBool,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Arc<Interrupt> {
        Arc::new(Interrupt {
            isr: AtomicU8::new(0),
            irqfd,
            needs_reset: AtomicBool::new(false),
        })
    }

    pub fn signal_used_queue(&self) {
        self.signal(ISR_QUEUE)
    }

    pub fn signal_config(&self) {
        self.signal(ISR_CONFIG)
    }

    /// Marks the device broken (virtio 1.x, 2.1.2) and tells the driver.
    pub fn fail_device(&self, why: &str) {
        crate::guest_warn!("virtio device failed, needs reset: {why}");
        self.needs_reset.store(true, Ordering::SeqCst);
        self.signal_config();
    }

    fn signal(&self, bit: u8) {
        self.isr.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("irqfd {}: {e}", self.irqfd.as_raw_fd());
        }
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
    /// One entry per queue the driver enabled, with the ioeventfd the guest kicks.
    pub queues: Vec<(usize, Queue, EventFd)>,
    pub event_loop: Arc<EventLoop>,
    /// Negotiated features.
    pub features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device needs queue {0}, which the driver did not enable")]
    MissingQueue(usize),
    #[error("registering device events: {0}")]
    Events(std::io::Error),
    #[error("back-end: {0}")]
    Backend(String),
}

/// A virtio device model behind any transport.
pub trait VirtioDevice: Send {
    /// Device type (virtio 1.x, 5): 4 rng, 1 net, 19 vsock, 26 fs.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered features, including `VIRTIO_F_VERSION_1`.
    fn features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = offset;
        data.fill(0);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// Starts serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops serving and forgets queue state (driver reset).
    fn reset(&mut self);
}

/// Takes queue `index` out of the queues the driver enabled.
pub fn take_queue(
    queues: &mut Vec<(usize, Queue, EventFd)>,
    index: usize,
) -> Result<(Queue, EventFd), ActivateError> {
    let pos = queues
        .iter()
        .position(|(i, _, _)| *i == index)
        .ok_or(ActivateError::MissingQueue(index))?;
    let (_, q, evt) = queues.swap_remove(pos);
    Ok((q, evt))
}

/// Registers every fd in `fds` with `handler`, or none of them: a failure
/// removes the ones already added so a failed activation leaves no handler behind.
pub fn register_all(
    event_loop: &EventLoop,
    fds: &[RawFd],
    handler: Arc<Mutex<dyn EventHandler>>,
) -> Result<(), ActivateError> {
    for fd in fds {
        if let Err(e) = event_loop.add(*fd, EventSet::IN, handler.clone()) {
            for fd in fds {
                event_loop.remove(*fd);
            }
            return Err(ActivateError::Events(e));
        }
    }
    Ok(())
}

/// Removes an active device's fds from its event loop (driver reset).
pub fn deregister(active: &mut Option<(Arc<EventLoop>, Vec<RawFd>)>) {
    if let Some((el, fds)) = active.take() {
        for fd in fds {
            el.remove(fd);
        }
    }
}

/// A read of device config space `cfg` at `offset`: bytes past its end read as 0.
pub fn read_config_bytes(cfg: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| cfg.get(o + i))
            .copied()
            .unwrap_or(0);
    }
}
