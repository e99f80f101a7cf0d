//! fanout's Redis broker: carries publications between nodes through Redis pub/sub.
//!
//! # How a node uses Redis
//!
//! With one Redis, each node keeps exactly two connections to it:
//!
//! * one **pub/sub connection**, on which the node `SUBSCRIBE`s `{prefix}{channel}` for
//!   every channel that has at least one local subscriber. The hub already reference-counts
//!   interest, so Redis sees one subscription per channel per node however many clients
//!   share it. Interest changes are batched: everything that queued up while the previous
//!   command was in flight goes out as one `SUBSCRIBE` (or `UNSUBSCRIBE`) with many
//!   channels. An unsubscribe lingers for [`RedisConfig::linger`] first, so a channel that
//!   flaps between zero and one subscriber costs nothing.
//! * one **multiplexed command connection** for `PUBLISH`, so a slow fan-out never delays
//!   a publish and a burst of publishes never delays the heartbeat.
//!
//! Publications read from the pub/sub connection go, in the order Redis sent them,
//! through a byte-bounded backlog ([`RedisConfig::backlog_bytes`]) to a delivery task that
//! decodes them and hands them to the [`fanout_hub::Registry`]. redis-rs buffers pub/sub
//! messages without bound, so the reader keeps that buffer empty and the backlog is where
//! a node that falls behind drops (and counts) publications instead of growing.
//!
//! # Outages
//!
//! A `PING` goes out on the pub/sub connection every [`RedisConfig::heartbeat_interval`]
//! and must be answered within [`RedisConfig::command_timeout`]; that catches a Redis that
//! still holds the TCP connection open but no longer answers (a stopped process, a network
//! partition). A connection that closes is noticed at once. Either way the broker reports
//! itself down ([`fanout_hub::Broker::is_up`], [`RedisBroker::status`], gauge
//! `fanout_broker_up`), fails `publish` and `ready` fast, reconnects with capped, jittered
//! exponential backoff, re-subscribes every channel still wanted and only then reports
//! itself up again. Clients stay connected throughout; they miss what was published while
//! Redis was unreachable (delivery is at most once).
//!
//! # Several URLs: failover lists, independent shards, Redis Cluster
//!
//! What several URLs mean is [`RedisConfig::topology`]:
//!
//! * [`Topology::Single`]: interchangeable endpoints of one Redis. The broker connects to
//!   the first that answers and, when that one fails, moves on to the next.
//! * [`Topology::Shards`]: independent Redis servers. [`ShardedBroker`] runs one broker
//!   per server and routes each channel to shard
//!   [`fanout_protocol::shard_of`]`({prefix}{channel}, count)`; the first shard also carries
//!   the control plane.
//! * [`Topology::Cluster`]: the seed nodes of a Redis Cluster. Channels ride sharded
//!   pub/sub: `SSUBSCRIBE` (one command per slot) and `SPUBLISH` reach only the master
//!   that owns the channel's slot, so adding masters adds capacity (classic `PUBLISH` on
//!   a cluster is broadcast to every node). One cluster connection (RESP3, one
//!   connection per master) carries subscriptions and commands; slot moves, failovers
//!   and lost subscriptions are followed as `link.rs` and `reader.rs` describe.
//!
//! # TLS and passwords
//!
//! `rediss://` URLs connect over TLS with rustls (ring) and the Mozilla root store.
//! [`RedisConfig::password`] sets (or overrides) the password of every URL, so a secret
//! need not be part of a URL that ends up in logs; URLs are never logged with credentials.
//!
//! # Metrics
//!
//! Per Redis connection, labelled `shard` (`"0"` with one Redis, the index with shards):
//! `fanout_broker_up`, `fanout_broker_channels` (channels subscribed in Redis),
//! `fanout_broker_reconnects_total`, `fanout_broker_resubscribe_duration_seconds`,
//! `fanout_broker_publications_received_total`,
//! `fanout_broker_errors_total{op="publish"|"subscribe"|"unsubscribe"|"ping"|"connect"}`
//! `fanout_broker_backlog_bytes`, and
//! `fanout_publications_dropped_total{reason="invalid_envelope"|"too_large"|"broker_backlog"}`.

mod backoff;
mod broker;
mod cluster;
mod config;
mod conn;
mod continuity;
mod error;
mod functions;
mod link;
mod manager;
mod metrics;
mod presence;
mod publisher;
mod reader;
mod sharded;

pub use broker::RedisBroker;
pub use config::{RedisConfig, Topology};
pub use error::RedisBrokerError;
pub use sharded::ShardedBroker;

/// Starts the broker `config.topology` asks for: [`RedisBroker`] for one Redis,
/// [`ShardedBroker`] for independent shards.
pub fn start(
    config: RedisConfig,
    registry: std::sync::Arc<fanout_hub::Registry>,
    histories: std::sync::Arc<fanout_hub::Histories>,
    presences: std::sync::Arc<fanout_hub::Presences>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<std::sync::Arc<dyn fanout_hub::Broker>, RedisBrokerError> {
    Ok(match config.topology {
        Topology::Shards => ShardedBroker::start(config, registry, histories, presences, shutdown)?,
        Topology::Single | Topology::Cluster => {
            RedisBroker::start_with(config, registry, histories, presences, shutdown)?
        }
    })
}
