//! Devices of husk-vmm.

pub mod virtio;
pub mod bus;
pub mod legacy;
pub mod pci;
pub mod serial;
