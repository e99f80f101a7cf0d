//! More than one Redis: independent shards (`redis_shards`), each channel's traffic on
//! exactly the shard its name hashes to, and one shard's outage confined to its channels.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{collections::BTreeSet, time::Duration};

use fanout_protocol::shard_of;
use fanout_testkit::{eventually, http, publish_cli, Node, RedisServer, WsClient};
use serde_json::json;

const CHANNELS: usize = 48;

fn shards_arg(shards: &[RedisServer]) -> String {
    shards.iter().map(RedisServer::url).collect::<Vec<_>>().join(",")
}

fn shard_nodes(shards: &[RedisServer], n: usize, extra: &[&str]) -> Vec<Node> {
    let list = shards_arg(shards);
    let mut args = vec!["--redis-shards", &list, "--command-rate", "0"];
    args.extend_from_slice(extra);
    (0..n).map(|_| Node::start(env!("CARGO_BIN_EXE_fanout"), &args)).collect()
}

fn shard(channel: &str, shards: usize) -> usize {
    shard_of(&format!("fanout:{channel}"), shards)
}

async fn publish(node: &Node, channel: &str, data: serde_json::Value) -> u16 {
    let body = json!({"channel": channel, "data": data}).to_string();
    http(node.internal, "POST", "/api/publish", &[], body.as_bytes()).await.status
}

/// The messages `client` receives until `n` have arrived, as (channel, data as JSON
/// text), sorted.
async fn receive(client: &mut WsClient, n: usize) -> Vec<(String, String)> {
    let mut got = Vec::new();
    while got.len() < n {
        let m = client.next_value().await;
        assert_eq!(m["op"], "message", "{m}");
        got.push((m["channel"].as_str().unwrap().to_owned(), m["data"].to_string()));
    }
    got.sort();
    got
}

/// What [`receive`] should return for `channels`, each carrying `data(channel)`.
fn expected<S: AsRef<str>>(channels: &[S], data: impl Fn(&str) -> serde_json::Value) -> Vec<(String, String)> {
    let mut want: Vec<_> = channels.iter().map(|c| (c.as_ref().to_owned(), data(c.as_ref()).to_string())).collect();
    want.sort();
    want
}

#[tokio::test]
async fn every_channel_lives_on_exactly_its_shard() {
    let shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let [a, b] = <[Node; 2]>::try_from(shard_nodes(&shards, 2, &[])).ok().unwrap();
    let channels: Vec<String> = (0..CHANNELS).map(|i| format!("c{i}")).collect();
    let mut on_b = WsClient::json(&b.ws_url()).await;
    for c in &channels {
        on_b.subscribe(c).await;
    }
    // The channels spread over every shard, and each shard holds exactly its own.
    for (i, server) in shards.iter().enumerate() {
        let expected: BTreeSet<String> =
            channels.iter().filter(|c| shard(c, 3) == i).map(|c| format!("fanout:{c}")).collect();
        assert!(!expected.is_empty(), "shard {i} got no channel: pick more channels");
        let got: BTreeSet<String> = server.pubsub_channels("fanout:c*").await.into_iter().collect();
        assert_eq!(got, expected, "shard {i}");
    }
    for c in &channels {
        assert_eq!(publish(&a, c, json!({"c": c})).await, 200);
    }
    assert_eq!(
        receive(&mut on_b, CHANNELS).await,
        expected(&channels, |c| json!({"c": c})),
        "every publication arrives once"
    );
    on_b.expect_silence(Duration::from_millis(50)).await;
    // Each publication went to its shard only: the shard's PUBLISH count is its channels'.
    for (i, server) in shards.iter().enumerate() {
        let mine = channels.iter().filter(|c| shard(c, 3) == i).count() as u64;
        assert_eq!(server.command_calls("publish").await, mine, "shard {i}");
    }
    // A backend publishing straight into Redis picks the shard with the documented hash.
    let c = &channels[5];
    let envelope = {
        let v = rmpv::Value::Map(vec![
            ("v".into(), 1.into()),
            ("ts".into(), 7.into()),
            ("enc".into(), "json".into()),
            ("data".into(), rmpv::Value::Binary(br#"{"via":"redis"}"#.to_vec())),
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &v).unwrap();
        buf
    };
    assert_eq!(shards[shard(c, 3)].publish_raw(&format!("fanout:{c}"), &envelope).await, 1);
    assert_eq!(receive(&mut on_b, 1).await, [(c.clone(), json!({"via":"redis"}).to_string())]);
    // `fanout publish --redis-shards` (the Rust publisher) picks the same shards: one
    // broadcast over channels of every shard arrives on each.
    let spread: Vec<&str> = (0..3).map(|i| channels.iter().find(|c| shard(c, 3) == i).unwrap().as_str()).collect();
    let args = ["--redis-shards", &shards_arg(&shards), "--data", r#"{"via":"cli"}"#];
    publish_cli(env!("CARGO_BIN_EXE_fanout"), &args, &spread);
    assert_eq!(receive(&mut on_b, 3).await, expected(&spread, |_| json!({"via":"cli"})));
    // The control plane rides the first shard: /api/nodes sees both nodes.
    eventually("both nodes in /api/nodes", Duration::from_secs(10), async || {
        let r = http(a.internal, "GET", "/api/nodes", &[], b"").await;
        r.json()["nodes"].as_array().map(Vec::len) == Some(2)
    })
    .await;
}

#[tokio::test]
async fn a_shard_that_is_down_stops_only_its_channels() {
    let mut shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
    let [a, b] = <[Node; 2]>::try_from(shard_nodes(&shards, 2, &[])).ok().unwrap();
    let channels: Vec<String> = (0..12).map(|i| format!("d{i}")).collect();
    let (down, up): (Vec<&String>, Vec<&String>) = channels.iter().partition(|c| shard(c, 3) == 1);
    assert!(!down.is_empty() && !up.is_empty());
    let mut on_b = WsClient::json(&b.ws_url()).await;
    for c in &channels {
        on_b.subscribe(c).await;
    }

    shards[1].kill();
    eventually("shard 1 reported down", Duration::from_secs(10), async || {
        a.metric_with("fanout_broker_up", "shard=\"1\"").await == 0.0
    })
    .await;
    // The node stays ready: the other shards' channels are served; /readyz says which is down.
    let r = http(a.internal, "GET", "/readyz", &[], b"").await;
    assert_eq!((r.status, r.text()), (200, "ready; Redis shards down: 1\n".to_owned()));
    assert_eq!(a.metric_with("fanout_broker_up", "shard=\"0\"").await, 1.0);
    for c in &down {
        assert_eq!(publish(&a, c, json!(1)).await, 503, "{c} lives on the shard that is down");
    }
    for c in &up {
        assert_eq!(publish(&a, c, json!({"c": c})).await, 200);
    }
    assert_eq!(receive(&mut on_b, up.len()).await, expected(&up, |c| json!({"c": c})));
    // A new subscription to a channel of the dead shard is refused, not left hanging.
    let mut late = WsClient::json(&b.ws_url()).await;
    late.send(json!({"op":"subscribe","channel":down[0],"id":9})).await;
    let reply = late.next_value().await;
    assert_eq!((reply["op"].as_str(), reply["code"].as_str()), (Some("error"), Some("unavailable")), "{reply}");

    shards[1].restart();
    eventually("shard 1 back", Duration::from_secs(15), async || {
        a.metric_with("fanout_broker_up", "shard=\"1\"").await == 1.0
            && b.metric_with("fanout_broker_up", "shard=\"1\"").await == 1.0
    })
    .await;
    assert_eq!(http(a.internal, "GET", "/readyz", &[], b"").await.text(), "ready\n");
    for c in &down {
        assert_eq!(publish(&a, c, json!({"back": c})).await, 200);
    }
    assert_eq!(
        receive(&mut on_b, down.len()).await,
        expected(&down, |c| json!({"back": c})),
        "the subscribers of the returning shard's channels get its traffic again"
    );
}

#[tokio::test]
async fn a_starting_node_waits_for_every_shard() {
    let first = RedisServer::start();
    let port = RedisServer::unused_port();
    let list = format!("{},redis://127.0.0.1:{port}", first.url());
    let node = Node::start_unready(env!("CARGO_BIN_EXE_fanout"), &["--redis-shards", &list]);
    eventually("shard 0 connected", Duration::from_secs(10), async || {
        node.metric_with("fanout_broker_up", "shard=\"0\"").await == 1.0
    })
    .await;
    // Shard 1 has never been reachable: the node takes no clients it could not serve.
    assert_eq!(http(node.internal, "GET", "/readyz", &[], b"").await.status, 503);
    let _second = RedisServer::start_on(port);
    eventually("ready once every shard is up", Duration::from_secs(15), async || {
        http(node.internal, "GET", "/readyz", &[], b"").await.status == 200
    })
    .await;
}
