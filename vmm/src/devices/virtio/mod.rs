//! Virtio devices.

pub mod vsock;
pub mod device;
pub mod rng;
pub mod transport;
pub mod vsock_device;
pub mod fs;
pub mod net;
