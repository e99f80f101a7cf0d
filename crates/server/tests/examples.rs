//! The publishing examples (examples/python, examples/node, crates/publisher/examples/publish.rs) run against two real
//! nodes sharing a real Redis: a JSON subscriber on one node and a MessagePack subscriber on the other must receive
//! exactly what each example published, in order, and nothing more. Also: the examples' exit codes, and the envelopes
//! docs/publishing.md shows byte by byte.
//!
//! The Python and Node examples need python3 with examples/python/requirements.txt and node with examples/node's
//! packages; scripts/test.sh installs both. A missing tool fails the test and says how to install it, unless
//! FANOUT_SKIP_EXAMPLES=1, which skips the Python and Node examples (the Rust one always runs).

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use fanout_testkit::{http, Event, Node, RedisServer, WsClient};
use serde_json::{json, Value};

// Compiled from the example's own source, so the test runs the very code the example runs; only its `main`, which
// passes the process environment to `run`, is left to `cargo run --example publish`.
#[path = "../../publisher/examples/publish.rs"]
#[allow(dead_code)]
mod rust_example;

const BIN: &str = env!("CARGO_BIN_EXE_fanout");
const KEY: &str = "k";
/// Published through the HTTP API after an example exits: it must be the next thing every subscriber gets, which
/// proves nothing else arrived, without waiting for silence.
const END: &str = "end-of-example";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("crates/server is two levels down").to_owned()
}

/// What every example publishes, as JSON.
fn common_publications() -> Vec<Value> {
    vec![
        json!("héllo wörld ☃ 日本"),
        json!({
            "order": {
                "id": 1042,
                "customer": {"name": "Zoë Ångström", "tags": ["vip", "beta"]},
                "lines": [{"sku": "A-1", "qty": 2, "price": 9.5}, {"sku": "B-7", "qty": 1, "price": 120.25}],
                "paid": true,
                "coupon": null
            }
        }),
        json!("0123456789".repeat(6000)),
    ]
}

/// What the Redis examples publish in addition, MessagePack-encoded.
fn redis_publications() -> Vec<Value> {
    let mut all = common_publications();
    all.push(json!({
        "enc": "msgpack",
        "n": -7,
        "big": 4_294_967_296u64,
        "ratio": 0.25,
        "flags": [true, false, null],
        "name": "Zoë",
        "empty": {}
    }));
    all
}

fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

/// With FANOUT_SKIP_EXAMPLES=1 the Python and Node examples are not run (and say so).
fn skipping(language: &str) -> bool {
    let skip = std::env::var("FANOUT_SKIP_EXAMPLES").is_ok_and(|v| v == "1");
    if skip {
        eprintln!("FANOUT_SKIP_EXAMPLES=1: not running the {language} examples");
    }
    skip
}

/// Fails the test, saying what is missing and how to install it.
fn missing(what: &str) -> ! {
    panic!(
        "{what}\nscripts/test.sh installs what the examples need. By hand: \
         `python3 -m venv ~/.cache/fanout-tools/examples-venv && \
         ~/.cache/fanout-tools/examples-venv/bin/pip install -r examples/python/requirements.txt` and \
         `npm ci --prefix examples/node`. FANOUT_SKIP_EXAMPLES=1 skips the Python and Node examples."
    )
}

/// The Python interpreter with the examples' packages: FANOUT_EXAMPLES_PYTHON, else the venv scripts/test.sh makes,
/// else python3. None when skipping.
fn python() -> Option<PathBuf> {
    if skipping("Python") {
        return None;
    }
    let candidates: Vec<PathBuf> = match std::env::var_os("FANOUT_EXAMPLES_PYTHON") {
        Some(p) => vec![p.into()],
        None => {
            let tools = std::env::var_os("FANOUT_TOOLS_DIR").map(PathBuf::from).or_else(|| {
                let cache = std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
                Some(cache.join("fanout-tools"))
            });
            tools.map(|t| t.join("examples-venv/bin/python")).into_iter().chain([PathBuf::from("python3")]).collect()
        }
    };
    let found = candidates.iter().find(|p| {
        Command::new(p)
            .args(["-c", "import msgpack, redis, requests"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    match found {
        Some(p) => Some(p.clone()),
        None => missing(&format!("no Python with the packages msgpack, redis and requests (tried {candidates:?})")),
    }
}

/// `node`, checked to run and, for the Redis example, to have examples/node's packages. None when skipping.
fn node(needs_packages: bool) -> Option<PathBuf> {
    if skipping("Node") {
        return None;
    }
    let runs = Command::new("node").arg("--version").stdout(Stdio::null()).status().is_ok_and(|s| s.success());
    if !runs {
        missing("node is not installed (the examples need Node 20 or later)");
    }
    let modules = repo().join("examples/node/node_modules");
    if needs_packages && !["redis", "@msgpack/msgpack"].iter().all(|p| modules.join(p).join("package.json").exists()) {
        missing(&format!("examples/node's packages are not installed in {}", modules.display()));
    }
    Some("node".into())
}

/// Two nodes on one Redis, a JSON subscriber on `a` and a MessagePack subscriber on `b`, both on `channel`.
struct Cluster {
    redis: RedisServer,
    /// With [`Cluster::start_sharded`]: the nodes' `redis_shards` (`redis` is the first).
    shards: Vec<RedisServer>,
    a: Node,
    b: Node,
    subscribers: [WsClient; 2],
    channel: String,
    /// The channel keeps history: messages carry offsets, 1 up.
    stored: bool,
}

/// How the `ts` of each publication is checked.
enum Stamps {
    /// Set by the publisher, which reported them: each must arrive unchanged.
    Exactly(Vec<u64>),
    /// Set by the gateway or the library while the example ran.
    Between(u64, u64),
}

/// An example's exit code, standard output and standard error.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Cluster {
    async fn start(channel: &str) -> Self {
        Self::start_with(channel, false).await
    }

    /// Nodes on three independent Redis shards; `channel` must live on a shard other
    /// than the first, so an example that ignores the shards fails.
    async fn start_sharded(channel: &str) -> Self {
        let mut shards: Vec<RedisServer> = (0..3).map(|_| RedisServer::start()).collect();
        assert_ne!(fanout_protocol::shard_of(&format!("fanout:{channel}"), 3), 0, "pick another channel name");
        let list = shards.iter().map(RedisServer::url).collect::<Vec<_>>().join(",");
        let a = Node::start(BIN, &["--redis-shards", &list, "--api-key", KEY]);
        let b = Node::start(BIN, &["--redis-shards", &list, "--api-key", KEY]);
        let mut json = WsClient::json(&a.ws_url()).await;
        json.subscribe(channel).await;
        let mut msgpack = WsClient::msgpack(&b.ws_url()).await;
        msgpack.subscribe(channel).await;
        let redis = shards.remove(0);
        Self { redis, shards, a, b, subscribers: [json, msgpack], channel: channel.to_owned(), stored: false }
    }

    /// Every shard's `PUBLISH` count, first shard first.
    async fn shard_publishes(&self) -> Vec<u64> {
        let mut counts = vec![self.redis.command_calls("publish").await];
        for s in &self.shards {
            counts.push(s.command_calls("publish").await);
        }
        counts
    }

    /// With `stored`, the nodes keep history in namespace `stored`.
    async fn start_with(channel: &str, stored: bool) -> Self {
        let redis = RedisServer::start();
        let config = fanout_testkit::config_file(
            &format!("examples-{}", channel.replace(':', "-")),
            "[namespaces.stored]\nhistory_size = 100\n",
        );
        let mut args = vec!["--redis-url".to_owned(), redis.url(), "--api-key".to_owned(), KEY.to_owned()];
        if stored {
            args.extend(["--config".to_owned(), config.to_string_lossy().into_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let a = Node::start(BIN, &args);
        let b = Node::start(BIN, &args);
        let mut json = WsClient::json(&a.ws_url()).await;
        json.subscribe(channel).await;
        let mut msgpack = WsClient::msgpack(&b.ws_url()).await;
        msgpack.subscribe(channel).await;
        Self { redis, shards: Vec::new(), a, b, subscribers: [json, msgpack], channel: channel.to_owned(), stored }
    }

    /// The settings every example reads, pointed at this cluster and changed by `overrides`.
    fn env(&self, overrides: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env = vec![
            ("FANOUT_API_URL".to_owned(), format!("http://{}", self.a.internal)),
            ("FANOUT_API_KEY".to_owned(), KEY.to_owned()),
            ("FANOUT_REDIS_URL".to_owned(), self.redis.url()),
            ("FANOUT_REDIS_PREFIX".to_owned(), "fanout:".to_owned()),
            ("FANOUT_CHANNEL".to_owned(), self.channel.clone()),
        ];
        if !self.shards.is_empty() {
            let all = std::iter::once(&self.redis).chain(&self.shards).map(RedisServer::url);
            env.push(("FANOUT_REDIS_SHARDS".to_owned(), all.collect::<Vec<_>>().join(",")));
        }
        for (k, v) in overrides {
            env.retain(|(key, _)| key != k);
            env.push(((*k).to_owned(), (*v).to_owned()));
        }
        env
    }

    /// [`Cluster::env`] as the lookup [`rust_example::run`] takes.
    fn lookup(&self, overrides: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let env = self.env(overrides);
        move |k| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone())
    }

    /// Runs `program args` in `dir` with [`Cluster::env`].
    async fn run_with(&self, program: &Path, args: &[&str], dir: &Path, overrides: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(program);
        cmd.args(args).current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::piped());
        // Nothing from the test's own environment may point the example elsewhere.
        for var in [
            "FANOUT_API_URL",
            "FANOUT_API_KEY",
            "FANOUT_REDIS_URL",
            "FANOUT_REDIS_PREFIX",
            "FANOUT_CHANNEL",
            "FANOUT_STORED",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(self.env(overrides));
        let label = format!("{} {}", program.display(), args.join(" "));
        tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {label}: {e}"));
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("{label} did not finish within 30 s");
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let out = child.wait_with_output().unwrap();
            let text = |b: Vec<u8>| String::from_utf8(b).expect("the examples print UTF-8");
            Run { code: out.status.code(), stdout: text(out.stdout), stderr: text(out.stderr) }
        })
        .await
        .unwrap()
    }

    /// Runs an example, asserts it succeeded, and returns its standard output lines parsed as JSON.
    async fn run(&self, program: &Path, args: &[&str], dir: &Path) -> Vec<Value> {
        let run = self.run_with(program, args, dir, &[]).await;
        assert_eq!(run.code, Some(0), "{} {args:?} failed:\n{}", program.display(), run.stderr);
        run.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
            .collect()
    }

    /// Publishes [`END`], then asserts that each subscriber received `expected` with stamps as `stamps` says (both
    /// the same), then [`END`]; and that no node dropped anything.
    async fn expect(&mut self, expected: &[Value], stamps: Stamps) {
        self.expect_with_drops(expected, stamps, 0.0).await;
    }

    /// [`Cluster::expect`] where each node has dropped `drops` publications.
    async fn expect_with_drops(&mut self, expected: &[Value], stamps: Stamps, drops: f64) {
        let body = json!({"channel": self.channel, "data": END}).to_string();
        let auth = format!("Bearer {KEY}");
        let r = http(self.a.internal, "POST", "/api/publish", &[("Authorization", &auth)], body.as_bytes()).await;
        assert_eq!(r.status, 200, "{}", r.text());

        let mut first_ts: Option<Vec<u64>> = None;
        for sub in &mut self.subscribers {
            let format = if sub.msgpack { "MessagePack" } else { "JSON" };
            let (mut got, mut ts) = (Vec::new(), Vec::new());
            loop {
                let m = match (sub.recv().await, sub.msgpack) {
                    (Event::Json(v), false) | (Event::MsgPack(v), true) => v,
                    (other, _) => panic!("{format} subscriber: expected a message frame, got {other:?}"),
                };
                let keys: Vec<&str> = m.as_object().expect("an object").keys().map(String::as_str).collect();
                assert_eq!(keys.len(), if self.stored { 5 } else { 4 }, "{format} subscriber: {keys:?}");
                if self.stored {
                    assert_eq!(m["offset"], json!(got.len() + 1), "{format} subscriber: offsets 1 up");
                }
                assert_eq!((&m["op"], &m["channel"]), (&json!("message"), &json!(self.channel)), "{format}");
                if m["data"] == json!(END) {
                    break;
                }
                ts.push(m["ts"].as_u64().expect("ts is an unsigned integer"));
                got.push(m["data"].clone());
            }
            assert_eq!(got.len(), expected.len(), "{format} subscriber: how many publications arrived");
            for (n, (g, e)) in got.iter().zip(expected).enumerate() {
                assert!(g == e, "{format} subscriber, publication {n}: got {}, expected {}", short(g), short(e));
            }
            match &stamps {
                Stamps::Exactly(want) => assert_eq!(&ts, want, "{format} subscriber: ts changed on the way"),
                Stamps::Between(lo, hi) => {
                    assert!(ts.iter().all(|t| (lo..=hi).contains(&t)), "{format}: {ts:?} not within {lo}..={hi}");
                    assert!(ts.is_sorted(), "{format}: {ts:?}");
                }
            }
            match &first_ts {
                None => first_ts = Some(ts),
                Some(first) => assert_eq!(first, &ts, "both subscribers see the same ts"),
            }
        }
        for node in [&self.a, &self.b] {
            assert_eq!(node.metric("fanout_publications_dropped_total").await, drops, "{}", node.logs());
        }
    }
}

/// The value of one labelled series on `node`'s /metrics, e.g. `name{label="x"}`.
async fn series(node: &Node, series: &str) -> Option<f64> {
    let body = http(node.internal, "GET", "/metrics", &[], b"").await.text();
    body.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A value cut short for an assertion message: the large publication is 60,000 characters.
fn short(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}… ({} bytes)", &s[..i], s.len()),
        None => s,
    }
}

/// Checks a Redis example's report, one line per publication: the encoding, the ts it set, and both nodes as
/// receivers (so the Redis channel was prefix + channel). Returns the stamps subscribers must see.
fn redis_example_stamps(lines: &[Value]) -> Stamps {
    let encs: Vec<&str> = lines.iter().map(|l| l["enc"].as_str().unwrap_or_default()).collect();
    assert_eq!(encs, ["json", "json", "json", "msgpack"], "{lines:?}");
    assert!(lines.iter().all(|l| l["receivers"] == json!(2)), "one Redis subscription per node: {lines:?}");
    Stamps::Exactly(lines.iter().map(|l| l["ts"].as_u64().expect("ts")).collect())
}

/// [`redis_example_stamps`] for FANOUT_STORED=1: offsets 1 to 4 instead of receivers.
fn stored_example_stamps(lines: &[Value]) -> Stamps {
    let offsets: Vec<u64> = lines.iter().map(|l| l["offset"].as_u64().expect("offset")).collect();
    assert_eq!(offsets, [1, 2, 3, 4], "{lines:?}");
    Stamps::Exactly(lines.iter().map(|l| l["ts"].as_u64().expect("ts")).collect())
}

#[tokio::test]
async fn python_redis_stored_with_fcall() {
    let Some(python) = python() else { return };
    let mut c = Cluster::start_with("stored:python", true).await;
    let run =
        c.run_with(&python, &["publish_redis.py"], &repo().join("examples/python"), &[("FANOUT_STORED", "1")]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let lines: Vec<Value> = run.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let stamps = stored_example_stamps(&lines);
    // The END marker goes through the HTTP API and is stored too.
    c.expect(&redis_publications(), stamps).await;
}

#[tokio::test]
async fn node_redis_stored_with_fcall() {
    let Some(node) = node(true) else { return };
    let mut c = Cluster::start_with("stored:node", true).await;
    let run = c.run_with(&node, &["publish_redis.mjs"], &repo().join("examples/node"), &[("FANOUT_STORED", "1")]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let lines: Vec<Value> = run.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let stamps = stored_example_stamps(&lines);
    c.expect(&redis_publications(), stamps).await;
}

#[tokio::test]
async fn python_http() {
    let Some(python) = python() else { return };
    let mut c = Cluster::start("examples:python-http").await;
    let lo = now_micros();
    let lines = c.run(&python, &["publish_http.py"], &repo().join("examples/python")).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    c.expect(&common_publications(), Stamps::Between(lo, now_micros())).await;
}

#[tokio::test]
async fn python_redis() {
    let Some(python) = python() else { return };
    let mut c = Cluster::start("examples:python-redis").await;
    let lines = c.run(&python, &["publish_redis.py"], &repo().join("examples/python")).await;
    c.expect(&redis_publications(), redis_example_stamps(&lines)).await;
}

/// Runs a Redis example against nodes on three shards: everything arrives, through the
/// channel's shard alone.
async fn redis_shards_example(runner: &Path, script: &str, dir: &str, channel: &str) {
    let mut c = Cluster::start_sharded(channel).await;
    let lines = c.run(runner, &[script], &repo().join(dir)).await;
    c.expect(&redis_publications(), redis_example_stamps(&lines)).await;
    let counts = c.shard_publishes().await;
    let shard = fanout_protocol::shard_of(&format!("fanout:{channel}"), 3);
    assert_eq!(counts.iter().sum::<u64>(), counts[shard], "only the channel's shard carried it: {counts:?}");
}

#[tokio::test]
async fn python_redis_shards() {
    let Some(python) = python() else { return };
    redis_shards_example(&python, "publish_redis.py", "examples/python", "examples:python-shards").await;
}

#[tokio::test]
async fn node_redis_shards() {
    let Some(node) = node(true) else { return };
    redis_shards_example(&node, "publish_redis.mjs", "examples/node", "examples:node-shards").await;
}

#[tokio::test]
async fn node_http() {
    let Some(node) = node(false) else { return };
    let mut c = Cluster::start("examples:node-http").await;
    let lo = now_micros();
    let lines = c.run(&node, &["publish_http.mjs"], &repo().join("examples/node")).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    c.expect(&common_publications(), Stamps::Between(lo, now_micros())).await;
}

#[tokio::test]
async fn node_redis() {
    let Some(node) = node(true) else { return };
    let mut c = Cluster::start("examples:node-redis").await;
    let lines = c.run(&node, &["publish_redis.mjs"], &repo().join("examples/node")).await;
    c.expect(&redis_publications(), redis_example_stamps(&lines)).await;
}

#[tokio::test]
async fn rust_http() {
    let mut c = Cluster::start("examples:rust-http").await;
    let lo = now_micros();
    assert_eq!(rust_example::run("http", c.lookup(&[])).await.unwrap(), 3);
    c.expect(&common_publications(), Stamps::Between(lo, now_micros())).await;
}

#[tokio::test]
async fn rust_redis_in_messagepack() {
    let mut c = Cluster::start("examples:rust-redis").await;
    let lo = now_micros();
    assert_eq!(rust_example::run("redis", c.lookup(&[])).await.unwrap(), 4);
    c.expect(&redis_publications(), Stamps::Between(lo, now_micros())).await;
}

/// The exit codes the examples document: 1 for a rejection (a wrong API key), 69 when the gateway or Redis cannot
/// be reached; either way nothing is delivered.
#[tokio::test]
async fn examples_exit_codes() {
    let mut c = Cluster::start("examples:failures").await;
    let dead_redis = format!("redis://127.0.0.1:{}", RedisServer::unused_port());
    let dead_api = format!("http://127.0.0.1:{}", RedisServer::unused_port());
    let wrong_key = [("FANOUT_API_KEY", "wrong")];
    let no_redis = [("FANOUT_REDIS_URL", dead_redis.as_str())];
    let no_api = [("FANOUT_API_URL", dead_api.as_str())];

    let e = rust_example::run("http", c.lookup(&wrong_key)).await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    let e = rust_example::run("redis", c.lookup(&no_redis)).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");

    let scripts =
        [("publish_http", &wrong_key[..], 1), ("publish_http", &no_api[..], 69), ("publish_redis", &no_redis[..], 69)];
    let mut programs = Vec::new();
    programs.extend(python().map(|p| (p, "examples/python", "py")));
    programs.extend(node(true).map(|n| (n, "examples/node", "mjs")));
    for (program, dir, ext) in &programs {
        for (name, overrides, code) in scripts {
            let script = format!("{name}.{ext}");
            let run = c.run_with(program, &[&script], &repo().join(dir), overrides).await;
            assert_eq!(run.code, Some(code), "{script} with {overrides:?}: {}", run.stderr);
            assert!(run.stdout.is_empty(), "{script} with {overrides:?} reported a publication: {}", run.stdout);
            assert!(!run.stderr.trim().is_empty(), "{script} with {overrides:?} failed silently");
        }
    }
    c.expect(&[], Stamps::Exactly(vec![])).await;
}

/// The envelopes docs/publishing.md shows byte by byte are delivered with their `ts`, and the classic mistake it
/// warns about (`data` as a MessagePack str, which older msgpack libraries write for strings) is dropped and counted.
#[tokio::test]
async fn documented_envelopes() {
    let mut c = Cluster::start("chat:lobby").await;
    let hex = |s: &str| -> Vec<u8> {
        s.split_whitespace().map(|b| u8::from_str_radix(b, 16).expect("hex byte")).collect::<Vec<u8>>()
    };
    let json_envelope = hex("84 a1 76 01 a2 74 73 cf 00 06 44 2a b0 76 52 40 a3 65 6e 63 a4 6a 73 6f 6e \
         a4 64 61 74 61 c4 0d 7b 22 74 65 78 74 22 3a 22 68 69 22 7d");
    let msgpack_envelope = hex("84 a1 76 01 a2 74 73 cf 00 06 44 2a b0 76 52 40 a3 65 6e 63 a7 6d 73 67 70 61 63 6b \
         a4 64 61 74 61 c4 09 81 a4 74 65 78 74 a2 68 69");
    // The first envelope with `data` written as str (a d) instead of bin (c4 0d).
    let str_data = hex("84 a1 76 01 a2 74 73 cf 00 06 44 2a b0 76 52 40 a3 65 6e 63 a4 6a 73 6f 6e \
         a4 64 61 74 61 ad 7b 22 74 65 78 74 22 3a 22 68 69 22 7d");
    let mut conn = c.redis.client().get_multiplexed_async_connection().await.unwrap();
    for payload in [&json_envelope, &str_data, &msgpack_envelope] {
        let receivers: i64 =
            redis::cmd("PUBLISH").arg("fanout:chat:lobby").arg(payload).query_async(&mut conn).await.unwrap();
        assert_eq!(receivers, 2);
    }
    let dropped = r#"fanout_publications_dropped_total{reason="invalid_envelope"}"#;
    for node in [&c.a, &c.b] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while series(node, dropped).await != Some(1.0) {
            assert!(Instant::now() < deadline, "the str-data envelope was not counted:\n{}", node.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let ts = 1_763_800_000_123_456;
    c.expect_with_drops(&[json!({"text": "hi"}), json!({"text": "hi"})], Stamps::Exactly(vec![ts, ts]), 1.0).await;
}
