//! The contract's bad-input table, driven through a real node: every malformed command
//! gets the named error and the connection survives; every WebSocket-level violation gets
//! the named close code; the node survives all of it.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::time::Duration;

use fanout_testkit::{client_frame, http, Node, RawWs, WsClient};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn node(args: &[&str]) -> Node {
    Node::start(env!("CARGO_BIN_EXE_fanout"), args)
}

#[tokio::test]
async fn command_errors_keep_the_connection_open() {
    let node = node(&["--max-subscriptions", "2"]);
    let mut c = WsClient::json(&node.ws_url()).await;
    let cases: Vec<(Message, serde_json::Value)> = vec![
        (Message::Text("{not json".into()), json!({"code":"bad_request"})),
        (Message::Text("[1,2]".into()), json!({"code":"bad_request"})),
        (Message::Text(r#"{"op":"dance","id":1}"#.into()), json!({"code":"bad_request","id":1})),
        (Message::Text(r#"{"id":2}"#.into()), json!({"code":"bad_request","id":2})),
        (Message::Text(r#"{"op":"subscribe","id":3}"#.into()), json!({"code":"bad_request","id":3})),
        (Message::Text(r#"{"op":"publish","channel":"a","id":4}"#.into()), json!({"code":"bad_request","id":4})),
        (
            Message::Text(r#"{"op":"subscribe","channel":"has space","id":5}"#.into()),
            json!({"code":"bad_request","id":5}),
        ),
        (Message::Text(r#"{"op":"subscribe","channel":"","id":6}"#.into()), json!({"code":"bad_request","id":6})),
        (
            Message::Text(format!(r#"{{"op":"subscribe","channel":"{}","id":7}}"#, "x".repeat(256)).into()),
            json!({"code":"bad_request","id":7}),
        ),
        (Message::Text(r#"{"op":"subscribe","channel":"é","id":8}"#.into()), json!({"code":"bad_request","id":8})),
        (Message::Text(r#"{"op":"ping","id":-1}"#.into()), json!({"code":"bad_request"})),
        (Message::Binary(vec![0xc1, 0xff].into()), json!({"code":"bad_request"})),
        (Message::Binary(vec![0x93, 1, 2, 3].into()), json!({"code":"bad_request"})),
    ];
    for (msg, want) in cases {
        c.send_raw(msg.clone()).await;
        let reply = c.next_value().await;
        assert_eq!(reply["op"], "error", "{msg:?}");
        assert_eq!(reply["code"], want["code"], "{msg:?}");
        assert_eq!(reply.get("id"), want.get("id"), "{msg:?}");
        assert!(reply["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Limits reached are errors too, not disconnects.
    c.subscribe("one").await;
    c.subscribe("two").await;
    c.send(json!({"op":"subscribe","channel":"three","id":9})).await;
    assert_eq!(c.next_value().await["code"], "too_many_subscriptions");
    // Still fully working.
    c.send(json!({"op":"ping","id":10})).await;
    assert_eq!(c.next_value().await, json!({"op":"pong","id":10}));
    assert!(node.metric("fanout_command_errors_total").await >= 14.0);
}

#[tokio::test]
async fn oversized_messages_close_with_1009() {
    let node = node(&["--max-message-size", "1024", "--outbound-queue-bytes", "65536"]);
    // One frame over the limit.
    let mut c = RawWs::connect(node.public).await;
    c.send(&client_frame(true, 1, &vec![b' '; 1025])).await;
    assert_eq!(c.close_code().await, Some(1009));
    // Fragments that are each small but together exceed it.
    let mut c = RawWs::connect(node.public).await;
    c.send(&client_frame(false, 1, &[b' '; 600])).await;
    c.send(&client_frame(true, 0, &[b' '; 600])).await;
    assert_eq!(c.close_code().await, Some(1009));
    // A message exactly at the limit is fine.
    let mut ok = RawWs::connect(node.public).await;
    let mut body = br#"{"op":"ping","id":1}"#.to_vec();
    body.resize(1024, b' ');
    ok.send(&client_frame(true, 1, &body)).await;
    assert_eq!(ok.json().await, json!({"op":"pong","id":1}));
}

#[tokio::test]
async fn websocket_violations_get_their_close_codes() {
    let node = node(&[]);
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("invalid UTF-8 text", client_frame(true, 1, &[0xc3, 0x28]), 1007),
        (
            "invalid UTF-8 across fragments",
            [client_frame(false, 1, b"ok"), client_frame(true, 0, &[0xff])].concat(),
            1007,
        ),
        ("unmasked frame", vec![0x81, 0x02, b'h', b'i'], 1002),
        (
            "reserved bits",
            {
                let mut f = client_frame(true, 1, b"{}");
                f[0] |= 0x40;
                f
            },
            1002,
        ),
        ("unknown opcode", client_frame(true, 0x3, b""), 1002),
        ("fragmented ping", client_frame(false, 0x9, b""), 1002),
        ("continuation without start", client_frame(true, 0, b"x"), 1002),
        ("bad close code", client_frame(true, 8, &[0x03, 0xed]), 1002),
    ];
    for (what, bytes, code) in cases {
        let mut c = RawWs::connect(node.public).await;
        c.send(&bytes).await;
        assert_eq!(c.close_code().await, Some(code), "{what}");
    }
    // The node is fine.
    let mut c = WsClient::json(&node.ws_url()).await;
    c.send(json!({"op":"ping","id":1})).await;
    assert_eq!(c.next_value().await, json!({"op":"pong","id":1}));
    assert!(node.metric("fanout_connections_closed_total").await >= 8.0);
}

#[tokio::test]
async fn pings_and_client_close_follow_rfc6455() {
    let node = node(&[]);
    let mut c = RawWs::connect(node.public).await;
    c.send(&client_frame(true, 9, b"abc")).await;
    let pong = c.frame(Duration::from_secs(5)).await.unwrap();
    assert_eq!((pong.opcode, pong.payload), (0xA, b"abc".to_vec()));
    c.send(&client_frame(true, 8, &1000u16.to_be_bytes())).await;
    assert_eq!(c.close_code().await, Some(1000));
}

#[tokio::test]
async fn http_api_rejects_bad_requests_with_contract_codes() {
    let node = node(&["--max-http-body", "4096", "--max-message-size", "1024", "--outbound-queue-bytes", "65536"]);
    let post = |path: &'static str, ct: &'static str, body: Vec<u8>| {
        let addr = node.internal;
        async move { http(addr, "POST", path, &[("Content-Type", ct)], &body).await }
    };
    for body in [&b"{"[..], br#"{"data":1}"#, br#"{"channel":"a b","data":1}"#, br#"{"channel":"a"}"#, b"[]"] {
        let r = post("/api/publish", "application/json", body.to_vec()).await;
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(body));
        assert_eq!(r.json()["error"]["code"], "bad_request");
    }
    let r = post("/api/broadcast", "application/json", br#"{"channels":[],"data":1}"#.to_vec()).await;
    assert_eq!(r.status, 400);
    let r = post("/api/publish", "application/msgpack", b"\xc1".to_vec()).await;
    assert_eq!(r.status, 400);
    let big_body = format!(r#"{{"channel":"a","data":"{}"}}"#, "x".repeat(5000));
    assert_eq!(post("/api/publish", "application/json", big_body.into_bytes()).await.status, 413);
    let big_data = format!(r#"{{"channel":"a","data":"{}"}}"#, "x".repeat(2000));
    let r = post("/api/publish", "application/json", big_data.into_bytes()).await;
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (413, json!("message_too_large")));
    assert_eq!(post("/api/publish", "text/plain", b"x".to_vec()).await.status, 415);
    assert_eq!(http(node.internal, "GET", "/api/publish", &[], b"").await.status, 405);
}

#[tokio::test]
async fn api_key_is_required_when_configured() {
    let node = node(&["--api-key", "s3cret"]);
    let body = br#"{"channel":"a","data":1}"#;
    let r = http(node.internal, "POST", "/api/publish", &[], body).await;
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (401, json!("unauthorized")));
    assert_eq!(
        http(node.internal, "POST", "/api/publish", &[("Authorization", "Bearer wrong")], body).await.status,
        401
    );
    assert_eq!(
        http(node.internal, "POST", "/api/publish", &[("Authorization", "Bearer s3cret")], body).await.status,
        200
    );
}
