//! A log-rate limiter: bad input from clients or backends is logged, but never so often
//! that a hostile peer can flood the node's logs.

use std::sync::atomic::{AtomicU64, Ordering};

/// Allows one log line per interval and counts the ones it suppressed in between.
/// `const`-constructible so each call site can keep its own `static`.
pub struct LogLimiter {
    interval_ms: u64,
    next_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl LogLimiter {
    pub const fn new(interval_ms: u64) -> Self {
        Self { interval_ms, next_ms: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// `Some(n)` when the caller may log now (`n` lines were suppressed since the last
    /// one), `None` when it should stay quiet.
    pub fn check(&self) -> Option<u64> {
        let now = fanout_protocol::now_micros() / 1000;
        let next = self.next_ms.load(Ordering::Relaxed);
        if now >= next
            && self.next_ms.compare_exchange(next, now + self.interval_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_interval() {
        let l = LogLimiter::new(60_000);
        assert_eq!(l.check(), Some(0));
        assert_eq!(l.check(), None);
        assert_eq!(l.check(), None);
        l.next_ms.store(0, Ordering::Relaxed);
        assert_eq!(l.check(), Some(2));
    }
}
