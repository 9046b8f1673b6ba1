//! The server side of a SPDY/3.1 connection: the client opens streams,
//! each is answered with a SYN_REPLY (as kubelet's server does) and handed
//! to the caller as a reader and a writer.
//!
//! One task reads frames and routes data to per-stream channels; one task
//! owns the socket's write half and the deflate stream, so frames and
//! header blocks go out in the order the compression state needs. Every
//! queue is bounded: a slow consumer stops the reader, which stops reading
//! the socket, which pushes back on the client through TCP; nothing a
//! client sends is buffered without limit.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::mpsc;

use super::frame::{rst, ControlFrame, Frame, FrameReader, FLAG_FIN};
use super::headers::{HeaderCodec, Headers};

/// Bounds on what one client can make the server hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest frame read (SPDY allows 16 MiB; kubelet's clients write
    /// 32 KiB at a time).
    pub max_frame: usize,
    /// Streams open at once; more are refused (RST_STREAM REFUSED_STREAM).
    pub max_streams: usize,
    /// Data frames queued per stream before the connection's reader waits.
    pub stream_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame: 1 << 20,
            max_streams: 512,
            stream_queue: 16,
        }
    }
}

/// Largest data frame written: big enough for throughput, small enough
/// that streams interleave.
const WRITE_CHUNK: usize = 32 * 1024;

/// A stream the client opened.
pub struct IncomingStream {
    pub id: u32,
    pub headers: Headers,
    pub reader: StreamReader,
    pub writer: StreamWriter,
}

impl IncomingStream {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

enum Out {
    Frame(Frame),
    Reply(u32),
}

/// A served connection. Dropping it stops both tasks and closes the socket.
pub struct Connection {
    incoming: mpsc::Receiver<IncomingStream>,
    out: mpsc::Sender<Out>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl Connection {
    /// Starts serving `io` (an upgraded HTTP connection).
    pub fn serve<IO>(io: IO, limits: Limits) -> Connection
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::channel(64);
        let (in_tx, in_rx) = mpsc::channel(limits.max_streams.min(64));
        let writer = tokio::spawn(write_loop(w, out_rx));
        let reader = tokio::spawn(read_loop(
            FrameReader::new(r, limits.max_frame),
            out_tx.clone(),
            in_tx,
            limits,
        ));
        Connection {
            incoming: in_rx,
            out: out_tx,
            reader,
            writer,
        }
    }

    /// The next stream the client opens; `None` once it cannot open more
    /// (connection closed, GOAWAY, or a protocol error).
    pub async fn accept(&mut self) -> Option<IncomingStream> {
        self.incoming.recv().await
    }

    /// Says GOAWAY, lets what is queued before it go out, and closes the
    /// socket.
    pub async fn close(mut self) {
        let _ = self
            .out
            .send(Out::Frame(Frame::Control(ControlFrame::GoAway {
                last_good_stream_id: 0,
                status: 0,
            })))
            .await;
        self.reader.abort();
        // The writer ends at the GOAWAY; a bound keeps a peer that stopped
        // reading from holding the close.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), &mut self.writer).await;
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<Out>) {
    let mut codec = HeaderCodec::new();
    let mut buf = Vec::with_capacity(WRITE_CHUNK + 64);
    while let Some(out) = rx.recv().await {
        buf.clear();
        let frame = match out {
            Out::Frame(f) => f,
            Out::Reply(stream_id) => match codec.encode(&[]) {
                Ok(block) => Frame::Control(ControlFrame::SynReply {
                    stream_id,
                    flags: 0,
                    header_block: block.into(),
                }),
                Err(e) => {
                    tracing::warn!(%e, "SPDY: cannot encode a reply");
                    return;
                }
            },
        };
        let goaway = matches!(frame, Frame::Control(ControlFrame::GoAway { .. }));
        frame.encode(&mut buf);
        if w.write_all(&buf).await.is_err() {
            return;
        }
        if goaway {
            break;
        }
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut frames: FrameReader<R>,
    out: mpsc::Sender<Out>,
    incoming: mpsc::Sender<IncomingStream>,
    limits: Limits,
) {
    let mut codec = HeaderCodec::new();
    let mut streams: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let mut last_id = 0u32;
    let reset = |stream_id, status| {
        Out::Frame(Frame::Control(ControlFrame::RstStream {
            stream_id,
            status,
        }))
    };
    loop {
        let frame = match frames.next().await {
            Ok(Some(f)) => f,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(%e, "SPDY connection ends");
                return;
            }
        };
        match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                let Some(tx) = streams.get(&stream_id) else {
                    let _ = out.send(reset(stream_id, rst::INVALID_STREAM)).await;
                    continue;
                };
                // An unread stream (the handler dropped its reader) just
                // drops the data; the connection goes on.
                if !data.is_empty() {
                    let _ = tx.send(data).await;
                }
                if flags & FLAG_FIN != 0 {
                    streams.remove(&stream_id);
                }
            }
            Frame::Control(ControlFrame::SynStream {
                stream_id,
                flags,
                header_block,
                ..
            }) => {
                // The block must be inflated even for a refused stream:
                // the zlib stream carries on across blocks.
                let headers = match codec.decode(&header_block) {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::debug!(%e, "SPDY: bad header block, closing");
                        return;
                    }
                };
                if stream_id % 2 == 0 || stream_id <= last_id {
                    let _ = out.send(reset(stream_id, rst::PROTOCOL_ERROR)).await;
                    continue;
                }
                last_id = stream_id;
                streams.retain(|_, tx| !tx.is_closed());
                if streams.len() >= limits.max_streams {
                    let _ = out.send(reset(stream_id, rst::REFUSED_STREAM)).await;
                    continue;
                }
                let (tx, rx) = mpsc::channel(limits.stream_queue);
                if flags & FLAG_FIN == 0 {
                    streams.insert(stream_id, tx);
                }
                if out.send(Out::Reply(stream_id)).await.is_err() {
                    return;
                }
                let stream = IncomingStream {
                    id: stream_id,
                    headers,
                    reader: StreamReader {
                        rx,
                        buf: Bytes::new(),
                    },
                    writer: StreamWriter {
                        id: stream_id,
                        out: out.clone(),
                    },
                };
                if incoming.send(stream).await.is_err() {
                    // Nobody accepts streams any more: refuse the rest.
                    let _ = out.send(reset(stream_id, rst::REFUSED_STREAM)).await;
                }
            }
            Frame::Control(ControlFrame::Headers { header_block, .. })
            | Frame::Control(ControlFrame::SynReply { header_block, .. }) => {
                if codec.decode(&header_block).is_err() {
                    return;
                }
            }
            Frame::Control(ControlFrame::RstStream { stream_id, .. }) => {
                streams.remove(&stream_id);
            }
            Frame::Control(ControlFrame::Ping { id }) => {
                // Only the client's (odd) pings are answered; an even id
                // would be an answer to a ping this side never sends.
                if id % 2 == 1 {
                    let ping = Frame::Control(ControlFrame::Ping { id });
                    if out.send(Out::Frame(ping)).await.is_err() {
                        return;
                    }
                }
            }
            Frame::Control(ControlFrame::GoAway { .. }) => return,
            Frame::Control(
                ControlFrame::Settings { .. }
                | ControlFrame::WindowUpdate { .. }
                | ControlFrame::Unknown { .. },
            ) => {}
        }
    }
}

/// The client's data on one stream; EOF at its FIN (or when the
/// connection ends).
pub struct StreamReader {
    rx: mpsc::Receiver<Bytes>,
    buf: Bytes,
}

impl AsyncRead for StreamReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.buf.is_empty() {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(b)) => self.buf = b,
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf.split_to(n));
        Poll::Ready(Ok(()))
    }
}

/// Writes data frames on one stream.
#[derive(Clone)]
pub struct StreamWriter {
    id: u32,
    out: mpsc::Sender<Out>,
}

impl StreamWriter {
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Sends `data`, in frames of at most 32 KiB; waits while the
    /// connection's queue is full.
    pub async fn write(&self, data: &[u8]) -> std::io::Result<()> {
        for chunk in data.chunks(WRITE_CHUNK) {
            self.send(0, Bytes::copy_from_slice(chunk)).await?;
        }
        Ok(())
    }

    /// Half-closes the stream (FIN): the client reads EOF.
    pub async fn close(&self) -> std::io::Result<()> {
        self.send(FLAG_FIN, Bytes::new()).await
    }

    /// Resets the stream (RST_STREAM CANCEL).
    pub async fn reset(&self) {
        let _ = self
            .out
            .send(Out::Frame(Frame::Control(ControlFrame::RstStream {
                stream_id: self.id,
                status: rst::CANCEL,
            })))
            .await;
    }

    async fn send(&self, flags: u8, data: Bytes) -> std::io::Result<()> {
        self.out
            .send(Out::Frame(Frame::Data {
                stream_id: self.id,
                flags,
                data,
            }))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, DuplexStream};

    /// A client speaking the frames a spdystream client sends.
    struct Client {
        frames: FrameReader<tokio::io::ReadHalf<DuplexStream>>,
        w: tokio::io::WriteHalf<DuplexStream>,
        codec: HeaderCodec,
    }

    impl Client {
        fn new(io: DuplexStream) -> Self {
            let (r, w) = tokio::io::split(io);
            Client {
                frames: FrameReader::new(r, 1 << 24),
                w,
                codec: HeaderCodec::new(),
            }
        }

        async fn send(&mut self, f: Frame) {
            let mut buf = Vec::new();
            f.encode(&mut buf);
            self.w.write_all(&buf).await.unwrap();
        }

        async fn open(&mut self, id: u32, headers: &[(&str, &str)], flags: u8) {
            let block = self.codec.encode(headers).unwrap();
            self.send(Frame::Control(ControlFrame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                flags,
                header_block: block.into(),
            }))
            .await;
        }

        async fn data(&mut self, id: u32, data: &[u8], flags: u8) {
            self.send(Frame::Data {
                stream_id: id,
                flags,
                data: Bytes::copy_from_slice(data),
            })
            .await;
        }

        async fn next(&mut self) -> Option<Frame> {
            let f = self.frames.next().await.unwrap();
            if let Some(Frame::Control(ControlFrame::SynReply { header_block, .. })) = &f {
                self.codec.decode(header_block).unwrap();
            }
            f
        }
    }

    fn pair(limits: Limits) -> (Connection, Client) {
        let (a, b) = tokio::io::duplex(1 << 20);
        (Connection::serve(a, limits), Client::new(b))
    }

    /// Streams are answered, data flows both ways, FIN is EOF, pings are
    /// answered, and the server's writes arrive in order.
    #[tokio::test]
    async fn streams_echo() {
        let (mut conn, mut client) = pair(Limits::default());
        client.open(1, &[("streamtype", "stdin")], 0).await;
        client.open(3, &[("streamtype", "stdout")], 0).await;
        let mut stdin = conn.accept().await.unwrap();
        let stdout = conn.accept().await.unwrap();
        assert_eq!((stdin.id, stdin.header("streamtype")), (1, Some("stdin")));
        assert_eq!(stdout.header("streamtype"), Some("stdout"));
        client.data(1, b"hello ", 0).await;
        client.data(1, b"world", FLAG_FIN).await;
        client
            .send(Frame::Control(ControlFrame::Ping { id: 1 }))
            .await;
        let mut got = String::new();
        stdin.reader.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "hello world");
        let big = vec![7u8; 100_000];
        stdout.writer.write(&big).await.unwrap();
        stdout.writer.close().await.unwrap();

        let (mut replies, mut pong, mut data, mut fin) = (0, false, Vec::new(), false);
        while !(fin && pong) {
            match client.next().await.unwrap() {
                Frame::Control(ControlFrame::SynReply { .. }) => replies += 1,
                Frame::Control(ControlFrame::Ping { id: 1 }) => pong = true,
                Frame::Data {
                    stream_id: 3,
                    flags,
                    data: d,
                } => {
                    assert!(d.len() <= WRITE_CHUNK);
                    data.extend_from_slice(&d);
                    fin = flags & FLAG_FIN != 0;
                }
                f => panic!("unexpected {f:?}"),
            }
        }
        assert_eq!(replies, 2);
        assert_eq!(data, big);
        conn.close().await;
        assert_eq!(
            client.next().await,
            Some(Frame::Control(ControlFrame::GoAway {
                last_good_stream_id: 0,
                status: 0
            }))
        );
        assert_eq!(client.next().await, None);
    }

    /// A client that breaks the rules gets resets, not a crash or a hang:
    /// data on an unknown stream, an even or reused stream id, more streams
    /// than allowed; a bad header block or an oversized frame ends the
    /// connection.
    #[tokio::test]
    async fn protocol_abuse() {
        let limits = Limits {
            max_streams: 2,
            max_frame: 4096,
            ..Default::default()
        };
        let (mut conn, mut client) = pair(limits);
        client.data(9, b"x", 0).await;
        assert_eq!(
            client.next().await,
            Some(Frame::Control(ControlFrame::RstStream {
                stream_id: 9,
                status: rst::INVALID_STREAM
            }))
        );
        client.open(2, &[], 0).await;
        assert!(matches!(
            client.next().await,
            Some(Frame::Control(ControlFrame::RstStream {
                status: rst::PROTOCOL_ERROR,
                ..
            }))
        ));
        client.open(1, &[], 0).await;
        client.open(3, &[], 0).await;
        client.open(5, &[], 0).await;
        let mut refused = false;
        for _ in 0..3 {
            if let Some(Frame::Control(ControlFrame::RstStream {
                stream_id: 5,
                status,
            })) = client.next().await
            {
                refused = status == rst::REFUSED_STREAM;
            }
        }
        assert!(refused);
        let (_a, _b) = (conn.accept().await.unwrap(), conn.accept().await.unwrap());
        client.open(3, &[], 0).await;
        assert!(matches!(
            client.next().await,
            Some(Frame::Control(ControlFrame::RstStream {
                status: rst::PROTOCOL_ERROR,
                ..
            }))
        ));
        client.data(1, &vec![0u8; 8192], 0).await;
        assert!(conn.accept().await.is_none(), "oversized frame ends it");

        let (mut conn, mut client) = pair(Limits::default());
        client
            .send(Frame::Control(ControlFrame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                header_block: Bytes::from_static(b"garbage"),
            }))
            .await;
        assert!(conn.accept().await.is_none(), "bad header block ends it");
    }
}
