//! The broker's settings and turning its URLs into ready-to-dial Redis clients.

use std::time::Duration;

use redis::{ConnectionAddr, IntoConnectionInfo};

use crate::error::RedisBrokerError;

/// What the URLs of a [`RedisConfig`] are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Topology {
    /// One Redis: several URLs are interchangeable endpoints of it (a failover list),
    /// tried in order.
    #[default]
    Single,
    /// Independent Redis servers, one per URL, in this order on every node: each channel
    /// lives on shard [`fanout_protocol::shard_of`]`(redis channel, number of URLs)`.
    Shards,
    /// The seed nodes of a Redis Cluster: channels ride sharded pub/sub
    /// (`SSUBSCRIBE` / `SPUBLISH`) to the master that owns their slot.
    Cluster,
}

/// How to reach Redis and how patiently.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://`, `rediss://` or `redis+unix://` URLs; what they are is [`Self::topology`].
    pub urls: Vec<String>,
    pub topology: Topology,
    /// Sets the password of every URL, replacing any password the URL carries.
    pub password: Option<String>,
    /// Prepended to every channel name to form the Redis channel.
    pub prefix: String,
    /// Longest wait for a new connection (TCP, TLS, handshake and a first `PING`).
    pub connect_timeout: Duration,
    /// Longest wait for a pub/sub command: `SUBSCRIBE`, `UNSUBSCRIBE`, heartbeat `PING`.
    pub command_timeout: Duration,
    /// Longest wait for a `PUBLISH` (queued behind others on the command connection
    /// included). A publish that times out may still be delivered later: its outcome is
    /// unknown, which callers must say (503 / `unavailable`).
    pub publish_timeout: Duration,
    /// Largest `data` accepted from Redis, in bytes; larger publications are dropped and
    /// counted (`fanout_publications_dropped_total{reason="too_large"}`) instead of cutting
    /// every subscriber of the channel off as a slow consumer.
    pub max_publication_size: usize,
    /// Bytes of publications read from Redis and not yet fanned out that the node holds;
    /// beyond it new ones are dropped and counted (`reason="broker_backlog"`), so a node that
    /// falls behind a flood holds bounded memory.
    pub backlog_bytes: usize,
    /// How often the pub/sub connection is probed with `PING`.
    pub heartbeat_interval: Duration,
    /// How long an unsubscribe waits before it is sent; re-subscribing within it sends nothing.
    pub linger: Duration,
    /// The longest pause between two reconnect attempts. Delivery resumes at most about
    /// this long (plus a connect and a re-subscribe) after Redis is back.
    pub reconnect_backoff_max: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            urls: vec!["redis://127.0.0.1:6379".into()],
            topology: Topology::Single,
            password: None,
            prefix: "fanout:".into(),
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(2),
            publish_timeout: Duration::from_secs(5),
            max_publication_size: 64 * 1024,
            backlog_bytes: 32 << 20,
            heartbeat_interval: Duration::from_secs(1),
            linger: Duration::from_millis(100),
            reconnect_backoff_max: Duration::from_millis(500),
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact(u)).collect();
        f.debug_struct("RedisConfig")
            .field("urls", &urls)
            .field("topology", &self.topology)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("publish_timeout", &self.publish_timeout)
            .field("max_publication_size", &self.max_publication_size)
            .field("backlog_bytes", &self.backlog_bytes)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("linger", &self.linger)
            .field("reconnect_backoff_max", &self.reconnect_backoff_max)
            .finish()
    }
}

/// One Redis server the broker may use.
pub(crate) struct Endpoint {
    pub client: redis::Client,
    /// `host:port` (or socket path): safe to log, unlike the URL.
    pub addr: String,
}

impl RedisConfig {
    /// Checks every setting and URL without connecting: what [`crate::RedisBroker::start`]
    /// would refuse, found before a node binds its ports.
    pub fn validate(&self) -> Result<(), RedisBrokerError> {
        self.endpoints().map(drop)
    }

    pub(crate) fn endpoints(&self) -> Result<Vec<Endpoint>, RedisBrokerError> {
        if self.connect_timeout.is_zero() {
            return Err(RedisBrokerError::InvalidConfig("connect_timeout must be positive"));
        }
        if self.command_timeout.is_zero() {
            return Err(RedisBrokerError::InvalidConfig("command_timeout must be positive"));
        }
        if self.heartbeat_interval.is_zero() {
            return Err(RedisBrokerError::InvalidConfig("heartbeat_interval must be positive"));
        }
        if self.publish_timeout.is_zero() {
            return Err(RedisBrokerError::InvalidConfig("publish_timeout must be positive"));
        }
        if self.max_publication_size == 0 || self.backlog_bytes < self.max_publication_size {
            return Err(RedisBrokerError::InvalidConfig(
                "max_publication_size must be positive and backlog_bytes at least as large",
            ));
        }
        let urls: Vec<&str> = self.urls.iter().map(|u| u.trim()).filter(|u| !u.is_empty()).collect();
        if urls.is_empty() {
            return Err(RedisBrokerError::NoUrl);
        }
        let mut endpoints = Vec::with_capacity(urls.len());
        for url in urls {
            let invalid = |reason: String| RedisBrokerError::InvalidUrl { url: redact(url), reason };
            let mut info = url.into_connection_info().map_err(|e| invalid(e.to_string()))?;
            if !info.addr().is_supported() {
                return Err(invalid("this build has no TLS support".into()));
            }
            if matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
                install_crypto_provider();
            }
            if let Some(password) = &self.password {
                let redis = info.redis_settings().clone().set_password(password);
                info = info.set_redis_settings(redis);
            }
            let addr = info.addr().to_string();
            let client = redis::Client::open(info).map_err(|e| invalid(e.to_string()))?;
            endpoints.push(Endpoint { client, addr });
        }
        Ok(endpoints)
    }
}

/// rustls needs a process-wide crypto provider before the first TLS client is built; the
/// embedding program may have installed one already, which is just as good.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `url` without its user info, query or fragment, which is where credentials live.
pub(crate) fn redact(url: &str) -> String {
    let url = url.split(['?', '#']).next().unwrap_or_default();
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(urls: &[&str]) -> RedisConfig {
        RedisConfig { urls: urls.iter().map(|u| u.to_string()).collect(), ..RedisConfig::default() }
    }

    #[test]
    fn redacts_credentials() {
        assert_eq!(redact("redis://:secret@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redact("rediss://user:p@ss@h:1"), "rediss://***@h:1");
        assert_eq!(redact("redis://h:1/?password=x"), "redis://h:1/");
        assert_eq!(redact("redis+unix:///tmp/r.sock?pass=x"), "redis+unix:///tmp/r.sock");
        assert_eq!(redact("redis://h"), "redis://h");
        let debug = format!("{:?}", RedisConfig { password: Some("pw".into()), ..config(&["redis://:s@h"]) });
        assert!(!debug.contains("pw\"") && !debug.contains(":s@"), "{debug}");
    }

    #[test]
    fn validates_urls() {
        assert_eq!(config(&[]).endpoints().err(), Some(RedisBrokerError::NoUrl));
        assert_eq!(config(&[" ", ""]).endpoints().err(), Some(RedisBrokerError::NoUrl));
        assert!(matches!(config(&["http://h"]).endpoints(), Err(RedisBrokerError::InvalidUrl { .. })));
        assert!(matches!(config(&["nonsense"]).endpoints(), Err(RedisBrokerError::InvalidUrl { .. })));
        let err = config(&["redis://h:1", "ftp://:hunter2@h"]).endpoints().err().unwrap().to_string();
        assert!(err.contains("ftp://***@h") && !err.contains("hunter2"), "{err}");
        let eps = config(&["redis://a:1", " redis://b:2/3 ", "rediss://c:3"]).endpoints().unwrap();
        let addrs: Vec<&str> = eps.iter().map(|e| e.addr.as_str()).collect();
        assert_eq!(addrs, ["a:1", "b:2", "c:3"]);
    }

    #[test]
    fn password_overrides_the_url() {
        let eps = RedisConfig { password: Some("new".into()), ..config(&["redis://:old@h:1", "redis://h:2"]) }
            .endpoints()
            .unwrap();
        for ep in eps {
            assert_eq!(ep.client.get_connection_info().redis_settings().password(), Some("new"));
        }
        let eps = config(&["redis://:old@h:1"]).endpoints().unwrap();
        assert_eq!(eps[0].client.get_connection_info().redis_settings().password(), Some("old"));
    }

    #[test]
    fn rejects_unusable_durations() {
        for c in [
            RedisConfig { connect_timeout: Duration::ZERO, ..config(&["redis://h"]) },
            RedisConfig { command_timeout: Duration::ZERO, ..config(&["redis://h"]) },
            RedisConfig { heartbeat_interval: Duration::ZERO, ..config(&["redis://h"]) },
            RedisConfig { publish_timeout: Duration::ZERO, ..config(&["redis://h"]) },
            RedisConfig { max_publication_size: 0, ..config(&["redis://h"]) },
            RedisConfig { backlog_bytes: 10, max_publication_size: 11, ..config(&["redis://h"]) },
        ] {
            assert!(matches!(c.endpoints(), Err(RedisBrokerError::InvalidConfig(_))));
        }
        let c = RedisConfig { linger: Duration::ZERO, reconnect_backoff_max: Duration::ZERO, ..config(&["redis://h"]) };
        assert!(c.endpoints().is_ok());
    }
}
