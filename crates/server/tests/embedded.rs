//! A single node on the embedded broker: the full protocol with no Redis at all.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::time::Duration;

use fanout_testkit::{http, Event, Node, WsClient};
use serde_json::json;

fn node() -> Node {
    Node::start(env!("CARGO_BIN_EXE_fanout"), &[])
}

#[tokio::test]
async fn publish_subscribe_unsubscribe_ping() {
    let node = node();
    let mut sub = WsClient::json(&node.ws_url()).await;
    let mut publisher = WsClient::json(&node.ws_url()).await;
    sub.subscribe("chat:room-1").await;
    publisher.publish("chat:room-1", json!({"text":"hi","n":[1,2]})).await;
    let msg = sub.next_value().await;
    assert_eq!(msg["op"], "message");
    assert_eq!(msg["channel"], "chat:room-1");
    assert_eq!(msg["data"], json!({"text":"hi","n":[1,2]}));
    let ts = msg["ts"].as_u64().expect("ts is an unsigned integer");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64;
    assert!(ts <= now && now - ts < 5_000_000, "ts {ts} is microseconds near now {now}");

    // The publisher is not subscribed and gets nothing but its reply.
    publisher.expect_silence(Duration::from_millis(100)).await;

    sub.send(json!({"op":"ping","id":42})).await;
    assert_eq!(sub.next_value().await, json!({"op":"pong","id":42}));
    sub.send(json!({"op":"ping"})).await;
    assert_eq!(sub.next_value().await, json!({"op":"pong"}));

    sub.send(json!({"op":"unsubscribe","channel":"chat:room-1","id":7})).await;
    assert_eq!(sub.next_value().await, json!({"op":"unsubscribed","channel":"chat:room-1","id":7}));
    publisher.publish("chat:room-1", json!(1)).await;
    sub.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn duplicate_subscription_delivers_once() {
    let node = node();
    let mut sub = WsClient::json(&node.ws_url()).await;
    sub.subscribe("a").await;
    sub.subscribe("a").await;
    let mut p = WsClient::json(&node.ws_url()).await;
    p.publish("a", json!("x")).await;
    assert_eq!(sub.next_value().await["data"], "x");
    sub.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn http_api_publish_and_broadcast_in_both_formats() {
    let node = node();
    let mut json_sub = WsClient::json(&node.ws_url()).await;
    let mut mp_sub = WsClient::msgpack(&node.ws_url()).await;
    for c in ["a", "b"] {
        json_sub.subscribe(c).await;
        mp_sub.subscribe(c).await;
    }
    let r = http(
        node.internal,
        "POST",
        "/api/publish",
        &[("Content-Type", "application/json")],
        br#"{"channel":"a","data":{"k":"v"}}"#,
    )
    .await;
    assert_eq!((r.status, r.json()), (200, json!({"ok":true})));
    for sub in [&mut json_sub, &mut mp_sub] {
        let m = sub.next_value().await;
        assert_eq!((m["channel"].clone(), m["data"].clone()), (json!("a"), json!({"k":"v"})));
    }

    // A MessagePack body, answered in MessagePack.
    let mut body = Vec::new();
    let v = rmpv::Value::Map(vec![
        ("channels".into(), rmpv::Value::Array(vec!["a".into(), "b".into()])),
        ("data".into(), rmpv::Value::Map(vec![("n".into(), 5.into())])),
    ]);
    rmpv::encode::write_value(&mut body, &v).unwrap();
    let r = http(node.internal, "POST", "/api/broadcast", &[("Content-Type", "application/msgpack")], &body).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/msgpack"));
    assert_eq!(rmpv::decode::read_value(&mut &r.body[..]).unwrap(), rmpv::Value::Map(vec![("ok".into(), true.into())]));
    for sub in [&mut json_sub, &mut mp_sub] {
        let first = sub.next_value().await;
        let second = sub.next_value().await;
        assert_eq!((first["channel"].clone(), second["channel"].clone()), (json!("a"), json!("b")));
        assert_eq!(first["data"], json!({"n":5}));
        // One broadcast is one publication: both channels carry the same ts.
        assert_eq!(first["ts"], second["ts"]);
    }
}

#[tokio::test]
async fn health_and_readiness() {
    let node = node();
    assert_eq!(http(node.public, "GET", "/healthz", &[], b"").await.status, 200);
    assert_eq!(http(node.internal, "GET", "/healthz", &[], b"").await.status, 200);
    assert_eq!(http(node.internal, "GET", "/readyz", &[], b"").await.status, 200);
    assert_eq!(http(node.public, "GET", "/nope", &[], b"").await.status, 404);
    // Plain GET /ws without an upgrade is refused, not served.
    assert_eq!(http(node.public, "GET", "/ws", &[], b"").await.status, 426);
}

#[tokio::test]
async fn subprotocol_negotiation() {
    let node = node();
    assert_eq!(WsClient::connect(&node.ws_url(), Some("graphql-ws")).await.err(), Some(400));
    // No header: JSON.
    let mut c = WsClient::connect(&node.ws_url(), None).await.unwrap();
    c.send(json!({"op":"ping","id":1})).await;
    assert!(matches!(c.recv().await, Event::Json(_)));
    // Several offered, one known: accepted and echoed.
    let c = WsClient::connect(&node.ws_url(), Some("chat, fanout.v1.msgpack")).await.unwrap();
    drop(c);
    let mut c = WsClient::msgpack(&node.ws_url()).await;
    c.send(json!({"op":"ping","id":3})).await;
    assert_eq!(c.recv().await, Event::MsgPack(json!({"op":"pong","id":3})));
}

/// `--demo` serves the demo page and the client bundle it imports on the public listener;
/// without it they do not exist, and namespace `demo` keeps history only with it.
#[tokio::test]
async fn the_demo_is_served_only_when_asked_for() {
    let demo = Node::start(env!("CARGO_BIN_EXE_fanout"), &["--demo"]);
    let page = http(demo.public, "GET", "/demo", &[], b"").await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    assert!(page.text().contains("import { Client } from \"./fanout.js\""));
    let js = http(demo.public, "GET", "/fanout.js", &[], b"").await;
    assert_eq!(js.status, 200);
    assert!(js.header("content-type").unwrap().starts_with("text/javascript"));
    assert!(js.text().contains("export class Client"));
    let mut ws = WsClient::json(&demo.ws_url()).await;
    ws.send(json!({"op":"subscribe","channel":"demo:chat","id":1})).await;
    assert_eq!(ws.next_value().await["offset"], 0, "demo keeps history");

    let plain = node();
    assert_eq!(http(plain.public, "GET", "/demo", &[], b"").await.status, 404);
    assert_eq!(http(plain.public, "GET", "/fanout.js", &[], b"").await.status, 404);
}
