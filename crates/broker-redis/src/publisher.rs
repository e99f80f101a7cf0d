//! The command connection: `PUBLISH` and the Function library calls (stored and idempotent
//! publishing, history reads) over one multiplexed connection shared by the whole node.

use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use fanout_hub::{BrokerError, HistoryPolicy, Published};
use fanout_protocol::{
    decode_envelope, encode_envelope, ChannelName, HistoryPage, HistoryQuery, Position, Publication, IDEMPOTENCY_WINDOW,
};
use redis::{AsyncConnectionConfig, RedisError, Value};

use crate::{broker::BrokerState, config::RedisConfig, conn::Conn, functions};

/// The live command connection. The manager installs a fresh one with every pub/sub
/// connection; a publish that finds the connection broken drops it and the next publish
/// dials again, so a connection killed on its own (`CLIENT KILL`) heals without waiting
/// for the heartbeat.
pub(crate) struct PublishConnection {
    /// With a generation, so a failed publish only discards the connection it failed on.
    slot: Mutex<Option<(u64, Conn)>>,
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

    pub(crate) fn install(&self, connection: Option<Conn>) {
        let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = connection.map(|c| (generation, c));
    }

    fn current(&self) -> Option<(u64, Conn)> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn discard(&self, generation: u64) {
        let mut slot = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
    }

    async fn dial(&self, shared: &BrokerState) -> Result<(u64, Conn), BrokerError> {
        let _dialing = self.dialing.lock().await;
        if let Some(current) = self.current() {
            return Ok(current);
        }
        // A cluster connection is made (and mended) by the manager alone.
        if shared.sharded_pubsub() {
            return Err(BrokerError::Unavailable("Redis Cluster is not connected".into()));
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
        self.install(Some(Conn::Single(connection)));
        self.current().ok_or_else(|| BrokerError::Unavailable("Redis is not connected".into()))
    }

    /// The command that publishes `p`: a plain `PUBLISH` (`SPUBLISH` on a cluster) outside
    /// history namespaces without an idempotency key (the fast path); otherwise
    /// `fanout_node_publish`, which checks the key, stores the publication in its channel's
    /// history and publishes it in one atomic step.
    fn publish_cmd(shared: &BrokerState, p: &Publication, key: Option<&str>) -> (redis::Cmd, bool) {
        let channel = fanout_protocol::redis_channel(&shared.config.prefix, p.channel.as_str());
        let envelope = encode_envelope(p.ts, p.enc, &p.data);
        let policy = shared.histories.of(p.channel.as_str());
        if policy.is_none() && key.is_none() {
            let mut cmd = redis::cmd(shared.publish_command());
            cmd.arg(&channel).arg(envelope);
            return (cmd, false);
        }
        let policy = policy.unwrap_or(HistoryPolicy { size: 0, ttl: std::time::Duration::ZERO });
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("fanout_node_publish")
            .arg(1)
            .arg(&channel)
            .arg(envelope)
            .arg(policy.size)
            .arg(policy.ttl.as_secs().max(1))
            .arg(key.unwrap_or(""))
            .arg(IDEMPOTENCY_WINDOW.as_secs());
        (cmd, true)
    }

    /// What `fanout_node_publish` answered: `[offset, epoch, duplicate]`.
    fn stored(answer: (u64, String, i64)) -> Published {
        let (offset, epoch, duplicate) = answer;
        Published { duplicate: duplicate == 1, position: (offset > 0).then(|| Position::new(offset, &epoch)) }
    }

    pub(crate) async fn publish(
        &self,
        shared: &BrokerState,
        p: &Publication,
        key: Option<&str>,
    ) -> Result<Published, BrokerError> {
        let (cmd, function) = Self::publish_cmd(shared, p, key);
        if !function {
            self.run::<()>(shared, &cmd, shared.publish_command()).await?;
            return Ok(Published::default());
        }
        Ok(Self::stored(self.fcall::<(u64, String, i64)>(shared, &cmd, "fanout_node_publish").await?))
    }

    /// Many publications as one pipeline, in order, so a channel's keep their order and the
    /// whole batch costs one round trip. On a cluster a pipeline must stay within one slot:
    /// one per slot, all in flight together (a channel's publications share its slot).
    pub(crate) async fn publish_batch(
        &self,
        shared: &BrokerState,
        batch: &[(Publication, Option<String>)],
    ) -> Vec<Result<Published, BrokerError>> {
        let groups: Vec<Vec<usize>> = if shared.sharded_pubsub() {
            let prefix = shared.config.prefix.as_str();
            crate::link::by_slot(0..batch.len(), |&i| {
                fanout_protocol::key_slot(
                    fanout_protocol::redis_channel(prefix, batch[i].0.channel.as_str()).as_bytes(),
                )
            })
        } else {
            vec![(0..batch.len()).collect()]
        };
        let each = groups.iter().map(|group| self.publish_group(shared, batch, group));
        let answers = futures_util::future::join_all(each).await;
        in_batch_order(batch.len(), &groups, answers)
    }

    /// One pipeline of `batch[i]` for every `i` in `group`, in that order.
    async fn publish_group(
        &self,
        shared: &BrokerState,
        batch: &[(Publication, Option<String>)],
        group: &[usize],
    ) -> Vec<Result<Published, BrokerError>> {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut functions = Vec::with_capacity(group.len());
        for &i in group {
            let (p, key) = &batch[i];
            let (cmd, function) = Self::publish_cmd(shared, p, key.as_deref());
            pipe.add_command(cmd);
            functions.push(function);
        }
        let answers = match self.run_raw::<Vec<redis::RedisResult<Value>>>(shared, Query::Pipe(&pipe)).await {
            Ok(answers) if answers.len() == group.len() => answers,
            other => {
                let failure = other
                    .err()
                    .unwrap_or_else(|| Failure::Broker(BrokerError::Unavailable("a pipeline answered short".into())));
                let e = Self::failed(shared, failure, "publish pipeline");
                return group.iter().map(|_| Err(e.clone())).collect();
            }
        };
        let mut out = Vec::with_capacity(group.len());
        for ((cmd, function), answer) in pipe.cmd_iter().zip(functions).zip(answers) {
            out.push(match answer {
                Ok(_) if !function => Ok(Published::default()),
                Ok(value) => redis::from_redis_value::<(u64, String, i64)>(value).map(Self::stored).map_err(|e| {
                    shared.metrics.errors.publish.increment(1);
                    BrokerError::Unavailable(format!("fanout_node_publish answered: {e}"))
                }),
                // The library was lost (Redis restarted empty): reloaded and called again by
                // itself. Only keyed publications on a plain channel could then land after
                // unkeyed ones of the same batch; a history channel's all go this way.
                Err(e) if functions::is_missing_function(&e) => {
                    self.fcall::<(u64, String, i64)>(shared, cmd, "fanout_node_publish").await.map(Self::stored)
                }
                Err(e) => Err(Self::failed(shared, Failure::Redis(e), "publish")),
            });
        }
        out
    }

    /// Reads a channel's history through `fanout_history`.
    pub(crate) async fn history(
        &self,
        shared: &BrokerState,
        channel: &ChannelName,
        query: &HistoryQuery,
        policy: HistoryPolicy,
    ) -> Result<HistoryPage, BrokerError> {
        let key = fanout_protocol::redis_channel(&shared.config.prefix, channel.as_str());
        let (since_epoch, since_offset) = match &query.since {
            Some(s) => (&*s.epoch, s.offset),
            None => ("", 0),
        };
        let mut cmd = redis::cmd("FCALL");
        cmd.arg("fanout_history")
            .arg(1)
            .arg(&key)
            .arg(policy.size)
            .arg(policy.ttl.as_secs().max(1))
            .arg(since_epoch)
            // Beyond 2^53 Lua numbers lose precision; such a `since` is ahead of any top.
            .arg(since_offset.min(1 << 53))
            .arg(query.limit.map_or(-1, |l| l as i64));
        let reply = self.fcall::<Value>(shared, &cmd, "fanout_history").await?;
        let page = parse_history(shared, channel, reply)
            .ok_or_else(|| BrokerError::Unavailable("fanout_history returned an unexpected reply".into()))?;
        // A since in another epoch gets no publications (the Function compares epochs only
        // when asked for publications after one).
        Ok(page)
    }

    /// `FCALL` that reloads the library once when Redis lost it (restarted empty, or
    /// `FUNCTION FLUSH`) and tries again.
    pub(crate) async fn fcall<T: redis::FromRedisValue>(
        &self,
        shared: &BrokerState,
        cmd: &redis::Cmd,
        what: &str,
    ) -> Result<T, BrokerError> {
        match self.run_raw::<T>(shared, Query::Cmd(cmd)).await {
            Err(Failure::Redis(e)) if functions::is_missing_function(&e) => {
                let (_, mut connection) = match self.current() {
                    Some(c) => c,
                    None => self.dial(shared).await?,
                };
                let force = connection.is_cluster();
                match functions::ensure_loaded(&mut connection, &shared.library, force).await {
                    Ok(loaded) => tracing::info!(?loaded, "the fanout Function library was missing; loaded it"),
                    Err(e) => {
                        shared.metrics.errors.publish.increment(1);
                        return Err(BrokerError::Unavailable(format!("loading the fanout Function library: {e}")));
                    }
                }
                self.run::<T>(shared, cmd, what).await
            }
            other => self.finish(shared, other, what),
        }
    }

    /// A pipeline on the command connection, within `publish_timeout`. On a cluster its
    /// commands may belong to different slots (masters), so they go out one by one, all
    /// in flight together, rather than as one pipeline.
    pub(crate) async fn run_pipe(
        &self,
        shared: &BrokerState,
        pipe: &redis::Pipeline,
        what: &str,
    ) -> Result<(), BrokerError> {
        if !shared.sharded_pubsub() {
            let result = self.run_raw(shared, Query::Pipe(pipe)).await;
            return self.finish(shared, result, what);
        }
        let each = pipe.cmd_iter().map(|cmd| async move {
            let result = self.run_raw::<Value>(shared, Query::Cmd(cmd)).await;
            self.finish(shared, result, what).map(drop)
        });
        futures_util::future::join_all(each).await.into_iter().collect()
    }

    /// Runs `cmd` on the command connection, dialing it if needed, within `publish_timeout`.
    pub(crate) async fn run<T: redis::FromRedisValue>(
        &self,
        shared: &BrokerState,
        cmd: &redis::Cmd,
        what: &str,
    ) -> Result<T, BrokerError> {
        let result = self.run_raw(shared, Query::Cmd(cmd)).await;
        self.finish(shared, result, what)
    }

    async fn run_raw<T: redis::FromRedisValue>(&self, shared: &BrokerState, query: Query<'_>) -> Result<T, Failure> {
        let (generation, mut connection) = match self.current() {
            Some(c) => c,
            None => self.dial(shared).await.map_err(Failure::Broker)?,
        };
        let answer = async {
            match query {
                Query::Cmd(cmd) => cmd.query_async::<T>(&mut connection).await,
                Query::Pipe(pipe) => pipe.query_async::<T>(&mut connection).await,
            }
        };
        // The connection's own response timeout should fire first; this one also bounds the
        // time spent queued behind other requests on the multiplexed connection.
        match tokio::time::timeout(shared.config.publish_timeout, answer).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                // A cluster connection mends itself; a single one is dialed again.
                if is_connection_error(&e) && !connection.is_cluster() {
                    self.discard(generation);
                }
                Err(Failure::Redis(e))
            }
            Err(_) => Err(Failure::Broker(BrokerError::Timeout)),
        }
    }

    fn finish<T>(&self, shared: &BrokerState, result: Result<T, Failure>, what: &str) -> Result<T, BrokerError> {
        result.map_err(|failure| Self::failed(shared, failure, what))
    }

    /// Counts a failed command and says what failed.
    fn failed(shared: &BrokerState, failure: Failure, what: &str) -> BrokerError {
        shared.metrics.errors.publish.increment(1);
        match failure {
            Failure::Redis(e) if e.is_timeout() => BrokerError::Timeout,
            Failure::Redis(e) => BrokerError::Unavailable(format!("{what} failed: {e}")),
            Failure::Broker(e) => e,
        }
    }
}

/// The answers of `groups` (lists of indexes into a batch of `n`), answered group by
/// group, put back in batch order.
pub(crate) fn in_batch_order(
    n: usize,
    groups: &[Vec<usize>],
    answers: Vec<Vec<Result<Published, BrokerError>>>,
) -> Vec<Result<Published, BrokerError>> {
    let mut results: Vec<Option<Result<Published, BrokerError>>> = (0..n).map(|_| None).collect();
    for (group, answer) in groups.iter().zip(answers) {
        for (&i, r) in group.iter().zip(answer) {
            results[i] = Some(r);
        }
    }
    results.into_iter().map(|r| r.unwrap_or_else(|| Err(BrokerError::Unavailable("not published".into())))).collect()
}

/// What goes to Redis: one command, or a pipeline.
enum Query<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

/// Why a command failed: Redis answered with an error (or the connection broke), or the
/// broker gave up on its own (no connection, timeout).
enum Failure {
    Redis(RedisError),
    Broker(BrokerError),
}

/// `[top, epoch, [[id, [field, value, ...]], ...]]` into a page; entries that are not a
/// valid stored envelope are skipped and counted.
fn parse_history(shared: &BrokerState, channel: &ChannelName, reply: Value) -> Option<HistoryPage> {
    let Value::Array(parts) = reply else { return None };
    let mut parts = parts.into_iter();
    let top = match parts.next()? {
        Value::Int(n) => u64::try_from(n).ok()?,
        _ => return None,
    };
    let epoch: String = redis::from_redis_value(parts.next()?).ok()?;
    let entries = match parts.next()? {
        Value::Array(entries) => entries,
        Value::Nil => Vec::new(),
        _ => return None,
    };
    let mut publications = Vec::with_capacity(entries.len());
    for entry in entries {
        let Some(payload) = stored_envelope(entry) else {
            shared.metrics.invalid_envelope.increment(1);
            continue;
        };
        match decode_envelope(&payload) {
            Ok(e) => match e.position {
                Some((offset, epoch)) => publications.push(Publication {
                    channel: channel.clone(),
                    ts: e.ts,
                    enc: e.enc,
                    data: Bytes::copy_from_slice(e.data),
                    position: Some(Position::new(offset, epoch)),
                }),
                None => shared.metrics.invalid_envelope.increment(1),
            },
            Err(_) => shared.metrics.invalid_envelope.increment(1),
        }
    }
    Some(HistoryPage { top: Position::new(top, &epoch), publications })
}

/// The `d` field of one stream entry `[id, [field, value, ...]]`.
fn stored_envelope(entry: Value) -> Option<Vec<u8>> {
    let Value::Array(mut idf) = entry else { return None };
    let Value::Array(fields) = idf.pop()? else { return None };
    let mut fields = fields.into_iter();
    while let Some(name) = fields.next() {
        let value = fields.next()?;
        if matches!(&name, Value::BulkString(n) if n == b"d") {
            return match value {
                Value::BulkString(b) => Some(b),
                _ => None,
            };
        }
    }
    None
}

/// The connection itself is unusable (as opposed to Redis rejecting one command).
pub(crate) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error()
}
