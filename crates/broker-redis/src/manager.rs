//! The connection manager: the one task that owns the pub/sub connection's life (dial,
//! heartbeat, reconnect) and the node's channel interest (batched, lingering
//! SUBSCRIBE / UNSUBSCRIBE, and the `ready` waiters that depend on them).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    convert::Infallible,
    sync::{Arc, PoisonError},
    time::Duration,
};

use fanout_hub::BrokerError;
use fanout_protocol::ChannelName;
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::{timeout, Instant, MissedTickBehavior},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    backoff::Backoff,
    broker::BrokerState,
    link::{self, Link, Ping, PubSub},
    publisher::is_connection_error,
    reader,
};

/// Channels per SUBSCRIBE / UNSUBSCRIBE, so one command (and its confirmations) stays a
/// reasonable size however many channels a reconnect has to restore.
const MAX_BATCH: usize = 1024;

/// The most an unsubscribe is held back beyond its linger to share a command with others.
const MAX_COALESCE: Duration = Duration::from_millis(25);

type Waiter = oneshot::Sender<Result<(), BrokerError>>;

/// What the broker handle asks of the manager; sent over an unbounded channel so the hub
/// never waits on Redis to change interest.
pub(crate) enum InterestChange {
    Add(ChannelName),
    Remove(ChannelName),
    Ready(ChannelName, Waiter),
    /// Redis ended the subscription by itself (a cluster slot moved).
    Lost(ChannelName),
    /// A cluster's connection to one of its nodes dropped.
    Disrupted,
}

/// Why a connection's life ended.
enum Stop {
    Shutdown,
    Lost(String),
}

/// The reader task, stopped whenever its connection is given up.
struct Reader(JoinHandle<()>);

impl Drop for Reader {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn down() -> BrokerError {
    BrokerError::Unavailable("Redis is not connected".into())
}

pub(crate) struct Manager {
    shared: Arc<BrokerState>,
    commands: mpsc::UnboundedReceiver<InterestChange>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    interest: Interest,
    /// Cluster only: part of the cluster was unreachable since the last full resubscribe.
    disrupted: bool,
}

impl Manager {
    pub(crate) fn new(
        shared: Arc<BrokerState>,
        commands: mpsc::UnboundedReceiver<InterestChange>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Self {
        let interest = Interest::new(shared.clone());
        Self { shared, commands, shutdown, tasks, interest, disrupted: false }
    }

    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new(self.shared.config.reconnect_backoff_max);
        let mut reconnect = false;
        while let Some(link) = self.connect(&mut backoff).await {
            backoff.reset();
            let addr = link.addr.clone();
            let stop = self.serve(link, reconnect).await;
            reconnect = true;
            self.interest.go_down();
            match stop {
                Stop::Shutdown => break,
                Stop::Lost(reason) => tracing::warn!(redis = %addr, reason, "lost the Redis connection; reconnecting"),
            }
        }
        self.interest.go_down();
        tracing::debug!("Redis broker stopped");
    }

    fn apply(&mut self, cmd: InterestChange) {
        match cmd {
            InterestChange::Disrupted => self.disrupted = true,
            cmd => self.interest.apply(cmd),
        }
    }

    /// Runs `fut` to completion while still answering commands, so interest changes are
    /// recorded and `ready` fails at once while there is no connection. `None`: shut down.
    async fn with_commands<F: std::future::Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return None,
                out = &mut fut => return Some(out),
                cmd = self.commands.recv() => self.apply(cmd?),
            }
        }
    }

    /// Dials endpoints in turn, backing off between failures, until one answers.
    async fn connect(&mut self, backoff: &mut Backoff) -> Option<Link> {
        let mut delay = Duration::ZERO;
        loop {
            if !delay.is_zero() {
                self.with_commands(tokio::time::sleep(delay)).await?;
            }
            let (index, endpoint) = self.shared.endpoint();
            let addr = endpoint.addr.clone();
            let shared = self.shared.clone();
            let dialing = async move {
                if shared.sharded_pubsub() {
                    link::dial_cluster(shared).await
                } else {
                    link::dial(shared, index).await
                }
            };
            match self.with_commands(dialing).await? {
                Ok(link) => return Some(link),
                Err(error) => {
                    self.shared.metrics.errors.connect.increment(1);
                    let n = self.shared.endpoints.len();
                    self.shared.current.store((index + 1) % n, std::sync::atomic::Ordering::Relaxed);
                    delay = backoff.next_delay();
                    // Warnings at attempts 1, 2, 4, 8, ...: a long outage at one attempt per
                    // backoff step should not fill the log, yet still shows it is ongoing.
                    let attempts = backoff.attempts();
                    if attempts.is_power_of_two() {
                        tracing::warn!(redis = %addr, error, attempts, "cannot connect to Redis; retrying");
                    } else {
                        tracing::debug!(redis = %addr, error, attempts, "cannot connect to Redis; retrying");
                    }
                }
            }
        }
    }

    async fn serve(&mut self, link: Link, reconnect: bool) -> Stop {
        match self.serve_inner(link, reconnect).await {
            Err(stop) => stop,
        }
    }

    async fn serve_inner(&mut self, link: Link, reconnect: bool) -> Result<Infallible, Stop> {
        let Link { pubsub: mut sink, source: stream, publish, addr } = link;
        let (subscribed, subscribed_rx) = oneshot::channel();
        let mut reader = Reader(self.tasks.spawn(reader::run(self.shared.clone(), stream, subscribed_rx)));

        let started = Instant::now();
        self.subscribe_pending(&mut sink).await?;
        // The control channel (server API), before the node is up, on the Redis that carries it.
        if self.shared.shard.control {
            self.subscribe_control(&mut sink).await?;
        }
        self.shared.publisher.install(Some(publish));
        // Every wanted channel is subscribed again: what was published while it was not
        // can now be read from history without missing anything after it.
        let _ = subscribed.send(());
        if reconnect {
            self.shared.metrics.reconnects.increment(1);
            self.shared.metrics.resubscribe_seconds.record(started.elapsed().as_secs_f64());
        }
        self.interest.up = true;
        self.shared.set_up(true);
        tracing::info!(redis = %addr, channels = self.interest.subscribed.len(), "connected to Redis");

        let config = &self.shared.config;
        let (period, command_timeout) = (config.heartbeat_interval, config.command_timeout);
        let coalesce = (config.linger / 4).min(MAX_COALESCE);
        let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            self.subscribe_pending(&mut sink).await?;
            self.unsubscribe_due(&mut sink).await?;
            // Woken a little after the first deadline, so unsubscribes that fall due close
            // together (a burst of clients leaving) go out as one command; never early.
            let next_linger = self.interest.linger_queue.front().map(|(deadline, _)| *deadline + coalesce);
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Err(Stop::Shutdown),
                _ = &mut reader.0 => return Err(Stop::Lost("the pub/sub connection closed".into())),
                _ = heartbeat.tick() => match timeout(command_timeout, sink.ping()).await {
                    Ok(Ok(Ping::Alive)) => {}
                    Ok(Ok(Ping::Cluster { subscriptions })) => {
                        // Every master answers. The cluster connection resubscribes by
                        // itself after it reconnects, but not reliably: it sends a node's
                        // channels of every slot in one SSUBSCRIBE, which Redis refuses, and
                        // it replaces connections without saying so. So after a disruption,
                        // or when the masters hold fewer of our subscriptions than we count,
                        // everything wanted is subscribed again (SSUBSCRIBE to a subscribed
                        // channel changes nothing).
                        let expected = self.interest.subscribed.len() + usize::from(self.shared.shard.control);
                        let lost = subscriptions < expected as u64;
                        if lost {
                            self.shared.metrics.errors.subscribe.increment(1);
                            if let Some(suppressed) = self.shared.drop_log.check() {
                                tracing::warn!(expected, subscriptions, suppressed, "Redis Cluster masters lost subscriptions; subscribing again");
                            }
                        }
                        if std::mem::take(&mut self.disrupted) || lost {
                            self.interest.resubscribe_all();
                            if self.shared.shard.control {
                                self.subscribe_control(&mut sink).await?;
                            }
                        }
                    }
                    // Part of a cluster does not answer: counted; the cluster connection
                    // reconnects to it and follows its failover.
                    Ok(Ok(Ping::Partial)) => {
                        self.disrupted = true;
                        self.shared.metrics.errors.ping.increment(1);
                        if let Some(suppressed) = self.shared.drop_log.check() {
                            tracing::warn!(suppressed, "a Redis Cluster master does not answer PING; its channels wait for it or its replica");
                        }
                    }
                    Ok(Err(e)) => {
                        self.shared.metrics.errors.ping.increment(1);
                        return Err(Stop::Lost(format!("PING failed: {e}")));
                    }
                    Err(_) => {
                        self.shared.metrics.errors.ping.increment(1);
                        return Err(Stop::Lost(format!("no answer to PING within {command_timeout:?}")));
                    }
                },
                cmd = self.commands.recv() => {
                    self.apply(cmd.ok_or(Stop::Shutdown)?);
                    // Everything queued behind it joins the same batch.
                    while let Ok(cmd) = self.commands.try_recv() {
                        self.apply(cmd);
                    }
                }
                _ = tokio::time::sleep_until(next_linger.unwrap_or(started)), if next_linger.is_some() => {}
            }
        }
    }

    async fn subscribe_control(&mut self, sink: &mut PubSub) -> Result<(), Stop> {
        let control = self.shared.control_channel.clone();
        match timeout(self.shared.config.command_timeout, sink.subscribe(std::slice::from_ref(&control))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) if is_connection_error(&e) => {
                return Err(Stop::Lost(format!("SUBSCRIBE to the control channel failed: {e}")))
            }
            // Refused (an ACL without this channel): the node serves, but server-API
            // actions from other nodes will not reach its connections.
            Ok(Err(e)) => tracing::warn!(channel = %control, error = %e,
                "Redis refused SUBSCRIBE to the control channel: /api/disconnect and /api/unsubscribe will not reach this node"),
            Err(_) => return Err(Stop::Lost("no answer to SUBSCRIBE (control channel) in time".into())),
        }
        Ok(())
    }

    async fn subscribe_pending(&mut self, sink: &mut PubSub) -> Result<(), Stop> {
        if self.interest.pending.is_empty() {
            return Ok(());
        }
        let batch: Vec<ChannelName> = self.interest.pending.drain().collect();
        for chunk in batch.chunks(MAX_BATCH) {
            if self.subscribe(sink, chunk).await?.is_ok() || chunk.len() == 1 {
                continue;
            }
            // Redis refuses a whole command for one channel it will not allow (an ACL,
            // say): find out which, so the others still get subscribed.
            for channel in chunk {
                let _ = self.subscribe(sink, std::slice::from_ref(channel)).await?;
            }
        }
        Ok(())
    }

    /// One SUBSCRIBE. `Err`: the connection is gone; `Ok(Err)`: Redis refused the command,
    /// and the channels stay unsubscribed until they are asked for again.
    async fn subscribe(
        &mut self,
        sink: &mut PubSub,
        channels: &[ChannelName],
    ) -> Result<Result<(), redis::RedisError>, Stop> {
        if let Some(cluster) = sink.cluster() {
            self.subscribe_cluster(cluster.clone(), channels).await;
            return Ok(Ok(()));
        }
        let keys = self.keys(channels);
        match timeout(self.shared.config.command_timeout, sink.subscribe(&keys)).await {
            Ok(Ok(())) => {
                self.interest.confirmed(channels);
                Ok(Ok(()))
            }
            Ok(Err(e)) => {
                self.shared.metrics.errors.subscribe.increment(1);
                if is_connection_error(&e) {
                    return Err(Stop::Lost(format!("SUBSCRIBE failed: {e}")));
                }
                if let [channel] = channels {
                    tracing::warn!(%channel, error = %e, "Redis refused SUBSCRIBE");
                    self.interest.refused(channels, &e);
                }
                Ok(Err(e))
            }
            Err(_) => {
                self.shared.metrics.errors.subscribe.increment(1);
                Err(Stop::Lost("no answer to SUBSCRIBE in time".into()))
            }
        }
    }

    /// `SSUBSCRIBE`s, one per slot, all in flight together. A slot whose master does not
    /// answer (it is failing over) does not end the cluster connection: the connection is
    /// marked disrupted, so once every master answers the heartbeat every wanted channel
    /// (these among them) is subscribed again.
    async fn subscribe_cluster(&mut self, cluster: redis::cluster_async::ClusterConnection, channels: &[ChannelName]) {
        let limit = self.shared.config.command_timeout;
        let prefix = self.shared.config.prefix.as_str();
        let keyed = channels.iter().map(|c| (fanout_protocol::redis_channel(prefix, c.as_str()), c.clone()));
        let groups = link::by_slot(keyed, |(key, _)| fanout_protocol::key_slot(key.as_bytes()));
        let each = groups.into_iter().map(|group| {
            let mut conn = cluster.clone();
            async move {
                let keys: Vec<&String> = group.iter().map(|(k, _)| k).collect();
                let result = match timeout(limit, conn.ssubscribe(&keys)).await {
                    Ok(r) => r,
                    Err(_) => Err(redis::RedisError::from((redis::ErrorKind::Io, "no answer to SSUBSCRIBE in time"))),
                };
                (group.into_iter().map(|(_, c)| c).collect::<Vec<_>>(), result)
            }
        });
        for (group, result) in futures_util::future::join_all(each).await {
            match result {
                Ok(()) => self.interest.confirmed(&group),
                Err(e) => {
                    self.shared.metrics.errors.subscribe.increment(1);
                    if is_connection_error(&e) || e.is_timeout() || e.kind() == redis::ErrorKind::Io {
                        if let Some(suppressed) = self.shared.drop_log.check() {
                            tracing::warn!(error = %e, channels = group.len(), suppressed, "SSUBSCRIBE failed; retrying once the cluster answers");
                        }
                        self.disrupted = true;
                    } else {
                        tracing::warn!(channel = %group[0], error = %e, "Redis refused SSUBSCRIBE");
                        self.interest.refused(&group, &e);
                    }
                }
            }
        }
    }

    async fn unsubscribe_due(&mut self, sink: &mut PubSub) -> Result<(), Stop> {
        let due = self.interest.take_due(Instant::now());
        for chunk in due.chunks(MAX_BATCH) {
            let keys = self.keys(chunk);
            match timeout(self.shared.config.command_timeout, sink.unsubscribe(&keys)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    self.shared.metrics.errors.unsubscribe.increment(1);
                    if is_connection_error(&e) {
                        return Err(Stop::Lost(format!("UNSUBSCRIBE failed: {e}")));
                    }
                    // Harmless: their publications keep coming and reach no local subscriber.
                    tracing::warn!(error = %e, channels = chunk.len(), "Redis refused UNSUBSCRIBE");
                }
                Err(_) => {
                    self.shared.metrics.errors.unsubscribe.increment(1);
                    return Err(Stop::Lost("no answer to UNSUBSCRIBE in time".into()));
                }
            }
        }
        Ok(())
    }

    fn keys(&self, channels: &[ChannelName]) -> Vec<String> {
        let prefix = self.shared.config.prefix.as_str();
        channels.iter().map(|c| fanout_protocol::redis_channel(prefix, c.as_str())).collect()
    }
}

/// What the node wants subscribed and what Redis has confirmed, on the current connection.
struct Interest {
    shared: Arc<BrokerState>,
    /// Connected and every wanted channel re-subscribed.
    up: bool,
    /// Channels with local subscribers.
    wanted: HashSet<ChannelName>,
    /// Confirmed subscribed in Redis (lingering ones included); mirrored in `BrokerState::active`.
    subscribed: HashSet<ChannelName>,
    /// Wanted, not yet sent.
    pending: HashSet<ChannelName>,
    /// Subscribed, no longer wanted: when to unsubscribe.
    lingering: HashMap<ChannelName, Instant>,
    /// The same deadlines in order; an entry whose deadline no longer matches `lingering`
    /// is stale (the channel was re-added, maybe removed again) and skipped.
    linger_queue: VecDeque<(Instant, ChannelName)>,
    waiters: HashMap<ChannelName, Vec<Waiter>>,
    /// Wanted, but Redis refused to subscribe them (and why): `ready` fails at once rather
    /// than wait for a subscription that will not come. Retried when asked for again.
    refused: HashMap<ChannelName, String>,
}

impl Interest {
    fn new(shared: Arc<BrokerState>) -> Self {
        Self {
            shared,
            up: false,
            wanted: HashSet::new(),
            subscribed: HashSet::new(),
            pending: HashSet::new(),
            lingering: HashMap::new(),
            linger_queue: VecDeque::new(),
            waiters: HashMap::new(),
            refused: HashMap::new(),
        }
    }

    fn apply(&mut self, cmd: InterestChange) {
        match cmd {
            InterestChange::Add(channel) => {
                if !self.wanted.insert(channel.clone()) || self.lingering.remove(&channel).is_some() {
                    return;
                }
                if !self.subscribed.contains(&channel) {
                    self.pending.insert(channel);
                }
            }
            InterestChange::Remove(channel) => {
                if !self.wanted.remove(&channel) {
                    return;
                }
                self.pending.remove(&channel);
                self.refused.remove(&channel);
                self.fail_waiters(&channel, || BrokerError::Unavailable("interest withdrawn".into()));
                if self.subscribed.contains(&channel) {
                    let deadline = Instant::now() + self.shared.config.linger;
                    self.lingering.insert(channel.clone(), deadline);
                    self.linger_queue.push_back((deadline, channel));
                }
            }
            // Handled by the manager.
            InterestChange::Disrupted => {}
            InterestChange::Lost(channel) => {
                // Ours (an UNSUBSCRIBE we sent, or one already being redone): nothing to do.
                if !self.wanted.contains(&channel) || !self.subscribed.remove(&channel) {
                    return;
                }
                tracing::debug!(%channel, "Redis ended a subscription (slot moved); subscribing again");
                self.shared.metrics.channels.set(self.subscribed.len() as f64);
                self.pending.insert(channel);
            }
            InterestChange::Ready(channel, waiter) => {
                let answer = if !self.up {
                    Err(down())
                } else if !self.wanted.contains(&channel) {
                    Err(BrokerError::Unavailable(format!("no interest in channel {channel}")))
                } else if self.subscribed.contains(&channel) {
                    Ok(())
                } else if let Some(reason) = self.refused.get(&channel) {
                    Err(BrokerError::Unavailable(reason.clone()))
                } else {
                    self.waiters.entry(channel).or_default().push(waiter);
                    return;
                };
                let _ = waiter.send(answer);
            }
        }
    }

    /// Every wanted channel goes out again (those whose SSUBSCRIBE failed included).
    fn resubscribe_all(&mut self) {
        self.pending.extend(self.wanted.iter().cloned());
    }

    fn confirmed(&mut self, channels: &[ChannelName]) {
        self.subscribed.extend(channels.iter().cloned());
        self.shared.active.write().unwrap_or_else(PoisonError::into_inner).extend(channels.iter().cloned());
        self.shared.metrics.channels.set(self.subscribed.len() as f64);
        for channel in channels {
            for waiter in self.waiters.remove(channel).unwrap_or_default() {
                let _ = waiter.send(Ok(()));
            }
        }
    }

    fn refused(&mut self, channels: &[ChannelName], error: &redis::RedisError) {
        let reason = format!("Redis refused SUBSCRIBE: {error}");
        for channel in channels {
            self.fail_waiters(channel, || BrokerError::Unavailable(reason.clone()));
            self.refused.insert(channel.clone(), reason.clone());
        }
    }

    /// Channels whose linger has run out, dropped from the subscribed set before the
    /// UNSUBSCRIBE is sent.
    fn take_due(&mut self, now: Instant) -> Vec<ChannelName> {
        let mut due = Vec::new();
        while let Some((deadline, _)) = self.linger_queue.front() {
            if *deadline > now {
                break;
            }
            let Some((deadline, channel)) = self.linger_queue.pop_front() else { break };
            if self.lingering.get(&channel) == Some(&deadline) {
                self.lingering.remove(&channel);
                due.push(channel);
            }
        }
        if !due.is_empty() {
            let mut active = self.shared.active.write().unwrap_or_else(PoisonError::into_inner);
            for channel in &due {
                self.subscribed.remove(channel);
                active.remove(channel);
            }
            drop(active);
            for channel in &due {
                self.shared.positions.forget(channel);
            }
            self.shared.metrics.channels.set(self.subscribed.len() as f64);
        }
        due
    }

    fn fail_waiters(&mut self, channel: &ChannelName, error: impl Fn() -> BrokerError) {
        for waiter in self.waiters.remove(channel).unwrap_or_default() {
            let _ = waiter.send(Err(error()));
        }
    }

    /// The connection is gone: nothing is subscribed any more, everything wanted is to be
    /// subscribed again on the next one, and nobody is left waiting.
    fn go_down(&mut self) {
        self.up = false;
        self.shared.publisher.install(None);
        self.subscribed.clear();
        self.shared.active.write().unwrap_or_else(PoisonError::into_inner).clear();
        self.shared.metrics.channels.set(0.0);
        self.lingering.clear();
        self.linger_queue.clear();
        self.refused.clear();
        self.pending = self.wanted.clone();
        // Positions of wanted channels are what the next connection catches up from.
        self.shared.positions.retain(|c| self.wanted.contains(c));
        // Announced last, so whoever watches the status sees the rest already consistent.
        self.shared.set_up(false);
        for (_, waiters) in self.waiters.drain() {
            for waiter in waiters {
                let _ = waiter.send(Err(down()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The interest state machine on its own: every order of add, remove, confirm, linger
    //! and connection loss the manager can see, without Redis.

    use super::*;
    use crate::config::RedisConfig;

    const LINGER: Duration = Duration::from_millis(100);

    fn interest() -> Interest {
        let config = RedisConfig { linger: LINGER, ..RedisConfig::default() };
        let mut i = Interest::new(Arc::new(BrokerState::new(
            config,
            Arc::new(fanout_hub::Registry::new()),
            Arc::default(),
            Arc::default(),
            Vec::new(),
            crate::broker::Shard::default(),
        )));
        i.up = true;
        i
    }

    fn ch(s: &str) -> ChannelName {
        ChannelName::new(s).unwrap()
    }

    /// An interest in `channel` that Redis has confirmed.
    fn subscribed_to(channel: &str) -> Interest {
        let mut i = interest();
        i.apply(InterestChange::Add(ch(channel)));
        i.pending.clear();
        i.confirmed(&[ch(channel)]);
        i
    }

    fn pending(i: &Interest) -> Vec<ChannelName> {
        let mut p: Vec<_> = i.pending.iter().cloned().collect();
        p.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        p
    }

    fn ready(i: &mut Interest, channel: &str) -> oneshot::Receiver<Result<(), BrokerError>> {
        let (tx, rx) = oneshot::channel();
        i.apply(InterestChange::Ready(ch(channel), tx));
        rx
    }

    #[test]
    fn add_subscribes_once_and_remove_lingers_until_due() {
        let mut i = interest();
        i.apply(InterestChange::Add(ch("a")));
        assert_eq!(pending(&i), [ch("a")]);
        i.pending.clear();
        i.confirmed(&[ch("a")]);
        assert!(i.subscribed.contains("a"));
        let removed_at = Instant::now();
        i.apply(InterestChange::Remove(ch("a")));
        assert!(i.take_due(removed_at).is_empty(), "unsubscribed before the linger ran out");
        assert_eq!(i.take_due(removed_at + LINGER * 2), [ch("a")]);
        assert!(!i.subscribed.contains("a"));
        assert!(i.take_due(removed_at + LINGER * 3).is_empty(), "unsubscribed twice");
    }

    #[test]
    fn remove_then_add_within_the_linger_keeps_the_subscription() {
        let mut i = subscribed_to("a");
        let t0 = Instant::now();
        i.apply(InterestChange::Remove(ch("a")));
        i.apply(InterestChange::Add(ch("a")));
        assert!(pending(&i).is_empty(), "already subscribed: nothing to send");
        assert!(i.take_due(t0 + LINGER * 2).is_empty(), "a wanted channel was unsubscribed");
        assert!(i.subscribed.contains("a") && i.wanted.contains("a"));
    }

    #[test]
    fn a_stale_linger_entry_does_not_unsubscribe_a_later_removal_early() {
        let mut i = subscribed_to("a");
        let t0 = Instant::now();
        i.apply(InterestChange::Remove(ch("a")));
        i.apply(InterestChange::Add(ch("a")));
        std::thread::sleep(Duration::from_millis(5));
        i.apply(InterestChange::Remove(ch("a")));
        let second = *i.lingering.get("a").unwrap();
        assert!(second > t0 + LINGER);
        assert!(i.take_due(t0 + LINGER).is_empty(), "the first, withdrawn removal fired");
        assert_eq!(i.take_due(second), [ch("a")]);
    }

    #[test]
    fn add_and_remove_before_the_subscribe_went_out_send_nothing() {
        let mut i = interest();
        i.apply(InterestChange::Add(ch("a")));
        i.apply(InterestChange::Remove(ch("a")));
        assert!(pending(&i).is_empty());
        assert!(i.take_due(Instant::now() + LINGER * 2).is_empty());
    }

    #[test]
    fn ready_waits_for_the_confirmation_and_fails_when_interest_goes() {
        let mut i = interest();
        let mut not_wanted = ready(&mut i, "x");
        assert!(matches!(not_wanted.try_recv(), Ok(Err(_))));
        i.apply(InterestChange::Add(ch("a")));
        i.apply(InterestChange::Add(ch("b")));
        let mut a = ready(&mut i, "a");
        let mut b = ready(&mut i, "b");
        assert!(a.try_recv().is_err(), "answered before Redis confirmed");
        i.confirmed(&[ch("a")]);
        assert_eq!(a.try_recv(), Ok(Ok(())));
        i.apply(InterestChange::Remove(ch("b")));
        assert!(matches!(b.try_recv(), Ok(Err(_))));
        assert_eq!(ready(&mut i, "a").try_recv(), Ok(Ok(())));
    }

    #[test]
    fn a_refused_channel_fails_ready_at_once_until_asked_for_again() {
        let mut i = interest();
        i.apply(InterestChange::Add(ch("a")));
        let mut waiting = ready(&mut i, "a");
        let error = redis::RedisError::from((redis::ErrorKind::Client, "NOPERM"));
        i.refused(&[ch("a")], &error);
        assert!(matches!(waiting.try_recv(), Ok(Err(_))));
        assert!(matches!(ready(&mut i, "a").try_recv(), Ok(Err(_))));
        i.apply(InterestChange::Remove(ch("a")));
        i.apply(InterestChange::Add(ch("a")));
        assert!(ready(&mut i, "a").try_recv().is_err(), "a fresh interest waits for its subscription");
    }

    #[test]
    fn losing_the_connection_resubscribes_everything_wanted_and_fails_waiters() {
        let mut i = interest();
        for c in ["a", "b", "c"] {
            i.apply(InterestChange::Add(ch(c)));
        }
        i.pending.clear();
        i.confirmed(&[ch("a"), ch("b")]);
        i.apply(InterestChange::Remove(ch("b")));
        let mut c = ready(&mut i, "c");
        i.go_down();
        assert!(matches!(c.try_recv(), Ok(Err(_))));
        assert_eq!(pending(&i), [ch("a"), ch("c")], "wanted channels, and only those, are subscribed again");
        assert!(i.subscribed.is_empty() && i.lingering.is_empty() && i.linger_queue.is_empty());
        assert!(matches!(ready(&mut i, "a").try_recv(), Ok(Err(_))), "ready while down must fail at once");
    }
}
