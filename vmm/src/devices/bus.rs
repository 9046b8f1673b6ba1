//! Address-range dispatch for port I/O and MMIO exits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers guest accesses in a registered range. `offset` is relative to the
/// start of the range; `data.len()` is the access width (1, 2, 4 or 8; never trust it more).
pub trait BusDevice: Send {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("range {0:#x}+{1:#x} overlaps an existing device or is empty")]
    Overlap(u64, u64),
}

struct Entry {
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping ranges.
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).ok_or(BusError::Overlap(base, len))?;
        if len == 0 {
            return Err(BusError::Overlap(base, len));
        }
        if let Some((b, e)) = self.ranges.range(..end).next_back() {
            if b + e.len > base {
                return Err(BusError::Overlap(base, len));
            }
        }
        self.ranges.insert(base, Entry { len, dev });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Entry)> {
        let (base, e) = self.ranges.range(..=addr).next_back()?;
        let off = addr - base;
        // The whole access must lie inside the range.
        if off.checked_add(size as u64)? <= e.len {
            Some((*base, e))
        } else {
            None
        }
    }

    /// Returns false when no device claims the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, e)) => {
                lock(&e.dev).read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((base, e)) => {
                lock(&e.dev).write(base, addr - base, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device mutex, recovering from poisoning: a device that panicked in one access must
/// not take the whole VMM down on the next.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl BusDevice for Echo {
        fn read(&mut self, _b: u64, off: u64, data: &mut [u8]) {
            data.fill(off as u8);
        }
        fn write(&mut self, _b: u64, _o: u64, _d: &[u8]) {}
    }

    #[test]
    fn dispatch_and_bounds() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo)), 0x100, 0x10).unwrap();
        assert!(bus.insert(Arc::new(Mutex::new(Echo)), 0x108, 0x10).is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Echo)), 0xf8, 0x10).is_err());
        bus.insert(Arc::new(Mutex::new(Echo)), 0x110, 0x10).unwrap();
        let mut d = [0u8; 4];
        assert!(bus.read(0x104, &mut d));
        assert_eq!(d, [4; 4]);
        // Straddles the end of the range.
        assert!(!bus.read(0x11e, &mut d));
        assert!(!bus.read(0x50, &mut d));
        assert!(!bus.read(u64::MAX - 1, &mut d));
    }
}
