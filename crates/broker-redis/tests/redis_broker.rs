//! The Redis broker against a real `redis-server`: delivery, interest, batching and outages.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use fanout_broker_redis::{RedisBroker, RedisBrokerError, RedisConfig};
use fanout_hub::{Broker, BrokerError, Outbox, Outgoing, Registry};
use fanout_protocol::{encode_envelope, ChannelName, Encoding, Publication};
use fanout_testkit::RedisServer;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// Short timings so outages are noticed, and tests finish, quickly.
fn config(urls: Vec<String>) -> RedisConfig {
    RedisConfig {
        urls,
        connect_timeout: Duration::from_millis(500),
        command_timeout: Duration::from_millis(500),
        heartbeat_interval: Duration::from_millis(200),
        linger: Duration::from_millis(100),
        reconnect_backoff_max: Duration::from_millis(200),
        ..RedisConfig::default()
    }
}

struct Node {
    broker: Arc<RedisBroker>,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    metrics: PrometheusHandle,
}

impl Node {
    fn start(config: RedisConfig) -> Self {
        let recorder = PrometheusBuilder::new().build_recorder();
        let metrics = recorder.handle();
        let registry = Arc::new(Registry::new());
        let shutdown = CancellationToken::new();
        // The broker registers its metric handles in `start`, so they bind to this recorder.
        let broker = metrics::with_local_recorder(&recorder, || {
            RedisBroker::start(config, registry.clone(), shutdown.clone()).unwrap()
        });
        Self { broker, registry, shutdown, metrics }
    }

    async fn up(server: &RedisServer) -> Self {
        let node = Self::start(config(vec![server.url()]));
        node.wait_status(true, Duration::from_secs(5)).await;
        node
    }

    async fn wait_status(&self, up: bool, within: Duration) -> Duration {
        let started = Instant::now();
        let mut status = self.broker.status();
        tokio::time::timeout(within, status.wait_for(|s| *s == up))
            .await
            .unwrap_or_else(|_| panic!("broker not up={up} within {within:?}"))
            .unwrap();
        assert_eq!(self.broker.is_up(), up);
        started.elapsed()
    }

    /// A local subscriber, subscribed the way the hub does it.
    async fn subscribe(&self, channel: &str) -> Arc<Outbox> {
        let outbox = Arc::new(Outbox::new(Encoding::Json, 1 << 20));
        let channel = ch(channel);
        self.registry.insert(&channel, &outbox);
        self.broker.add_interest(&channel);
        tokio::time::timeout(Duration::from_secs(2), self.broker.ready(&channel)).await.unwrap().unwrap();
        outbox
    }

    /// `ready`, bounded like the hub bounds it, so a bug shows as a failure, not a hang.
    async fn ready(&self, channel: &str) -> Result<(), BrokerError> {
        tokio::time::timeout(Duration::from_secs(2), self.broker.ready(&ch(channel))).await.expect("ready hung")
    }

    async fn publish(&self, channel: &str, ts: u64, json: &str) -> Result<(), BrokerError> {
        self.broker.publish(&publication(channel, ts, json), None).await.map(drop)
    }

    /// The value of one series in the Prometheus rendering (0 if absent).
    /// `name` or `name{labels}`: the sum over the series of that name whose labels
    /// include `labels` (every broker series also carries `shard="0"`).
    fn metric(&self, series: &str) -> f64 {
        let (name, labels) = series.split_once('{').unwrap_or((series, "}"));
        let labels = labels.trim_end_matches('}');
        self.metrics
            .render()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(s, _)| s.split('{').next() == Some(name) && s.contains(labels))
            .map(|(_, v)| v.parse::<f64>().unwrap())
            .sum()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn ch(name: &str) -> ChannelName {
    ChannelName::new(name).unwrap()
}

fn publication(channel: &str, ts: u64, json: &str) -> Publication {
    Publication::new(ch(channel), ts, Encoding::Json, Bytes::copy_from_slice(json.as_bytes()))
}

/// Everything `outbox` receives until `n` frames have arrived (or `within` passes).
async fn receive(outbox: &Outbox, n: usize, within: Duration) -> Vec<Outgoing> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while got.len() < n {
        let mut q = VecDeque::new();
        if tokio::time::timeout_at(deadline, outbox.take(&mut q)).await.is_err() {
            break;
        }
        got.extend(q);
    }
    got
}

fn text(frame: &Outgoing) -> String {
    String::from_utf8_lossy(&frame.frame).into_owned()
}

/// Polls `f` until it is true, for at most `within`.
async fn eventually<F: std::future::Future<Output = bool>>(within: Duration, mut f: impl FnMut() -> F) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publication_reaches_a_local_subscriber_in_order() {
    let server = RedisServer::start();
    let node = Node::up(&server).await;
    let sub = node.subscribe("chat:room-1").await;
    for i in 0..50u64 {
        node.publish("chat:room-1", 1_000 + i, &format!("{{\"n\":{i}}}")).await.unwrap();
    }
    let got = receive(&sub, 50, Duration::from_secs(2)).await;
    let ts: Vec<u64> = got.iter().map(|o| o.ts).collect();
    assert_eq!(ts, (1_000..1_050).collect::<Vec<_>>());
    let first = text(&got[0]);
    assert!(first.contains(r#""channel":"chat:room-1""#) && first.contains(r#""data":{"n":0}"#), "{first}");
    assert_eq!(node.metric("fanout_broker_publications_received_total"), 50.0);
    assert_eq!(node.metric("fanout_broker_up"), 1.0);
    assert_eq!(node.metric("fanout_broker_channels"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_publish_straight_into_redis_arrives() {
    let server = RedisServer::start();
    let node = Node::up(&server).await;
    let sub = node.subscribe("orders").await;
    // Built by hand, the way a backend in another language would, with an extra key.
    let mut payload = vec![0x85];
    payload.extend_from_slice(&[0xa5, b'e', b'x', b't', b'r', b'a', 0xc0]);
    payload.extend_from_slice(&[0xa1, b'v', 0x01]);
    payload.extend_from_slice(&[0xa2, b't', b's', 0xce, 0x00, 0x01, 0x00, 0x00]);
    payload.extend_from_slice(&[0xa3, b'e', b'n', b'c', 0xa4, b'j', b's', b'o', b'n']);
    payload.extend_from_slice(&[0xa4, b'd', b'a', b't', b'a', 0xc4, 0x08]);
    payload.extend_from_slice(br#"{"id":7}"#);
    assert_eq!(server.publish_raw("fanout:orders", &payload).await, 1);
    let got = receive(&sub, 1, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].ts, 65_536);
    assert!(text(&got[0]).contains(r#""data":{"id":7}"#), "{}", text(&got[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_envelopes_are_dropped_and_counted() {
    let server = RedisServer::start();
    let node = Node::up(&server).await;
    let sub = node.subscribe("feed").await;
    let garbage: [&[u8]; 4] = [
        b"hello",
        b"",
        &[0x81, 0xa1, b'v', 0x02],                         // wrong version, missing fields
        &encode_envelope(1, Encoding::Json, b"{not json"), // data is not what enc says
    ];
    for g in garbage {
        server.publish_raw("fanout:feed", g).await;
    }
    server.publish_raw("fanout:feed", &encode_envelope(42, Encoding::Json, b"[1,2]")).await;
    let got = receive(&sub, 1, Duration::from_secs(2)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].ts, 42);
    // Nothing else trickles in afterwards.
    assert!(receive(&sub, 1, Duration::from_millis(200)).await.is_empty());
    assert_eq!(node.metric(r#"fanout_publications_dropped_total{reason="invalid_envelope"}"#), 4.0);
    assert_eq!(node.metric("fanout_broker_publications_received_total"), 1.0);
    assert!(node.broker.is_up());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interest_follows_add_and_remove_with_linger() {
    let server = RedisServer::start();
    let node = Node::up(&server).await;
    node.subscribe("a").await;
    node.subscribe("b").await;
    assert_eq!(server.pubsub_channels("fanout:*").await, ["fanout:a", "fanout:b"]);
    assert_eq!(node.metric("fanout_broker_channels"), 2.0);

    // Removed and re-added within the linger: nothing goes to Redis. Told apart by an
    // event, not a sleep: "c" is removed after "a" was re-added, so by the time c's linger
    // has run out and c is gone from Redis, a's would have too.
    let unsubscribes = server.command_calls("unsubscribe").await;
    node.subscribe("c").await;
    node.broker.remove_interest(&ch("a"));
    node.broker.add_interest(&ch("a"));
    node.ready("a").await.unwrap();
    node.broker.remove_interest(&ch("c"));
    assert!(
        eventually(Duration::from_secs(10), || async {
            server.pubsub_channels("fanout:*").await == ["fanout:a", "fanout:b"]
        })
        .await
    );
    assert_eq!(server.command_calls("unsubscribe").await, unsubscribes + 1, "only c was unsubscribed");

    // Removed for good: gone from Redis once the linger has passed.
    node.broker.remove_interest(&ch("a"));
    assert!(
        eventually(Duration::from_secs(10), || async { server.pubsub_channels("fanout:*").await == ["fanout:b"] })
            .await
    );
    assert_eq!(node.metric("fanout_broker_channels"), 1.0);
    // `ready` on a channel nobody asked for is an error, not a hang.
    assert!(node.ready("a").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_interest_is_batched_and_nothing_is_lost() {
    let server = RedisServer::start();
    let node = Node::up(&server).await;
    let before = server.command_calls("subscribe").await;
    let channels: Vec<ChannelName> = (0..500).map(|i| ch(&format!("burst:{i}"))).collect();
    for c in &channels {
        node.broker.add_interest(c);
    }
    let ready = futures_util::future::join_all(channels.iter().map(|c| node.broker.ready(c)));
    for r in tokio::time::timeout(Duration::from_secs(5), ready).await.unwrap() {
        r.unwrap();
    }
    assert_eq!(server.pubsub_channels("fanout:burst:*").await.len(), 500);
    let subscribes = server.command_calls("subscribe").await - before;
    assert!(subscribes <= 20, "500 channels took {subscribes} SUBSCRIBE commands");
    assert_eq!(node.metric("fanout_broker_channels"), 500.0);

    // And the same in reverse.
    let before = server.command_calls("unsubscribe").await;
    for c in &channels[..499] {
        node.broker.remove_interest(c);
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            server.pubsub_channels("fanout:burst:*").await == ["fanout:burst:499"]
        })
        .await
    );
    let unsubscribes = server.command_calls("unsubscribe").await - before;
    assert!(unsubscribes <= 20, "499 channels took {unsubscribes} UNSUBSCRIBE commands");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_redis_being_killed_and_restarted() {
    let mut server = RedisServer::start();
    // Long command timeouts, so "nothing waits while down" is told apart from a wait by
    // seconds, not milliseconds, on however loaded a machine.
    let long = Duration::from_secs(10);
    let node = Node::start(RedisConfig {
        command_timeout: long,
        publish_timeout: long,
        connect_timeout: long,
        ..config(vec![server.url()])
    });
    node.wait_status(true, Duration::from_secs(10)).await;
    let names = ["k:1", "k:2", "k:3"];
    let mut subs = Vec::new();
    for n in names {
        subs.push(node.subscribe(n).await);
    }
    node.publish("k:1", 1, "1").await.unwrap();
    assert_eq!(receive(&subs[0], 1, Duration::from_secs(2)).await.len(), 1);

    server.kill();
    let noticed = node.wait_status(false, Duration::from_secs(3)).await;
    assert_eq!(node.metric("fanout_broker_up"), 0.0);
    assert_eq!(node.metric("fanout_broker_channels"), 0.0);

    // While down, nothing waits.
    let started = Instant::now();
    assert!(matches!(node.ready("k:1").await, Err(BrokerError::Unavailable(_))));
    assert!(matches!(node.publish("k:1", 2, "2").await, Err(BrokerError::Unavailable(_))));
    assert!(started.elapsed() < long / 2, "took {:?}: it waited for Redis", started.elapsed());
    // Interest that arrives while down is subscribed on the way back up.
    let late = Arc::new(Outbox::new(Encoding::Json, 1 << 20));
    node.registry.insert(&ch("k:late"), &late);
    node.broker.add_interest(&ch("k:late"));

    tokio::time::sleep(Duration::from_millis(500)).await;
    server.restart();
    let restarted = Instant::now();
    node.wait_status(true, Duration::from_secs(10)).await;
    // Delivery resumes, on every channel, without the subscribers doing anything.
    let mut names = names.to_vec();
    names.push("k:late");
    subs.push(late);
    for (i, (name, sub)) in names.iter().zip(&subs).enumerate() {
        node.publish(name, 100 + i as u64, "\"back\"").await.unwrap();
        let got = receive(sub, 1, Duration::from_secs(10)).await;
        assert_eq!(got.iter().map(|o| o.ts).collect::<Vec<_>>(), [100 + i as u64], "{name}");
    }
    // How fast is a benchmark's question (docs/benchmarks.md); here it is only reported.
    let resumed = restarted.elapsed();
    assert_eq!(server.pubsub_channels("fanout:*").await, ["fanout:k:1", "fanout:k:2", "fanout:k:3", "fanout:k:late"]);
    assert_eq!(node.metric("fanout_broker_reconnects_total"), 1.0);
    assert_eq!(node.metric("fanout_broker_resubscribe_duration_seconds_count"), 1.0);
    assert_eq!(node.metric("fanout_broker_channels"), 4.0);
    assert!(node.metric(r#"fanout_broker_errors_total{op="connect"}"#) >= 1.0);
    eprintln!("outage noticed after {noticed:?}; delivery resumed {resumed:?} after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_is_detected_by_the_heartbeat() {
    let server = RedisServer::start();
    let node = Node::up(&server).await;
    let sub = node.subscribe("hb").await;

    server.freeze();
    // Heartbeat every 200ms, answered within 500ms: noticed in well under 2s.
    let noticed = node.wait_status(false, Duration::from_secs(2)).await;
    assert!(node.metric(r#"fanout_broker_errors_total{op="ping"}"#) >= 1.0);
    assert!(node.publish("hb", 1, "1").await.is_err());

    server.thaw();
    node.wait_status(true, Duration::from_secs(3)).await;
    node.publish("hb", 2, "2").await.unwrap();
    let got = receive(&sub, 1, Duration::from_secs(2)).await;
    assert_eq!(got.iter().map(|o| o.ts).collect::<Vec<_>>(), [2]);
    eprintln!("frozen Redis noticed after {noticed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_by_redis_are_replaced() {
    let server = RedisServer::start();
    let node = Node::up(&server).await;
    let sub = node.subscribe("ck").await;
    let server = &server;
    let kill = |kind: &'static str| async move {
        let mut con = server.connection().await;
        let killed: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg(kind)
            .arg("SKIPME")
            .arg("yes")
            .query_async(&mut con)
            .await
            .unwrap();
        assert_eq!(killed, 1, "{kind}");
    };

    // The publish connection alone: the next publishes dial a new one, the node stays up.
    kill("normal").await;
    let mut ts = 10;
    assert!(
        eventually(Duration::from_secs(10), || {
            ts += 1;
            let publish = node.publish("ck", ts, "1");
            async move { publish.await.is_ok() }
        })
        .await
    );
    assert!(node.broker.is_up());
    assert_eq!(receive(&sub, 1, Duration::from_secs(2)).await.len(), 1);

    // The pub/sub connection: down, back up, subscriptions restored.
    kill("pubsub").await;
    node.wait_status(false, Duration::from_secs(2)).await;
    node.wait_status(true, Duration::from_secs(2)).await;
    node.publish("ck", 99, "2").await.unwrap();
    let got = receive(&sub, 1, Duration::from_secs(2)).await;
    assert_eq!(got.iter().map(|o| o.ts).collect::<Vec<_>>(), [99]);
    assert_eq!(node.metric("fanout_broker_reconnects_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_redis_refuses_does_not_hold_back_the_others() {
    let server = RedisServer::start();
    let mut con = server.connection().await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "resetchannels", "&fanout:ok:*"][..])
        .query_async(&mut con)
        .await
        .unwrap();
    let node = Node::up(&server).await;
    // Queued together, so they share one SUBSCRIBE that Redis refuses as a whole.
    for name in ["ok:1", "no:1", "ok:2"] {
        node.broker.add_interest(&ch(name));
    }
    let (ok1, no1, ok2) = tokio::join!(node.ready("ok:1"), node.ready("no:1"), node.ready("ok:2"));
    assert_eq!((ok1, ok2), (Ok(()), Ok(())));
    assert!(matches!(&no1, Err(BrokerError::Unavailable(m)) if m.contains("permission")), "{no1:?}");
    // Asked again, it fails again, at once.
    assert!(node.ready("no:1").await.is_err());
    assert!(node.broker.is_up());
    assert_eq!(server.pubsub_channels("fanout:*").await, ["fanout:ok:1", "fanout:ok:2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_over_resp3() {
    let server = RedisServer::start();
    let node = Node::start(config(vec![format!("{}/?protocol=resp3", server.url())]));
    node.wait_status(true, Duration::from_secs(3)).await;
    let sub = node.subscribe("r3").await;
    node.publish("r3", 3, "3").await.unwrap();
    assert_eq!(receive(&sub, 1, Duration::from_secs(2)).await.len(), 1);
    // Several heartbeats go by without a false alarm.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(node.broker.is_up());
    assert_eq!(node.metric("fanout_broker_reconnects_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_before_redis_and_fails_over_to_the_next_url() {
    let dead = RedisServer::unused_port();
    let late_port = RedisServer::unused_port();
    let node = Node::start(config(vec![format!("redis://127.0.0.1:{dead}"), format!("redis://127.0.0.1:{late_port}")]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!node.broker.is_up());
    assert!(node.ready("x").await.is_err());
    assert!(node.publish("x", 1, "1").await.is_err());

    let server = RedisServer::start_on(late_port);
    node.wait_status(true, Duration::from_secs(3)).await;
    let sub = node.subscribe("x").await;
    node.publish("x", 2, "2").await.unwrap();
    assert_eq!(receive(&sub, 1, Duration::from_secs(2)).await.len(), 1);
    assert_eq!(server.pubsub_channels("fanout:*").await, ["fanout:x"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_from_the_config_is_used() {
    let server = RedisServer::start_with(Some("s3cret"));
    let wrong = Node::start(RedisConfig { password: Some("nope".into()), ..config(vec![server.url()]) });
    let right = Node::start(RedisConfig { password: Some("s3cret".into()), ..config(vec![server.url()]) });
    right.wait_status(true, Duration::from_secs(3)).await;
    let sub = right.subscribe("p").await;
    right.publish("p", 5, "5").await.unwrap();
    assert_eq!(receive(&sub, 1, Duration::from_secs(2)).await.len(), 1);
    assert!(!wrong.broker.is_up());
    assert!(wrong.metric(r#"fanout_broker_errors_total{op="connect"}"#) >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_everything_and_closes_connections() {
    let server = RedisServer::start();
    let node = Node::up(&server).await;
    node.subscribe("s").await;
    node.publish("s", 1, "1").await.unwrap();
    let clients = || async {
        let mut con = server.connection().await;
        let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut con).await.unwrap();
        list.lines().count()
    };
    // Ours: pub/sub + publish, plus the one asking.
    assert_eq!(clients().await, 3);
    node.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(2), node.broker.stopped()).await.unwrap();
    assert!(!node.broker.is_up());
    assert!(node.publish("s", 2, "2").await.is_err());
    assert!(eventually(Duration::from_secs(10), || async { clients().await == 1 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_speaks_tls_and_verifies_the_certificate() {
    let server = RedisServer::start_tls();
    let node = Node::start(config(vec![format!("rediss://127.0.0.1:{}", server.port())]));
    // The handshake reaches the server, which learns that its self-signed certificate was
    // turned down: TLS is spoken and verified, not skipped.
    let rejected = eventually(Duration::from_secs(5), || async {
        let log = server.log().to_lowercase();
        log.contains("unknown ca") || log.contains("bad certificate") || log.contains("certificate unknown")
    })
    .await;
    assert!(rejected, "redis log:\n{}", server.log());
    assert!(!node.broker.is_up());
    assert!(node.metric(r#"fanout_broker_errors_total{op="connect"}"#) >= 1.0);
}

#[tokio::test]
async fn bad_configuration_is_refused_at_start() {
    let start = |urls: Vec<&str>| {
        RedisBroker::start(
            config(urls.into_iter().map(String::from).collect()),
            Arc::new(Registry::new()),
            CancellationToken::new(),
        )
        .err()
    };
    assert_eq!(start(vec![]), Some(RedisBrokerError::NoUrl));
    assert!(matches!(start(vec!["http://x"]), Some(RedisBrokerError::InvalidUrl { .. })));
    // TLS URLs are accepted (rustls is built in); nothing is dialed yet.
    assert_eq!(start(vec!["rediss://127.0.0.1:1"]), None);
}

#[test]
fn start_needs_a_runtime() {
    let r = RedisBroker::start(
        config(vec!["redis://127.0.0.1:1".into()]),
        Arc::new(Registry::new()),
        CancellationToken::new(),
    );
    assert_eq!(r.err(), Some(RedisBrokerError::NoRuntime));
}

/// A flood into Redis faster than the node fans out: what was read and not yet fanned out
/// stays within `backlog_bytes`, the excess is dropped and counted, every publication is
/// either delivered or counted as dropped, and delivery goes on afterwards. (redis-rs
/// buffers pub/sub messages without bound; before the backlog, a node that fell behind
/// grew by the whole flood.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_faster_than_the_fan_out_is_bounded_and_counted() {
    const FLOOD: u64 = 20_000;
    let server = RedisServer::start();
    let backlog = 32 * 1024;
    let node =
        Node::start(RedisConfig { backlog_bytes: backlog, max_publication_size: 1024, ..config(vec![server.url()]) });
    node.wait_status(true, Duration::from_secs(10)).await;
    // 2,000 local subscribers that never read make each publication's fan-out slow
    // (2,000 pushes) while Redis delivers a pipelined flood as fast as it can.
    let channel = ch("flood");
    let subscribers: Vec<_> = (0..2_000).map(|_| Arc::new(Outbox::new(Encoding::Json, 64 << 20))).collect();
    for s in &subscribers {
        node.registry.insert(&channel, s);
    }
    node.broker.add_interest(&channel);
    node.ready("flood").await.unwrap();
    let mut conn = server.connection().await;
    let mut pipe = redis::pipe();
    for ts in 1..=FLOOD {
        pipe.cmd("PUBLISH")
            .arg("fanout:flood")
            .arg(encode_envelope(ts, Encoding::Json, b"\"0123456789abcdef\""))
            .ignore();
    }
    let _: () = pipe.query_async(&mut conn).await.unwrap();
    let mut peak = 0.0f64;
    let settled = eventually(Duration::from_secs(120), || {
        peak = peak.max(node.metric("fanout_broker_backlog_bytes"));
        let done = node.metric("fanout_broker_publications_received_total")
            + node.metric(r#"fanout_publications_dropped_total{reason="broker_backlog"}"#);
        async move { done >= FLOOD as f64 }
    })
    .await;
    let received = node.metric("fanout_broker_publications_received_total");
    let dropped = node.metric(r#"fanout_publications_dropped_total{reason="broker_backlog"}"#);
    assert!(settled, "received {received} + dropped {dropped} never reached {FLOOD}");
    assert_eq!(received + dropped, FLOOD as f64, "every publication is delivered or counted");
    assert!(dropped > 0.0, "the fan-out kept up after all: no flood");
    assert!(peak <= backlog as f64, "the backlog held {peak} bytes, over its {backlog}");
    // Each subscriber got exactly what was received, in Redis order.
    let mut q = VecDeque::new();
    subscribers[0].take_now(&mut q);
    assert_eq!(q.len() as f64, received);
    assert!(q.iter().zip(q.iter().skip(1)).all(|(a, b)| a.ts < b.ts));
    // And the node goes on: the next publication arrives.
    node.publish("flood", FLOOD + 1, "1").await.unwrap();
    assert_eq!(
        receive(&subscribers[1], (received as usize) + 1, Duration::from_secs(10)).await.last().map(|o| o.ts),
        Some(FLOOD + 1)
    );
    eprintln!("flood of {FLOOD}: {received} delivered, {dropped} dropped, backlog peak {peak} of {backlog} bytes");
}
