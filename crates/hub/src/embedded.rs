//! The in-process broker: a single node needs no Redis, publications go straight to the
//! local registry.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use fanout_protocol::{ChannelName, Publication, IDEMPOTENCY_WINDOW};

use crate::{
    broker::{BoxFuture, Broker, BrokerError, Published},
    registry::Registry,
};

/// Idempotency keys the embedded broker remembers at most; past it the oldest are
/// forgotten early, so keys cannot grow the node's memory without bound.
const MAX_KEYS: usize = 100_000;

/// (channel, key) → when it was first published, with the same in arrival order for expiry.
#[derive(Default)]
struct Keys {
    seen: HashMap<(ChannelName, Box<str>), Instant>,
    order: VecDeque<(Instant, ChannelName, Box<str>)>,
}

impl Keys {
    /// Records `key` on `channel`; false when it was already there (a duplicate).
    fn first(&mut self, channel: &ChannelName, key: &str, now: Instant) -> bool {
        while let Some((at, _, _)) = self.order.front() {
            if now.duration_since(*at) < IDEMPOTENCY_WINDOW && self.order.len() < MAX_KEYS {
                break;
            }
            if let Some((at, c, k)) = self.order.pop_front() {
                let entry = (c, k);
                if self.seen.get(&entry) == Some(&at) {
                    self.seen.remove(&entry);
                }
            }
        }
        let entry = (channel.clone(), Box::<str>::from(key));
        if self.seen.contains_key(&entry) {
            return false;
        }
        self.seen.insert(entry.clone(), now);
        self.order.push_back((now, entry.0, entry.1));
        true
    }
}

/// Delivers every publication to this node's own subscribers, synchronously in the
/// publisher's task, which keeps each publisher's order without any queue.
pub struct EmbeddedBroker {
    registry: Arc<Registry>,
    channels: metrics::Gauge,
    keys: Mutex<Keys>,
}

impl EmbeddedBroker {
    pub fn new(registry: Arc<Registry>) -> Self {
        // The embedded broker is always connected.
        metrics::gauge!("fanout_broker_up").set(1.0);
        Self { registry, channels: metrics::gauge!("fanout_broker_channels"), keys: Mutex::default() }
    }
}

impl Broker for EmbeddedBroker {
    fn publish<'a>(&'a self, publication: &'a Publication) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.registry.deliver(publication);
        Box::pin(std::future::ready(Ok(())))
    }

    fn publish_once<'a>(
        &'a self,
        publication: &'a Publication,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Published, BrokerError>> {
        let first =
            self.keys.lock().unwrap_or_else(PoisonError::into_inner).first(&publication.channel, key, Instant::now());
        if first {
            self.registry.deliver(publication);
        }
        Box::pin(std::future::ready(Ok(if first { Published::Sent } else { Published::Duplicate })))
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
    use super::*;

    fn ch(s: &str) -> ChannelName {
        ChannelName::new(s).unwrap()
    }

    #[test]
    fn a_key_is_new_once_per_channel_within_the_window() {
        let mut k = Keys::default();
        let t0 = Instant::now();
        assert!(k.first(&ch("a"), "k", t0));
        assert!(!k.first(&ch("a"), "k", t0));
        assert!(k.first(&ch("b"), "k", t0), "keys are per channel");
        assert!(k.first(&ch("a"), "other", t0));
        let later = t0 + IDEMPOTENCY_WINDOW;
        assert!(k.first(&ch("a"), "k", later), "remembered for the window only");
        assert!(k.seen.len() <= 3, "expired keys are forgotten: {}", k.seen.len());
    }

    #[test]
    fn the_key_store_is_bounded() {
        let mut k = Keys::default();
        let t0 = Instant::now();
        for i in 0..MAX_KEYS + 10 {
            k.first(&ch("a"), &i.to_string(), t0);
        }
        assert!(k.seen.len() <= MAX_KEYS && k.order.len() <= MAX_KEYS);
    }
}
