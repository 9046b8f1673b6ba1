//! Logging to fd 2 (the serial console in the VM).
//!
//! The writer calls write(2) directly, without the lock std's Stderr takes:
//! libcontainer forks from a multi-threaded agent and its child processes
//! log too; a lock held by another thread at fork time would stay locked in
//! the child forever.

//!
//! It writes to a private duplicate of the original stderr, not to fd 2:
//! libcontainer's container processes log too, after they have replaced
//! fd 2 with the container's stderr, and their logs must not end up in the
//! container's output.

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

use tracing_subscriber::EnvFilter;

static LOG_FD: AtomicI32 = AtomicI32::new(2);

struct RawStderr;

impl io::Write for RawStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let fd = LOG_FD.load(Ordering::Relaxed);
        // SAFETY: write(2) reads buf.len() bytes from a live slice.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Points the log at what fd 2 is now (call again after replacing fd 2,
/// e.g. with /dev/console).
pub fn set_target_from_stderr() {
    // SAFETY: F_DUPFD_CLOEXEC creates a new fd and touches no memory. Fds
    // from 100 up keep clear of the low numbers processes expect to be free.
    let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 100) };
    if fd >= 0 {
        let old = LOG_FD.swap(fd, Ordering::Relaxed);
        if old != 2 {
            // SAFETY: `old` is our own earlier duplicate; nobody else uses it.
            unsafe { libc::close(old) };
        }
    }
}

pub fn init() {
    set_target_from_stderr();
    let filter =
        EnvFilter::try_from_env("HUSK_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| RawStderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}
