//! virtio-vsock with Firecracker-style hybrid vsock on the host side.
//!
//! - [`packet`]: packet header codec and descriptor-chain parsing (any descriptor layout).
//! - [`muxer`]: the transport-independent backend ([`VsockMuxer`]) that maps guest streams to
//!   host unix sockets. husk-vmm's own device drives it with its queues directly.
//! - `connection`: the muxer's per-connection state machine.
//! - [`vhost_user`]: a thin adapter serving the muxer to QEMU as a vhost-user-vsock backend
//!   (binary `husk-vsock`).
//! - [`device`]: husk-vmm's virtio-vsock device, the other user of the muxer.

mod connection;
pub mod device;
pub mod muxer;
pub mod packet;
pub mod vhost_user;

#[cfg(test)]
mod tests;

pub use muxer::{MuxerConfig, MuxerError, VsockMuxer};

/// Index of the RX virtqueue (device to driver).
pub const RX_QUEUE: usize = 0;
/// Index of the TX virtqueue (driver to device).
pub const TX_QUEUE: usize = 1;
/// Index of the event virtqueue (unused by this device: no transport resets are sent).
pub const EVT_QUEUE: usize = 2;
/// Number of virtqueues of a virtio-vsock device.
pub const NUM_QUEUES: usize = 3;

/// Device config space: the guest CID, little-endian u64.
pub fn config_space(guest_cid: u64) -> [u8; 8] {
    guest_cid.to_le_bytes()
}
