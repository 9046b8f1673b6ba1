//! Kubernetes' channel protocol over WebSocket (kubelet's `wsstream`): every
//! message carries one channel's data behind a first byte naming the
//! channel (`0` stdin, `1` stdout, `2` stderr, `3` error, `4` resize for a
//! remote command; `2i`/`2i+1` for port-forward). The binary protocols put
//! the channel number in that byte; the base64 ones send text messages
//! whose first character is the channel's digit and whose rest is base64.
//! `v5.channel.k8s.io` adds one message, `[255, channel]`, which closes the
//! client's side of that channel (stdin EOF).
//!
//! One task reads the socket and writes each channel's data into a bounded
//! pipe, waiting while the pipe is full; one task owns the write half. So
//! a client sending faster than the process reads is pushed back through
//! TCP, and nothing it sends is buffered without limit.

use std::collections::HashMap;

use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::channel::OutChannel;
use crate::BoxFuture;

/// The v5 message that half-closes a channel.
const STREAM_CLOSE: u8 = 255;
/// Bytes a channel's pipe holds before the reader waits.
const PIPE_BYTES: usize = 64 * 1024;
/// Largest message written: interleaves channels, keeps messages small.
const WRITE_CHUNK: usize = 32 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Binary,
    Base64,
}

/// How a negotiated protocol frames its channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    pub codec: Codec,
    /// `[255, channel]` closes the client's side of a channel (v5).
    pub stream_close: bool,
}

enum Out {
    Data(u8, Bytes),
    Close,
}

/// A WebSocket connection carrying numbered channels.
pub struct ChannelConn {
    out: mpsc::Sender<Out>,
    reader: tokio::task::JoinHandle<()>,
    writer: tokio::task::JoinHandle<()>,
}

impl Drop for ChannelConn {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

impl ChannelConn {
    /// Starts serving `ws`. The client's data on each of `readable` comes
    /// out of the returned pipe of that channel, which reaches EOF when the
    /// client closes the channel (v5) or the connection ends; data on any
    /// other channel is dropped.
    pub fn start<S>(
        ws: WebSocketStream<S>,
        framing: Framing,
        readable: &[u8],
    ) -> (ChannelConn, HashMap<u8, DuplexStream>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sink, stream) = ws.split();
        let mut inbound = HashMap::new();
        let mut readers = HashMap::new();
        for ch in readable {
            let (w, r) = tokio::io::duplex(PIPE_BYTES);
            inbound.insert(*ch, w);
            readers.insert(*ch, r);
        }
        let (out_tx, out_rx) = mpsc::channel(16);
        let reader = tokio::spawn(read_loop(stream, framing, inbound));
        let writer = tokio::spawn(write_loop(sink, framing.codec, out_rx));
        (
            ChannelConn {
                out: out_tx,
                reader,
                writer,
            },
            readers,
        )
    }

    /// A writer for `channel`.
    pub fn channel(&self, channel: u8) -> ChannelWriter {
        ChannelWriter {
            channel,
            out: self.out.clone(),
        }
    }

    /// Resolves when the client can send nothing more: it closed the
    /// connection, it broke, or it broke the protocol.
    pub async fn gone(&mut self) {
        let _ = (&mut self.reader).await;
    }

    /// Sends what is queued, then a normal close, and waits (bounded) for
    /// the client to answer it.
    pub async fn close(mut self) {
        let _ = self.out.send(Out::Close).await;
        let bound = std::time::Duration::from_secs(5);
        // A client that stopped reading must not hold the close.
        if tokio::time::timeout(bound, &mut self.writer).await.is_ok() {
            let _ = tokio::time::timeout(bound, &mut self.reader).await;
        }
    }
}

/// Writes one channel's data.
#[derive(Clone)]
pub struct ChannelWriter {
    channel: u8,
    out: mpsc::Sender<Out>,
}

impl OutChannel for ChannelWriter {
    fn write<'a>(&'a self, data: &'a [u8]) -> BoxFuture<'a, std::io::Result<()>> {
        Box::pin(async move {
            for chunk in data.chunks(WRITE_CHUNK) {
                self.out
                    .send(Out::Data(self.channel, Bytes::copy_from_slice(chunk)))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
            }
            Ok(())
        })
    }

    /// The channel protocol has no per-channel close from the server: the
    /// client's readers end with the connection.
    fn close(&self) -> BoxFuture<'_, std::io::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

impl ChannelWriter {
    /// Writes `data` as one message, even empty (kubelet announces a
    /// session with an empty message).
    pub async fn write_message(&self, data: &[u8]) -> std::io::Result<()> {
        self.out
            .send(Out::Data(self.channel, Bytes::copy_from_slice(data)))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

/// What one message from the client means.
#[derive(Debug, PartialEq, Eq)]
enum Inbound {
    Data(u8, Vec<u8>),
    CloseChannel(u8),
    /// Not for any channel (empty, a control message, the wrong type).
    Nothing,
    /// The protocol is broken; the connection ends.
    Invalid(&'static str),
}

fn decode(msg: Message, framing: Framing) -> Inbound {
    match (msg, framing.codec) {
        (Message::Binary(b), Codec::Binary) => match b.first() {
            None => Inbound::Nothing,
            Some(&STREAM_CLOSE) if framing.stream_close => match b.len() {
                2 => Inbound::CloseChannel(b[1]),
                _ => Inbound::Invalid("a stream close signal is followed by one channel byte"),
            },
            Some(&ch) => Inbound::Data(ch, b[1..].to_vec()),
        },
        (Message::Text(t), Codec::Base64) => {
            let t = t.as_bytes();
            let Some(&first) = t.first() else {
                return Inbound::Nothing;
            };
            let Some(ch) = first.checked_sub(b'0') else {
                return Inbound::Invalid("a base64 message starts with its channel's digit");
            };
            match base64::engine::general_purpose::STANDARD.decode(&t[1..]) {
                Ok(data) => Inbound::Data(ch, data),
                Err(_) => Inbound::Invalid("bad base64"),
            }
        }
        (Message::Close(_), _) => Inbound::Invalid("closed"),
        _ => Inbound::Nothing,
    }
}

fn encode(channel: u8, data: &[u8], codec: Codec) -> Message {
    match codec {
        Codec::Binary => {
            let mut b = Vec::with_capacity(data.len() + 1);
            b.push(channel);
            b.extend_from_slice(data);
            Message::Binary(b.into())
        }
        Codec::Base64 => {
            let mut t = String::with_capacity(data.len() * 4 / 3 + 5);
            t.push(char::from(b'0' + channel));
            base64::engine::general_purpose::STANDARD.encode_string(data, &mut t);
            Message::Text(t.into())
        }
    }
}

async fn read_loop<S>(
    mut stream: futures_util::stream::SplitStream<WebSocketStream<S>>,
    framing: Framing,
    mut inbound: HashMap<u8, DuplexStream>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(msg) = stream.next().await {
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(%e, "websocket read");
                break;
            }
        };
        match decode(msg, framing) {
            Inbound::Data(ch, data) => {
                let Some(pipe) = inbound.get_mut(&ch) else {
                    continue;
                };
                if pipe.write_all(&data).await.is_err() {
                    // Its consumer is gone (the process's stdin closed).
                    inbound.remove(&ch);
                }
            }
            Inbound::CloseChannel(ch) => {
                inbound.remove(&ch);
            }
            Inbound::Nothing => {}
            Inbound::Invalid(why) => {
                tracing::debug!(why, "websocket session ends");
                break;
            }
        }
    }
}

async fn write_loop<S>(
    mut sink: futures_util::stream::SplitSink<WebSocketStream<S>, Message>,
    codec: Codec,
    mut out: mpsc::Receiver<Out>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(o) = out.recv().await {
        let msg = match o {
            Out::Data(ch, data) => encode(ch, &data, codec),
            Out::Close => {
                let _ = sink
                    .send(Message::Close(Some(CloseFrame {
                        code: CloseCode::Normal,
                        reason: "".into(),
                    })))
                    .await;
                return;
            }
        };
        if sink.send(msg).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V5: Framing = Framing {
        codec: Codec::Binary,
        stream_close: true,
    };
    const V4: Framing = Framing {
        codec: Codec::Binary,
        stream_close: false,
    };
    const B64: Framing = Framing {
        codec: Codec::Base64,
        stream_close: false,
    };

    fn bin(b: &[u8]) -> Message {
        Message::Binary(b.to_vec().into())
    }

    #[test]
    fn binary_messages() {
        assert_eq!(decode(bin(&[0, 1, 2]), V4), Inbound::Data(0, vec![1, 2]));
        assert_eq!(decode(bin(&[4]), V4), Inbound::Data(4, vec![]));
        assert_eq!(decode(bin(&[]), V4), Inbound::Nothing);
        // 255 is a channel like any other before v5.
        assert_eq!(decode(bin(&[255, 0]), V4), Inbound::Data(255, vec![0]));
        assert_eq!(decode(bin(&[255, 0]), V5), Inbound::CloseChannel(0));
        assert!(matches!(decode(bin(&[255]), V5), Inbound::Invalid(_)));
        assert!(matches!(decode(bin(&[255, 0, 1]), V5), Inbound::Invalid(_)));
        assert_eq!(decode(Message::Text("0aGk=".into()), V4), Inbound::Nothing);
        assert!(matches!(
            decode(Message::Close(None), V4),
            Inbound::Invalid(_)
        ));
    }

    #[test]
    fn base64_messages() {
        assert_eq!(
            decode(Message::Text("0aGk=".into()), B64),
            Inbound::Data(0, b"hi".to_vec())
        );
        assert!(matches!(
            decode(Message::Text("0!!".into()), B64),
            Inbound::Invalid(_)
        ));
        assert!(matches!(
            decode(Message::Text(" x".into()), B64),
            Inbound::Invalid(_)
        ));
        assert_eq!(decode(bin(&[0, 1]), B64), Inbound::Nothing);
    }

    #[test]
    fn encoding_round_trips() {
        let data: Vec<u8> = (0..=255).collect();
        for f in [V4, B64] {
            assert_eq!(
                decode(encode(1, &data, f.codec), f),
                Inbound::Data(1, data.clone())
            );
        }
        assert_eq!(encode(3, b"", Codec::Base64), Message::Text("3".into()));
    }
}
