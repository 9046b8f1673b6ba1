//! Serves a [`VsockMuxer`] to a vhost-user frontend (QEMU's `vhost-user-vsock-device`).
//!
//! Only queue plumbing lives here: which vring to process on which event, and when to signal
//! the guest. All protocol logic is in the muxer.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::warn;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::{config_space, MuxerConfig, MuxerError, VsockMuxer, NUM_QUEUES, RX_QUEUE, TX_QUEUE};

/// Largest queue the frontend may configure.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// Event id under which the muxer's fd is registered with the vhost-user epoll handler
/// (ids up to `NUM_QUEUES` are reserved for the queues and the exit event).
pub const MUXER_EVENT: u16 = NUM_QUEUES as u16 + 1;

type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

struct Inner {
    muxer: VsockMuxer,
    mem: Option<Mem>,
    event_idx: bool,
}

/// The vhost-user-vsock backend. Cheap to clone (shared state).
#[derive(Clone)]
pub struct VhostUserVsock {
    inner: Arc<Mutex<Inner>>,
    guest_cid: u64,
}

impl VhostUserVsock {
    /// Creates the muxer (binding the hybrid-vsock listener).
    pub fn new(cfg: MuxerConfig) -> Result<Self, MuxerError> {
        let guest_cid = cfg.guest_cid;
        let muxer = VsockMuxer::new(cfg)?;
        Ok(VhostUserVsock {
            inner: Arc::new(Mutex::new(Inner {
                muxer,
                mem: None,
                event_idx: false,
            })),
            guest_cid,
        })
    }

    /// Registers the muxer's fd with the daemon's epoll handler; call once after creating the
    /// `VhostUserDaemon`.
    pub fn register_muxer(&self, handler: &VringEpollHandler<VhostUserVsock>) -> io::Result<()> {
        let fd = self.lock().muxer.as_raw_fd();
        handler.register_listener(fd, EventSet::IN, u64::from(MUXER_EVENT))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves consistent-enough state for us to
        // keep serving; never propagate poisoning as a second panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn queue_live(vring: &VringRwLock<Mem>) -> bool {
    let st = vring.get_ref();
    st.is_enabled() && virtio_queue::QueueT::ready(st.get_queue())
}

fn signal(vring: &VringRwLock<Mem>, event_idx: bool) -> io::Result<()> {
    if event_idx {
        match vring.needs_notification() {
            Ok(false) => return Ok(()),
            Ok(true) => {}
            Err(e) => warn!("needs_notification failed: {e}"),
        }
    }
    vring.signal_used_queue()
}

/// Runs the muxer's `process` over `vring`'s queue and signals the guest if it used buffers.
fn process_and_signal(
    vring: &VringRwLock<Mem>,
    event_idx: bool,
    process: impl FnOnce(&mut virtio_queue::Queue) -> Result<bool, MuxerError>,
) -> io::Result<()> {
    let used = {
        let mut st = vring.get_mut();
        process(st.get_queue_mut())
    };
    match used {
        Ok(true) => signal(vring, event_idx),
        Ok(false) => Ok(()),
        Err(e) => Err(io::Error::other(e)),
    }
}

impl VhostUserBackend for VhostUserVsock {
    type Bitmap = ();
    type Vring = VringRwLock<Mem>;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn reset_device(&self) {
        self.lock().muxer.reset();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.lock().event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = config_space(self.guest_cid);
        let start = (offset as usize).min(cfg.len());
        let end = start.saturating_add(size as usize).min(cfg.len());
        cfg[start..end].to_vec()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without an exit event the worker thread never ends and the daemon's drop joins it
        // forever: the process would outlive its frontend.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                warn!("cannot create the vhost-user exit event: {e}");
                None
            }
        }
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        self.lock().mem = Some(mem);
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Self::Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        let mut inner = self.lock();
        if device_event == MUXER_EVENT {
            // Always drain host events: the fd is level-triggered in the daemon's epoll.
            inner.muxer.process_host_events();
        }
        let Some(mem) = inner.mem.clone() else {
            return Ok(());
        };
        let mem = mem.memory();
        let event_idx = inner.event_idx;
        let (Some(rx), Some(tx)) = (vrings.get(RX_QUEUE), vrings.get(TX_QUEUE)) else {
            return Ok(());
        };
        match device_event as usize {
            TX_QUEUE if queue_live(tx) => {
                process_and_signal(tx, event_idx, |q| inner.muxer.process_tx_queue(&*mem, q))?
            }
            _ => {}
        }
        // Every event can make RX packets pending (answers to TX, host data) or make room for
        // them (an RX kick).
        if inner.muxer.has_pending_rx() && queue_live(rx) {
            process_and_signal(rx, event_idx, |q| inner.muxer.process_rx_queue(&*mem, q))?;
        }
        Ok(())
    }
}
