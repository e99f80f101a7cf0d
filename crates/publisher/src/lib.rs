//! `fanout-publisher`: publishing to fanout channels from a Rust backend, through a node's
//! internal HTTP API or straight into Redis, behind one [`Publisher`] API.
//!
//! ```no_run
//! # async fn demo() -> Result<(), fanout_publisher::PublishError> {
//! use fanout_publisher::{Encoding, Publisher};
//!
//! let http = Publisher::http("http://gateway.internal:9090").api_key("secret").build()?;
//! http.publish("chat:room-1", &serde_json::json!({"text": "hi"})).await?;
//!
//! let redis = Publisher::redis("redis://127.0.0.1:6379").encoding(Encoding::MsgPack).connect().await?;
//! redis.broadcast(&["user:1", "user:2"], &("hello", 1)).await?;
//!
//! // In a namespace that keeps history: the offset, and a retry that cannot duplicate.
//! let receipt = http.publish_with("feed:1", &"event", Some("order-7-paid")).await?;
//! println!("stored at {:?} in epoch {:?}", receipt.offset, receipt.epoch);
//! let history = http.history("feed:1", None, Some(10)).await?;
//! # Ok(()) }
//! ```

mod body;
mod error;
mod http_transport;
mod redis_transport;
mod retry;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use serde::Serialize;

pub use error::PublishError;
pub use fanout_protocol::Encoding;
pub use retry::RetryPolicy;

use http_transport::HttpTransport;
use redis_transport::RedisTransport;

/// The Redis channel prefix the gateway uses unless configured otherwise.
pub const DEFAULT_REDIS_PREFIX: &str = "fanout:";

/// Per-attempt timeout unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Most concurrent HTTP requests one [`Publisher::publish_batch`] keeps in flight against
/// a node without `/api/publish_batch`; more would only queue inside the connection pool.
const HTTP_BATCH_CONCURRENCY: usize = 32;

/// A publishing handle. Cloning is cheap and clones share connections.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    transport: Transport,
    encoding: Encoding,
    retry: RetryPolicy,
}

enum Transport {
    // Boxed: the HTTP client is several hundred bytes.
    Http(Box<HttpTransport>),
    Redis(RedisTransport),
}

/// One publication of a batch: `data` already encoded as `enc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub channel: String,
    pub enc: Encoding,
    pub data: Bytes,
}

/// Where a publication was stored, in a namespace that keeps history (both `None`
/// elsewhere). Through Redis only the offset is known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Receipt {
    pub offset: Option<u64>,
    pub epoch: Option<String>,
}

/// A channel's history as `POST /api/history` returns it.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct History {
    /// The channel's top: the offset of its last publication.
    pub offset: u64,
    pub epoch: String,
    /// Oldest first.
    pub publications: Vec<StoredPublication>,
}

/// One publication of a [`History`].
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct StoredPublication {
    pub offset: u64,
    /// Microseconds since the Unix epoch, stamped where it entered.
    pub ts: u64,
    pub data: serde_json::Value,
}

impl Outgoing {
    pub fn new(channel: impl Into<String>, enc: Encoding, data: impl Into<Bytes>) -> Self {
        Self { channel: channel.into(), enc, data: data.into() }
    }
}

/// Configures a [`Publisher`]: the settings every transport shares, plus the transport's
/// own (`T`: [`Http`] or [`Redis`]).
#[must_use]
pub struct Builder<T> {
    transport: T,
    encoding: Encoding,
    timeout: Duration,
    retry: RetryPolicy,
}

/// HTTP-transport settings of a [`Builder`].
pub struct Http {
    base_url: String,
    api_key: Option<String>,
}

/// Redis-transport settings of a [`Builder`].
pub struct Redis {
    topology: redis_transport::Topology,
    prefix: String,
}

/// Configures a [`Publisher`] that talks to a node's internal HTTP API.
pub type HttpBuilder = Builder<Http>;
/// Configures a [`Publisher`] that writes envelopes straight into Redis.
pub type RedisBuilder = Builder<Redis>;

impl<T> Builder<T> {
    fn new(transport: T) -> Self {
        Self { transport, encoding: Encoding::Json, timeout: DEFAULT_TIMEOUT, retry: RetryPolicy::default() }
    }

    /// How [`Publisher::publish`] serialises values: the request `Content-Type` over HTTP,
    /// the envelope's `enc` over Redis.
    pub fn encoding(mut self, enc: Encoding) -> Self {
        self.encoding = enc;
        self
    }

    /// Limit on one attempt, connecting included.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
}

impl Builder<Http> {
    /// Sent as `Authorization: Bearer KEY` on every request.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.transport.api_key = Some(key.into());
        self
    }

    /// Validates the configuration; connections open lazily on the first publish.
    pub fn build(self) -> Result<Publisher, PublishError> {
        let Http { base_url, api_key } = &self.transport;
        let transport = HttpTransport::new(base_url, api_key.as_deref(), self.timeout)?;
        Ok(Publisher::from_parts(Transport::Http(Box::new(transport)), self.encoding, self.retry))
    }
}

impl Builder<Redis> {
    /// Must match the gateway's configured prefix; default `fanout:`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.transport.prefix = prefix.into();
        self
    }

    /// Validates the URL without connecting; the connection opens on the first publish.
    pub fn build(self) -> Result<Publisher, PublishError> {
        let transport = RedisTransport::new(self.transport.topology, self.transport.prefix, self.timeout)?;
        Ok(Publisher::from_parts(Transport::Redis(transport), self.encoding, self.retry))
    }

    /// Builds and connects now, so a wrong address or password shows at startup.
    pub async fn connect(self) -> Result<Publisher, PublishError> {
        let publisher = self.build()?;
        if let Transport::Redis(r) = &publisher.inner.transport {
            r.connect().await?;
        }
        Ok(publisher)
    }
}

impl Publisher {
    /// A publisher for a node's internal listener, e.g. `http://gateway:9090`.
    pub fn http(base_url: impl Into<String>) -> HttpBuilder {
        Builder::new(Http { base_url: base_url.into(), api_key: None })
    }

    /// A publisher that writes to Redis directly, e.g. `redis://127.0.0.1:6379`.
    pub fn redis(url: impl Into<String>) -> RedisBuilder {
        Self::redis_shards([url.into()])
    }

    /// A publisher for gateways on independent Redis shards (their `redis_shards`, same
    /// URLs in the same order): each channel goes to shard `key_slot(prefix + channel) %
    /// count`, where the gateways read it.
    pub fn redis_shards(urls: impl IntoIterator<Item = String>) -> RedisBuilder {
        let urls = urls.into_iter().collect();
        Builder::new(Redis {
            topology: redis_transport::Topology::Shards(urls),
            prefix: DEFAULT_REDIS_PREFIX.to_owned(),
        })
    }

    /// A publisher for gateways on a Redis Cluster (their `redis_cluster`): `SPUBLISH` to
    /// the master that owns each channel's slot. `seeds`: some of the cluster's nodes.
    pub fn redis_cluster(seeds: impl IntoIterator<Item = String>) -> RedisBuilder {
        let seeds = seeds.into_iter().collect();
        Builder::new(Redis {
            topology: redis_transport::Topology::Cluster(seeds),
            prefix: DEFAULT_REDIS_PREFIX.to_owned(),
        })
    }

    fn from_parts(transport: Transport, encoding: Encoding, retry: RetryPolicy) -> Self {
        Self { inner: Arc::new(Inner { transport, encoding, retry }) }
    }

    /// How [`Publisher::publish`] serialises values.
    pub fn encoding(&self) -> Encoding {
        self.inner.encoding
    }

    /// Serialises `value` the way [`Publisher::publish`] would: JSON, or MessagePack with
    /// field names (so subscribers on either wire format see maps, not arrays).
    pub fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Bytes, PublishError> {
        encode(self.inner.encoding, value)
    }

    /// Publishes `data` to `channel`.
    pub async fn publish<T: Serialize + ?Sized>(&self, channel: &str, data: &T) -> Result<(), PublishError> {
        let bytes = self.encode(data)?;
        self.publish_raw(channel, self.inner.encoding, bytes).await
    }

    /// Publishes bytes that already hold exactly one value encoded as `enc`. They are
    /// sent as they are, unchecked: an invalid value is refused by the HTTP API with 400,
    /// and dropped (and counted) by the gateway when it came through Redis.
    pub async fn publish_raw(&self, channel: &str, enc: Encoding, data: Bytes) -> Result<(), PublishError> {
        check_channel(channel)?;
        match &self.inner.transport {
            Transport::Http(h) => {
                let body = h.publish(enc, channel, &data, None);
                self.retrying(|| h.send(&body)).await
            }
            Transport::Redis(r) => self.retrying(|| r.publish(std::iter::once((channel, enc, &data[..])))).await,
        }
    }

    /// Publishes `data` to `channel` and says where it was stored. With `key` (at most 64
    /// bytes), a publication already made with that key on the channel within five
    /// minutes is not made again, so retries are safe; the receipt is then the first one's.
    ///
    /// Through Redis this is `FCALL fanout_publish` (Redis 7 with a fanout node's Function
    /// library loaded), which stores the publication when its namespace keeps history.
    pub async fn publish_with<T: Serialize + ?Sized>(
        &self,
        channel: &str,
        data: &T,
        key: Option<&str>,
    ) -> Result<Receipt, PublishError> {
        let bytes = self.encode(data)?;
        self.publish_raw_with(channel, self.inner.encoding, bytes, key).await
    }

    /// [`Publisher::publish_with`] for bytes already encoded as `enc`.
    pub async fn publish_raw_with(
        &self,
        channel: &str,
        enc: Encoding,
        data: Bytes,
        key: Option<&str>,
    ) -> Result<Receipt, PublishError> {
        check_channel(channel)?;
        if key.is_some_and(|k| k.len() > fanout_protocol::MAX_IDEMPOTENCY_KEY) {
            return Err(PublishError::Config(format!(
                "idempotency keys are at most {} bytes",
                fanout_protocol::MAX_IDEMPOTENCY_KEY
            )));
        }
        match &self.inner.transport {
            Transport::Http(h) => {
                let body = h.publish(enc, channel, &data, key);
                let (content_type, answer) = self.retrying(|| h.exchange(&body)).await?;
                let p = body::published_of(content_type.as_deref(), &answer);
                Ok(Receipt { offset: p.offset, epoch: p.epoch })
            }
            Transport::Redis(r) => {
                let offset = self.retrying(|| r.publish_stored(channel, enc, &data, key)).await?;
                Ok(Receipt { offset: (offset > 0).then_some(offset), epoch: None })
            }
        }
    }

    /// Reads `channel`'s history through the HTTP API: after `since` (offset, epoch) or
    /// everything kept, at most `limit` publications. Only over HTTP (the Redis transport
    /// answers with a configuration error).
    pub async fn history(
        &self,
        channel: &str,
        since: Option<(u64, &str)>,
        limit: Option<u64>,
    ) -> Result<History, PublishError> {
        check_channel(channel)?;
        let Transport::Http(h) = &self.inner.transport else {
            return Err(PublishError::Config("history reads need the HTTP transport".into()));
        };
        let mut request = serde_json::json!({ "channel": channel });
        if let Some((offset, epoch)) = since {
            request["since"] = serde_json::json!({"offset": offset, "epoch": epoch});
        }
        if let Some(limit) = limit {
            request["limit"] = limit.into();
        }
        let body = h.history(&request);
        let (_, answer) = self.retrying(|| h.exchange(&body)).await?;
        serde_json::from_slice(&answer).map_err(|e| PublishError::Rejected {
            status: Some(200),
            code: "bad_response".into(),
            message: format!("the history answer is not the documented shape: {e}"),
        })
    }

    /// Closes every connection of `user` (a token's `sub`) on every node with 4009. Only
    /// over HTTP, like the rest of the server API.
    pub async fn disconnect(&self, user: &str) -> Result<(), PublishError> {
        self.server_api("/api/disconnect", Some(serde_json::json!({ "user": user }))).await.map(drop)
    }

    /// Removes `channel` from every connection of `user`, on every node.
    pub async fn unsubscribe(&self, user: &str, channel: &str) -> Result<(), PublishError> {
        check_channel(channel)?;
        self.server_api("/api/unsubscribe", Some(serde_json::json!({ "user": user, "channel": channel })))
            .await
            .map(drop)
    }

    /// `GET /api/channels[?namespace=NS]`: `{"channels":[{"channel","subscribers"}...]}`.
    pub async fn channels(&self, namespace: Option<&str>) -> Result<serde_json::Value, PublishError> {
        let path = match namespace {
            Some(ns) => format!(
                "/api/channels?namespace={}",
                form_urlencoded::byte_serialize(ns.as_bytes()).collect::<String>()
            ),
            None => "/api/channels".to_owned(),
        };
        self.server_api(&path, None).await
    }

    /// `POST /api/presence`: `{"clients":[{"client","user"}...]}` (namespaces with presence).
    pub async fn presence(&self, channel: &str) -> Result<serde_json::Value, PublishError> {
        check_channel(channel)?;
        self.server_api("/api/presence", Some(serde_json::json!({ "channel": channel }))).await
    }

    /// `POST /api/presence_stats`: `{"clients":N,"users":M}`.
    pub async fn presence_stats(&self, channel: &str) -> Result<serde_json::Value, PublishError> {
        check_channel(channel)?;
        self.server_api("/api/presence_stats", Some(serde_json::json!({ "channel": channel }))).await
    }

    /// `GET /api/nodes`: every live node.
    pub async fn nodes(&self) -> Result<serde_json::Value, PublishError> {
        self.server_api("/api/nodes", None).await
    }

    async fn server_api(&self, path: &str, body: Option<serde_json::Value>) -> Result<serde_json::Value, PublishError> {
        let Transport::Http(h) = &self.inner.transport else {
            return Err(PublishError::Config("the server API needs the HTTP transport".into()));
        };
        let request = h.api(path, body.as_ref())?;
        let (_, answer) = self.retrying(|| h.exchange(&request)).await?;
        serde_json::from_slice(&answer).map_err(|e| PublishError::Rejected {
            status: Some(200),
            code: "bad_response".into(),
            message: format!("the answer is not JSON: {e}"),
        })
    }

    /// Publishes one value to several channels.
    pub async fn broadcast<T: Serialize + ?Sized>(&self, channels: &[&str], data: &T) -> Result<(), PublishError> {
        let bytes = self.encode(data)?;
        self.broadcast_raw(channels, self.inner.encoding, bytes).await
    }

    /// [`Publisher::publish_raw`] to several channels: one `/api/broadcast` request, or
    /// one Redis pipeline.
    pub async fn broadcast_raw(&self, channels: &[&str], enc: Encoding, data: Bytes) -> Result<(), PublishError> {
        for c in channels {
            check_channel(c)?;
        }
        if channels.is_empty() {
            return Ok(());
        }
        match &self.inner.transport {
            Transport::Http(h) => {
                let body = h.broadcast(enc, channels, &data);
                self.retrying(|| h.send(&body)).await
            }
            Transport::Redis(r) => self.retrying(|| r.publish(channels.iter().map(|c| (*c, enc, &data[..])))).await,
        }
    }

    /// Publishes many publications at once: one pipelined round trip to Redis (one per
    /// shard), or over HTTP one `POST /api/publish_batch` per 1,000 publications of one
    /// encoding (a node that predates the endpoint gets concurrent single publishes).
    /// Publications on one channel keep their order (except over HTTP to such an old
    /// node). On error some of the batch may have been published.
    pub async fn publish_batch(&self, batch: &[Outgoing]) -> Result<(), PublishError> {
        for o in batch {
            check_channel(&o.channel)?;
        }
        match &self.inner.transport {
            Transport::Http(h) => {
                for enc in [Encoding::Json, Encoding::MsgPack] {
                    let items: Vec<(&str, &[u8])> =
                        batch.iter().filter(|o| o.enc == enc).map(|o| (o.channel.as_str(), &o.data[..])).collect();
                    for chunk in items.chunks(fanout_protocol::MAX_BATCH_PUBLICATIONS) {
                        let body = h.batch(enc, chunk);
                        match self.retrying(|| h.send(&body)).await {
                            Err(PublishError::Rejected { status: Some(404), .. }) => {
                                self.publish_each(h, enc, chunk).await?
                            }
                            other => other?,
                        }
                    }
                }
                Ok(())
            }
            Transport::Redis(r) => {
                self.retrying(|| r.publish(batch.iter().map(|o| (o.channel.as_str(), o.enc, &o.data[..])))).await
            }
        }
    }

    /// One request per publication, some in flight together: for a node without
    /// `/api/publish_batch`.
    async fn publish_each(
        &self,
        h: &HttpTransport,
        enc: Encoding,
        items: &[(&str, &[u8])],
    ) -> Result<(), PublishError> {
        use futures_util::{stream, TryStreamExt};
        stream::iter(items.iter().map(Ok))
            .try_for_each_concurrent(HTTP_BATCH_CONCURRENCY, |(channel, data)| async move {
                let body = h.publish(enc, channel, data, None);
                self.retrying(|| h.send(&body)).await
            })
            .await
    }

    async fn retrying<F, Fut, R>(&self, mut attempt: F) -> Result<R, PublishError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<R, PublishError>>,
    {
        let policy = self.inner.retry;
        let mut retry = 0;
        loop {
            match attempt().await {
                Err(e) if e.is_retryable() && retry < policy.max_retries => {
                    tokio::time::sleep(policy.backoff(retry)).await;
                    retry += 1;
                }
                result => return result,
            }
        }
    }
}

fn check_channel(channel: &str) -> Result<(), PublishError> {
    fanout_protocol::ChannelName::validate(channel)
        .map_err(|source| PublishError::InvalidChannel { channel: channel.chars().take(300).collect(), source })
}

fn encode<T: Serialize + ?Sized>(enc: Encoding, value: &T) -> Result<Bytes, PublishError> {
    let encoded = match enc {
        Encoding::Json => serde_json::to_vec(value).map_err(|e| e.to_string()),
        Encoding::MsgPack => rmp_serde::to_vec_named(value).map_err(|e| e.to_string()),
    };
    encoded.map(Bytes::from).map_err(|message| PublishError::Encode { enc: enc.as_str(), message })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Msg<'a> {
        text: &'a str,
        n: u32,
    }

    #[test]
    fn encodes_json_and_named_msgpack() {
        let v = Msg { text: "hi", n: 3 };
        assert_eq!(encode(Encoding::Json, &v).unwrap(), &br#"{"text":"hi","n":3}"#[..]);
        let mp = encode(Encoding::MsgPack, &v).unwrap();
        let decoded = rmpv::decode::read_value(&mut &mp[..]).unwrap();
        assert_eq!(decoded, rmpv::Value::Map(vec![("text".into(), "hi".into()), ("n".into(), 3.into())]));
        fanout_protocol::validate_data(Encoding::MsgPack, &mp).unwrap();
    }

    #[test]
    fn encode_errors_are_typed() {
        let mut bad = std::collections::HashMap::new();
        bad.insert(vec![1u8], 1);
        let e = encode(Encoding::Json, &bad).unwrap_err();
        assert!(matches!(e, PublishError::Encode { enc: "json", .. }), "{e}");
    }

    #[tokio::test]
    async fn invalid_channels_fail_before_any_io() {
        // Port 9 (discard) on a TEST-NET address: nothing would answer, so reaching the
        // network would show up as Unavailable or Timeout instead.
        let p = Publisher::http("http://192.0.2.1:9").retry(RetryPolicy::NONE).build().unwrap();
        let e = p.publish("bad name", &1).await.unwrap_err();
        assert!(matches!(e, PublishError::InvalidChannel { .. }), "{e}");
        let e = p.broadcast(&["ok", ""], &1).await.unwrap_err();
        assert!(matches!(e, PublishError::InvalidChannel { .. }), "{e}");
        let e = p.publish_batch(&[Outgoing::new("x".repeat(256), Encoding::Json, "1")]).await.unwrap_err();
        assert!(matches!(e, PublishError::InvalidChannel { .. }), "{e}");
        let r = Publisher::redis("redis://192.0.2.1:9").build().unwrap();
        assert!(matches!(r.publish("a*", &1).await, Err(PublishError::InvalidChannel { .. })));
    }

    #[test]
    fn bad_configuration() {
        assert!(matches!(Publisher::redis("nope://x").build(), Err(PublishError::Config(_))));
        assert!(matches!(Publisher::http("ftp://x").build(), Err(PublishError::Config(_))));
    }
}
