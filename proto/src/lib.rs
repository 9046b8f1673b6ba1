//! The husk host-agent protocol.
//!
//! - [`agent`]: the protobuf messages of `proto/agent.proto` and the typed
//!   ttrpc glue of its `Agent` service (server trait, adapter, client).
//! - [`ttrpc`]: a small ttrpc implementation (client and server), wire
//!   compatible with containerd's.
//! - [`stream`]: length-delimited messages for the READY and STREAM
//!   connections, which carry raw bytes after their handshake.
//! - [`ids`]: the rule for sandbox, container and exec ids, which become
//!   file names on both sides.

#![forbid(unsafe_code)]

pub mod ids;
pub mod stream;
pub mod ttrpc;

/// Messages and service glue generated from `proto/agent.proto`
/// (package `husk.agent.v1`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/husk.agent.v1.rs"));
}

/// Version of this protocol crate; the agent reports it in `Health` and
/// `ReadyNotice`, so host and guest can tell whether they were built together.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where the agent mounts the sandbox's virtio-fs share inside the guest.
pub const GUEST_SHARE_DIR: &str = "/run/husk/sandbox";

/// vsock ports of the protocol's connections (see `proto/agent.proto`).
pub mod ports {
    /// guest -> host: the agent announces it is serving (one `ReadyNotice`).
    pub const READY_PORT: u32 = 1023;
    /// host -> guest: ttrpc, service `husk.agent.v1.Agent`.
    pub const TTRPC_PORT: u32 = 1024;
    /// host -> guest: one connection per stdio stream of a process.
    pub const STREAM_PORT: u32 = 1025;
}
