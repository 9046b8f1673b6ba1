//! The interface between huskd and husk-vmm, in one place so that both sides compile against
//! the same types: the JSON VM config husk-vmm reads at start ([`config`]) and the
//! line-delimited JSON protocol of its control socket ([`control`]).
//!
//! Only data and its serde mapping live here; what husk-vmm checks beyond the shape (limits
//! that depend on its guest memory layout) stays in husk-vmm.

#![forbid(unsafe_code)]

pub mod config;
pub mod control;

pub use config::{Devices, FsConfig, NetConfig, VmConfig, VsockConfig};
pub use control::{Reply, Request, Status, VmState};
