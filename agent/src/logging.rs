//! Logging to fd 2 (the serial console in the VM).
//!
//! The writer calls write(2) directly, without the lock std's Stderr takes:
//! libcontainer forks from a multi-threaded agent and its child processes
//! log too; a lock held by another thread at fork time would stay locked in
//! the child forever.

use std::io;

use tracing_subscriber::EnvFilter;

struct RawStderr;

impl io::Write for RawStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: write(2) reads buf.len() bytes from a live slice.
        let n = unsafe { libc::write(2, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn init() {
    let filter = EnvFilter::try_from_env("HUSK_AGENT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| RawStderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}
