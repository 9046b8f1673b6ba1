//! virtio-fs (virtio 1.x, 5.11) as a vhost-user frontend: the queues are served by virtiofsd,
//! which maps guest RAM through the memfd behind it. husk-vmm only negotiates, hands over the
//! rings and forwards the back-end's "used" notifications as interrupts.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{
    deregister, read_config_bytes, ActivateContext, ActivateError, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use crate::event_loop::{EventHandler, EventLoop};

pub const VIRTIO_ID_FS: u32 = 26;
const QUEUE_SIZE: u16 = 1024;
/// hiprio + one request queue.
const NUM_QUEUES: usize = 2;
const TAG_LEN: usize = 36;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Features husk lets through from virtiofsd to the guest: ring layout features the back-end
/// implements plus VERSION_1.
const PASSTHROUGH: u64 = VIRTIO_F_VERSION_1 | (1 << 28) | (1 << 29);

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("tag {0:?} is empty or longer than 36 bytes")]
    Tag(String),
    #[error("vhost-user {0} with {1}: {2}")]
    VhostUser(&'static str, PathBuf, vhost::Error),
}

/// Forwards the back-end's call eventfd to the guest's interrupt.
struct CallForwarder {
    call: EventFd,
    interrupt: Arc<Interrupt>,
}

impl EventHandler for CallForwarder {
    fn handle(&mut self, _fd: RawFd, _events: EventSet) {
        if self.call.read().is_ok() {
            self.interrupt.signal_used_queue();
        }
    }
}

pub struct Fs {
    tag: String,
    socket: PathBuf,
    frontend: Frontend,
    backend_features: u64,
    protocol: bool,
    memfd: RawFd,
    active: Option<(Arc<EventLoop>, Vec<RawFd>)>,
}

impl Fs {
    /// Connects to virtiofsd at `socket`. `memfd` backs guest RAM (the back-end maps it).
    pub fn new(tag: &str, socket: &Path, memfd: RawFd) -> Result<Fs, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.into()));
        }
        let err = |what| move |e| FsError::VhostUser(what, socket.to_owned(), e);
        let mut frontend = Frontend::connect(socket, NUM_QUEUES as u64).map_err(err("connect"))?;
        frontend.set_owner().map_err(err("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(err("GET_FEATURES"))?;
        let protocol = backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(err("GET_PROTOCOL_FEATURES"))?;
            frontend
                .set_protocol_features(offered & VhostUserProtocolFeatures::MQ)
                .map_err(err("SET_PROTOCOL_FEATURES"))?;
        }
        Ok(Fs {
            tag: tag.into(),
            socket: socket.to_owned(),
            frontend,
            backend_features,
            protocol,
            memfd,
            active: None,
        })
    }

    fn setup(
        &mut self,
        ctx: &ActivateContext,
    ) -> Result<Vec<(RawFd, CallForwarder)>, vhost::Error> {
        let mut acked = ctx.features & PASSTHROUGH;
        if self.protocol {
            acked |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        self.frontend.set_features(acked)?;
        let mut regions = Vec::new();
        for r in ctx.mem.iter() {
            let host = r
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| vhost::Error::InvalidGuestMemory)?;
            let offset = r.file_offset().map(|f| f.start()).unwrap_or(0);
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().raw_value(),
                memory_size: r.len(),
                userspace_addr: host as u64,
                mmap_offset: offset,
                mmap_handle: self.memfd,
            });
        }
        self.frontend.set_mem_table(&regions)?;
        let host_addr = |mem: &GuestMemoryMmap, a: u64| -> Result<u64, vhost::Error> {
            mem.get_host_address(GuestAddress(a))
                .map(|p| p as u64)
                .map_err(|_| vhost::Error::InvalidGuestMemory)
        };
        let mut forwarders = Vec::new();
        for (i, q, kick) in &ctx.queues {
            let cfg = VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host_addr(&ctx.mem, q.desc_table())?,
                used_ring_addr: host_addr(&ctx.mem, q.used_ring())?,
                avail_ring_addr: host_addr(&ctx.mem, q.avail_ring())?,
                log_addr: None,
            };
            self.frontend.set_vring_num(*i, q.size())?;
            self.frontend.set_vring_addr(*i, &cfg)?;
            self.frontend.set_vring_base(*i, 0)?;
            let call = EventFd::new(EFD_NONBLOCK).map_err(vhost::Error::IOError)?;
            self.frontend.set_vring_call(*i, &call)?;
            self.frontend.set_vring_kick(*i, kick)?;
            if self.protocol {
                self.frontend.set_vring_enable(*i, true)?;
            }
            forwarders.push((
                call.as_raw_fd(),
                CallForwarder {
                    call,
                    interrupt: ctx.interrupt.clone(),
                },
            ));
        }
        Ok(forwarders)
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        (self.backend_features & PASSTHROUGH) | VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; TAG_LEN + 4];
        cfg[..self.tag.len()].copy_from_slice(self.tag.as_bytes());
        cfg[TAG_LEN..].copy_from_slice(&((NUM_QUEUES - 1) as u32).to_le_bytes());
        read_config_bytes(&cfg, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let forwarders = self.setup(&ctx).map_err(|e| {
            ActivateError::Backend(format!("virtiofsd at {}: {e}", self.socket.display()))
        })?;
        let mut fds = Vec::new();
        for (fd, fwd) in forwarders {
            ctx.event_loop
                .add(fd, EventSet::IN, Arc::new(Mutex::new(fwd)))
                .map_err(ActivateError::Events)?;
            fds.push(fd);
        }
        self.active = Some((ctx.event_loop, fds));
        Ok(())
    }

    fn reset(&mut self) {
        deregister(&mut self.active);
        // virtiofsd serves one driver session per connection; a guest reset of the device
        // leaves the back-end's rings stopped until the VM is recreated.
        for i in 0..NUM_QUEUES {
            if self.protocol {
                let _ = self.frontend.set_vring_enable(i, false);
            }
        }
    }
}
