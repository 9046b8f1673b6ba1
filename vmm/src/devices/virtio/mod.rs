//! Virtio devices.

pub mod vsock;
