//! The server API (contract v1.1) through real nodes: `POST /api/disconnect` (4009) and
//! `POST /api/unsubscribe` (`reason:"server"`) reach a user's connections on every node
//! through Redis's control channel; `GET /api/channels` and `GET /api/nodes` list the
//! cluster from every live node's report, and a killed node drops out; the same on the
//! embedded broker; bad input.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::time::{Duration, SystemTime};

use fanout_testkit::{eventually, http, Event, Node, RedisServer, WsClient};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_fanout");
const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";

fn token(sub: &str) -> String {
    let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 600;
    let claims = json!({"sub": sub, "exp": exp, "subscribe": ["chat:*"], "publish": ["chat:*"]});
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

async fn connect(node: &Node, user: &str) -> WsClient {
    WsClient::json(&format!("{}?token={}", node.ws_url(), token(user))).await
}

async fn post(node: &Node, path: &str, body: Value) -> (u16, Value) {
    let r = http(node.internal, "POST", path, &[], body.to_string().as_bytes()).await;
    (r.status, r.json())
}

async fn get(node: &Node, path: &str) -> Value {
    let r = http(node.internal, "GET", path, &[], b"").await;
    assert_eq!(r.status, 200, "{path}: {}", r.text());
    r.json()
}

#[tokio::test]
async fn disconnect_and_unsubscribe_reach_a_user_on_every_node() {
    let redis = RedisServer::start();
    let args = ["--redis-url", &redis.url(), "--jwt-hmac-secret", SECRET];
    let (a, b) = (Node::start(BIN, &args), Node::start(BIN, &args));
    let (mut u1a, mut u1b, mut u2) = (connect(&a, "u1").await, connect(&b, "u1").await, connect(&b, "u2").await);
    for c in [&mut u1a, &mut u1b, &mut u2] {
        c.subscribe("chat:1").await;
        c.subscribe("chat:2").await;
    }
    // Out of chat:1 everywhere; the other user and the other channel are untouched.
    assert_eq!(post(&a, "/api/unsubscribe", json!({"user":"u1","channel":"chat:1"})).await, (200, json!({"ok":true})));
    for c in [&mut u1a, &mut u1b] {
        assert_eq!(c.next_value().await, json!({"op":"unsubscribed","channel":"chat:1","reason":"server"}));
    }
    assert_eq!(post(&b, "/api/publish", json!({"channel":"chat:1","data":"one"})).await.0, 200);
    assert_eq!(post(&b, "/api/publish", json!({"channel":"chat:2","data":"two"})).await.0, 200);
    assert_eq!(u2.next_value().await["data"], "one");
    assert_eq!(u2.next_value().await["data"], "two");
    for c in [&mut u1a, &mut u1b] {
        assert_eq!(c.next_value().await["data"], "two", "chat:1 is gone, chat:2 stays");
    }

    // Disconnected everywhere with 4009; u2 stays.
    assert_eq!(post(&b, "/api/disconnect", json!({"user":"u1"})).await, (200, json!({"ok":true})));
    for c in [&mut u1a, &mut u1b] {
        assert_eq!(c.recv_timeout(Duration::from_secs(10)).await, Event::Close(Some(4009)));
    }
    u2.send(json!({"op":"ping","id":9})).await;
    assert_eq!(u2.next_value().await, json!({"op":"pong","id":9}));
    eventually("the kick counted", Duration::from_secs(10), async || {
        a.metric_with("fanout_connections_closed_total", "reason=\"kicked\"").await == 1.0
    })
    .await;
    assert!(b.metric_with("fanout_server_api_calls_total", "endpoint=\"disconnect\",outcome=\"ok\"").await >= 1.0);

    // Nobody by that name: done, nothing to do. Malformed: 400.
    assert_eq!(post(&a, "/api/disconnect", json!({"user":"nobody"})).await.0, 200);
    assert_eq!(post(&a, "/api/unsubscribe", json!({"user":"u2","channel":"chat:none"})).await.0, 200);
    for (path, body) in [
        ("/api/disconnect", json!({})),
        ("/api/disconnect", json!({"user":5})),
        ("/api/unsubscribe", json!({"user":"u2"})),
        ("/api/unsubscribe", json!({"user":"u2","channel":"bad name"})),
    ] {
        assert_eq!(post(&a, path, body.clone()).await.0, 400, "{path} {body}");
    }
    u2.send(json!({"op":"ping","id":10})).await;
    assert_eq!(u2.next_value().await, json!({"op":"pong","id":10}));
}

#[tokio::test]
async fn channels_and_nodes_list_the_cluster_and_a_killed_node_drops_out() {
    let redis = RedisServer::start();
    let args = ["--redis-url", &redis.url()];
    let (a, mut b) = (Node::start(BIN, &args), Node::start(BIN, &args));
    let mut clients = Vec::new();
    for (node, channel) in [(&a, "chat:1"), (&a, "chat:1"), (&b, "chat:1"), (&b, "news:x"), (&a, "news:x")] {
        let mut c = WsClient::json(&node.ws_url()).await;
        c.subscribe(channel).await;
        clients.push(c);
    }
    let mut listed = json!(null);
    eventually("both nodes reported their channels", Duration::from_secs(10), async || {
        listed = get(&a, "/api/channels").await;
        listed == json!({"channels":[{"channel":"chat:1","subscribers":3},{"channel":"news:x","subscribers":2}]})
    })
    .await;
    assert_eq!(
        get(&b, "/api/channels?namespace=news").await,
        json!({"channels":[{"channel":"news:x","subscribers":2}]})
    );
    let nodes = get(&b, "/api/nodes").await;
    let mut rows: Vec<(u64, u64, u64)> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (n["connections"].as_u64().unwrap(), n["subscriptions"].as_u64().unwrap(), n["channels"].as_u64().unwrap())
        })
        .collect();
    rows.sort();
    assert_eq!(rows, [(2, 2, 2), (3, 3, 2)], "{nodes}");
    for n in nodes["nodes"].as_array().unwrap() {
        assert_eq!(n["version"], env!("CARGO_PKG_VERSION"));
        assert!(n["id"].as_str().unwrap().len() >= 8 && n["uptime_s"].is_u64(), "{n}");
    }
    b.signal("KILL");
    b.wait(Duration::from_secs(5));
    let took = eventually("the killed node left /api/nodes", Duration::from_secs(15), async || {
        get(&a, "/api/nodes").await["nodes"].as_array().unwrap().len() == 1
    })
    .await;
    assert!(took <= Duration::from_secs(8), "took {took:?}");
    assert_eq!(get(&a, "/api/channels").await["channels"][0], json!({"channel":"chat:1","subscribers":2}));
}

#[tokio::test]
async fn the_embedded_broker_serves_the_same_api_for_one_node() {
    let node = Node::start(BIN, &["--jwt-hmac-secret", SECRET]);
    let mut c = connect(&node, "solo").await;
    c.subscribe("chat:e").await;
    let nodes = get(&node, "/api/nodes").await;
    assert_eq!(nodes["nodes"].as_array().unwrap().len(), 1);
    assert_eq!(nodes["nodes"][0]["connections"], 1);
    assert_eq!(get(&node, "/api/channels").await, json!({"channels":[{"channel":"chat:e","subscribers":1}]}));
    assert_eq!(post(&node, "/api/unsubscribe", json!({"user":"solo","channel":"chat:e"})).await.0, 200);
    assert_eq!(c.next_value().await, json!({"op":"unsubscribed","channel":"chat:e","reason":"server"}));
    assert_eq!(post(&node, "/api/disconnect", json!({"user":"solo"})).await.0, 200);
    assert_eq!(c.recv_timeout(Duration::from_secs(10)).await, Event::Close(Some(4009)));
    // With an API key, the listings need it too.
    let keyed = Node::start(BIN, &["--api-key", "k"]);
    assert_eq!(http(keyed.internal, "GET", "/api/nodes", &[], b"").await.status, 401);
    let ok = http(keyed.internal, "GET", "/api/nodes", &[("Authorization", "Bearer k")], b"").await;
    assert_eq!(ok.status, 200);
}

/// The CLI (through the publisher crate): `fanout channels`, `fanout nodes`,
/// `fanout disconnect`.
#[tokio::test]
async fn the_cli_lists_and_disconnects() {
    let node = Node::start(BIN, &["--jwt-hmac-secret", SECRET, "--api-key", "k"]);
    let mut c = connect(&node, "cli-user").await;
    c.subscribe("chat:cli").await;
    let api = format!("http://{}", node.internal);
    let cli = |args: &[&str]| {
        let out =
            std::process::Command::new(BIN).args(args).args(["--api-url", &api, "--api-key", "k"]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let channels: Vec<Value> =
        cli(&["channels", "--namespace", "chat"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(channels, [json!({"channel":"chat:cli","subscribers":1})]);
    let nodes: Vec<Value> = cli(&["nodes"]).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!((nodes.len(), nodes[0]["connections"].clone()), (1, json!(1)));
    cli(&["disconnect", "cli-user"]);
    assert_eq!(c.recv_timeout(Duration::from_secs(10)).await, Event::Close(Some(4009)));
    let wrong =
        std::process::Command::new(BIN).args(["nodes", "--api-url", &api, "--api-key", "nope"]).output().unwrap();
    assert_eq!(wrong.status.code(), Some(1), "a refused key is a rejection");
}
