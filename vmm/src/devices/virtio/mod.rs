//! Virtio devices.

pub mod vsock;

// husk-vmm monitor: device model interface, transport and devices.
pub mod device;
pub mod fs;
pub mod net;
pub mod rng;
pub mod transport;
