//! husk-vmm, the builtin microVM monitor (one process per sandbox VM, binary `husk-vmm`), and
//! the hybrid-vsock backend it shares with QEMU sandboxes (binary `husk-vsock`).

pub mod console_log;
pub mod devices;
#[macro_use]
pub mod log_limit;

// husk-vmm monitor.
pub mod arch;
pub mod builder;
pub mod config;
pub mod control;
pub mod event_loop;
pub mod vstate;

pub use builder::{launch, Outcome, Vmm};
