//! Rate limits for log lines a guest can trigger.
//!
//! A guest driving a device badly on purpose (a malformed chain on every kick, a UART write
//! the emulation refuses, a BAR it may not move) would otherwise turn each of its VM exits into
//! a line in the host's journal: disk, CPU and the operator's log pipeline paid by the node.
//! [`guest_warn!`] lets the first [`BURST`] lines of a call site through per [`WINDOW`], then
//! counts what it drops and says so on the next line it lets through.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Lines a call site may log per window.
pub const BURST: u64 = 10;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(60);

fn elapsed_windows() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    (start.elapsed().as_secs() / WINDOW.as_secs()) + 1
}

/// One call site's budget. Lock-free: device threads must never wait on logging.
#[derive(Debug, Default)]
pub struct LogLimiter {
    /// The window the counts belong to (0: none yet).
    window: AtomicU64,
    logged: AtomicU64,
    dropped: AtomicU64,
}

impl LogLimiter {
    pub const fn new() -> Self {
        LogLimiter {
            window: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// `Some(lines dropped since the last one logged)` if this line may be logged.
    pub fn admit(&self) -> Option<u64> {
        self.admit_in(elapsed_windows())
    }

    fn admit_in(&self, now: u64) -> Option<u64> {
        if self.window.swap(now, Ordering::Relaxed) != now {
            self.logged.store(0, Ordering::Relaxed);
        }
        if self.logged.fetch_add(1, Ordering::Relaxed) < BURST {
            Some(self.dropped.swap(0, Ordering::Relaxed))
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// `tracing::warn!` for events a guest controls, limited per call site (see the module docs).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::log_limit::LogLimiter = $crate::log_limit::LogLimiter::new();
        if let Some(dropped) = LIMIT.admit() {
            if dropped > 0 {
                ::tracing::warn!(dropped, $($arg)+);
            } else {
                ::tracing::warn!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_lines_are_counted_and_reported() {
        let l = LogLimiter::new();
        for _ in 0..BURST {
            assert_eq!(l.admit_in(1), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.admit_in(1), None);
        }
        // The next window logs again and says how many lines were dropped.
        assert_eq!(l.admit_in(2), Some(1000));
        assert_eq!(l.admit_in(2), Some(0));
    }

    #[test]
    fn the_macro_compiles_with_fields_and_format_args() {
        let head = 3;
        for _ in 0..(BURST * 3) {
            guest_warn!(head, "a malformed chain {head}");
        }
    }
}
