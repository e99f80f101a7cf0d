//! Channel history and recovery (contract v1.1) through real nodes: offsets and epochs,
//! `subscribe` with `since`, the `history` op and `POST /api/history`, on the embedded
//! broker and across nodes through a real Redis (the Function library, `FCALL` from a
//! backend, plain `PUBLISH`), with Redis connections killed and Redis itself restarted
//! empty, and bad input.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::time::Duration;

use fanout_protocol::{encode_envelope, Encoding};
use fanout_testkit::{config_file, eventually, http, try_http, Event, Node, RedisServer, WsClient};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_fanout");

const CONFIG: &str = r#"
[namespaces.h]
history_size = 100
history_ttl = "10m"

[namespaces.small]
history_size = 3
"#;

fn args<'a>(config: &'a str, redis: Option<&'a str>) -> Vec<&'a str> {
    let mut a = vec!["--config", config];
    if let Some(url) = redis {
        a.extend(["--redis-url", url]);
    }
    a
}

async fn subscribe(ws: &mut WsClient, channel: &str, since: Option<(u64, &str)>) -> Value {
    let mut cmd = json!({"op":"subscribe","channel":channel,"id":1});
    if let Some((offset, epoch)) = since {
        cmd["since"] = json!({"offset":offset,"epoch":epoch});
    }
    ws.send(cmd).await;
    let reply = ws.next_value().await;
    assert_eq!(reply["op"], "subscribed", "{reply}");
    reply
}

async fn publish(ws: &mut WsClient, channel: &str, data: Value) -> Value {
    ws.send(json!({"op":"publish","channel":channel,"data":data,"id":2})).await;
    let reply = ws.next_value().await;
    assert_eq!(reply["op"], "published", "{reply}");
    reply
}

async fn api(node: &Node, path: &str, body: Value) -> (u16, Value) {
    let r = http(node.internal, "POST", path, &[], body.to_string().as_bytes()).await;
    (r.status, r.json())
}

/// The next `n` messages' offsets (panics on anything but a message).
async fn offsets(ws: &mut WsClient, n: usize) -> Vec<u64> {
    let mut got = Vec::new();
    for _ in 0..n {
        let m = ws.recv_timeout(Duration::from_secs(10)).await.value();
        assert_eq!(m["op"], "message", "{m}");
        got.push(m["offset"].as_u64().unwrap_or_else(|| panic!("no offset in {m}")));
    }
    got
}

#[tokio::test]
async fn offsets_epochs_history_and_recovery_on_the_embedded_broker() {
    let config = config_file("history-embedded", CONFIG);
    let node = Node::start(BIN, &args(config.to_str().unwrap(), None));
    let mut a = WsClient::json(&node.ws_url()).await;
    let first = subscribe(&mut a, "h:a", None).await;
    assert_eq!(first["offset"], 0, "{first}");
    assert!(first.get("recovered").is_none(), "recovered only answers a since: {first}");
    let epoch = first["epoch"].as_str().unwrap().to_owned();
    let mut p = WsClient::json(&node.ws_url()).await;
    for i in 1..=3u64 {
        let reply = publish(&mut p, "h:a", json!(i)).await;
        assert_eq!(reply, json!({"op":"published","id":2,"offset":i,"epoch":epoch}));
    }
    assert_eq!(
        api(&node, "/api/publish", json!({"channel":"h:a","data":4})).await,
        (200, json!({"ok":true,"offset":4,"epoch":epoch}))
    );
    let m = a.next_value().await;
    assert_eq!(m["offset"], 1);
    assert_eq!(m["data"], 1);
    assert_eq!(offsets(&mut a, 3).await, [2, 3, 4]);

    // A client that last saw offset 1 recovers 2..4, then gets live ones, each once.
    let mut b = WsClient::json(&node.ws_url()).await;
    let reply = subscribe(&mut b, "h:a", Some((1, &epoch))).await;
    assert_eq!(reply, json!({"op":"subscribed","channel":"h:a","id":1,"offset":4,"epoch":epoch,"recovered":true}));
    assert_eq!(offsets(&mut b, 3).await, [2, 3, 4]);
    publish(&mut p, "h:a", json!(5)).await;
    assert_eq!(offsets(&mut b, 1).await, [5]);
    // Nothing to recover is recovered too.
    let mut c = WsClient::json(&node.ws_url()).await;
    assert_eq!(subscribe(&mut c, "h:a", Some((5, &epoch))).await["recovered"], true);
    // Another epoch, or a position ahead of the top, cannot be recovered.
    let mut d = WsClient::json(&node.ws_url()).await;
    let reply = subscribe(&mut d, "h:a", Some((2, "not-the-epoch"))).await;
    assert_eq!((reply["recovered"].clone(), reply["offset"].clone()), (json!(false), json!(5)));
    let mut e = WsClient::json(&node.ws_url()).await;
    assert_eq!(subscribe(&mut e, "h:a", Some((99, &epoch))).await["recovered"], false);
    publish(&mut p, "h:a", json!(6)).await;
    assert_eq!(offsets(&mut d, 1).await, [6], "after recovered:false, live ones from TOP+1");
    assert_eq!(offsets(&mut c, 1).await, [6]);
    assert_eq!(node.metric_with("fanout_recoveries_total", "outcome=\"recovered\"").await, 2.0);
    assert_eq!(node.metric_with("fanout_recoveries_total", "outcome=\"not_recovered\"").await, 2.0);

    // history_size is exact: the last 3 are recoverable, older ones are not.
    let mut s = WsClient::json(&node.ws_url()).await;
    let small_epoch = subscribe(&mut s, "small:x", None).await["epoch"].as_str().unwrap().to_owned();
    for i in 1..=5 {
        publish(&mut p, "small:x", json!(i)).await;
    }
    let mut late = WsClient::json(&node.ws_url()).await;
    assert_eq!(subscribe(&mut late, "small:x", Some((1, &small_epoch))).await["recovered"], false);
    let mut ok = WsClient::json(&node.ws_url()).await;
    assert_eq!(subscribe(&mut ok, "small:x", Some((2, &small_epoch))).await["recovered"], true);
    assert_eq!(offsets(&mut ok, 3).await, [3, 4, 5]);

    // The history op: everything kept, or after since, the first `limit` of those.
    p.send(json!({"op":"history","channel":"small:x","id":7})).await;
    let h = p.next_value().await;
    assert_eq!((h["op"].clone(), h["id"].clone(), h["offset"].clone()), (json!("history"), json!(7), json!(5)));
    let kept: Vec<(u64, i64)> = h["publications"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["offset"].as_u64().unwrap(), p["data"].as_i64().unwrap()))
        .collect();
    assert_eq!(kept, [(3, 3), (4, 4), (5, 5)]);
    assert!(h["publications"][0]["ts"].as_u64().unwrap() > 0);
    p.send(json!({"op":"history","channel":"h:a","since":{"offset":2,"epoch":epoch},"limit":2,"id":8})).await;
    let h = p.next_value().await;
    let got: Vec<u64> = h["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect();
    assert_eq!(got, [3, 4]);
    let (status, body) = api(&node, "/api/history", json!({"channel":"h:a","limit":0})).await;
    assert_eq!((status, body), (200, json!({"offset":6,"epoch":epoch,"publications":[]})));
    let (status, body) = api(&node, "/api/history", json!({"channel":"h:a","since":{"offset":5,"epoch":epoch}})).await;
    assert_eq!(status, 200);
    assert_eq!(body["publications"][0]["data"], 6);

    // An idempotent retry is answered with the first offset and takes none of its own.
    let body = json!({"channel":"h:a","data":"once","idempotency_key":"k1"});
    assert_eq!(api(&node, "/api/publish", body.clone()).await.1["offset"], 7);
    assert_eq!(api(&node, "/api/publish", body).await.1["offset"], 7);
    p.send(json!({"op":"publish","channel":"h:a","data":"once","idempotency_key":"k1","id":3})).await;
    assert_eq!(p.next_value().await["offset"], 7);
    assert_eq!(publish(&mut p, "h:a", json!("next")).await["offset"], 8);
    assert_eq!(offsets(&mut a, 4).await, [5, 6, 7, 8]);
}

#[tokio::test]
async fn outside_history_namespaces_nothing_changes_and_bad_input_is_refused() {
    let config = config_file("history-plain", CONFIG);
    let node = Node::start(BIN, &args(config.to_str().unwrap(), None));
    let mut ws = WsClient::json(&node.ws_url()).await;
    // A v1 exchange, byte for byte: no offset or epoch anywhere.
    ws.subscribe("plain").await;
    let mut p = WsClient::json(&node.ws_url()).await;
    p.publish("plain", json!({"v":1})).await;
    let m = ws.next_value().await;
    assert!(m.get("offset").is_none() && m.get("epoch").is_none(), "{m}");
    assert_eq!(api(&node, "/api/publish", json!({"channel":"plain","data":1})).await, (200, json!({"ok":true})));
    let _ = ws.next_value().await;
    // since outside history: nothing to recover from.
    let reply = subscribe(&mut ws, "plain:2", Some((1, "e"))).await;
    assert_eq!(reply, json!({"op":"subscribed","channel":"plain:2","id":1,"recovered":false}));
    ws.send(json!({"op":"history","channel":"plain","id":4})).await;
    let e = ws.next_value().await;
    assert_eq!((e["op"].clone(), e["code"].clone(), e["id"].clone()), (json!("error"), json!("bad_request"), json!(4)));
    assert_eq!(api(&node, "/api/history", json!({"channel":"plain"})).await.0, 400);

    let long_epoch = "e".repeat(65);
    for bad in [
        json!({"op":"subscribe","channel":"h:b","since":{"offset":-1,"epoch":"e"},"id":5}),
        json!({"op":"subscribe","channel":"h:b","since":{"offset":"1","epoch":"e"},"id":5}),
        json!({"op":"subscribe","channel":"h:b","since":{"offset":1},"id":5}),
        json!({"op":"subscribe","channel":"h:b","since":[1,"e"],"id":5}),
        json!({"op":"subscribe","channel":"h:b","since":{"offset":1,"epoch":long_epoch},"id":5}),
        json!({"op":"history","channel":"h:b","limit":100_001,"id":5}),
        json!({"op":"history","channel":"h:b","limit":-1,"id":5}),
        json!({"op":"history","channel":"h:b","limit":1.5,"id":5}),
    ] {
        ws.send(bad.clone()).await;
        let e = ws.next_value().await;
        assert_eq!((e["code"].clone(), e["id"].clone()), (json!("bad_request"), json!(5)), "{bad} → {e}");
    }
    for bad in
        [json!({"channel":"h:b","limit":-1}), json!({"channel":"h:b","since":{"epoch":"e"}}), json!({"since":{}})]
    {
        assert_eq!(api(&node, "/api/history", bad.clone()).await.0, 400, "{bad}");
    }
    // The connection survived all of it.
    ws.send(json!({"op":"ping","id":6})).await;
    assert_eq!(ws.next_value().await, json!({"op":"pong","id":6}));
}

/// An envelope as a backend builds it, for `FCALL fanout_publish` and plain `PUBLISH`.
fn envelope(data: &str) -> Vec<u8> {
    encode_envelope(fanout_protocol::now_micros(), Encoding::Json, data.as_bytes())
}

#[tokio::test]
async fn recovery_on_another_node_covers_every_publishing_path() {
    let redis = RedisServer::start();
    let url = redis.url();
    let config = config_file("history-redis", CONFIG);
    let (a, b) = (
        Node::start(BIN, &args(config.to_str().unwrap(), Some(&url))),
        Node::start(BIN, &args(config.to_str().unwrap(), Some(&url))),
    );
    // Every node loads the library; a backend publishes with FCALL and gets the offset.
    let mut conn = redis.connection().await;
    let version: (u64, String) =
        redis::cmd("FCALL_RO").arg("fanout_version").arg(0).query_async(&mut conn).await.unwrap();
    assert_eq!(version.0, 2);

    let mut sub = WsClient::json(&a.ws_url()).await;
    let epoch = subscribe(&mut sub, "h:r", None).await["epoch"].as_str().unwrap().to_owned();
    let mut p = WsClient::json(&b.ws_url()).await;
    assert_eq!(publish(&mut p, "h:r", json!("ws-1")).await["epoch"], epoch.as_str(), "one epoch cluster-wide");
    assert_eq!(offsets(&mut sub, 1).await, [1]);
    drop(sub);

    // While the client is away: one publication from each path.
    publish(&mut p, "h:r", json!("ws-2")).await;
    assert_eq!(api(&a, "/api/publish", json!({"channel":"h:r","data":"http-3"})).await.1["offset"], 3);
    let offset: u64 = redis::cmd("FCALL")
        .arg("fanout_publish")
        .arg(1)
        .arg("fanout:h:r")
        .arg(envelope("\"fcall-4\""))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(offset, 4);

    // It comes back on the other node and gets exactly those, in order, then live ones.
    let mut back = WsClient::json(&b.ws_url()).await;
    let reply = subscribe(&mut back, "h:r", Some((1, &epoch))).await;
    assert_eq!((reply["recovered"].clone(), reply["offset"].clone()), (json!(true), json!(4)), "{reply}");
    let mut data = Vec::new();
    for _ in 0..3 {
        let m = back.next_value().await;
        data.push((m["offset"].as_u64().unwrap(), m["data"].as_str().unwrap().to_owned()));
    }
    assert_eq!(data, [(2, "ws-2".into()), (3, "http-3".into()), (4, "fcall-4".into())]);

    // A plain PUBLISH (a v1 backend) is still delivered live, without offset, and counted.
    redis.publish_raw("fanout:h:r", &envelope("\"plain\"")).await;
    let m = back.next_value().await;
    assert_eq!(m["data"], "plain");
    assert!(m.get("offset").is_none(), "{m}");
    assert_eq!(b.metric("fanout_history_unstored_publications_total").await, 1.0);
    publish(&mut p, "h:r", json!("ws-5")).await;
    assert_eq!(offsets(&mut back, 1).await, [5], "the plain one took no offset");

    // history_size is exact with Redis too (the stream is trimmed loosely, reads are not).
    for i in 1..=5 {
        publish(&mut p, "small:r", json!(i)).await;
    }
    let (_, h) = api(&a, "/api/history", json!({"channel":"small:r"})).await;
    let kept: Vec<u64> = h["publications"].as_array().unwrap().iter().map(|p| p["offset"].as_u64().unwrap()).collect();
    assert_eq!(kept, [3, 4, 5]);
    let small_epoch = h["epoch"].as_str().unwrap();
    let mut trimmed = WsClient::json(&a.ws_url()).await;
    assert_eq!(subscribe(&mut trimmed, "small:r", Some((1, small_epoch))).await["recovered"], false);
    assert_eq!(subscribe(&mut trimmed, "small:r:2", Some((0, "x"))).await["recovered"], false);
    let mut exact = WsClient::json(&a.ws_url()).await;
    assert_eq!(subscribe(&mut exact, "small:r", Some((2, small_epoch))).await["recovered"], true);
    assert_eq!(offsets(&mut exact, 3).await, [3, 4, 5]);

    // Keys of a channel share its hash tag, and expire with history_ttl.
    let ttl: i64 = redis.cli(&["TTL", "{fanout:h:r}:history"]).trim().parse().unwrap();
    assert!((1..=600).contains(&ttl), "TTL {ttl}");
    assert_eq!(redis.cli(&["XLEN", "{fanout:h:r}:history"]).trim(), "5");
    assert_eq!(redis.cli(&["HGET", "{fanout:h:r}:meta", "e"]).trim(), epoch);
    // Outside history FCALL still publishes (offset 0) and a duplicate key is answered once.
    let mut plain = WsClient::json(&a.ws_url()).await;
    plain.subscribe("other").await;
    for _ in 0..2 {
        let o: u64 = redis::cmd("FCALL")
            .arg("fanout_publish")
            .arg(1)
            .arg("fanout:other")
            .arg(envelope("\"x\""))
            .arg("key-1")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(o, 0);
    }
    assert_eq!(plain.next_value().await["data"], "x");
    plain.expect_silence(Duration::from_millis(300)).await;
}

/// A node keeps its subscribers whole across its own pub/sub reconnects: everything
/// published while the connection was down is delivered from history, in order, once.
#[tokio::test]
async fn killing_the_pubsub_connection_while_publishing_loses_no_offset() {
    let redis = RedisServer::start();
    let url = redis.url();
    let config = config_file("history-kill", CONFIG);
    let node = Node::start(BIN, &args(config.to_str().unwrap(), Some(&url)));
    let publisher = Node::start(BIN, &args(config.to_str().unwrap(), Some(&url)));
    let mut subs = Vec::new();
    for _ in 0..3 {
        let mut s = WsClient::json(&node.ws_url()).await;
        subscribe(&mut s, "h:k", None).await;
        subs.push(s);
    }
    const N: u64 = 300;
    let internal = publisher.internal;
    let publishing = tokio::spawn(async move {
        for i in 1..=N {
            let body = json!({"channel":"h:k","data":i,"idempotency_key":format!("p{i}")}).to_string();
            // Retried with its key until accepted: the publisher's own connection is not
            // the one being killed, but a retry must never duplicate either way.
            while http(internal, "POST", "/api/publish", &[], body.as_bytes()).await.status != 200 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let mut killed = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let out = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        killed += out.trim().parse::<u32>().unwrap_or(0);
    }
    assert!(killed >= 3, "killed {killed} pub/sub connections");
    publishing.await.unwrap();
    for s in &mut subs {
        assert_eq!(offsets(s, N as usize).await, (1..=N).collect::<Vec<_>>(), "every offset exactly once, in order");
        s.expect_silence(Duration::from_millis(200)).await;
    }
    assert!(node.metric("fanout_broker_reconnects_total").await >= 1.0);
    assert_eq!(node.metric("fanout_resyncs_total").await, 0.0);
}

/// A Redis that restarts empty loses history: subscribers are told at once (`resync`),
/// the next publication continues from the resync's offset in the new epoch, and an old
/// position cannot be recovered.
#[tokio::test]
async fn a_redis_restarted_empty_means_a_new_epoch_and_a_resync() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let config = config_file("history-restart", CONFIG);
    let node = Node::start(BIN, &args(config.to_str().unwrap(), Some(&url)));
    let mut sub = WsClient::json(&node.ws_url()).await;
    let old = subscribe(&mut sub, "h:z", None).await["epoch"].as_str().unwrap().to_owned();
    let mut p = WsClient::json(&node.ws_url()).await;
    for i in 0..3 {
        publish(&mut p, "h:z", json!(i)).await;
    }
    assert_eq!(offsets(&mut sub, 3).await, [1, 2, 3]);
    redis.restart();
    let resync = sub.recv_timeout(Duration::from_secs(15)).await.value();
    assert_eq!((resync["op"].clone(), resync["channel"].clone()), (json!("resync"), json!("h:z")), "{resync}");
    let new = resync["epoch"].as_str().unwrap().to_owned();
    assert_ne!(new, old);
    let top = resync["offset"].as_u64().unwrap();
    eventually("the node is ready again", Duration::from_secs(10), async || node.ready_blocking()).await;
    let reply = loop {
        p.send(json!({"op":"publish","channel":"h:z","data":"after","id":2})).await;
        let reply = p.next_value().await;
        if reply["op"] == "published" {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((reply["offset"].as_u64(), reply["epoch"].as_str()), (Some(top + 1), Some(new.as_str())));
    assert_eq!(offsets(&mut sub, 1).await, [top + 1]);
    let mut late = WsClient::json(&node.ws_url()).await;
    let reply = subscribe(&mut late, "h:z", Some((3, &old))).await;
    assert_eq!((reply["recovered"].clone(), reply["epoch"].clone()), (json!(false), json!(new)));
    assert!(node.metric("fanout_resyncs_total").await >= 1.0);
}

/// A rolling restart of two nodes while a backend publishes 200/s: every subscriber,
/// reconnecting to whichever node is up with its last position on every 1001, ends with
/// every offset exactly once, in order.
#[tokio::test]
async fn a_rolling_restart_under_200_per_second_loses_and_duplicates_nothing() {
    use std::sync::{Arc, Mutex};
    let redis = RedisServer::start();
    let url = redis.url();
    let config = config_file("history-rolling", CONFIG);
    let cfg = config.to_str().unwrap().to_owned();
    let start = |cfg: &str, url: &str| Node::start(BIN, &args(cfg, Some(url)));
    let nodes: Arc<Mutex<Vec<(std::net::SocketAddr, String)>>> = Arc::new(Mutex::new(Vec::new()));
    let mut a = start(&cfg, &url);
    let mut b = start(&cfg, &url);
    nodes.lock().unwrap().extend([(a.internal, a.ws_url()), (b.internal, b.ws_url())]);
    const N: u64 = 1200;
    const SUBSCRIBERS: usize = 6;
    let pick = |nodes: &Arc<Mutex<Vec<(std::net::SocketAddr, String)>>>, i: usize| {
        let n = nodes.lock().unwrap();
        n[i % n.len()].clone()
    };

    let mut clients = Vec::new();
    for c in 0..SUBSCRIBERS {
        let nodes = nodes.clone();
        clients.push(tokio::spawn(async move {
            let mut got: Vec<u64> = Vec::new();
            let mut since: Option<(u64, String)> = None;
            let mut attempt = c;
            'connect: loop {
                let (_, ws_url) = pick(&nodes, attempt);
                attempt += 1;
                let Ok(mut ws) = WsClient::connect(&ws_url, None).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let mut cmd = json!({"op":"subscribe","channel":"h:roll","id":1});
                if let Some((offset, epoch)) = &since {
                    cmd["since"] = json!({"offset":offset,"epoch":epoch});
                }
                ws.send(cmd).await;
                loop {
                    match ws.recv_timeout(Duration::from_secs(20)).await {
                        Event::Json(v) if v["op"] == "subscribed" => {
                            if since.is_some() {
                                assert_eq!(v["recovered"], true, "client {c}: {v}");
                            }
                            let epoch = v["epoch"].as_str().unwrap().to_owned();
                            if since.is_none() {
                                since = Some((v["offset"].as_u64().unwrap(), epoch));
                            }
                        }
                        Event::Json(v) if v["op"] == "message" => {
                            let offset = v["offset"].as_u64().unwrap();
                            got.push(offset);
                            if let Some(s) = &mut since {
                                s.0 = offset;
                            }
                            if offset == N {
                                return got;
                            }
                        }
                        // Refused while the node it reached is draining: try another.
                        Event::Json(v) if v["op"] == "error" => continue 'connect,
                        Event::Close(_) => continue 'connect,
                        other => panic!("client {c}: {other:?}"),
                    }
                }
            }
        }));
    }
    // Every client is subscribed before the first publication.
    eventually("every client subscribed", Duration::from_secs(10), async || {
        a.metric("fanout_subscriptions").await + b.metric("fanout_subscriptions").await >= SUBSCRIBERS as f64
    })
    .await;

    let publisher_nodes = nodes.clone();
    let publishing = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        for i in 1..=N {
            tick.tick().await;
            let body = json!({"channel":"h:roll","data":i,"idempotency_key":format!("r{i}")}).to_string();
            let mut attempt = i as usize;
            loop {
                let (internal, _) = pick(&publisher_nodes, attempt);
                attempt += 1;
                // A node going away may cut the request off: retry elsewhere with the same key.
                if try_http(internal, "POST", "/api/publish", &[], body.as_bytes()).await.is_ok_and(|r| r.status == 200)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    // Roll: replace a, then b, one at a time, each drained with SIGTERM.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for old in [&mut a, &mut b] {
        let replacement = start(&cfg, &url);
        nodes.lock().unwrap().push((replacement.internal, replacement.ws_url()));
        nodes.lock().unwrap().retain(|(addr, _)| *addr != old.internal);
        old.signal("TERM");
        assert!(old.wait(Duration::from_secs(30)).is_some_and(|s| s.success()), "the drained node exited 0");
        *old = replacement;
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    publishing.await.unwrap();
    for (c, client) in clients.into_iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(30), client).await.expect("client finished").unwrap();
        let first = got[0];
        assert_eq!(got, (first..=N).collect::<Vec<_>>(), "client {c}: every offset exactly once, in order");
        assert_eq!(first, 1, "client {c} subscribed before the first publication");
    }
}

/// Backends: the publisher crate writes with keys and reads history, over HTTP and
/// (`FCALL`) straight into Redis, and so does the CLI.
#[tokio::test]
async fn the_publisher_crate_and_the_cli_publish_into_and_read_history() {
    use fanout_publisher::Publisher;
    let redis = RedisServer::start();
    let url = redis.url();
    let config = config_file("history-publisher", CONFIG);
    let node = Node::start(BIN, &args(config.to_str().unwrap(), Some(&url)));
    let api_url = format!("http://{}", node.internal);
    let http_pub = Publisher::http(&api_url).build().unwrap();
    let first = http_pub.publish_with("h:p", &json!({"n":1}), Some("k-1")).await.unwrap();
    assert_eq!(first.offset, Some(1));
    let epoch = first.epoch.clone().unwrap();
    assert_eq!(http_pub.publish_with("h:p", &json!({"n":1}), Some("k-1")).await.unwrap(), first, "a retry");
    let redis_pub = Publisher::redis(&url).connect().await.unwrap();
    let stored = redis_pub.publish_with("h:p", &json!({"n":2}), Some("k-2")).await.unwrap();
    assert_eq!((stored.offset, stored.epoch), (Some(2), None));
    assert_eq!(redis_pub.publish_with("h:p", &json!({"n":2}), Some("k-2")).await.unwrap().offset, Some(2));
    assert_eq!(redis_pub.publish_with("plain", &1, None).await.unwrap().offset, None, "outside history");
    let h = http_pub.history("h:p", None, None).await.unwrap();
    assert_eq!((h.offset, h.epoch.as_str()), (2, epoch.as_str()));
    assert_eq!(h.publications.iter().map(|p| p.data.clone()).collect::<Vec<_>>(), [json!({"n":1}), json!({"n":2})]);
    assert!(redis_pub.history("h:p", None, None).await.is_err(), "history needs HTTP");

    let cli = |args: &[&str]| {
        let out = std::process::Command::new(BIN).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let printed = cli(&["publish", "-c", "h:p", "-d", "3", "--api-url", &api_url, "--idempotency-key", "k-3"]);
    assert_eq!(serde_json::from_str::<Value>(printed.trim()).unwrap(), json!({"offset":3,"epoch":epoch}));
    let lines = cli(&["history", "h:p", "--api-url", &api_url, "--since-offset", "1", "--since-epoch", &epoch]);
    let lines: Vec<Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines[0], json!({"offset":3,"epoch":epoch}));
    assert_eq!(lines[1..].iter().map(|l| l["offset"].clone()).collect::<Vec<_>>(), [json!(2), json!(3)]);
    assert_eq!(lines[2]["data"], 3);
}

/// A slow consumer cut off with 4008 comes back with its last position and gets exactly
/// what it missed — more than its send queue holds, so the replay is fed as it reads.
#[tokio::test]
async fn a_slow_consumer_cut_with_4008_recovers_a_gap_larger_than_its_queue() {
    let config = config_file("history-4008", "[namespaces.big]\nhistory_size = 5000\n");
    let node = Node::start(
        BIN,
        &["--config", config.to_str().unwrap(), "--outbound-queue-bytes", "65536", "--max-message-size", "4096"],
    );
    let mut slow = WsClient::json(&node.ws_url()).await;
    let epoch = subscribe(&mut slow, "big:1", None).await["epoch"].as_str().unwrap().to_owned();
    const N: u64 = 4000;
    let pad = "x".repeat(1000);
    for i in 1..=N {
        let (status, _) = api(&node, "/api/publish", json!({"channel":"big:1","data":{"i":i,"pad":pad}})).await;
        assert_eq!(status, 200);
    }
    // It never read while 4 MB were published: cut off. What reached its socket is still
    // readable, then the 4008.
    let mut last = 0;
    loop {
        match slow.recv_timeout(Duration::from_secs(10)).await {
            Event::Json(m) if m["op"] == "message" => {
                let o = m["offset"].as_u64().unwrap();
                assert_eq!(o, last + 1, "in order up to the cut");
                last = o;
            }
            Event::Close(code) => {
                assert_eq!(code, Some(4008));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(last < N - 100, "the gap is large ({last} of {N} read)");
    let mut back = WsClient::json(&node.ws_url()).await;
    let reply = subscribe(&mut back, "big:1", Some((last, &epoch))).await;
    assert_eq!((reply["recovered"].clone(), reply["offset"].clone()), (json!(true), json!(N)), "{reply}");
    assert_eq!(offsets(&mut back, (N - last) as usize).await, (last + 1..=N).collect::<Vec<_>>());
    // Live ones follow the replay, none twice.
    assert_eq!(api(&node, "/api/publish", json!({"channel":"big:1","data":"live"})).await.0, 200);
    assert_eq!(offsets(&mut back, 1).await, [N + 1]);
    assert!(node.metric("fanout_publications_replayed_total").await >= (N - last) as f64);
}
