//! The direct-Redis transport: `PUBLISH {prefix}{channel} <envelope>` (or, for stored and
//! idempotent publishing, `FCALL fanout_publish`), on one Redis, on the shard of each
//! channel among independent Redis servers (the gateway's `redis_shards`: shard
//! `key_slot(prefix + channel) % count`), or on a Redis Cluster with `SPUBLISH` (the
//! gateway's `redis_cluster`). Connections open lazily and are replaced after a
//! connection-level failure.

use std::{future::Future, sync::Mutex, time::Duration};

use fanout_protocol::{encode_envelope, now_micros, redis_channel, shard_of, Encoding};
use redis::{
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::ClusterClient,
    cluster_async::ClusterConnection,
    AsyncConnectionConfig, RetryMethod,
};

use crate::PublishError;

/// Where publications go.
pub(crate) enum Topology {
    /// One Redis, or independent shards in the gateways' order.
    Shards(Vec<String>),
    /// A Redis Cluster's seed nodes.
    Cluster(Vec<String>),
}

/// A connection opened on first use, shared while it works, replaced after it broke.
struct Lazy<C> {
    conn: Mutex<Option<C>>,
    /// Serialises reconnects so a burst of failing publishes opens one connection, not many.
    connecting: tokio::sync::Mutex<()>,
}

impl<C: Clone> Lazy<C> {
    fn new() -> Self {
        Self { conn: Mutex::new(None), connecting: tokio::sync::Mutex::new(()) }
    }

    fn cached(&self) -> Option<C> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn get<F: Future<Output = redis::RedisResult<C>>>(&self, open: F) -> redis::RedisResult<C> {
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let _one_at_a_time = self.connecting.lock().await;
        if let Some(c) = self.cached() {
            return Ok(c);
        }
        let conn = open.await?;
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    fn reset(&self) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// The connection a channel's command goes on, whichever kind it is.
struct AnyConn(Box<dyn ConnectionLike + Send>);

impl ConnectionLike for AnyConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        self.0.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        self.0.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

enum Targets {
    Shards(Vec<(redis::Client, Lazy<MultiplexedConnection>)>),
    // Boxed: a cluster client is large, and there is one per publisher.
    Cluster(Box<(ClusterClient, Lazy<ClusterConnection>)>),
}

pub(crate) struct RedisTransport {
    targets: Targets,
    prefix: String,
    timeout: Duration,
}

impl RedisTransport {
    pub(crate) fn new(topology: Topology, prefix: String, timeout: Duration) -> Result<Self, PublishError> {
        let invalid = |e: redis::RedisError| PublishError::Config(format!("Redis URL: {e}"));
        let targets = match topology {
            Topology::Shards(urls) if urls.is_empty() => return Err(PublishError::Config("no Redis URL".into())),
            Topology::Shards(urls) => Targets::Shards(
                urls.iter()
                    .map(|u| Ok((redis::Client::open(u.as_str()).map_err(invalid)?, Lazy::new())))
                    .collect::<Result<_, PublishError>>()?,
            ),
            Topology::Cluster(seeds) => Targets::Cluster(Box::new((
                ClusterClient::builder(seeds)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .build()
                    .map_err(invalid)?,
                Lazy::new(),
            ))),
        };
        Ok(Self { targets, prefix, timeout })
    }

    /// Opens every connection now (each shard, or the cluster), so a wrong address or
    /// password shows at once.
    pub(crate) async fn connect(&self) -> Result<(), PublishError> {
        match &self.targets {
            Targets::Shards(shards) => {
                for shard in 0..shards.len() {
                    self.shard(shard).await?;
                }
                Ok(())
            }
            Targets::Cluster(..) => self.cluster().await.map(drop),
        }
    }

    async fn shard(&self, index: usize) -> Result<MultiplexedConnection, PublishError> {
        let Targets::Shards(shards) = &self.targets else { unreachable!("only called with shards") };
        let (client, lazy) = &shards[index];
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        lazy.get(client.get_multiplexed_async_connection_with_config(&config)).await.map_err(|e| self.fail(e))
    }

    async fn cluster(&self) -> Result<ClusterConnection, PublishError> {
        let Targets::Cluster(cluster) = &self.targets else { unreachable!("only called on a cluster") };
        let (client, lazy) = &**cluster;
        lazy.get(client.get_async_connection()).await.map_err(|e| self.fail(e))
    }

    /// Runs `attempt` on the connection that carries `channel`, within the timeout.
    async fn on_channel<T, F, Fut>(&self, channel: &str, attempt: F) -> Result<T, PublishError>
    where
        F: FnOnce(AnyConn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let run = async {
            let conn: Box<dyn ConnectionLike + Send> = match &self.targets {
                Targets::Shards(shards) => {
                    Box::new(self.shard(shard_of(&redis_channel(&self.prefix, channel), shards.len())).await?)
                }
                Targets::Cluster(..) => Box::new(self.cluster().await?),
            };
            attempt(AnyConn(conn)).await.map_err(|e| self.fail(e))
        };
        tokio::time::timeout(self.timeout, run).await.map_err(|_| {
            // A silent server may leave requests queued on the connection; start afresh.
            self.drop_connections();
            PublishError::Timeout(self.timeout)
        })?
    }

    /// One attempt at publishing every `(channel, enc, data)`, each in its own envelope,
    /// all stamped with one `ts` (a broadcast is one publication, entered at one moment,
    /// whichever channels carry it; the HTTP API stamps it the same way): one pipeline per
    /// shard, or on a cluster one `SPUBLISH` per channel (a pipeline there would have to
    /// stay in one slot), all in flight together.
    pub(crate) async fn publish<'a>(
        &self,
        items: impl Iterator<Item = (&'a str, Encoding, &'a [u8])>,
    ) -> Result<(), PublishError> {
        let ts = now_micros();
        let command = if matches!(self.targets, Targets::Cluster(..)) { "SPUBLISH" } else { "PUBLISH" };
        let mut pipes: std::collections::BTreeMap<usize, (String, redis::Pipeline)> = Default::default();
        for (i, (channel, enc, data)) in items.enumerate() {
            let key = redis_channel(&self.prefix, channel);
            let group = match &self.targets {
                Targets::Shards(shards) => shard_of(&key, shards.len()),
                Targets::Cluster(..) => i,
            };
            let (_, pipe) = pipes.entry(group).or_insert_with(|| (channel.to_owned(), redis::pipe()));
            pipe.cmd(command).arg(key).arg(encode_envelope(ts, enc, data)).ignore();
        }
        let each = pipes.values().map(|(channel, pipe)| {
            self.on_channel(channel, move |mut conn| async move { pipe.query_async::<()>(&mut conn).await })
        });
        futures_util::future::join_all(each).await.into_iter().collect()
    }

    /// One attempt at `FCALL fanout_publish 1 {prefix}{channel} ENVELOPE [KEY]`: stored in
    /// the channel's history when its namespace keeps one; the offset, 0 outside history.
    pub(crate) async fn publish_stored(
        &self,
        channel: &str,
        enc: Encoding,
        data: &[u8],
        key: Option<&str>,
    ) -> Result<u64, PublishError> {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("fanout_publish").arg(1).arg(redis_channel(&self.prefix, channel)).arg(encode_envelope(
            now_micros(),
            enc,
            data,
        ));
        if let Some(key) = key {
            cmd.arg(key);
        }
        self.on_channel(channel, |mut conn| async move { cmd.query_async::<u64>(&mut conn).await }).await
    }

    fn drop_connections(&self) {
        match &self.targets {
            Targets::Shards(shards) => shards.iter().for_each(|(_, lazy)| lazy.reset()),
            // A cluster connection mends itself.
            Targets::Cluster(..) => {}
        }
    }

    fn fail(&self, e: redis::RedisError) -> PublishError {
        if e.is_unrecoverable_error() || e.is_io_error() {
            self.drop_connections();
        }
        if e.is_timeout() {
            return PublishError::Timeout(self.timeout);
        }
        match e.retry_method() {
            RetryMethod::NoRetry => PublishError::Rejected {
                status: None,
                code: e.code().unwrap_or("ERR").to_owned(),
                message: e.detail().map_or_else(|| e.to_string(), str::to_owned),
            },
            _ => PublishError::Unavailable { status: None, reason: e.to_string() },
        }
    }
}
