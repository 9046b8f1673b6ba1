//! What the session logic writes to, whatever the transport: a SPDY stream
//! or one channel of a WebSocket connection.

use crate::spdy::StreamWriter;
use crate::BoxFuture;

/// One outgoing channel of a session (stdout, stderr, error, a forwarded
/// connection's data). Writes wait while the transport's queue is full, so
/// a slow client pushes back on the process instead of growing a buffer.
pub trait OutChannel: Send + Sync {
    fn write<'a>(&'a self, data: &'a [u8]) -> BoxFuture<'a, std::io::Result<()>>;
    /// The client reads EOF on this channel (where the transport can say
    /// so; a WebSocket channel ends with its connection).
    fn close(&self) -> BoxFuture<'_, std::io::Result<()>>;
}

impl OutChannel for StreamWriter {
    fn write<'a>(&'a self, data: &'a [u8]) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(StreamWriter::write(self, data))
    }

    fn close(&self) -> BoxFuture<'_, std::io::Result<()>> {
        Box::pin(StreamWriter::close(self))
    }
}
