//! `/metrics` driven by real traffic: the values move as they should and the exposition
//! is well-formed Prometheus text.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{collections::HashMap, time::Duration};

use fanout_testkit::{http, Node, RedisServer, WsClient};
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_fanout");

async fn scrape(node: &Node) -> HashMap<String, f64> {
    let r = http(node.internal, "GET", "/metrics", &[], b"").await;
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/plain")));
    fanout_testkit::parse_metrics(&r.text())
}

fn get(m: &HashMap<String, f64>, series: &str) -> f64 {
    *m.get(series).unwrap_or(&0.0)
}

#[tokio::test]
async fn metrics_follow_real_traffic() {
    const N: usize = 50;
    let redis = RedisServer::start();
    let node = Node::start(BIN, &["--redis-url", &redis.url()]);
    let before = scrape(&node).await;
    assert_eq!(get(&before, "fanout_connections"), 0.0);
    assert_eq!(get(&before, "fanout_broker_up{shard=\"0\"}"), 1.0);
    assert_eq!(get(&before, "fanout_ready"), 1.0);
    assert_eq!(get(&before, r#"fanout_build_info{version="0.1.0"}"#), 1.0);
    for name in ["process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"] {
        assert!(before.contains_key(name), "{name} missing");
    }

    let mut a = WsClient::json(&node.ws_url()).await;
    let mut b = WsClient::msgpack(&node.ws_url()).await;
    let mut p = WsClient::json(&node.ws_url()).await;
    a.subscribe("m:1").await;
    b.subscribe("m:1").await;
    let m = scrape(&node).await;
    assert_eq!(get(&m, "fanout_connections"), 3.0);
    assert_eq!(get(&m, "fanout_subscriptions"), 2.0);
    assert_eq!(get(&m, "fanout_broker_channels{shard=\"0\"}"), 1.0);

    for i in 0..N {
        p.publish("m:1", json!(i)).await;
    }
    for s in [&mut a, &mut b] {
        for i in 0..N {
            assert_eq!(s.next_value().await["data"], json!(i));
        }
    }
    // Deliveries are counted once the write returns, which can be a moment after the client
    // read the frame: wait for the count, then assert everything exactly.
    let want = get(&before, "fanout_deliveries_total") + 2.0 * N as f64;
    fanout_testkit::eventually("every delivery is counted", Duration::from_secs(10), async || {
        get(&scrape(&node).await, "fanout_deliveries_total") >= want
    })
    .await;
    let after = scrape(&node).await;
    assert_eq!(get(&after, "fanout_deliveries_total") - get(&before, "fanout_deliveries_total"), 2.0 * N as f64);
    assert_eq!(get(&after, r#"fanout_publications_total{source="ws"}"#), N as f64);
    assert_eq!(get(&after, "fanout_broker_publications_received_total{shard=\"0\"}"), N as f64);
    assert!(get(&after, "fanout_sent_bytes_total") > 0.0);
    let latency_count = get(&after, "fanout_delivery_latency_seconds_count");
    assert!(latency_count >= 1.0 && latency_count <= 2.0 * N as f64, "{latency_count}");
    assert!(get(&after, r#"fanout_delivery_latency_seconds_bucket{le="0.0001"}"#) <= latency_count);
    assert_eq!(get(&after, r#"fanout_delivery_latency_seconds_bucket{le="+Inf"}"#), latency_count);
    assert!(get(&after, "fanout_broadcast_duration_seconds_count") >= N as f64);

    drop(a);
    drop(b);
    fanout_testkit::eventually("both sessions have ended", Duration::from_secs(10), async || {
        get(&scrape(&node).await, "fanout_connections") == 1.0
    })
    .await;
    let end = scrape(&node).await;
    assert_eq!(get(&end, "fanout_connections"), 1.0);
    assert_eq!(get(&end, "fanout_subscriptions"), 0.0);
    assert_eq!(
        get(&end, r#"fanout_connections_closed_total{reason="disconnected"}"#)
            + get(&end, r#"fanout_connections_closed_total{reason="client"}"#),
        2.0
    );
}

#[tokio::test]
async fn broker_outage_shows_in_metrics() {
    let mut redis = RedisServer::start();
    let node = Node::start(BIN, &["--redis-url", &redis.url()]);
    redis.kill();
    let mut down = false;
    for _ in 0..200 {
        let m = scrape(&node).await;
        if get(&m, "fanout_broker_up{shard=\"0\"}") == 0.0 && get(&m, "fanout_ready") == 0.0 {
            down = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(down, "fanout_broker_up never went to 0");
    redis.restart();
    let mut reconnected = false;
    for _ in 0..200 {
        let m = scrape(&node).await;
        if get(&m, "fanout_broker_up{shard=\"0\"}") == 1.0
            && get(&m, "fanout_broker_reconnects_total{shard=\"0\"}") >= 1.0
        {
            reconnected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(reconnected);
}
