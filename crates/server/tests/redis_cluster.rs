//! A real Redis Cluster (three masters, a replica each, started by the test): channels
//! ride sharded pub/sub on the master that owns their slot, every publication arrives
//! once on every node, history recovers on a cluster, and subscribers keep their
//! channels through a master's failover and a slot moved with `redis-cli --cluster
//! reshard`.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{collections::BTreeMap, time::Duration};

use fanout_protocol::key_slot;
use fanout_testkit::{config_file, eventually, http, publish_cli, Event, Node, RedisCluster, WsClient};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_fanout");

const CONFIG: &str = "[namespaces.h]\nhistory_size = 100\nhistory_ttl = \"10m\"\n";

fn nodes(cluster: &RedisCluster, n: usize, name: &str) -> Vec<Node> {
    let config = config_file(name, CONFIG);
    let seeds = cluster.seeds();
    let args = ["--redis-cluster", "--redis-url", &seeds, "--command-rate", "0", "--config", config.to_str().unwrap()];
    (0..n).map(|_| Node::start(BIN, &args)).collect()
}

fn slot(channel: &str) -> u16 {
    key_slot(format!("fanout:{channel}").as_bytes())
}

/// A channel name in namespace `ns` whose Redis channel hashes to `slot`.
fn channel_in_slot(ns: &str, slot: u16) -> String {
    (0..).map(|i| format!("{ns}:k{i}")).find(|c| self::slot(c) == slot).unwrap()
}

async fn publish(node: &Node, channel: &str, data: Value) -> (u16, Value) {
    let body = json!({"channel": channel, "data": data}).to_string();
    let r = http(node.internal, "POST", "/api/publish", &[], body.as_bytes()).await;
    (r.status, r.json())
}

/// Receives messages until `n` arrived, as (channel, data text), sorted.
async fn receive(client: &mut WsClient, n: usize) -> Vec<(String, String)> {
    let mut got = Vec::new();
    while got.len() < n {
        let m = client.recv_timeout(Duration::from_secs(10)).await.value();
        assert_eq!(m["op"], "message", "{m}");
        got.push((m["channel"].as_str().unwrap().to_owned(), m["data"].to_string()));
    }
    got.sort();
    got
}

fn count(out: &str) -> Vec<i64> {
    out.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[tokio::test]
async fn channels_ride_sharded_pubsub_on_every_master() {
    let cluster = RedisCluster::start(3, 1);
    let [a, b] = <[Node; 2]>::try_from(nodes(&cluster, 2, "cluster-spread")).ok().unwrap();
    // Our slot function is Redis Cluster's.
    for key in ["fanout:news", "fanout:{room}:1", "x"] {
        let theirs: u16 = cluster.nodes[0].cli(&["CLUSTER", "KEYSLOT", key]).trim().parse().unwrap();
        assert_eq!(key_slot(key.as_bytes()), theirs, "{key}");
    }
    let channels: Vec<String> = (0..300).map(|i| format!("s{i}")).collect();
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    for m in &masters {
        assert!(channels.iter().any(|c| cluster.master_of(slot(c)) == *m), "no channel on master {m}");
    }
    let mut on_b = WsClient::json(&b.ws_url()).await;
    let mut on_a = WsClient::msgpack(&a.ws_url()).await;
    for c in &channels {
        on_b.subscribe(c).await;
        on_a.subscribe(c).await;
    }
    // Sharded: each channel is subscribed on its own master, by both nodes, and nowhere
    // with classic pub/sub.
    for c in channels.iter().step_by(7) {
        let key = format!("fanout:{c}");
        let master = &cluster.nodes[cluster.master_of(slot(c))];
        assert_eq!(count(&master.cli(&["PUBSUB", "SHARDNUMSUB", &key]))[..], [2], "{c}");
        for node in &cluster.nodes {
            assert_eq!(count(&node.cli(&["PUBSUB", "NUMSUB", &key]))[..], [0], "{c} on classic pub/sub");
        }
    }
    for c in &channels {
        assert_eq!(publish(&a, c, json!({"c": c})).await.0, 200, "{c}");
    }
    let want: Vec<(String, String)> = {
        let mut w: Vec<_> = channels.iter().map(|c| (c.clone(), json!({"c": c}).to_string())).collect();
        w.sort();
        w
    };
    assert_eq!(receive(&mut on_b, channels.len()).await, want, "every publication once, on node B");
    assert_eq!(receive(&mut on_a, channels.len()).await, want, "every publication once, on node A");
    on_b.expect_silence(Duration::from_millis(100)).await;
    // A backend publishes straight into the channel's master with SPUBLISH.
    let c = &channels[0];
    let payload = fanout_protocol::encode_envelope(5, fanout_protocol::Encoding::Json, br#"{"via":"spublish"}"#);
    let client = redis::Client::open(cluster.nodes[cluster.master_of(slot(c))].url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let receivers: i64 =
        redis::cmd("SPUBLISH").arg(format!("fanout:{c}")).arg(payload).query_async(&mut conn).await.unwrap();
    assert_eq!(receivers, 2);
    assert_eq!(receive(&mut on_b, 1).await, [(c.clone(), json!({"via":"spublish"}).to_string())]);
    // `fanout publish --redis-cluster` (the Rust publisher) reaches every master.
    let spread: Vec<&str> =
        masters.iter().map(|&m| channels.iter().find(|c| cluster.master_of(slot(c)) == m).unwrap().as_str()).collect();
    publish_cli(BIN, &["--redis-cluster", "--redis-url", &cluster.seeds(), "--data", r#"{"via":"cli"}"#], &spread);
    let mut want: Vec<_> = spread.iter().map(|c| (c.to_string(), json!({"via":"cli"}).to_string())).collect();
    want.sort();
    assert_eq!(receive(&mut on_b, 3).await, want);
    // Redis drops every pub/sub connection: the node notices and subscribes again.
    let killed: i64 =
        masters.iter().map(|&m| count(&cluster.nodes[m].cli(&["CLIENT", "KILL", "TYPE", "pubsub"]))[0]).sum();
    assert!(killed >= 6, "each node's connection to each master: killed {killed}");
    let sample: Vec<&String> = channels.iter().step_by(10).collect();
    let mut round = 0;
    eventually(
        "every channel delivers again after Redis dropped the connections",
        Duration::from_secs(20),
        async || {
            round += 1;
            for c in &sample {
                let _ = publish(&a, c, json!(round)).await;
            }
            let mut seen = std::collections::BTreeSet::new();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            while seen.len() < sample.len() && tokio::time::Instant::now() < deadline {
                if let Event::Json(m) = on_b.recv_timeout(Duration::from_millis(50)).await {
                    if m["data"] == json!(round) {
                        seen.insert(m["channel"].as_str().unwrap().to_owned());
                    }
                }
            }
            seen.len() == sample.len()
        },
    )
    .await;
    // The control plane works on a cluster: both nodes report.
    eventually("both nodes in /api/nodes", Duration::from_secs(10), async || {
        http(a.internal, "GET", "/api/nodes", &[], b"").await.json()["nodes"].as_array().map(Vec::len) == Some(2)
    })
    .await;
}

#[tokio::test]
async fn history_recovers_on_a_cluster() {
    let cluster = RedisCluster::start(3, 1);
    let [a, b] = <[Node; 2]>::try_from(nodes(&cluster, 2, "cluster-history")).ok().unwrap();
    let mut sub = WsClient::json(&b.ws_url()).await;
    sub.send(json!({"op":"subscribe","channel":"h:room","id":1})).await;
    let reply = sub.next_value().await;
    assert_eq!((reply["op"].as_str(), reply["offset"].as_u64()), (Some("subscribed"), Some(0)), "{reply}");
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    for i in 1..=3 {
        let (status, body) = publish(&a, "h:room", json!(i)).await;
        assert_eq!((status, body["offset"].as_u64()), (200, Some(i)), "{body}");
    }
    for i in 1..=3u64 {
        assert_eq!(sub.next_value().await["offset"], i);
    }
    drop(sub);
    for i in 4..=6 {
        assert_eq!(publish(&a, "h:room", json!(i)).await.0, 200);
    }
    let mut back = WsClient::json(&b.ws_url()).await;
    back.send(json!({"op":"subscribe","channel":"h:room","id":1,"since":{"offset":3,"epoch":epoch}})).await;
    let reply = back.next_value().await;
    assert_eq!((reply["recovered"].as_bool(), reply["offset"].as_u64()), (Some(true), Some(6)), "{reply}");
    for i in 4..=6u64 {
        let m = back.next_value().await;
        assert_eq!((m["offset"].as_u64(), m["data"].as_u64()), (Some(i), Some(i)), "{m}");
    }
    let r = http(a.internal, "POST", "/api/history", &[], br#"{"channel":"h:room","limit":2}"#).await;
    assert_eq!(r.json()["publications"].as_array().map(Vec::len), Some(2), "{}", r.text());
}

#[tokio::test]
async fn subscribers_keep_their_channels_through_failover_and_reshard() {
    let mut cluster = RedisCluster::start(3, 1);
    let [a, b] = <[Node; 2]>::try_from(nodes(&cluster, 2, "cluster-moves")).ok().unwrap();
    let masters = cluster.masters();
    // One history channel and one plain channel on each master.
    let mut channels = Vec::new();
    for &m in &masters {
        let s = cluster.lowest_slot(m) + 1;
        channels.push(channel_in_slot("h", s));
        channels.push(channel_in_slot("p", s));
    }
    let mut sub = WsClient::json(&b.ws_url()).await;
    for c in &channels {
        sub.subscribe(c).await;
    }

    for c in &channels {
        assert_eq!(publish(&a, c, json!(0)).await.0, 200);
    }
    assert_eq!(receive(&mut sub, channels.len()).await.len(), channels.len());
    cluster.wait_replicated();

    // 1. Kill the master of the first pair; its replica takes over.
    let victim = cluster.master_of(slot(&channels[0]));
    cluster.nodes[victim].kill();
    cluster.wait_until("a replica took over", |c| c.all_ok() && c.masters().len() == 3);
    // Publish rounds until every channel delivers its latest accepted round. History
    // channels must deliver every accepted publication exactly once, in offset order
    // (what was published while the node resubscribed comes from history); plain ones
    // resume (at most once meanwhile).
    let mut round = 0u64;
    let mut accepted = BTreeMap::<String, Vec<u64>>::new();
    let mut got = BTreeMap::<String, Vec<(u64, Option<u64>)>>::new();
    eventually("every channel delivers again after the failover", Duration::from_secs(30), async || {
        round += 1;
        for c in &channels {
            if publish(&a, c, json!(round)).await.0 == 200 {
                accepted.entry(c.clone()).or_default().push(round);
            }
        }
        let caught_up = |got: &BTreeMap<String, Vec<(u64, Option<u64>)>>| {
            channels.iter().all(|c| {
                accepted
                    .get(c)
                    .and_then(|a| a.last())
                    .is_some_and(|last| got.get(c).and_then(|g| g.last()).map(|g| g.0) == Some(*last))
            })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while !caught_up(&got) && tokio::time::Instant::now() < deadline {
            if let Event::Json(m) = sub.recv_timeout(Duration::from_millis(50)).await {
                assert_eq!(m["op"], "message", "{m}");
                let entry = (m["data"].as_u64().unwrap(), m["offset"].as_u64());
                got.entry(m["channel"].as_str().unwrap().to_owned()).or_default().push(entry);
            }
        }
        // Shown only if the test fails (the harness keeps a passing test's output).
        if round.is_multiple_of(25) {
            for c in &channels {
                eprintln!(
                    "round {round}: {c} accepted {:?}, got {:?}",
                    accepted.get(c).and_then(|a| a.last()),
                    got.get(c).and_then(|g| g.last())
                );
            }
        }
        caught_up(&got)
    })
    .await;
    for c in &channels {
        let rounds: Vec<u64> = got[c].iter().map(|g| g.0).collect();
        if c.starts_with("h:") {
            assert_eq!(rounds, accepted[c], "{c}: every accepted publication, once, in order");
            let offsets: Vec<u64> = got[c].iter().map(|g| g.1.unwrap()).collect();
            assert_eq!(offsets, (2..2 + offsets.len() as u64).collect::<Vec<_>>(), "{c}: offsets follow on");
        } else {
            assert!(rounds.iter().all(|r| accepted[c].contains(r)), "{c}: {rounds:?}");
        }
    }

    // 2. Move a slot with a subscribed channel to another master.
    let from = cluster.master_of(slot(&channels[2]));
    let to = *cluster.masters().iter().find(|&&m| m != from).unwrap();
    let moving = channel_in_slot("h", cluster.lowest_slot(from));
    sub.subscribe(&moving).await;
    assert_eq!(publish(&a, &moving, json!("before")).await.0, 200);
    assert_eq!(sub.next_value().await["data"], "before");
    let moved = cluster.reshard_one(from, to);
    assert_eq!(moved, slot(&moving));
    assert_eq!(publish(&a, &moving, json!("after")).await.0, 200);
    let m = sub.recv_timeout(Duration::from_secs(10)).await.value();
    assert_eq!((m["channel"].as_str(), m["data"].as_str()), (Some(moving.as_str()), Some("after")), "{m}");
    let key = format!("fanout:{moving}");
    eventually("the subscription moved with its slot", Duration::from_secs(10), async || {
        count(&cluster.nodes[to].cli(&["PUBSUB", "SHARDNUMSUB", &key])) == [1]
    })
    .await;
}
