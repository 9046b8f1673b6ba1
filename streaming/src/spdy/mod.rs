//! SPDY/3.1 as kubelet's clients speak it (moby/spdystream under
//! k8s.io/apimachinery's httpstream): frames, zlib-compressed header
//! blocks, and a connection that multiplexes the streams a client opens.
//!
//! Only the server side that the Kubernetes streaming protocols need is
//! here: the client opens every stream (SYN_STREAM), the server answers
//! each (SYN_REPLY), data flows both ways, either side half-closes with
//! FIN. Server push, priorities and the credential frame are not used by
//! these clients. Flow control is left to TCP, as spdystream does: it
//! neither sends nor honours WINDOW_UPDATE for data it writes.
//!
//! There is no maintained SPDY crate in Rust; this module is husk's own,
//! written from the SPDY/3.1 draft, and tested against itself and against
//! crictl (`tests/`).

mod conn;
mod frame;
mod headers;

pub use conn::{Connection, IncomingStream, Limits, StreamReader, StreamWriter};

pub use frame::{rst, ControlFrame, Frame, FrameError, FrameReader, FLAG_FIN};
pub use headers::{HeaderBlockError, HeaderCodec, Headers};
