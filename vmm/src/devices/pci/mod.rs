//! A minimal PCI bus: configuration mechanism #1 on ports 0xCF8/0xCFC, a host bridge at
//! 00:00.0 (Linux's direct probe needs one), and type-0 configuration space with BARs that the
//! VMM assigns (the guest may size them but not move them).

pub mod config;

use std::sync::{Arc, Mutex};

use crate::devices::bus::{lock, BusDevice};
pub use config::{ConfigSpace, PciBar};

pub const CONFIG_IO_PORT: u16 = 0xcf8;
pub const CONFIG_IO_LEN: u64 = 8;
/// Devices on bus 0 (32 slots, function 0 only).
pub const MAX_DEVICES: usize = 32;

/// A function on the bus: access to its configuration space.
pub trait PciDevice: Send {
    fn config_read(&mut self, reg: usize, offset: usize, data: &mut [u8]);
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]);
}

/// The host bridge: identification only.
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    pub fn new() -> Self {
        // Vendor 0x8086 device 0x0d57 is what other VMMs use for a virtual host bridge; the
        // class (0x0600, host bridge) is what Linux checks.
        HostBridge {
            config: ConfigSpace::new(0x8086, 0x0d57, 0x06, 0x00, 0x00, 0, 0, 0),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, reg: usize, offset: usize, data: &mut [u8]) {
        self.config.read(reg, offset, data)
    }
    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        self.config.write(reg, offset, data)
    }
}

/// Bus 0 and its configuration mechanism #1 ports.
pub struct PciBus {
    devices: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
    address: u32,
}

impl PciBus {
    pub fn new() -> Self {
        let mut devices: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = vec![None; MAX_DEVICES];
        devices[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        PciBus {
            devices,
            address: 0,
        }
    }

    /// The next free slot.
    pub fn next_slot(&self) -> Option<u8> {
        self.devices
            .iter()
            .position(|d| d.is_none())
            .map(|s| s as u8)
    }

    pub fn add(&mut self, slot: u8, dev: Arc<Mutex<dyn PciDevice>>) {
        if let Some(s) = self.devices.get_mut(usize::from(slot)) {
            *s = Some(dev);
        }
    }

    /// The selected device and register if the address register is enabled and points at
    /// bus 0, function 0 of a present device.
    fn selected(&self) -> Option<(&Arc<Mutex<dyn PciDevice>>, usize)> {
        let a = self.address;
        if a & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (a >> 16) & 0xff;
        let dev = ((a >> 11) & 0x1f) as usize;
        let func = (a >> 8) & 0x7;
        let reg = ((a >> 2) & 0x3f) as usize;
        if bus != 0 || func != 0 {
            return None;
        }
        self.devices.get(dev)?.as_ref().map(|d| (d, reg))
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for PciBus {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match offset {
            0..=3 => {
                let v = self.address.to_le_bytes();
                let o = offset as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = v.get(o + i).copied().unwrap_or(0xff);
                }
            }
            _ => {
                let o = (offset - 4) as usize;
                match self.selected() {
                    Some((d, reg)) if o + data.len() <= 4 => lock(d).config_read(reg, o, data),
                    _ => data.fill(0xff),
                }
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                self.address = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            }
            4..=7 => {
                let o = (offset - 4) as usize;
                if let Some((d, reg)) = self.selected() {
                    if o + data.len() <= 4 {
                        lock(d).config_write(reg, o, data);
                    }
                }
            }
            _ => {}
        }
    }
}
