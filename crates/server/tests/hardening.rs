//! The core under adversarial and unlucky conditions, through real nodes, real Redis and
//! real clients: bytes sent with the upgrade, starvation under constant traffic, control
//! frame floods, replies due at a drain, slow and never-ending HTTP bodies, silent
//! connections filling the accept pool, Redis input that is too large or has no form in
//! one wire format, what an untrusted client may learn when the broker fails, and a node
//! that runs out of file descriptors.
//! Every test here failed before the fix it guards.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, SystemTime},
};

use fanout_protocol::{encode_envelope, Encoding};
use fanout_testkit::{client_frame, http, Event, Node, RawWs, RedisServer, WsClient};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_fanout");
const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";

fn node(args: &[&str]) -> Node {
    Node::start(BIN, args)
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Waits for `check` (30 s: far beyond any healthy run).
async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    fanout_testkit::eventually(what, Duration::from_secs(30), check).await;
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
async fn bytes_sent_with_the_upgrade_request_are_handled_at_once() {
    let node = node(&[]);
    // A ping command and a Ping frame in the same write as the upgrade request; the client
    // then sends nothing more, and must still get both answers.
    let mut first = client_frame(true, 1, br#"{"op":"ping","id":41}"#);
    first.extend(client_frame(true, 9, b"early"));
    let mut c = RawWs::connect_from(node.public, None, &first).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let f = c.frame(Duration::from_secs(10)).await.expect("an answer to what came with the upgrade");
        got.push((f.opcode, f.payload));
    }
    assert!(got.contains(&(1, br#"{"op":"pong","id":41}"#.to_vec())), "{got:?}");
    assert!(got.contains(&(10, b"early".to_vec())), "{got:?}");
}

#[tokio::test]
async fn token_expiry_is_acted_on_under_constant_traffic() {
    let node = node(&["--jwt-hmac-secret", SECRET, "--command-rate", "0", "--outbound-queue-bytes", "67108864"]);
    let url_for = |exp_in: u64| {
        let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + exp_in;
        let claims = json!({"sub":"a","exp":exp,"subscribe":["firehose"],"publish":["firehose"]});
        let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
        format!("{}?token={token}", node.ws_url())
    };
    let url = url_for(2);
    // The subscriber reads as fast as it can (discarding), and publishers keep its outbox
    // busy: the case where a session polling its outbox first never looked at its timer
    // (or its socket's input) again. The publishers stay at most GAP messages ahead of
    // what the subscriber has read, so its outbox is never empty yet never overflows: on a
    // loaded machine an unpaced flood closed it as a slow consumer before its expiry.
    const GAP: u64 = 20_000;
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let read = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut sub = WsClient::connect(&url, None).await.unwrap();
    sub.subscribe("firehose").await;
    let reader = {
        let read = read.clone();
        tokio::spawn(async move {
            loop {
                match sub.recv_timeout(Duration::from_secs(30)).await {
                    Event::Close(_) | Event::Timeout => return,
                    _ => read.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                };
            }
        })
    };
    let publishers: Vec<_> = (0..4)
        .map(|_| {
            let url = url_for(3600);
            let (sent, read) = (sent.clone(), read.clone());
            tokio::spawn(async move {
                use std::sync::atomic::Ordering::Relaxed;
                let mut p = WsClient::connect(&url, None).await.unwrap();
                loop {
                    if sent.load(Relaxed).saturating_sub(read.load(Relaxed)) < GAP {
                        for _ in 0..100 {
                            p.send(json!({"op":"publish","channel":"firehose","data":"0123456789"})).await;
                        }
                        sent.fetch_add(100, Relaxed);
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    // exp (2 s, rounded down to a second) + the default 5 s leeway, plus a margin for a
    // loaded machine; it used to never happen.
    let closes = async || {
        let body = http(node.internal, "GET", "/metrics", &[], b"").await.text();
        let mut closed: Vec<String> = fanout_testkit::parse_metrics(&body)
            .into_iter()
            .filter(|(series, n)| series.starts_with("fanout_connections_closed_total{") && *n > 0.0)
            .map(|(series, n)| format!("{series} {n}"))
            .collect();
        closed.sort();
        closed.join("; ")
    };
    let waited = tokio::time::timeout(Duration::from_secs(20), async {
        while node.metric_with("fanout_connections_closed_total", "reason=\"auth_expired\"").await != 1.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the busy connection was not closed at token expiry; closes: {}", closes().await);
    assert!(read.load(std::sync::atomic::Ordering::Relaxed) > GAP, "too little traffic to keep the outbox busy");
    for p in publishers {
        p.abort();
    }
    reader.abort();
}

#[tokio::test]
async fn pings_count_against_the_command_rate() {
    let node = node(&["--command-rate", "10", "--command-burst", "20"]);
    let mut c = RawWs::connect(node.public).await;
    // Far over 3x the rate for longer than the burst: closed like any command flood.
    let pings: Vec<u8> = (0..2000).flat_map(|_| client_frame(true, 9, b"p")).collect();
    c.send(&pings).await;
    assert_eq!(c.close_code().await, Some(1008));
}

#[tokio::test]
async fn a_pinger_that_never_reads_pins_almost_nothing() {
    let node = node(&["--command-rate", "0"]);
    let mut c = RawWs::connect(node.public).await;
    c.send(&client_frame(true, 1, br#"{"op":"ping","id":1}"#)).await;
    assert_eq!(c.json().await, json!({"op":"pong","id":1}));
    let before = rss_kib(node.pid());
    // 300,000 Pings, never reading the Pongs: with a Pong queued per Ping this was ~20 MB
    // of frames and queue entries (and 4008 once 1 MiB of 2-byte Pongs was charged).
    let burst: Vec<u8> = (0..10_000).flat_map(|_| client_frame(true, 9, b"")).collect();
    for _ in 0..30 {
        c.send(&burst).await;
    }
    // The node has read them all once its receive queue is empty: ask it something and
    // wait for the answer behind every Pong it chose to send.
    c.send(&client_frame(true, 1, br#"{"op":"ping","id":2}"#)).await;
    let answered = loop {
        let f = c.frame(Duration::from_secs(30)).await.expect("the connection stays open");
        if f.opcode == 1 {
            break f.payload;
        }
        assert_eq!(f.opcode, 10, "only Pongs before the reply");
    };
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&answered).unwrap(), json!({"op":"pong","id":2}));
    let grown = rss_kib(node.pid()).saturating_sub(before);
    assert!(grown < 8 * 1024, "the node grew by {grown} KiB for a pinger");
}

/// A client whose `publish` (with `id`) the node has handed to Redis, which is frozen.
async fn publish_into_frozen_redis(redis: &RedisServer, node: &Node, id: u64) -> WsClient {
    let mut c = WsClient::json(&node.ws_url()).await;
    redis.freeze();
    c.send(json!({"op":"publish","channel":"acks","data":1,"id":id})).await;
    eventually("the publish is waiting on the frozen Redis", async || {
        node.metric("fanout_broker_publishes_in_flight").await == 1.0
    })
    .await;
    c
}

#[tokio::test]
async fn a_reply_due_when_the_drain_starts_goes_out_before_1001() {
    let redis = RedisServer::start();
    let node = node(&["--redis-url", &redis.url(), "--broker-timeout", "30s"]);
    let mut c = publish_into_frozen_redis(&redis, &node, 7).await;
    node.signal("TERM");
    eventually("the node is draining", async || http(node.internal, "GET", "/readyz", &[], b"").await.status == 503)
        .await;
    redis.thaw();
    let mut reply = None;
    loop {
        match c.recv_timeout(Duration::from_secs(30)).await {
            Event::Close(code) => {
                assert_eq!(code, Some(1001));
                break;
            }
            Event::Timeout => panic!("no 1001"),
            event => reply = reply.or(Some(event.value())),
        }
    }
    let reply = reply.expect("the publish the broker took got no reply before 1001");
    assert_eq!(reply["id"], 7, "{reply}");
    assert_eq!(reply["op"], "published", "{reply}");
}

#[tokio::test]
async fn a_publish_may_wait_for_the_whole_broker_timeout() {
    let redis = RedisServer::start();
    let node = node(&["--redis-url", &redis.url(), "--broker-timeout", "20s"]);
    let mut c = publish_into_frozen_redis(&redis, &node, 3).await;
    // Past the 2 s the publish used to be capped at, well inside broker_timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.thaw();
    let reply = c.recv_timeout(Duration::from_secs(30)).await.value();
    assert_eq!(reply, json!({"op":"published","id":3}));
}

/// Writes `head` and returns the status line of the answer (or "" when the connection is
/// closed without one).
async fn raw_http(addr: std::net::SocketAddr, head: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn an_api_body_that_never_finishes_is_answered_408() {
    let node = node(&["--handshake-timeout", "1s"]);
    let status = raw_http(
        node.internal,
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"chan",
    )
    .await;
    assert!(status.starts_with("HTTP/1.1 408"), "{status:?}");
}

#[tokio::test]
async fn the_api_key_scheme_is_case_insensitive_like_the_upgrade() {
    let node = node(&["--api-key", "k3y"]);
    for auth in ["Bearer k3y", "bearer k3y", "BEARER  k3y"] {
        let r = http(node.internal, "POST", "/api/publish", &[("Authorization", auth)], br#"{"channel":"a","data":1}"#)
            .await;
        assert_eq!(r.status, 200, "{auth}: {}", r.text());
    }
    let r =
        http(node.internal, "POST", "/api/publish", &[("Authorization", "Basic k3y")], br#"{"channel":"a","data":1}"#)
            .await;
    assert_eq!(r.status, 401);
}

/// Opens `n` TCP connections from `source` that never send a byte.
async fn silent(node: &Node, source: IpAddr, n: usize) -> Vec<tokio::net::TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(RawWs::tcp_from(node.public, Some(source)).await);
    }
    conns
}

/// An upgrade from `source` that must succeed and answer a ping.
async fn works_from(node: &Node, source: IpAddr) {
    let ping = client_frame(true, 1, br#"{"op":"ping","id":5}"#);
    let mut c = tokio::time::timeout(Duration::from_secs(20), RawWs::connect_from(node.public, Some(source), &ping))
        .await
        .expect("the upgrade was not served");
    assert_eq!(c.json().await, json!({"op":"pong","id":5}));
}

#[tokio::test]
async fn silent_connections_from_one_address_cannot_lock_others_out() {
    let node = node(&["--max-pending-connections", "100", "--handshake-timeout", "60s"]);
    // One address opens the whole pool's worth and more; it may hold a tenth of it.
    let _hog = silent(&node, loopback(1), 150).await;
    eventually("the extra connections are refused", async || {
        node.metric("fanout_listener_connections_dropped_total").await >= 140.0
    })
    .await;
    works_from(&node, loopback(2)).await;
}

#[tokio::test]
async fn a_full_pool_sheds_its_oldest_silent_connection_for_a_newcomer() {
    let node = node(&["--max-pending-connections", "100", "--handshake-timeout", "60s"]);
    // Ten addresses, ten silent connections each: the pool is full, nobody over its share.
    let mut oldest = RawWs::tcp_from(node.public, Some(loopback(10))).await;
    let mut pool = silent(&node, loopback(10), 9).await;
    for i in 11..20 {
        pool.extend(silent(&node, loopback(i), 10).await);
    }
    works_from(&node, loopback(3)).await;
    // The connection that was silent longest made the room.
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(20), oldest.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the oldest silent connection is still open: {read:?}");
    assert!(node.metric("fanout_listener_connections_dropped_total").await >= 1.0);
}

#[tokio::test]
async fn a_node_out_of_descriptors_says_so_counts_it_and_serves_again_once_some_free() {
    let node = node(&[]);
    let pid = node.pid();
    // A few descriptors above what the idle node holds, so that a handful of connections
    // use them up; the rest wait in the kernel's backlog.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let limit = open + 4;
    let set = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:{limit}"))
        .status()
        .expect("prlimit (util-linux) runs");
    assert!(set.success(), "prlimit failed: {set}");
    let hog = silent(&node, loopback(1), 20).await;
    eventually("the node says it has no descriptor left", async || {
        node.logs().contains("accept failed: no file descriptor left")
    })
    .await;
    drop(hog);
    eventually("every failed accept is counted", async || {
        node.metric_with("fanout_listener_accept_errors_total", "kind=\"descriptors\"").await >= 1.0
    })
    .await;
    assert_eq!(node.metric_with("fanout_listener_accept_errors_total", "kind=\"other\"").await, 0.0);
    works_from(&node, loopback(2)).await;
    assert_eq!(node.logs().matches("accept failed").count(), 1, "one line per ten seconds: {}", node.logs());
}

#[tokio::test]
async fn a_publication_too_large_from_redis_is_dropped_not_fatal_to_subscribers() {
    let redis = RedisServer::start();
    let node = node(&["--redis-url", &redis.url()]);
    let mut sub = WsClient::json(&node.ws_url()).await;
    sub.subscribe("big").await;
    let huge = format!("\"{}\"", "x".repeat(2 << 20));
    redis.publish_raw("fanout:big", &encode_envelope(1, Encoding::Json, huge.as_bytes())).await;
    redis.publish_raw("fanout:big", &encode_envelope(2, Encoding::Json, b"\"small\"")).await;
    let got = sub.recv_timeout(Duration::from_secs(10)).await.value();
    assert_eq!(got["data"], "small", "{got}");
    assert_eq!(got["ts"], 2);
    let dropped = node.metric("fanout_publications_dropped_total").await;
    assert!(dropped >= 1.0, "the drop is not counted");
}

#[tokio::test]
async fn redis_data_without_a_form_in_one_format_reaches_nobody_and_is_counted() {
    let redis = RedisServer::start();
    let node = node(&["--redis-url", &redis.url()]);
    let mut json_sub = WsClient::json(&node.ws_url()).await;
    let mut mp_sub = WsClient::msgpack(&node.ws_url()).await;
    json_sub.subscribe("mixed").await;
    mp_sub.subscribe("mixed").await;
    // Invalid UTF-8 in a JSON string (a conforming client fails the connection with 1007),
    // a number out of MessagePack's range, a MessagePack extension type.
    redis.publish_raw("fanout:mixed", &encode_envelope(1, Encoding::Json, b"\"\xff\xfe\"")).await;
    redis.publish_raw("fanout:mixed", &encode_envelope(2, Encoding::Json, b"1e999")).await;
    redis.publish_raw("fanout:mixed", &encode_envelope(3, Encoding::MsgPack, &[0xd4, 0x01, 0x00])).await;
    redis.publish_raw("fanout:mixed", &encode_envelope(4, Encoding::Json, b"\"fine\"")).await;
    for sub in [&mut json_sub, &mut mp_sub] {
        let got = sub.recv_timeout(Duration::from_secs(10)).await.value();
        assert_eq!((got["ts"].clone(), got["data"].clone()), (json!(4), json!("fine")), "{got}");
    }
    assert_eq!(node.metric("fanout_publications_dropped_total").await, 3.0);
}

#[tokio::test]
async fn data_without_a_form_in_one_format_is_refused_at_ingress() {
    let node = node(&[]);
    let mut c = WsClient::json(&node.ws_url()).await;
    c.send_raw(tokio_tungstenite::tungstenite::Message::Text(
        r#"{"op":"publish","channel":"x","data":[1e999],"id":9}"#.into(),
    ))
    .await;
    let reply = c.next_value().await;
    assert_eq!(
        (reply["op"].as_str(), reply["code"].as_str(), reply["id"].as_u64()),
        (Some("error"), Some("bad_request"), Some(9))
    );
    let r = http(node.internal, "POST", "/api/publish", &[], br#"{"channel":"x","data":"\ud800"}"#).await;
    assert_eq!(r.status, 400, "{}", r.text());
    // A MessagePack client publishing an extension type.
    let mut m = WsClient::msgpack(&node.ws_url()).await;
    let cmd = [
        &[0x84, 0xa2, b'o', b'p', 0xa7][..],
        b"publish",
        &[0xa7],
        b"channel",
        &[0xa1, b'x', 0xa4],
        b"data",
        &[0xd4, 0x01, 0x00, 0xa2, b'i', b'd', 0x0a],
    ]
    .concat();
    m.send_raw(tokio_tungstenite::tungstenite::Message::Binary(cmd.into())).await;
    let reply = m.next_value().await;
    assert_eq!((reply["code"].as_str(), reply["id"].as_u64()), (Some("bad_request"), Some(10)), "{reply}");
}

#[tokio::test]
async fn a_broker_failure_tells_the_client_nothing_about_redis() {
    let redis = RedisServer::start();
    // Redis refuses channels outside fanout:ok* (an ACL), so SUBSCRIBE fails with Redis's
    // own NOPERM text and the server's address would be in reach of the message.
    redis.cli(&["ACL", "SETUSER", "default", "resetchannels", "&fanout:ok*"]);
    let node = node(&["--redis-url", &redis.url()]);
    let mut c = WsClient::json(&node.ws_url()).await;
    c.send(json!({"op":"subscribe","channel":"secret","id":1})).await;
    let reply = c.next_value().await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
    let message = reply["message"].as_str().unwrap().to_lowercase();
    let port = redis.port().to_string();
    for leak in ["noperm", "redis", "127.0.0.1", port.as_str(), "acl"] {
        assert!(!message.contains(leak), "the client learnt {leak:?}: {message}");
    }
    // Redis gone: neither the WebSocket nor the HTTP API says where it was.
    drop(redis);
    eventually("the broker is down", async || node.metric("fanout_broker_up").await == 0.0).await;
    let r = http(node.internal, "POST", "/api/publish", &[], br#"{"channel":"a","data":1}"#).await;
    assert_eq!(r.status, 503);
    assert!(!r.text().contains("127.0.0.1") && !r.text().contains(&port), "{}", r.text());
    c.send(json!({"op":"publish","channel":"a","data":1,"id":2})).await;
    let reply = c.next_value().await;
    assert_eq!(reply["code"], "unavailable");
    assert!(!reply["message"].as_str().unwrap().contains(&port), "{reply}");
}

#[tokio::test]
async fn refresh_costs_a_signature_check_so_it_has_its_own_small_rate() {
    let node = node(&["--jwt-hmac-secret", SECRET, "--command-rate", "0"]);
    let exp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() + 600;
    let token = encode(&Header::default(), &json!({"sub":"a","exp":exp}), &EncodingKey::from_secret(SECRET.as_bytes()))
        .unwrap();
    let mut c = WsClient::connect(&format!("{}?token={token}", node.ws_url()), None).await.unwrap();
    let mut codes = Vec::new();
    for id in 0..20 {
        c.send(json!({"op":"refresh","token":"not.a.token","id":id})).await;
        codes.push(c.next_value().await["code"].as_str().unwrap_or_default().to_owned());
    }
    // The burst of 8 is checked (and refused as forbidden); past it, one a second (a slow
    // machine may refill one or two), and the rest are not even parsed.
    let checked = codes.iter().filter(|c| *c == "forbidden").count();
    assert!((8..=10).contains(&checked), "{codes:?}");
    assert_eq!(codes[..8], ["forbidden"; 8], "{codes:?}");
    assert_eq!(codes.iter().filter(|c| *c == "rate_limited").count(), 20 - checked, "{codes:?}");
}
