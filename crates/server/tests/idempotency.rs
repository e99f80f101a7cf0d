//! Idempotent publishing (contract v1.1) through real nodes: a publication retried with the
//! same `idempotency_key` on the same channel is delivered once and answered like the
//! first, over WebSocket and HTTP, on the embedded broker and across nodes through Redis.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::time::Duration;

use fanout_testkit::{http, Node, RedisServer, WsClient};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_fanout");

async fn api_publish(node: &Node, body: Value) -> (u16, Value) {
    let path = if body.get("channels").is_some() { "/api/broadcast" } else { "/api/publish" };
    let r = http(node.internal, "POST", path, &[], body.to_string().as_bytes()).await;
    (r.status, r.json())
}

/// The next message `sub` receives must be `want` (a publication made after the ones
/// under test, so any duplicate would arrive before it).
async fn next_data(sub: &mut WsClient) -> Value {
    sub.recv_timeout(Duration::from_secs(10)).await.value()["data"].clone()
}

#[tokio::test]
async fn a_retry_with_the_same_key_is_delivered_once_on_the_embedded_broker() {
    let node = Node::start(BIN, &[]);
    let mut sub = WsClient::json(&node.ws_url()).await;
    sub.subscribe("orders").await;
    let mut p = WsClient::json(&node.ws_url()).await;
    for id in [1, 2] {
        p.send(json!({"op":"publish","channel":"orders","data":"paid","idempotency_key":"order-7","id":id})).await;
        assert_eq!(p.next_value().await, json!({"op":"published","id":id}), "answered like the first");
    }
    // Over HTTP, the same key on the same channel is the same publication.
    assert_eq!(api_publish(&node, json!({"channel":"orders","data":"paid","idempotency_key":"order-7"})).await.0, 200);
    // Another key, and the same key on another channel, are new publications.
    p.send(json!({"op":"publish","channel":"orders","data":"shipped","idempotency_key":"order-8","id":3})).await;
    assert_eq!(p.next_value().await["op"], "published");
    assert_eq!(next_data(&mut sub).await, "paid");
    assert_eq!(next_data(&mut sub).await, "shipped", "a duplicate arrived");
    assert_eq!(node.metric("fanout_idempotent_duplicates_total").await, 2.0);
    // Without a key nothing is suppressed.
    for _ in 0..2 {
        assert_eq!(api_publish(&node, json!({"channel":"orders","data":"ping"})).await.0, 200);
    }
    assert_eq!(next_data(&mut sub).await, "ping");
    assert_eq!(next_data(&mut sub).await, "ping");
}

#[tokio::test]
async fn keys_are_cluster_wide_through_redis() {
    let redis = RedisServer::start();
    let args = ["--redis-url", &redis.url()];
    let (a, b) = (Node::start(BIN, &args), Node::start(BIN, &args));
    let mut sub = WsClient::json(&b.ws_url()).await;
    sub.subscribe("pay:1").await;
    // A backend retries on another node after losing the first answer.
    let body = json!({"channel":"pay:1","data":{"amount":5},"idempotency_key":"charge-42"});
    assert_eq!(api_publish(&a, body.clone()).await, (200, json!({"ok":true})));
    assert_eq!(api_publish(&b, body).await, (200, json!({"ok":true})));
    assert_eq!(api_publish(&a, json!({"channel":"pay:1","data":"after"})).await.0, 200);
    assert_eq!(next_data(&mut sub).await, json!({"amount":5}));
    assert_eq!(next_data(&mut sub).await, "after", "the retry on the other node was delivered again");
    assert_eq!(b.metric("fanout_idempotent_duplicates_total").await, 1.0);
    // The key lives under the channel's hash tag and expires with the window.
    let ttl: i64 = redis.cli(&["TTL", "{fanout:pay:1}:idem:charge-42"]).trim().parse().unwrap();
    assert!((1..=300).contains(&ttl), "TTL {ttl}");
}

#[tokio::test]
async fn broadcast_keys_count_per_channel_and_bad_keys_are_refused() {
    let node = Node::start(BIN, &[]);
    let mut sub = WsClient::json(&node.ws_url()).await;
    sub.subscribe("x:1").await;
    sub.subscribe("x:2").await;
    let body = json!({"channels":["x:1","x:2"],"data":"hi","idempotency_key":"b1"});
    assert_eq!(api_publish(&node, body.clone()).await.0, 200);
    assert_eq!(api_publish(&node, body).await.0, 200);
    assert_eq!(api_publish(&node, json!({"channels":["x:1","x:2"],"data":"end"})).await.0, 200);
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next_data(&mut sub).await);
    }
    assert_eq!(got, [json!("hi"), json!("hi"), json!("end"), json!("end")], "each channel once, then the end");
    let (status, reply) = api_publish(&node, json!({"channel":"x:1","data":1,"idempotency_key":"k".repeat(65)})).await;
    assert_eq!((status, reply["error"]["code"].as_str()), (400, Some("bad_request")));
    let mut c = WsClient::json(&node.ws_url()).await;
    c.send(json!({"op":"publish","channel":"x:1","data":1,"idempotency_key":7,"id":9})).await;
    let reply = c.next_value().await;
    assert_eq!((reply["code"].as_str(), reply["id"].as_u64()), (Some("bad_request"), Some(9)));
}
