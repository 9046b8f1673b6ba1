//! Container logs in the format kubelet reads (`kubectl logs`, log
//! rotation): one record per line,
//! `<RFC3339Nano timestamp> <stream> <P|F> <content>\n`, where `F` ends a
//! line and `P` is a piece of a longer line (or the last bytes of a stream
//! that did not end with a newline).
//!
//! The host writes the file; the guest only produces the bytes, so a guest
//! cannot write anything but content into a record.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest content of one record; longer lines are split into `P` records
/// (kubelet's and containerd's default is 16 KiB as well).
pub const DEFAULT_MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    Partial,
    Full,
}

/// Formats a time like Go's `time.RFC3339Nano` in UTC:
/// `2006-01-02T15:04:05.999999999Z` with trailing zeros of the fraction
/// removed (and no fraction at all on a whole second).
///
/// Hand-written (days-to-civil conversion) rather than pulling in a date
/// crate for this one format, whose zero-trimming no crate option matches.
pub fn rfc3339_nano(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let nanos = d.subsec_nanos();
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, dd) = civil_from_days(days);
    let mut s = format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    );
    if nanos != 0 {
        let frac = format!("{nanos:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// Howard Hinnant's days-from-civil inverse: days since 1970-01-01 to
/// (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Formats one record.
pub fn format_record(t: SystemTime, stream: Stream, tag: Tag, content: &[u8]) -> Vec<u8> {
    let ts = rfc3339_nano(t);
    let mut v = Vec::with_capacity(ts.len() + content.len() + 12);
    v.extend_from_slice(ts.as_bytes());
    v.push(b' ');
    v.extend_from_slice(stream.as_str().as_bytes());
    v.push(b' ');
    v.push(match tag {
        Tag::Partial => b'P',
        Tag::Full => b'F',
    });
    v.push(b' ');
    v.extend_from_slice(content);
    v.push(b'\n');
    v
}

/// Splits a byte stream into record contents: complete lines (without the
/// newline) as `F`, pieces of lines longer than `max` as `P`.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max: max.max(1),
        }
    }

    /// Feeds bytes, calling `emit` for every finished record.
    pub fn feed(&mut self, mut data: &[u8], emit: &mut impl FnMut(Tag, &[u8])) {
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let (line, rest) = (&data[..i], &data[i + 1..]);
                    self.push_partial(line, emit);
                    let mut content = std::mem::take(&mut self.buf);
                    if content.last() == Some(&b'\r') {
                        content.pop();
                    }
                    emit(Tag::Full, &content);
                    data = rest;
                }
                None => {
                    self.push_partial(data, emit);
                    data = &[];
                }
            }
        }
    }

    fn push_partial(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(Tag, &[u8])) {
        while self.buf.len() + bytes.len() > self.max {
            let take = self.max - self.buf.len();
            self.buf.extend_from_slice(&bytes[..take]);
            emit(Tag::Partial, &self.buf);
            self.buf.clear();
            bytes = &bytes[take..];
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The stream ended: bytes after the last newline become a `P` record.
    pub fn finish(&mut self, emit: &mut impl FnMut(Tag, &[u8])) {
        if !self.buf.is_empty() {
            let content = std::mem::take(&mut self.buf);
            emit(Tag::Partial, &content);
        }
    }
}

/// One container's log file, shared by its stdout and stderr copiers.
/// [`reopen`](Self::reopen) starts a new file at the same path after
/// kubelet rotated (renamed) the old one.
#[derive(Debug, Clone)]
pub struct LogFile {
    inner: Arc<Mutex<LogInner>>,
}

#[derive(Debug)]
struct LogInner {
    path: PathBuf,
    file: File,
}

fn open_log(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl LogFile {
    /// Opens (creating, appending) `path`; its directory must exist (kubelet
    /// creates the pod's log directory, huskd the container's subdirectory).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = open_log(path)?;
        Ok(Self {
            inner: Arc::new(Mutex::new(LogInner {
                path: path.to_path_buf(),
                file,
            })),
        })
    }

    pub fn path(&self) -> PathBuf {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .path
            .clone()
    }

    /// Writes one record with a single write so that stdout and stderr
    /// records never interleave inside a line.
    pub fn write_record(&self, stream: Stream, tag: Tag, content: &[u8]) -> io::Result<()> {
        let rec = format_record(SystemTime::now(), stream, tag, content);
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.file.write_all(&rec)
    }

    /// Opens the path again (a new file if the old one was renamed away).
    pub fn reopen(&self) -> io::Result<()> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let f = open_log(&g.path)?;
        g.file = f;
        Ok(())
    }
}

/// Copies a process's output stream into `log` until EOF. Returns the
/// number of bytes read. Write errors are logged and the stream is still
/// drained, so a full disk never blocks the process in the guest.
pub async fn copy_to_log<R: AsyncRead + Unpin>(
    mut reader: R,
    stream: Stream,
    log: LogFile,
    max_line: usize,
) -> u64 {
    let mut splitter = LineSplitter::new(max_line);
    let mut buf = vec![0u8; 32 * 1024];
    let mut total = 0u64;
    let mut failed = false;
    let mut emit = |tag: Tag, content: &[u8]| {
        if let Err(e) = log.write_record(stream, tag, content) {
            if !failed {
                tracing::warn!(path = %log.path().display(), error = %e, "writing the container log failed");
                failed = true;
            }
        }
    };
    loop {
        match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => {
                total += n as u64;
                splitter.feed(&buf[..n], &mut emit);
            }
            Err(e) => {
                tracing::debug!(error = %e, stream = stream.as_str(), "container output stream ended");
                break;
            }
        }
    }
    splitter.finish(&mut emit);
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_match_go_rfc3339nano() {
        let t = |s: u64, n: u32| UNIX_EPOCH + Duration::new(s, n);
        assert_eq!(rfc3339_nano(t(0, 0)), "1970-01-01T00:00:00Z");
        // 2006-01-02T15:04:05Z
        assert_eq!(
            rfc3339_nano(t(1_136_214_245, 999_999_999)),
            "2006-01-02T15:04:05.999999999Z"
        );
        assert_eq!(
            rfc3339_nano(t(1_136_214_245, 120_000_000)),
            "2006-01-02T15:04:05.12Z"
        );
        assert_eq!(
            rfc3339_nano(t(1_136_214_245, 1)),
            "2006-01-02T15:04:05.000000001Z"
        );
        // Leap day and year ends.
        assert_eq!(rfc3339_nano(t(951_782_400, 0)), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_nano(t(1_735_689_599, 0)), "2024-12-31T23:59:59Z");
        assert_eq!(rfc3339_nano(t(4_102_444_800, 0)), "2100-01-01T00:00:00Z");
    }

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<(Tag, String)> {
        let mut out = Vec::new();
        let mut s = LineSplitter::new(max);
        let mut emit = |t: Tag, c: &[u8]| out.push((t, String::from_utf8_lossy(c).into_owned()));
        for c in chunks {
            s.feed(c, &mut emit);
        }
        s.finish(&mut emit);
        out
    }

    #[test]
    fn lines_and_partials() {
        use Tag::*;
        assert_eq!(
            split(100, &[b"hello\nwor", b"ld\n\nend"]),
            vec![
                (Full, "hello".into()),
                (Full, "world".into()),
                (Full, "".into()),
                (Partial, "end".into())
            ]
        );
        assert_eq!(split(100, &[b"crlf\r\n"]), vec![(Full, "crlf".into())]);
        // A line longer than max: P pieces then the F tail.
        assert_eq!(
            split(4, &[b"abcdefghij\n"]),
            vec![
                (Partial, "abcd".into()),
                (Partial, "efgh".into()),
                (Full, "ij".into())
            ]
        );
        // Exactly max: no empty pieces.
        assert_eq!(
            split(4, &[b"ab", b"cd", b"\n"]),
            vec![(Full, "abcd".into())]
        );
        assert_eq!(split(4, &[b"abcd"]), vec![(Partial, "abcd".into())]);
        assert!(split(4, &[]).is_empty());
    }

    #[test]
    fn record_format() {
        let t = UNIX_EPOCH + Duration::new(1_136_214_245, 5);
        assert_eq!(
            format_record(t, Stream::Stderr, Tag::Partial, b"x y"),
            b"2006-01-02T15:04:05.000000005Z stderr P x y\n"
        );
    }

    /// Checks every written line against the kubelet format.
    fn parse_kubelet_line(l: &str) -> (String, String, String) {
        let mut it = l.splitn(4, ' ');
        let ts = it.next().unwrap();
        assert!(
            ts.ends_with('Z') && ts.len() >= 20 && ts.as_bytes()[10] == b'T',
            "{l}"
        );
        let stream = it.next().unwrap().to_string();
        assert!(stream == "stdout" || stream == "stderr", "{l}");
        let tag = it.next().unwrap().to_string();
        assert!(tag == "P" || tag == "F", "{l}");
        (stream, tag, it.next().unwrap_or("").to_string())
    }

    #[tokio::test]
    async fn copy_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("0.log");
        let log = LogFile::open(&path).unwrap();
        let n = copy_to_log(&b"one\ntwo\nthr"[..], Stream::Stdout, log.clone(), 16).await;
        assert_eq!(n, 11);
        copy_to_log(&b"err\n"[..], Stream::Stderr, log.clone(), 16).await;
        // Rotation: kubelet renames, then asks for a reopen.
        let rotated = d.path().join("0.log.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen().unwrap();
        copy_to_log(&b"after\n"[..], Stream::Stdout, log.clone(), 16).await;

        let old = std::fs::read_to_string(&rotated).unwrap();
        let recs: Vec<_> = old.lines().map(parse_kubelet_line).collect();
        let want = |s: &str, t: &str, c: &str| (s.to_string(), t.to_string(), c.to_string());
        assert_eq!(
            recs,
            vec![
                want("stdout", "F", "one"),
                want("stdout", "F", "two"),
                want("stdout", "P", "thr"),
                want("stderr", "F", "err")
            ]
        );
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            new.lines().map(parse_kubelet_line).collect::<Vec<_>>(),
            vec![want("stdout", "F", "after")]
        );
    }
}
