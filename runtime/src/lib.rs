//! Placeholder until this crate lands.

/// Image store and registry client (CRI ImageService backend).
pub mod image;
