//! The reconnect delay: exponential, capped, with jitter so a fleet of nodes that lost the
//! same Redis does not reconnect in lockstep.

use std::time::Duration;

/// First delay after a failed attempt; the attempt right after a lost connection is
/// immediate (a restarted Redis is often already back).
const BASE: Duration = Duration::from_millis(50);

pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
    attempts: u64,
}

impl Backoff {
    pub(crate) fn new(max: Duration) -> Self {
        Self { next: BASE.min(max), max, attempts: 0 }
    }

    /// The delay before the next attempt: between half and all of the current step.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.attempts += 1;
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let half = step / 2;
        half + Duration::from_nanos(fastrand::u64(..=half.as_nanos() as u64))
    }

    /// Failed attempts since the last reset.
    pub(crate) fn attempts(&self) -> u64 {
        self.attempts
    }

    pub(crate) fn reset(&mut self) {
        self.next = BASE.min(self.max);
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_bounded_jitter() {
        let max = Duration::from_millis(500);
        let mut b = Backoff::new(max);
        let mut steps = vec![];
        for _ in 0..10 {
            steps.push(b.next_delay());
        }
        assert!(steps[0] >= BASE / 2 && steps[0] <= BASE, "{steps:?}");
        assert!(steps.iter().all(|d| *d <= max), "{steps:?}");
        assert!(steps[9] >= max / 2, "{steps:?}");
        assert_eq!(b.attempts(), 10);
        b.reset();
        assert!(b.next_delay() <= BASE);
    }

    #[test]
    fn zero_cap_means_no_delay() {
        let mut b = Backoff::new(Duration::ZERO);
        assert_eq!(b.next_delay(), Duration::ZERO);
    }
}
