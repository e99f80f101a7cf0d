//! `fanout publish` and `fanout subscribe` end to end against real nodes and Redis.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Stdio},
};

use fanout_testkit::{Node, RedisServer};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_fanout");

/// Starts `fanout subscribe` and waits until it reports its subscriptions.
fn subscriber(node: &Node, args: &[&str]) -> (std::process::Child, BufReader<std::process::ChildStdout>) {
    let mut child = Command::new(BIN)
        .args(["subscribe", "--url", &node.ws_url()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("subscribed to"), "{line}");
    let out = BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

fn next_line(out: &mut BufReader<std::process::ChildStdout>) -> Value {
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

fn publish(args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut child = Command::new(BIN)
        .arg("publish")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

#[test]
fn publish_and_subscribe_through_both_transports() {
    let redis = RedisServer::start();
    let a = Node::start(BIN, &["--redis-url", &redis.url(), "--api-key", "k"]);
    let b = Node::start(BIN, &["--redis-url", &redis.url()]);
    let (mut sub, mut out) = subscriber(&b, &["cli:1", "cli:2", "--count", "5"]);
    let (mut mp_sub, mut mp_out) = subscriber(&a, &["cli:1", "--msgpack", "--count", "4"]);
    let api = format!("http://{}", a.internal);

    let ok = publish(&["--api-url", &api, "--api-key", "k", "-c", "cli:1", "--data", r#"{"n":"ünï"}"#], None);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let ok = publish(&["--redis-url", &redis.url(), "-c", "cli:1", "--msgpack", "--data", "[1,2]"], None);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let ok = publish(
        &["--api-url", &api, "--api-key", "k", "-c", "cli:1", "-c", "cli:2"],
        Some("\"first\"\n\n{\"second\":true}\n"),
    );
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));

    let got: Vec<(Value, Value)> =
        (0..5).map(|_| next_line(&mut out)).map(|v| (v["channel"].clone(), v["data"].clone())).collect();
    assert_eq!(
        got,
        vec![
            (json!("cli:1"), json!({"n":"ünï"})),
            (json!("cli:1"), json!([1, 2])),
            (json!("cli:1"), json!("first")),
            (json!("cli:2"), json!("first")),
            (json!("cli:1"), json!({"second":true})),
        ]
    );
    assert!(sub.wait().unwrap().success(), "--count ends the subscriber");
    let mp: Vec<Value> = (0..4).map(|_| next_line(&mut mp_out)["data"].clone()).collect();
    assert_eq!(mp, vec![json!({"n":"ünï"}), json!([1, 2]), json!("first"), json!({"second":true})]);
    assert!(mp_sub.wait().unwrap().success());
}

#[test]
fn publish_exit_codes() {
    let node = Node::start(BIN, &["--api-key", "k"]);
    let api = format!("http://{}", node.internal);
    let code = |args: &[&str], stdin: Option<&str>| publish(args, stdin).status.code();
    assert_eq!(code(&["--api-url", &api, "--api-key", "k", "-c", "x", "--data", "{bad"], None), Some(65));
    assert_eq!(code(&["--api-url", &api, "--api-key", "wrong", "-c", "x", "--data", "1"], None), Some(1));
    assert_eq!(code(&["--api-url", &api, "--api-key", "k", "-c", "no spaces", "--data", "1"], None), Some(64));
    assert_eq!(code(&["--api-url", &api, "--api-key", "k", "-c", "x"], Some("1\nnot json\n")), Some(65));
    let dead = format!("http://127.0.0.1:{}", fanout_testkit::free_port());
    assert_eq!(code(&["--api-url", &dead, "-c", "x", "--data", "1", "--timeout", "1s"], None), Some(69));
    assert_eq!(code(&["-c", "x", "--data", "1", "--file", "/tmp/x"], None), Some(64));
    let out = Command::new(BIN).args(["subscribe", "--url", "http://x"]).arg("c").output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let out = Command::new(BIN)
        .args(["subscribe", "--url", &format!("ws://127.0.0.1:{}/ws", fanout_testkit::free_port()), "c"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
}
