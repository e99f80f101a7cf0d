//! The in-process broker: a single node needs no Redis, publications go straight to the
//! local registry, and channels that keep history keep it here, within a node-wide bound
//! on history bytes.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use fanout_protocol::{
    now_micros, ChannelName, Epoch, HistoryPage, HistoryQuery, Position, Publication, IDEMPOTENCY_WINDOW,
};

use crate::{
    broker::{BoxFuture, Broker, BrokerError, Published},
    history::{Histories, HistoryPolicy},
    registry::Registry,
};

/// Idempotency keys the embedded broker remembers at most; past it the oldest are
/// forgotten early, so keys cannot grow the node's memory without bound.
const MAX_KEYS: usize = 100_000;

/// What one stored publication costs beyond its data (the entry, its queue slots), and
/// what a channel's history costs before its first publication: counted against the
/// node-wide bound so that many tiny histories are bounded too.
const ENTRY_OVERHEAD: usize = 160;

/// (channel, key) → when it was first published and where it was stored, with the same
/// in arrival order for expiry.
#[derive(Default)]
struct Keys {
    seen: HashMap<(ChannelName, Box<str>), (Instant, Option<Position>)>,
    order: VecDeque<(Instant, ChannelName, Box<str>)>,
}

impl Keys {
    /// The first publication's answer when `key` was already used on `channel`.
    fn seen(&mut self, channel: &ChannelName, key: &str, now: Instant) -> Option<Option<Position>> {
        while let Some((at, _, _)) = self.order.front() {
            if now.duration_since(*at) < IDEMPOTENCY_WINDOW && self.order.len() < MAX_KEYS {
                break;
            }
            if let Some((at, c, k)) = self.order.pop_front() {
                let entry = (c, k);
                if self.seen.get(&entry).map(|(t, _)| t) == Some(&at) {
                    self.seen.remove(&entry);
                }
            }
        }
        self.seen.get(&(channel.clone(), Box::<str>::from(key))).map(|(_, p)| p.clone())
    }

    fn record(&mut self, channel: &ChannelName, key: &str, now: Instant, position: Option<Position>) {
        let entry = (channel.clone(), Box::<str>::from(key));
        self.seen.insert(entry.clone(), (now, position));
        self.order.push_back((now, entry.0, entry.1));
    }
}

/// One channel's history.
struct Channel {
    epoch: Epoch,
    /// Which incarnation of the channel this is, so queue entries of an earlier one are
    /// recognised as stale.
    generation: u64,
    top: u64,
    entries: VecDeque<Publication>,
    touched: Instant,
}

/// Every channel's history, bounded in bytes node-wide: past the bound the oldest stored
/// publications go first, whichever channel they are in, and a channel whose history is
/// gone entirely is forgotten (its next publication starts a new epoch).
struct Store {
    channels: HashMap<ChannelName, Channel>,
    /// (channel, generation, offset) in store order; offset 0 marks a channel's creation.
    order: VecDeque<(ChannelName, u64, u64)>,
    bytes: usize,
    limit: usize,
    /// This process's epochs start with this, so they differ from a previous run's.
    epoch_base: String,
    generations: u64,
}

fn cost(p: &Publication) -> usize {
    p.data.len() + ENTRY_OVERHEAD
}

impl Store {
    fn new(limit: usize) -> Self {
        Self {
            channels: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            limit,
            epoch_base: format!("{:x}", now_micros()),
            generations: 0,
        }
    }

    /// The channel's live history, a new one (new epoch) when it had none or it expired;
    /// `true` when it was created.
    fn channel(&mut self, name: &ChannelName, policy: HistoryPolicy, now: Instant) -> (&mut Channel, bool) {
        let expired = self.channels.get(name).is_some_and(|c| now.duration_since(c.touched) >= policy.ttl);
        if expired {
            if let Some(old) = self.channels.remove(name) {
                // Their queue slots stay counted until the queue reaches them.
                self.bytes -= old.entries.iter().map(|p| p.data.len()).sum::<usize>().min(self.bytes);
            }
        }
        let created = !self.channels.contains_key(name);
        if created {
            self.bytes += ENTRY_OVERHEAD;
            self.evict(None);
            self.generations += 1;
            self.order.push_back((name.clone(), self.generations, 0));
        }
        let (generation, base) = (self.generations, &self.epoch_base);
        let channel = self.channels.entry(name.clone()).or_insert_with(|| Channel {
            epoch: format!("{base}-{generation:x}").into(),
            generation,
            top: 0,
            entries: VecDeque::new(),
            touched: now,
        });
        (channel, created)
    }

    /// Drops the oldest stored state until the store is within its bound; `keep` (the
    /// channel being written) is never forgotten as a whole.
    fn evict(&mut self, keep: Option<&ChannelName>) {
        while self.bytes > self.limit {
            let Some((name, generation, offset)) = self.order.pop_front() else { break };
            let Some(c) = self.channels.get_mut(&name).filter(|c| c.generation == generation) else {
                self.bytes -= ENTRY_OVERHEAD.min(self.bytes);
                continue;
            };
            if offset == 0 {
                self.bytes -= ENTRY_OVERHEAD.min(self.bytes);
                if c.entries.is_empty() && keep != Some(&name) {
                    self.channels.remove(&name);
                }
                continue;
            } else if c.entries.front().and_then(Publication::offset) == Some(offset) {
                if let Some(p) = c.entries.pop_front() {
                    self.bytes -= cost(&p).min(self.bytes);
                }
            } else {
                // Already trimmed by history_size: only its queue slot was still counted.
                self.bytes -= ENTRY_OVERHEAD.min(self.bytes);
                continue;
            }
            if c.entries.is_empty() && keep != Some(&name) {
                self.channels.remove(&name);
            }
        }
    }

    fn store(&mut self, p: &mut Publication, policy: HistoryPolicy, now: Instant) -> (Position, bool) {
        let (c, created) = self.channel(&p.channel, policy, now);
        c.top += 1;
        c.touched = now;
        let position = Position { offset: c.top, epoch: c.epoch.clone() };
        p.position = Some(position.clone());
        c.entries.push_back(p.clone());
        let mut freed = 0;
        while c.entries.len() as u64 > policy.size {
            if let Some(old) = c.entries.pop_front() {
                // Its queue slot stays counted until the queue reaches it.
                freed += old.data.len();
            }
        }
        let generation = c.generation;
        self.bytes = self.bytes + cost(p) - freed.min(self.bytes + cost(p));
        self.order.push_back((p.channel.clone(), generation, position.offset));
        self.evict(Some(&p.channel));
        (position, created)
    }

    /// The page, and whether the channel's history had to be created (a new epoch).
    fn read(
        &mut self,
        name: &ChannelName,
        query: &HistoryQuery,
        policy: HistoryPolicy,
        now: Instant,
    ) -> (HistoryPage, bool) {
        let (c, created) = self.channel(name, policy, now);
        let top = Position { offset: c.top, epoch: c.epoch.clone() };
        let limit = query.limit.unwrap_or(u64::MAX) as usize;
        let publications = match &query.since {
            Some(since) if since.epoch != c.epoch => Vec::new(),
            Some(since) => c.entries.iter().filter(|p| p.offset() > Some(since.offset)).take(limit).cloned().collect(),
            None => c.entries.iter().take(limit).cloned().collect(),
        };
        (HistoryPage { top, publications }, created)
    }
}

/// Delivers every publication to this node's own subscribers, synchronously in the
/// publisher's task, which keeps each publisher's order without any queue. In a history
/// namespace the publication is stored, given its offset and delivered under one lock, so
/// subscribers see offsets in order.
pub struct EmbeddedBroker {
    registry: Arc<Registry>,
    histories: Arc<Histories>,
    channels: metrics::Gauge,
    history_bytes: metrics::Gauge,
    keys: Mutex<Keys>,
    store: Mutex<Store>,
    node: std::sync::OnceLock<crate::broker::NodeSelf>,
    presences: Arc<crate::Presences>,
    presence: crate::LocalPresence,
    events: crate::EventBudget,
    events_dropped: metrics::Counter,
}

impl EmbeddedBroker {
    /// A broker without history anywhere.
    pub fn new(registry: Arc<Registry>) -> Self {
        Self::with_history(registry, Arc::new(Histories::default()), 0)
    }

    /// `history_bytes`: the node-wide bound on stored history.
    pub fn with_history(registry: Arc<Registry>, histories: Arc<Histories>, history_bytes: usize) -> Self {
        // The embedded broker is always connected.
        metrics::gauge!("fanout_broker_up").set(1.0);
        Self {
            registry,
            histories,
            channels: metrics::gauge!("fanout_broker_channels"),
            history_bytes: metrics::gauge!("fanout_history_bytes"),
            keys: Mutex::default(),
            store: Mutex::new(Store::new(history_bytes)),
            node: std::sync::OnceLock::new(),
            presences: Arc::default(),
            presence: crate::LocalPresence::default(),
            events: crate::EventBudget::default(),
            events_dropped: metrics::counter!("fanout_presence_events_dropped_total"),
        }
    }

    /// Which namespaces track presence.
    pub fn with_presence(mut self, presences: Arc<crate::Presences>) -> Self {
        self.presences = presences;
        self
    }

    fn event(&self, channel: &ChannelName, event: fanout_protocol::PresenceEvent, client: &str, user: &str) {
        if !self.presences.of(channel.as_str()).is_some_and(|p| p.join_leave) {
            return;
        }
        if self.events.take(channel) {
            self.registry.deliver_presence(channel, event, client, user);
        } else {
            self.events_dropped.increment(1);
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish_now(&self, publication: &Publication, key: Option<&str>) -> Published {
        let now = Instant::now();
        // The key check, the store and the delivery happen under the key lock, so two
        // publishers with one key cannot both get through.
        let mut keys = key.map(|_| self.keys.lock().unwrap_or_else(PoisonError::into_inner));
        if let (Some(keys), Some(key)) = (keys.as_mut(), key) {
            if let Some(position) = keys.seen(&publication.channel, key, now) {
                return Published { duplicate: true, position };
            }
        }
        let position = match self.histories.of(publication.channel.as_str()) {
            None => {
                self.registry.deliver(publication);
                None
            }
            Some(policy) => {
                let mut p = publication.clone();
                let mut store = self.store();
                let (position, created) = store.store(&mut p, policy, now);
                if created {
                    // A history that was lost (expired, evicted): subscribers learn it.
                    self.registry.resync(&p.channel, &Position { offset: 0, epoch: position.epoch.clone() });
                }
                self.registry.deliver(&p);
                self.history_bytes.set(store.bytes as f64);
                Some(position)
            }
        };
        if let (Some(keys), Some(key)) = (keys.as_mut(), key) {
            keys.record(&publication.channel, key, now, position.clone());
        }
        Published { duplicate: false, position }
    }
}

impl Broker for EmbeddedBroker {
    fn publish<'a>(
        &'a self,
        publication: &'a Publication,
        key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Published, BrokerError>> {
        Box::pin(std::future::ready(Ok(self.publish_now(publication, key))))
    }

    fn history<'a>(
        &'a self,
        channel: &'a ChannelName,
        query: &'a HistoryQuery,
    ) -> BoxFuture<'a, Result<HistoryPage, BrokerError>> {
        let result = match self.histories.of(channel.as_str()) {
            Some(policy) => {
                let mut store = self.store();
                let (page, created) = store.read(channel, query, policy, Instant::now());
                if created {
                    self.registry.resync(channel, &page.top);
                }
                self.history_bytes.set(store.bytes as f64);
                Ok(page)
            }
            None => Err(BrokerError::Unavailable("this channel keeps no history".into())),
        };
        Box::pin(std::future::ready(result))
    }

    fn control<'a>(&'a self, control: &'a crate::broker::Control) -> BoxFuture<'a, Result<(), BrokerError>> {
        if let Some(node) = self.node.get() {
            (node.control)(control);
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<crate::broker::NodeReport>, BrokerError>> {
        let reports = self.node.get().map(|n| vec![(n.report)()]).unwrap_or_default();
        Box::pin(std::future::ready(Ok(reports)))
    }

    fn set_node(&self, node: crate::broker::NodeSelf) {
        let _ = self.node.set(node);
    }

    fn presence_join(&self, channel: &ChannelName, client: &str, user: &str) {
        if self.presence.join(channel, client, user) {
            self.event(channel, fanout_protocol::PresenceEvent::Join, client, user);
        }
    }

    fn presence_leave(&self, channel: &ChannelName, client: &str) {
        if let Some(user) = self.presence.leave(channel, client) {
            self.event(channel, fanout_protocol::PresenceEvent::Leave, client, &user);
        }
    }

    fn presence<'a>(
        &'a self,
        channel: &'a ChannelName,
    ) -> BoxFuture<'a, Result<fanout_protocol::PresenceList, BrokerError>> {
        Box::pin(std::future::ready(Ok(self.presence.list(channel.as_str()))))
    }

    fn presence_stats<'a>(
        &'a self,
        channel: &'a ChannelName,
    ) -> BoxFuture<'a, Result<fanout_protocol::PresenceStats, BrokerError>> {
        Box::pin(std::future::ready(Ok(self.presence.stats(channel.as_str()))))
    }

    fn add_interest(&self, _channel: &ChannelName) {
        self.channels.increment(1.0);
    }

    fn remove_interest(&self, _channel: &ChannelName) {
        self.channels.decrement(1.0);
    }

    fn ready<'a>(&'a self, _channel: &'a ChannelName) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn is_up(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use fanout_protocol::Encoding;

    use super::*;

    fn ch(s: &str) -> ChannelName {
        ChannelName::new(s).unwrap()
    }

    fn policy(size: u64) -> HistoryPolicy {
        HistoryPolicy { size, ttl: Duration::from_secs(60) }
    }

    fn publication(channel: &str, data: &'static [u8]) -> Publication {
        Publication::new(ch(channel), 1, Encoding::Json, Bytes::from_static(data))
    }

    #[test]
    fn a_key_is_new_once_per_channel_within_the_window() {
        let mut k = Keys::default();
        let t0 = Instant::now();
        assert_eq!(k.seen(&ch("a"), "k", t0), None);
        k.record(&ch("a"), "k", t0, Some(Position::new(3, "e")));
        assert_eq!(k.seen(&ch("a"), "k", t0), Some(Some(Position::new(3, "e"))), "answered as the first was");
        assert_eq!(k.seen(&ch("b"), "k", t0), None, "keys are per channel");
        let later = t0 + IDEMPOTENCY_WINDOW;
        assert_eq!(k.seen(&ch("a"), "k", later), None, "remembered for the window only");
        assert!(k.seen.is_empty(), "expired keys are forgotten");
    }

    #[test]
    fn the_key_store_is_bounded() {
        let mut k = Keys::default();
        let t0 = Instant::now();
        for i in 0..MAX_KEYS + 10 {
            let key = i.to_string();
            if k.seen(&ch("a"), &key, t0).is_none() {
                k.record(&ch("a"), &key, t0, None);
            }
        }
        assert!(k.seen.len() <= MAX_KEYS + 1 && k.order.len() <= MAX_KEYS + 1);
    }

    #[test]
    fn history_size_is_exact_and_offsets_grow_by_one() {
        let mut s = Store::new(1 << 20);
        let now = Instant::now();
        for _ in 0..5 {
            s.store(&mut publication("h:a", b"1"), policy(3), now);
        }
        let (page, _) = s.read(&ch("h:a"), &HistoryQuery::default(), policy(3), now);
        assert_eq!(page.top.offset, 5);
        assert_eq!(page.publications.iter().map(|p| p.offset().unwrap()).collect::<Vec<_>>(), [3, 4, 5]);
        let since = HistoryQuery { since: Some(Position { offset: 3, epoch: page.top.epoch.clone() }), limit: Some(1) };
        let (after, _) = s.read(&ch("h:a"), &since, policy(3), now);
        assert_eq!(after.publications.iter().map(|p| p.offset().unwrap()).collect::<Vec<_>>(), [4]);
        let other = HistoryQuery { since: Some(Position::new(3, "other")), limit: None };
        assert!(s.read(&ch("h:a"), &other, policy(3), now).0.publications.is_empty());
    }

    #[test]
    fn expiry_starts_a_new_epoch() {
        let mut s = Store::new(1 << 20);
        let now = Instant::now();
        let (first, _) = s.store(&mut publication("h:a", b"1"), policy(3), now);
        let later = now + Duration::from_secs(61);
        let (second, created) = s.store(&mut publication("h:a", b"1"), policy(3), later);
        assert!(created);
        assert_ne!(first.epoch, second.epoch);
        assert_eq!(second.offset, 1);
    }

    #[test]
    fn the_store_is_bounded_in_bytes_across_channels() {
        let limit = 64 * 1024;
        let mut s = Store::new(limit);
        let now = Instant::now();
        for i in 0..10_000 {
            let name = format!("h:{}", i % 50);
            s.store(&mut publication(&name, b"\"0123456789012345678901234567890123456789\""), policy(1000), now);
            assert!(s.bytes <= limit, "{} > {limit}", s.bytes);
        }
        // History reads of arbitrary channels create state too; bounded as well.
        for i in 0..10_000 {
            s.read(&ch(&format!("r:{i}")), &HistoryQuery::default(), policy(10), now);
            assert!(s.bytes <= limit);
        }
        assert!(s.order.len() * ENTRY_OVERHEAD <= limit + ENTRY_OVERHEAD);
        assert!(s.channels.len() * ENTRY_OVERHEAD <= limit + ENTRY_OVERHEAD);
    }
}
