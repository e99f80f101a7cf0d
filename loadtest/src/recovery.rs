//! The recovery scenario: subscribers that leave and come back under load. Each one
//! disconnects every `recover_every` (offset per subscriber), stays away `recover_away`,
//! reconnects to the next node with `since` = the last offset it saw, and checks that the
//! offsets it then gets continue exactly (a gap or a duplicate is counted, never hidden).
//! A recovery's time runs from sending `subscribe` to receiving the publication at the
//! top the `subscribed` reply named: every missed publication delivered.
//!
//! Deliberately simpler than the broadcast machinery (`sub.rs`): a few hundred clients on
//! tokio-tungstenite are plenty to measure recoveries, and correctness is the point here.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

use crate::{report::Percentiles, scenario::Scenario, sub::new_histogram};

pub(crate) struct RecoveryConfig {
    pub scenario: Scenario,
    pub urls: Vec<String>,
    pub http_url: String,
    pub api_key: Option<String>,
    pub run_id: String,
    pub quiet: bool,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct RecoveryReport {
    pub scenario: &'static str,
    pub subscribers: usize,
    pub publications: u64,
    pub publish_errors: u64,
    /// Publications per second actually achieved (one HTTP publisher, one at a time).
    pub publish_rate: f64,
    pub reconnects: u64,
    pub recovered: u64,
    pub not_recovered: u64,
    /// Offsets skipped by a subscriber (should be 0).
    pub gaps: u64,
    /// Offsets a subscriber got twice or out of order (should be 0).
    pub duplicates: u64,
    /// Subscribers that did not reach the last publication before the drain ran out.
    pub incomplete: u64,
    pub deliveries: u64,
    /// Publications missed while away and recovered (top − since, summed).
    pub replayed: u64,
    /// Missed publications per recovery, on average.
    pub missed_per_recovery: f64,
    /// Subscribe sent → last missed publication received.
    pub recovery_ms: Percentiles,
}

#[derive(Default)]
struct Totals {
    reconnects: AtomicU64,
    recovered: AtomicU64,
    not_recovered: AtomicU64,
    gaps: AtomicU64,
    duplicates: AtomicU64,
    deliveries: AtomicU64,
    replayed: AtomicU64,
}

pub(crate) async fn run(cfg: RecoveryConfig) -> anyhow::Result<RecoveryReport> {
    let s = &cfg.scenario;
    let (Some(every), Some(away)) = (s.recover_every, s.recover_away) else {
        bail!("the recovery scenario needs recover_every and recover_away");
    };
    if cfg.urls.is_empty() {
        bail!("--url is required");
    }
    let channel = format!("loadtest:{}:recovery", cfg.run_id);
    let totals = Arc::new(Totals::default());
    let latency = Arc::new(Mutex::new(new_histogram()));
    let last_offset = Arc::new(AtomicU64::new(u64::MAX));
    let publishing = Arc::new(AtomicBool::new(true));

    let mut clients = Vec::new();
    for i in 0..s.subscribers {
        let c = Client {
            index: i,
            urls: cfg.urls.clone(),
            channel: channel.clone(),
            every,
            away,
            totals: totals.clone(),
            latency: latency.clone(),
            last_offset: last_offset.clone(),
            publishing: publishing.clone(),
            subscribers: s.subscribers,
        };
        clients.push(tokio::spawn(c.run()));
    }
    // Every client subscribed before the first publication (they report through `deliveries` later).
    tokio::time::sleep(Duration::from_millis(500) + Duration::from_micros(2000 * s.subscribers as u64)).await;

    let mut publisher =
        fanout_publisher::Publisher::http(&cfg.http_url).retry(fanout_publisher::RetryPolicy::default());
    if let Some(key) = &cfg.api_key {
        publisher = publisher.api_key(key);
    }
    let publisher = publisher.build()?;
    let total = s.publications();
    let pad = "x".repeat(s.payload.saturating_sub(24));
    let started = Instant::now();
    let (mut errors, mut top) = (0u64, 0u64);
    let interval = Duration::from_secs_f64(1.0 / s.rate.max(0.001));
    for seq in 0..total {
        let due = started + interval.mul_f64(seq as f64);
        tokio::time::sleep_until(due.into()).await;
        let key = format!("{}-{seq}", cfg.run_id);
        match publisher.publish_with(&channel, &json!({"seq": seq, "p": pad}), Some(&key)).await {
            Ok(receipt) => top = top.max(receipt.offset.unwrap_or(0)),
            Err(_) => errors += 1,
        }
        if !cfg.quiet && seq > 0 && seq % (s.rate.max(1.0) as u64 * 5) == 0 {
            eprintln!(
                "recovery: {seq}/{total} published, {} reconnects, {} gaps, {} duplicates",
                totals.reconnects.load(Relaxed),
                totals.gaps.load(Relaxed),
                totals.duplicates.load(Relaxed)
            );
        }
    }
    if top == 0 {
        bail!("no publication was stored: does the gateway keep history in namespace `loadtest`? (run-local.sh configures it)");
    }
    let publish_rate = total as f64 / started.elapsed().as_secs_f64();
    last_offset.store(top, Relaxed);
    publishing.store(false, Relaxed);
    let mut incomplete = 0;
    for c in clients {
        match tokio::time::timeout(Duration::from_secs(30), c).await {
            Ok(Ok(true)) => {}
            _ => incomplete += 1,
        }
    }
    let h = latency.lock().map(|h| h.clone()).unwrap_or_else(|p| p.into_inner().clone());
    let recovered = totals.recovered.load(Relaxed);
    let replayed = totals.replayed.load(Relaxed);
    Ok(RecoveryReport {
        scenario: "recovery",
        subscribers: s.subscribers,
        publications: total - errors,
        publish_errors: errors,
        publish_rate,
        reconnects: totals.reconnects.load(Relaxed),
        recovered,
        not_recovered: totals.not_recovered.load(Relaxed),
        gaps: totals.gaps.load(Relaxed),
        duplicates: totals.duplicates.load(Relaxed),
        incomplete,
        deliveries: totals.deliveries.load(Relaxed),
        replayed,
        missed_per_recovery: if recovered > 0 { replayed as f64 / recovered as f64 } else { 0.0 },
        recovery_ms: Percentiles::of_micros(&h),
    })
}

struct Client {
    index: usize,
    urls: Vec<String>,
    channel: String,
    every: Duration,
    away: Duration,
    totals: Arc<Totals>,
    latency: Arc<Mutex<Histogram<u64>>>,
    last_offset: Arc<AtomicU64>,
    publishing: Arc<AtomicBool>,
    subscribers: usize,
}

impl Client {
    /// Runs until it has seen the last publication; false when it gave up.
    async fn run(self) -> bool {
        let mut position: Option<(u64, String)> = None;
        // Spread the disconnects evenly over the cycle.
        let offset = self.every.mul_f64(self.index as f64 / self.subscribers.max(1) as f64);
        let mut leave_at = Instant::now() + Duration::from_millis(1000) + offset;
        for attempt in 0usize.. {
            if attempt > 10_000 {
                return false;
            }
            let url = &self.urls[(self.index + attempt) % self.urls.len()];
            let Ok(mut request) = url.as_str().into_client_request() else { return false };
            if let Ok(v) = "fanout.v1.json".parse() {
                request.headers_mut().insert("sec-websocket-protocol", v);
            }
            let Ok((mut ws, _)) = tokio_tungstenite::connect_async(request).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let mut cmd = json!({"op":"subscribe","channel":self.channel,"id":1});
            if let Some((o, e)) = &position {
                cmd["since"] = json!({"offset": o, "epoch": e});
            }
            let sent = Instant::now();
            if ws.send(Message::text(cmd.to_string())).await.is_err() {
                continue;
            }
            // The top to reach before this recovery counts as done.
            let mut recovering: Option<u64> = None;
            let recovering_since = position.as_ref().map(|p| p.0);
            loop {
                let stay = self.publishing.load(Relaxed) && Instant::now() < leave_at;
                let done = self.last_offset.load(Relaxed);
                if let Some((o, _)) = &position {
                    if done != u64::MAX && *o >= done {
                        return true;
                    }
                }
                if !stay && self.publishing.load(Relaxed) && recovering.is_none() {
                    break;
                }
                let next = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
                    Err(_) => continue,
                    Ok(Some(Ok(Message::Text(t)))) => t,
                    Ok(Some(Ok(_))) => continue,
                    Ok(_) => break,
                };
                let Ok(v) = serde_json::from_str::<Value>(&next) else { continue };
                match v["op"].as_str() {
                    Some("subscribed") => {
                        let top = v["offset"].as_u64().unwrap_or(0);
                        let epoch = v["epoch"].as_str().unwrap_or_default().to_owned();
                        if recovering_since.is_some() {
                            if v["recovered"] == true {
                                self.totals.recovered.fetch_add(1, Relaxed);
                                let missed = top.saturating_sub(recovering_since.unwrap_or(0));
                                self.totals.replayed.fetch_add(missed, Relaxed);
                                if top > recovering_since.unwrap_or(0) {
                                    recovering = Some(top);
                                } else {
                                    self.record(sent);
                                }
                            } else {
                                self.totals.not_recovered.fetch_add(1, Relaxed);
                                position = Some((top, epoch));
                            }
                        } else {
                            position = Some((top, epoch));
                        }
                    }
                    Some("message") => {
                        let Some(o) = v["offset"].as_u64() else { continue };
                        self.totals.deliveries.fetch_add(1, Relaxed);
                        if let Some((last, _)) = &mut position {
                            if o <= *last {
                                self.totals.duplicates.fetch_add(1, Relaxed);
                                continue;
                            }
                            if o > *last + 1 {
                                self.totals.gaps.fetch_add(o - *last - 1, Relaxed);
                            }
                            *last = o;
                        }
                        if let Some(top) = recovering {
                            if o >= top {
                                recovering = None;
                                self.record(sent);
                            }
                        }
                    }
                    Some("resync") => {
                        let epoch = v["epoch"].as_str().unwrap_or_default().to_owned();
                        position = Some((v["offset"].as_u64().unwrap_or(0), epoch));
                    }
                    _ => {}
                }
            }
            let _ = ws.close(None).await;
            self.totals.reconnects.fetch_add(1, Relaxed);
            tokio::time::sleep(self.away).await;
            leave_at = Instant::now() + self.every;
        }
        false
    }

    fn record(&self, since: Instant) {
        if let Ok(mut h) = self.latency.lock() {
            let _ = h.record(since.elapsed().as_micros().max(1) as u64);
        }
    }
}

impl RecoveryReport {
    pub(crate) fn table(&self) -> String {
        format!(
            "recovery: {} subscribers, {} publications ({} failed) at {:.0}/s\n\
             reconnects {}  recovered {}  not recovered {}  incomplete {}\n\
             gaps {}  duplicates {}  deliveries {}  replayed {} ({:.0} per recovery)\n\
             recovery time (subscribe → last missed publication) ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}\n",
            self.subscribers,
            self.publications,
            self.publish_errors,
            self.publish_rate,
            self.reconnects,
            self.recovered,
            self.not_recovered,
            self.incomplete,
            self.gaps,
            self.duplicates,
            self.deliveries,
            self.replayed,
            self.missed_per_recovery,
            self.recovery_ms.p50,
            self.recovery_ms.p90,
            self.recovery_ms.p99,
            self.recovery_ms.max,
        )
    }
}

/// Starts the scenario from the `run` command's arguments.
pub(crate) fn run_blocking(cfg: RecoveryConfig) -> anyhow::Result<RecoveryReport> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting a runtime")?;
    rt.block_on(run(cfg))
}
