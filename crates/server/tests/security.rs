//! Security and limits through real nodes and real clients: token verification (HS256, RS256
//! from a PEM key, ES256/RS256 from a JWKS file that is reloaded), forged and expired
//! tokens, channel patterns and namespace rules, expiry closing with 1008 and `refresh`,
//! and every connection and command limit.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use fanout_testkit::{client_frame, http, Event, Node, RawWs, WsClient};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue};

const BIN: &str = env!("CARGO_BIN_EXE_fanout");
const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";

fn key_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys").join(name)
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(key_file("rsa-private.pem")).unwrap()).unwrap()
}

fn ec_key(name: &str) -> EncodingKey {
    EncodingKey::from_ec_pem(&std::fs::read(key_file(name)).unwrap()).unwrap()
}

fn now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs()
}

/// Claims with `exp` this many seconds from now.
fn claims(sub: &str, exp_in: i64, subscribe: &[&str], publish: &[&str]) -> Value {
    json!({"sub": sub, "exp": now() as i64 + exp_in, "subscribe": subscribe, "publish": publish})
}

fn sign(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(String::from);
    encode(&header, claims, key).unwrap()
}

fn hs(claims: &Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET.as_bytes()), None, claims)
}

/// A token with `alg: none` and no signature.
fn unsigned(claims: &Value) -> String {
    let head = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
    format!("{head}.{}.", URL_SAFE_NO_PAD.encode(claims.to_string()))
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fanout-security-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.join(name);
        // Write then rename, as a deploy would, so the node never reads half a file.
        let tmp = self.0.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path.to_str().unwrap().to_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node configured by a TOML file (plus flags).
fn node_with(dir: &TempDir, toml_text: &str, args: &[&str]) -> Node {
    let config = dir.write("fanout.toml", toml_text);
    let mut all = vec!["--config", config.as_str()];
    all.extend_from_slice(args);
    Node::start(BIN, &all)
}

/// Connects with the token in the query string (`Some`), a header, or not at all.
async fn connect(node: &Node, token: Option<&str>, in_header: bool) -> Result<WsClient, u16> {
    let url = match token {
        Some(t) if !in_header => format!("{}?token={t}", node.ws_url()),
        _ => node.ws_url(),
    };
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static("fanout.v1.json"));
    if let (Some(t), true) = (token, in_header) {
        req.headers_mut().insert("Authorization", HeaderValue::from_str(&format!("Bearer {t}")).unwrap());
    }
    WsClient::connect_request(req, false).await
}

async fn connected(node: &Node, token: &str) -> WsClient {
    connect(node, Some(token), false).await.unwrap_or_else(|s| panic!("upgrade refused with {s}"))
}

/// Sends a command and returns the next data frame that is not a publication.
async fn ask(c: &mut WsClient, cmd: Value) -> Value {
    c.send(cmd).await;
    loop {
        let v = c.next_value().await;
        if v["op"] != "message" {
            return v;
        }
    }
}

/// Waits until a metric (as [`metric`] reads it) has `want`: sessions are counted closed
/// only once their goodbye is done.
async fn metric_reaches(node: &Node, name: &str, label: &str, want: f64) {
    let what = format!("{name}{{{label}}} reaches {want}");
    eventually(&what, async || node.metric_with(name, label).await == want).await;
}

/// The `code` of the error reply to `cmd`, or "ok" for any other reply.
async fn outcome(c: &mut WsClient, cmd: Value) -> String {
    let reply = ask(c, cmd).await;
    if reply["op"] == "error" {
        reply["code"].as_str().unwrap().to_owned()
    } else {
        "ok".into()
    }
}

/// A metric's value summed over the series whose labels contain `label` (`""`: all).
async fn metric(node: &Node, name: &str, label: &str) -> f64 {
    node.metric_with(name, label).await
}

/// A hand-written upgrade request from `source`, returning the response head and the open
/// stream.
async fn raw_upgrade(addr: SocketAddr, source: IpAddr, extra_headers: &str) -> (u16, String, TcpStream) {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => break,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head, stream)
}

const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));

#[tokio::test]
async fn hs256_tokens_are_verified_and_forgeries_refused() {
    let node = Node::start(BIN, &["--jwt-hmac-secret", SECRET]);
    let good = claims("alice", 60, &["news"], &[]);
    // A valid token works in the query string and in the Authorization header.
    let mut c = connected(&node, &hs(&good)).await;
    assert_eq!(outcome(&mut c, json!({"op":"subscribe","channel":"news","id":1})).await, "ok");
    assert!(connect(&node, Some(&hs(&good)), true).await.is_ok());

    let other_key = EncodingKey::from_secret(b"not-the-secret-not-the-secret-not!");
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    let forged: Vec<(&str, String)> = vec![
        ("wrong key", sign(Algorithm::HS256, &other_key, None, &good)),
        ("alg none", unsigned(&good)),
        ("alg none, signature kept", {
            let real = hs(&good);
            let sig = real.rsplit('.').next().unwrap().to_owned();
            format!("{}{sig}", unsigned(&good))
        }),
        ("algorithm not configured", sign(Algorithm::HS384, &EncodingKey::from_secret(SECRET.as_bytes()), None, &good)),
        ("expired", hs(&claims("alice", -30, &["news"], &[]))),
        ("no exp", hs(&no_exp)),
        ("exp not a number", hs(&json!({"sub":"alice","exp":"soon"}))),
        ("patterns not a list", hs(&json!({"sub":"alice","exp":now() + 60,"subscribe":"news"}))),
        ("garbage", "not.a.token".into()),
        ("empty", String::new()),
        ("too long", format!("{}.{}.x", "a".repeat(5000), "b".repeat(5000))),
    ];
    for (what, token) in &forged {
        assert_eq!(connect(&node, Some(token), false).await.err(), Some(401), "{what} (query)");
        assert_eq!(connect(&node, Some(token), true).await.err(), Some(401), "{what} (header)");
    }
    // An `exp` beyond any clock is not a crash (the session's timer is capped).
    let mut far_refused = 0;
    for exp in [json!(u64::MAX), json!(1e300)] {
        let token = hs(&json!({"sub":"alice","exp":exp,"subscribe":["news"]}));
        match connect(&node, Some(&token), false).await {
            Ok(mut far) => assert_eq!(ask(&mut far, json!({"op":"ping","id":1})).await, json!({"op":"pong","id":1})),
            Err(status) => {
                assert_eq!(status, 401);
                far_refused += 1;
            }
        }
    }
    assert_eq!(ask(&mut c, json!({"op":"ping","id":2})).await, json!({"op":"pong","id":2}));
    // No token at all.
    assert_eq!(connect(&node, None, false).await.err(), Some(401));
    let (status, head, _) = raw_upgrade(node.public, LOCAL, "").await;
    assert_eq!(status, 401);
    assert!(head.to_ascii_lowercase().contains("www-authenticate: bearer"), "{head}");
    let rejected = metric(&node, "fanout_upgrade_rejections_total", "reason=\"unauthorized\"").await;
    assert_eq!(rejected, (forged.len() * 2 + 2 + far_refused) as f64);
}

#[tokio::test]
async fn rs256_public_key_refuses_algorithm_confusion() {
    let dir = TempDir::new("rs256");
    let pem = key_file("rsa-public.pem");
    let node = node_with(
        &dir,
        &format!("[auth]\nalgorithms = [\"RS256\"]\npublic_key_file = {:?}\n", pem.to_str().unwrap()),
        &[],
    );
    let good = claims("bob", 60, &["chat:*"], &[]);
    let mut c = connected(&node, &sign(Algorithm::RS256, &rsa_key(), None, &good)).await;
    assert_eq!(outcome(&mut c, json!({"op":"subscribe","channel":"chat:1","id":1})).await, "ok");
    // The classic confusion: an HS256 token whose "secret" is the public key file.
    let public_bytes = std::fs::read(&pem).unwrap();
    let confused = sign(Algorithm::HS256, &EncodingKey::from_secret(&public_bytes), None, &good);
    assert_eq!(connect(&node, Some(&confused), false).await.err(), Some(401));
    // Another algorithm family, and a well-formed RS256 token signed by another key.
    let es = sign(Algorithm::ES256, &ec_key("ec-private.pem"), None, &good);
    assert_eq!(connect(&node, Some(&es), false).await.err(), Some(401));
    assert_eq!(connect(&node, Some(&unsigned(&good)), false).await.err(), Some(401));
    assert_eq!(connect(&node, None, false).await.err(), Some(401));
}

/// A JWKS document holding the public halves of `keys` (kid, algorithm, private key).
fn jwks(keys: &[(&str, Algorithm, &EncodingKey)]) -> String {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(kid, alg, key)| {
            let mut jwk = serde_json::to_value(jsonwebtoken::jwk::Jwk::from_encoding_key(key, *alg).unwrap()).unwrap();
            jwk["kid"] = json!(kid);
            jwk
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

/// Waits for `check` (30 s: far beyond any healthy run).
async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    fanout_testkit::eventually(what, Duration::from_secs(30), check).await;
}

#[tokio::test]
async fn jwks_file_is_reloaded_and_a_bad_one_keeps_the_old_keys() {
    let dir = TempDir::new("jwks");
    let (rsa, ec, ec2) = (rsa_key(), ec_key("ec-private.pem"), ec_key("ec2-private.pem"));
    let path = dir.write("keys.json", &jwks(&[("r1", Algorithm::RS256, &rsa), ("e1", Algorithm::ES256, &ec)]));
    let node = node_with(
        &dir,
        &format!(
            "[auth]\nalgorithms = [\"RS256\", \"ES256\"]\njwks_file = {path:?}\njwks_reload_interval = \"100ms\"\n"
        ),
        &[],
    );
    let c = claims("carol", 60, &[], &[]);
    let by_r1 = sign(Algorithm::RS256, &rsa, Some("r1"), &c);
    let by_e1 = sign(Algorithm::ES256, &ec, Some("e1"), &c);
    let by_e2 = sign(Algorithm::ES256, &ec2, Some("e2"), &c);
    assert!(connect(&node, Some(&by_r1), false).await.is_ok());
    assert!(connect(&node, Some(&by_e1), false).await.is_ok());
    // Without a kid, each key of the token's family is tried.
    assert!(connect(&node, Some(&sign(Algorithm::ES256, &ec, None, &c)), false).await.is_ok());
    // A known kid with the wrong key, and an unknown kid.
    assert_eq!(connect(&node, Some(&sign(Algorithm::ES256, &ec2, Some("e1"), &c)), false).await.err(), Some(401));
    assert_eq!(connect(&node, Some(&by_e2), false).await.err(), Some(401));

    // Rotate: e1 and r1 out, e2 in.
    dir.write("keys.json", &jwks(&[("e2", Algorithm::ES256, &ec2)]));
    eventually("the rotated key is accepted", async || connect(&node, Some(&by_e2), false).await.is_ok()).await;
    assert_eq!(connect(&node, Some(&by_e1), false).await.err(), Some(401));
    assert_eq!(connect(&node, Some(&by_r1), false).await.err(), Some(401));

    // A broken file is logged and counted; the keys in use stay.
    dir.write("keys.json", "{\"keys\": [{\"kty\": \"nonsense\"}]}");
    eventually("the bad file is noticed", async || {
        metric(&node, "fanout_jwks_reloads_total", "result=\"error\"").await >= 1.0
    })
    .await;
    assert!(connect(&node, Some(&by_e2), false).await.is_ok());
    assert!(node.logs().contains("keeping the previous keys"), "{}", node.logs());
}

#[tokio::test]
async fn channel_patterns_exact_namespace_and_sub() {
    let node = Node::start(BIN, &["--jwt-hmac-secret", SECRET]);
    let token = hs(&claims("alice", 60, &["news", "chat:*", "user:{sub}"], &["chat:*", "user:{sub}"]));
    let mut c = connected(&node, &token).await;
    let sub = |ch: &str| json!({"op":"subscribe","channel":ch,"id":1});
    let publish = |ch: &str| json!({"op":"publish","channel":ch,"data":{"x":1},"id":2});
    for (channel, want) in [
        ("news", "ok"),
        ("news2", "forbidden"),
        ("newsx:1", "forbidden"),
        ("chat:room-1", "ok"),
        ("chat:a:b", "ok"),
        ("chatroom", "forbidden"),
        ("user:alice", "ok"),
        ("user:bob", "forbidden"),
        ("user:alice2", "forbidden"),
    ] {
        assert_eq!(outcome(&mut c, sub(channel)).await, want, "subscribe {channel}");
    }
    for (channel, want) in
        [("chat:room-1", "ok"), ("user:alice", "ok"), ("news", "forbidden"), ("user:bob", "forbidden")]
    {
        assert_eq!(outcome(&mut c, publish(channel)).await, want, "publish {channel}");
    }
    // The refused publishes were not delivered: only the two allowed ones arrive.
    let mut watcher = connected(&node, &token).await;
    watcher.subscribe("chat:room-1").await;
    assert_eq!(outcome(&mut c, json!({"op":"publish","channel":"news","data":1})).await, "forbidden");
    assert_eq!(outcome(&mut c, publish("chat:room-1")).await, "ok");
    assert_eq!(watcher.next_value().await["data"], json!({"x":1}));
    watcher.expect_silence(Duration::from_millis(200)).await;

    // A `sub` that tries to widen `{sub}` patterns gets nothing from them.
    for evil in ["*", "a*", "", "x y", "chat:*"] {
        let token = hs(&claims(evil, 60, &["user:{sub}", "{sub}:*"], &["{sub}:*"]));
        let mut e = connected(&node, &token).await;
        for channel in ["user:a", "chat:1", "a:1", "x:1"] {
            assert_eq!(outcome(&mut e, sub(channel)).await, "forbidden", "sub {evil:?} channel {channel}");
        }
        assert_eq!(outcome(&mut e, publish("chat:1")).await, "forbidden");
    }
    assert!(metric(&node, "fanout_command_errors_total", "code=\"forbidden\"").await >= 25.0);
}

#[tokio::test]
async fn namespace_rules_anonymous_client_publish_size_and_rate() {
    let dir = TempDir::new("namespaces");
    let node = node_with(
        &dir,
        &format!(
            r#"
            jwt_hmac_secret = "{SECRET}"
            [auth]
            required = false
            [namespaces.public]
            anonymous_subscribe = true
            client_publish = false
            [namespaces.small]
            max_message_size = 16
            [namespaces.slow]
            publish_rate = 2
            publish_burst = 2
            "#
        ),
        &[],
    );
    // Tokens are optional here, but a bad one is still refused.
    assert_eq!(connect(&node, Some("bad"), false).await.err(), Some(401));
    let mut anon = connect(&node, None, false).await.expect("anonymous connection");
    assert_eq!(outcome(&mut anon, json!({"op":"subscribe","channel":"public:news","id":1})).await, "ok");
    assert_eq!(outcome(&mut anon, json!({"op":"subscribe","channel":"chat:1","id":2})).await, "forbidden");
    assert_eq!(outcome(&mut anon, json!({"op":"subscribe","channel":"plain","id":3})).await, "forbidden");
    assert_eq!(outcome(&mut anon, json!({"op":"publish","channel":"chat:1","data":1,"id":4})).await, "forbidden");
    let refresh = json!({"op":"refresh","token":hs(&claims("x", 60, &[], &[])),"id":5});
    assert_eq!(outcome(&mut anon, refresh).await, "forbidden");

    let token = hs(&claims("dave", 60, &["slow:*"], &["public:*", "small:*", "slow:*"]));
    let mut c = connected(&node, &token).await;
    // Public channels are readable by token holders too, but nobody may publish there.
    assert_eq!(outcome(&mut c, json!({"op":"subscribe","channel":"public:news","id":1})).await, "ok");
    let r = ask(&mut c, json!({"op":"publish","channel":"public:news","data":1,"id":2})).await;
    assert_eq!((r["code"].as_str(), r["id"].as_u64()), (Some("forbidden"), Some(2)));
    anon.expect_silence(Duration::from_millis(100)).await;
    // max_message_size counts the encoded data: "aaaaaaaaaaaaaa" is 16 bytes with its quotes.
    let sized = |n: usize| json!({"op":"publish","channel":"small:x","data":"a".repeat(n),"id":3});
    assert_eq!(outcome(&mut c, sized(14)).await, "ok");
    assert_eq!(outcome(&mut c, sized(15)).await, "message_too_large");
    // publish_rate 2/s with a burst of 2: the third quick publish is refused, not delivered.
    let mut reader = connected(&node, &token).await;
    reader.subscribe("slow:x").await;
    for (i, want) in ["ok", "ok", "rate_limited"].into_iter().enumerate() {
        let cmd = json!({"op":"publish","channel":"slow:x","data":i,"id":10 + i});
        assert_eq!(outcome(&mut c, cmd).await, want, "publish {i}");
    }
    assert_eq!(reader.next_value().await["data"], 0);
    assert_eq!(reader.next_value().await["data"], 1);
    reader.expect_silence(Duration::from_millis(200)).await;
    // Other namespaces are not slowed down by it.
    assert_eq!(outcome(&mut c, sized(1)).await, "ok");
    // Half a second refills one token.
    tokio::time::sleep(Duration::from_millis(550)).await;
    assert_eq!(outcome(&mut c, json!({"op":"publish","channel":"slow:x","data":3})).await, "ok");
}

#[tokio::test]
async fn expiry_closes_with_1008_unless_refreshed() {
    let dir = TempDir::new("expiry");
    let node = node_with(&dir, &format!("jwt_hmac_secret = \"{SECRET}\"\n[auth]\nleeway = \"0s\"\n"), &[]);
    let started = Instant::now();
    let short = hs(&claims("erin", 2, &["chat:*", "user:{sub}"], &[]));
    let mut expiring = connected(&node, &short).await;
    let mut refreshed = connected(&node, &short).await;
    refreshed.subscribe("chat:1").await;
    assert_eq!(outcome(&mut refreshed, json!({"op":"subscribe","channel":"user:erin","id":1})).await, "ok");

    // Refusals keep the old token: garbage, another sub, an expired token.
    for bad in [
        "nope".to_owned(),
        hs(&claims("mallory", 60, &["chat:*"], &[])),
        hs(&claims("erin", -10, &["chat:*"], &[])),
        sign(
            Algorithm::HS256,
            &EncodingKey::from_secret(b"another secret, long enough..."),
            None,
            &claims("erin", 60, &[], &[]),
        ),
    ] {
        let r = ask(&mut refreshed, json!({"op":"refresh","token":bad,"id":7})).await;
        assert_eq!(
            (r["op"].as_str(), r["code"].as_str(), r["id"].as_u64()),
            (Some("error"), Some("forbidden"), Some(7))
        );
    }
    // A fresh token for the same sub that no longer grants user:erin: that subscription
    // is dropped and announced without an id.
    let exp = now() + 60;
    let fresh = hs(&json!({"sub":"erin","exp":exp,"subscribe":["chat:*"]}));
    assert_eq!(
        ask(&mut refreshed, json!({"op":"refresh","token":fresh,"id":8})).await,
        json!({"op":"refreshed","exp":exp,"id":8})
    );
    assert_eq!(refreshed.next_value().await, json!({"op":"unsubscribed","channel":"user:erin"}));

    // The unrefreshed connection is closed at expiry with 1008.
    // (Not before the token's second ran out; the generous wait is for a loaded machine.)
    assert_eq!(expiring.recv_timeout(Duration::from_secs(15)).await, Event::Close(Some(1008)));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "closed after {waited:?}, before the token expired");
    // The refreshed one lives on past the old expiry, still subscribed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ask(&mut refreshed, json!({"op":"ping","id":9})).await, json!({"op":"pong","id":9}));
    let r = http(
        node.internal,
        "POST",
        "/api/publish",
        &[("Content-Type", "application/json")],
        br#"{"channel":"chat:1","data":"still here"}"#,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(refreshed.next_value().await["data"], "still here");
    metric_reaches(&node, "fanout_connections_closed_total", "reason=\"auth_expired\"", 1.0).await;
    assert_eq!(metric(&node, "fanout_token_refreshes_total", "result=\"ok\"").await, 1.0);
    assert_eq!(metric(&node, "fanout_token_refreshes_total", "result=\"rejected\"").await, 4.0);
}

#[tokio::test]
async fn command_rate_limit_then_closing_a_flooding_client() {
    let node = Node::start(BIN, &["--command-rate", "5", "--command-burst", "5"]);
    let mut c = WsClient::json(&node.ws_url()).await;
    // Auth is off here: refresh is a bad request, and it counts against the rate too.
    assert_eq!(outcome(&mut c, json!({"op":"refresh","token":"x","id":1})).await, "bad_request");
    for id in 2..=5 {
        assert_eq!(ask(&mut c, json!({"op":"ping","id":id})).await, json!({"op":"pong","id":id}));
    }
    let r = ask(&mut c, json!({"op":"ping","id":6})).await;
    assert_eq!((r["code"].as_str(), r["id"].as_u64()), (Some("rate_limited"), Some(6)));
    // Waiting refills the bucket.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(ask(&mut c, json!({"op":"ping","id":7})).await, json!({"op":"pong","id":7}));
    // A flood far over the rate ends in a 1008 close (raw frames: the client keeps writing
    // after the server has closed).
    let mut raw = RawWs::connect(node.public).await;
    let mut flood = Vec::new();
    for id in 0..100 {
        flood.extend(client_frame(true, 1, json!({"op":"ping","id":id}).to_string().as_bytes()));
    }
    raw.send(&flood).await;
    let (mut pongs, mut limited) = (0, 0);
    let code = loop {
        match raw.frame(Duration::from_secs(5)).await {
            Some(f) if f.opcode == 1 => {
                let v: Value = serde_json::from_slice(&f.payload).unwrap();
                if v["code"] == "rate_limited" {
                    limited += 1;
                } else {
                    pongs += 1;
                }
            }
            Some(f) if f.opcode == 8 => break f.close_code(),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, Some(1008));
    assert_eq!(pongs, 5, "the burst is served");
    assert!((2..50).contains(&limited), "{limited} rate_limited replies before the close");
    metric_reaches(&node, "fanout_connections_closed_total", "reason=\"rate_limited\"", 1.0).await;
    // Others are unaffected.
    let mut d = WsClient::json(&node.ws_url()).await;
    assert_eq!(ask(&mut d, json!({"op":"ping","id":1})).await, json!({"op":"pong","id":1}));
}

#[tokio::test]
async fn connection_flood_from_one_address_is_limited_others_still_connect() {
    let node = Node::start(BIN, &["--max-connections-per-ip-per-second", "1", "--connection-rate-burst", "3"]);
    let mut open = Vec::new();
    for _ in 0..3 {
        let (status, _, stream) = raw_upgrade(node.public, LOCAL, "").await;
        assert_eq!(status, 101);
        open.push(stream);
    }
    let (status, head, _) = raw_upgrade(node.public, LOCAL, "").await;
    assert_eq!(status, 429);
    assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
    // Another source address is its own bucket.
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    for _ in 0..3 {
        assert_eq!(raw_upgrade(node.public, other, "").await.0, 101);
    }
    assert_eq!(metric(&node, "fanout_upgrade_rejections_total", "reason=\"rate_limited\"").await, 1.0);
    assert_eq!(metric(&node, "fanout_rate_limited_ips", "").await, 2.0);
    // One second later the first address has a token again.
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(raw_upgrade(node.public, LOCAL, "").await.0, 101);
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_limited() {
    let args = ["--max-connections-per-ip-per-second", "0.1", "--connection-rate-burst", "1"];
    let node = Node::start(BIN, &[&args[..], &["--trusted-proxies", "127.0.0.1/32,10.0.0.0/8"]].concat());
    let via_proxy = |xff: &str| format!("X-Forwarded-For: {xff}\r\n");
    assert_eq!(raw_upgrade(node.public, LOCAL, &via_proxy("203.0.113.5")).await.0, 101);
    assert_eq!(raw_upgrade(node.public, LOCAL, &via_proxy("203.0.113.5")).await.0, 429);
    // A client-written entry left of the real one changes nothing; the proxy's own hops are skipped.
    assert_eq!(raw_upgrade(node.public, LOCAL, &via_proxy("1.2.3.4, 203.0.113.5, 10.0.0.9")).await.0, 429);
    assert_eq!(raw_upgrade(node.public, LOCAL, &via_proxy("203.0.113.6")).await.0, 101);
    // 127.0.0.2 is not a trusted proxy: what it forwards is ignored and it is charged itself.
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    assert_eq!(raw_upgrade(node.public, other, &via_proxy("203.0.113.7")).await.0, 101);
    assert_eq!(raw_upgrade(node.public, other, &via_proxy("203.0.113.8")).await.0, 429);
}

#[tokio::test]
async fn max_connections_gets_503_and_frees_on_close() {
    let node = Node::start(BIN, &["--max-connections", "2"]);
    let a = WsClient::json(&node.ws_url()).await;
    let _b = WsClient::json(&node.ws_url()).await;
    assert_eq!(WsClient::connect(&node.ws_url(), None).await.err(), Some(503));
    drop(a);
    eventually("a slot frees up", async || WsClient::connect(&node.ws_url(), None).await.is_ok()).await;
    assert!(metric(&node, "fanout_upgrade_rejections_total", "reason=\"too_many_connections\"").await >= 1.0);
}

#[tokio::test]
async fn browser_origins_outside_the_allow_list_get_403() {
    let node = Node::start(BIN, &["--allowed-origins", "https://app.example,https://admin.example"]);
    assert_eq!(raw_upgrade(node.public, LOCAL, "Origin: https://app.example\r\n").await.0, 101);
    assert_eq!(raw_upgrade(node.public, LOCAL, "Origin: https://admin.example\r\n").await.0, 101);
    assert_eq!(raw_upgrade(node.public, LOCAL, "Origin: https://evil.example\r\n").await.0, 403);
    assert_eq!(raw_upgrade(node.public, LOCAL, "Origin: https://app.example.evil\r\n").await.0, 403);
    assert_eq!(raw_upgrade(node.public, LOCAL, "Origin: null\r\n").await.0, 403);
    // Non-browser clients send no Origin.
    assert_eq!(raw_upgrade(node.public, LOCAL, "").await.0, 101);
    assert_eq!(metric(&node, "fanout_upgrade_rejections_total", "reason=\"forbidden\"").await, 3.0);
}

#[tokio::test]
async fn half_sent_upgrade_request_is_dropped_at_the_handshake_timeout() {
    let node = Node::start(BIN, &["--handshake-timeout", "300ms"]);
    let mut s = TcpStream::connect(node.public).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n").await.unwrap();
    let started = Instant::now();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "the server kept a half-sent request open");
    assert!(started.elapsed() >= Duration::from_millis(200), "closed after {:?}", started.elapsed());
    // The node is fine.
    assert_eq!(http(node.public, "GET", "/healthz", &[], b"").await.status, 200);
}

#[tokio::test]
async fn silent_clients_are_closed_at_the_idle_timeout() {
    let node = Node::start(BIN, &["--ping-interval", "150ms", "--idle-timeout", "500ms"]);
    let mut silent = RawWs::connect(node.public).await;
    let mut answering = WsClient::json(&node.ws_url()).await;
    let started = Instant::now();
    let watch_silent = async {
        let mut pings = 0;
        loop {
            match silent.frame(Duration::from_secs(3)).await {
                Some(f) if f.opcode == 9 => pings += 1,
                Some(f) if f.opcode == 8 => return (pings, f.close_code(), started.elapsed()),
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    // A client that answers pings (tungstenite does while it reads) stays meanwhile.
    // (recv skips pings, so it is bounded from outside: the pings keep it busy.)
    let (silent_end, quiet) =
        tokio::join!(watch_silent, tokio::time::timeout(Duration::from_millis(1000), answering.recv()));
    assert!(quiet.is_err(), "unexpected {quiet:?}");
    let (pings, close, after) = silent_end;
    assert_eq!(close, Some(1001));
    assert!(pings >= 2, "{pings} pings before the close");
    assert!(after >= Duration::from_millis(450), "closed after {after:?}");
    assert_eq!(ask(&mut answering, json!({"op":"ping","id":1})).await, json!({"op":"pong","id":1}));
    metric_reaches(&node, "fanout_connections_closed_total", "reason=\"idle_timeout\"", 1.0).await;
}

#[tokio::test]
async fn api_key_variants_are_refused() {
    let node = Node::start(BIN, &["--api-key", "s3cret-key"]);
    let body = br#"{"channel":"a","data":1}"#;
    for auth in
        ["Bearer s3cret-ke", "Bearer s3cret-keyy", "Bearer S3CRET-KEY", "s3cret-key", "Basic s3cret-key", "Bearer"]
    {
        let r = http(node.internal, "POST", "/api/broadcast", &[("Authorization", auth)], body).await;
        assert_eq!(r.status, 401, "{auth}");
    }
    let ok = http(
        node.internal,
        "POST",
        "/api/broadcast",
        &[("Authorization", "Bearer s3cret-key")],
        br#"{"channels":["a"],"data":1}"#,
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    // Health and metrics stay reachable for probes and scrapers.
    assert_eq!(http(node.internal, "GET", "/healthz", &[], b"").await.status, 200);
    assert_eq!(http(node.internal, "GET", "/metrics", &[], b"").await.status, 200);
}

/// A token without `kid` is checked against at most three keys of its family, so one
/// upgrade cannot make the node verify a signature against every key of a large JWKS.
#[tokio::test]
async fn a_token_without_kid_is_tried_against_at_most_three_keys() {
    let dir = TempDir::new("kidless");
    let (ec, ec2) = (ec_key("ec-private.pem"), ec_key("ec2-private.pem"));
    let keys = [
        ("k1", Algorithm::ES256, &ec),
        ("k2", Algorithm::ES256, &ec),
        ("k3", Algorithm::ES256, &ec),
        ("k4", Algorithm::ES256, &ec2),
    ];
    let path = dir.write("keys.json", &jwks(&keys));
    let node = node_with(&dir, &format!("[auth]\nalgorithms = [\"ES256\"]\njwks_file = {path:?}\n"), &[]);
    let c = claims("dave", 60, &[], &[]);
    // Signed by the fourth key: found by its kid, never by trying keys in turn.
    assert!(connect(&node, Some(&sign(Algorithm::ES256, &ec2, Some("k4"), &c)), false).await.is_ok());
    assert_eq!(connect(&node, Some(&sign(Algorithm::ES256, &ec2, None, &c)), false).await.err(), Some(401));
    // Signed by one of the first three: found without a kid.
    assert!(connect(&node, Some(&sign(Algorithm::ES256, &ec, None, &c)), false).await.is_ok());
}
