//! The hub: the registry joined to a broker, which is what sessions and the HTTP API use.

use std::{sync::Arc, time::Duration};

use fanout_protocol::{ChannelName, Publication};

use crate::{
    broker::{Broker, BrokerError, Published},
    outbox::Outbox,
    registry::Registry,
};

/// Subscribes and publishes on behalf of local clients, keeping the broker's per-node
/// interest reference-counted through the registry.
#[derive(Clone)]
pub struct Hub {
    registry: Arc<Registry>,
    broker: Arc<dyn Broker>,
    subscribe_timeout: Duration,
    /// Publications handed to the broker and not yet answered: a broker that stalls shows
    /// here first.
    publishing: metrics::Gauge,
}

/// Counts one publication in flight for as long as it lives (a cancelled publish too).
struct InFlight<'a>(&'a metrics::Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

impl Hub {
    pub fn new(registry: Arc<Registry>, broker: Arc<dyn Broker>, subscribe_timeout: Duration) -> Self {
        Self { registry, broker, subscribe_timeout, publishing: metrics::gauge!("fanout_broker_publishes_in_flight") }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Subscribes `outbox` to `channel` and resolves once publications on it reach this
    /// node. On failure the subscription is rolled back.
    pub async fn subscribe(&self, channel: &ChannelName, outbox: &Arc<Outbox>) -> Result<(), BrokerError> {
        if !self.broker.is_up() {
            return Err(BrokerError::Unavailable("broker is disconnected".into()));
        }
        self.registry.insert_with(channel, outbox, || self.broker.add_interest(channel));
        let ready = match tokio::time::timeout(self.subscribe_timeout, self.broker.ready(channel)).await {
            Ok(r) => r,
            Err(_) => Err(BrokerError::Timeout),
        };
        if ready.is_err() {
            self.unsubscribe(channel, outbox.id());
        }
        ready
    }

    /// Removes subscriber `id` from `channel`; a no-op when it was not subscribed.
    pub fn unsubscribe(&self, channel: &ChannelName, id: u64) {
        self.registry.remove_with(channel, id, || self.broker.remove_interest(channel));
    }

    /// Hands a publication to the broker, which delivers it to every node subscribed; with
    /// an idempotency key, only if that key is new on the channel.
    pub async fn publish(&self, publication: &Publication, key: Option<&str>) -> Result<Published, BrokerError> {
        self.publishing.increment(1.0);
        let _in_flight = InFlight(&self.publishing);
        match key {
            None => self.broker.publish(publication).await.map(|()| Published::Sent),
            Some(key) => self.broker.publish_once(publication, key).await,
        }
    }

    pub fn broker_up(&self) -> bool {
        self.broker.is_up()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use bytes::Bytes;
    use fanout_protocol::Encoding;

    use super::*;
    use crate::EmbeddedBroker;

    /// A broker that records the interest changes it is told about, in order.
    #[derive(Default)]
    struct Recorder {
        events: std::sync::Mutex<Vec<bool>>,
    }

    impl Broker for Recorder {
        fn publish<'a>(&'a self, _: &'a Publication) -> crate::BoxFuture<'a, Result<(), BrokerError>> {
            Box::pin(std::future::ready(Ok(())))
        }
        fn publish_once<'a>(
            &'a self,
            _: &'a Publication,
            _: &'a str,
        ) -> crate::BoxFuture<'a, Result<Published, BrokerError>> {
            Box::pin(std::future::ready(Ok(Published::Sent)))
        }
        fn add_interest(&self, _: &ChannelName) {
            self.events.lock().unwrap().push(true);
        }
        fn remove_interest(&self, _: &ChannelName) {
            self.events.lock().unwrap().push(false);
        }
        fn ready<'a>(&'a self, _: &'a ChannelName) -> crate::BoxFuture<'a, Result<(), BrokerError>> {
            Box::pin(std::future::ready(Ok(())))
        }
        fn is_up(&self) -> bool {
            true
        }
    }

    /// Last subscribers leaving while new ones join, on several threads at once: the broker
    /// must hear add, remove, add, ... strictly alternating, ending in what the registry
    /// holds. (Told after the registry lock is released, a join could overtake the leave it
    /// raced, and the broker would end unsubscribed from a channel with a subscriber.)
    #[test]
    fn interest_reaches_the_broker_in_registry_order() {
        let registry = Arc::new(Registry::new());
        let recorder = Arc::new(Recorder::default());
        let hub = Hub::new(registry.clone(), recorder.clone(), Duration::from_secs(1));
        let channel = ChannelName::new("race").unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
                    let outbox = Arc::new(Outbox::new(Encoding::Json, 1 << 20));
                    for _ in 0..20_000 {
                        rt.block_on(hub.subscribe(&channel, &outbox)).unwrap();
                        hub.unsubscribe(&channel, outbox.id());
                    }
                });
            }
        });
        let keeper = Arc::new(Outbox::new(Encoding::Json, 1 << 20));
        runtime.block_on(hub.subscribe(&channel, &keeper)).unwrap();
        let events = recorder.events.lock().unwrap().clone();
        assert!(events.len() >= 2, "no interest changes recorded");
        for (i, pair) in events.windows(2).enumerate() {
            assert_ne!(
                pair[0],
                pair[1],
                "interest change {i} and {} are both {}",
                i + 1,
                if pair[0] { "add" } else { "remove" }
            );
        }
        assert_eq!(events.last(), Some(&true), "the channel has a subscriber, so the broker's last word must be add");
        assert_eq!(registry.subscriber_count("race"), 1);
    }

    #[tokio::test]
    async fn embedded_hub_delivers_in_order() {
        let registry = Arc::new(Registry::new());
        let hub = Hub::new(registry.clone(), Arc::new(EmbeddedBroker::new(registry)), Duration::from_secs(1));
        let channel = ChannelName::new("c").unwrap();
        let sub = Arc::new(Outbox::new(Encoding::Json, 1 << 20));
        hub.subscribe(&channel, &sub).await.unwrap();
        for i in 0..100u64 {
            let p =
                Publication { channel: channel.clone(), ts: i, enc: Encoding::Json, data: Bytes::from(i.to_string()) };
            hub.publish(&p, None).await.unwrap();
        }
        let mut q = VecDeque::new();
        sub.take(&mut q).await;
        let ts: Vec<u64> = q.iter().map(|o| o.ts).collect();
        assert_eq!(ts, (0..100).collect::<Vec<_>>());
        hub.unsubscribe(&channel, sub.id());
        assert_eq!(hub.registry().subscriber_count("c"), 0);
    }
}
