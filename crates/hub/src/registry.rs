//! The node's subscription registry and the fan-out of one publication to every local
//! subscriber of its channel.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Instant,
};

use bytes::Bytes;
use fanout_protocol::{encode_message, encode_resync, ChannelName, Encoding, Position, Publication};
use indexmap::IndexMap;

use crate::{
    outbox::{Outbox, Push},
    wakeups::Wakeups,
};

/// Independent locks, so subscribing on one channel never waits for a fan-out on another.
const SHARDS: usize = 32;

/// One local subscriber of a channel.
struct Subscriber {
    outbox: Arc<Outbox>,
    /// While the subscriber recovers (its history is being read), live publications wait
    /// here instead of reaching its outbox, so [`Registry::release`] can merge them after
    /// the history by offset: no gap, no duplicate at the seam.
    held: Option<Box<Mutex<Held>>>,
}

/// Live publications held for a recovering subscriber, bounded like its outbox.
///
/// Once released, the subscriber still skips what its history already covered (`after`):
/// the node's own stream of publications may lag behind the history read, so ones up to
/// `after` can still arrive live. The first one past `after` ends the hold for good.
#[derive(Default)]
struct Held {
    publications: Vec<Publication>,
    bytes: usize,
    overflowed: bool,
    after: Option<Position>,
    passed: bool,
}

/// What a held subscriber does with a live publication.
enum HeldAction {
    Held,
    Skip,
    Deliver,
}

type Subscribers = IndexMap<u64, Subscriber>;

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
    /// Sessions a fan-out gave frames are woken through here, in order, a chunk at a time.
    wakeups: Arc<Wakeups>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.wakeups.stop();
    }
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
            wakeups: Arc::new(Wakeups::default()),
        }
    }

    /// The wake queue (for its tests).
    #[cfg(test)]
    pub(crate) fn wakeups(&self) -> &Arc<Wakeups> {
        &self.wakeups
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
        self.insert_inner(channel, outbox, false, on_interest)
    }

    /// [`Self::insert_with`] for a subscriber that recovers first: publications are held
    /// for it until [`Self::release`].
    pub fn insert_held_with(&self, channel: &ChannelName, outbox: &Arc<Outbox>, on_interest: impl FnOnce()) -> Change {
        self.insert_inner(channel, outbox, true, on_interest)
    }

    fn insert_inner(
        &self,
        channel: &ChannelName,
        outbox: &Arc<Outbox>,
        held: bool,
        on_interest: impl FnOnce(),
    ) -> Change {
        let mut shard = self.shard(channel.as_str()).write().unwrap_or_else(PoisonError::into_inner);
        let subs = shard.entry(channel.clone()).or_default();
        if subs.contains_key(&outbox.id()) {
            return Change::None;
        }
        let held = held.then(|| Box::new(Mutex::new(Held::default())));
        subs.insert(outbox.id(), Subscriber { outbox: outbox.clone(), held });
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

    /// Channels with local subscribers and how many each has, largest first, at most `max`;
    /// how many channels there are in all, and how many subscriptions.
    pub fn channel_counts(&self, max: usize) -> (Vec<(String, u64)>, u64, u64) {
        let mut all: Vec<(String, u64)> = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.read().unwrap_or_else(PoisonError::into_inner);
            all.extend(shard.iter().map(|(c, subs)| (c.as_str().to_owned(), subs.len() as u64)));
        }
        let total = all.len() as u64;
        let subscriptions = all.iter().map(|(_, n)| n).sum();
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(max);
        (all, total, subscriptions)
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
        let mut cleanup = false;
        // Outside the shard's scope: the wakes are queued once its lock is released.
        let mut wakes = self.wakeups.batch();
        {
            let shard = self.shard(p.channel.as_str()).read().unwrap_or_else(PoisonError::into_inner);
            let Some(subs) = shard.get(p.channel.as_str()) else { return report };
            // Encoded lazily: a format nobody on this channel speaks is never encoded.
            let mut frames: [Option<Option<Bytes>>; 2] = [None, None];
            for sub in subs.values() {
                let outbox = &sub.outbox;
                if let Some(held) = &sub.held {
                    match hold(held, outbox, p) {
                        HeldAction::Held | HeldAction::Skip => continue,
                        HeldAction::Deliver => cleanup = true,
                    }
                }
                let format = outbox.format();
                let frame = frames[format.index()].get_or_insert_with(|| encode(format, p));
                let Some(frame) = frame else {
                    report.unencodable += 1;
                    continue;
                };
                match outbox.push_quiet(frame.clone(), p.ts) {
                    (Push::Queued, wake) => {
                        report.queued += 1;
                        if wake {
                            wakes.add(outbox);
                        }
                    }
                    (Push::Overflow, _) => report.overflowed += 1,
                    (Push::Refused, _) => {}
                }
            }
        }
        drop(wakes);
        if cleanup {
            self.end_holds(&p.channel);
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

    /// Sends a join or leave event to every local subscriber of `channel` (recovering ones
    /// included: presence is not part of the history they are catching up on).
    pub fn deliver_presence(
        &self,
        channel: &ChannelName,
        event: fanout_protocol::PresenceEvent,
        client: &str,
        user: &str,
    ) {
        self.push_event(
            channel,
            |_| true,
            |format| fanout_protocol::encode_presence_event(format, event, channel.as_str(), client, user),
        );
    }

    /// Pushes an event frame (encoded at most once per wire format) to the local
    /// subscribers of `channel` that `include` accepts; how many took it.
    fn push_event(
        &self,
        channel: &ChannelName,
        include: impl Fn(&Subscriber) -> bool,
        encode: impl Fn(Encoding) -> Bytes,
    ) -> usize {
        let shard = self.shard(channel.as_str()).read().unwrap_or_else(PoisonError::into_inner);
        let Some(subs) = shard.get(channel.as_str()) else { return 0 };
        let mut frames: [Option<Bytes>; 2] = [None, None];
        let mut queued = 0;
        for sub in subs.values().filter(|s| include(s)) {
            let format = sub.outbox.format();
            let frame = frames[format.index()].get_or_insert_with(|| encode(format));
            match sub.outbox.push(frame.clone(), 0) {
                Push::Queued => queued += 1,
                Push::Overflow => self.metrics.dropped_slow.increment(1),
                Push::Refused => {}
            }
        }
        queued
    }

    /// Drops the holds of released subscribers that live publications have passed.
    fn end_holds(&self, channel: &ChannelName) {
        let mut shard = self.shard(channel.as_str()).write().unwrap_or_else(PoisonError::into_inner);
        let Some(subs) = shard.get_mut(channel.as_str()) else { return };
        for sub in subs.values_mut() {
            let passed = sub.held.as_ref().is_some_and(|h| h.lock().unwrap_or_else(PoisonError::into_inner).passed);
            if passed {
                sub.held = None;
            }
        }
    }

    /// Tells every local subscriber of `channel` that publications may have been lost and
    /// live delivery continues after `top`. Subscribers still recovering are skipped: the
    /// position they are about to be given is read after this.
    pub fn resync(&self, channel: &ChannelName, top: &Position) -> usize {
        let live = |s: &Subscriber| {
            s.held.as_ref().is_none_or(|h| h.lock().unwrap_or_else(PoisonError::into_inner).after.is_some())
        };
        self.push_event(channel, live, |format| encode_resync(format, channel.as_str(), top))
    }

    /// Ends a recovering subscriber's hold: the publications held for it that come after
    /// `delivered` (the position its history ended at) go to its outbox, in order, and
    /// from now on it gets live publications directly. Under the shard's write lock, so no
    /// publication can slip between the held ones and the live ones.
    ///
    /// A held publication from another epoch than `delivered`'s is preceded by a `resync`.
    pub fn release(&self, channel: &ChannelName, id: u64, delivered: Option<&Position>) {
        let mut shard = self.shard(channel.as_str()).write().unwrap_or_else(PoisonError::into_inner);
        let Some(sub) = shard.get_mut(channel.as_str()).and_then(|subs| subs.get_mut(&id)) else { return };
        let Some(held_slot) = &sub.held else { return };
        let mut held = held_slot.lock().unwrap_or_else(PoisonError::into_inner);
        let outbox = sub.outbox.clone();
        let publications = std::mem::take(&mut held.publications);
        held.after = delivered.cloned();
        let overflowed = held.overflowed;
        drop(held);
        if delivered.is_none() || overflowed {
            sub.held = None;
        }
        if overflowed {
            outbox.overflow();
            self.metrics.dropped_slow.increment(1);
            return;
        }
        let format = outbox.format();
        let mut current = delivered.cloned();
        for p in &publications {
            if let Some(pos) = &p.position {
                match &current {
                    Some(c) if c.epoch == pos.epoch && pos.offset <= c.offset => continue,
                    Some(c) if c.epoch != pos.epoch => {
                        let top = Position { offset: pos.offset.saturating_sub(1), epoch: pos.epoch.clone() };
                        outbox.push(encode_resync(format, channel.as_str(), &top), 0);
                    }
                    _ => {}
                }
                current = Some(pos.clone());
            }
            let Some(frame) = encode(format, p) else {
                self.metrics.dropped_unencodable.increment(1);
                continue;
            };
            if outbox.push(frame, p.ts) == Push::Overflow {
                self.metrics.dropped_slow.increment(1);
            }
        }
    }
}

/// Holds `p` for a recovering subscriber (past the outbox's bound the subscriber is marked
/// for a slow-consumer cut when released, and nothing more is held); once released, says
/// whether `p` was already covered by its history.
fn hold(held: &Mutex<Held>, outbox: &Outbox, p: &Publication) -> HeldAction {
    let mut held = held.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(after) = &held.after {
        if let Some(pos) = &p.position {
            if pos.epoch == after.epoch && pos.offset <= after.offset {
                return HeldAction::Skip;
            }
        }
        held.passed = true;
        return HeldAction::Deliver;
    }
    if held.overflowed {
        return HeldAction::Held;
    }
    held.bytes += p.data.len() + 64;
    if held.bytes > outbox.limit() {
        held.overflowed = true;
        held.publications = Vec::new();
        return HeldAction::Held;
    }
    held.publications.push(p.clone());
    HeldAction::Held
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
        Publication::new(ch(channel), 9, Encoding::Json, Bytes::copy_from_slice(data.as_bytes()))
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
