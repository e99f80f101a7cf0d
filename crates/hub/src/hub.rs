//! The hub: the registry joined to a broker, which is what sessions and the HTTP API use.

use std::{sync::Arc, time::Duration};

use fanout_protocol::{ChannelName, Publication};

use crate::{
    broker::{Broker, BrokerError},
    outbox::Outbox,
    registry::{Change, Registry},
};

/// Subscribes and publishes on behalf of local clients, keeping the broker's per-node
/// interest reference-counted through the registry.
#[derive(Clone)]
pub struct Hub {
    registry: Arc<Registry>,
    broker: Arc<dyn Broker>,
    subscribe_timeout: Duration,
}

impl Hub {
    pub fn new(registry: Arc<Registry>, broker: Arc<dyn Broker>, subscribe_timeout: Duration) -> Self {
        Self { registry, broker, subscribe_timeout }
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
        if self.registry.insert(channel, outbox) == Change::Interest {
            self.broker.add_interest(channel);
        }
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
        if self.registry.remove(channel, id) == Change::Interest {
            self.broker.remove_interest(channel);
        }
    }

    /// Hands a publication to the broker, which delivers it to every node subscribed.
    pub async fn publish(&self, publication: &Publication) -> Result<(), BrokerError> {
        self.broker.publish(publication).await
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
            hub.publish(&p).await.unwrap();
        }
        let mut q = VecDeque::new();
        sub.take(&mut q).await;
        let ts: Vec<u64> = q.iter().map(|o| o.ts).collect();
        assert_eq!(ts, (0..100).collect::<Vec<_>>());
        hub.unsubscribe(&channel, sub.id());
        assert_eq!(hub.registry().subscriber_count("c"), 0);
    }
}
