//! Which channels keep history (per namespace, with a `"*"` fallback) and for how long:
//! the one lookup the hub and every broker share.

use std::{collections::HashMap, time::Duration};

use fanout_protocol::namespace_of;

/// A namespace's history: the last `size` publications of each channel, kept for `ttl`
/// after the channel's last publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryPolicy {
    pub size: u64,
    pub ttl: Duration,
}

/// The history policy of every namespace that keeps one.
#[derive(Debug, Clone, Default)]
pub struct Histories {
    by_namespace: HashMap<Box<str>, HistoryPolicy>,
    /// The `"*"` namespace rule, for namespaces not listed.
    fallback: Option<HistoryPolicy>,
}

impl Histories {
    /// `namespaces` may hold `"*"`; entries with `size` 0 keep no history.
    pub fn new(namespaces: impl IntoIterator<Item = (String, HistoryPolicy)>) -> Self {
        let mut h = Self::default();
        for (name, policy) in namespaces {
            let policy = (policy.size > 0).then_some(policy);
            if name == "*" {
                h.fallback = policy;
            } else if let Some(policy) = policy {
                h.by_namespace.insert(name.into(), policy);
            } else {
                // Listed with history off: must not fall back to `"*"`.
                h.by_namespace.insert(name.into(), HistoryPolicy { size: 0, ttl: Duration::ZERO });
            }
        }
        h
    }

    /// The policy of `channel`'s namespace; `None` when it keeps no history.
    pub fn of(&self, channel: &str) -> Option<HistoryPolicy> {
        if self.by_namespace.is_empty() && self.fallback.is_none() {
            return None;
        }
        match self.by_namespace.get(namespace_of(channel)) {
            Some(p) => (p.size > 0).then_some(*p),
            None => self.fallback,
        }
    }

    /// Whether any namespace keeps history.
    pub fn any(&self) -> bool {
        self.fallback.is_some() || self.by_namespace.values().any(|p| p.size > 0)
    }

    /// Every namespace that keeps history and its policy (`"*"` included), for the Redis
    /// Function library.
    pub fn entries(&self) -> Vec<(String, HistoryPolicy)> {
        let mut v: Vec<_> =
            self.by_namespace.iter().filter(|(_, p)| p.size > 0).map(|(n, p)| (n.to_string(), *p)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(p) = self.fallback {
            v.push(("*".into(), p));
        }
        v
    }

    /// Namespaces listed with history off (they do not fall back to `"*"`).
    pub fn off(&self) -> Vec<String> {
        let mut v: Vec<_> = self.by_namespace.iter().filter(|(_, p)| p.size == 0).map(|(n, _)| n.to_string()).collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_fallback_and_off() {
        let p = |size| HistoryPolicy { size, ttl: Duration::from_secs(60) };
        let h = Histories::new([("h".to_string(), p(10)), ("plain".to_string(), p(0)), ("*".to_string(), p(5))]);
        assert_eq!(h.of("h:a"), Some(p(10)));
        assert_eq!(h.of("plain:a"), None, "listed with history off");
        assert_eq!(h.of("other:a"), Some(p(5)));
        assert_eq!(h.of("nocolon"), Some(p(5)));
        assert!(h.any());
        let none = Histories::new([("plain".to_string(), p(0))]);
        assert_eq!(none.of("plain:x"), None);
        assert_eq!(none.of("x"), None);
        assert!(!none.any());
    }
}
