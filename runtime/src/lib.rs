//! husk's host runtime library: pod sandboxes (a VM with husk-agent as PID
//! 1, its virtio-fs share and vsock), the hypervisor backends that run the
//! VM, and the host side of the agent protocol. `huskd` (the CRI server,
//! its own crate) is built on top of [`sandbox::Sandbox`]; nothing here
//! knows CRI.

pub mod agent;
pub mod components;
pub mod confined;
pub mod files;
pub mod hypervisor;
pub mod mounts;
pub mod network;
pub mod process;
pub mod procfs;
pub mod sandbox;
pub mod virtiofsd;

pub use agent::{AgentConn, AgentError};
pub use components::{GuestImage, MissingComponent};
pub use hypervisor::{Hypervisor, HypervisorChoice, HypervisorError, Vm, VmConfig};
pub use sandbox::{
    ExitInfo, ProcessStdio, Rootfs, Sandbox, SandboxConfig, SandboxError, SandboxTimings,
};

/// The protocol types callers need (StdioConfig, StreamKind, responses).
pub use husk_proto;

/// Image store and registry client (CRI ImageService backend).
pub mod image;
