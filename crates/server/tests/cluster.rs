//! Several nodes sharing one real Redis: every publish path reaches subscribers on every
//! node, in both wire formats, in order.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::time::Duration;

use fanout_testkit::{http, Node, RedisServer, WsClient};
use serde_json::json;

fn nodes(redis: &RedisServer, n: usize) -> Vec<Node> {
    // The publishers here pipeline thousands of commands, far over the default command rate.
    let args = ["--redis-url", &redis.url(), "--command-rate", "0"];
    (0..n).map(|_| Node::start(env!("CARGO_BIN_EXE_fanout"), &args)).collect()
}

/// A hand-built envelope, exactly as a backend would `PUBLISH` it.
fn envelope(ts: u64, enc: &str, data: &[u8]) -> Vec<u8> {
    let v = rmpv::Value::Map(vec![
        ("v".into(), 1.into()),
        ("ts".into(), ts.into()),
        ("enc".into(), enc.into()),
        ("data".into(), rmpv::Value::Binary(data.to_vec())),
    ]);
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, &v).unwrap();
    buf
}

async fn redis_publish(redis: &RedisServer, channel: &str, payload: &[u8]) -> i64 {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("PUBLISH").arg(channel).arg(payload).query_async(&mut conn).await.unwrap()
}

#[tokio::test]
async fn every_publish_path_crosses_nodes() {
    let redis = RedisServer::start();
    let [a, b] = <[Node; 2]>::try_from(nodes(&redis, 2)).ok().unwrap();
    let mut on_b = WsClient::json(&b.ws_url()).await;
    let mut on_a = WsClient::msgpack(&a.ws_url()).await;
    on_b.subscribe("news").await;
    on_a.subscribe("news").await;

    // 1. A WebSocket client's publish on node A.
    let mut publisher = WsClient::json(&a.ws_url()).await;
    publisher.publish("news", json!({"via":"ws"})).await;
    // 2. The HTTP API on node A.
    let r = http(a.internal, "POST", "/api/publish", &[], br#"{"channel":"news","data":{"via":"http"}}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // 3. A backend writing the envelope straight into Redis.
    let receivers = redis_publish(&redis, "fanout:news", &envelope(1_234, "json", br#"{"via":"redis"}"#)).await;
    assert_eq!(receivers, 2, "one Redis subscription per node");

    for sub in [&mut on_b, &mut on_a] {
        for via in ["ws", "http", "redis"] {
            let m = sub.next_value().await;
            assert_eq!(m["data"], json!({"via": via}));
        }
    }
    // ts set by the backend travels unchanged.
    on_b.expect_silence(Duration::from_millis(50)).await;
    redis_publish(&redis, "fanout:news", &envelope(42, "msgpack", &[0x81, 0xa1, b'k', 0x07])).await;
    let m = on_b.next_value().await;
    assert_eq!((m["ts"].clone(), m["data"].clone()), (json!(42), json!({"k":7})));
}

#[tokio::test]
async fn formats_cross_in_both_directions() {
    let redis = RedisServer::start();
    let [a, b] = <[Node; 2]>::try_from(nodes(&redis, 2)).ok().unwrap();
    let mut json_sub = WsClient::json(&b.ws_url()).await;
    let mut mp_sub = WsClient::msgpack(&b.ws_url()).await;
    json_sub.subscribe("x").await;
    mp_sub.subscribe("x").await;
    let data = json!({"s":"héllo ☃","n":-3,"f":2.5,"t":true,"z":null,"nested":{"a":[1,{"b":"c"}]}});
    let mut json_pub = WsClient::json(&a.ws_url()).await;
    let mut mp_pub = WsClient::msgpack(&a.ws_url()).await;
    json_pub.publish("x", data.clone()).await;
    mp_pub.publish("x", data.clone()).await;
    for sub in [&mut json_sub, &mut mp_sub] {
        for _ in 0..2 {
            let m = sub.next_value().await;
            assert_eq!(m["data"], data);
        }
    }
}

#[tokio::test]
async fn thousands_of_publications_arrive_in_order_across_nodes() {
    const N: u64 = 3000;
    let redis = RedisServer::start();
    let [a, b] = <[Node; 2]>::try_from(nodes(&redis, 2)).ok().unwrap();
    let mut subs = vec![
        WsClient::json(&b.ws_url()).await,
        WsClient::msgpack(&b.ws_url()).await,
        WsClient::json(&a.ws_url()).await,
    ];
    for s in &mut subs {
        s.subscribe("seq").await;
    }
    let mut publisher = WsClient::json(&a.ws_url()).await;
    // Pipelined: all commands are sent before any reply is read.
    for i in 0..N {
        publisher.send(json!({"op":"publish","channel":"seq","data":i,"id":i})).await;
    }
    for i in 0..N {
        assert_eq!(publisher.next_value().await, json!({"op":"published","id":i}));
    }
    for s in &mut subs {
        for i in 0..N {
            assert_eq!(s.next_value().await["data"], json!(i));
        }
    }
}

#[tokio::test]
async fn node_holds_one_redis_subscription_per_channel_and_only_while_wanted() {
    let redis = RedisServer::start();
    let node = Node::start(env!("CARGO_BIN_EXE_fanout"), &["--redis-url", &redis.url()]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = WsClient::json(&node.ws_url()).await;
        c.subscribe("shared").await;
        clients.push(c);
    }
    assert_eq!(redis.cli(&["PUBSUB", "NUMSUB", "fanout:shared"]).lines().nth(1), Some("1"));
    assert_eq!(redis.cli(&["PUBSUB", "CHANNELS", "fanout:other"]).trim(), "");
    drop(clients);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while redis.cli(&["PUBSUB", "NUMSUB", "fanout:shared"]).lines().nth(1) != Some("0") {
        assert!(
            std::time::Instant::now() < deadline,
            "node kept the Redis subscription after its last subscriber left"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn garbage_in_redis_is_counted_and_never_delivered() {
    let redis = RedisServer::start();
    let node = Node::start(env!("CARGO_BIN_EXE_fanout"), &["--redis-url", &redis.url()]);
    let mut sub = WsClient::json(&node.ws_url()).await;
    sub.subscribe("g").await;
    let garbage: Vec<Vec<u8>> = vec![
        b"not msgpack".to_vec(),
        vec![],
        envelope(1, "json", b"{broken"),
        envelope(1, "xml", b"<a/>"),
        envelope(1, "msgpack", &[0x92, 0x01]),
        {
            let mut e = envelope(1, "json", b"1");
            e[3] = 2;
            e
        }, // v = 2
    ];
    for g in &garbage {
        redis_publish(&redis, "fanout:g", g).await;
    }
    redis_publish(&redis, "fanout:g", &envelope(7, "json", b"\"fine\"")).await;
    let m = sub.next_value().await;
    assert_eq!((m["ts"].clone(), m["data"].clone()), (json!(7), json!("fine")));
    // Exact: every piece of garbage came before "fine" on the same channel, so each was
    // read, judged and counted by now, and nothing else was.
    assert_eq!(node.metric("fanout_publications_dropped_total").await, garbage.len() as f64);
    assert_eq!(node.metric("fanout_broker_publications_received_total").await, 1.0);
    assert_eq!(http(node.internal, "GET", "/readyz", &[], b"").await.status, 200);
}

/// Last subscribers leaving while new ones join, over and over, on one node: after every
/// round the node must still hold its Redis subscription for the channel that has a
/// subscriber, and deliver to it what another node publishes. (With interest told to the
/// broker out of order, a round could end with Redis unsubscribed after the linger and
/// the subscriber receiving nothing, forever.)
#[tokio::test]
async fn subscription_churn_never_leaves_a_subscriber_deaf() {
    let redis = RedisServer::start();
    let [a, b] = <[Node; 2]>::try_from(nodes(&redis, 2)).ok().unwrap();
    let mut publisher = WsClient::json(&a.ws_url()).await;
    let mut churners = Vec::new();
    for _ in 0..8 {
        churners.push(WsClient::json(&b.ws_url()).await);
    }
    for round in 0..20u64 {
        // Every churner subscribes and unsubscribes, pipelined, all at once.
        for c in &mut churners {
            for i in 0..5 {
                c.send(json!({"op":"subscribe","channel":"churn","id":i * 2})).await;
                c.send(json!({"op":"unsubscribe","channel":"churn","id":i * 2 + 1})).await;
            }
        }
        for c in &mut churners {
            for _ in 0..10 {
                let reply = c.next_value().await;
                assert!(reply["op"] == "subscribed" || reply["op"] == "unsubscribed", "{reply}");
            }
        }
        // One stays; after the linger any wrongly ordered removal would have hit Redis.
        let mut stayer = WsClient::json(&b.ws_url()).await;
        stayer.subscribe("churn").await;
        let linger_passed = std::time::Instant::now() + Duration::from_millis(300);
        while std::time::Instant::now() < linger_passed {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        publisher.publish("churn", json!(round)).await;
        let got = stayer.recv_timeout(Duration::from_secs(10)).await.value();
        assert_eq!(got["data"], json!(round), "round {round}: the subscriber got {got}");
        assert_eq!(redis.cli(&["PUBSUB", "NUMSUB", "fanout:churn"]).lines().nth(1), Some("1"), "round {round}");
    }
}
