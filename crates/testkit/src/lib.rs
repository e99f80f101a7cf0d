//! Test support shared by the workspace's integration tests: real `redis-server`
//! processes on free loopback ports, real `fanout` nodes on port 0, and small WebSocket
//! and HTTP clients. Nothing here is mocked.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

mod cluster;
mod http;
mod node;
mod raw;
mod redis;
mod ws;

pub use cluster::RedisCluster;
pub use http::{http, try_http, HttpResponse};
pub use node::{parse_metrics, Node};
pub use raw::{client_frame, RawFrame, RawWs};
pub use redis::{free_port, RedisServer};
pub use ws::{Event, WsClient};

/// Polls `check` until it holds, every 20 ms; panics naming `what` after `within`. For
/// waiting on an event (a metric, a state) instead of sleeping a fixed time and asserting.
/// Returns how long it took.
pub async fn eventually(
    what: &str,
    within: std::time::Duration,
    mut check: impl AsyncFnMut() -> bool,
) -> std::time::Duration {
    let started = std::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < within, "did not happen within {within:?}: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    started.elapsed()
}

/// Writes `toml` to a fresh file under the temp directory (named after `name` and this
/// process) and returns its path, for `--config`.
pub fn config_file(name: &str, toml: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("fanout-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

/// Runs `bin publish ARGS --channel C ...` (one broadcast over `channels`) and asserts
/// it succeeded, showing its standard error when not.
pub fn publish_cli(bin: &str, args: &[&str], channels: &[&str]) {
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("publish").args(args);
    for c in channels {
        cmd.args(["--channel", c]);
    }
    let out = cmd.output().expect("cannot run fanout publish");
    assert!(out.status.success(), "fanout publish failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// Sends a signal to a process by pid (`TERM`, `KILL`, `STOP`, `CONT`).
pub fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{sig} {pid} failed");
}
