//! The node's subscription registry and the fan-out of one publication to every local
//! subscriber of its channel.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, PoisonError, RwLock},
    time::Instant,
};

use bytes::Bytes;
use fanout_protocol::{encode_message, ChannelName, Encoding, Publication};
use indexmap::IndexMap;

use crate::outbox::{Outbox, Push};

/// Independent locks, so subscribing on one channel never waits for a fan-out on another.
const SHARDS: usize = 32;

type Subscribers = IndexMap<u64, Arc<Outbox>>;

/// What [`Registry::deliver`] did with one publication.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Frames queued to subscribers.
    pub queued: usize,
    /// Subscribers whose outbox overflowed with this publication (they will be cut off).
    pub overflowed: usize,
    /// Subscribers that could not get it because `data` has no form in their wire format.
    pub unencodable: usize,
}

/// Whether the registry changed the node's interest in a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// First local subscriber added, or last one removed: the broker must be told.
    Interest,
    /// The channel already had (or still has) other local subscribers.
    Local,
    /// Nothing changed: already subscribed, or was not subscribed.
    None,
}

struct RegistryMetrics {
    subscriptions: metrics::Gauge,
    dropped_slow: metrics::Counter,
    dropped_unencodable: metrics::Counter,
    broadcast_seconds: metrics::Histogram,
}

/// channel → local subscribers. Publications are fanned out under a shard's read lock with
/// no `.await` inside; each subscriber costs one `Bytes` clone (a reference-count
/// increment) and one push, with the frame encoded once per wire format.
pub struct Registry {
    shards: Box<[RwLock<HashMap<ChannelName, Subscribers>>]>,
    hasher: RandomState,
    metrics: RegistryMetrics,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            metrics: RegistryMetrics {
                subscriptions: metrics::gauge!("fanout_subscriptions"),
                dropped_slow: metrics::counter!("fanout_publications_dropped_total", "reason" => "slow_consumer"),
                dropped_unencodable: metrics::counter!("fanout_publications_dropped_total", "reason" => "unencodable"),
                broadcast_seconds: metrics::histogram!("fanout_broadcast_duration_seconds"),
            },
        }
    }

    fn shard(&self, channel: &str) -> &RwLock<HashMap<ChannelName, Subscribers>> {
        &self.shards[self.hasher.hash_one(channel) as usize % SHARDS]
    }

    /// Adds `outbox` as a subscriber of `channel`; `on_interest` runs when this is the
    /// channel's first local subscriber, while the shard lock is still held.
    ///
    /// Under the lock, so the broker hears of interest changes in the order the registry
    /// made them: told after the lock is released, a join racing the last leave could
    /// reach the broker before that leave, which would then unsubscribe a channel that has
    /// a subscriber again. The callback must only enqueue (the broker's interest calls do).
    pub fn insert_with(&self, channel: &ChannelName, outbox: &Arc<Outbox>, on_interest: impl FnOnce()) -> Change {
        let mut shard = self.shard(channel.as_str()).write().unwrap_or_else(PoisonError::into_inner);
        let subs = shard.entry(channel.clone()).or_default();
        if subs.contains_key(&outbox.id()) {
            return Change::None;
        }
        subs.insert(outbox.id(), outbox.clone());
        self.metrics.subscriptions.increment(1.0);
        if subs.len() == 1 {
            on_interest();
            Change::Interest
        } else {
            Change::Local
        }
    }

    /// Removes subscriber `id` from `channel`; `on_interest` runs, under the shard lock,
    /// when it was the last local subscriber (see [`Self::insert_with`]).
    pub fn remove_with(&self, channel: &ChannelName, id: u64, on_interest: impl FnOnce()) -> Change {
        let mut shard = self.shard(channel.as_str()).write().unwrap_or_else(PoisonError::into_inner);
        let Some(subs) = shard.get_mut(channel.as_str()) else { return Change::None };
        if subs.swap_remove(&id).is_none() {
            return Change::None;
        }
        self.metrics.subscriptions.decrement(1.0);
        if subs.is_empty() {
            shard.remove(channel.as_str());
            on_interest();
            Change::Interest
        } else {
            Change::Local
        }
    }

    /// [`Self::insert_with`] with nothing to tell.
    pub fn insert(&self, channel: &ChannelName, outbox: &Arc<Outbox>) -> Change {
        self.insert_with(channel, outbox, || {})
    }

    /// [`Self::remove_with`] with nothing to tell.
    pub fn remove(&self, channel: &ChannelName, id: u64) -> Change {
        self.remove_with(channel, id, || {})
    }

    /// Local subscribers of `channel`.
    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.shard(channel).read().unwrap_or_else(PoisonError::into_inner).get(channel).map_or(0, IndexMap::len)
    }

    /// Channels with at least one local subscriber.
    pub fn channels(&self) -> Vec<ChannelName> {
        self.shards
            .iter()
            .flat_map(|s| s.read().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect::<Vec<_>>())
            .collect()
    }

    /// Queues `p` to every local subscriber of its channel.
    pub fn deliver(&self, p: &Publication) -> DeliveryReport {
        let started = Instant::now();
        let mut report = DeliveryReport::default();
        {
            let shard = self.shard(p.channel.as_str()).read().unwrap_or_else(PoisonError::into_inner);
            let Some(subs) = shard.get(p.channel.as_str()) else { return report };
            // Encoded lazily: a format nobody on this channel speaks is never encoded.
            let mut frames: [Option<Option<Bytes>>; 2] = [None, None];
            for outbox in subs.values() {
                let format = outbox.format();
                let frame = frames[format.index()].get_or_insert_with(|| encode(format, p));
                let Some(frame) = frame else {
                    report.unencodable += 1;
                    continue;
                };
                match outbox.push(frame.clone(), p.ts) {
                    Push::Queued => report.queued += 1,
                    Push::Overflow => report.overflowed += 1,
                    Push::Refused => {}
                }
            }
        }
        if report.overflowed > 0 {
            self.metrics.dropped_slow.increment(report.overflowed as u64);
        }
        if report.unencodable > 0 {
            self.metrics.dropped_unencodable.increment(report.unencodable as u64);
        }
        self.metrics.broadcast_seconds.record(started.elapsed().as_secs_f64());
        report
    }
}

fn encode(format: Encoding, p: &Publication) -> Option<Bytes> {
    match encode_message(format, p) {
        Ok(frame) => Some(frame),
        Err(e) => {
            tracing::debug!(channel = %p.channel, format = format.as_str(), error = %e, "publication has no form in this wire format");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    fn ch(s: &str) -> ChannelName {
        ChannelName::new(s).unwrap()
    }

    fn publication(channel: &str, data: &str) -> Publication {
        Publication { channel: ch(channel), ts: 9, enc: Encoding::Json, data: Bytes::copy_from_slice(data.as_bytes()) }
    }

    fn drain(o: &Outbox) -> VecDeque<crate::Outgoing> {
        let mut q = VecDeque::new();
        let waker = futures_util::task::noop_waker();
        let _ = o.poll_take(&mut std::task::Context::from_waker(&waker), &mut q);
        q
    }

    #[test]
    fn interest_changes_only_on_first_and_last() {
        let r = Registry::new();
        let a = Arc::new(Outbox::new(Encoding::Json, 1 << 20));
        let b = Arc::new(Outbox::new(Encoding::Json, 1 << 20));
        assert_eq!(r.insert(&ch("x"), &a), Change::Interest);
        assert_eq!(r.insert(&ch("x"), &a), Change::None);
        assert_eq!(r.insert(&ch("x"), &b), Change::Local);
        assert_eq!(r.subscriber_count("x"), 2);
        assert_eq!(r.remove(&ch("x"), a.id()), Change::Local);
        assert_eq!(r.remove(&ch("x"), a.id()), Change::None);
        assert_eq!(r.remove(&ch("x"), b.id()), Change::Interest);
        assert_eq!(r.subscriber_count("x"), 0);
        assert!(r.channels().is_empty());
    }

    #[test]
    fn one_shared_frame_per_format() {
        let r = Registry::new();
        let outboxes: Vec<_> = (0..4)
            .map(|i| Arc::new(Outbox::new(if i % 2 == 0 { Encoding::Json } else { Encoding::MsgPack }, 1 << 20)))
            .collect();
        for o in &outboxes {
            r.insert(&ch("room"), o);
        }
        let report = r.deliver(&publication("room", r#"{"k":1}"#));
        assert_eq!(report, DeliveryReport { queued: 4, overflowed: 0, unencodable: 0 });
        let frames: Vec<Bytes> = outboxes.iter().map(|o| drain(o).pop_front().unwrap().frame).collect();
        // Same format: the very same allocation is shared.
        assert_eq!(frames[0].as_ptr(), frames[2].as_ptr());
        assert_eq!(frames[1].as_ptr(), frames[3].as_ptr());
        assert_ne!(frames[0], frames[1]);
        assert_eq!(frames[0][0], 0x81);
        assert_eq!(frames[1][0], 0x82);
        assert_eq!(r.deliver(&publication("other", "1")), DeliveryReport::default());
    }

    #[test]
    fn overflow_hits_only_the_full_outbox() {
        let r = Registry::new();
        let small = Arc::new(Outbox::new(Encoding::Json, 100));
        let big = Arc::new(Outbox::new(Encoding::Json, 1 << 20));
        r.insert(&ch("c"), &small);
        r.insert(&ch("c"), &big);
        let mut overflowed = 0;
        for _ in 0..10 {
            overflowed += r.deliver(&publication("c", "\"0123456789\"")).overflowed;
        }
        assert_eq!(overflowed, 1);
        assert_eq!(drain(&big).len(), 10);
        assert_eq!(small.status(), crate::Status::Overflowed);
    }
}
