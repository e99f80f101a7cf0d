//! The hub: the registry joined to a broker, which is what sessions and the HTTP API use;
//! and recovery, the seam between a channel's history and its live publications.

use std::{sync::Arc, time::Duration};

use fanout_protocol::{encode_message, ChannelName, HistoryPage, HistoryQuery, Position, Publication};

use crate::{
    broker::{Broker, BrokerError, Published},
    history::Histories,
    outbox::Outbox,
    registry::Registry,
};

/// Subscribes and publishes on behalf of local clients, keeping the broker's per-node
/// interest reference-counted through the registry.
#[derive(Clone)]
pub struct Hub {
    registry: Arc<Registry>,
    broker: Arc<dyn Broker>,
    histories: Arc<Histories>,
    subscribe_timeout: Duration,
    /// Publications handed to the broker and not yet answered: a broker that stalls shows
    /// here first.
    publishing: metrics::Gauge,
    metrics: Arc<RecoveryMetrics>,
}

struct RecoveryMetrics {
    recovered: metrics::Counter,
    not_recovered: metrics::Counter,
    replayed: metrics::Counter,
}

impl RecoveryMetrics {
    fn new() -> Self {
        let outcome = |o: &'static str| metrics::counter!("fanout_recoveries_total", "outcome" => o);
        Self {
            recovered: outcome("recovered"),
            not_recovered: outcome("not_recovered"),
            replayed: metrics::counter!("fanout_publications_replayed_total"),
        }
    }
}

/// What a `subscribed` reply says beyond the channel: the channel's position, in a
/// namespace that keeps history, and whether the client's `since` was recovered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    pub top: Option<Position>,
    pub recovered: Option<bool>,
}

/// Publications read from history per page of a replay.
const REPLAY_PAGE: u64 = 1000;

/// The rest of a recovery too large for the outbox's room: publications after `cursor` up
/// to `top`, fed as the socket drains. Dropping it (the session ended, the client
/// unsubscribed) just stops it; the registry entry goes with the subscription.
pub struct Replay {
    hub: Hub,
    channel: ChannelName,
    outbox: Arc<Outbox>,
    top: Position,
    /// The last position pushed.
    cursor: Position,
    pending: std::collections::VecDeque<Publication>,
}

impl Replay {
    pub fn channel(&self) -> &ChannelName {
        &self.channel
    }

    /// Pushes pending publications while they fit; true when the replay has reached the top.
    fn push_fitting(&mut self) -> bool {
        let format = self.outbox.format();
        while let Some(p) = self.pending.front() {
            let Some(position) = p.position.clone() else {
                self.pending.pop_front();
                continue;
            };
            if position.offset > self.top.offset {
                // Published after the reply: the hold has it.
                self.pending.clear();
                break;
            }
            let Ok(frame) = encode_message(format, p) else {
                self.pending.pop_front();
                continue;
            };
            if frame.len() > self.outbox.room() {
                return false;
            }
            let ts = p.ts;
            self.pending.pop_front();
            self.outbox.push(frame, ts);
            self.hub.metrics.replayed.increment(1);
            self.cursor = position;
        }
        self.cursor.offset >= self.top.offset || self.cursor.epoch != self.top.epoch
    }

    /// Live publications after the top now flow to the subscriber directly.
    fn finish(self) {
        self.hub.registry.release(&self.channel, self.outbox.id(), Some(&self.top));
    }

    /// Feeds the rest as the outbox drains, reading further pages as needed, then ends
    /// the hold. If the history moved on under it (trimmed faster than the client reads),
    /// the subscriber is told to resync from the top instead.
    pub async fn run(mut self) {
        loop {
            if self.push_fitting() {
                return self.finish();
            }
            if !self.pending.is_empty() {
                // 4 KiB beyond the next frame, so the wait is not woken for every byte.
                let need = self.pending.front().map_or(0, |p| p.data.len() + 4096);
                if !self.outbox.wait_room(need.min(self.outbox.limit())).await {
                    return;
                }
                continue;
            }
            let query = HistoryQuery { since: Some(self.cursor.clone()), limit: Some(REPLAY_PAGE) };
            let page = match self.hub.history(&self.channel, &query).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(channel = %self.channel, error = %e, "a replay could not read history; the subscriber is told to resync");
                    return self.resync();
                }
            };
            if page.publications.first().and_then(Publication::offset) != Some(self.cursor.offset + 1) {
                return self.resync();
            }
            self.pending = page.publications.into();
        }
    }

    /// The replay cannot continue: `resync` at the top, then live ones after it.
    fn resync(self) {
        let frame = fanout_protocol::encode_resync(self.outbox.format(), self.channel.as_str(), &self.top);
        self.outbox.push(frame, 0);
        self.finish();
    }
}

/// Counts one publication in flight for as long as it lives (a cancelled publish too).
/// Publications in flight: counted up when made, down when dropped (a cancelled publish
/// included).
struct InFlight<'a>(&'a metrics::Gauge, f64);

impl<'a> InFlight<'a> {
    fn new(gauge: &'a metrics::Gauge, n: usize) -> Self {
        gauge.increment(n as f64);
        Self(gauge, n as f64)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(self.1);
    }
}

impl Hub {
    pub fn new(registry: Arc<Registry>, broker: Arc<dyn Broker>, subscribe_timeout: Duration) -> Self {
        Self::with_history(registry, broker, Arc::new(Histories::default()), subscribe_timeout)
    }

    pub fn with_history(
        registry: Arc<Registry>,
        broker: Arc<dyn Broker>,
        histories: Arc<Histories>,
        subscribe_timeout: Duration,
    ) -> Self {
        Self {
            registry,
            broker,
            histories,
            subscribe_timeout,
            publishing: metrics::gauge!("fanout_broker_publishes_in_flight"),
            metrics: Arc::new(RecoveryMetrics::new()),
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Whether `channel`'s namespace keeps history.
    pub fn keeps_history(&self, channel: &str) -> bool {
        self.histories.of(channel).is_some()
    }

    /// Subscribes `outbox` to `channel` and resolves once publications on it reach this
    /// node. On failure the subscription is rolled back.
    ///
    /// `reply` runs once the subscription holds, before anything published on the channel
    /// reaches the outbox, so the `subscribed` reply it queues comes first. In a namespace
    /// that keeps history, it is told the channel's top and, with `since`, whether the gap
    /// was filled; the recovered publications follow it, then live ones, none twice.
    ///
    /// A gap larger than the room in the outbox is not pushed at once: the [`Replay`]
    /// returned feeds it page by page as the socket drains (the caller runs it in a task
    /// of its own, since the session that writes the socket must keep running), and ends
    /// the hold on live publications when it reaches the top.
    pub async fn subscribe(
        &self,
        channel: &ChannelName,
        outbox: &Arc<Outbox>,
        since: Option<&Position>,
        reply: impl FnOnce(&Subscription),
    ) -> Result<Option<Replay>, BrokerError> {
        if !self.broker.is_up() {
            return Err(BrokerError::Unavailable("broker is disconnected".into()));
        }
        if self.histories.of(channel.as_str()).is_none() {
            self.registry.insert_with(channel, outbox, || self.broker.add_interest(channel));
            if let Err(e) = self.ready(channel).await {
                self.unsubscribe(channel, outbox.id());
                return Err(e);
            }
            reply(&Subscription { top: None, recovered: since.map(|_| false) });
            return Ok(None);
        }
        // Live publications are held from here on, so none is lost between the history
        // read and the release, and none is delivered twice.
        self.registry.insert_held_with(channel, outbox, || self.broker.add_interest(channel));
        let page = match self.ready(channel).await {
            Ok(()) => {
                let limit = if since.is_some() { REPLAY_PAGE } else { 0 };
                self.history(channel, &HistoryQuery { since: since.cloned(), limit: Some(limit) }).await
            }
            Err(e) => Err(e),
        };
        let page = match page {
            Ok(page) => page,
            Err(e) => {
                self.unsubscribe(channel, outbox.id());
                return Err(e);
            }
        };
        let recovered = since.map(|since| page.continues_from(since));
        match recovered {
            Some(true) => self.metrics.recovered.increment(1),
            Some(false) => self.metrics.not_recovered.increment(1),
            None => {}
        }
        reply(&Subscription { top: Some(page.top.clone()), recovered });
        // Recovered: the page follows `since`. Otherwise nothing is replayed from the top on.
        let (cursor, pending) = match since {
            Some(since) if recovered == Some(true) => (since.clone(), page.publications.into()),
            _ => (page.top.clone(), Default::default()),
        };
        let mut replay = Replay {
            hub: self.clone(),
            channel: channel.clone(),
            outbox: outbox.clone(),
            top: page.top,
            cursor,
            pending,
        };
        // Whatever fits now goes now; most recoveries end here, in the session's own task.
        if replay.push_fitting() {
            replay.finish();
            return Ok(None);
        }
        Ok(Some(replay))
    }

    /// `fut` within `subscribe_timeout` (the broker's own limits may be longer).
    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, BrokerError>>,
    ) -> Result<T, BrokerError> {
        tokio::time::timeout(self.subscribe_timeout, fut).await.unwrap_or(Err(BrokerError::Timeout))
    }

    async fn ready(&self, channel: &ChannelName) -> Result<(), BrokerError> {
        self.bounded(self.broker.ready(channel)).await
    }

    /// Reads `channel`'s history (the caller checked that it keeps one).
    pub async fn history(&self, channel: &ChannelName, query: &HistoryQuery) -> Result<HistoryPage, BrokerError> {
        self.bounded(self.broker.history(channel, query)).await
    }

    /// Removes subscriber `id` from `channel`; a no-op when it was not subscribed.
    pub fn unsubscribe(&self, channel: &ChannelName, id: u64) {
        self.registry.remove_with(channel, id, || self.broker.remove_interest(channel));
    }

    /// Hands a publication to the broker, which delivers it to every node subscribed; with
    /// an idempotency key, only if that key is new on the channel.
    pub async fn publish(&self, publication: &Publication, key: Option<&str>) -> Result<Published, BrokerError> {
        let _in_flight = InFlight::new(&self.publishing, 1);
        self.broker.publish(publication, key).await
    }

    /// [`Self::publish`] for many at once: see [`Broker::publish_batch`].
    pub async fn publish_batch(&self, batch: &[(Publication, Option<String>)]) -> Vec<Result<Published, BrokerError>> {
        let _in_flight = InFlight::new(&self.publishing, batch.len());
        self.broker.publish_batch(batch).await
    }

    pub fn broker_up(&self) -> bool {
        self.broker.is_up()
    }

    /// See [`Broker::shards_down`].
    pub fn shards_down(&self) -> Vec<usize> {
        self.broker.shards_down()
    }

    /// Tells every node to act on `control` (server API).
    pub async fn control(&self, control: &crate::Control) -> Result<(), BrokerError> {
        self.bounded(self.broker.control(control)).await
    }

    /// Every live node's report.
    pub async fn nodes(&self) -> Result<Vec<crate::NodeReport>, BrokerError> {
        self.bounded(self.broker.nodes()).await
    }

    pub fn presence_join(&self, channel: &ChannelName, client: &str, user: &str) {
        self.broker.presence_join(channel, client, user);
    }

    pub fn presence_leave(&self, channel: &ChannelName, client: &str) {
        self.broker.presence_leave(channel, client);
    }

    pub async fn presence(&self, channel: &ChannelName) -> Result<fanout_protocol::PresenceList, BrokerError> {
        self.bounded(self.broker.presence(channel)).await
    }

    pub async fn presence_stats(&self, channel: &ChannelName) -> Result<fanout_protocol::PresenceStats, BrokerError> {
        self.bounded(self.broker.presence_stats(channel)).await
    }

    /// Introduces the node to its broker (once, at start).
    pub fn set_node(&self, node: crate::NodeSelf) {
        self.broker.set_node(node);
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
        fn publish<'a>(
            &'a self,
            _: &'a Publication,
            _: Option<&'a str>,
        ) -> crate::BoxFuture<'a, Result<Published, BrokerError>> {
            Box::pin(std::future::ready(Ok(Published::default())))
        }
        fn history<'a>(
            &'a self,
            _: &'a ChannelName,
            _: &'a HistoryQuery,
        ) -> crate::BoxFuture<'a, Result<HistoryPage, BrokerError>> {
            Box::pin(std::future::ready(Err(BrokerError::Timeout)))
        }
        fn control<'a>(&'a self, _: &'a crate::Control) -> crate::BoxFuture<'a, Result<(), BrokerError>> {
            Box::pin(std::future::ready(Ok(())))
        }
        fn nodes(&self) -> crate::BoxFuture<'_, Result<Vec<crate::NodeReport>, BrokerError>> {
            Box::pin(std::future::ready(Ok(Vec::new())))
        }
        fn set_node(&self, _: crate::NodeSelf) {}
        fn presence_join(&self, _: &ChannelName, _: &str, _: &str) {}
        fn presence_leave(&self, _: &ChannelName, _: &str) {}
        fn presence<'a>(
            &'a self,
            _: &'a ChannelName,
        ) -> crate::BoxFuture<'a, Result<fanout_protocol::PresenceList, BrokerError>> {
            Box::pin(std::future::ready(Ok(Default::default())))
        }
        fn presence_stats<'a>(
            &'a self,
            _: &'a ChannelName,
        ) -> crate::BoxFuture<'a, Result<fanout_protocol::PresenceStats, BrokerError>> {
            Box::pin(std::future::ready(Ok(Default::default())))
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
                        rt.block_on(hub.subscribe(&channel, &outbox, None, |_| {})).unwrap();
                        hub.unsubscribe(&channel, outbox.id());
                    }
                });
            }
        });
        let keeper = Arc::new(Outbox::new(Encoding::Json, 1 << 20));
        runtime.block_on(hub.subscribe(&channel, &keeper, None, |_| {})).unwrap();
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
        hub.subscribe(&channel, &sub, None, |_| {}).await.unwrap();
        for i in 0..100u64 {
            let p = Publication::new(channel.clone(), i, Encoding::Json, Bytes::from(i.to_string()));
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
