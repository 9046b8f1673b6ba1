//! A minimal ttrpc (containerd's "GRPC for low-memory environments"),
//! unary calls only, wire compatible with containerd's Go and Rust
//! implementations.
//!
//! A frame is a 10-byte header (payload length u32 BE, stream id u32 BE,
//! message type u8, flags u8) followed by the payload, at most
//! [`MESSAGE_LENGTH_MAX`] bytes. A client opens a stream with a `Request`
//! frame on a fresh odd stream id; the server answers with one `Response`
//! frame on the same id. Responses may come in any order.
//!
//! Written here rather than taken from the `ttrpc` crate because that crate
//! is tied to rust-protobuf (husk uses prost) and its client and server do
//! not bound what an untrusted peer can make them do; the `ttrpc` crate is
//! used as an interoperability oracle in the tests.

mod client;
mod frame;
mod server;
mod status;
pub mod wire;

pub use client::Client;
pub use frame::{
    FrameHeader, FLAG_NO_DATA, FLAG_REMOTE_CLOSED, FLAG_REMOTE_OPEN, MESSAGE_HEADER_LENGTH,
    MESSAGE_LENGTH_MAX, MESSAGE_TYPE_DATA, MESSAGE_TYPE_REQUEST, MESSAGE_TYPE_RESPONSE,
};
pub use server::{Server, Service};
pub use status::{Code, Status};

/// Why a ttrpc call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The server answered with a non-OK status.
    #[error("rpc failed: {0}")]
    Status(#[from] Status),
    /// No answer within the call's timeout.
    #[error("rpc timed out")]
    Timeout,
    /// The connection is closed (or was lost while the call was pending).
    #[error("ttrpc connection closed")]
    Closed,
    #[error("ttrpc i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("decoding a protobuf message failed: {0}")]
    Decode(#[from] prost::DecodeError),
    /// The peer broke the framing or the protocol.
    #[error("ttrpc protocol error: {0}")]
    Protocol(String),
}

impl Error {
    /// The status code the call failed with, if the server sent one.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Status(s) => Some(s.code),
            _ => None,
        }
    }

    /// The server's status, if the call failed with one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Error::Status(s) => Some(s),
            _ => None,
        }
    }
}

/// Decodes a request message for a generated service adapter; a payload that
/// does not decode is the caller's fault (`InvalidArgument`).
#[doc(hidden)]
pub fn decode_request<M: prost::Message + Default>(
    method: &str,
    payload: bytes::Bytes,
) -> Result<M, Status> {
    M::decode(payload)
        .map_err(|e| Status::invalid_argument(format!("decoding the {method} request: {e}")))
}
