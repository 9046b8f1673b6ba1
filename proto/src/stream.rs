//! Length-delimited protobuf messages (prost's `encode_length_delimited`:
//! a varint length, then the message) for the READY and STREAM connections.
//!
//! After the handshake those connections carry raw bytes, so [`read_msg`]
//! reads exactly one message and never a byte past it.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A generous `max_len` for the protocol's handshake messages (`ReadyNotice`,
/// `StreamHello`, `StreamAccept`), which are a few dozen bytes.
pub const MAX_HANDSHAKE_LEN: usize = 64 << 10;

/// Longest varint encoding of a u64.
const MAX_VARINT_LEN: usize = 10;

/// Writes `msg` with its varint length prefix and flushes.
pub async fn write_msg<W, M>(w: &mut W, msg: &M) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
    M: prost::Message,
{
    let buf = msg.encode_length_delimited_to_vec();
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads one length-delimited message. A length above `max_len` fails with
/// `InvalidData` before anything is allocated; EOF before the message is
/// complete fails with `UnexpectedEof`.
pub async fn read_msg<R, M>(r: &mut R, max_len: usize) -> io::Result<M>
where
    R: AsyncRead + Unpin,
    M: prost::Message + Default,
{
    let len = read_varint(r).await?;
    let len = usize::try_from(len)
        .ok()
        .filter(|&l| l <= max_len)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("message of {len} bytes exceeds the limit of {max_len}"),
            )
        })?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    M::decode(&buf[..]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One byte at a time: the bytes after the message belong to someone else.
async fn read_varint<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<u64> {
    let mut value: u64 = 0;
    for i in 0..MAX_VARINT_LEN {
        let byte = r.read_u8().await?;
        let bits = u64::from(byte & 0x7f);
        // The 10th byte may carry only the top bit of a u64.
        if i == MAX_VARINT_LEN - 1 && bits > 1 {
            break;
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "invalid varint length prefix",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{ProcessRef, ReadyNotice, StreamAccept, StreamHello, StreamKind};

    /// Reads a `ReadyNotice` of at most `max` bytes from `wire`, which must fail; the error's kind.
    async fn read_err(wire: &[u8], max: usize) -> io::ErrorKind {
        let mut r = wire;
        read_msg::<_, ReadyNotice>(&mut r, max)
            .await
            .unwrap_err()
            .kind()
    }

    #[tokio::test]
    async fn round_trip_and_raw_bytes_after_the_message_stay_unread() {
        let hello = StreamHello {
            process: Some(ProcessRef {
                container_id: "c1".into(),
                exec_id: "e1".into(),
            }),
            kind: StreamKind::Stdout as i32,
            port: 0,
        };
        let mut wire = Vec::new();
        write_msg(&mut wire, &hello).await.unwrap();
        wire.extend_from_slice(b"raw stdout bytes");
        let mut r = &wire[..];
        let got: StreamHello = read_msg(&mut r, 1024).await.unwrap();
        assert_eq!(got, hello);
        assert_eq!(r, b"raw stdout bytes");
    }

    #[tokio::test]
    async fn empty_message_is_one_zero_byte() {
        let mut wire = Vec::new();
        write_msg(&mut wire, &StreamAccept::default())
            .await
            .unwrap();
        assert_eq!(wire, [0]);
        let mut r = &wire[..];
        let got: StreamAccept = read_msg(&mut r, 16).await.unwrap();
        assert!(got.error.is_empty());
    }

    #[tokio::test]
    async fn too_long_is_rejected_without_reading_the_body() {
        let notice = ReadyNotice {
            agent_version: "x".repeat(300),
            boot_to_ready_ms: 5,
        };
        let mut wire = Vec::new();
        write_msg(&mut wire, &notice).await.unwrap();
        let mut r = &wire[..];
        let err = read_msg::<_, ReadyNotice>(&mut r, 100).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // Only the two-byte length prefix was consumed.
        assert_eq!(r.len(), wire.len() - 2);
    }

    #[tokio::test]
    async fn huge_length_prefix_is_rejected() {
        // u64::MAX as a varint.
        let mut wire = vec![0xffu8; 9];
        wire.push(0x01);
        assert_eq!(read_err(&wire, 1 << 20).await, io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn overlong_varint_is_invalid_data() {
        let wire = [0x80u8; 11];
        assert_eq!(read_err(&wire, 1 << 20).await, io::ErrorKind::InvalidData);
        let wire = [0xffu8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(read_err(&wire, 1 << 20).await, io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn truncated_message_is_unexpected_eof() {
        let notice = ReadyNotice {
            agent_version: "0.1.0".into(),
            boot_to_ready_ms: 1234,
        };
        let mut wire = Vec::new();
        write_msg(&mut wire, &notice).await.unwrap();
        for cut in 0..wire.len() {
            assert_eq!(
                read_err(&wire[..cut], 1024).await,
                io::ErrorKind::UnexpectedEof,
                "cut at {cut}"
            );
        }
    }

    #[tokio::test]
    async fn garbage_body_is_invalid_data() {
        // Length 2, then a field with wire type 7 (invalid).
        let wire = [2u8, 0x0f, 0x00];
        assert_eq!(read_err(&wire, 1024).await, io::ErrorKind::InvalidData);
    }
}
