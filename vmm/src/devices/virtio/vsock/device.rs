//! husk-vmm's virtio-vsock device (virtio 1.x, 5.10): the queues of the guest driver wired to
//! the hybrid-vsock muxer in [`super::muxer`] (shared with the `husk-vsock` vhost-user
//! back-end). The muxer owns all packet validation; this file only moves queues
//! and events.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{self as mux, MuxerConfig, MuxerError, VsockMuxer};
use crate::devices::bus::lock;
use crate::devices::virtio::device::{
    deregister, read_config_bytes, register_all, take_queue, ActivateContext, ActivateError,
    Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::event_loop::{EventHandler, EventLoop};

pub const VIRTIO_ID_VSOCK: u32 = 19;
const QUEUE_SIZE: u16 = 256;

struct Worker {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    muxer: Arc<Mutex<VsockMuxer>>,
    muxer_fd: RawFd,
    interrupt: Arc<Interrupt>,
    broken: bool,
}

impl Worker {
    fn fail(&mut self, e: MuxerError) {
        self.broken = true;
        self.interrupt.fail_device(&format!("vsock: {e}"));
    }

    fn rx(&mut self) {
        let r = lock(&self.muxer).process_rx_queue(&self.mem, &mut self.rxq);
        match r {
            Ok(true) => self.interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(e) => self.fail(e),
        }
    }

    fn tx(&mut self) {
        let r = lock(&self.muxer).process_tx_queue(&self.mem, &mut self.txq);
        match r {
            Ok(true) => self.interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(e) => self.fail(e),
        }
    }
}

impl EventHandler for Worker {
    fn handle(&mut self, fd: RawFd, _events: EventSet) {
        if self.broken {
            // Keep draining so a level-triggered fd does not spin the loop.
            if fd == self.muxer_fd {
                lock(&self.muxer).process_host_events();
            }
            let _ = self.rx_evt.read();
            let _ = self.tx_evt.read();
            return;
        }
        if fd == self.rx_evt.as_raw_fd() {
            let _ = self.rx_evt.read();
            self.rx();
        } else if fd == self.tx_evt.as_raw_fd() {
            let _ = self.tx_evt.read();
            self.tx();
            // Replies (RESPONSE, RST, credit updates) are queued by TX processing.
            self.rx();
        } else if fd == self.muxer_fd {
            lock(&self.muxer).process_host_events();
            self.rx();
        }
    }
}

/// The device. The muxer is created with the device so that the hybrid socket accepts
/// connections (which wait for the guest) from the moment the VM exists.
pub struct Vsock {
    guest_cid: u64,
    muxer: Arc<Mutex<VsockMuxer>>,
    active: Option<(Arc<EventLoop>, Vec<RawFd>)>,
}

impl Vsock {
    pub fn new(cfg: MuxerConfig) -> Result<Vsock, MuxerError> {
        Ok(Vsock {
            guest_cid: cfg.guest_cid,
            muxer: Arc::new(Mutex::new(VsockMuxer::new(cfg)?)),
            active: None,
        })
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; mux::NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&mux::config_space(self.guest_cid), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        // The event queue is never used: no transport reset events are sent.
        let mut queues = ctx.queues;
        let (rxq, rx_evt) = take_queue(&mut queues, mux::RX_QUEUE)?;
        let (txq, tx_evt) = take_queue(&mut queues, mux::TX_QUEUE)?;
        let muxer_fd = lock(&self.muxer).as_raw_fd();
        let fds = vec![rx_evt.as_raw_fd(), tx_evt.as_raw_fd(), muxer_fd];
        let worker = Arc::new(Mutex::new(Worker {
            mem: ctx.mem,
            rxq,
            txq,
            rx_evt,
            tx_evt,
            muxer: self.muxer.clone(),
            muxer_fd,
            interrupt: ctx.interrupt,
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
