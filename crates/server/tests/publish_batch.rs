//! `POST /api/publish_batch`: many publications in one request, through two real nodes on
//! a real Redis and on the embedded broker: every one delivered once, each channel's in
//! batch order, offsets in history namespaces, per-element results, and bad batches
//! refused whole.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::collections::BTreeMap;

use fanout_testkit::{config_file, http, Node, RedisCluster, RedisServer, WsClient};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_fanout");
const CONFIG: &str = "[namespaces.h]\nhistory_size = 1000\n";

async fn batch(node: &Node, body: &Value) -> (u16, Value) {
    let r = http(node.internal, "POST", "/api/publish_batch", &[], body.to_string().as_bytes()).await;
    (r.status, r.json())
}

/// Publishes 3 × 100 publications (two plain channels, one history channel) in one
/// request on `publisher` and checks `subscriber`'s node delivers all, each channel's in
/// order.
async fn delivers_everything(publisher: &Node, subscriber: &Node) {
    // On three shards: key_slot(fanout:C) % 3 is 0, 2 and 1.
    let channels = ["b:1", "b:2", "h:4"];
    let mut sub = WsClient::json(&subscriber.ws_url()).await;
    for c in channels {
        sub.subscribe(c).await;
    }
    let publications: Vec<Value> = (0..300).map(|i| json!({"channel": channels[i % 3], "data": {"n": i}})).collect();
    let (status, answer) = batch(publisher, &json!({ "publications": publications })).await;
    assert_eq!(status, 200, "{answer}");
    let results = answer["results"].as_array().unwrap();
    assert_eq!((answer["ok"].as_bool(), results.len()), (Some(true), 300), "{answer}");
    // History elements carry their offsets, in batch order: 1, 2, 3, ...
    let offsets: Vec<u64> = results.iter().skip(2).step_by(3).map(|r| r["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, (1..=100).collect::<Vec<_>>());
    assert!(results[0].get("offset").is_none(), "{}", results[0]);
    let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for _ in 0..300 {
        let m = sub.next_value().await;
        got.entry(m["channel"].as_str().unwrap().to_owned()).or_default().push(m["data"]["n"].as_u64().unwrap());
    }
    for (k, c) in channels.iter().enumerate() {
        let want: Vec<u64> = (0..300u64).filter(|i| (*i as usize) % 3 == k).collect();
        assert_eq!(got[*c], want, "{c}: every publication once, in batch order");
    }
}

#[tokio::test]
async fn a_batch_crosses_nodes_in_order() {
    let redis = RedisServer::start();
    let config = config_file("batch-redis", CONFIG);
    let args = ["--redis-url", &redis.url(), "--config", config.to_str().unwrap()];
    let (a, b) = (Node::start(BIN, &args), Node::start(BIN, &args));
    delivers_everything(&a, &b).await;
    // One request went to Redis as commands pipelined on one connection, not 300 requests.
    assert_eq!(a.metric_with("fanout_publications_total", "source=\"http\"").await, 300.0);
}

#[tokio::test]
async fn a_batch_over_shards_and_a_cluster() {
    let config = config_file("batch-shards", CONFIG);
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let list = shards.iter().map(RedisServer::url).collect::<Vec<_>>().join(",");
    let args = ["--redis-shards", &list, "--config", config.to_str().unwrap()];
    let (a, b) = (Node::start(BIN, &args), Node::start(BIN, &args));
    let used: Vec<u64> = futures_util::future::join_all(shards.iter().map(|s| s.command_calls("publish"))).await;
    delivers_everything(&a, &b).await;
    let after: Vec<u64> = futures_util::future::join_all(shards.iter().map(|s| s.command_calls("publish"))).await;
    assert!(after.iter().zip(&used).all(|(x, y)| x > y), "the batch spread over every shard: {after:?}");

    let cluster = RedisCluster::start(3, 0);
    let seeds = cluster.seeds();
    let args = ["--redis-cluster", "--redis-url", &seeds, "--config", config.to_str().unwrap()];
    let (a, b) = (Node::start(BIN, &args), Node::start(BIN, &args));
    delivers_everything(&a, &b).await;
}

#[tokio::test]
async fn a_batch_on_the_embedded_broker() {
    let config = config_file("batch-embedded", CONFIG);
    let node = Node::start(BIN, &["--config", config.to_str().unwrap()]);
    delivers_everything(&node, &node).await;
}

#[tokio::test]
async fn bad_batches_are_refused_whole() {
    let node = Node::start(BIN, &["--max-message-size", "1024"]);
    let mut sub = WsClient::json(&node.ws_url()).await;
    sub.subscribe("x").await;
    for (body, status, wanted) in [
        (json!({"publications": []}), 400, "is empty"),
        (
            json!({"publications": [{"channel": "x", "data": 1}, {"channel": "no spaces", "data": 1}]}),
            400,
            "publications[1]",
        ),
        (json!({"publications": [{"channel": "x", "data": 1}, {"channel": "x"}]}), 400, "publications[1]"),
        (json!({"publications": [{"channel": "x", "data": "y".repeat(2000)}]}), 413, "publications[0]"),
        (json!({"nothing": true}), 400, "publications"),
    ] {
        let (got, answer) = batch(&node, &body).await;
        assert_eq!(got, status, "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains(wanted), "{answer}");
    }
    let too_many: Vec<Value> = (0..1001).map(|_| json!({"channel": "x", "data": 1})).collect();
    assert_eq!(batch(&node, &json!({ "publications": too_many })).await.0, 400);
    // Nothing of a refused batch was published: the next message is the one sent now.
    assert_eq!(batch(&node, &json!({"publications": [{"channel": "x", "data": "after"}]})).await.0, 200);
    assert_eq!(sub.next_value().await["data"], "after");
    let r = http(node.internal, "GET", "/api/publish_batch", &[], b"").await;
    assert_eq!(r.status, 405);
}
