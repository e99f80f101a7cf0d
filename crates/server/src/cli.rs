//! The operator commands `fanout publish`, `fanout subscribe`, `fanout history` and the
//! server API's `fanout disconnect`, `fanout channels`, `fanout nodes`: scripts and humans
//! talking to a live cluster.

use std::{io::BufRead as _, path::PathBuf, process::ExitCode, time::Duration};

use bytes::Bytes;
use clap::Args;
use fanout_protocol::{transcode, Encoding};
use fanout_publisher::{PublishError, Publisher};
use fastwebsockets::{FragmentCollector, Frame, OpCode};
use http_body_util::Empty;
use hyper::{header, Request};

/// Exit codes, from sysexits.h where one fits.
pub mod exit {
    /// The server refused the request (4xx: bad data, bad key, too large).
    pub const REJECTED: u8 = 1;
    /// Bad flags or unreadable input.
    pub const USAGE: u8 = 64;
    /// Input that is not valid JSON.
    pub const DATA: u8 = 65;
    /// The gateway or Redis is unreachable, unavailable or too slow.
    pub const UNAVAILABLE: u8 = 69;
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Channel to publish to; repeat for a broadcast (one publication, same ts).
    #[arg(long = "channel", short = 'c', required = true, value_name = "CHANNEL")]
    pub channels: Vec<String>,
    /// The data: one JSON value. Without --data or --file, every non-empty line of
    /// standard input is published, in order.
    #[arg(long, short = 'd', value_name = "JSON", conflicts_with = "file")]
    pub data: Option<String>,
    /// Read the data (one JSON value) from this file.
    #[arg(long, short = 'f', value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// A node's internal listener.
    #[arg(long, env = "FANOUT_API_URL", default_value = "http://127.0.0.1:9090", value_name = "URL")]
    pub api_url: String,
    /// API key for the HTTP API.
    #[arg(long, env = "FANOUT_API_KEY", hide_env_values = true, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Publish straight into Redis instead of through the HTTP API (--api-key is then unused).
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// With --redis-url: it lists Redis Cluster seed nodes (comma-separated); publish with SPUBLISH.
    #[arg(long, requires = "redis_url")]
    pub redis_cluster: bool,
    /// Publish straight into independent Redis shards: the gateways' redis_shards, same order.
    #[arg(long, value_name = "URLS", value_delimiter = ',', conflicts_with = "redis_url")]
    pub redis_shards: Vec<String>,
    /// Redis channel prefix (with --redis-url or --redis-shards).
    #[arg(long, env = "FANOUT_REDIS_PREFIX", default_value = "fanout:", value_name = "PREFIX")]
    pub redis_prefix: String,
    /// Send the data as MessagePack instead of JSON.
    #[arg(long)]
    pub msgpack: bool,
    /// Per-request timeout.
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    pub timeout: humantime::Duration,
    /// Publish at most once with this key (at most 64 bytes) within five minutes, so a
    /// retried command cannot publish twice (one channel, one publication).
    #[arg(long, value_name = "KEY")]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// The channel to read.
    #[arg(value_name = "CHANNEL")]
    pub channel: String,
    /// Only publications after this offset (needs --since-epoch).
    #[arg(long, value_name = "OFFSET", requires = "since_epoch")]
    pub since_offset: Option<u64>,
    /// The epoch --since-offset is in.
    #[arg(long, value_name = "EPOCH", requires = "since_offset")]
    pub since_epoch: Option<String>,
    /// At most this many publications (oldest first).
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// Where the server API commands send their requests.
#[derive(Debug, Args)]
pub struct ApiArgs {
    /// A node's internal listener.
    #[arg(long, env = "FANOUT_API_URL", default_value = "http://127.0.0.1:9090", value_name = "URL")]
    pub api_url: String,
    /// API key for the HTTP API.
    #[arg(long, env = "FANOUT_API_KEY", hide_env_values = true, value_name = "KEY")]
    pub api_key: Option<String>,
    /// Per-request timeout.
    #[arg(long, default_value = "5s", value_name = "DURATION")]
    pub timeout: humantime::Duration,
}

/// `fanout disconnect USER`.
#[derive(Debug, Args)]
pub struct DisconnectArgs {
    /// The user (a token's `sub`) whose connections to close with 4009, on every node.
    #[arg(value_name = "USER")]
    pub user: String,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `fanout presence CHANNEL [--stats]`.
#[derive(Debug, Args)]
pub struct PresenceArgs {
    /// The channel (its namespace must track presence).
    #[arg(value_name = "CHANNEL")]
    pub channel: String,
    /// Only the counts: {"clients":N,"users":M}.
    #[arg(long)]
    pub stats: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `fanout presence`: one JSON line per present client, or the counts.
pub async fn presence(args: PresenceArgs) -> ExitCode {
    let publisher = match api_publisher(&args.api) {
        Ok(p) => p,
        Err(e) => return fail(publish_exit(&e), e),
    };
    let answer = if args.stats {
        publisher.presence_stats(&args.channel).await
    } else {
        publisher.presence(&args.channel).await
    };
    match answer {
        Ok(v) if args.stats => {
            println!("{v}");
            ExitCode::SUCCESS
        }
        Ok(v) => {
            for row in v.get("clients").and_then(serde_json::Value::as_array).into_iter().flatten() {
                println!("{row}");
            }
            if v.get("truncated").is_some_and(|t| t == true) {
                eprintln!("fanout: more clients are present than listed; --stats counts them all");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(publish_exit(&e), e),
    }
}

/// `fanout channels [--namespace NS]`.
#[derive(Debug, Args)]
pub struct ChannelsArgs {
    /// Only channels of this namespace.
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub api: ApiArgs,
}

fn api_publisher(api: &ApiArgs) -> Result<Publisher, PublishError> {
    let mut b = Publisher::http(&api.api_url).timeout(Duration::from(api.timeout));
    if let Some(key) = &api.api_key {
        b = b.api_key(key);
    }
    b.build()
}

/// `fanout disconnect`: closes the user's connections everywhere.
pub async fn disconnect(args: DisconnectArgs) -> ExitCode {
    match api_publisher(&args.api) {
        Ok(p) => match p.disconnect(&args.user).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(publish_exit(&e), e),
        },
        Err(e) => fail(publish_exit(&e), e),
    }
}

/// `fanout channels` / `fanout nodes`: one JSON line per channel or node.
pub async fn listing(api: ApiArgs, nodes: bool, namespace: Option<String>) -> ExitCode {
    let publisher = match api_publisher(&api) {
        Ok(p) => p,
        Err(e) => return fail(publish_exit(&e), e),
    };
    let (answer, key) = if nodes {
        (publisher.nodes().await, "nodes")
    } else {
        (publisher.channels(namespace.as_deref()).await, "channels")
    };
    match answer {
        Ok(v) => {
            for row in v.get(key).and_then(serde_json::Value::as_array).into_iter().flatten() {
                println!("{row}");
            }
            if v.get("truncated").is_some_and(|t| t == true) {
                eprintln!("fanout: some node has more channels than it reports (its 10,000 largest are listed)");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(publish_exit(&e), e),
    }
}

/// `fanout history`: prints the channel's position, then one JSON line per publication.
pub async fn history(args: HistoryArgs) -> ExitCode {
    let publisher = match api_publisher(&args.api) {
        Ok(p) => p,
        Err(e) => return fail(publish_exit(&e), e),
    };
    let since = args.since_offset.zip(args.since_epoch.as_deref());
    match publisher.history(&args.channel, since, args.limit).await {
        Ok(h) => {
            println!("{}", serde_json::json!({"offset": h.offset, "epoch": h.epoch}));
            for p in h.publications {
                println!("{}", serde_json::json!({"offset": p.offset, "ts": p.ts, "data": p.data}));
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(publish_exit(&e), e),
    }
}

#[derive(Debug, Args)]
pub struct SubscribeArgs {
    /// A node's WebSocket endpoint.
    #[arg(long, env = "FANOUT_WS_URL", default_value = "ws://127.0.0.1:8080/ws", value_name = "URL")]
    pub url: String,
    /// Channels to subscribe to.
    #[arg(required = true, value_name = "CHANNEL")]
    pub channels: Vec<String>,
    /// Connection token (sent as `Authorization: Bearer`).
    #[arg(long, env = "FANOUT_TOKEN", hide_env_values = true, value_name = "JWT")]
    pub token: Option<String>,
    /// Speak MessagePack on the wire (output is JSON either way).
    #[arg(long)]
    pub msgpack: bool,
    /// Exit after this many messages.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Print every event (replies, errors), not only messages.
    #[arg(long)]
    pub all: bool,
}

fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("fanout: {message}");
    ExitCode::from(code)
}

fn publish_exit(e: &PublishError) -> u8 {
    if e.is_retryable() {
        exit::UNAVAILABLE
    } else if matches!(e, PublishError::Config(_) | PublishError::InvalidChannel { .. }) {
        exit::USAGE
    } else {
        exit::REJECTED
    }
}

/// Encodes one JSON text as the publication's data.
fn encode(text: &str, msgpack: bool) -> Result<Bytes, String> {
    let text = text.trim();
    fanout_protocol::validate_data(Encoding::Json, text.as_bytes()).map_err(|e| e.to_string())?;
    if msgpack {
        transcode(Encoding::Json, Encoding::MsgPack, text.as_bytes()).map(Bytes::from).map_err(|e| e.to_string())
    } else {
        Ok(Bytes::copy_from_slice(text.as_bytes()))
    }
}

/// `fanout publish`.
pub async fn publish(args: PublishArgs) -> ExitCode {
    let enc = if args.msgpack { Encoding::MsgPack } else { Encoding::Json };
    let timeout = Duration::from(args.timeout);
    let redis = match &args.redis_url {
        _ if !args.redis_shards.is_empty() => Some(Publisher::redis_shards(args.redis_shards.clone())),
        Some(seeds) if args.redis_cluster => {
            Some(Publisher::redis_cluster(seeds.split(',').map(|s| s.trim().to_owned())))
        }
        Some(url) => Some(Publisher::redis(url)),
        None => None,
    };
    let publisher = match redis {
        Some(b) => b.prefix(&args.redis_prefix).encoding(enc).timeout(timeout).connect().await,
        None => {
            let mut b = Publisher::http(&args.api_url).encoding(enc).timeout(timeout);
            if let Some(key) = &args.api_key {
                b = b.api_key(key);
            }
            b.build()
        }
    };
    let publisher = match publisher {
        Ok(p) => p,
        Err(e) => return fail(publish_exit(&e), e),
    };
    let channels: Vec<&str> = args.channels.iter().map(String::as_str).collect();
    let send = |data: Bytes| {
        let publisher = publisher.clone();
        let channels = channels.clone();
        async move {
            if channels.len() == 1 {
                publisher.publish_raw(channels[0], enc, data).await
            } else {
                publisher.broadcast_raw(&channels, enc, data).await
            }
        }
    };
    let single = match (&args.data, &args.file) {
        (Some(d), _) => Some(d.clone()),
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(text) => Some(text),
            Err(e) => return fail(exit::USAGE, format!("cannot read {}: {e}", f.display())),
        },
        (None, None) => None,
    };
    if let Some(text) = single {
        let data = match encode(&text, args.msgpack) {
            Ok(d) => d,
            Err(e) => return fail(exit::DATA, e),
        };
        // One channel: say where it was stored (in a namespace that keeps history).
        if let [channel] = channels[..] {
            return match publisher.publish_raw_with(channel, enc, data, args.idempotency_key.as_deref()).await {
                Ok(receipt) => {
                    if let Some(offset) = receipt.offset {
                        println!("{}", serde_json::json!({"offset": offset, "epoch": receipt.epoch}));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => fail(publish_exit(&e), e),
            };
        }
        if args.idempotency_key.is_some() {
            return fail(exit::USAGE, "--idempotency-key takes one channel and one publication");
        }
        return match send(data).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(publish_exit(&e), e),
        };
    }
    if args.idempotency_key.is_some() {
        return fail(exit::USAGE, "--idempotency-key takes one channel and one publication (--data or --file)");
    }
    // One publication per line of standard input; stop at the first failure so the
    // exit code tells a script where things stand.
    let mut published = 0u64;
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = match line {
            Ok(l) => l,
            Err(e) => return fail(exit::USAGE, format!("reading standard input: {e}")),
        };
        if line.trim().is_empty() {
            continue;
        }
        let data = match encode(&line, args.msgpack) {
            Ok(d) => d,
            Err(e) => return fail(exit::DATA, format!("line {}: {e} ({published} published)", n + 1)),
        };
        if let Err(e) = send(data).await {
            return fail(publish_exit(&e), format!("line {}: {e} ({published} published)", n + 1));
        }
        published += 1;
    }
    ExitCode::SUCCESS
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// `fanout subscribe`: prints one JSON object per line on standard output.
pub async fn subscribe(args: SubscribeArgs) -> ExitCode {
    let uri: hyper::Uri = match args.url.parse() {
        Ok(u) => u,
        Err(e) => return fail(exit::USAGE, format!("invalid --url: {e}")),
    };
    if uri.scheme_str() != Some("ws") {
        return fail(
            exit::USAGE,
            "--url must be a ws:// URL (terminate TLS in front of the CLI, e.g. with a port-forward)",
        );
    }
    let Some(host) = uri.host().map(str::to_owned) else { return fail(exit::USAGE, "--url has no host") };
    let port = uri.port_u16().unwrap_or(80);
    let stream = match tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return fail(exit::UNAVAILABLE, format!("cannot connect to {host}:{port}: {e}")),
        Err(_) => return fail(exit::UNAVAILABLE, format!("connecting to {host}:{port} timed out")),
    };
    let protocol = if args.msgpack { "fanout.v1.msgpack" } else { "fanout.v1.json" };
    let mut req = Request::builder()
        .method("GET")
        .uri(uri.path_and_query().map_or("/ws", |p| p.as_str()))
        .header(header::HOST, format!("{host}:{port}"))
        .header(header::UPGRADE, "websocket")
        .header(header::CONNECTION, "upgrade")
        .header(header::SEC_WEBSOCKET_KEY, fastwebsockets::handshake::generate_key())
        .header(header::SEC_WEBSOCKET_VERSION, "13")
        .header(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    if let Some(token) = &args.token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = match req.body(Empty::<Bytes>::new()) {
        Ok(r) => r,
        Err(e) => return fail(exit::USAGE, e),
    };
    let ws = match fastwebsockets::handshake::client(&SpawnExecutor, req, stream).await {
        Ok((ws, _)) => ws,
        Err(e) => return fail(exit::UNAVAILABLE, format!("WebSocket upgrade failed: {e}")),
    };
    let mut ws = FragmentCollector::new(ws);
    for (i, channel) in args.channels.iter().enumerate() {
        let cmd = serde_json::json!({"op":"subscribe","channel":channel,"id":i});
        let json = cmd.to_string().into_bytes();
        let payload =
            if args.msgpack { transcode(Encoding::Json, Encoding::MsgPack, &json).unwrap_or_default() } else { json };
        let frame = if args.msgpack { Frame::binary(payload.into()) } else { Frame::text(payload.into()) };
        if let Err(e) = ws.write_frame(frame).await {
            return fail(exit::UNAVAILABLE, format!("sending subscribe: {e}"));
        }
    }
    let mut pending = args.channels.len();
    let mut messages = 0u64;
    loop {
        let frame = match ws.read_frame().await {
            Ok(f) => f,
            Err(e) => return fail(exit::UNAVAILABLE, format!("connection lost: {e}")),
        };
        let value: serde_json::Value = match frame.opcode {
            OpCode::Text => match serde_json::from_slice(&frame.payload) {
                Ok(v) => v,
                Err(e) => return fail(exit::DATA, format!("server sent invalid JSON: {e}")),
            },
            OpCode::Binary => match transcode(Encoding::MsgPack, Encoding::Json, &frame.payload)
                .map_err(|e| e.to_string())
                .and_then(|json| serde_json::from_slice(&json).map_err(|e| e.to_string()))
            {
                Ok(v) => v,
                Err(e) => return fail(exit::DATA, format!("server sent invalid MessagePack: {e}")),
            },
            OpCode::Close => {
                let code = (frame.payload.len() >= 2).then(|| u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
                return match code {
                    Some(1000) | None => ExitCode::SUCCESS,
                    Some(c) => fail(exit::UNAVAILABLE, format!("server closed the connection with {c}")),
                };
            }
            _ => continue,
        };
        let op = value["op"].as_str().unwrap_or_default();
        match op {
            "error" if pending > 0 => return fail(exit::REJECTED, format!("subscribe failed: {value}")),
            "subscribed" => {
                pending = pending.saturating_sub(1);
                if pending == 0 {
                    eprintln!("fanout: subscribed to {}", args.channels.join(", "));
                }
            }
            _ => {}
        }
        if op == "message" || args.all {
            println!("{value}");
        }
        if op == "message" {
            messages += 1;
            if args.count.is_some_and(|n| messages >= n) {
                return ExitCode::SUCCESS;
            }
        }
    }
}
