//! Test support shared by the workspace's integration tests: real `redis-server`
//! processes on free loopback ports, real `fanout` nodes on port 0, and small WebSocket
//! and HTTP clients. Nothing here is mocked.

mod http;
mod node;
mod raw;
mod redis;
mod ws;

pub use http::{http, HttpResponse};
pub use node::Node;
pub use raw::{client_frame, RawFrame, RawWs};
pub use redis::{free_port, RedisServer};
pub use ws::{Event, WsClient};

/// Sends a signal to a process by pid (`TERM`, `KILL`, `STOP`, `CONT`).
pub fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
    assert!(status.is_ok_and(|s| s.success()), "kill -{sig} {pid} failed");
}
