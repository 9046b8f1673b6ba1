//! Fixtures that several of husk's test suites and benchmarks need: tiny
//! guests for husk-vmm and small measuring helpers. A dev-only crate, so
//! none of this becomes part of a shipped crate's API.

pub mod bench;
pub mod guest;
