//! The baseline the load generator is measured against: N subscribers written the
//! straightforward way (tokio-tungstenite, one task per connection, each message parsed
//! with serde_json). Prints deliveries per CPU-second, for comparison with
//! `fanout-loadtest`'s `deliveries_per_cpu_second` under the same publisher.
//!
//!   naive_subscribers ws://127.0.0.1:7000/ws CHANNEL N SECONDS

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn cpu_seconds() -> f64 {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF).expect("getrusage");
    let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
    t(u.user_time()) + t(u.system_time())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).cloned().unwrap_or_else(|| "ws://127.0.0.1:7000/ws".into());
    let channel = args.get(2).cloned().unwrap_or_else(|| "bench".into());
    let n: usize = args.get(3).and_then(|v| v.parse().ok()).unwrap_or(1000);
    let secs: u64 = args.get(4).and_then(|v| v.parse().ok()).unwrap_or(10);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let received = Arc::new(AtomicU64::new(0));
        for _ in 0..n {
            let (url, channel, received) = (url.clone(), channel.clone(), received.clone());
            tokio::spawn(async move {
                let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect");
                let cmd = serde_json::json!({"op": "subscribe", "channel": channel, "id": 1}).to_string();
                ws.send(Message::text(cmd)).await.expect("subscribe");
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(text) = msg {
                        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                        if v["op"] == "message" && v["data"]["s"].is_u64() {
                            received.fetch_add(1, Relaxed);
                        }
                    }
                }
            });
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (c0, r0, t0) = (cpu_seconds(), received.load(Relaxed), Instant::now());
        tokio::time::sleep(Duration::from_secs(secs)).await;
        let (c1, r1) = (cpu_seconds(), received.load(Relaxed));
        let (d, cpu, wall) = (r1 - r0, c1 - c0, t0.elapsed().as_secs_f64());
        println!(
            "naive: {d} deliveries in {wall:.1}s = {:.0}/s, {cpu:.2} cpu-s, {:.0} deliveries per cpu-second",
            d as f64 / wall,
            d as f64 / cpu
        );
    });
}
