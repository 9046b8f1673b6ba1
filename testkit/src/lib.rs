//! Fixtures that several of husk's test suites and benchmarks need: tiny
//! guests for husk-vmm, busybox root filesystems, a local OCI registry and
//! small measuring helpers. A dev-only crate, so none of this becomes part of a shipped
//! crate's API.

#![forbid(unsafe_code)]

use std::path::PathBuf;

pub mod bench;
pub mod busybox;
pub mod go;
pub mod guest;
pub mod registry;

/// An environment variable naming a path; unset and empty are the same, so
/// `VAR= cargo test` falls back to the default.
pub fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Reads a stream to its end; an absent stream (one the caller did not ask
/// for) reads as empty, so stdout and stderr can be joined alike.
pub async fn read_all<R>(s: Option<R>) -> std::io::Result<Vec<u8>>
where
    R: tokio::io::AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut v = Vec::new();
    if let Some(mut s) = s {
        s.read_to_end(&mut v).await?;
    }
    Ok(v)
}

/// `sha256:<hex>`, the form OCI descriptors and diff ids use.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}
