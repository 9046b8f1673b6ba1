//! Placeholder until this crate lands.

pub mod devices;

// husk-vmm monitor.
pub mod arch;
pub mod builder;
pub mod config;
pub mod control;
pub mod event_loop;
pub mod vstate;

pub use builder::{launch, Outcome, Vmm};
