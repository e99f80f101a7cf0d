//! One run from start to report: connect and subscribe every client, publish on the
//! open-loop schedule, drain, stop, then reconcile what was published with what each
//! subscriber received and with what the gateway itself counted.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::{
    metrics::{self, NodeView, Scrape, Scraper},
    publish::{self, PubConfig, PubLive, PubResult},
    report::*,
    scenario::{self, Scenario},
    sub::{self, ChurnSpec, ConnResult, ConnSpec, ConnectLimiter, Counters, Ended, Shared, WorkerDone, WorkerMsg},
    sys::{self, CpuStat, CpuStatProbe, CpuTimes},
    ws::WsUrl,
};

pub(crate) struct RunConfig {
    pub name: String,
    pub scenario: Scenario,
    pub urls: Vec<String>,
    pub http_url: Option<String>,
    pub api_key: Option<String>,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    pub threads: usize,
    pub connect_rate: f64,
    pub connect_concurrency: usize,
    pub connect_timeout: Duration,
    pub source_addrs: Vec<IpAddr>,
    pub settle: Duration,
    pub drain: Duration,
    pub ws_publishers: usize,
    pub http_concurrency: usize,
    pub http_batch: bool,
    pub batch_window: Duration,
    /// How long each spinning probe of the machine's CPUs runs, before and after (0: none).
    pub host_probe: Duration,
    /// The subscriber workers spin while they wait ([`sub::Shared::spin`]).
    pub spin: bool,
    pub metrics_urls: Vec<String>,
    pub gateway_pids: Vec<u32>,
    pub quiet: bool,
    pub run_id: Option<String>,
}

/// The reporter's view of the workers while the run goes on.
struct Live {
    counters: Vec<Arc<Counters>>,
    rx: UnboundedReceiver<WorkerMsg>,
    latency: Histogram<u64>,
    second: Histogram<u64>,
    done: Vec<WorkerDone>,
    /// When, the process's CPU times, and the spinning workers' idle seconds then.
    cpu_last: (Instant, CpuTimes, f64),
    stat: CpuStatProbe,
    stat_last: CpuStat,
    /// The most any CPU lost to the hypervisor in one second of the measured window.
    worst_steal: f64,
    busiest: f64,
    hot_seconds: u32,
    measuring: bool,
    /// While measuring, each second's end (s since start) and p99 (ms), for seconds with
    /// at least [`SECOND_MIN_DELIVERIES`] deliveries.
    seconds: Vec<(f64, f64)>,
}

impl Live {
    fn sum(&self, f: impl Fn(&Counters) -> u64) -> u64 {
        self.counters.iter().map(|c| f(c)).sum()
    }

    /// Seconds the spinning workers found nothing to do, so far ([`sub::Counters::spin_idle_ns`]).
    fn spin_idle(&self) -> f64 {
        self.sum(|c| c.spin_idle_ns.load(Relaxed)) as f64 / 1e9
    }

    fn drain_messages(&mut self) {
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                WorkerMsg::Interval(h) => {
                    let _ = self.second.add(&h);
                    let _ = self.latency.add(&h);
                }
                WorkerMsg::Done(d) => {
                    let _ = self.latency.add(&d.latency);
                    self.done.push(*d);
                }
            }
        }
    }

    /// Samples CPU over the last second; returns its share of the available cores, and
    /// the most any of the machine's CPUs lost to the hypervisor.
    fn cpu_tick(&mut self, cores: usize) -> (f64, f64) {
        let now = (Instant::now(), CpuTimes::now(), self.spin_idle());
        let wall = now.0.duration_since(self.cpu_last.0).as_secs_f64().max(1e-3);
        let used = (now.1.since(&self.cpu_last.1) - (now.2 - self.cpu_last.2)).max(0.0);
        let share = used / wall / cores as f64 * 100.0;
        self.cpu_last = now;
        let stat = self.stat.read();
        let steal = stat.steal_since(&self.stat_last).into_iter().map(|(_, pct)| pct).fold(0.0, f64::max);
        self.stat_last = stat;
        if self.measuring {
            self.busiest = self.busiest.max(share);
            self.worst_steal = self.worst_steal.max(steal);
            if share >= 95.0 {
                self.hot_seconds += 1;
            }
        }
        (share, steal)
    }
}

fn progress(
    cfg: &RunConfig,
    live: &mut Live,
    phase: &str,
    started: Instant,
    pub_live: Option<&PubLive>,
    last_delivered: &mut u64,
    cores: usize,
) {
    live.drain_messages();
    let delivered = live.sum(|c| c.delivered.load(Relaxed));
    let rate = delivered - *last_delivered;
    *last_delivered = delivered;
    let (cpu, steal) = live.cpu_tick(cores);
    let second_p99 = (!live.second.is_empty()).then(|| live.second.value_at_quantile(0.99) as f64 / 1000.0);
    if live.measuring && live.second.len() >= SECOND_MIN_DELIVERIES {
        if let Some(p99) = second_p99 {
            live.seconds.push((started.elapsed().as_secs_f64(), p99));
        }
    }
    live.second.reset();
    if cfg.quiet {
        return;
    }
    let p99 = second_p99.map_or_else(|| "-".to_owned(), |p| format!("{p:.2}ms"));
    let published = pub_live.map_or(0, |p| p.sent.load(Relaxed));
    // Only when there is some: a second the host took a CPU away explains that second's p99.
    let steal = if steal >= 0.5 { format!("  steal {steal:.0}%") } else { String::new() };
    eprintln!(
        "[{:>6.1}s] {phase:<8} conns {}/{} (failed {}, dropped {})  published {}  deliveries/s {}  p99 {}  cpu {:.0}%{steal}",
        started.elapsed().as_secs_f64(),
        live.sum(|c| c.ready.load(Relaxed)),
        cfg.scenario.subscribers,
        live.sum(|c| c.connect_failed.load(Relaxed)),
        live.sum(|c| c.disconnected.load(Relaxed)),
        published,
        rate,
        p99,
        cpu
    );
}

async fn scrape_all(scraper: &Scraper, urls: &[String]) -> Vec<Result<Scrape, String>> {
    let mut out = Vec::with_capacity(urls.len());
    for u in urls {
        out.push(scraper.scrape(u).await);
    }
    out
}

fn run_id() -> String {
    format!("{:x}", fanout_protocol::now_micros() ^ ((std::process::id() as u64) << 40))
}

pub(crate) async fn run(cfg: RunConfig) -> anyhow::Result<(Report, Histogram<u64>)> {
    let s = &cfg.scenario;
    s.validate()?;
    anyhow::ensure!(!cfg.urls.is_empty() || s.subscribers == 0, "give at least one --url ws://host:port/ws");
    let nofile = sys::raise_nofile_limit();
    let cores = sys::available_cores();
    let threads = if cfg.threads == 0 { cores } else { cfg.threads }.max(1);

    let mut urls = Vec::new();
    for u in &cfg.urls {
        let parsed = WsUrl::parse(u).map_err(anyhow::Error::msg)?;
        let addr = parsed.resolve().await.map_err(anyhow::Error::msg)?;
        urls.push((parsed, addr));
    }
    let run = cfg.run_id.clone().unwrap_or_else(run_id);
    let channel_names: Arc<Vec<String>> =
        Arc::new((0..s.channels as u32).map(|c| scenario::channel_name(&run, c)).collect());

    // Before anything connects: the probe takes every CPU whole while it runs.
    let pauses_before = sys::probe_pauses_async(cfg.host_probe).await;
    let scraper = Scraper::default();
    let before = scrape_all(&scraper, &cfg.metrics_urls).await;
    let mut gateway_rss = sys::RssProbe::open(&cfg.gateway_pids);
    let mut own_rss = sys::RssProbe::open(&[std::process::id()]);
    let rss_before = gateway_rss.read();
    let self_rss_before = own_rss.read();
    let wanted_fds = s.subscribers as u64 + cfg.ws_publishers as u64 + cfg.http_concurrency as u64 + 64;
    if nofile < wanted_fds {
        eprintln!("warning: the open-file limit is {nofile}, below the ~{wanted_fds} descriptors this run needs; raise `ulimit -Hn` or expect too_many_open_files");
    }

    let churn = (s.churn_rate > 0.0).then(|| ChurnSpec { rate: s.churn_rate / threads as f64, hold: s.churn_hold });
    let shared = Arc::new(Shared {
        urls: urls.clone(),
        channel_names: channel_names.to_vec(),
        channels: s.channels as u32,
        connect_timeout: cfg.connect_timeout,
        limiter: ConnectLimiter::new(cfg.connect_rate, cfg.connect_concurrency),
        stopping: AtomicBool::new(false),
        stop: tokio::sync::Notify::new(),
        churning: AtomicBool::new(false),
        churn,
        sources: cfg.source_addrs.clone(),
        spin: cfg.spin,
    });
    let (tx, rx) = unbounded_channel();
    let mut per_worker: Vec<Vec<ConnSpec>> = vec![Vec::new(); threads];
    for i in 0..s.subscribers {
        let source = (!cfg.source_addrs.is_empty()).then(|| cfg.source_addrs[i % cfg.source_addrs.len()]);
        per_worker[i % threads].push(ConnSpec {
            index: i,
            url: i % urls.len().max(1),
            source,
            channels: s.channels_of(i),
        });
    }
    let mut stat = CpuStatProbe::open();
    let stat_last = stat.read();
    let mut live = Live {
        counters: Vec::new(),
        rx,
        latency: sub::new_histogram(),
        second: sub::new_histogram(),
        done: Vec::new(),
        cpu_last: (Instant::now(), CpuTimes::now(), 0.0),
        stat,
        stat_last,
        worst_steal: 0.0,
        busiest: 0.0,
        hot_seconds: 0,
        measuring: false,
        seconds: Vec::new(),
    };
    let started = Instant::now();
    let mut handles = Vec::new();
    for (id, specs) in per_worker.into_iter().enumerate() {
        let counters = Arc::new(Counters::default());
        live.counters.push(counters.clone());
        let (shared, tx) = (shared.clone(), tx.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("worker-{id}"))
                .spawn(move || sub::run_worker(id, specs, shared, counters, tx))?,
        );
    }
    drop(tx);

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, Relaxed);
            }
        });
    }

    // Connect phase: until every subscriber is ready or has failed.
    let mut last_delivered = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let connect_wait = tokio::time::interval(Duration::from_millis(20));
    tokio::pin!(connect_wait);
    loop {
        let settled = live.sum(|c| c.ready.load(Relaxed) + c.connect_failed.load(Relaxed));
        if settled >= s.subscribers as u64 || interrupted.load(Relaxed) {
            break;
        }
        tokio::select! {
            _ = tick.tick() => progress(&cfg, &mut live, "connect", started, None, &mut last_delivered, cores),
            _ = connect_wait.tick() => {}
        }
    }
    let connect_duration = started.elapsed();
    let established = live.sum(|c| c.ready.load(Relaxed));
    tokio::time::sleep(cfg.settle).await;
    let rss_connected = gateway_rss.read();
    let self_rss_connected = own_rss.read();

    // Measured window: publishing (or holding) and draining.
    live.measuring = true;
    live.cpu_tick(cores);
    let cpu0 = CpuTimes::now();
    let spin0 = live.spin_idle();
    // The tick just read the machine's counters: the window starts from that reading.
    let stat0 = live.stat_last.clone();
    let not_others: Vec<u32> = std::iter::once(std::process::id()).chain(cfg.gateway_pids.iter().copied()).collect();
    let others0 = sys::ProcessCpu::read(&not_others);
    let gateway0 = sys::ProcessCpu::of(&cfg.gateway_pids);
    let t0 = Instant::now();
    shared.churning.store(true, Relaxed);
    let pub_live = Arc::new(PubLive::default());
    let pub_stop = Arc::new(AtomicBool::new(false));
    let total = s.publications();
    let publisher = (total > 0 && !interrupted.load(Relaxed)).then(|| {
        publish::start(
            PubConfig {
                transport: s.transport,
                rate: s.rate,
                total,
                payload: s.payload,
                channel_names: channel_names.clone(),
                ws_urls: urls.clone(),
                ws_publishers: cfg.ws_publishers,
                http_url: cfg.http_url.clone(),
                api_key: cfg.api_key.clone(),
                http_concurrency: cfg.http_concurrency,
                http_batch: cfg.http_batch,
                batch_window: cfg.batch_window,
                redis_url: cfg.redis_url.clone(),
                redis_prefix: cfg.redis_prefix.clone(),
                timeout: cfg.connect_timeout,
            },
            pub_live.clone(),
            pub_stop.clone(),
        )
    });
    let phase = if publisher.is_some() { "publish" } else { "hold" };
    let hold_until = t0 + s.duration;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    let pub_result: Option<anyhow::Result<PubResult>> = loop {
        if interrupted.load(Relaxed) {
            pub_stop.store(true, Relaxed);
        }
        match &publisher {
            Some(h) if h.is_finished() => {
                break publisher.map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("publisher panicked"))))
            }
            None if Instant::now() >= hold_until || interrupted.load(Relaxed) => break None,
            _ => {}
        }
        tokio::select! {
            _ = tick.tick() => progress(&cfg, &mut live, phase, started, Some(&pub_live), &mut last_delivered, cores),
            _ = poll.tick() => {}
        }
    };
    shared.churning.store(false, Relaxed);
    let pub_result = pub_result.transpose().context("publisher")?;

    // Drain: until every expected delivery arrived, nothing arrived for a while, or the cap.
    let per_channel = s.subscribers_per_channel();
    let expected_estimate: u64 =
        pub_result.as_ref().map_or(0, |p| p.ok_per_channel.iter().zip(&per_channel).map(|(n, subs)| n * subs).sum());
    let drain_start = Instant::now();
    let mut last_change = (live.sum(|c| c.delivered.load(Relaxed)), Instant::now());
    let mut last_delivery_at = Instant::now();
    if pub_result.is_some() {
        loop {
            let delivered = live.sum(|c| c.delivered.load(Relaxed));
            if delivered != last_change.0 {
                last_change = (delivered, Instant::now());
                last_delivery_at = Instant::now();
            }
            let quiet = last_change.1.elapsed() >= Duration::from_secs(1).min(cfg.drain);
            if delivered >= expected_estimate
                || quiet
                || drain_start.elapsed() >= cfg.drain
                || interrupted.load(Relaxed)
            {
                break;
            }
            tokio::select! {
                _ = tick.tick() => progress(&cfg, &mut live, "drain", started, Some(&pub_live), &mut last_delivered, cores),
                _ = poll.tick() => {}
            }
        }
    }
    let window = t0.elapsed();
    let cpu1 = CpuTimes::now();
    let spin_idle = live.spin_idle() - spin0;
    live.cpu_tick(cores);
    let stat1 = live.stat_last.clone();
    let others = sys::ProcessCpu::read(&not_others).since(&others0);
    let gateway_cpu = sys::ProcessCpu::of(&cfg.gateway_pids).total_since(&gateway0);
    let active = last_delivery_at.saturating_duration_since(t0).max(Duration::from_millis(1));

    // Stop everything and collect.
    shared.stopping.store(true, Relaxed);
    shared.stop.notify_waiters();
    let worker_count = handles.len();
    while live.done.len() < worker_count {
        match live.rx.recv().await {
            Some(WorkerMsg::Interval(h)) => {
                let _ = live.latency.add(&h);
            }
            Some(WorkerMsg::Done(d)) => {
                let _ = live.latency.add(&d.latency);
                live.done.push(*d);
            }
            None => break,
        }
    }
    for h in handles {
        let _ = h.join();
    }
    let after = scrape_all(&scraper, &cfg.metrics_urls).await;
    if !cfg.host_probe.is_zero() {
        sys::until_idle(&cfg.gateway_pids, Duration::from_secs(3)).await;
    }
    let pauses_after = sys::probe_pauses_async(cfg.host_probe).await;

    let mut report = Report {
        scenario: cfg.name.clone(),
        description: s.description.clone(),
        run_id: run,
        config: ConfigView {
            subscribers: s.subscribers,
            channels: s.channels,
            channels_per_subscriber: s.channels_per_subscriber,
            rate: s.rate,
            duration_s: s.duration.as_secs_f64(),
            payload_bytes: s.payload,
            transport: match s.transport {
                crate::scenario::Transport::Http if cfg.http_batch => {
                    format!("http ({} lanes, batched)", cfg.http_concurrency)
                }
                crate::scenario::Transport::Http => format!("http ({} lanes)", cfg.http_concurrency),
                t => format!("{t:?}").to_lowercase(),
            },
            urls: cfg.urls.clone(),
            threads,
            source_addrs: cfg.source_addrs.iter().map(|a| a.to_string()).collect(),
        },
        ..Default::default()
    };

    let mut connect_latency = sub::new_histogram();
    let mut churn_latency = sub::new_histogram();
    let mut loop_lag = sub::new_histogram();
    let mut conns: Vec<ConnResult> = Vec::with_capacity(s.subscribers);
    let mut churn_errors = BTreeMap::new();
    for d in live.done.drain(..) {
        let _ = connect_latency.add(&d.connect_latency);
        let _ = churn_latency.add(&d.churn_connect_latency);
        let _ = loop_lag.add(&d.loop_lag);
        for (k, v) in d.connect_errors {
            *report.connect.errors.entry(k).or_default() += v;
        }
        for (k, v) in d.churn_errors {
            *churn_errors.entry(k).or_default() += v;
        }
        conns.extend(d.conns);
    }
    if s.churn_rate > 0.0 {
        report.churn = Some(ChurnView { errors: churn_errors, ..Default::default() });
    }

    report.connect.attempted = s.subscribers as u64;
    report.connect.established = established;
    report.connect.failed = conns.iter().filter(|c| c.connect_error.is_some()).count() as u64;
    report.connect.duration_s = connect_duration.as_secs_f64();
    report.connect.per_second = established as f64 / connect_duration.as_secs_f64().max(1e-6);
    report.connect.latency_ms = Percentiles::of_micros(&connect_latency);
    report.connect.nofile_limit = nofile;

    let ok_per_channel = pub_result.as_ref().map_or_else(|| vec![0; s.channels], |p| p.ok_per_channel.clone());
    if let Some(p) = &pub_result {
        report.publish = PublishView {
            scheduled: p.scheduled,
            sent: p.sent,
            failed: p.failed,
            errors: p.errors.clone(),
            achieved_rate: p.sent as f64 / p.elapsed.as_secs_f64().max(1e-6),
            schedule_lag_ms: Percentiles::of_micros(&p.lag),
            clock_lag_ms: Percentiles::of_micros(&p.clock_lag),
            answer_ms: Percentiles::of_micros(&p.answer),
        };
    }

    let d = &mut report.deliveries;
    for c in &conns {
        if !c.ready {
            continue;
        }
        let expected: u64 = c.channels.iter().map(|ch| ok_per_channel[*ch as usize]).sum();
        d.expected += expected;
        d.delivered += c.received;
        if c.received < expected {
            d.lost += expected - c.received;
            d.subscribers_with_loss += 1;
        }
        d.duplicates += c.duplicates;
        d.reordered += c.reordered;
        d.foreign += c.foreign;
        match &c.ended {
            None => {}
            Some(e) => {
                let x = &mut report.disconnects;
                x.total += 1;
                match e {
                    Ended::Close(4008) => x.slow_consumer_4008 += 1,
                    Ended::Close(1001) => x.draining_1001 += 1,
                    Ended::Close(code) => *x.other_close_codes.entry(code.to_string()).or_default() += 1,
                    Ended::Eof => x.eof += 1,
                    Ended::Protocol(_) => x.protocol_errors += 1,
                }
            }
        }
    }
    d.loss_ratio = if d.expected > 0 { d.lost as f64 / d.expected as f64 } else { 0.0 };
    d.per_second = d.delivered as f64 / active.as_secs_f64();
    report.latency_ms = Percentiles::of_micros(&live.latency);
    report.latency_per_second = SecondsView::of(&live.seconds);

    if let Some(churn) = report.churn.as_mut() {
        churn.rate = s.churn_rate;
        churn.hold_s = s.churn_hold.as_secs_f64();
        churn.cycles = live.sum(|c| c.churn_cycles.load(Relaxed));
        churn.failed = live.sum(|c| c.churn_failed.load(Relaxed));
        churn.connect_latency_ms = Percentiles::of_micros(&churn_latency);
    }

    // A spinning worker's empty passes are waiting, not work.
    let cpu_seconds = (cpu1.since(&cpu0) - spin_idle).max(0.0);
    let g = &mut report.generator;
    g.cpu_seconds = cpu_seconds;
    g.spin_idle_seconds = cfg.spin.then_some(spin_idle);
    g.user_seconds = cpu1.user.saturating_sub(cpu0.user).as_secs_f64();
    g.system_seconds = cpu1.system.saturating_sub(cpu0.system).as_secs_f64();
    g.window_s = window.as_secs_f64();
    g.cores = cores;
    g.cpu_percent = cpu_seconds / window.as_secs_f64().max(1e-6) / cores as f64 * 100.0;
    g.busiest_second_percent = live.busiest;
    g.deliveries_per_cpu_second =
        if cpu_seconds > 0.0 { report.deliveries.delivered as f64 / cpu_seconds } else { 0.0 };
    g.max_rss_bytes = cpu1.max_rss;
    if g.cpu_percent >= 95.0 {
        g.saturation_reasons.push(format!("average CPU {:.0}% of {} cores", g.cpu_percent, cores));
    }
    if live.hot_seconds >= 2 {
        g.saturation_reasons.push(format!("{} seconds at >= 95% CPU", live.hot_seconds));
    }
    g.receive_loop_lag_ms = Percentiles::of_micros(&loop_lag);
    if g.receive_loop_lag_ms.p99 >= 10.0 {
        g.saturation_reasons.push(format!(
            "subscriber loop lag p99 {:.1} ms (end-to-end latencies include it)",
            g.receive_loop_lag_ms.p99
        ));
    }
    let lag = &report.publish.schedule_lag_ms;
    if lag.p99 >= 10.0 {
        g.saturation_reasons.push(format!("publish schedule lag p99 {:.1} ms", lag.p99));
    }
    if report.publish.scheduled < total && !interrupted.load(Relaxed) {
        g.saturation_reasons.push(format!("only {} of {} publications scheduled", report.publish.scheduled, total));
    }
    g.saturated = !g.saturation_reasons.is_empty();

    let shares = stat1.since(&stat0);
    if !shares.is_empty() || !pauses_before.is_empty() {
        let mut machine = MachineView::new(shares, Some(live.worst_steal)).with_pauses(pauses_before, pauses_after);
        if cfg.spin {
            machine = machine.with_spinning(&sys::own_cpus());
        }
        report.machine = Some(machine.with_others(others));
    }

    let mut merged = Vec::new();
    let (mut deliveries, mut slow) = (None::<f64>, None::<f64>);
    for (i, url) in cfg.metrics_urls.iter().enumerate() {
        let mut node = NodeView { url: url.clone(), ..Default::default() };
        match (&before[i], &after[i]) {
            (Ok(b), Ok(a)) => {
                let dd = a.deliveries - b.deliveries;
                let ds = a.slow_consumer - b.slow_consumer;
                node.deliveries = Some(dd);
                node.slow_consumer_disconnects = Some(ds);
                *deliveries.get_or_insert(0.0) += dd;
                *slow.get_or_insert(0.0) += ds;
                let delta = metrics::bucket_delta(&b.buckets, &a.buckets);
                node.latency_p50_ms = metrics::quantile(&delta, 0.5).map(|v| v * 1000.0);
                node.latency_p99_ms = metrics::quantile(&delta, 0.99).map(|v| v * 1000.0);
                if delta.is_empty() && !a.quantiles.is_empty() {
                    // A summary has no deltas: its quantiles cover a recent window, not exactly the run.
                    let q =
                        |want: f64| a.quantiles.iter().find(|(q, _)| (*q - want).abs() < 1e-9).map(|(_, v)| v * 1000.0);
                    node.latency_p50_ms = q(0.5);
                    node.latency_p99_ms = q(0.99);
                }
                metrics::bucket_merge(&mut merged, &delta);
            }
            (Err(e), _) | (_, Err(e)) => node.error = Some(e.clone()),
        }
        report.gateway.nodes.push(node);
    }
    report.gateway.deliveries = deliveries;
    report.gateway.slow_consumer_disconnects = slow;
    report.gateway.latency_p50_ms = metrics::quantile(&merged, 0.5).map(|v| v * 1000.0);
    report.gateway.latency_p99_ms = metrics::quantile(&merged, 0.99).map(|v| v * 1000.0);
    if report.gateway.latency_p50_ms.is_none() {
        report.gateway.latency_p50_ms = report.gateway.nodes.iter().filter_map(|n| n.latency_p50_ms).reduce(f64::max);
        report.gateway.latency_p99_ms = report.gateway.nodes.iter().filter_map(|n| n.latency_p99_ms).reduce(f64::max);
    }

    if !cfg.gateway_pids.is_empty() {
        report.gateway.cpu_seconds = Some(gateway_cpu);
        report.gateway.deliveries_per_cpu_second =
            (gateway_cpu > 0.0).then(|| report.deliveries.delivered as f64 / gateway_cpu);
        let per = |delta: u64| if established > 0 { delta as f64 / established as f64 } else { 0.0 };
        report.memory = Some(MemoryView {
            gateway_pids: cfg.gateway_pids.clone(),
            gateway_rss_before_bytes: rss_before,
            gateway_rss_connected_bytes: rss_connected,
            gateway_bytes_per_connection: per(rss_connected.saturating_sub(rss_before)),
            generator_bytes_per_connection: per(self_rss_connected.saturating_sub(self_rss_before)),
        });
    }
    Ok((report, live.latency))
}
