//! The pub/sub reader: every message Redis pushes goes through a byte-bounded backlog to
//! a delivery task that hands it to the local registry, in the order Redis sent them;
//! anything that is not a valid publication, or is larger than allowed, is dropped and
//! counted.
//!
//! Why a backlog: redis-rs moves pub/sub messages from the socket into an unbounded
//! channel of its own, so a reader that fans out inline and falls behind makes that channel
//! grow without limit (and Redis's output-buffer limit never fires, because the socket is
//! always read). Here the reader only moves messages from that channel into the backlog,
//! which keeps redis-rs's channel near empty, and the delivery task fans out; when the
//! backlog is full, new messages are dropped and counted rather than held.

use std::{
    collections::VecDeque,
    fmt::Display,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use fanout_protocol::{decode_envelope, ChannelName, Position, Publication};
use futures_util::StreamExt;
use redis::aio::PubSubStream;
use tokio::sync::Notify;

use crate::broker::BrokerState;

/// Room an envelope takes around its `data` (keys, version, ts, encoding), with margin; a
/// payload larger than `max_publication_size` plus this is dropped without decoding it.
const ENVELOPE_OVERHEAD: usize = 256;

/// Messages read from Redis and not yet delivered, bounded in bytes.
struct Backlog {
    state: Mutex<Queue>,
    wake: Notify,
    limit: usize,
}

#[derive(Default)]
struct Queue {
    messages: VecDeque<redis::Msg>,
    bytes: usize,
    /// The connection ended: deliver what is queued, then stop.
    closed: bool,
}

fn size_of(msg: &redis::Msg) -> usize {
    msg.get_payload_bytes().len() + msg.get_channel_name().len()
}

impl Backlog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `msg` unless that would exceed the bound: the bytes now queued, or `None`
    /// when it was dropped.
    fn push(&self, msg: redis::Msg) -> Option<usize> {
        let size = size_of(&msg);
        let mut q = self.lock();
        if q.bytes + size > self.limit && !q.messages.is_empty() {
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
    async fn take(&self, into: &mut VecDeque<redis::Msg>) -> Option<()> {
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
pub(crate) async fn run(
    shared: Arc<BrokerState>,
    mut stream: PubSubStream,
    subscribed: tokio::sync::oneshot::Receiver<()>,
) {
    let backlog =
        Arc::new(Backlog { state: Mutex::default(), wake: Notify::new(), limit: shared.config.backlog_bytes });
    let mut delivery = AbortOnDrop(tokio::spawn(deliver(shared.clone(), backlog.clone(), subscribed)));
    while let Some(msg) = stream.next().await {
        match backlog.push(msg) {
            Some(bytes) => shared.metrics.backlog_bytes.set(bytes as f64),
            None => {
                shared.metrics.dropped_backlog.increment(1);
                shared.warn(None, &"the node is behind on fan-out: backlog full, publication dropped");
            }
        }
    }
    backlog.close();
    let _ = (&mut delivery.0).await;
}

/// Fans out what the reader queued, oldest first, after catching history channels up.
async fn deliver(shared: Arc<BrokerState>, backlog: Arc<Backlog>, subscribed: tokio::sync::oneshot::Receiver<()>) {
    if subscribed.await.is_ok() {
        shared.catch_up().await;
    }
    let mut batch = VecDeque::new();
    while backlog.take(&mut batch).await.is_some() {
        while let Some(msg) = batch.pop_front() {
            shared.on_message(msg.get_channel_name(), msg.get_payload_bytes()).await;
            let left = backlog.done(size_of(&msg));
            shared.metrics.backlog_bytes.set(left as f64);
        }
        // A long batch must not keep other tasks on this worker waiting.
        tokio::task::yield_now().await;
    }
}

impl BrokerState {
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
