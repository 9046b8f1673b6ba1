//! Modern virtio-pci (virtio 1.x, 4.1): one 64-bit memory BAR holding the common, ISR,
//! device-specific and notification structures, INTx interrupts through an irqfd, queue
//! notifications through ioeventfds so that a kick never exits to the VMM.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::bus::{lock, BusDevice};
use crate::devices::pci::{ConfigSpace, PciDevice};
use crate::devices::virtio::device::{
    ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::event_loop::EventLoop;

pub const BAR_SIZE: u64 = 0x4000;
const COMMON_OFFSET: u64 = 0x0;
const COMMON_LEN: u64 = 0x40;
const ISR_OFFSET: u64 = 0x1000;
const ISR_LEN: u64 = 0x4;
const DEVICE_OFFSET: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_LEN: u64 = 0x1000;
const NOTIFY_MULTIPLIER: u32 = 4;

const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const PCI_CAP_VENDOR: u8 = 0x09;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 0x40;
const STATUS_FAILED: u8 = 0x80;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
const NO_VECTOR: u16 = 0xffff;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("KVM {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
}

#[derive(Default, Clone, Copy)]
struct QueueConfig {
    size: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

pub struct VirtioPciDevice {
    config: ConfigSpace,
    device: Box<dyn VirtioDevice>,
    max_sizes: Vec<u16>,
    queues: Vec<QueueConfig>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    mem: GuestMemoryMmap,
    event_loop: Arc<EventLoop>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    config_generation: u8,
}

fn cap(cfg_type: u8, offset: u64, len: u64, extra: Option<u32>) -> Vec<u8> {
    // cap_len, cfg_type, bar, id, padding[2], offset, length (+ notify multiplier)
    let cap_len = if extra.is_some() { 20u8 } else { 16 };
    let mut b = vec![cap_len, cfg_type, 0, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(len as u32).to_le_bytes());
    if let Some(m) = extra {
        b.extend_from_slice(&m.to_le_bytes());
    }
    b
}

fn read_le(data: &mut [u8], v: u64) {
    let bytes = v.to_le_bytes();
    for (i, b) in data.iter_mut().enumerate() {
        *b = bytes.get(i).copied().unwrap_or(0);
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

impl VirtioPciDevice {
    /// Wraps `device` at BAR address `bar` (aligned to `BAR_SIZE`) with INTx on `gsi`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        vm: &VmFd,
        mem: GuestMemoryMmap,
        event_loop: Arc<EventLoop>,
        bar: u64,
        gsi: u32,
    ) -> Result<Self, TransportError> {
        let device_type = device.device_type();
        let class = if device_type == 1 {
            (0x02, 0x00)
        } else {
            (0xff, 0x00)
        };
        let mut config = ConfigSpace::new(
            0x1af4,
            0x1040 + device_type as u16,
            class.0,
            class.1,
            0,
            1,
            0x1af4,
            0x40,
        );
        config.add_bar64(0, bar, BAR_SIZE);
        config.set_interrupt(gsi as u8);
        config.add_capability(
            PCI_CAP_VENDOR,
            &cap(CAP_COMMON, COMMON_OFFSET, COMMON_LEN, None)[..],
        );
        config.add_capability(PCI_CAP_VENDOR, &cap(CAP_ISR, ISR_OFFSET, ISR_LEN, None)[..]);
        config.add_capability(
            PCI_CAP_VENDOR,
            &cap(CAP_DEVICE, DEVICE_OFFSET, DEVICE_LEN, None)[..],
        );
        config.add_capability(
            PCI_CAP_VENDOR,
            &cap(
                CAP_NOTIFY,
                NOTIFY_OFFSET,
                NOTIFY_LEN,
                Some(NOTIFY_MULTIPLIER),
            )[..],
        );

        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd)?;
        vm.register_irqfd(&irqfd, gsi)
            .map_err(|e| TransportError::Kvm("IRQFD", e))?;
        let max_sizes = device.queue_max_sizes().to_vec();
        let mut queue_evts = Vec::new();
        for i in 0..max_sizes.len() {
            let evt = EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd)?;
            let addr = bar + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_MULTIPLIER);
            vm.register_ioevent(&evt, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|e| TransportError::Kvm("IOEVENTFD", e))?;
            queue_evts.push(evt);
        }
        Ok(VirtioPciDevice {
            config,
            device,
            queues: vec![QueueConfig::default(); max_sizes.len()],
            max_sizes,
            queue_evts,
            interrupt: Interrupt::new(irqfd),
            mem,
            event_loop,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            config_generation: 0,
        })
    }

    fn status(&self) -> u8 {
        if self.interrupt.needs_reset.load(Ordering::SeqCst) {
            self.status | STATUS_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn selected(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn reset(&mut self) {
        if self.status & STATUS_DRIVER_OK != 0 {
            self.device.reset();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.interrupt.isr.store(0, Ordering::SeqCst);
        self.interrupt.needs_reset.store(false, Ordering::SeqCst);
        for q in &mut self.queues {
            *q = QueueConfig::default();
        }
    }

    fn activate(&mut self) -> Result<(), String> {
        let mut queues = Vec::new();
        for (i, qc) in self.queues.iter().enumerate() {
            if !qc.enabled {
                continue;
            }
            let mut q = Queue::new(self.max_sizes[i]).map_err(|e| format!("queue {i}: {e:?}"))?;
            q.try_set_size(qc.size)
                .map_err(|e| format!("queue {i} size {}: {e:?}", qc.size))?;
            q.try_set_desc_table_address(GuestAddress(qc.desc))
                .map_err(|e| format!("queue {i} descriptor table: {e:?}"))?;
            q.try_set_avail_ring_address(GuestAddress(qc.avail))
                .map_err(|e| format!("queue {i} avail ring: {e:?}"))?;
            q.try_set_used_ring_address(GuestAddress(qc.used))
                .map_err(|e| format!("queue {i} used ring: {e:?}"))?;
            q.set_event_idx(self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0);
            q.set_ready(true);
            if !q.is_valid(&self.mem) {
                return Err(format!("queue {i} rings lie outside guest memory"));
            }
            let evt = self.queue_evts[i]
                .try_clone()
                .map_err(|e| format!("queue {i} eventfd: {e}"))?;
            queues.push((i, q, evt));
        }
        self.device
            .activate(ActivateContext {
                mem: self.mem.clone(),
                interrupt: self.interrupt.clone(),
                queues,
                event_loop: self.event_loop.clone(),
                features: self.driver_features,
            })
            .map_err(|e| e.to_string())
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let newly = v & !self.status;
        let mut v = v | self.status;
        if newly & STATUS_FEATURES_OK != 0 && self.driver_features & VIRTIO_F_VERSION_1 == 0 {
            // Legacy drivers are not supported: refuse FEATURES_OK.
            v &= !STATUS_FEATURES_OK;
        }
        if newly & STATUS_DRIVER_OK != 0 && v & STATUS_FEATURES_OK != 0 {
            if let Err(e) = self.activate() {
                crate::guest_warn!(
                    device_type = self.device.device_type(),
                    "activation failed: {e}"
                );
                self.status = v & !STATUS_DRIVER_OK;
                self.interrupt.fail_device(&e);
                return;
            }
        } else if newly & STATUS_DRIVER_OK != 0 {
            v &= !STATUS_DRIVER_OK;
        }
        let _ = (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FAILED);
        self.status = v;
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let features = self.device.features() | VIRTIO_F_VERSION_1;
        let q = self.queues.get(usize::from(self.queue_select)).copied();
        let qmax = self.max_sizes.get(usize::from(self.queue_select)).copied();
        let v: u64 = match offset {
            0x00 => u64::from(self.device_feature_select),
            0x04 => match self.device_feature_select {
                0 => features & 0xffff_ffff,
                1 => features >> 32,
                _ => 0,
            },
            0x08 => u64::from(self.driver_feature_select),
            0x0c => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            0x10 => u64::from(NO_VECTOR),
            0x12 => self.max_sizes.len() as u64,
            0x14 => u64::from(self.status()),
            0x15 => u64::from(self.config_generation),
            0x16 => u64::from(self.queue_select),
            0x18 => q
                .map(|q| {
                    if q.size == 0 {
                        qmax.unwrap_or(0)
                    } else {
                        q.size
                    }
                })
                .unwrap_or(0)
                .into(),
            0x1a => u64::from(NO_VECTOR),
            0x1c => q.map(|q| u64::from(q.enabled)).unwrap_or(0),
            0x1e => u64::from(self.queue_select),
            0x20 => q.map(|q| q.desc).unwrap_or(0),
            0x24 => q.map(|q| q.desc >> 32).unwrap_or(0),
            0x28 => q.map(|q| q.avail).unwrap_or(0),
            0x2c => q.map(|q| q.avail >> 32).unwrap_or(0),
            0x30 => q.map(|q| q.used).unwrap_or(0),
            0x34 => q.map(|q| q.used >> 32).unwrap_or(0),
            _ => 0,
        };
        read_le(data, v);
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let v = le_value(data);
        // Queue and feature configuration is frozen once the device runs.
        let live = self.status & STATUS_DRIVER_OK != 0;
        match offset {
            0x00 => self.device_feature_select = v as u32,
            0x08 => self.driver_feature_select = v as u32,
            0x0c if self.status & STATUS_FEATURES_OK == 0 => {
                let offered = self.device.features() | VIRTIO_F_VERSION_1;
                match self.driver_feature_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | (v & 0xffff_ffff & offered)
                    }
                    1 => {
                        self.driver_features = (self.driver_features & 0xffff_ffff)
                            | ((v << 32) & offered & !0xffff_ffff)
                    }
                    _ => {}
                }
            }
            0x14 => self.write_status(v as u8),
            0x16 => self.queue_select = v as u16,
            0x18 if !live => {
                if let Some(q) = self.selected() {
                    q.size = v as u16;
                }
            }
            0x1c if !live => {
                if let Some(q) = self.selected() {
                    q.enabled = v & 1 == 1;
                }
            }
            0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34 if !live => {
                let high = offset & 4 != 0;
                let wide = data.len() == 8;
                if let Some(q) = self.selected() {
                    let field = match offset & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    *field = if wide {
                        v
                    } else if high {
                        (*field & 0xffff_ffff) | (v << 32)
                    } else {
                        (*field & !0xffff_ffff) | (v & 0xffff_ffff)
                    };
                }
            }
            _ => {}
        }
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, reg: usize, offset: usize, data: &mut [u8]) {
        self.config.read(reg, offset, data)
    }
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data)
    }
}

impl BusDevice for VirtioPciDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.common_read(o, data),
            o if (ISR_OFFSET..ISR_OFFSET + ISR_LEN).contains(&o) => {
                // Reading the ISR acknowledges the interrupt.
                let isr = self.interrupt.isr.swap(0, Ordering::SeqCst);
                read_le(data, u64::from(isr));
            }
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            o if o < COMMON_OFFSET + COMMON_LEN => self.common_write(o, data),
            o if (DEVICE_OFFSET..DEVICE_OFFSET + DEVICE_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_LEN).contains(&o) => {
                // Only reached if KVM did not take the write through the ioeventfd (e.g. a
                // wider access): forward it.
                let q = ((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as usize;
                if let Some(evt) = self.queue_evts.get(q) {
                    let _ = evt.write(1);
                }
            }
            _ => {}
        }
    }
}

/// A `VirtioPciDevice` shared between the PCI configuration bus and the MMIO bus.
pub type SharedVirtioPci = Arc<Mutex<VirtioPciDevice>>;

/// Helper for tests and the builder: the device's current status byte.
pub fn device_status(dev: &SharedVirtioPci) -> u8 {
    lock(dev).status()
}
