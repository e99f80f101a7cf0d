//! `ShardedBroker`: a node's [`Broker`] over several independent Redis servers
//! (`redis_shards`). Each channel lives on exactly one shard, the one its Redis channel
//! name hashes to ([`fanout_protocol::shard_of`]); its pub/sub traffic, history, offsets,
//! idempotency keys and presence are all there, so one shard's outage stops only its own
//! channels. The first shard also carries the control plane (the control channel and the
//! node registry behind `/api/disconnect`, `/api/unsubscribe`, `/api/nodes`).
//!
//! Each shard is a complete [`RedisBroker`] of its own (connection manager, reader,
//! publisher, presence refresh), so everything a single Redis guarantees holds per shard.

use std::sync::Arc;

use fanout_hub::{
    BoxFuture, Broker, BrokerError, Control, Histories, NodeReport, NodeSelf, Presences, Published, Registry,
};
use fanout_protocol::{ChannelName, HistoryPage, HistoryQuery, PresenceList, PresenceStats, Publication};
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{RedisBroker, Shard},
    config::RedisConfig,
    error::RedisBrokerError,
};

/// Several independent Redis servers, channels spread over them by a hash of their name.
pub struct ShardedBroker {
    shards: Vec<Arc<RedisBroker>>,
    prefix: String,
    /// Every shard has been up at once since the start (see [`Broker::is_up`] below).
    started: std::sync::atomic::AtomicBool,
}

impl ShardedBroker {
    /// Starts one broker per URL of `config` (in order: shard 0, 1, ...). Returns at once,
    /// like [`RedisBroker::start`]; each shard connects and reconnects on its own.
    pub fn start(
        config: RedisConfig,
        registry: Arc<Registry>,
        histories: Arc<Histories>,
        presences: Arc<Presences>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, RedisBrokerError> {
        // Every URL checked before any shard starts connecting.
        config.validate()?;
        let urls: Vec<String> =
            config.urls.iter().map(|u| u.trim()).filter(|u| !u.is_empty()).map(String::from).collect();
        let mut shards = Vec::with_capacity(urls.len());
        for (index, url) in urls.into_iter().enumerate() {
            let shard = Shard { label: index.to_string(), control: index == 0 };
            let config = RedisConfig { urls: vec![url], ..config.clone() };
            let broker = RedisBroker::start_shard(
                config,
                registry.clone(),
                histories.clone(),
                presences.clone(),
                shard,
                shutdown.clone(),
            )?;
            shards.push(broker);
        }
        Ok(Arc::new(Self { shards, prefix: config.prefix, started: Default::default() }))
    }

    /// The shard that carries `channel`.
    fn of(&self, channel: &ChannelName) -> &RedisBroker {
        &self.shards[self.index_of(channel)]
    }

    fn index_of(&self, channel: &ChannelName) -> usize {
        let name = fanout_protocol::redis_channel(&self.prefix, channel.as_str());
        fanout_protocol::shard_of(&name, self.shards.len())
    }

    /// The shard with the control plane.
    fn control_shard(&self) -> &RedisBroker {
        &self.shards[0]
    }

    /// Whether each shard, in order, is connected with every wanted channel subscribed.
    pub fn shards_up(&self) -> Vec<bool> {
        self.shards.iter().map(|s| Broker::is_up(s.as_ref())).collect()
    }

    /// Resolves once every shard's tasks have stopped after shutdown.
    pub async fn stopped(&self) {
        for shard in &self.shards {
            shard.stopped().await;
        }
    }
}

impl Broker for ShardedBroker {
    fn publish<'a>(
        &'a self,
        publication: &'a Publication,
        key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Published, BrokerError>> {
        self.of(&publication.channel).publish(publication, key)
    }

    /// Split by shard (each shard's in batch order), one pipeline per shard, all in flight
    /// together; results put back in batch order.
    fn publish_batch<'a>(
        &'a self,
        batch: &'a [(Publication, Option<String>)],
    ) -> BoxFuture<'a, Vec<Result<Published, BrokerError>>> {
        Box::pin(async move {
            let mut groups: Vec<Vec<usize>> = vec![Vec::new(); self.shards.len()];
            for (i, (p, _)) in batch.iter().enumerate() {
                groups[self.index_of(&p.channel)].push(i);
            }
            let items: Vec<Vec<(Publication, Option<String>)>> =
                groups.iter().map(|g| g.iter().map(|&i| batch[i].clone()).collect()).collect();
            let each = items.iter().zip(&self.shards).map(|(items, shard)| shard.publish_batch(items));
            let answers = futures_util::future::join_all(each).await;
            crate::publisher::in_batch_order(batch.len(), &groups, answers)
        })
    }

    fn history<'a>(
        &'a self,
        channel: &'a ChannelName,
        query: &'a HistoryQuery,
    ) -> BoxFuture<'a, Result<HistoryPage, BrokerError>> {
        self.of(channel).history(channel, query)
    }

    fn control<'a>(&'a self, control: &'a Control) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.control_shard().control(control)
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeReport>, BrokerError>> {
        self.control_shard().nodes()
    }

    fn set_node(&self, node: NodeSelf) {
        self.control_shard().set_node(node);
    }

    fn presence_join(&self, channel: &ChannelName, client: &str, user: &str) {
        self.of(channel).presence_join(channel, client, user);
    }

    fn presence_leave(&self, channel: &ChannelName, client: &str) {
        self.of(channel).presence_leave(channel, client);
    }

    fn presence<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<PresenceList, BrokerError>> {
        self.of(channel).presence(channel)
    }

    fn presence_stats<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<PresenceStats, BrokerError>> {
        self.of(channel).presence_stats(channel)
    }

    fn add_interest(&self, channel: &ChannelName) {
        self.of(channel).add_interest(channel);
    }

    fn remove_interest(&self, channel: &ChannelName) {
        self.of(channel).remove_interest(channel);
    }

    fn ready<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<(), BrokerError>> {
        self.of(channel).ready(channel)
    }

    /// A starting node is up once every shard is (so it takes no client it could not
    /// serve, and a shard it cannot reach keeps it out of service where that shows);
    /// after that, while any shard is: a shard that goes down fails only its own channels
    /// (their `ready` and `publish`), and taking the node out of service for it would stop
    /// the channels of every other shard too.
    fn is_up(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.started.load(Ordering::Acquire) {
            return self.shards.iter().any(|s| Broker::is_up(s.as_ref()));
        }
        let all = self.shards.iter().all(|s| Broker::is_up(s.as_ref()));
        if all {
            self.started.store(true, Ordering::Release);
        }
        all
    }

    fn shards_down(&self) -> Vec<usize> {
        self.shards_up().iter().enumerate().filter(|(_, up)| !**up).map(|(i, _)| i).collect()
    }
}
