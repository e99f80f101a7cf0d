//! The pub/sub reader: every message Redis pushes goes through a byte-bounded backlog to
//! a delivery task that hands it to the local registry, in the order Redis sent them;
//! anything that is not a valid publication, or is larger than allowed, is dropped and
//! counted.
//!
//! On a Redis Cluster the reader also sees subscription changes, in order with the
//! messages: a channel confirmed again after the connection to its master was lost (the
//! cluster connection resubscribes on its own after a reconnect or failover) is caught up
//! from history before the messages behind it; a channel Redis unsubscribed on its own
//! (its slot moved to another master) is handed back to the manager to subscribe again,
//! where it now lives.
//!
//! Why a backlog: redis-rs moves pub/sub messages from the socket into an unbounded
//! channel of its own, so a reader that fans out inline and falls behind makes that channel
//! grow without limit (and Redis's output-buffer limit never fires, because the socket is
//! always read). Here the reader only moves messages from that channel into the backlog,
//! which keeps redis-rs's channel near empty, and the delivery task fans out; when the
//! backlog is full, new messages are dropped and counted rather than held.

use std::{
    collections::{HashSet, VecDeque},
    fmt::Display,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use fanout_protocol::{decode_envelope, ChannelName, Position, Publication};
use futures_util::StreamExt;
use redis::{PushInfo, PushKind};
use tokio::sync::Notify;

use crate::{broker::BrokerState, link::Source};

/// Room an envelope takes around its `data` (keys, version, ts, encoding), with margin; a
/// payload larger than `max_publication_size` plus this is dropped without decoding it.
const ENVELOPE_OVERHEAD: usize = 256;

/// Messages read from Redis and not yet delivered, bounded in bytes.
struct Backlog {
    state: Mutex<Queue>,
    wake: Notify,
    limit: usize,
}

/// What the reader passes on, in the order Redis sent it.
enum Item {
    Message(redis::Msg),
    /// A cluster confirmed a subscription to this Redis channel.
    Subscribed(String),
    /// A cluster ended a subscription to this Redis channel (we asked, or its slot moved).
    Unsubscribed(String),
    /// A cluster lost its connection to one of its nodes (which, the push does not say).
    Disconnected,
}

#[derive(Default)]
struct Queue {
    messages: VecDeque<Item>,
    bytes: usize,
    /// The connection ended: deliver what is queued, then stop.
    closed: bool,
}

fn size_of(item: &Item) -> usize {
    match item {
        Item::Message(msg) => msg.get_payload_bytes().len() + msg.get_channel_name().len(),
        Item::Subscribed(c) | Item::Unsubscribed(c) => c.len(),
        Item::Disconnected => 0,
    }
}

impl Backlog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `msg` unless that would exceed the bound: the bytes now queued, or `None`
    /// when it was dropped.
    fn push(&self, msg: Item) -> Option<usize> {
        let size = size_of(&msg);
        let mut q = self.lock();
        // Subscription changes are never dropped: they are tiny and few, and losing one
        // would lose a channel.
        if q.bytes + size > self.limit && !q.messages.is_empty() && matches!(msg, Item::Message(_)) {
            return None;
        }
        q.bytes += size;
        let was_empty = q.messages.is_empty();
        q.messages.push_back(msg);
        let bytes = q.bytes;
        drop(q);
        if was_empty {
            self.wake.notify_one();
        }
        Some(bytes)
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// Everything queued, once there is something; `None` when closed and empty.
    async fn take(&self, into: &mut VecDeque<Item>) -> Option<()> {
        loop {
            {
                let mut q = self.lock();
                if !q.messages.is_empty() {
                    std::mem::swap(&mut q.messages, into);
                    return Some(());
                }
                if q.closed {
                    return None;
                }
            }
            // notify_one keeps a permit when nobody waits, so a push between the check
            // above and this await is not missed.
            self.wake.notified().await;
        }
    }

    /// The delivery task reports a message done: its bytes no longer count.
    fn done(&self, size: usize) -> usize {
        let mut q = self.lock();
        q.bytes -= size.min(q.bytes);
        q.bytes
    }
}

/// Aborts the delivery task when the reader goes (the manager aborts the reader when it
/// gives a connection up).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Reads until the connection closes, then lets the delivery task finish what was read.
/// `subscribed` fires once the manager has subscribed every wanted channel on this
/// connection: the delivery task then catches history channels up before anything live.
pub(crate) async fn run(shared: Arc<BrokerState>, source: Source, subscribed: tokio::sync::oneshot::Receiver<()>) {
    let backlog =
        Arc::new(Backlog { state: Mutex::default(), wake: Notify::new(), limit: shared.config.backlog_bytes });
    let mut delivery = AbortOnDrop(tokio::spawn(deliver(shared.clone(), backlog.clone(), subscribed)));
    let queue = |item: Item| match backlog.push(item) {
        Some(bytes) => shared.metrics.backlog_bytes.set(bytes as f64),
        None => {
            shared.metrics.dropped_backlog.increment(1);
            shared.warn(None, &"the node is behind on fan-out: backlog full, publication dropped");
        }
    };
    match source {
        Source::Stream(mut stream) => {
            while let Some(msg) = stream.next().await {
                queue(Item::Message(msg));
            }
        }
        Source::Pushes(mut pushes) => {
            while let Some(push) = pushes.recv().await {
                if let Some(item) = item_of(push) {
                    queue(item);
                }
            }
        }
    }
    backlog.close();
    let _ = (&mut delivery.0).await;
}

/// A cluster push as an item: messages, and confirmations of shard-channel subscriptions.
fn item_of(push: PushInfo) -> Option<Item> {
    let channel = |push: &PushInfo| match push.data.first() {
        Some(redis::Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
        _ => None,
    };
    match push.kind {
        PushKind::SMessage | PushKind::Message => redis::Msg::from_push_info(push).map(Item::Message),
        PushKind::SSubscribe => channel(&push).map(Item::Subscribed),
        PushKind::SUnsubscribe => channel(&push).map(Item::Unsubscribed),
        // The cluster connection reconnects and resubscribes by itself; the
        // confirmations that follow say which channels to catch up.
        PushKind::Disconnection => Some(Item::Disconnected),
        _ => None,
    }
}

/// Fans out what the reader queued, oldest first, after catching history channels up.
///
/// On a cluster, channels that may have missed publications (every subscribed channel
/// when a node connection dropped, since the push does not say whose; a channel whose
/// slot moved) are *suspects*: each is caught up from history when its subscription is
/// confirmed again, before the messages behind that confirmation, and stays a suspect
/// until a catch-up succeeds. Confirmations of channels that are no suspects (the cluster
/// connection resubscribes everything whenever it refreshes its slot map) cost nothing.
async fn deliver(shared: Arc<BrokerState>, backlog: Arc<Backlog>, subscribed: tokio::sync::oneshot::Receiver<()>) {
    if subscribed.await.is_ok() {
        shared.catch_up(None).await;
    }
    let mut batch = VecDeque::new();
    let mut suspects: HashSet<ChannelName> = HashSet::new();
    // Suspects confirmed again, caught up together before the next message.
    let mut resubscribed = Vec::new();
    while backlog.take(&mut batch).await.is_some() {
        while let Some(item) = batch.pop_front() {
            let size = size_of(&item);
            match item {
                Item::Message(msg) => {
                    if !resubscribed.is_empty() {
                        shared.catch_up_suspects(&mut resubscribed, &mut suspects).await;
                    }
                    shared.on_message(msg.get_channel_name(), msg.get_payload_bytes()).await;
                }
                Item::Subscribed(channel) => {
                    if let Some(c) = shared.channel_of(&channel).filter(|c| suspects.contains(c)) {
                        resubscribed.push(c);
                    }
                }
                Item::Unsubscribed(channel) => {
                    if let Some(c) = shared.channel_of(&channel) {
                        suspects.insert(c.clone());
                        shared.unsubscribed_by_redis(c);
                    }
                }
                Item::Disconnected => {
                    suspects.extend(shared.active.read().unwrap_or_else(PoisonError::into_inner).iter().cloned());
                    shared.disrupted();
                }
            }
            let left = backlog.done(size);
            shared.metrics.backlog_bytes.set(left as f64);
        }
        if !resubscribed.is_empty() {
            shared.catch_up_suspects(&mut resubscribed, &mut suspects).await;
        }
        // Suspects no longer subscribed are nobody's concern.
        if suspects.len() > 1024 {
            let active = shared.active.read().unwrap_or_else(PoisonError::into_inner);
            suspects.retain(|c| active.contains(c));
        }
        // A long batch must not keep other tasks on this worker waiting.
        tokio::task::yield_now().await;
    }
}

impl BrokerState {
    /// Catches `resubscribed` up; those that were caught up are suspects no more.
    async fn catch_up_suspects(&self, resubscribed: &mut Vec<ChannelName>, suspects: &mut HashSet<ChannelName>) {
        let channels = std::mem::take(resubscribed);
        let failed = self.catch_up(Some(&channels)).await;
        for c in channels {
            if !failed.contains(&c) {
                suspects.remove(&c);
            }
        }
    }

    pub(crate) async fn on_message(&self, redis_channel: &str, payload: &[u8]) {
        if redis_channel == self.control_channel {
            return self.on_control(payload);
        }
        let Some(name) = redis_channel.strip_prefix(self.config.prefix.as_str()) else {
            return self.invalid(redis_channel, &"channel lacks the configured prefix");
        };
        let known = self.known_channel(name);
        let tracked = known.is_some();
        let channel = match known {
            Some(c) => c,
            // Only for messages racing a SUBSCRIBE or UNSUBSCRIBE: validate and allocate.
            None => match ChannelName::new(name) {
                Ok(c) => c,
                Err(e) => return self.invalid(redis_channel, &e),
            },
        };
        let max = self.config.max_publication_size;
        if payload.len() > max + ENVELOPE_OVERHEAD {
            return self.too_large(redis_channel);
        }
        let envelope = match decode_envelope(payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                // Not a publication: a presence event another node published?
                if let Some((event, client, user)) = fanout_protocol::decode_event_envelope(payload) {
                    self.metrics.presence_events_delivered.increment(1);
                    return self.registry.deliver_presence(&channel, event, &client, &user);
                }
                return self.invalid(redis_channel, &e);
            }
        };
        if envelope.data.len() > max {
            return self.too_large(redis_channel);
        }
        self.metrics.received.increment(1);
        let p = Publication {
            channel,
            ts: envelope.ts,
            enc: envelope.enc,
            data: Bytes::copy_from_slice(envelope.data),
            position: envelope.position.map(|(offset, epoch)| Position::new(offset, epoch)),
        };
        match self.histories.of(p.channel.as_str()) {
            None => {
                self.registry.deliver(&p);
            }
            Some(_) if p.position.is_none() => {
                self.metrics.unstored.increment(1);
                if let Some(suppressed) = self.unstored_log.check() {
                    let channel: String = redis_channel.chars().take(300).collect();
                    tracing::warn!(channel, suppressed, "a plain PUBLISH into a history namespace was delivered without an offset and is not in history; publish with FCALL fanout_publish");
                }
                self.registry.deliver(&p);
            }
            // Tracked only while subscribed, so positions never outlive the interest.
            Some(policy) if tracked => self.sequence(p, policy).await,
            Some(_) => {
                self.registry.deliver(&p);
            }
        }
    }

    /// The channel a Redis channel carries, when it is one of ours.
    fn channel_of(&self, redis_channel: &str) -> Option<ChannelName> {
        let name = redis_channel.strip_prefix(self.config.prefix.as_str())?;
        self.known_channel(name).or_else(|| ChannelName::new(name).ok())
    }

    /// The subscribed channel's name, shared rather than copied.
    fn known_channel(&self, name: &str) -> Option<ChannelName> {
        self.active.read().unwrap_or_else(PoisonError::into_inner).get(name).cloned()
    }

    fn too_large(&self, redis_channel: &str) {
        self.metrics.dropped_too_large.increment(1);
        self.warn(
            Some(redis_channel),
            &format_args!("publication larger than max_publication_size ({})", self.config.max_publication_size),
        );
    }

    pub(crate) fn invalid(&self, redis_channel: &str, reason: &dyn Display) {
        self.metrics.invalid_envelope.increment(1);
        self.warn(Some(redis_channel), reason);
    }

    /// Logs a dropped publication, at most once per 10 s, so a misbehaving backend cannot
    /// flood the log.
    /// `redis_channel` is None where the publication was dropped unread (a full backlog).
    fn warn(&self, redis_channel: Option<&str>, reason: &dyn Display) {
        if let Some(suppressed) = self.drop_log.check() {
            let channel: Option<String> = redis_channel.map(|c| c.chars().take(300).collect());
            tracing::warn!(channel, error = %reason, suppressed, "dropped a publication from Redis");
        }
    }
}
