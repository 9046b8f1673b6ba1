//! Placeholder until this crate lands.

pub mod devices;
