//! Placeholder until this crate lands.

pub mod devices;
pub mod arch;
pub mod builder;
pub mod config;
pub mod control;
pub mod event_loop;
pub mod vstate;
pub mod test_guest;
