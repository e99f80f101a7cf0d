//! The pub/sub side of one Redis connection, in its two shapes: classic pub/sub on one
//! Redis (`SUBSCRIBE`, a RESP2 pub/sub connection), or sharded pub/sub on a Redis Cluster
//! (`SSUBSCRIBE` over the cluster connection, RESP3 pushes). The manager drives both
//! through the same three calls; dialing them is here too.

use std::{collections::BTreeMap, sync::Arc};

use redis::{
    aio::{PubSubSink, PubSubStream},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo},
    PushInfo, RedisResult,
};
use tokio::{sync::mpsc, time::timeout};

use crate::{
    broker::BrokerState,
    conn::Conn,
    functions::{self, Loaded},
};

/// What the reader reads: a pub/sub stream, or a cluster connection's pushes.
pub(crate) enum Source {
    Stream(PubSubStream),
    Pushes(mpsc::UnboundedReceiver<PushInfo>),
}

pub(crate) enum PubSub {
    Single(PubSubSink),
    Cluster(ClusterConnection),
}

impl PubSub {
    /// Subscribes Redis channels. On a cluster, `keys` must share one slot (`SSUBSCRIBE`
    /// takes channels of one slot only).
    pub(crate) async fn subscribe(&mut self, keys: &[String]) -> RedisResult<()> {
        match self {
            Self::Single(sink) => sink.subscribe(keys).await,
            Self::Cluster(conn) => conn.ssubscribe(keys).await,
        }
    }

    /// A cluster's connection, to subscribe several slots' channels at once.
    pub(crate) fn cluster(&self) -> Option<&ClusterConnection> {
        match self {
            Self::Single(_) => None,
            Self::Cluster(conn) => Some(conn),
        }
    }

    pub(crate) async fn unsubscribe(&mut self, keys: &[String]) -> RedisResult<()> {
        match self {
            Self::Single(sink) => sink.unsubscribe(keys).await,
            // SUNSUBSCRIBE, like SSUBSCRIBE, takes channels of one slot.
            Self::Cluster(conn) => {
                let groups = by_slot(keys, |key| fanout_protocol::key_slot(key.as_bytes()));
                let each = groups.into_iter().map(|group| {
                    let mut conn = conn.clone();
                    async move { conn.sunsubscribe(group).await }
                });
                futures_util::future::join_all(each).await.into_iter().collect()
            }
        }
    }

    /// Proves the connection alive. On a cluster `CLIENT INFO` goes to every master (on
    /// the connection that holds our subscriptions there) and the answer counts them; when
    /// a master fails but some node still answers, the cluster connection is kept (it
    /// reconnects and follows failovers on its own, and only that master's channels are
    /// affected): [`Ping::Partial`].
    pub(crate) async fn ping(&mut self) -> RedisResult<Ping> {
        match self {
            Self::Single(sink) => sink.ping::<redis::Value>().await.map(|_| Ping::Alive),
            Self::Cluster(conn) => {
                let info = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let mut cmd = redis::cmd("CLIENT");
                cmd.arg("INFO");
                match conn.route_command(cmd, info).await {
                    Ok(redis::Value::Map(replies)) if !replies.is_empty() => {
                        let counts: Option<Vec<u64>> =
                            replies.iter().map(|(_, reply)| shard_subscriptions(reply)).collect();
                        match counts {
                            Some(counts) => Ok(Ping::Cluster { subscriptions: counts.iter().sum() }),
                            None => Ok(Ping::Partial),
                        }
                    }
                    _ => conn
                        .route_command(redis::cmd("PING"), RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random))
                        .await
                        .map(|_| Ping::Partial),
                }
            }
        }
    }
}

/// What a heartbeat found.
pub(crate) enum Ping {
    /// The one Redis answered.
    Alive,
    /// Every master answered, holding this many shard-channel subscriptions of ours.
    Cluster { subscriptions: u64 },
    /// Some of the cluster answered, not all of it.
    Partial,
}

/// `ssub=N` from one node's `CLIENT INFO`; `None` for an error or anything unexpected.
fn shard_subscriptions(reply: &redis::Value) -> Option<u64> {
    let text = match reply {
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?,
        redis::Value::VerbatimString { text, .. } => text.as_str(),
        redis::Value::SimpleString(s) => s.as_str(),
        _ => return None,
    };
    text.split_whitespace().find_map(|f| f.strip_prefix("ssub=")?.parse().ok())
}

/// `items` grouped by the cluster slot `slot` gives each, keeping their order within a
/// group: what one `SSUBSCRIBE`, `SUNSUBSCRIBE` or pipeline may carry on a cluster.
pub(crate) fn by_slot<T>(items: impl IntoIterator<Item = T>, slot: impl Fn(&T) -> u16) -> Vec<Vec<T>> {
    let mut groups: BTreeMap<u16, Vec<T>> = BTreeMap::new();
    for item in items {
        groups.entry(slot(&item)).or_default().push(item);
    }
    groups.into_values().collect()
}

/// A freshly dialed, answering server (or cluster).
pub(crate) struct Link {
    pub pubsub: PubSub,
    pub source: Source,
    pub publish: Conn,
    /// Safe to log.
    pub addr: String,
}

fn limited<T>(
    what: &str,
    limit: std::time::Duration,
    r: Result<RedisResult<T>, tokio::time::error::Elapsed>,
) -> Result<T, String> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("{what}: no answer within {limit:?}")),
    }
}

/// Opens the pub/sub and the publish connection to endpoint `index` and checks it answers.
pub(crate) async fn dial(shared: Arc<BrokerState>, index: usize) -> Result<Link, String> {
    let endpoint = &shared.endpoints[index];
    let config = &shared.config;
    let pubsub = limited(
        "connect",
        config.connect_timeout,
        timeout(config.connect_timeout, endpoint.client.get_async_pubsub()).await,
    )?;
    let (mut sink, stream) = pubsub.split();
    // A stopped server still completes the TCP handshake: only an answer proves it is alive.
    limited("PING", config.command_timeout, timeout(config.command_timeout, sink.ping::<redis::Value>()).await)?;
    let connect = endpoint.client.get_multiplexed_async_connection_with_config(shared.publisher.connection_config());
    let mut publish = Conn::Single(limited(
        "publish connection",
        config.connect_timeout,
        timeout(config.connect_timeout, connect).await,
    )?);
    load_library(&shared, &mut publish, &endpoint.addr).await?;
    Ok(Link { pubsub: PubSub::Single(sink), source: Source::Stream(stream), publish, addr: endpoint.addr.clone() })
}

/// Connects to a Redis Cluster through its seed nodes: one connection per master, shared
/// by sharded pub/sub (RESP3 pushes) and commands.
pub(crate) async fn dial_cluster(shared: Arc<BrokerState>) -> Result<Link, String> {
    let config = &shared.config;
    let seeds = shared.endpoints.iter().map(|e| e.client.get_connection_info().clone());
    let (pushes, source) = mpsc::unbounded_channel();
    let mut builder = ClusterClientBuilder::new(seeds)
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(pushes)
        .connection_timeout(config.connect_timeout)
        .response_timeout(config.publish_timeout);
    if let Some(password) = &config.password {
        builder = builder.password(password.clone());
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    let conn = limited(
        "cluster connect",
        config.connect_timeout,
        timeout(config.connect_timeout, client.get_async_connection()).await,
    )?;
    let mut pubsub = PubSub::Cluster(conn.clone());
    limited("PING", config.command_timeout, timeout(config.command_timeout, pubsub.ping()).await)?;
    let addr = format!("cluster({})", shared.endpoints.iter().map(|e| e.addr.as_str()).collect::<Vec<_>>().join(","));
    let mut publish = Conn::Cluster(conn.clone());
    load_library(&shared, &mut publish, &addr).await?;
    Ok(Link { pubsub, source: Source::Pushes(source), publish, addr })
}

/// On every connection: a Redis that restarted empty has lost the library. On a cluster
/// it goes to every master (a master promoted or added since may lack it).
async fn load_library(shared: &BrokerState, publish: &mut Conn, addr: &str) -> Result<(), String> {
    let limit = shared.config.command_timeout;
    let force = publish.is_cluster();
    match timeout(limit, functions::ensure_loaded(publish, &shared.library, force)).await {
        Ok(Ok(Loaded::Newer(version))) => {
            tracing::info!(version, ours = functions::VERSION, "a newer fanout Function library is loaded; using it")
        }
        Ok(Ok(loaded)) => tracing::debug!(?loaded, "fanout Function library"),
        // Plain publishing works without it; history and idempotency keys do not.
        Ok(Err(e)) => tracing::warn!(redis = %addr, error = %e,
            "cannot load the fanout Function library (Redis 7 or later is needed): history and idempotency keys will fail"),
        Err(_) => return Err(format!("no answer to FUNCTION LOAD within {limit:?}")),
    }
    Ok(())
}
