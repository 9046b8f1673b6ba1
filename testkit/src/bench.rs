//! What the benchmark binaries share: how many rounds to run and the
//! statistic they report.

use std::cmp::Ordering;
use std::time::Duration;

use anyhow::{bail, Result};

/// A value a benchmark collects: ordered totally, so a NaN sample cannot
/// make sorting panic.
pub trait Sample: Copy {
    fn order(&self, other: &Self) -> Ordering;
}

impl Sample for f64 {
    fn order(&self, other: &Self) -> Ordering {
        self.total_cmp(other)
    }
}

impl Sample for Duration {
    fn order(&self, other: &Self) -> Ordering {
        self.cmp(other)
    }
}

/// The upper median: no averaging, so it is always a value that was
/// measured. Panics on an empty slice, like indexing would.
pub fn median<T: Sample>(v: &[T]) -> T {
    let mut v = v.to_vec();
    v.sort_by(T::order);
    v[v.len() / 2]
}

/// The benchmark's first argument, the number of rounds, or `default`;
/// zero rounds would leave nothing to take a median of.
pub fn rounds(default: usize) -> Result<usize> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(default);
    if n == 0 {
        bail!("N must be at least 1");
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_a_measured_value() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 3.0);
        assert_eq!(
            median(&[Duration::from_millis(5), Duration::from_millis(1)]),
            Duration::from_millis(5)
        );
        assert_eq!(median(&[f64::NAN, 1.0, 2.0]), 2.0);
    }
}
