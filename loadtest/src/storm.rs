//! The reconnect storm: every subscriber on the first node, which is then drained
//! (SIGTERM: its sessions close with 1001); each client reconnects to the next node the
//! moment its connection ends and subscribes again. Reports how long until every client
//! was subscribed again (and so how many upgrades + subscribes per second the surviving
//! node took), each client's time from losing its connection to its new `subscribed`, and
//! whether every client then gets a publication (published through Redis: the drained
//! node's API is gone).
//!
//! The clients are the load tester's own lean WebSocket code, from 16 loopback source
//! addresses: with tokio-tungstenite from one address the generator, not the gateway,
//! was the bottleneck (its buffers, and the kernel's ephemeral-port search).

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{Notify, Semaphore},
};

use crate::{
    report::{MachineView, Percentiles},
    scenario::Scenario,
    sub::new_histogram,
    sys::{self, CpuStatProbe},
    ws,
};

pub(crate) struct StormConfig {
    pub scenario: Scenario,
    pub urls: Vec<String>,
    /// The first node's process: drained with SIGTERM.
    pub drain_pid: u32,
    pub redis_url: String,
    /// Local addresses to connect from, round-robin (`--source-addrs`). With one source
    /// address, tens of thousands of simultaneous connects to one port make the kernel's
    /// ephemeral-port search the bottleneck (`__inet_check_established`): the generator's
    /// cost, not the gateway's. Empty: 127.0.0.2 … 127.0.0.17 for loopback nodes.
    pub source_addrs: Vec<std::net::IpAddr>,
    pub run_id: String,
    pub quiet: bool,
    /// How long each spinning probe of the machine's CPUs runs, before and after (0: none).
    pub host_probe: Duration,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct StormReport {
    pub scenario: &'static str,
    pub subscribers: usize,
    pub channels: usize,
    /// How long the clients took to connect and subscribe on the first node.
    pub connect_ms: f64,
    /// From the SIGTERM to the last client subscribed again on the next node.
    pub storm_ms: f64,
    /// Clients back per second over the storm: upgrades + subscribes the node accepted.
    pub back_per_second: f64,
    /// Clients not subscribed again within the limit.
    pub not_back: usize,
    /// Per client: from its connection ending to its new `subscribed`.
    pub reconnect_ms: Percentiles,
    /// Clients that got no publication within 10 s of the first one being published.
    pub starved: usize,
    /// Per client: from the publication to its arrival.
    pub first_message_ms: Percentiles,
    /// This machine's CPUs from the drain to the last client back (the node that takes the
    /// clients over is among the other processes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineView>,
}

impl StormReport {
    pub(crate) fn table(&self) -> String {
        let machine = self.machine.as_ref().map(MachineView::rows).unwrap_or_default();
        format!(
            "\nfanout-loadtest: storm ({} subscribers on {} channels move to the next node)\n  \
             connected                {:.0} ms on the first node\n  \
             storm                    all back in {:.0} ms ({:.0} clients/s), {} not back\n  \
             reconnect (per client)   p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1} ms\n  \
             first message            p50 {:.1}  p99 {:.1}  max {:.1} ms, {} starved\n{machine}",
            self.subscribers,
            self.channels,
            self.connect_ms,
            self.storm_ms,
            self.back_per_second,
            self.not_back,
            self.reconnect_ms.p50,
            self.reconnect_ms.p90,
            self.reconnect_ms.p99,
            self.reconnect_ms.max,
            self.first_message_ms.p50,
            self.first_message_ms.p99,
            self.first_message_ms.max,
            self.starved,
        )
    }
}

#[derive(Default)]
struct Totals {
    connected: AtomicUsize,
    back: AtomicUsize,
    got: AtomicUsize,
    /// When the last client got back.
    last_back: Mutex<Option<Instant>>,
    reconnect: Mutex<Option<Histogram<u64>>>,
    first: Mutex<Option<Histogram<u64>>>,
    /// When the publications went out.
    published_at: Mutex<Option<Instant>>,
    changed: Notify,
}

fn record(h: &Mutex<Option<Histogram<u64>>>, micros: u64) {
    let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
    let _ = h.get_or_insert_with(new_histogram).record(micros.max(1));
}

pub(crate) async fn run(cfg: StormConfig) -> anyhow::Result<StormReport> {
    let s = &cfg.scenario;
    if cfg.urls.len() < 2 {
        bail!("the storm needs two nodes (--url A,B): it drains the first");
    }
    // Opened before the clients take every descriptor there is.
    let mut stat = CpuStatProbe::open();
    let totals = Arc::new(Totals::default());
    let channels: Vec<String> = (0..s.channels.max(1)).map(|i| format!("loadtest:{}:storm:{i}", cfg.run_id)).collect();
    // Connecting the first time is not what is measured: at most 256 at once.
    let connecting = Arc::new(Semaphore::new(256));
    let loopback = cfg.urls.iter().all(|u| u.contains("://127.") || u.contains("://localhost"));
    let sources: Vec<std::net::IpAddr> = if !cfg.source_addrs.is_empty() {
        cfg.source_addrs.clone()
    } else if loopback {
        (2..18).map(|i| std::net::IpAddr::from([127, 0, 0, i])).collect()
    } else {
        Vec::new()
    };
    let first = Arc::new(ws::WsUrl::parse(&cfg.urls[0]).map_err(anyhow::Error::msg)?);
    let next = Arc::new(ws::WsUrl::parse(&cfg.urls[1]).map_err(anyhow::Error::msg)?);
    let started = Instant::now();
    for i in 0..s.subscribers {
        let c = Client {
            source: (!sources.is_empty()).then(|| sources[i % sources.len()]),
            first: first.clone(),
            next: next.clone(),
            channel: channels[i % channels.len()].clone(),
            totals: totals.clone(),
            connecting: connecting.clone(),
        };
        tokio::spawn(c.run());
    }
    let all = s.subscribers;
    wait_for(&totals, Duration::from_secs(120), || totals.connected.load(Relaxed) >= all)
        .await
        .with_context(|| format!("only {} of {all} clients connected", totals.connected.load(Relaxed)))?;
    let connect_ms = started.elapsed().as_secs_f64() * 1e3;
    if !cfg.quiet {
        eprintln!("storm: {all} clients subscribed on the first node in {connect_ms:.0} ms; draining it");
    }
    // While the clients sit idle, just before the drain.
    let pauses_before = sys::probe_pauses_async(cfg.host_probe).await;
    let stat0 = stat.read();
    let not_others = [std::process::id(), cfg.drain_pid];
    let others0 = sys::ProcessCpu::read(&not_others);
    let storm = Instant::now();
    let killed = std::process::Command::new("kill").arg("-TERM").arg(cfg.drain_pid.to_string()).status()?;
    if !killed.success() {
        bail!("could not signal the first node (pid {})", cfg.drain_pid);
    }
    let _ = wait_for(&totals, Duration::from_secs(60), || totals.back.load(Relaxed) >= all).await;
    let back = totals.back.load(Relaxed);
    let last = totals.last_back.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or(storm);
    let storm_ms = last.saturating_duration_since(storm).as_secs_f64() * 1e3;
    let shares = stat.read().since(&stat0);
    let others = sys::ProcessCpu::read(&not_others).since(&others0);

    // One publication per channel, straight into Redis: every client must get it.
    let publisher = fanout_publisher::Publisher::redis(cfg.redis_url.clone()).connect().await?;
    *totals.published_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    for c in &channels {
        publisher.publish(c, &json!({"storm": true})).await?;
    }
    let _ = wait_for(&totals, Duration::from_secs(10), || totals.got.load(Relaxed) >= back).await;
    let pauses_after = sys::probe_pauses_async(cfg.host_probe).await;
    let histogram = |h: &Mutex<Option<Histogram<u64>>>| {
        h.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_else(new_histogram)
    };
    Ok(StormReport {
        scenario: "storm",
        subscribers: all,
        channels: channels.len(),
        connect_ms,
        storm_ms,
        back_per_second: if storm_ms > 0.0 { back as f64 / (storm_ms / 1e3) } else { 0.0 },
        not_back: all - back,
        reconnect_ms: Percentiles::of_micros(&histogram(&totals.reconnect)),
        starved: all - totals.got.load(Relaxed),
        first_message_ms: Percentiles::of_micros(&histogram(&totals.first)),
        machine: (!shares.is_empty() || !pauses_before.is_empty())
            .then(|| MachineView::new(shares, None).with_pauses(pauses_before, pauses_after).with_others(others)),
    })
}

/// Waits, woken by every client's progress, until `done` holds; `Err` after `limit`.
async fn wait_for(totals: &Totals, limit: Duration, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        // Registered before the check, so a change between the two is not missed.
        let changed = totals.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if done() {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() && !done() {
            bail!("not done within {limit:?}");
        }
    }
}

struct Client {
    source: Option<std::net::IpAddr>,
    first: Arc<ws::WsUrl>,
    next: Arc<ws::WsUrl>,
    channel: String,
    totals: Arc<Totals>,
    connecting: Arc<Semaphore>,
}

/// A connection of ours: the socket and what was read but not yet parsed.
struct Ws {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Ws {
    /// The next text frame's payload, answering pings; `None` at a Close or the end.
    async fn next_text(&mut self) -> Option<Vec<u8>> {
        let mut chunk = [0u8; 4096];
        loop {
            match ws::parse_frame(&self.buf, 1 << 20) {
                Ok(Some((frame, used))) => {
                    let (opcode, payload) = (frame.opcode, frame.payload.to_vec());
                    self.buf.drain(..used);
                    match opcode {
                        ws::OP_TEXT => return Some(payload),
                        ws::OP_PING => {
                            let mut pong = Vec::new();
                            ws::client_frame(&mut pong, ws::OP_PONG, &payload, [1, 2, 3, 4]);
                            self.stream.write_all(&pong).await.ok()?;
                        }
                        ws::OP_CLOSE => return None,
                        _ => {}
                    }
                    continue;
                }
                Ok(None) => {}
                Err(_) => return None,
            }
            let n = self.stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl Client {
    async fn run(self) {
        let ws = {
            let _permit = self.connecting.acquire().await;
            match self.subscribe(&self.first).await {
                Some(ws) => ws,
                None => return,
            }
        };
        self.totals.connected.fetch_add(1, Relaxed);
        self.totals.changed.notify_waiters();
        // Until the node drains it: Close 1001, or the connection ending.
        let mut ws = ws;
        while ws.next_text().await.is_some() {}
        let lost = Instant::now();
        drop(ws);
        let mut ws = loop {
            if let Some(ws) = self.subscribe(&self.next).await {
                break ws;
            }
            if lost.elapsed() > Duration::from_secs(60) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        record(&self.totals.reconnect, lost.elapsed().as_micros() as u64);
        *self.totals.last_back.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.totals.back.fetch_add(1, Relaxed);
        self.totals.changed.notify_waiters();
        while let Some(text) = ws.next_text().await {
            if contains(&text, b"\"message\"") {
                let published = *self.totals.published_at.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(at) = published {
                    record(&self.totals.first, at.elapsed().as_micros() as u64);
                }
                self.totals.got.fetch_add(1, Relaxed);
                self.totals.changed.notify_waiters();
                break;
            }
        }
        let mut bye = Vec::new();
        ws::close_frame(&mut bye, 1000, [5, 6, 7, 8]);
        let _ = ws.stream.write_all(&bye).await;
    }

    /// Connects to `url` (from this client's source address), upgrades and subscribes;
    /// the connection once `subscribed` came back.
    async fn subscribe(&self, url: &ws::WsUrl) -> Option<Ws> {
        let addr = tokio::net::lookup_host((url.host.rsplit_once(':').map_or(url.host.as_str(), |h| h.0), url.port))
            .await
            .ok()?
            .next()?;
        let socket =
            if addr.is_ipv4() { tokio::net::TcpSocket::new_v4() } else { tokio::net::TcpSocket::new_v6() }.ok()?;
        if let Some(source) = self.source {
            socket.bind(std::net::SocketAddr::new(source, 0)).ok()?;
        }
        let mut stream = socket.connect(addr).await.ok()?;
        let _ = stream.set_nodelay(true);
        let mut rng = ws::Rng::new(fanout_protocol::now_micros() ^ (self as *const Self as u64));
        let early = ws::handshake(&mut stream, url, &mut rng, Duration::from_secs(10)).await.ok()?;
        let cmd = json!({"op": "subscribe", "channel": self.channel, "id": 1}).to_string();
        let mut frame = Vec::new();
        ws::client_frame(&mut frame, ws::OP_TEXT, cmd.as_bytes(), rng.mask());
        stream.write_all(&frame).await.ok()?;
        let mut ws = Ws { stream, buf: early };
        while let Some(text) = ws.next_text().await {
            if contains(&text, b"\"subscribed\"") {
                return Some(ws);
            }
        }
        None
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

pub(crate) fn run_blocking(cfg: StormConfig) -> anyhow::Result<StormReport> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting a runtime")?;
    rt.block_on(run(cfg))
}
