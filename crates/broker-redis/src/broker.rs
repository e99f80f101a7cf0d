//! `RedisBroker`: the handle the hub holds, and the state its tasks share.

use std::{
    collections::HashSet,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, RwLock,
    },
};

use fanout_hub::{BoxFuture, Broker, BrokerError, Histories, LogLimiter, Published, Registry};
use fanout_protocol::{ChannelName, HistoryPage, HistoryQuery, Publication, IDEMPOTENCY_WINDOW};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    config::{Endpoint, RedisConfig},
    continuity::Positions,
    error::RedisBrokerError,
    functions,
    manager::{InterestChange, Manager},
    metrics::BrokerMetrics,
    publisher::PublishConnection,
};

/// State shared by the broker handle, the connection manager, the reader and publishers.
pub(crate) struct BrokerState {
    pub registry: Arc<Registry>,
    pub config: RedisConfig,
    pub endpoints: Vec<Endpoint>,
    /// Index into `endpoints` of the server in use, or to be tried next.
    pub current: AtomicUsize,
    up: AtomicBool,
    status: watch::Sender<bool>,
    /// Channels confirmed subscribed on the live pub/sub connection. Only the manager writes
    /// it; the reader borrows validated names from it instead of allocating new ones.
    pub active: RwLock<HashSet<ChannelName>>,
    pub publisher: PublishConnection,
    pub metrics: BrokerMetrics,
    /// One warning per 10 s about publications dropped on their way in from Redis.
    pub drop_log: LogLimiter,
    /// Which namespaces keep history, and how much.
    pub histories: Arc<Histories>,
    /// The Function library this node loads (its settings baked in).
    pub library: String,
    /// `{prefix}!control`, built once: the reader compares every message's channel to it.
    pub control_channel: String,
    /// The last position delivered on each history channel.
    pub positions: Positions,
    pub resync_log: LogLimiter,
    /// One warning per 10 s about plain `PUBLISH`es into history namespaces.
    pub unstored_log: LogLimiter,
    /// The node this broker serves (server API), once the server introduced it.
    pub node: std::sync::OnceLock<fanout_hub::NodeSelf>,
    pub presences: Arc<fanout_hub::Presences>,
    /// This node's own presence entries, refreshed in Redis.
    pub presence_local: fanout_hub::LocalPresence,
    pub event_budget: fanout_hub::EventBudget,
    /// Which Redis of several this is, and whether it carries the control plane.
    pub shard: Shard,
    /// The manager's queue, for the reader to hand back a channel Redis unsubscribed.
    pub interest: std::sync::OnceLock<mpsc::UnboundedSender<InterestChange>>,
}

/// One Redis connection's place among the node's Redis servers.
#[derive(Clone, Debug)]
pub(crate) struct Shard {
    /// Its `shard` metric label: `"0"`, `"1"`, ...
    pub label: String,
    /// Whether this Redis carries the control channel and the node registry (the first
    /// shard does; the others carry channels only).
    pub control: bool,
}

impl Default for Shard {
    fn default() -> Self {
        Self { label: "0".into(), control: true }
    }
}

impl BrokerState {
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
        self.metrics.up.set(if up { 1.0 } else { 0.0 });
        self.status.send_if_modified(|s| std::mem::replace(s, up) != up);
    }

    pub(crate) fn new(
        config: RedisConfig,
        registry: Arc<Registry>,
        histories: Arc<Histories>,
        presences: Arc<fanout_hub::Presences>,
        endpoints: Vec<Endpoint>,
        shard: Shard,
    ) -> Self {
        Self {
            metrics: BrokerMetrics::new(&shard.label),
            shard,
            interest: std::sync::OnceLock::new(),
            library: functions::library(
                &config.prefix,
                &histories,
                IDEMPOTENCY_WINDOW.as_secs(),
                if config.topology == crate::config::Topology::Cluster { "SPUBLISH" } else { "PUBLISH" },
            ),
            control_channel: crate::cluster::control_channel(&config.prefix),
            histories,
            positions: Positions::default(),
            resync_log: LogLimiter::new(10_000),
            unstored_log: LogLimiter::new(10_000),
            node: std::sync::OnceLock::new(),
            presences,
            presence_local: fanout_hub::LocalPresence::default(),
            event_budget: fanout_hub::EventBudget::default(),
            registry,
            publisher: PublishConnection::new(&config),
            config,
            endpoints,
            current: AtomicUsize::new(0),
            up: AtomicBool::new(false),
            status: watch::Sender::new(false),
            active: RwLock::new(HashSet::new()),
            drop_log: LogLimiter::new(10_000),
        }
    }

    /// Whether `channel` is subscribed on the live pub/sub connection.
    pub(crate) fn is_active(&self, channel: &ChannelName) -> bool {
        self.active.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains(channel)
    }

    /// A cluster ended the subscription to `channel` on its own (its slot moved): the
    /// manager subscribes it again, which reaches the slot's new master.
    pub(crate) fn unsubscribed_by_redis(&self, channel: ChannelName) {
        if let Some(interest) = self.interest.get() {
            let _ = interest.send(InterestChange::Lost(channel));
        }
    }

    /// A cluster lost a node connection: the manager subscribes everything again once the
    /// cluster answers everywhere.
    pub(crate) fn disrupted(&self) {
        if let Some(interest) = self.interest.get() {
            let _ = interest.send(InterestChange::Disrupted);
        }
    }

    /// Whether channels ride sharded pub/sub (a Redis Cluster).
    pub(crate) fn sharded_pubsub(&self) -> bool {
        self.config.topology == crate::config::Topology::Cluster
    }

    /// `SPUBLISH` on a cluster (to the channel's shard only), `PUBLISH` otherwise.
    pub(crate) fn publish_command(&self) -> &'static str {
        if self.sharded_pubsub() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    pub(crate) fn endpoint(&self) -> (usize, &Endpoint) {
        let i = self.current.load(Ordering::Relaxed) % self.endpoints.len();
        (i, &self.endpoints[i])
    }
}

/// Refreshes this node's report in the registry every second while Redis is up.
async fn report(shared: Arc<BrokerState>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(crate::cluster::REPORT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if shared.is_up() {
            // A failed report is retried at the next tick; the publish path counts the error.
            let _ = shared.report().await;
        }
    }
}

fn down() -> BrokerError {
    BrokerError::Unavailable("Redis is not connected".into())
}

/// A [`Broker`] that shares publications between nodes through Redis pub/sub. See the
/// crate documentation for how it behaves.
pub struct RedisBroker {
    shared: Arc<BrokerState>,
    commands: mpsc::UnboundedSender<InterestChange>,
    presence: mpsc::Sender<crate::presence::PresenceOp>,
    tasks: TaskTracker,
}

impl RedisBroker {
    /// Validates `config` and starts connecting in the background. Returns at once: the
    /// broker reports itself down until Redis answers, and keeps retrying for as long as it
    /// runs. Everything stops when `shutdown` is cancelled (or the broker is dropped).
    pub fn start(
        config: RedisConfig,
        registry: Arc<Registry>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, RedisBrokerError> {
        Self::start_with_history(config, registry, Arc::new(Histories::default()), shutdown)
    }

    /// [`Self::start`] for a node where `histories` says which namespaces keep history.
    pub fn start_with_history(
        config: RedisConfig,
        registry: Arc<Registry>,
        histories: Arc<Histories>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, RedisBrokerError> {
        Self::start_with(config, registry, histories, Arc::default(), shutdown)
    }

    /// [`Self::start`] with the namespaces that keep history and those that track presence.
    pub fn start_with(
        config: RedisConfig,
        registry: Arc<Registry>,
        histories: Arc<Histories>,
        presences: Arc<fanout_hub::Presences>,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, RedisBrokerError> {
        Self::start_shard(config, registry, histories, presences, Shard::default(), shutdown)
    }

    /// Starts the broker of one Redis among several (see [`crate::ShardedBroker`]).
    pub(crate) fn start_shard(
        config: RedisConfig,
        registry: Arc<Registry>,
        histories: Arc<Histories>,
        presences: Arc<fanout_hub::Presences>,
        shard: Shard,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, RedisBrokerError> {
        let endpoints = config.endpoints()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| RedisBrokerError::NoRuntime)?;
        // Entries expire after presence_ttl without a refresh: refresh three times as often.
        let refresh = presences
            .min_ttl()
            .map_or(std::time::Duration::from_secs(20), |t| (t / 3).max(std::time::Duration::from_millis(500)));
        let shared = Arc::new(BrokerState::new(config, registry, histories, presences, endpoints, shard));
        let (commands, receiver) = mpsc::unbounded_channel();
        let _ = shared.interest.set(commands.clone());
        let (presence, presence_rx) = mpsc::channel(crate::presence::QUEUE);
        let tasks = TaskTracker::new();
        let manager = Manager::new(shared.clone(), receiver, shutdown.clone(), tasks.clone());
        tasks.spawn_on(manager.run(), &runtime);
        if shared.shard.control {
            tasks.spawn_on(report(shared.clone(), shutdown.clone()), &runtime);
        }
        tasks.spawn_on(crate::presence::run(shared.clone(), presence_rx, refresh, shutdown), &runtime);
        tasks.close();
        Ok(Arc::new(Self { shared, commands, presence, tasks }))
    }

    /// Whether Redis is connected and every wanted channel is subscribed; changes as
    /// connections are lost and re-established.
    pub fn status(&self) -> watch::Receiver<bool> {
        self.shared.status.subscribe()
    }

    /// Resolves once the broker's tasks have stopped after shutdown.
    pub async fn stopped(&self) {
        self.tasks.wait().await;
    }
}

impl RedisBroker {
    /// Queues a presence change for Redis (bounded: a full queue drops it, counted).
    fn queue_presence(
        &self,
        event: fanout_protocol::PresenceEvent,
        policy: fanout_hub::PresencePolicy,
        channel: &ChannelName,
        client: &str,
        user: String,
    ) {
        let op =
            crate::presence::PresenceOp { event, channel: channel.clone(), client: client.to_owned(), user, policy };
        if self.presence.try_send(op).is_err() {
            self.shared.metrics.presence_ops_dropped.increment(1);
        }
    }
}

impl Broker for RedisBroker {
    fn publish<'a>(
        &'a self,
        publication: &'a Publication,
        key: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Published, BrokerError>> {
        Box::pin(async move {
            if !self.shared.is_up() {
                return Err(down());
            }
            self.shared.publisher.publish(&self.shared, publication, key).await
        })
    }

    fn publish_batch<'a>(
        &'a self,
        batch: &'a [(Publication, Option<String>)],
    ) -> BoxFuture<'a, Vec<Result<Published, BrokerError>>> {
        Box::pin(async move {
            if !self.shared.is_up() {
                return batch.iter().map(|_| Err(down())).collect();
            }
            self.shared.publisher.publish_batch(&self.shared, batch).await
        })
    }

    fn history<'a>(
        &'a self,
        channel: &'a ChannelName,
        query: &'a HistoryQuery,
    ) -> BoxFuture<'a, Result<HistoryPage, BrokerError>> {
        Box::pin(async move {
            if !self.shared.is_up() {
                return Err(down());
            }
            let Some(policy) = self.shared.histories.of(channel.as_str()) else {
                return Err(BrokerError::Unavailable("this channel keeps no history".into()));
            };
            let page = self.shared.publisher.history(&self.shared, channel, query, policy).await?;
            // A local subscriber is owed everything after this top: the node keeps it in
            // mind until it has delivered something on the channel.
            if self.shared.is_active(channel) {
                self.shared.positions.observe(channel, &page.top);
            }
            Ok(page)
        })
    }

    fn control<'a>(&'a self, control: &'a fanout_hub::Control) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            if !self.shared.is_up() {
                return Err(down());
            }
            self.shared.send_control(control).await
        })
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<fanout_hub::NodeReport>, BrokerError>> {
        Box::pin(async move {
            if !self.shared.is_up() {
                return Err(down());
            }
            self.shared.live_nodes().await
        })
    }

    fn set_node(&self, node: fanout_hub::NodeSelf) {
        let _ = self.shared.node.set(node);
    }

    fn presence_join(&self, channel: &ChannelName, client: &str, user: &str) {
        let Some(policy) = self.shared.presences.of(channel.as_str()) else { return };
        if self.shared.presence_local.join(channel, client, user) {
            self.queue_presence(fanout_protocol::PresenceEvent::Join, policy, channel, client, user.to_owned());
        }
    }

    fn presence_leave(&self, channel: &ChannelName, client: &str) {
        let Some(policy) = self.shared.presences.of(channel.as_str()) else { return };
        if let Some(user) = self.shared.presence_local.leave(channel, client) {
            self.queue_presence(fanout_protocol::PresenceEvent::Leave, policy, channel, client, user);
        }
    }

    fn presence<'a>(
        &'a self,
        channel: &'a ChannelName,
    ) -> BoxFuture<'a, Result<fanout_protocol::PresenceList, BrokerError>> {
        Box::pin(async move {
            if !self.shared.is_up() {
                return Err(down());
            }
            self.shared.presence_list(channel).await
        })
    }

    fn presence_stats<'a>(
        &'a self,
        channel: &'a ChannelName,
    ) -> BoxFuture<'a, Result<fanout_protocol::PresenceStats, BrokerError>> {
        Box::pin(async move {
            if !self.shared.is_up() {
                return Err(down());
            }
            self.shared.presence_counts(channel).await
        })
    }

    fn add_interest(&self, channel: &ChannelName) {
        // Fails only once the manager has stopped, when there is nothing left to tell.
        let _ = self.commands.send(InterestChange::Add(channel.clone()));
    }

    fn remove_interest(&self, channel: &ChannelName) {
        let _ = self.commands.send(InterestChange::Remove(channel.clone()));
    }

    fn ready<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            if !self.shared.is_up() {
                return Err(down());
            }
            // Asked of the manager rather than read from `active`: it sees this request after
            // the `add_interest` that preceded it, so it cannot answer from a subscription
            // that is about to be withdrawn.
            let (tx, rx) = oneshot::channel();
            self.commands.send(InterestChange::Ready(channel.clone(), tx)).map_err(|_| down())?;
            rx.await.unwrap_or_else(|_| Err(down()))
        })
    }

    fn is_up(&self) -> bool {
        self.shared.is_up()
    }
}
