//! Presence through Redis: this node's joins and leaves go, in order, through one bounded
//! queue to the `fanout_presence_*` Functions (which also publish join/leave events, when
//! the namespace wants them and the channel's event budget allows); a refresher re-adds
//! every local entry with a new expiry, so entries of a node that died expire within
//! `presence_ttl` and a Redis that lost them has them back within a refresh.

use std::{sync::Arc, time::Duration};

use fanout_hub::{BrokerError, PresencePolicy};
use fanout_protocol::{
    encode_event_envelope, now_micros, ChannelName, PresenceEvent, PresenceList, PresenceStats, Present,
    MAX_PRESENCE_LIST,
};
use redis::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::BrokerState;

/// Presence changes waiting to reach Redis at most; beyond, they are dropped and counted
/// (the next refresh re-adds a dropped join; a dropped leave expires with its entry).
pub(crate) const QUEUE: usize = 10_000;

/// Presence changes sent in one pipeline at most.
const BATCH: usize = 512;

/// A join or a leave on its way to Redis.
pub(crate) struct PresenceOp {
    pub(crate) event: PresenceEvent,
    pub(crate) channel: ChannelName,
    pub(crate) client: String,
    pub(crate) user: String,
    pub(crate) policy: PresencePolicy,
}

fn now_ms() -> u64 {
    now_micros() / 1000
}

/// Entries expire `ttl` after their last refresh; the keys outlive them, so a slow refresh
/// never loses the counts.
fn expiry(policy: PresencePolicy) -> (u64, u64) {
    let ttl = policy.ttl.as_millis() as u64;
    (now_ms() + ttl, ttl * 2)
}

impl BrokerState {
    fn key(&self, channel: &ChannelName) -> String {
        fanout_protocol::redis_channel(&self.config.prefix, channel.as_str())
    }

    /// The join/leave event envelope, or `""` when none is to be sent.
    fn event(
        &self,
        channel: &ChannelName,
        policy: PresencePolicy,
        ev: PresenceEvent,
        client: &str,
        user: &str,
    ) -> Vec<u8> {
        if !policy.join_leave {
            return Vec::new();
        }
        if !self.event_budget.take(channel) {
            self.metrics.presence_events_dropped.increment(1);
            return Vec::new();
        }
        encode_event_envelope(now_micros(), ev, client, user)
    }

    /// Sends `ops` in order as one pipeline: a burst of joins costs one round trip per
    /// batch, not one per join.
    async fn apply(&self, ops: Vec<PresenceOp>) -> Result<(), BrokerError> {
        let mut pipe = redis::pipe();
        for op in ops {
            pipe.add_command(self.command(op)).ignore();
        }
        self.publisher.run_pipe(self, &pipe, "presence").await
    }

    fn command(&self, op: PresenceOp) -> redis::Cmd {
        let PresenceOp { event, channel, client, user, policy } = op;
        let envelope = self.event(&channel, policy, event, &client, &user);
        let mut cmd = redis::cmd("FCALL");
        match event {
            PresenceEvent::Join => {
                let (expires, keep) = expiry(policy);
                cmd.arg("fanout_presence_join").arg(1).arg(self.key(&channel)).arg(&client).arg(&user);
                cmd.arg(expires).arg(keep).arg(envelope);
            }
            PresenceEvent::Leave => {
                cmd.arg("fanout_presence_leave").arg(1).arg(self.key(&channel)).arg(&client).arg(envelope);
            }
        }
        cmd
    }

    /// Re-adds every local entry with a fresh expiry, one call per channel.
    async fn refresh_presence(&self) {
        for (channel, clients) in self.presence_local.snapshot_with_users() {
            let Some(policy) = self.presences.of(channel.as_str()) else { continue };
            let (expires, keep) = expiry(policy);
            for chunk in clients.chunks(500) {
                let mut cmd = redis::cmd("FCALL");
                cmd.arg("fanout_presence_refresh").arg(1).arg(self.key(&channel)).arg(expires).arg(keep);
                for (client, user) in chunk {
                    cmd.arg(client).arg(user);
                }
                if let Err(e) = self.publisher.fcall::<i64>(self, &cmd, "presence refresh").await {
                    tracing::debug!(%channel, error = %e, "presence refresh failed; retried at the next one");
                }
            }
        }
        self.metrics.presence_entries.set(self.presence_local.entries() as f64);
    }

    pub(crate) async fn presence_list(&self, channel: &ChannelName) -> Result<PresenceList, BrokerError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("fanout_presence").arg(1).arg(self.key(channel)).arg(now_ms()).arg(MAX_PRESENCE_LIST);
        let reply: Value = self.publisher.fcall(self, &cmd, "presence").await?;
        let Value::Array(items) = reply else {
            return Err(BrokerError::Unavailable("unexpected presence reply".into()));
        };
        let mut items = items.into_iter();
        let total: u64 = items.next().and_then(|v| redis::from_redis_value(v).ok()).unwrap_or(0);
        let mut clients = Vec::new();
        while let (Some(c), Some(u)) = (items.next(), items.next()) {
            let (Ok(client), Ok(user)) = (redis::from_redis_value::<String>(c), redis::from_redis_value::<String>(u))
            else {
                continue;
            };
            clients.push(Present { client, user });
        }
        let truncated = total > clients.len() as u64;
        Ok(PresenceList { clients, truncated })
    }

    pub(crate) async fn presence_counts(&self, channel: &ChannelName) -> Result<PresenceStats, BrokerError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("fanout_presence_stats").arg(1).arg(self.key(channel)).arg(now_ms());
        let (clients, users): (u64, u64) = self.publisher.fcall(self, &cmd, "presence stats").await?;
        Ok(PresenceStats { clients, users })
    }
}

/// Sends queued presence changes to Redis in order, and refreshes every `refresh`.
pub(crate) async fn run(
    shared: Arc<BrokerState>,
    mut ops: mpsc::Receiver<PresenceOp>,
    refresh: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(refresh);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            op = ops.recv() => match op {
                Some(op) => {
                    // Everything queued behind it goes in the same pipeline, in order.
                    let mut batch = vec![op];
                    while batch.len() < BATCH {
                        match ops.try_recv() {
                            Ok(op) => batch.push(op),
                            Err(_) => break,
                        }
                    }
                    if let Err(e) = shared.apply(batch).await {
                        tracing::debug!(error = %e, "presence changes did not reach Redis; the next refresh repairs joins");
                    }
                }
                None => return,
            },
            _ = tick.tick() => if shared.is_up() {
                shared.refresh_presence().await;
            },
        }
    }
}
