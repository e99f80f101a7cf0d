//! Rate limiting: the token bucket every limit uses, the per-IP table of buckets that
//! guards the upgrade endpoint with bounded memory, and the trusted-proxy rule that says
//! which address a connection is charged to.
//!
//! Hand-written rather than `governor`: a bucket here is 16 bytes updated under the caller's
//! own lock (a session's buckets need no synchronisation at all), and the per-IP table
//! prunes refilled entries and caps itself at [`MAX_TRACKED_IPS`], so a flood from many
//! addresses costs a few MiB; a keyed governor limiter grows with every address it sees
//! until it is swept.

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

/// An address block, `10.0.0.0/8`, or a single address: ipnet's, which wants a prefix, so
/// a bare address is taken as a block of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet(ipnet::IpNet);

impl std::str::FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let net = if s.contains('/') {
            s.parse::<ipnet::IpNet>().map_err(|_| format!("{s:?} is not a CIDR block"))?
        } else {
            ipnet::IpNet::from(s.parse::<IpAddr>().map_err(|_| format!("{s:?} is not an address or CIDR block"))?)
        };
        Ok(Self(net))
    }
}

impl IpNet {
    /// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.1`) match their IPv4 blocks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

/// Proxies whose `X-Forwarded-For` is believed. Without any, the TCP peer is the client.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        Self(nets)
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|n| n.contains(ip))
    }

    /// The client address of a request from `peer`: when `peer` is a trusted proxy, the
    /// right-most `X-Forwarded-For` entry that is not itself a trusted proxy. Entries left of
    /// it were written by the client and prove nothing.
    pub fn client_ip(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        if self.0.is_empty() || !self.trusts(peer) {
            return peer;
        }
        let mut client = peer;
        for value in headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(value) = value.to_str() else { return client };
            for entry in value.rsplit(',') {
                let Ok(ip) = entry.trim().parse::<IpAddr>() else { return client };
                client = ip;
                if !self.trusts(ip) {
                    return ip;
                }
            }
        }
        client
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxies_pick_the_rightmost_untrusted_address() {
        let nets: Vec<IpNet> = ["10.0.0.0/8", "127.0.0.1", "fd00::/8"].iter().map(|s| s.parse().unwrap()).collect();
        let t = TrustedProxies::new(nets);
        let h = |v: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in v {
                h.append("x-forwarded-for", v.parse().unwrap());
            }
            h
        };
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        let client: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(t.client_ip(proxy, &h(&["203.0.113.9"])), client);
        // A client-written entry to the left does not matter.
        assert_eq!(t.client_ip(proxy, &h(&["1.1.1.1, 203.0.113.9, 10.9.9.9"])), client);
        assert_eq!(t.client_ip(proxy, &h(&["1.1.1.1", "203.0.113.9, 127.0.0.1"])), client);
        // Not from a trusted proxy: the header is ignored.
        let stranger: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(t.client_ip(stranger, &h(&["203.0.113.9"])), stranger);
        // No header, or garbage: the last trusted hop.
        assert_eq!(t.client_ip(proxy, &h(&[])), proxy);
        assert_eq!(t.client_ip(proxy, &h(&["nonsense"])), proxy);
        assert_eq!(t.client_ip(proxy, &h(&["10.0.0.7"])), "10.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(
            t.client_ip("fd12::1".parse().unwrap(), &h(&["2001:db8::1"])),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(TrustedProxies::default().client_ip(proxy, &h(&["203.0.113.9"])), proxy);
    }

    #[test]
    fn ip_nets() {
        let n: IpNet = "192.168.0.0/16".parse().unwrap();
        assert!(n.contains("192.168.4.1".parse().unwrap()) && !n.contains("192.169.0.1".parse().unwrap()));
        assert!(n.contains("::ffff:192.168.1.1".parse().unwrap()));
        assert!("0.0.0.0/0".parse::<IpNet>().unwrap().contains("8.8.8.8".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x", "10.0.0.0/", "::/129", ""] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
    }

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
