//! SPDY/3 name/value header blocks (§2.6.10): a count, then length-prefixed
//! names and values (several values of one name separated by NUL), the
//! whole block compressed with zlib. Each direction of a connection is one
//! zlib stream, primed with the dictionary the spec defines and flushed
//! (Z_SYNC_FLUSH) at the end of every block, so the codec lives as long as
//! the connection.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::sync::OnceLock;

/// Headers in the order received; names are lowercase, as SPDY requires.
pub type Headers = Vec<(String, String)>;

/// The most a header block may inflate to: kubelet's clients send a
/// handful of short headers per stream; a zlib bomb stops here.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HeaderBlockError {
    #[error("SPDY header block inflates past {MAX_HEADER_BLOCK} bytes")]
    TooLarge,
    #[error("SPDY header block does not inflate: {0}")]
    Corrupt(String),
    #[error("malformed SPDY header block: {0}")]
    Malformed(&'static str),
    #[error("compressing a SPDY header block: {0}")]
    Compress(String),
}

/// The SPDY/3 header-compression dictionary (§2.6.10.1): length-prefixed
/// header names, methods and versions, then a run of common values. Built
/// from its parts rather than spelt as 1423 bytes; `dictionary_is_the_specs`
/// checks its length and zlib id.
fn dictionary() -> &'static [u8] {
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options", "head", "post", "put", "delete", "trace", "accept",
            "accept-charset", "accept-encoding", "accept-language", "accept-ranges",
            "age", "allow", "authorization", "cache-control", "connection",
            "content-base", "content-encoding", "content-language", "content-length",
            "content-location", "content-md5", "content-range", "content-type", "date",
            "etag", "expect", "expires", "from", "host", "if-match", "if-modified-since",
            "if-none-match", "if-range", "if-unmodified-since", "last-modified",
            "location", "max-forwards", "pragma", "proxy-authenticate",
            "proxy-authorization", "range", "referer", "retry-after", "server", "te",
            "trailer", "transfer-encoding", "upgrade", "user-agent", "vary", "via",
            "warning", "www-authenticate", "method", "get", "status", "200 OK",
            "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin",
        ];
        const TAIL: &[&str] = &[
            "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
            "203 Non-Authoritative Information",
            "204 No Content",
            "301 Moved Permanently",
            "400 Bad Request",
            "401 Unauthorized",
            "403 Forbidden",
            "404 Not Found",
            "500 Internal Server Error",
            "501 Not Implemented",
            "503 Service Unavailable",
            "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
            "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
            "chunked,text/html,image/png,image/jpg,image/gif,application/xml,",
            "application/xhtml+xml,text/plain,text/javascript,public",
            "privatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
        ];
        let mut d = Vec::with_capacity(1423);
        for w in WORDS {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        for t in TAIL {
            d.extend_from_slice(t.as_bytes());
        }
        d
    })
}

/// One connection's header compression: inflate for blocks the peer sent,
/// deflate for blocks this side sends.
pub struct HeaderCodec {
    inflate: Decompress,
    deflate: Compress,
}

impl Default for HeaderCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl HeaderCodec {
    pub fn new() -> Self {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(dictionary())
            .expect("a fresh deflate stream takes a dictionary");
        Self {
            inflate: Decompress::new(true),
            deflate,
        }
    }

    /// Decodes a block the peer sent.
    pub fn decode(&mut self, block: &[u8]) -> Result<Headers, HeaderBlockError> {
        parse(&self.inflate(block)?)
    }

    /// Encodes `headers` (names are lowercased) for sending.
    pub fn encode(&mut self, headers: &[(&str, &str)]) -> Result<Vec<u8>, HeaderBlockError> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            let name = name.to_ascii_lowercase();
            raw.extend_from_slice(&(name.len() as u32).to_be_bytes());
            raw.extend_from_slice(name.as_bytes());
            raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
            raw.extend_from_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut pos = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(256);
            }
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(&raw[pos..], &mut out, FlushCompress::Sync)
                .map_err(|e| HeaderBlockError::Compress(e.to_string()))?;
            pos += (self.deflate.total_in() - before) as usize;
            // Done once all input is in and the flush did not run out of
            // room (zlib's rule for a completed Z_SYNC_FLUSH).
            if pos == raw.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }

    fn inflate(&mut self, block: &[u8]) -> Result<Vec<u8>, HeaderBlockError> {
        let mut out: Vec<u8> = Vec::with_capacity(512);
        let mut pos = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADER_BLOCK {
                    return Err(HeaderBlockError::TooLarge);
                }
                out.reserve((MAX_HEADER_BLOCK - out.len()).min(out.len().max(512)));
            }
            let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
            let status =
                match self
                    .inflate
                    .decompress_vec(&block[pos..], &mut out, FlushDecompress::Sync)
                {
                    Ok(s) => s,
                    Err(e) if e.needs_dictionary().is_some() => {
                        self.inflate
                            .set_dictionary(dictionary())
                            .map_err(|e| HeaderBlockError::Corrupt(e.to_string()))?;
                        Status::Ok
                    }
                    Err(e) => return Err(HeaderBlockError::Corrupt(e.to_string())),
                };
            pos += (self.inflate.total_in() - in0) as usize;
            let produced = self.inflate.total_out() - out0;
            if status == Status::StreamEnd {
                return Err(HeaderBlockError::Corrupt(
                    "the zlib stream ended; SPDY keeps it open".into(),
                ));
            }
            if pos == block.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if produced == 0 && self.inflate.total_in() == in0 && out.len() < out.capacity() {
                return Err(HeaderBlockError::Corrupt("no progress".into()));
            }
        }
    }
}

fn parse(raw: &[u8]) -> Result<Headers, HeaderBlockError> {
    let mut r = Cursor { raw, at: 0 };
    let count = r.len()?;
    let mut out = Vec::new();
    for _ in 0..count {
        let n = r.len()?;
        let name = r.str(n)?;
        let n = r.len()?;
        let value = r.str(n)?;
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(HeaderBlockError::Malformed(
                "a header name is empty or not lowercase",
            ));
        }
        for v in value.split('\0') {
            out.push((name.to_string(), v.to_string()));
        }
    }
    if r.at != raw.len() {
        return Err(HeaderBlockError::Malformed("bytes after the last header"));
    }
    Ok(out)
}

struct Cursor<'a> {
    raw: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], HeaderBlockError> {
        let b = self
            .raw
            .get(self.at..self.at.saturating_add(n))
            .ok_or(HeaderBlockError::Malformed("truncated"))?;
        self.at += n;
        Ok(b)
    }

    fn len(&mut self) -> Result<usize, HeaderBlockError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }

    fn str(&mut self, n: usize) -> Result<&'a str, HeaderBlockError> {
        std::str::from_utf8(self.bytes(n)?).map_err(|_| HeaderBlockError::Malformed("not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_is_the_specs() {
        // Its length, and the id a zlib stream primed with it carries
        // (DICTID in the stream header), as the SPDY/3 spec's dictionary.
        assert_eq!(dictionary().len(), 1423);
        let (mut a, mut b) = (1u32, 0u32);
        for &x in dictionary() {
            a = (a + u32::from(x)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!((b << 16) | a, 0xe3c6_a7c2);
    }

    /// Two directions of one connection: every block decodes with the
    /// state the earlier blocks left, as SPDY requires.
    #[test]
    fn blocks_round_trip_on_a_shared_stream() {
        let (mut client, mut server) = (HeaderCodec::new(), HeaderCodec::new());
        for i in 0..50 {
            let id = i.to_string();
            let sent = [
                ("streamType", "stdout"),
                ("port", "8080"),
                ("requestid", &id),
            ];
            let block = client.encode(&sent).unwrap();
            let got = server.decode(&block).unwrap();
            assert_eq!(
                got,
                vec![
                    ("streamtype".into(), "stdout".into()),
                    ("port".into(), "8080".into()),
                    ("requestid".into(), id.clone()),
                ]
            );
        }
        let block = server.encode(&[]).unwrap();
        assert!(client.decode(&block).unwrap().is_empty());
    }

    #[test]
    fn multiple_values_split_on_nul() {
        let mut c = HeaderCodec::new();
        let block = c.encode(&[("x", "a\0b")]).unwrap();
        let got = HeaderCodec::new().decode(&block).unwrap();
        assert_eq!(
            got,
            vec![("x".into(), "a".into()), ("x".into(), "b".into())]
        );
    }

    /// A peer's block is bounded: a zlib bomb stops at the limit, garbage
    /// and lying counts are errors, never a panic or a large allocation.
    #[test]
    fn hostile_blocks() {
        let mut c = HeaderCodec::new();
        let huge = "v".repeat(1 << 20);
        let bomb = c.encode(&[("x", &huge)]).unwrap();
        assert!(bomb.len() < 8 * 1024, "compresses well: {}", bomb.len());
        assert!(matches!(
            HeaderCodec::new().decode(&bomb),
            Err(HeaderBlockError::TooLarge)
        ));
        assert!(HeaderCodec::new().decode(b"not zlib at all").is_err());
        assert!(matches!(
            parse(&[0xff, 0xff, 0xff, 0xff]),
            Err(HeaderBlockError::Malformed(_))
        ));
        assert!(matches!(
            parse(&[0, 0, 0, 1, 0, 0, 0, 9, b'a']),
            Err(HeaderBlockError::Malformed(_))
        ));
        assert!(parse(&[0, 0, 0, 1, 0, 0, 0, 1, b'A', 0, 0, 0, 0]).is_err());
    }
}
