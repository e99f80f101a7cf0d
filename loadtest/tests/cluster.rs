//! The load tester against real nodes: a private redis-server and `fanout serve`
//! processes, small runs, and assertions on the JSON report.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test code: a failed assumption should fail loudly")]

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use fanout_testkit::{Node, RedisServer};
use serde_json::Value;

/// The `fanout` binary next to ours (same profile), built once per test run so it is
/// never stale; `FANOUT_BIN` points at another one.
fn fanout_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("FANOUT_BIN") {
            return PathBuf::from(p);
        }
        let dir =
            Path::new(env!("CARGO_BIN_EXE_fanout-loadtest")).parent().expect("binary has a directory").to_path_buf();
        let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        build.args(["build", "--quiet", "-p", "fanout-server", "--bin", "fanout"]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build for the fanout binary");
        assert!(status.success(), "building fanout failed");
        let bin = dir.join("fanout");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}

struct Cluster {
    redis: RedisServer,
    nodes: Vec<Node>,
}

impl Cluster {
    fn start(nodes: usize) -> Self {
        Self::start_with(nodes, &[])
    }

    fn start_with(nodes: usize, extra: &[&str]) -> Self {
        let redis = RedisServer::start();
        let bin = fanout_bin();
        // The generator opens hundreds of connections per second from one address and
        // publishes hundreds of commands per second on one connection: lift the per-client
        // limits meant for the public internet.
        let url = redis.url();
        let mut args = vec!["--redis-url", &url, "--max-connections-per-ip-per-second", "0", "--command-rate", "0"];
        args.extend_from_slice(extra);
        let nodes = (0..nodes).map(|_| Node::start(&bin, &args)).collect();
        Self { redis, nodes }
    }

    fn urls(&self) -> String {
        self.nodes.iter().map(|n| n.ws_url()).collect::<Vec<_>>().join(",")
    }

    fn metrics_args(&self) -> Vec<String> {
        self.nodes.iter().flat_map(|n| ["--metrics-url".to_owned(), format!("http://{}/metrics", n.internal)]).collect()
    }
}

fn report_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fanout-loadtest-{}-{name}.json", std::process::id()))
}

fn loadtest(args: &[String]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanout-loadtest"));
    // A short probe of the machine's CPUs: the reports show it, and the suite stays quick.
    cmd.arg("run").args(args).args(["--quiet", "--host-probe", "50ms"]).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn finish(out: Output, json: &Path) -> Value {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    assert!(
        out.status.success(),
        "fanout-loadtest failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let report: Value =
        serde_json::from_slice(&std::fs::read(json).expect("the JSON report was written")).expect("the report is JSON");
    let _ = std::fs::remove_file(json);
    report
}

fn run(name: &str, args: &[&str]) -> Value {
    let json = report_path(name);
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend(["--json-out".to_owned(), json.display().to_string()]);
    finish(loadtest(&all).output().expect("running fanout-loadtest"), &json)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not an unsigned integer: {v}"))
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn assert_latency_sane(l: &Value) {
    let (p50, p90, p99, p999, max) = (f(&l["p50"]), f(&l["p90"]), f(&l["p99"]), f(&l["p999"]), f(&l["max"]));
    assert!(u(&l["count"]) > 0, "latency recorded: {l}");
    assert!(p50 > 0.0 && p50 <= p90 && p90 <= p99 && p99 <= p999 && p999 <= max, "ordered and positive: {l}");
    assert!(max < 10_000.0, "no absurd latency (clock mix-up): {l}");
}

#[tokio::test(flavor = "multi_thread")]
async fn healthy_cluster_over_websocket_loses_nothing() {
    let c = Cluster::start(2);
    let mut args = vec!["rooms", "-n", "120", "-c", "12", "-r", "300", "-d", "2s", "--url"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    args.push(c.urls());
    args.extend(c.metrics_args());
    for n in &c.nodes {
        args.extend(["--gateway-pid".to_owned(), n.pid().to_string()]);
    }
    args.extend(["--plot".to_owned(), report_path("rooms.svg").display().to_string()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run("ws", &refs);

    assert_eq!(u(&r["connect"]["established"]), 120, "{}", r["connect"]);
    assert_eq!(u(&r["connect"]["failed"]), 0);
    assert_eq!(u(&r["publish"]["sent"]), 600);
    // Every `published` reply was matched to the command it answers.
    assert_eq!(u(&r["publish"]["answer_ms"]["count"]), 600, "{}", r["publish"]);
    assert_latency_sane(&r["publish"]["answer_ms"]);
    if std::path::Path::new("/proc/stat").exists() {
        let m = &r["machine"];
        assert!(!m["steal_percent"].as_object().expect("per-CPU steal").is_empty(), "{m}");
        assert!(m["disturbed"].is_boolean() && f(&m["worst_second_steal_percent"]) >= 0.0, "{m}");
        let busy = m["busy_percent"].as_object().expect("per-CPU busy share");
        assert!(!busy.is_empty() && busy.values().all(|v| (0.0..=100.0).contains(&f(v))), "{m}");
        assert_eq!(busy.len(), m["softirq_percent"].as_object().map_or(0, |o| o.len()), "{m}");
        for probe in ["pauses_before", "pauses_after"] {
            let cpus = m[probe].as_array().unwrap_or_else(|| panic!("{probe}: {m}"));
            assert!(!cpus.is_empty(), "{m}");
            for kind in ["host", "other_threads"] {
                assert!(cpus.iter().all(|c| (0.0..=100.0).contains(&f(&c[kind]["lost_percent"]))), "{m}");
            }
        }
        // Redis, at least, ran beside the nodes and the generator.
        let others = m["other_processes"].as_array().expect("other processes");
        assert!(others.iter().any(|p| p["name"] == "redis-server" && f(&p["cpu_seconds"]) > 0.0), "{m}");
    }
    let d = &r["deliveries"];
    // 600 publications over 12 rooms of 10 subscribers each.
    assert_eq!(u(&d["expected"]), 6000, "{d}");
    assert_eq!(u(&d["delivered"]), 6000, "{d}");
    assert_eq!((u(&d["lost"]), u(&d["duplicates"]), u(&d["reordered"]), u(&d["foreign"])), (0, 0, 0, 0), "{d}");
    assert!(f(&d["per_second"]) > 0.0);
    assert_latency_sane(&r["latency_ms"]);
    assert_eq!(u(&r["disconnects"]["total"]), 0);
    // The gateway counted the same deliveries, and reports its own latency.
    let g = &r["gateway"];
    assert_eq!(f(&g["deliveries"]), 6000.0, "{g}");
    assert_eq!(f(&g["slow_consumer_disconnects"]), 0.0);
    assert!(g["nodes"].as_array().unwrap().iter().all(|n| n["error"].is_null()), "{g}");
    // 6,000 writes and 600 publications take the nodes far more than a clock tick.
    assert!(f(&g["cpu_seconds"]) > 0.0 && f(&g["deliveries_per_cpu_second"]) > 0.0, "{g}");
    assert!(f(&r["generator"]["cpu_seconds"]) > 0.0);
    let svg = std::fs::read_to_string(report_path("rooms.svg")).expect("plot written");
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
    let _ = std::fs::remove_file(report_path("rooms.svg"));
}

#[tokio::test(flavor = "multi_thread")]
async fn http_and_redis_transports_lose_nothing() {
    let c = Cluster::start(2);
    let http = format!("http://{}", c.nodes[0].internal);
    for (transport, extra) in [
        ("http", vec!["--http-url".to_owned(), http.clone()]),
        ("redis", vec!["--redis-url".to_owned(), c.redis.url()]),
    ] {
        let mut args: Vec<String> =
            ["multi", "-n", "40", "-c", "8", "-k", "3", "-r", "200", "-d", "1s", "--transport", transport, "--url"]
                .into_iter()
                .map(String::from)
                .collect();
        args.push(c.urls());
        args.extend(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = run(transport, &refs);
        let d = &r["deliveries"];
        // 200 publications over 8 channels; 40 subscribers on 3 channels each = 15 per channel.
        assert_eq!(u(&r["publish"]["sent"]), 200, "{transport}: {}", r["publish"]);
        assert_eq!(u(&r["publish"]["answer_ms"]["count"]), 200, "{transport}: {}", r["publish"]);
        assert_latency_sane(&r["publish"]["answer_ms"]);
        assert_eq!(u(&d["expected"]), 200 * 15, "{transport}: {d}");
        assert_eq!(u(&d["lost"]), 0, "{transport}: {d}");
        assert_eq!(u(&d["delivered"]), u(&d["expected"]), "{transport}: {d}");
        assert_eq!(u(&d["reordered"]), 0, "{transport}: per-channel lanes keep order");
        assert_latency_sane(&r["latency_ms"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spinning_generator_loses_nothing_and_takes_its_spinning_off_its_cpu() {
    let c = Cluster::start(2);
    let urls = c.urls();
    let r = run("spin", &["broadcast", "-n", "50", "-r", "200", "-d", "1s", "--url", &urls, "--spin"]);
    let d = &r["deliveries"];
    assert_eq!(u(&d["expected"]), 200 * 50, "{d}");
    assert_eq!(u(&d["lost"]), 0, "{d}");
    assert_latency_sane(&r["latency_ms"]);
    let g = &r["generator"];
    let idle = f(&g["spin_idle_seconds"]);
    let window = f(&g["window_s"]);
    // 10,000 deliveries in a second leave the worker idle most of the time.
    assert!(idle > 0.1 * window && idle < window * f(&g["cores"]), "{g}");
    let raw = f(&g["user_seconds"]) + f(&g["system_seconds"]);
    assert!((f(&g["cpu_seconds"]) - (raw - idle).max(0.0)).abs() < 0.05, "idle taken off the process's CPU: {g}");
    // Not pinned, it may spin on any CPU: none is called its alone.
    assert!(r["machine"].get("spinning_cpus").is_none(), "{}", r["machine"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_a_node_mid_run_shows_up_as_loss() {
    let c = Cluster::start(2);
    let json = report_path("kill");
    // Subscribers alternate between the nodes; the publisher connection is on node 0.
    let args: Vec<String> = [
        "broadcast",
        "-n",
        "60",
        "-r",
        "100",
        "-d",
        "4s",
        "--drain",
        "2s",
        "--url",
        &c.urls(),
        "--json-out",
        &json.display().to_string(),
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let child = loadtest(&args).spawn().expect("starting fanout-loadtest");
    // Wait until publications flow (every subscriber plus the publisher connected), then
    // let some through before the kill.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let conns = c.nodes[0].metric("fanout_connections").await + c.nodes[1].metric("fanout_connections").await;
        if conns >= 61.0 {
            break;
        }
        assert!(Instant::now() < deadline, "connections never reached 61 (now {conns})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.nodes[1].signal("KILL");
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.unwrap().unwrap();
    let r = finish(out, &json);

    let d = &r["deliveries"];
    assert_eq!(u(&d["expected"]), 400 * 60, "{d}");
    assert!(u(&d["lost"]) > 0, "loss detected: {d}");
    // Only node 1's 30 subscribers lost anything, and they got the publications before the kill.
    assert_eq!(u(&d["subscribers_with_loss"]), 30, "{d}");
    assert!(u(&d["delivered"]) > 30 * 400, "{d}");
    assert_eq!(u(&r["disconnects"]["eof"]), 30, "{}", r["disconnects"]);
    assert_latency_sane(&r["latency_ms"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_run_reports_memory_and_answers_pings_from_several_source_addresses() {
    // Pings every 100ms and a 400ms idle timeout: connections that did not answer with
    // Pongs would be closed during the hold.
    let c = Cluster::start_with(1, &["--ping-interval", "100ms", "--idle-timeout", "400ms"]);
    let pid = c.nodes[0].pid().to_string();
    let sources = "127.0.0.1,127.0.0.2,127.0.0.3";
    let r = run(
        "idle",
        &[
            "idle",
            "-n",
            "300",
            "-c",
            "30",
            "-d",
            "1500ms",
            "--url",
            &c.urls(),
            "--gateway-pid",
            &pid,
            "--source-addrs",
            sources,
        ],
    );
    assert_eq!(u(&r["connect"]["established"]), 300, "{}", r["connect"]);
    assert_eq!(r["config"]["source_addrs"].as_array().unwrap().len(), 3);
    assert_eq!(u(&r["disconnects"]["total"]), 0, "pings answered: {}", r["disconnects"]);
    assert_eq!(u(&r["publish"]["sent"]), 0);
    assert_eq!(u(&r["deliveries"]["expected"]), 0);
    let m = &r["memory"];
    assert!(u(&m["gateway_rss_connected_bytes"]) > u(&m["gateway_rss_before_bytes"]), "{m}");
    assert!(f(&m["gateway_bytes_per_connection"]) > 0.0, "{m}");
    assert!(f(&r["connect"]["latency_ms"]["p50"]) > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn churn_clients_come_and_go_without_disturbing_steady_ones() {
    let c = Cluster::start(2);
    let r = run(
        "churn",
        &[
            "churn",
            "-n",
            "40",
            "-c",
            "4",
            "-r",
            "100",
            "-d",
            "2s",
            "--churn-rate",
            "20",
            "--churn-hold",
            "300ms",
            "--url",
            &c.urls(),
        ],
    );
    let churn = &r["churn"];
    assert!(u(&churn["cycles"]) >= 20, "{churn}");
    assert_eq!(u(&churn["failed"]), 0, "{churn}");
    assert!(f(&churn["connect_latency_ms"]["p50"]) > 0.0);
    assert_eq!(u(&r["deliveries"]["lost"]), 0, "{}", r["deliveries"]);
}

#[test]
fn list_and_show_scenarios() {
    let out = Command::new(env!("CARGO_BIN_EXE_fanout-loadtest")).arg("list").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for name in ["broadcast", "rooms", "multi", "idle", "churn"] {
        assert!(text.contains(name), "{text}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_fanout-loadtest"))
        .args(["show", "broadcast", "--rate", "7", "-n", "3"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("rate = 7.0") && text.contains("subscribers = 3"), "{text}");
    assert!(
        text.contains("; overridden here: subscribers, rate\""),
        "the description says its figures are not this run's: {text}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_fanout-loadtest"))
        .args(["run", "nope", "--url", "ws://127.0.0.1:1/ws"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario"));
}

/// The recovery scenario against nodes keeping history: subscribers leave and come back,
/// and the report shows every recovery complete, with no gap and no duplicate; against
/// nodes without history it refuses to report success.
#[tokio::test(flavor = "multi_thread")]
async fn recovery_scenario_reports_recoveries_without_gaps_or_duplicates() {
    let config = fanout_testkit::config_file("loadtest-recovery", "[namespaces.loadtest]\nhistory_size = 5000\n");
    let c = Cluster::start_with(2, &["--config", config.to_str().unwrap()]);
    let http = format!("http://{}", c.nodes[0].internal);
    let args = [
        "recovery",
        "-n",
        "20",
        "-r",
        "300",
        "-d",
        "4s",
        "--recover-every",
        "1s",
        "--recover-away",
        "300ms",
        "--url",
        &c.urls(),
        "--http-url",
        &http,
    ];
    let r = run("recovery", &args);
    assert_eq!(u(&r["publications"]), 1200, "{r}");
    assert!(u(&r["recovered"]) >= 20, "every subscriber recovered at least once: {r}");
    assert_eq!((u(&r["gaps"]), u(&r["duplicates"]), u(&r["incomplete"]), u(&r["not_recovered"])), (0, 0, 0, 0), "{r}");
    assert!(u(&r["replayed"]) > 0, "{r}");
    assert!(f(&r["recovery_ms"]["max"]) > 0.0, "{r}");

    let plain = Cluster::start(1);
    let http = format!("http://{}", plain.nodes[0].internal);
    let out = loadtest(
        &["recovery", "-n", "2", "-r", "20", "-d", "1s", "--url", &plain.urls(), "--http-url", &http].map(String::from),
    )
    .output()
    .unwrap();
    assert!(!out.status.success(), "without history the scenario must fail");
    assert!(String::from_utf8_lossy(&out.stderr).contains("history"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn storm_moves_every_client_to_the_next_node() {
    let c = Cluster::start(2);
    let pid = c.nodes[0].pid().to_string();
    let r = run(
        "storm",
        &["storm", "-n", "300", "-c", "10", "--url", &c.urls(), "--gateway-pid", &pid, "--redis-url", &c.redis.url()],
    );
    assert_eq!((u(&r["subscribers"]), u(&r["not_back"]), u(&r["starved"])), (300, 0, 0), "{r}");
    assert!(f(&r["storm_ms"]) > 0.0 && f(&r["back_per_second"]) > 0.0, "{r}");
    if std::path::Path::new("/proc/stat").exists() {
        let m = &r["machine"];
        assert!(m["pauses_before"].as_array().is_some_and(|a| !a.is_empty()), "{m}");
        assert!(m["pauses_after"].as_array().is_some_and(|a| !a.is_empty()), "{m}");
    }
    // Every client came back on the other node (and left it when the run ended).
    assert_eq!(c.nodes[1].metric("fanout_connections_opened_total").await, 300.0);
}
