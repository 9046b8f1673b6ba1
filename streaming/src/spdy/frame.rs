//! SPDY/3.1 frames (draft-mbelshe-httpbis-spdy-00 §2.2–2.6): reading them
//! off a byte stream with bounds on every length, and writing them.
//!
//! Header blocks stay compressed here; [`super::HeaderCodec`] owns the
//! per-connection zlib streams.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The last frame of a stream in this direction (data, SYN_STREAM,
/// SYN_REPLY, HEADERS).
pub const FLAG_FIN: u8 = 0x01;

const VERSION: u16 = 3;
const CONTROL_BIT: u32 = 0x8000_0000;
const STREAM_ID_MASK: u32 = 0x7fff_ffff;

const TYPE_SYN_STREAM: u16 = 1;
const TYPE_SYN_REPLY: u16 = 2;
const TYPE_RST_STREAM: u16 = 3;
const TYPE_SETTINGS: u16 = 4;
const TYPE_PING: u16 = 6;
const TYPE_GOAWAY: u16 = 7;
const TYPE_HEADERS: u16 = 8;
const TYPE_WINDOW_UPDATE: u16 = 9;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("reading a SPDY frame: {0}")]
    Io(#[from] std::io::Error),
    #[error("SPDY frame of {len} bytes, more than the {max} accepted")]
    TooLarge { len: usize, max: usize },
    #[error("SPDY version {0} (only 3 is spoken)")]
    Version(u16),
    #[error("malformed SPDY {kind} frame: {detail}")]
    Malformed {
        kind: &'static str,
        detail: &'static str,
    },
    #[error("the connection ended inside a SPDY frame")]
    Truncated,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data {
        stream_id: u32,
        flags: u8,
        data: Bytes,
    },
    Control(ControlFrame),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlFrame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        /// 0 (highest) to 7.
        priority: u8,
        flags: u8,
        header_block: Bytes,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        header_block: Bytes,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    /// Parsed only as far as needed to skip it: nothing here depends on
    /// the peer's settings.
    Settings {
        entries: u32,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        header_block: Bytes,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    /// A type this version does not define: ignored, as the spec says.
    Unknown {
        kind: u16,
    },
}

/// RST_STREAM status codes (§2.6.3) this server sends.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
    pub const STREAM_IN_USE: u32 = 8;
}

impl Frame {
    /// Appends the frame's wire form to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                out.extend_from_slice(&(stream_id & STREAM_ID_MASK).to_be_bytes());
                push_flags_len(out, *flags, data.len());
                out.extend_from_slice(data);
            }
            Frame::Control(c) => c.encode(out),
        }
    }
}

impl ControlFrame {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut body = Vec::new();
        let (kind, flags) = match self {
            ControlFrame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                header_block,
            } => {
                body.extend_from_slice(&(stream_id & STREAM_ID_MASK).to_be_bytes());
                body.extend_from_slice(&(associated_to & STREAM_ID_MASK).to_be_bytes());
                body.push((priority & 0x7) << 5);
                body.push(0);
                body.extend_from_slice(header_block);
                (TYPE_SYN_STREAM, *flags)
            }
            ControlFrame::SynReply {
                stream_id,
                flags,
                header_block,
            } => {
                body.extend_from_slice(&(stream_id & STREAM_ID_MASK).to_be_bytes());
                body.extend_from_slice(header_block);
                (TYPE_SYN_REPLY, *flags)
            }
            ControlFrame::Headers {
                stream_id,
                flags,
                header_block,
            } => {
                body.extend_from_slice(&(stream_id & STREAM_ID_MASK).to_be_bytes());
                body.extend_from_slice(header_block);
                (TYPE_HEADERS, *flags)
            }
            ControlFrame::RstStream { stream_id, status } => {
                body.extend_from_slice(&(stream_id & STREAM_ID_MASK).to_be_bytes());
                body.extend_from_slice(&status.to_be_bytes());
                (TYPE_RST_STREAM, 0)
            }
            ControlFrame::Settings { .. } => {
                body.extend_from_slice(&0u32.to_be_bytes());
                (TYPE_SETTINGS, 0)
            }
            ControlFrame::Ping { id } => {
                body.extend_from_slice(&id.to_be_bytes());
                (TYPE_PING, 0)
            }
            ControlFrame::GoAway {
                last_good_stream_id,
                status,
            } => {
                body.extend_from_slice(&(last_good_stream_id & STREAM_ID_MASK).to_be_bytes());
                body.extend_from_slice(&status.to_be_bytes());
                (TYPE_GOAWAY, 0)
            }
            ControlFrame::WindowUpdate { stream_id, delta } => {
                body.extend_from_slice(&(stream_id & STREAM_ID_MASK).to_be_bytes());
                body.extend_from_slice(&(delta & STREAM_ID_MASK).to_be_bytes());
                (TYPE_WINDOW_UPDATE, 0)
            }
            ControlFrame::Unknown { kind } => (*kind, 0),
        };
        let word = CONTROL_BIT | (u32::from(VERSION) << 16) | u32::from(kind);
        out.extend_from_slice(&word.to_be_bytes());
        push_flags_len(out, flags, body.len());
        out.extend_from_slice(&body);
    }
}

fn push_flags_len(out: &mut Vec<u8>, flags: u8, len: usize) {
    debug_assert!(len < 1 << 24, "callers split data into frames below 16 MiB");
    let word = (u32::from(flags) << 24) | (len as u32 & 0x00ff_ffff);
    out.extend_from_slice(&word.to_be_bytes());
}

/// Reads frames from a connection. Each frame's body is read whole, so
/// `max_len` bounds what one frame can make the server hold.
pub struct FrameReader<R> {
    r: R,
    max_len: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(r: R, max_len: usize) -> Self {
        Self { r, max_len }
    }

    /// The next frame; `None` when the peer closed the connection between
    /// frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, FrameError> {
        let mut head = [0u8; 8];
        match self.r.read(&mut head[..1]).await? {
            0 => return Ok(None),
            _ => self.read_exact(&mut head[1..]).await?,
        }
        let first = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let flags = head[4];
        let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        if len > self.max_len {
            return Err(FrameError::TooLarge {
                len,
                max: self.max_len,
            });
        }
        let mut body = vec![0u8; len];
        self.read_exact(&mut body).await?;
        let body = Bytes::from(body);
        if first & CONTROL_BIT == 0 {
            return Ok(Some(Frame::Data {
                stream_id: first & STREAM_ID_MASK,
                flags,
                data: body,
            }));
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(FrameError::Version(version));
        }
        parse_control(first as u16, flags, body).map(|c| Some(Frame::Control(c)))
    }

    async fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), FrameError> {
        match self.r.read_exact(buf).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
            Err(e) => Err(e.into()),
        }
    }
}

fn parse_control(kind: u16, flags: u8, body: Bytes) -> Result<ControlFrame, FrameError> {
    let malformed = |kind, detail| FrameError::Malformed { kind, detail };
    let word = |at: usize| u32::from_be_bytes([body[at], body[at + 1], body[at + 2], body[at + 3]]);
    let need = |name: &'static str, exact: Option<usize>, min: usize| match exact {
        Some(n) if body.len() != n => Err(malformed(name, "wrong length")),
        _ if body.len() < min => Err(malformed(name, "too short")),
        _ => Ok(()),
    };
    Ok(match kind {
        TYPE_SYN_STREAM => {
            need("SYN_STREAM", None, 10)?;
            ControlFrame::SynStream {
                stream_id: word(0) & STREAM_ID_MASK,
                associated_to: word(4) & STREAM_ID_MASK,
                priority: body[8] >> 5,
                flags,
                header_block: body.slice(10..),
            }
        }
        TYPE_SYN_REPLY => {
            need("SYN_REPLY", None, 4)?;
            ControlFrame::SynReply {
                stream_id: word(0) & STREAM_ID_MASK,
                flags,
                header_block: body.slice(4..),
            }
        }
        TYPE_HEADERS => {
            need("HEADERS", None, 4)?;
            ControlFrame::Headers {
                stream_id: word(0) & STREAM_ID_MASK,
                flags,
                header_block: body.slice(4..),
            }
        }
        TYPE_RST_STREAM => {
            need("RST_STREAM", Some(8), 8)?;
            ControlFrame::RstStream {
                stream_id: word(0) & STREAM_ID_MASK,
                status: word(4),
            }
        }
        TYPE_SETTINGS => {
            need("SETTINGS", None, 4)?;
            let entries = word(0);
            if (body.len() - 4) as u64 != u64::from(entries) * 8 {
                return Err(malformed(
                    "SETTINGS",
                    "entry count does not match the length",
                ));
            }
            ControlFrame::Settings { entries }
        }
        TYPE_PING => {
            need("PING", Some(4), 4)?;
            ControlFrame::Ping { id: word(0) }
        }
        TYPE_GOAWAY => {
            need("GOAWAY", Some(8), 8)?;
            ControlFrame::GoAway {
                last_good_stream_id: word(0) & STREAM_ID_MASK,
                status: word(4),
            }
        }
        TYPE_WINDOW_UPDATE => {
            need("WINDOW_UPDATE", Some(8), 8)?;
            ControlFrame::WindowUpdate {
                stream_id: word(0) & STREAM_ID_MASK,
                delta: word(4) & STREAM_ID_MASK,
            }
        }
        kind => ControlFrame::Unknown { kind },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(wire: &[u8], max: usize) -> Vec<Result<Option<Frame>, String>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut r = FrameReader::new(wire, max);
            let mut out = Vec::new();
            loop {
                let f = r.next().await.map_err(|e| e.to_string());
                let end = !matches!(f, Ok(Some(_)));
                out.push(f);
                if end {
                    return out;
                }
            }
        })
    }

    #[test]
    fn frames_round_trip() {
        let frames = vec![
            Frame::Control(ControlFrame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 3,
                flags: FLAG_FIN,
                header_block: Bytes::from_static(b"hdr"),
            }),
            Frame::Control(ControlFrame::SynReply {
                stream_id: 1,
                flags: 0,
                header_block: Bytes::from_static(b"x"),
            }),
            Frame::Data {
                stream_id: 1,
                flags: 0,
                data: Bytes::from_static(b"hello"),
            },
            Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: Bytes::new(),
            },
            Frame::Control(ControlFrame::RstStream {
                stream_id: 5,
                status: rst::CANCEL,
            }),
            Frame::Control(ControlFrame::Ping { id: 7 }),
            Frame::Control(ControlFrame::GoAway {
                last_good_stream_id: 9,
                status: 0,
            }),
            Frame::Control(ControlFrame::WindowUpdate {
                stream_id: 1,
                delta: 65536,
            }),
            Frame::Control(ControlFrame::Settings { entries: 0 }),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.encode(&mut wire);
        }
        let got: Vec<Frame> = read_all(&wire, 1 << 20)
            .into_iter()
            .map_while(|f| f.unwrap())
            .collect();
        assert_eq!(got, frames);
    }

    /// What a spdystream client writes, byte for byte: a PING (§2.6.5).
    #[test]
    fn wire_layout() {
        let mut wire = Vec::new();
        Frame::Control(ControlFrame::Ping { id: 1 }).encode(&mut wire);
        assert_eq!(wire, [0x80, 0x03, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1]);
        wire.clear();
        Frame::Data {
            stream_id: 0x8000_0005,
            flags: FLAG_FIN,
            data: Bytes::from_static(b"ab"),
        }
        .encode(&mut wire);
        assert_eq!(wire, [0, 0, 0, 5, 1, 0, 0, 2, b'a', b'b']);
    }

    /// A peer's lengths are never trusted: an oversized frame is refused
    /// before its body is allocated, short control frames and a wrong
    /// version are errors, a cut-off frame is `Truncated`, unknown types
    /// are skipped.
    #[test]
    fn hostile_frames() {
        // 16 MiB - 1 declared, 1 KiB allowed.
        let big = [0, 0, 0, 1, 0, 0xff, 0xff, 0xff];
        let r = read_all(&big, 1024);
        assert!(r[0].as_ref().unwrap_err().contains("more than"), "{r:?}");

        let short_rst = [0x80, 0x03, 0x00, 0x03, 0, 0, 0, 4, 0, 0, 0, 1];
        assert!(read_all(&short_rst, 1024)[0]
            .as_ref()
            .unwrap_err()
            .contains("RST_STREAM"));

        let v2 = [0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1];
        assert!(read_all(&v2, 1024)[0]
            .as_ref()
            .unwrap_err()
            .contains("version 2"));

        let cut = [0, 0, 0, 1, 0, 0, 0, 10, b'x'];
        assert!(read_all(&cut, 1024)[0]
            .as_ref()
            .unwrap_err()
            .contains("inside"));

        let settings_lie = [0x80, 0x03, 0x00, 0x04, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff];
        assert!(read_all(&settings_lie, 1024)[0].is_err());

        let unknown = [0x80, 0x03, 0x00, 0x0a, 0, 0, 0, 2, 1, 2];
        assert_eq!(
            read_all(&unknown, 1024)[0].as_ref().unwrap(),
            &Some(Frame::Control(ControlFrame::Unknown { kind: 10 }))
        );
    }
}
