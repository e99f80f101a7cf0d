//! Rate limiting: the token bucket every limit uses, and the per-IP table of buckets that
//! guards the upgrade endpoint with bounded memory.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

/// The shape of a token bucket: `burst` tokens at most, refilled at `per_second`. Kept
/// apart from the bucket's state, which every connection holds, so that state stays small.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

impl Rate {
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self { per_second, burst: f64::from(burst.max(1)) }
    }
}

/// A token bucket's state. Refill is computed lazily from the time of the last take, so an
/// idle bucket costs nothing.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate, now: Instant) -> Self {
        Self { tokens: rate.burst, last: now }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, rate: Rate, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket would be full at `now`: such a bucket is the same as a fresh one
    /// and can be forgotten.
    pub fn is_full_at(&self, rate: Rate, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * rate.per_second >= rate.burst
    }
}

/// Entries the per-IP table holds before it refuses to track new addresses. Each is a few
/// dozen bytes, so this caps the table at a few MiB however many addresses a flood uses.
pub const MAX_TRACKED_IPS: usize = 100_000;

/// One bucket per client address (IPv6 per /64, the block one subscriber usually holds),
/// for new connections.
pub struct IpRateLimiter {
    rate: Rate,
    table: Mutex<IpTable>,
}

struct IpTable {
    buckets: HashMap<IpAddr, TokenBucket>,
    /// Size at which the next pruning pass runs; doubling it keeps pruning amortised O(1).
    prune_at: usize,
    /// A table still full after pruning is not pruned again before this, so a flood from
    /// many addresses costs one pass per second, not one per attempt.
    next_full_prune: Option<Instant>,
}

/// What the limiter decided for one connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpVerdict {
    Allowed,
    Limited,
    /// The table is full of active addresses: allowed without tracking (the node's
    /// connection cap still applies), so a spoofed-looking flood cannot lock out newcomers.
    Untracked,
}

const MIN_PRUNE_AT: usize = 1024;

impl IpRateLimiter {
    /// `rate` connections per second per address with bursts of `burst`.
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate: Rate::new(rate, burst),
            table: Mutex::new(IpTable { buckets: HashMap::new(), prune_at: MIN_PRUNE_AT, next_full_prune: None }),
        }
    }

    /// The key an address is limited under.
    pub fn key(ip: IpAddr) -> IpAddr {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
            v4 => v4,
        }
    }

    /// Charges one connection attempt from `ip`.
    pub fn check(&self, ip: IpAddr, now: Instant) -> IpVerdict {
        let key = Self::key(ip);
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = t.buckets.get_mut(&key) {
            return if bucket.try_take(self.rate, now) { IpVerdict::Allowed } else { IpVerdict::Limited };
        }
        if t.buckets.len() >= t.prune_at && t.next_full_prune.is_none_or(|at| now >= at) {
            let rate = self.rate;
            t.buckets.retain(|_, b| !b.is_full_at(rate, now));
            t.prune_at = (t.buckets.len() * 2).clamp(MIN_PRUNE_AT, MAX_TRACKED_IPS);
            t.next_full_prune = (t.buckets.len() >= MAX_TRACKED_IPS).then(|| now + Duration::from_secs(1));
        }
        if t.buckets.len() >= MAX_TRACKED_IPS {
            return IpVerdict::Untracked;
        }
        let mut bucket = TokenBucket::new(self.rate, now);
        let allowed = bucket.try_take(self.rate, now);
        t.buckets.insert(key, bucket);
        if allowed {
            IpVerdict::Allowed
        } else {
            IpVerdict::Limited
        }
    }

    /// Addresses currently tracked.
    pub fn tracked(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).buckets.len()
    }

    /// How long an address that was just limited should wait before its next attempt.
    pub fn retry_after(&self) -> Duration {
        Duration::from_secs_f64((1.0 / self.rate.per_second).clamp(1.0, 3600.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let r = Rate::new(10.0, 3);
        let mut b = TokenBucket::new(r, t0);
        assert!(b.try_take(r, t0) && b.try_take(r, t0) && b.try_take(r, t0));
        assert!(!b.try_take(r, t0));
        assert!(!b.try_take(r, t0 + Duration::from_millis(50)));
        assert!(b.try_take(r, t0 + Duration::from_millis(110)));
        assert!(!b.is_full_at(r, t0 + Duration::from_millis(200)));
        assert!(b.is_full_at(r, t0 + Duration::from_secs(1)));
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(100);
        assert!((0..3).all(|_| b.try_take(r, later)));
        assert!(!b.try_take(r, later));
    }

    #[test]
    fn ip_limiter_is_per_address_and_per_ipv6_64() {
        let l = IpRateLimiter::new(1.0, 2);
        let now = Instant::now();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(l.check(a, now), IpVerdict::Allowed);
        assert_eq!(l.check(a, now), IpVerdict::Allowed);
        assert_eq!(l.check(a, now), IpVerdict::Limited);
        assert_eq!(l.check(b, now), IpVerdict::Allowed);
        // A v4-mapped v6 address is the v4 address.
        assert_eq!(l.check("::ffff:10.0.0.1".parse().unwrap(), now), IpVerdict::Limited);
        // Addresses of one /64 share a bucket.
        let x: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let y: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        assert_eq!(l.check(x, now), IpVerdict::Allowed);
        assert_eq!(l.check(y, now), IpVerdict::Allowed);
        assert_eq!(l.check(x, now), IpVerdict::Limited);
        assert_eq!(l.check("2001:db8:1:3::1".parse().unwrap(), now), IpVerdict::Allowed);
    }

    #[test]
    fn ip_table_memory_is_bounded() {
        let l = IpRateLimiter::new(1000.0, 1);
        let t0 = Instant::now();
        for i in 0..MIN_PRUNE_AT as u32 {
            let ip = IpAddr::V4((0x0a00_0000 + i).into());
            assert_eq!(l.check(ip, t0), IpVerdict::Allowed);
        }
        // Once every bucket has refilled, the next new address triggers a pruning pass.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(l.check("192.0.2.1".parse().unwrap(), later), IpVerdict::Allowed);
        assert_eq!(l.tracked(), 1);

        let l = IpRateLimiter::new(0.001, 1);
        for i in 0..(MAX_TRACKED_IPS as u32 + 10) {
            let verdict = l.check(IpAddr::V4((0x0a00_0000 + i).into()), t0);
            assert_ne!(verdict, IpVerdict::Limited);
        }
        assert_eq!(l.tracked(), MAX_TRACKED_IPS);
        assert_eq!(l.check("192.0.2.1".parse().unwrap(), t0), IpVerdict::Untracked);
        // Known addresses are still limited while the table is full.
        assert_eq!(l.check("10.0.0.1".parse().unwrap(), t0), IpVerdict::Limited);
    }
}
