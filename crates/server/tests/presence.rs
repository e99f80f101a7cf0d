//! Presence (contract v1.1) through real nodes and a real Redis: who is subscribed and how
//! many, join and leave events on subscribe, unsubscribe and disconnect, a node killed with
//! SIGKILL leaving presence within presence_ttl; the embedded broker; permissions and
//! bad input.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::time::{Duration, SystemTime};

use fanout_testkit::{config_file, eventually, http, Event, Node, RedisServer, WsClient};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_fanout");
const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";
const CONFIG: &str = r#"
[namespaces.room]
presence = true
join_leave = true
presence_ttl = "3s"

[namespaces.quiet]
presence = true
"#;

fn token(sub: &str) -> String {
    let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 600;
    let claims = json!({"sub": sub, "exp": exp, "subscribe": ["room:*", "quiet:*", "plain:*"], "publish": []});
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

async fn connect(node: &Node, user: &str) -> WsClient {
    WsClient::json(&format!("{}?token={}", node.ws_url(), token(user))).await
}

fn args(config: &str, redis: Option<&str>) -> Vec<String> {
    let mut a = vec!["--config".to_owned(), config.to_owned(), "--jwt-hmac-secret".to_owned(), SECRET.to_owned()];
    if let Some(url) = redis {
        a.extend(["--redis-url".to_owned(), url.to_owned()]);
    }
    a
}

fn start(args: &[String]) -> Node {
    Node::start(BIN, &args.iter().map(String::as_str).collect::<Vec<_>>())
}

async fn ask(ws: &mut WsClient, op: &str, channel: &str) -> Value {
    ws.send(json!({"op":op,"channel":channel,"id":7})).await;
    loop {
        let v = ws.next_value().await;
        if v["op"] == op || v["op"] == "error" {
            return v;
        }
    }
}

async fn stats(ws: &mut WsClient, channel: &str) -> (u64, u64) {
    let v = ask(ws, "presence_stats", channel).await;
    (v["clients"].as_u64().unwrap(), v["users"].as_u64().unwrap())
}

/// The next `op` (join or leave) event about `user` that `ws` receives (a subscriber is
/// told of its own join too).
async fn event(ws: &mut WsClient, op: &str, user: &str) -> Value {
    loop {
        let v = ws.recv_timeout(Duration::from_secs(10)).await.value();
        if v["op"] == op && v["user"] == user {
            return v;
        }
    }
}

#[tokio::test]
async fn presence_across_nodes_with_join_leave_and_a_killed_node() {
    let redis = RedisServer::start();
    let config = config_file("presence-redis", CONFIG);
    let a_args = args(config.to_str().unwrap(), Some(&redis.url()));
    let (a, mut b) = (start(&a_args), start(&a_args));
    let mut alice1 = connect(&a, "alice").await;
    alice1.subscribe("room:1").await;
    let mut bob = connect(&b, "bob").await;
    bob.subscribe("room:1").await;
    let joined = event(&mut alice1, "join", "bob").await;
    assert_eq!(joined["channel"], "room:1");
    let bob_client = joined["client"].as_str().unwrap().to_owned();

    let mut alice2 = connect(&b, "alice").await;
    alice2.subscribe("room:1").await;
    eventually("three clients, two users", Duration::from_secs(10), async || {
        stats(&mut alice1, "room:1").await == (3, 2)
    })
    .await;
    let listed = ask(&mut bob, "presence", "room:1").await;
    let mut users: Vec<&str> =
        listed["clients"].as_array().unwrap().iter().map(|c| c["user"].as_str().unwrap()).collect();
    users.sort();
    assert_eq!(users, ["alice", "alice", "bob"], "{listed}");
    assert!(listed["clients"].as_array().unwrap().iter().any(|c| c["client"] == bob_client.as_str()));
    // HTTP has the same shapes.
    let r = http(a.internal, "POST", "/api/presence_stats", &[], br#"{"channel":"room:1"}"#).await;
    assert_eq!(r.json(), json!({"clients":3,"users":2}));

    // Unsubscribe and disconnect both leave, with events.
    bob.send(json!({"op":"unsubscribe","channel":"room:1","id":3})).await;
    assert_eq!(event(&mut alice1, "leave", "bob").await["client"], bob_client.as_str());
    drop(alice2);
    event(&mut alice1, "leave", "alice").await;
    assert_eq!(stats(&mut alice1, "room:1").await, (1, 1));

    // A node that dies leaves no ghosts beyond presence_ttl (3 s).
    let mut carol = connect(&b, "carol").await;
    carol.subscribe("room:1").await;
    eventually("carol is present", Duration::from_secs(10), async || stats(&mut alice1, "room:1").await == (2, 2))
        .await;
    b.signal("KILL");
    b.wait(Duration::from_secs(5));
    let took = eventually("carol's entry expired", Duration::from_secs(15), async || {
        stats(&mut alice1, "room:1").await == (1, 1)
    })
    .await;
    assert!(took <= Duration::from_secs(6), "took {took:?} for a presence_ttl of 3 s");
}

#[tokio::test]
async fn presence_on_the_embedded_broker_permissions_and_bad_input() {
    let config = config_file("presence-embedded", CONFIG);
    let node = start(&args(config.to_str().unwrap(), None));
    let mut x = connect(&node, "x").await;
    x.subscribe("quiet:1").await;
    let mut y = connect(&node, "y").await;
    y.subscribe("quiet:1").await;
    assert_eq!(stats(&mut x, "quiet:1").await, (2, 2));
    let listed = ask(&mut x, "presence", "quiet:1").await;
    assert_eq!(listed["clients"].as_array().unwrap().len(), 2);
    assert_eq!(listed["id"], 7);
    // join_leave is off by default: no events in quiet.
    drop(y);
    eventually("y left", Duration::from_secs(10), async || stats(&mut x, "quiet:1").await == (1, 1)).await;
    x.send(json!({"op":"ping","id":1})).await;
    assert_eq!(x.next_value().await, json!({"op":"pong","id":1}), "no join/leave event arrived first");
    // join_leave where asked for, on the embedded broker too.
    x.subscribe("room:e").await;
    let mut z = connect(&node, "z").await;
    z.subscribe("room:e").await;
    assert_eq!(event(&mut x, "join", "z").await["channel"], "room:e");

    // Not a presence namespace; a channel the token may not subscribe to; bad bodies.
    assert_eq!(ask(&mut x, "presence", "plain:1").await["code"], "bad_request");
    assert_eq!(ask(&mut x, "presence_stats", "secret:1").await["code"], "forbidden");
    let api = format!("http://{}", node.internal);
    let out =
        std::process::Command::new(BIN).args(["presence", "room:e", "--stats", "--api-url", &api]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap(), json!({"clients":2,"users":2}));
    let out = std::process::Command::new(BIN).args(["presence", "room:e", "--api-url", &api]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    let r = http(node.internal, "POST", "/api/presence", &[], br#"{"channel":"room:e"}"#).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["clients"].as_array().unwrap().len(), 2);
    for body in [&br#"{}"#[..], br#"{"channel":"plain:1"}"#, b"nope"] {
        assert_eq!(http(node.internal, "POST", "/api/presence", &[], body).await.status, 400);
    }
    x.send(json!({"op":"ping","id":2})).await;
    let mut v = x.next_value().await;
    while v["op"] != "pong" {
        v = x.next_value().await;
    }
    assert_eq!(v["id"], 2);
    let _ = Event::Timeout;
}
