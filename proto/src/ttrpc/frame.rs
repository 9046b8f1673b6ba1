use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::Error;

pub const MESSAGE_HEADER_LENGTH: usize = 10;
/// Largest payload either side sends or accepts (containerd's limit).
pub const MESSAGE_LENGTH_MAX: usize = 4 << 20;

pub const MESSAGE_TYPE_REQUEST: u8 = 0x1;
pub const MESSAGE_TYPE_RESPONSE: u8 = 0x2;
pub const MESSAGE_TYPE_DATA: u8 = 0x3;

/// Streaming flags; unary calls send none, they are here for completeness.
pub const FLAG_REMOTE_CLOSED: u8 = 0x1;
pub const FLAG_REMOTE_OPEN: u8 = 0x2;
pub const FLAG_NO_DATA: u8 = 0x4;

/// The 10-byte header in front of every ttrpc frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload length in bytes (not counting the header).
    pub length: u32,
    pub stream_id: u32,
    pub msg_type: u8,
    pub flags: u8,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; MESSAGE_HEADER_LENGTH] {
        let mut buf = [0u8; MESSAGE_HEADER_LENGTH];
        buf[0..4].copy_from_slice(&self.length.to_be_bytes());
        buf[4..8].copy_from_slice(&self.stream_id.to_be_bytes());
        buf[8] = self.msg_type;
        buf[9] = self.flags;
        buf
    }

    pub fn decode(buf: &[u8; MESSAGE_HEADER_LENGTH]) -> FrameHeader {
        FrameHeader {
            length: u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]),
            stream_id: u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]),
            msg_type: buf[8],
            flags: buf[9],
        }
    }
}

/// A frame's payload as read from the wire.
#[derive(Debug)]
pub(crate) enum Payload {
    Data(Bytes),
    /// Longer than [`MESSAGE_LENGTH_MAX`]: skipped on the wire, never held in
    /// memory. The frame's stream gets a `ResourceExhausted` error, the
    /// connection goes on (as containerd's implementations do).
    Oversized,
}

/// Builds one frame (header and payload) ready to be written.
///
/// Callers check the payload against [`MESSAGE_LENGTH_MAX`] first, so the
/// length always fits the header's u32.
pub(crate) fn encode_frame(stream_id: u32, msg_type: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= MESSAGE_LENGTH_MAX);
    let header = FrameHeader {
        length: payload.len() as u32,
        stream_id,
        msg_type,
        flags,
    };
    let mut buf = Vec::with_capacity(MESSAGE_HEADER_LENGTH + payload.len());
    buf.extend_from_slice(&header.encode());
    buf.extend_from_slice(payload);
    buf
}

/// Reads the next frame. `Ok(None)` is a clean end of stream (EOF on a frame
/// boundary); EOF inside a frame is a protocol error.
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(FrameHeader, Payload)>, Error> {
    let mut hdr = [0u8; MESSAGE_HEADER_LENGTH];
    let mut filled = 0;
    while filled < hdr.len() {
        let n = r.read(&mut hdr[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(Error::Protocol(format!(
                "connection closed inside a frame header ({filled} of {MESSAGE_HEADER_LENGTH} bytes)"
            )));
        }
        filled += n;
    }
    let header = FrameHeader::decode(&hdr);
    let len = header.length as usize;
    if len > MESSAGE_LENGTH_MAX {
        let skipped =
            tokio::io::copy(&mut (&mut *r).take(len as u64), &mut tokio::io::sink()).await?;
        if skipped < len as u64 {
            return Err(truncated(&header, skipped as usize));
        }
        return Ok(Some((header, Payload::Oversized)));
    }
    let mut payload = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        let n = r.read(&mut payload[filled..]).await?;
        if n == 0 {
            return Err(truncated(&header, filled));
        }
        filled += n;
    }
    Ok(Some((header, Payload::Data(Bytes::from(payload)))))
}

fn truncated(header: &FrameHeader, got: usize) -> Error {
    Error::Protocol(format!(
        "connection closed inside the payload of stream {} ({got} of {} bytes)",
        header.stream_id, header.length
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn header_layout_is_big_endian() {
        let h = FrameHeader {
            length: 0x0102_0304,
            stream_id: 0x0a0b_0c0d,
            msg_type: MESSAGE_TYPE_RESPONSE,
            flags: FLAG_REMOTE_CLOSED,
        };
        let b = h.encode();
        assert_eq!(b, [1, 2, 3, 4, 0x0a, 0x0b, 0x0c, 0x0d, 2, 1]);
        assert_eq!(FrameHeader::decode(&b), h);
    }

    #[tokio::test]
    async fn reads_frames_back_to_back_then_clean_eof() {
        let mut wire = encode_frame(1, MESSAGE_TYPE_REQUEST, 0, b"hello");
        wire.extend(encode_frame(3, MESSAGE_TYPE_REQUEST, 0, b""));
        let mut r = &wire[..];
        let (h, p) = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!(
            (h.stream_id, h.length, h.msg_type),
            (1, 5, MESSAGE_TYPE_REQUEST)
        );
        assert!(matches!(p, Payload::Data(b) if &b[..] == b"hello"));
        let (h, p) = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((h.stream_id, h.length), (3, 0));
        assert!(matches!(p, Payload::Data(b) if b.is_empty()));
        assert!(read_frame(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn truncated_header_and_payload_are_protocol_errors() {
        let wire = encode_frame(1, MESSAGE_TYPE_REQUEST, 0, b"hello");
        for cut in 1..wire.len() {
            let mut r = &wire[..cut];
            match read_frame(&mut r).await {
                Err(Error::Protocol(_)) => {}
                other => panic!("cut at {cut}: expected a protocol error, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn exactly_max_is_accepted() {
        let payload = vec![7u8; MESSAGE_LENGTH_MAX];
        let wire = encode_frame(5, MESSAGE_TYPE_RESPONSE, 0, &payload);
        let mut r = &wire[..];
        let (h, p) = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!(h.length as usize, MESSAGE_LENGTH_MAX);
        assert!(matches!(p, Payload::Data(b) if b.len() == MESSAGE_LENGTH_MAX));
    }

    #[tokio::test]
    async fn oversized_payload_is_skipped_and_the_next_frame_read() {
        let big = MESSAGE_LENGTH_MAX + 1;
        let mut wire = FrameHeader {
            length: big as u32,
            stream_id: 7,
            msg_type: MESSAGE_TYPE_REQUEST,
            flags: 0,
        }
        .encode()
        .to_vec();
        wire.resize(wire.len() + big, 0xee);
        wire.extend(encode_frame(9, MESSAGE_TYPE_REQUEST, 0, b"next"));
        let mut r = &wire[..];
        let (h, p) = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!(h.stream_id, 7);
        assert!(matches!(p, Payload::Oversized));
        let (h, p) = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!(h.stream_id, 9);
        assert!(matches!(p, Payload::Data(b) if &b[..] == b"next"));
    }

    #[tokio::test]
    async fn huge_claimed_length_is_not_allocated() {
        // A header claiming 4 GiB followed by EOF: must fail as truncated
        // after skipping what is there, without trying to allocate 4 GiB.
        let (mut w, mut r) = tokio::io::duplex(64);
        let h = FrameHeader {
            length: u32::MAX,
            stream_id: 1,
            msg_type: MESSAGE_TYPE_REQUEST,
            flags: 0,
        };
        let writer = tokio::spawn(async move {
            w.write_all(&h.encode()).await.unwrap();
            w.write_all(&[0u8; 100]).await.unwrap();
        });
        match read_frame(&mut r).await {
            Err(Error::Protocol(msg)) => assert!(msg.contains("100 of 4294967295"), "{msg}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
        writer.await.unwrap();
    }
}
