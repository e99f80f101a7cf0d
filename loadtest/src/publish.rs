//! The open-loop publisher: a scheduler thread stamps publication `seq` with its intended
//! send time `start + seq/rate` and hands it to a transport lane, never waiting for a
//! reply. Subscribers measure latency from that intended time, so a stalled publisher or
//! gateway shows up as latency instead of silently lowering the offered load
//! (coordinated omission).

use std::{
    cell::RefCell,
    collections::BTreeMap,
    net::SocketAddr,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use fanout_protocol::now_micros;
use fanout_publisher::{Encoding, Outgoing, PublishError, Publisher, RetryPolicy};
use hdrhistogram::Histogram;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender},
};

use crate::{
    scan::{self, Incoming, Scanner},
    scenario::{Scenario, Transport},
    sub::new_histogram,
    sys::clock_us,
    ws::{self, Rng, WsUrl},
};

pub(crate) struct PubConfig {
    pub transport: Transport,
    pub rate: f64,
    pub total: u64,
    pub payload: usize,
    pub channel_names: Arc<Vec<String>>,
    /// WebSocket publisher connections go to these, round-robin.
    pub ws_urls: Vec<(WsUrl, SocketAddr)>,
    pub ws_publishers: usize,
    pub http_url: Option<String>,
    pub api_key: Option<String>,
    pub http_concurrency: usize,
    /// HTTP lanes send everything queued behind a request as one `POST /api/publish_batch`.
    pub http_batch: bool,
    /// The clock wakes at most once per window and hands off everything due by then.
    pub batch_window: Duration,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    pub timeout: Duration,
}

/// Live figures for the progress line.
#[derive(Default)]
pub(crate) struct PubLive {
    pub scheduled: AtomicU64,
    pub sent: AtomicU64,
    pub failed: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct PubResult {
    pub scheduled: u64,
    pub sent: u64,
    pub failed: u64,
    /// Publications per channel index that the transport accepted.
    pub ok_per_channel: Vec<u64>,
    pub errors: BTreeMap<String, u64>,
    /// Microseconds from a publication's intended send time to its hand-off to the
    /// transport: how far the generator fell behind its own schedule.
    pub lag: Histogram<u64>,
    /// Microseconds the scheduling clock itself woke late (the part of `lag` spent before
    /// the publication was even created).
    pub clock_lag: Histogram<u64>,
    /// Microseconds from a publication's hand-off to the transport to the gateway's (or
    /// Redis's) answer for it: the publish path's own time, which `lag` does not include.
    pub answer: Histogram<u64>,
    /// Time from the first intended send to the last hand-off.
    pub elapsed: Duration,
}

struct Item {
    seq: u64,
    intended_us: u64,
    data: Bytes,
}

struct Stats {
    channels: usize,
    sent: u64,
    failed: u64,
    ok_per_channel: Vec<u64>,
    errors: BTreeMap<String, u64>,
    lag: Histogram<u64>,
    answer: Histogram<u64>,
    live: Arc<PubLive>,
}

impl Stats {
    fn handed_off(&mut self, item: &Item, now_us: u64) {
        self.lag.saturating_record(now_us.saturating_sub(item.intended_us));
    }

    /// The answers for `count` publications handed off at `sent_us` arrived now.
    fn answered(&mut self, sent_us: u64, count: u64) {
        self.answer.saturating_record_n(clock_us().saturating_sub(sent_us).max(1), count);
    }

    fn ok(&mut self, seq: u64) {
        self.sent += 1;
        self.ok_per_channel[Scenario::channel_of_seq(seq, self.channels) as usize] += 1;
        self.live.sent.fetch_add(1, Relaxed);
    }

    fn fail(&mut self, kind: impl Into<String>) {
        self.failed += 1;
        *self.errors.entry(kind.into()).or_default() += 1;
        self.live.failed.fetch_add(1, Relaxed);
    }

    /// A publication counted as sent was refused later (an `error` reply over WebSocket).
    fn refused(&mut self, seq: u64, kind: &str) {
        let c = Scenario::channel_of_seq(seq, self.channels) as usize;
        self.ok_per_channel[c] = self.ok_per_channel[c].saturating_sub(1);
        self.sent = self.sent.saturating_sub(1);
        self.live.sent.fetch_sub(1, Relaxed);
        self.fail(kind);
    }
}

fn publish_error_kind(e: &PublishError) -> String {
    match e {
        PublishError::Rejected { status: Some(s), .. } | PublishError::Unavailable { status: Some(s), .. } => {
            format!("http_{s}")
        }
        PublishError::Rejected { code, .. } => format!("redis_{code}"),
        PublishError::Unavailable { .. } => "unavailable".into(),
        PublishError::Timeout(_) => "timeout".into(),
        other => format!("{other}"),
    }
}

/// Starts the publisher thread. It connects its transport first, then `started` fires and
/// the schedule begins; it returns when every publication was handed off and answered.
pub(crate) fn start(
    cfg: PubConfig,
    live: Arc<PubLive>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<anyhow::Result<PubResult>> {
    #[allow(clippy::expect_used, reason = "an invariant of this code, not input: failing it is a bug")]
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            // Lanes hand publications to the transport: delays here are schedule lag too.
            crate::sys::raise_thread_priority(-10);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, run(cfg, live, stop))
        })
        .expect("spawning the publisher thread")
}

async fn run(cfg: PubConfig, live: Arc<PubLive>, stop: Arc<AtomicBool>) -> anyhow::Result<PubResult> {
    let channels = cfg.channel_names.len();
    let stats = Rc::new(RefCell::new(Stats {
        channels,
        sent: 0,
        failed: 0,
        ok_per_channel: vec![0; channels],
        errors: BTreeMap::new(),
        lag: new_histogram(),
        answer: new_histogram(),
        live: live.clone(),
    }));
    let lanes = match cfg.transport {
        Transport::Ws => cfg.ws_publishers.max(1),
        Transport::Http => cfg.http_concurrency.max(1),
        Transport::Redis => 1,
    };
    let mut senders = Vec::with_capacity(lanes);
    let mut tasks = Vec::with_capacity(lanes);
    match cfg.transport {
        Transport::Ws => {
            anyhow::ensure!(!cfg.ws_urls.is_empty(), "the ws transport needs --url");
            for lane in 0..lanes {
                let (url, addr) = cfg.ws_urls[lane % cfg.ws_urls.len()].clone();
                let mut rng = Rng::new(now_micros() ^ lane as u64);
                let mut stream =
                    TcpStream::connect(addr).await.with_context(|| format!("publisher connection to {url}"))?;
                let _ = stream.set_nodelay(true);
                let early = ws::handshake(&mut stream, &url, &mut rng, cfg.timeout)
                    .await
                    .map_err(|e| anyhow::anyhow!("publisher upgrade at {url}: {e}"))?;
                let (tx, rx) = unbounded_channel();
                senders.push(tx);
                tasks.push(tokio::task::spawn_local(ws_lane(
                    stream,
                    early,
                    rng,
                    rx,
                    cfg.channel_names.clone(),
                    stats.clone(),
                )));
            }
        }
        Transport::Http => {
            let url =
                cfg.http_url.clone().context("the http transport needs --http-url (a node's internal address)")?;
            let mut builder = Publisher::http(url).timeout(cfg.timeout).retry(RetryPolicy::NONE);
            if let Some(k) = &cfg.api_key {
                builder = builder.api_key(k);
            }
            let publisher = builder.build()?;
            for _ in 0..lanes {
                let (tx, rx) = unbounded_channel();
                senders.push(tx);
                let (publisher, names, stats) = (publisher.clone(), cfg.channel_names.clone(), stats.clone());
                tasks.push(if cfg.http_batch {
                    tokio::task::spawn_local(batch_lane(publisher, rx, names, stats))
                } else {
                    tokio::task::spawn_local(http_lane(publisher, rx, names, stats))
                });
            }
        }
        Transport::Redis => {
            let url = cfg.redis_url.clone().context("the redis transport needs --redis-url")?;
            let publisher = Publisher::redis(url)
                .prefix(cfg.redis_prefix.clone())
                .timeout(cfg.timeout)
                .retry(RetryPolicy::NONE)
                .connect()
                .await
                .context("connecting to Redis")?;
            let (tx, rx) = unbounded_channel();
            senders.push(tx);
            tasks.push(tokio::task::spawn_local(batch_lane(publisher, rx, cfg.channel_names.clone(), stats.clone())));
        }
    }

    let plan = Schedule { rate: cfg.rate, total: cfg.total, payload: cfg.payload, channels, window: cfg.batch_window };
    let scheduler = std::thread::Builder::new()
        .name("scheduler".into())
        .spawn(move || schedule(plan, senders, &live, &stop))
        .context("spawning the scheduler thread")?;
    for t in tasks {
        let _ = t.await;
    }
    let (scheduled, elapsed, clock_lag) = scheduler.join().map_err(|_| anyhow::anyhow!("the scheduler panicked"))?;
    let stats = Rc::try_unwrap(stats).map_err(|_| anyhow::anyhow!("lanes still running"))?.into_inner();
    Ok(PubResult {
        scheduled,
        sent: stats.sent,
        failed: stats.failed,
        ok_per_channel: stats.ok_per_channel,
        errors: stats.errors,
        lag: stats.lag,
        clock_lag,
        answer: stats.answer,
        elapsed,
    })
}

struct Schedule {
    rate: f64,
    total: u64,
    payload: usize,
    channels: usize,
    window: Duration,
}

/// The open-loop clock. Sleeps until the next publication is due and then hands off all
/// that are due; when it falls behind it catches up in a burst instead of stretching the
/// schedule, so the offered rate stays what was asked for. It wakes at most once per
/// `window`: every wake-up and hand-off costs two context switches, which at thousands of
/// publications per second would make the generator, not the gateway, the bottleneck.
fn schedule(
    plan: Schedule,
    senders: Vec<UnboundedSender<Vec<Item>>>,
    live: &PubLive,
    stop: &AtomicBool,
) -> (u64, Duration, Histogram<u64>) {
    let Schedule { rate, total, payload, channels, window } = plan;
    let lanes = senders.len();
    let mut pending: Vec<Vec<Item>> = (0..lanes).map(|_| Vec::new()).collect();
    let mut clock_lag = new_histogram();
    // A late wake-up here is lag in every latency figure, so the clock thread asks for
    // more CPU priority than the subscriber workers; refused (no CAP_SYS_NICE) is fine.
    crate::sys::raise_thread_priority(-10);
    let start = Instant::now();
    let start_us = clock_us();
    let period = 1.0 / rate;
    let mut buf = Vec::with_capacity(payload + 64);
    let mut seq = 0;
    while seq < total && !stop.load(Relaxed) {
        let woke = start.elapsed();
        loop {
            let due = Duration::from_secs_f64(seq as f64 * period);
            if seq >= total || due > woke {
                break;
            }
            clock_lag.saturating_record((woke - due).as_micros() as u64);
            let intended_us = start_us + due.as_micros() as u64;
            buf.clear();
            scan::payload(&mut buf, seq, intended_us, payload);
            let channel = Scenario::channel_of_seq(seq, channels) as usize;
            // Pinning a channel to one lane keeps each channel's publications in order.
            pending[channel % lanes].push(Item { seq, intended_us, data: Bytes::copy_from_slice(&buf) });
            seq += 1;
        }
        for (lane, items) in pending.iter_mut().enumerate() {
            if !items.is_empty() {
                live.scheduled.fetch_add(items.len() as u64, Relaxed);
                let _ = senders[lane].send(std::mem::take(items));
            }
        }
        if seq >= total {
            break;
        }
        let next_due = Duration::from_secs_f64(seq as f64 * period);
        let wake_at = next_due.max(woke + window);
        let now = start.elapsed();
        if wake_at > now {
            std::thread::sleep((wake_at - now).min(Duration::from_millis(50)));
        }
    }
    (seq, start.elapsed(), clock_lag)
}

async fn ws_lane(
    stream: TcpStream,
    early: Vec<u8>,
    mut rng: Rng,
    mut rx: UnboundedReceiver<Vec<Item>>,
    names: Arc<Vec<String>>,
    stats: Rc<RefCell<Stats>>,
) {
    let (mut rd, mut wr) = stream.into_split();
    let (pong_tx, mut pong_rx) = unbounded_channel::<Vec<u8>>();
    // When each command awaiting its reply was written (so also how many await one):
    // replies come back in the order the commands went out, so the front is the one a
    // reply answers.
    let sent_at = Rc::new(RefCell::new(std::collections::VecDeque::<u64>::new()));
    let reader = {
        let answered = {
            let (stats, sent_at) = (stats.clone(), sent_at.clone());
            move || {
                if let Some(t) = sent_at.borrow_mut().pop_front() {
                    stats.borrow_mut().answered(t, 1);
                }
            }
        };
        let stats = stats.clone();
        tokio::task::spawn_local(async move {
            let scanner = Scanner::default();
            let mut buf = early;
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let mut used = 0;
                while let Ok(Some((frame, n))) = ws::parse_frame(&buf[used..], 16 << 20) {
                    used += n;
                    match frame.opcode {
                        ws::OP_TEXT => match scanner.classify(frame.payload) {
                            Incoming::Published => answered(),
                            Incoming::Error { id } => {
                                answered();
                                let kind = format!("error_{}", scan::error_code(frame.payload).unwrap_or("unknown"));
                                match id {
                                    Some(seq) => stats.borrow_mut().refused(seq, &kind),
                                    None => stats.borrow_mut().fail(kind),
                                }
                            }
                            _ => {}
                        },
                        ws::OP_PING => {
                            let mut pong = Vec::new();
                            ws::client_frame(&mut pong, ws::OP_PONG, frame.payload, [0x5a, 0xa5, 0x3c, 0xc3]);
                            let _ = pong_tx.send(pong);
                        }
                        ws::OP_CLOSE => return,
                        _ => {}
                    }
                }
                buf.drain(..used);
                match rd.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
    };
    let mut out = Vec::with_capacity(64 * 1024);
    let mut batch: Vec<Item> = Vec::new();
    let mut dead = false;
    let mut cmd = Vec::with_capacity(256);
    loop {
        tokio::select! {
            items = rx.recv() => match items {
                Some(items) => batch.extend(items),
                None => break,
            },
            Some(pong) = pong_rx.recv() => { let _ = wr.write_all(&pong).await; continue; }
        }
        while batch.len() < 1024 {
            match rx.try_recv() {
                Ok(items) => batch.extend(items),
                Err(_) => break,
            }
        }
        if dead {
            for _ in batch.drain(..) {
                stats.borrow_mut().fail("ws_publisher_closed");
            }
            continue;
        }
        out.clear();
        let now = clock_us();
        for item in &batch {
            stats.borrow_mut().handed_off(item, now);
            // Before the write: a reply can come back while the rest is still being written.
            sent_at.borrow_mut().push_back(now);
            cmd.clear();
            cmd.extend_from_slice(b"{\"op\":\"publish\",\"channel\":\"");
            cmd.extend_from_slice(names[Scenario::channel_of_seq(item.seq, names.len()) as usize].as_bytes());
            cmd.extend_from_slice(b"\",\"data\":");
            cmd.extend_from_slice(&item.data);
            cmd.extend_from_slice(format!(",\"id\":{}}}", item.seq).as_bytes());
            ws::client_frame(&mut out, ws::OP_TEXT, &cmd, rng.mask());
        }
        let written = wr.write_all(&out).await;
        if written.is_err() {
            // Not sent, so never answered.
            let mut waiting = sent_at.borrow_mut();
            let keep = waiting.len().saturating_sub(batch.len());
            waiting.truncate(keep);
        }
        let mut s = stats.borrow_mut();
        for item in batch.drain(..) {
            match written {
                Ok(()) => s.ok(item.seq),
                Err(_) => s.fail("ws_write"),
            }
        }
        dead = written.is_err();
    }
    // Wait briefly for the last replies so late `error`s are still counted.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !sent_at.borrow().is_empty() && !reader.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut bye = Vec::new();
    ws::close_frame(&mut bye, 1000, rng.mask());
    let _ = wr.write_all(&bye).await;
    reader.abort();
}

async fn http_lane(
    publisher: Publisher,
    mut rx: UnboundedReceiver<Vec<Item>>,
    names: Arc<Vec<String>>,
    stats: Rc<RefCell<Stats>>,
) {
    while let Some(items) = rx.recv().await {
        for item in items {
            let sent = clock_us();
            stats.borrow_mut().handed_off(&item, sent);
            let name = &names[Scenario::channel_of_seq(item.seq, names.len()) as usize];
            let result = publisher.publish_raw(name, Encoding::Json, item.data.clone()).await;
            let mut s = stats.borrow_mut();
            s.answered(sent, 1);
            match result {
                Ok(()) => s.ok(item.seq),
                Err(e) => s.fail(publish_error_kind(&e)),
            }
        }
    }
}

/// Publishes everything that queued up while the previous batch was in flight as one
/// batch (one pipeline to Redis, one `POST /api/publish_batch` over HTTP).
async fn batch_lane(
    publisher: Publisher,
    mut rx: UnboundedReceiver<Vec<Item>>,
    names: Arc<Vec<String>>,
    stats: Rc<RefCell<Stats>>,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.extend(first);
        while batch.len() < 1000 {
            match rx.try_recv() {
                Ok(items) => batch.extend(items),
                Err(_) => break,
            }
        }
        let now = clock_us();
        let outgoing: Vec<Outgoing> = batch
            .iter()
            .map(|item| {
                stats.borrow_mut().handed_off(item, now);
                Outgoing::new(
                    names[Scenario::channel_of_seq(item.seq, names.len()) as usize].clone(),
                    Encoding::Json,
                    item.data.clone(),
                )
            })
            .collect();
        let result = publisher.publish_batch(&outgoing).await;
        let mut s = stats.borrow_mut();
        // One answer for the whole batch: read the clock once.
        s.answered(now, batch.len() as u64);
        for item in batch.drain(..) {
            match &result {
                Ok(()) => s.ok(item.seq),
                Err(e) => s.fail(publish_error_kind(e)),
            }
        }
    }
}
