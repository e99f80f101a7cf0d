//! Which channels track presence (per namespace, with a `"*"` fallback), and the
//! in-memory presence of one node: the embedded broker's whole truth, the Redis broker's
//! record of what it must keep refreshing.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use fanout_protocol::{namespace_of, ChannelName, PresenceList, PresenceStats, Present, MAX_PRESENCE_LIST};

/// A namespace's presence: entries live `ttl` unless their node refreshes them;
/// `join_leave` sends subscribers join and leave events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresencePolicy {
    pub ttl: Duration,
    pub join_leave: bool,
}

/// The presence policy of every namespace that tracks it.
#[derive(Debug, Clone, Default)]
pub struct Presences {
    by_namespace: HashMap<Box<str>, Option<PresencePolicy>>,
    fallback: Option<PresencePolicy>,
}

impl Presences {
    /// `namespaces` may hold `"*"`; `None` means listed without presence.
    pub fn new(namespaces: impl IntoIterator<Item = (String, Option<PresencePolicy>)>) -> Self {
        let mut p = Self::default();
        for (name, policy) in namespaces {
            if name == "*" {
                p.fallback = policy;
            } else {
                p.by_namespace.insert(name.into(), policy);
            }
        }
        p
    }

    pub fn of(&self, channel: &str) -> Option<PresencePolicy> {
        if self.by_namespace.is_empty() && self.fallback.is_none() {
            return None;
        }
        match self.by_namespace.get(namespace_of(channel)) {
            Some(p) => *p,
            None => self.fallback,
        }
    }

    /// The shortest `presence_ttl` of any namespace.
    pub fn min_ttl(&self) -> Option<Duration> {
        self.by_namespace.values().chain(std::iter::once(&self.fallback)).flatten().map(|p| p.ttl).min()
    }

    pub fn any(&self) -> bool {
        self.fallback.is_some() || self.by_namespace.values().any(Option::is_some)
    }
}

/// channel → client → user, for the connections of this node.
#[derive(Default)]
pub struct LocalPresence {
    channels: Mutex<HashMap<ChannelName, HashMap<String, String>>>,
}

impl LocalPresence {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ChannelName, HashMap<String, String>>> {
        self.channels.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a join; false when the client was already there.
    pub fn join(&self, channel: &ChannelName, client: &str, user: &str) -> bool {
        self.lock().entry(channel.clone()).or_default().insert(client.to_owned(), user.to_owned()).is_none()
    }

    /// Records a leave: the client's user, when it was there.
    pub fn leave(&self, channel: &ChannelName, client: &str) -> Option<String> {
        let mut channels = self.lock();
        let clients = channels.get_mut(channel)?;
        let user = clients.remove(client);
        if clients.is_empty() {
            channels.remove(channel);
        }
        user
    }

    pub fn list(&self, channel: &str) -> PresenceList {
        let channels = self.lock();
        let Some(clients) = channels.get(channel) else { return PresenceList::default() };
        let mut list: Vec<Present> =
            clients.iter().map(|(c, u)| Present { client: c.clone(), user: u.clone() }).collect();
        list.sort_by(|a, b| a.client.cmp(&b.client));
        let truncated = list.len() > MAX_PRESENCE_LIST;
        list.truncate(MAX_PRESENCE_LIST);
        PresenceList { clients: list, truncated }
    }

    pub fn stats(&self, channel: &str) -> PresenceStats {
        let channels = self.lock();
        let Some(clients) = channels.get(channel) else { return PresenceStats::default() };
        let users: std::collections::HashSet<&String> = clients.values().collect();
        PresenceStats { clients: clients.len() as u64, users: users.len() as u64 }
    }

    /// Every channel with its clients, to refresh them elsewhere.
    pub fn snapshot(&self) -> Vec<(ChannelName, Vec<String>)> {
        self.lock().iter().map(|(c, clients)| (c.clone(), clients.keys().cloned().collect())).collect()
    }

    /// Every channel with its clients and their users.
    pub fn snapshot_with_users(&self) -> Vec<(ChannelName, Vec<(String, String)>)> {
        self.lock()
            .iter()
            .map(|(c, clients)| (c.clone(), clients.iter().map(|(k, u)| (k.clone(), u.clone())).collect()))
            .collect()
    }

    /// Entries held (for the metric).
    pub fn entries(&self) -> usize {
        self.lock().values().map(HashMap::len).sum()
    }
}

/// Join/leave events one channel may send per second from one node, and their burst:
/// beyond it a reconnect storm's events are dropped (counted) instead of multiplying
/// traffic by the channel's size. Presence itself stays exact.
pub const EVENTS_PER_SECOND: f64 = 50.0;
const EVENTS_BURST: f64 = 200.0;

/// Per-channel token buckets for join/leave events.
#[derive(Default)]
pub struct EventBudget {
    buckets: Mutex<HashMap<ChannelName, (f64, Instant)>>,
}

impl EventBudget {
    /// Takes one event's token on `channel`; false when the channel is over its rate.
    pub fn take(&self, channel: &ChannelName) -> bool {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() > 100_000 {
            // Bounded: forget idle channels (their buckets would be full again anyway).
            buckets.retain(|_, (_, at)| now.duration_since(*at) < Duration::from_secs(10));
        }
        let (tokens, at) = buckets.entry(channel.clone()).or_insert((EVENTS_BURST, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * EVENTS_PER_SECOND).min(EVENTS_BURST);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_presence_counts_clients_and_distinct_users() {
        let p = LocalPresence::default();
        let ch = ChannelName::new("p:1").unwrap();
        assert!(p.join(&ch, "c1", "alice"));
        assert!(!p.join(&ch, "c1", "alice"));
        assert!(p.join(&ch, "c2", "alice"));
        assert!(p.join(&ch, "c3", "bob"));
        assert_eq!(p.stats("p:1"), PresenceStats { clients: 3, users: 2 });
        assert_eq!(p.leave(&ch, "c2").as_deref(), Some("alice"));
        assert_eq!(p.leave(&ch, "c2"), None);
        assert_eq!(p.list("p:1").clients.len(), 2);
        p.leave(&ch, "c1");
        p.leave(&ch, "c3");
        assert_eq!(p.entries(), 0);
    }

    #[test]
    fn the_event_budget_caps_a_burst() {
        let b = EventBudget::default();
        let ch = ChannelName::new("p:1").unwrap();
        let allowed = (0..1000).filter(|_| b.take(&ch)).count();
        assert!((200..=210).contains(&allowed), "{allowed}");
    }
}
