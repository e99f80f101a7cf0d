//! How often and how long to wait before repeating a publish that failed retryably.

use std::time::Duration;

/// Bounded exponential backoff: retry `n` (0-based) waits a random time between half
/// and all of `min(initial_backoff * 2^n, max_backoff)`. The randomness keeps many
/// publishers that failed together from retrying in lockstep against a recovering node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after the first; 0 disables retrying.
    pub max_retries: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_retries: 3, initial_backoff: Duration::from_millis(50), max_backoff: Duration::from_secs(2) }
    }
}

impl RetryPolicy {
    /// One attempt only: what an open-loop load generator or an at-most-once caller wants.
    pub const NONE: RetryPolicy =
        RetryPolicy { max_retries: 0, initial_backoff: Duration::ZERO, max_backoff: Duration::ZERO };

    /// The wait before retry number `retry` (0 for the first retry).
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling =
            self.initial_backoff.saturating_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX)).min(self.max_backoff);
        let half = ceiling / 2;
        let spread = (ceiling - half).as_nanos() as u64;
        if spread == 0 {
            return ceiling;
        }
        half + Duration::from_nanos(fastrand::u64(..=spread))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_retries: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        };
        for _ in 0..100 {
            let b0 = p.backoff(0);
            assert!(b0 >= Duration::from_millis(50) && b0 <= Duration::from_millis(100), "{b0:?}");
            let b2 = p.backoff(2);
            assert!(b2 >= Duration::from_millis(200) && b2 <= Duration::from_millis(400), "{b2:?}");
            let big = p.backoff(40);
            assert!(big >= Duration::from_millis(500) && big <= Duration::from_secs(1), "{big:?}");
        }
        assert_eq!(RetryPolicy::NONE.backoff(3), Duration::ZERO);
    }

    #[test]
    fn jitter_varies() {
        let p = RetryPolicy::default();
        let samples: std::collections::HashSet<_> = (0..20).map(|_| p.backoff(3)).collect();
        assert!(samples.len() > 1);
    }
}
