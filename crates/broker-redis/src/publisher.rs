//! `PUBLISH` over one multiplexed connection shared by every publisher on the node.

use std::sync::{Mutex, PoisonError};

use fanout_hub::{BrokerError, Published};
use fanout_protocol::{encode_envelope, Publication, IDEMPOTENCY_WINDOW};
use redis::{aio::MultiplexedConnection, AsyncConnectionConfig, RedisError};

use crate::{broker::BrokerState, config::RedisConfig};

/// The live command connection. The manager installs a fresh one with every pub/sub
/// connection; a publish that finds the connection broken drops it and the next publish
/// dials again, so a connection killed on its own (`CLIENT KILL`) heals without waiting
/// for the heartbeat.
pub(crate) struct PublishConnection {
    /// With a generation, so a failed publish only discards the connection it failed on.
    slot: Mutex<Option<(u64, MultiplexedConnection)>>,
    generation: std::sync::atomic::AtomicU64,
    /// One dial at a time when the connection is missing, not one per waiting publisher.
    dialing: tokio::sync::Mutex<()>,
    config: AsyncConnectionConfig,
}

impl PublishConnection {
    pub(crate) fn new(config: &RedisConfig) -> Self {
        Self {
            slot: Mutex::new(None),
            generation: Default::default(),
            dialing: tokio::sync::Mutex::new(()),
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(Some(config.publish_timeout)),
        }
    }

    pub(crate) fn connection_config(&self) -> &AsyncConnectionConfig {
        &self.config
    }

    pub(crate) fn install(&self, connection: Option<MultiplexedConnection>) {
        let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = connection.map(|c| (generation, c));
    }

    fn current(&self) -> Option<(u64, MultiplexedConnection)> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn discard(&self, generation: u64) {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
    }

    async fn dial(&self, shared: &BrokerState) -> Result<(u64, MultiplexedConnection), BrokerError> {
        let _dialing = self.dialing.lock().await;
        if let Some(current) = self.current() {
            return Ok(current);
        }
        let (_, endpoint) = shared.endpoint();
        let connect = endpoint.client.get_multiplexed_async_connection_with_config(&self.config);
        let connection = match tokio::time::timeout(shared.config.connect_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                shared.metrics.errors.connect.increment(1);
                return Err(BrokerError::Unavailable(format!("connecting to Redis at {}: {e}", endpoint.addr)));
            }
            Err(_) => {
                shared.metrics.errors.connect.increment(1);
                return Err(BrokerError::Timeout);
            }
        };
        self.install(Some(connection));
        self.current().ok_or_else(|| BrokerError::Unavailable("Redis is not connected".into()))
    }

    pub(crate) async fn publish(&self, shared: &BrokerState, p: &Publication) -> Result<(), BrokerError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(fanout_protocol::redis_channel(&shared.config.prefix, p.channel.as_str()))
            .arg(encode_envelope(p.ts, p.enc, &p.data));
        self.run::<()>(shared, &cmd, "PUBLISH").await
    }

    /// `PUBLISH` unless `key` was seen on the channel within the idempotency window, as one
    /// script, so the check and the publish cannot be split by a failure or a race with
    /// another node. The key lives under the channel's hash tag (`{fanout:ch}:idem:KEY`),
    /// in the channel's slot on a Redis Cluster.
    pub(crate) async fn publish_once(
        &self,
        shared: &BrokerState,
        p: &Publication,
        key: &str,
    ) -> Result<Published, BrokerError> {
        let channel = fanout_protocol::redis_channel(&shared.config.prefix, p.channel.as_str());
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(PUBLISH_ONCE)
            .arg(1)
            .arg(format!("{{{channel}}}:idem:{key}"))
            .arg(&channel)
            .arg(encode_envelope(p.ts, p.enc, &p.data))
            .arg(IDEMPOTENCY_WINDOW.as_secs());
        let sent = self.run::<i64>(shared, &cmd, "idempotent PUBLISH").await?;
        Ok(if sent == 1 { Published::Sent } else { Published::Duplicate })
    }

    /// Runs `cmd` on the command connection, dialing it if needed, within `publish_timeout`.
    async fn run<T: redis::FromRedisValue>(
        &self,
        shared: &BrokerState,
        cmd: &redis::Cmd,
        what: &str,
    ) -> Result<T, BrokerError> {
        let (generation, mut connection) = match self.current() {
            Some(c) => c,
            None => self.dial(shared).await?,
        };
        // The connection's own response timeout should fire first; this one also bounds the
        // time spent queued behind other requests on the multiplexed connection.
        let result = tokio::time::timeout(shared.config.publish_timeout, cmd.query_async::<T>(&mut connection)).await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                shared.metrics.errors.publish.increment(1);
                if e.is_timeout() {
                    return Err(BrokerError::Timeout);
                }
                if is_connection_error(&e) {
                    self.discard(generation);
                }
                Err(BrokerError::Unavailable(format!("{what} failed: {e}")))
            }
            Err(_) => {
                shared.metrics.errors.publish.increment(1);
                Err(BrokerError::Timeout)
            }
        }
    }
}

/// KEYS[1]: the idempotency key; ARGV: Redis channel, envelope, window in seconds.
/// 1: published; 0: the key was already there, nothing published.
const PUBLISH_ONCE: &str = r"
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then
  redis.call('PUBLISH', ARGV[1], ARGV[2])
  return 1
end
return 0
";

/// The connection itself is unusable (as opposed to Redis rejecting one command).
pub(crate) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error()
}
