//! Single-use, expiring tokens for streaming requests: what `Exec`,
//! `Attach` and `PortForward` cache, and what the URL they return names.
//!
//! A token is 20 random bytes (from the kernel's CSPRNG), so it cannot be
//! guessed; it is removed when used, so it cannot be replayed; it expires
//! (kubelet's and containerd's servers: one minute); and the cache is
//! bounded, so a flood of requests cannot grow it without end.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("too many streaming requests waiting ({0}); try again when some are used or expired")]
    Full(usize),
    #[error("no randomness for a token: {0}")]
    Random(String),
}

pub struct RequestCache<T> {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<String, (Instant, T)>>,
}

impl<T> RequestCache<T> {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Caches `req` and returns its token.
    pub fn insert(&self, req: T) -> Result<String, TokenError> {
        let mut raw = [0u8; 20];
        getrandom::getrandom(&mut raw).map_err(|e| TokenError::Random(e.to_string()))?;
        let token = hex::encode(raw);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if entries.len() >= self.capacity {
            entries.retain(|_, (at, _)| now.duration_since(*at) < self.ttl);
        }
        if entries.len() >= self.capacity {
            return Err(TokenError::Full(self.capacity));
        }
        entries.insert(token.clone(), (now, req));
        Ok(token)
    }

    /// The request of `token`, once: unknown, used and expired tokens are
    /// all `None`.
    pub fn consume(&self, token: &str) -> Option<T> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let (at, req) = entries.remove(token)?;
        (at.elapsed() < self.ttl).then_some(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_use_unguessable_expiring_bounded() {
        let c = RequestCache::new(Duration::from_millis(50), 3);
        let t1 = c.insert(1).unwrap();
        let t2 = c.insert(2).unwrap();
        assert_ne!(t1, t2);
        assert_eq!(t1.len(), 40);
        assert!(t1.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(c.consume(&t1), Some(1));
        assert_eq!(c.consume(&t1), None, "used once");
        assert_eq!(c.consume("0000"), None);
        c.insert(3).unwrap();
        c.insert(4).unwrap();
        assert!(matches!(c.insert(5), Err(TokenError::Full(3))));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(c.consume(&t2), None, "expired");
        // Expired entries make room.
        c.insert(6).unwrap();
    }
}
