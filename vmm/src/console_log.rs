//! A guest console log with a size cap, for husk-vmm's serial port and husk-vsock's console sink
//! (QEMU pods).
//!
//! The guest decides what it writes to its console and how much: root in the guest can write to
//! the UART for as long as it likes. On the host that output must stay bounded, so the log is
//! two files, `<path>` and `<path>.1`, each at most half the cap: when `<path>` is full it
//! replaces `<path>.1` and a new `<path>` starts. The newest output is always kept and the
//! oldest dropped, and readers of `<path>` still find the latest lines there.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The smallest cap: below this a rotation would happen every few lines.
pub const MIN_MAX_BYTES: u64 = 8 * 1024;

/// The rotated half of a console log at `path`.
pub fn previous_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".1");
    PathBuf::from(p)
}

/// Append-only console log, at most `max_bytes` on disk across both of its files.
pub struct CappedLog {
    path: PathBuf,
    file: File,
    /// Bytes in the current file.
    len: u64,
    /// Each file's limit: half the cap.
    half: u64,
}

impl CappedLog {
    /// Opens (appending to) the log at `path`; `max_bytes` is raised to [`MIN_MAX_BYTES`].
    pub fn open(path: &Path, max_bytes: u64) -> io::Result<Self> {
        let file = Self::open_file(path)?;
        let len = file.metadata()?.len();
        let mut log = CappedLog {
            path: path.to_path_buf(),
            file,
            len,
            half: max_bytes.max(MIN_MAX_BYTES) / 2,
        };
        // A log left by an earlier run with a larger cap gets rotated now.
        if log.len > log.half {
            log.rotate()?;
        }
        Ok(log)
    }

    fn open_file(path: &Path) -> io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    }

    fn rotate(&mut self) -> io::Result<()> {
        std::fs::rename(&self.path, previous_path(&self.path))?;
        self.file = Self::open_file(&self.path)?;
        self.len = 0;
        Ok(())
    }
}

impl Write for CappedLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Whatever the caller hands over, one file never exceeds `half`: a write larger than a
        // whole file keeps only its end.
        let mut buf = buf;
        let taken = buf.len();
        if buf.len() as u64 > self.half {
            buf = &buf[buf.len() - self.half as usize..];
        }
        if self.len + buf.len() as u64 > self.half {
            self.rotate()?;
        }
        self.file.write_all(buf)?;
        self.len += buf.len() as u64;
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(p: &Path) -> u64 {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn a_flood_stays_under_the_cap_and_keeps_the_newest_output() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        let mut log = CappedLog::open(&p, 64 * 1024).unwrap();
        // 10 MiB in console-sized writes, then one write larger than the cap.
        let line = [b'x'; 100];
        for _ in 0..(10 << 20) / line.len() {
            log.write_all(&line).unwrap();
        }
        log.write_all(&vec![b'y'; 1 << 20]).unwrap();
        log.write_all(b"\nlast line\n").unwrap();
        let total = size(&p) + size(&previous_path(&p));
        assert!(total <= 64 * 1024, "{total} bytes on disk");
        let current = std::fs::read_to_string(&p).unwrap();
        assert!(current.ends_with("\nlast line\n"), "newest output kept");
    }

    #[test]
    fn reopening_a_log_larger_than_the_cap_rotates_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        std::fs::write(&p, vec![b'a'; 200 * 1024]).unwrap();
        let mut log = CappedLog::open(&p, 16 * 1024).unwrap();
        log.write_all(b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        // The old file is now `.1`; it shrinks away at the next rotation.
        for _ in 0..3 {
            log.write_all(&[b'b'; 8 * 1024]).unwrap();
        }
        assert!(size(&p) + size(&previous_path(&p)) <= 16 * 1024);
    }

    #[test]
    fn a_tiny_cap_is_raised_to_the_minimum() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        let mut log = CappedLog::open(&p, 0).unwrap();
        log.write_all(&[b'z'; 3000]).unwrap();
        assert_eq!(size(&p), 3000);
    }
}
