//! Example: publishing from a Rust backend with `fanout-publisher`, through a node's internal HTTP API or straight
//! into Redis. crates/server/tests/examples.rs runs [`run`] against real nodes and checks what subscribers receive.
//!
//! ```text
//! FANOUT_API_URL=http://gateway:9090 FANOUT_API_KEY=secret cargo run -p fanout-publisher --example publish -- http
//! FANOUT_REDIS_URL=redis://redis:6379 cargo run -p fanout-publisher --example publish -- redis
//! ```
//!
//! Environment: `FANOUT_API_URL` (default `http://127.0.0.1:9090`), `FANOUT_API_KEY` (unset: no `Authorization`
//! header), `FANOUT_REDIS_URL` (default `redis://127.0.0.1:6379`), `FANOUT_REDIS_PREFIX` (default `fanout:`, must
//! match the gateway's), `FANOUT_CHANNEL` (default `examples:demo`). Exit codes as `fanout publish`: 0 published,
//! 1 rejected, 64 bad configuration, 69 unavailable or timed out.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::process::ExitCode;

use fanout_publisher::{Encoding, PublishError, Publisher};
use serde::Serialize;

#[derive(Serialize)]
pub(crate) struct OrderEvent {
    pub order: Order,
}

#[derive(Serialize)]
pub(crate) struct Order {
    pub id: u64,
    pub customer: Customer,
    pub lines: Vec<Line>,
    pub paid: bool,
    pub coupon: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct Customer {
    pub name: String,
    pub tags: Vec<String>,
}

#[derive(Serialize)]
pub(crate) struct Line {
    pub sku: String,
    pub qty: u32,
    pub price: f64,
}

pub(crate) fn order_event() -> OrderEvent {
    OrderEvent {
        order: Order {
            id: 1042,
            customer: Customer { name: "Zoë Ångström".into(), tags: vec!["vip".into(), "beta".into()] },
            lines: vec![
                Line { sku: "A-1".into(), qty: 2, price: 9.5 },
                Line { sku: "B-7".into(), qty: 1, price: 120.25 },
            ],
            paid: true,
            coupon: None,
        },
    }
}

/// Publishes what every example publishes (a non-ASCII string, a nested object, a string close to the default
/// 64 KiB limit on `data`) and, in `redis` mode, one more value whose types show off MessagePack. `env` reads a
/// setting (main passes the process environment). Returns how many publications were made.
pub(crate) async fn run(mode: &str, env: impl Fn(&str) -> Option<String>) -> Result<usize, PublishError> {
    let var = |key: &str, default: &str| env(key).unwrap_or_else(|| default.to_owned());
    let channel = var("FANOUT_CHANNEL", "examples:demo");
    // A real service builds its Publisher once and shares clones of it: they share the connections.
    let publisher = match mode {
        "http" => {
            let mut builder = Publisher::http(var("FANOUT_API_URL", "http://127.0.0.1:9090"));
            if let Some(key) = env("FANOUT_API_KEY") {
                builder = builder.api_key(key);
            }
            builder.build()?
        }
        // MessagePack is the compact choice once you write envelopes yourself; JSON subscribers still get JSON.
        // connect() rather than build(): a wrong address or password shows now, not on the first publish.
        "redis" => {
            Publisher::redis(var("FANOUT_REDIS_URL", "redis://127.0.0.1:6379"))
                .prefix(var("FANOUT_REDIS_PREFIX", "fanout:"))
                .encoding(Encoding::MsgPack)
                .connect()
                .await?
        }
        other => return Err(PublishError::Config(format!("mode {other:?}: expected http or redis"))),
    };
    // Each publish returns once the gateway answered 200 or Redis acknowledged the PUBLISH, so awaiting them one
    // after the other keeps their order for subscribers.
    publisher.publish(&channel, "héllo wörld ☃ 日本").await?;
    publisher.publish(&channel, &order_event()).await?;
    publisher.publish(&channel, &"0123456789".repeat(6000)).await?;
    if mode == "http" {
        return Ok(3);
    }
    let sample = serde_json::json!({
        "enc": "msgpack",
        "n": -7,
        "big": 4_294_967_296u64,
        "ratio": 0.25,
        "flags": [true, false, null],
        "name": "Zoë",
        "empty": {},
    });
    publisher.publish(&channel, &sample).await?;
    Ok(4)
}

#[tokio::main]
async fn main() -> ExitCode {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "http".to_owned());
    match run(&mode, |key| std::env::var(key).ok()).await {
        Ok(n) => {
            println!("published {n} publications via {mode}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("publish: {e}");
            // A timed-out publish may have been delivered, so `is_retryable` does not mean "safe to repeat"
            // when duplicates matter: see docs/publishing.md.
            ExitCode::from(match e {
                e if e.is_retryable() => 69,
                PublishError::Config(_) | PublishError::InvalidChannel { .. } => 64,
                _ => 1,
            })
        }
    }
}
