//! The in-process broker: a single node needs no Redis, publications go straight to the
//! local registry.

use std::sync::Arc;

use fanout_protocol::{ChannelName, Publication};

use crate::{
    broker::{BoxFuture, Broker, BrokerError},
    registry::Registry,
};

/// Delivers every publication to this node's own subscribers, synchronously in the
/// publisher's task, which keeps each publisher's order without any queue.
pub struct EmbeddedBroker {
    registry: Arc<Registry>,
    channels: metrics::Gauge,
}

impl EmbeddedBroker {
    pub fn new(registry: Arc<Registry>) -> Self {
        // The embedded broker is always connected.
        metrics::gauge!("fanout_broker_up").set(1.0);
        Self { registry, channels: metrics::gauge!("fanout_broker_channels") }
    }
}

impl Broker for EmbeddedBroker {
    fn publish<'a>(&'a self, publication: &'a Publication) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.registry.deliver(publication);
        Box::pin(std::future::ready(Ok(())))
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
