//! Devices of husk-vmm.

pub mod virtio;
