//! Devices of husk-vmm.

pub mod virtio;

// husk-vmm monitor devices.
pub mod bus;
pub mod legacy;
pub mod pci;
pub mod serial;
