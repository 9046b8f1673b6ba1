//! Typed errors of the image store.
//!
//! Every variant names the image (as the caller spelled it or as normalised) and, for registry
//! failures, the registry endpoint, so that the CRI server can log and report them as they are.
//! [`Error::kind`] gives the gRPC status class each variant maps to.

use std::io;
use std::path::PathBuf;

/// Result type of the image store.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The gRPC status class of an [`Error`] (the CRI server maps these 1:1 to `tonic::Code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// `InvalidArgument`
    InvalidArgument,
    /// `NotFound`
    NotFound,
    /// `AlreadyExists`
    AlreadyExists,
    /// `Unavailable`
    Unavailable,
    /// `Unauthenticated`
    Unauthenticated,
    /// `PermissionDenied`
    PermissionDenied,
    /// `DataLoss`
    DataLoss,
    /// `FailedPrecondition`
    FailedPrecondition,
    /// `Unimplemented`
    Unimplemented,
    /// `Internal`
    Internal,
}

/// Errors returned by [`crate::image::ImageStore`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },

    /// A caller-supplied argument other than an image reference is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// The registry has no such repository, tag or digest.
    #[error("image {image} not found in registry {registry}: {detail}")]
    NotFound {
        image: String,
        registry: String,
        detail: String,
    },

    /// The image is not in the local store.
    #[error("image {0} not found in the image store")]
    ImageNotFound(String),

    /// No rootfs was prepared for this container.
    #[error("no root filesystem prepared for container {0}")]
    RootfsNotFound(String),

    /// A rootfs for this container already exists.
    #[error("root filesystem for container {0} already prepared")]
    RootfsExists(String),

    /// The registry could not be reached, timed out or answered with a server error.
    #[error("registry {registry} unavailable while pulling {image}: {detail}")]
    Unavailable {
        image: String,
        registry: String,
        detail: String,
    },

    /// The registry rejected the credentials (or asked for some that were not given).
    #[error("authentication to registry {registry} failed for {image}: {detail}")]
    Unauthenticated {
        image: String,
        registry: String,
        detail: String,
    },

    /// The registry accepted the credentials but denies access to the repository.
    #[error("registry {registry} denied access to {image}: {detail}")]
    PermissionDenied {
        image: String,
        registry: String,
        detail: String,
    },

    /// Downloaded or unpacked content does not match the digest it was announced with.
    #[error(
        "digest mismatch for {what} of {image} from registry {registry}: expected {expected}, got {actual}"
    )]
    DigestMismatch {
        image: String,
        registry: String,
        what: String,
        expected: String,
        actual: String,
    },

    /// The registry sent something this store does not handle (schema 1, foreign media types,
    /// no linux/amd64 entry in an index, a config that does not parse, ...).
    #[error("unsupported content for {image} from registry {registry}: {detail}")]
    Unsupported {
        image: String,
        registry: String,
        detail: String,
    },

    /// Any other registry protocol failure.
    #[error("registry {registry} failed while pulling {image}: {detail}")]
    Registry {
        image: String,
        registry: String,
        detail: String,
    },

    /// A layer tries to write outside its directory or is otherwise malformed.
    #[error("refusing layer {layer} of {image}: {detail}")]
    BadLayer {
        image: String,
        layer: String,
        detail: String,
    },

    /// The image is used by a container and the store was told not to remove it.
    #[error("image {image} ({id}) is in use by a container")]
    InUse { image: String, id: String },

    /// Mounting or unmounting a container root filesystem failed.
    #[error("{op} of {target} failed: {source}")]
    Mount {
        op: &'static str,
        target: PathBuf,
        #[source]
        source: io::Error,
    },

    /// Store metadata on disk does not parse.
    #[error("corrupt image store metadata {path}: {detail}")]
    Corrupt { path: PathBuf, detail: String },

    /// Local I/O failure, with what the store was doing.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The gRPC status class for this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidReference { .. } | Error::InvalidArgument(_) => {
                ErrorKind::InvalidArgument
            }
            Error::NotFound { .. } | Error::ImageNotFound(_) | Error::RootfsNotFound(_) => {
                ErrorKind::NotFound
            }
            Error::RootfsExists(_) => ErrorKind::AlreadyExists,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::Unauthenticated { .. } => ErrorKind::Unauthenticated,
            Error::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            Error::DigestMismatch { .. } | Error::Corrupt { .. } => ErrorKind::DataLoss,
            Error::BadLayer { .. } => ErrorKind::DataLoss,
            Error::InUse { .. } => ErrorKind::FailedPrecondition,
            Error::Unsupported { .. } => ErrorKind::Unimplemented,
            Error::Registry { .. } | Error::Mount { .. } | Error::Io { .. } => ErrorKind::Internal,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Attaches a description of what was being done to an `io::Error`.
impl From<crate::files::WriteError> for Error {
    fn from(e: crate::files::WriteError) -> Self {
        Error::io(format!("{} {}", e.op, e.path.display()), e.source)
    }
}

pub(crate) trait IoContext<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::result::Result<T, io::Error> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(f(), e))
    }
}
