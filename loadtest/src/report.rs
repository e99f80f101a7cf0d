//! The run's report: one serialisable document (written with `--json-out`) and the
//! human-readable table printed at the end.

use std::{collections::BTreeMap, fmt::Write as _};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{
    metrics::NodeView,
    sys::{CpuPauses, CpuShare, ProcessShare},
};

#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct Report {
    pub scenario: String,
    pub description: String,
    pub run_id: String,
    pub config: ConfigView,
    pub connect: ConnectView,
    pub publish: PublishView,
    pub deliveries: DeliveryView,
    /// End-to-end latency: receive time minus the publication's intended send time.
    pub latency_ms: Percentiles,
    /// Each measured second's p99 apart: whether the tail is every second's or a few
    /// seconds' (a stall that recurs shows as the same seconds apart).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_per_second: Option<SecondsView>,
    pub disconnects: DisconnectView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub churn: Option<ChurnView>,
    pub generator: GeneratorView,
    pub gateway: GatewayView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryView>,
    /// The generator's machine, where it can be read (`/proc/stat`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<MachineView>,
}

/// The p99 of each measured second with enough deliveries to have one.
#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub(crate) struct SecondsView {
    pub seconds: usize,
    pub median_p99_ms: f64,
    pub worst_p99_ms: f64,
    /// When the worst second ended, seconds since the generator started.
    pub worst_at_s: f64,
    /// When each second whose p99 was more than twice the median ended.
    pub high_seconds_at_s: Vec<f64>,
}

/// A second needs this many deliveries for its p99 to count: fewer, and one late
/// delivery is the whole percent.
pub(crate) const SECOND_MIN_DELIVERIES: u64 = 100;

impl SecondsView {
    /// From `(ended at s, p99 ms)` per second; None for fewer than three seconds.
    pub(crate) fn of(seconds: &[(f64, f64)]) -> Option<Self> {
        if seconds.len() < 3 {
            return None;
        }
        let mut p99s: Vec<f64> = seconds.iter().map(|s| s.1).collect();
        p99s.sort_by(f64::total_cmp);
        let median = p99s[p99s.len() / 2];
        // The first of equal worsts (`max_by` keeps the last it sees).
        let worst = seconds.iter().copied().rev().max_by(|a, b| a.1.total_cmp(&b.1)).unwrap_or_default();
        Some(Self {
            seconds: seconds.len(),
            median_p99_ms: median,
            worst_p99_ms: worst.1,
            worst_at_s: worst.0,
            high_seconds_at_s: seconds.iter().filter(|s| s.1 > 2.0 * median).map(|s| s.0).collect(),
        })
    }

    fn line(&self) -> String {
        let mut line = format!(
            "median {:.2} ms over {} seconds; worst {:.2} ms (second ending {:.0}s)",
            self.median_p99_ms, self.seconds, self.worst_p99_ms, self.worst_at_s
        );
        if !self.high_seconds_at_s.is_empty() {
            let at: Vec<String> = self.high_seconds_at_s.iter().map(|s| format!("{s:.0}")).collect();
            line.push_str(&format!(
                "; {} above twice the median, ending at {} s",
                self.high_seconds_at_s.len(),
                at.join(", ")
            ));
        }
        line
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct ConfigView {
    pub subscribers: usize,
    pub channels: usize,
    pub channels_per_subscriber: usize,
    pub rate: f64,
    pub duration_s: f64,
    pub payload_bytes: usize,
    pub transport: String,
    pub urls: Vec<String>,
    pub threads: usize,
    pub source_addrs: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct ConnectView {
    pub attempted: u64,
    pub established: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    /// From the first attempt to the last connection subscribed or failed.
    pub duration_s: f64,
    pub per_second: f64,
    /// TCP connect + upgrade + every `subscribed` reply.
    pub latency_ms: Percentiles,
    pub nofile_limit: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct PublishView {
    pub scheduled: u64,
    pub sent: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    pub achieved_rate: f64,
    /// How late publications were handed to the transport relative to their schedule.
    pub schedule_lag_ms: Percentiles,
    /// How late the scheduling clock woke (part of the schedule lag).
    pub clock_lag_ms: Percentiles,
    /// From a publication's hand-off to the transport to its answer (HTTP response,
    /// `published` reply, Redis reply): the publish path, after the schedule lag.
    pub answer_ms: Percentiles,
}

#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct DeliveryView {
    /// Sum over ready subscribers of the publications accepted on their channels.
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub loss_ratio: f64,
    pub subscribers_with_loss: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Messages on our channels that did not carry our fields, or for channels a
    /// connection had not subscribed to.
    pub foreign: u64,
    /// Delivered over the time from the first publication to the last delivery.
    pub per_second: f64,
}

#[derive(Debug, Clone, Serialize, Default, PartialEq)]
pub(crate) struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Percentiles {
    /// From a histogram of microseconds, in milliseconds.
    pub(crate) fn of_micros(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |v: u64| h.highest_equivalent(v) as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct DisconnectView {
    /// Ready subscribers whose connection ended before the run stopped it.
    pub total: u64,
    pub slow_consumer_4008: u64,
    pub draining_1001: u64,
    pub other_close_codes: BTreeMap<String, u64>,
    /// Ended without a Close frame (reset, EOF: a killed node).
    pub eof: u64,
    pub protocol_errors: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct ChurnView {
    pub rate: f64,
    pub hold_s: f64,
    pub cycles: u64,
    pub failed: u64,
    pub errors: BTreeMap<String, u64>,
    pub connect_latency_ms: Percentiles,
}

#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct GeneratorView {
    /// CPU seconds (user + system) over the measured window (publishing and draining,
    /// or holding for an idle run).
    pub cpu_seconds: f64,
    /// With `--spin`: the spinning workers' idle time, already taken off `cpu_seconds`
    /// (user and system time still include it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spin_idle_seconds: Option<f64>,
    pub user_seconds: f64,
    pub system_seconds: f64,
    pub window_s: f64,
    pub cores: usize,
    /// Share of the available cores used over the window.
    pub cpu_percent: f64,
    pub busiest_second_percent: f64,
    pub deliveries_per_cpu_second: f64,
    pub max_rss_bytes: u64,
    /// How late the subscriber workers' 1 ms probe timer woke while publications flowed:
    /// how long a delivery can have waited for the generator to read it.
    pub receive_loop_lag_ms: Percentiles,
    pub saturated: bool,
    pub saturation_reasons: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct GatewayView {
    pub nodes: Vec<NodeView>,
    pub deliveries: Option<f64>,
    pub slow_consumer_disconnects: Option<f64>,
    /// Estimated from the delivery-latency histogram's bucket deltas over the run.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// User and system CPU the `--gateway-pid` processes used over the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// Deliveries the generator received per second of that CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries_per_cpu_second: Option<f64>,
}

/// CPU time the hypervisor gave to other guests while this machine had work: a run that
/// lost some is measuring the host as well as the gateway.
#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct MachineView {
    /// Each CPU's time running this guest's work over the measured window, in percent.
    pub busy_percent: BTreeMap<String, f64>,
    /// Of that, deferred interrupt work (on loopback, the receiving end of every send).
    pub softirq_percent: BTreeMap<String, f64>,
    /// CPUs busy at least [`CPU_SATURATED_PERCENT`] of the window.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub saturated_cpus: Vec<String>,
    /// Each CPU's steal over the measured window, in percent of its time.
    pub steal_percent: BTreeMap<String, f64>,
    /// The most any CPU lost in one second of the window (where seconds were sampled).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worst_second_steal_percent: Option<f64>,
    /// What a thread spinning on each CPU saw just before the run and just after it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pauses_before: Vec<CpuPauses>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pauses_after: Vec<CpuPauses>,
    /// The processes other than the generator and the gateway nodes named to it that used
    /// CPU over the window, busiest first (Redis under `run-local.sh`, kernel threads).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub other_processes: Vec<ProcessShare>,
    /// Some CPU lost at least [`STEAL_DISTURBED_PERCENT`] of the window, or at least
    /// [`STEAL_DISTURBED_SECOND_PERCENT`] of one second, or a probe lost at least
    /// [`PAUSE_DISTURBED_PERCENT`] to the host or to other threads.
    pub disturbed: bool,
    /// The generator's CPUs, when its workers spin (`--spin`): busy all the time, so left
    /// out of `saturated_cpus`; the generator's own rows tell its load.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub spinning_cpus: Vec<String>,
}

/// Steal past this share of the window is reported as a disturbed run: a delivery that
/// was due while its CPU was taken away waits for it, so once about 1 % of the time is
/// gone, about 1 % of the deliveries waited, and the p99 is the host's pauses.
pub(crate) const STEAL_DISTURBED_PERCENT: f64 = 1.0;

/// So is a second that lost this much (50 ms): a core with no time to spare cannot make
/// it up, so everything queued on it waits that long at once, which is a whole 50 ms p99
/// budget, however quiet the rest of the run was.
pub(crate) const STEAL_DISTURBED_SECOND_PERCENT: f64 = 5.0;

/// A CPU busy this much of the window had no time to spare: work that arrived while it
/// was busy waited, so the latencies are partly a queue.
pub(crate) const CPU_SATURATED_PERCENT: f64 = 95.0;

/// A spinning probe that lost this share of its time, to the host or to other threads,
/// saw the CPU gone about as often as the steal mark says: read as [`STEAL_DISTURBED_PERCENT`].
pub(crate) const PAUSE_DISTURBED_PERCENT: f64 = 1.0;

/// One kind of time a probe lost, in percent of the probe.
type PauseShare = fn(&CpuPauses) -> f64;

/// Each kind of lost time that marks a run at [`PAUSE_DISTURBED_PERCENT`]: its warning
/// row, and why the row matters. The flag and the rows read the same list.
const PAUSE_MARKS: [(&str, PauseShare, &str); 2] = [
    (
        "HOST PAUSES",
        |p| p.host.lost_percent,
        "without being switched out: the host took the CPU; the p99 may measure the host, not the gateway",
    ),
    (
        "OTHER THREADS",
        |p| p.other_threads.lost_percent,
        "to other threads of this machine (see other processes); whatever runs there loses at least as much",
    ),
];

/// All a probe lost, either way.
fn lost(p: &CpuPauses) -> f64 {
    p.host.lost_percent + p.other_threads.lost_percent
}

impl MachineView {
    pub(crate) fn new(window: Vec<CpuShare>, worst_second: Option<f64>) -> Self {
        let disturbed = window.iter().any(|c| c.steal >= STEAL_DISTURBED_PERCENT)
            || worst_second.is_some_and(|pct| pct >= STEAL_DISTURBED_SECOND_PERCENT);
        Self {
            busy_percent: window.iter().map(|c| (c.cpu.clone(), c.busy)).collect(),
            softirq_percent: window.iter().map(|c| (c.cpu.clone(), c.softirq)).collect(),
            saturated_cpus: window.iter().filter(|c| c.busy >= CPU_SATURATED_PERCENT).map(|c| c.cpu.clone()).collect(),
            steal_percent: window.into_iter().map(|c| (c.cpu, c.steal)).collect(),
            worst_second_steal_percent: worst_second,
            disturbed,
            ..Default::default()
        }
    }

    /// Adds what the spinning probes saw before and after the run.
    pub(crate) fn with_pauses(mut self, before: Vec<CpuPauses>, after: Vec<CpuPauses>) -> Self {
        self.pauses_before = before;
        self.pauses_after = after;
        self.disturbed |= PAUSE_MARKS.iter().any(|(_, share, _)| self.pause_past_mark(*share).is_some());
        self
    }

    /// Marks the CPUs the generator spins on (`--spin`): their busy share is its waiting.
    pub(crate) fn with_spinning(mut self, cpus: &[usize]) -> Self {
        let spinning = |cpu: &String| crate::sys::cpu_among(cpu, cpus);
        // A generator free to run anywhere spins wherever it is: then no CPU is only its.
        if self.busy_percent.keys().all(spinning) {
            return self;
        }
        self.spinning_cpus = self.busy_percent.keys().filter(|c| spinning(c)).cloned().collect();
        self.saturated_cpus.retain(|c| !spinning(c));
        self
    }

    /// Adds the other processes' CPU over the window (the busiest few are kept).
    pub(crate) fn with_others(mut self, mut others: Vec<ProcessShare>) -> Self {
        others.truncate(8);
        self.other_processes = others;
        self
    }

    /// The probe and CPU with the most `share`, when that reached [`PAUSE_DISTURBED_PERCENT`].
    fn pause_past_mark(&self, share: PauseShare) -> Option<(&'static str, &CpuPauses)> {
        self.worst_pause(share).filter(|(_, p)| share(p) >= PAUSE_DISTURBED_PERCENT)
    }

    /// The probe and CPU with the most `of`.
    fn worst_pause(&self, of: impl Fn(&CpuPauses) -> f64) -> Option<(&'static str, &CpuPauses)> {
        let before = self.pauses_before.iter().map(|p| ("before", p));
        let after = self.pauses_after.iter().map(|p| ("after", p));
        before.chain(after).max_by(|a, b| of(a.1).total_cmp(&of(b.1)))
    }

    /// The table's rows for it: each CPU's steal, and a warning when the run was disturbed.
    pub(crate) fn rows(&self) -> String {
        let mut t = String::new();
        self.busy_rows(&mut t);
        self.steal_rows(&mut t);
        self.pause_rows(&mut t);
        self.others_row(&mut t);
        t
    }

    fn busy_rows(&self, t: &mut String) {
        if self.busy_percent.is_empty() {
            return;
        }
        let one = |cpu: &str, busy: f64| {
            let softirq = self.softirq_percent.get(cpu).copied().unwrap_or(0.0);
            format!("{cpu} {busy:.0}% (softirq {softirq:.0}%)")
        };
        // Every CPU while they fit on a line, else the busiest and the mean.
        let line = if self.busy_percent.len() <= 4 {
            self.busy_percent.iter().map(|(cpu, busy)| one(cpu, *busy)).collect::<Vec<_>>().join(", ")
        } else {
            let mean = self.busy_percent.values().sum::<f64>() / self.busy_percent.len() as f64;
            let busiest = self.busy_percent.iter().max_by(|a, b| a.1.total_cmp(b.1));
            let busiest = busiest.map(|(cpu, busy)| one(cpu, *busy)).unwrap_or_default();
            format!("{busiest} at most, {mean:.0}% on average over {} cpus", self.busy_percent.len())
        };
        let spinning = if self.spinning_cpus.is_empty() {
            String::new()
        } else {
            format!("; the generator spins on {} (see generator cpu)", self.spinning_cpus.join(", "))
        };
        row(t, "machine cpu busy", format!("{line} of the window{spinning}"));
        if !self.saturated_cpus.is_empty() {
            let generator = crate::sys::own_cpus();
            let named: Vec<String> = self
                .saturated_cpus
                .iter()
                .map(|cpu| {
                    if crate::sys::cpu_among(cpu, &generator) {
                        format!("{cpu} (the generator's)")
                    } else {
                        cpu.clone()
                    }
                })
                .collect();
            row(
                t,
                "CPU SATURATED",
                format!(
                    "{} busy at least {CPU_SATURATED_PERCENT:.0}% of the window: whatever runs there had no time to spare, and its latencies include waiting for the CPU",
                    named.join(", ")
                ),
            );
        }
    }

    fn steal_rows(&self, t: &mut String) {
        let Some((cpu, pct)) = self.worst() else { return };
        // Every CPU while they fit on a line, else the worst and the mean.
        let mut over = if self.steal_percent.len() <= 8 {
            self.steal_percent.iter().map(|(n, p)| format!("{n} {p:.1}%")).collect::<Vec<_>>().join(", ")
        } else {
            let mean = self.steal_percent.values().sum::<f64>() / self.steal_percent.len() as f64;
            format!("{cpu} {pct:.1}% at most, {mean:.1}% on average over {} cpus", self.steal_percent.len())
        };
        over.push_str(" of the window");
        if let Some(worst) = self.worst_second_steal_percent {
            let _ = write!(over, " (worst second {worst:.1}%)");
        }
        row(t, "machine steal", over);
        let second = self.worst_second_steal_percent.filter(|w| *w >= STEAL_DISTURBED_SECOND_PERCENT);
        if pct >= STEAL_DISTURBED_PERCENT || second.is_some() {
            let mut why = Vec::new();
            if pct >= STEAL_DISTURBED_PERCENT {
                why.push(format!(
                    "{cpu} lost {pct:.1}% of the window to other guests, and about that share of deliveries waited for it"
                ));
            }
            if let Some(worst) = second {
                why.push(format!(
                    "one second lost {worst:.1}% ({:.0} ms) at once, and a busy core makes everything queued wait that long",
                    worst * 10.0
                ));
            }
            row(t, "HYPERVISOR STEAL", format!("{}; the p99 may measure the host, not the gateway", why.join("; ")));
        }
    }

    fn pause_rows(&self, t: &mut String) {
        if self.pauses_before.is_empty() && self.pauses_after.is_empty() {
            return;
        }
        let line = |probe: &[CpuPauses]| {
            let one = |p: &CpuPauses| {
                format!(
                    "{} {:.2}% host + {:.2}% other threads (longest {:.1} ms)",
                    p.cpu,
                    p.host.lost_percent,
                    p.other_threads.lost_percent,
                    p.host.longest_ms.max(p.other_threads.longest_ms)
                )
            };
            // Every CPU while they fit on a line, else the one that lost most.
            if probe.len() <= 4 {
                probe.iter().map(one).collect::<Vec<_>>().join(", ")
            } else {
                probe.iter().max_by(|a, b| lost(a).total_cmp(&lost(b))).map(one).unwrap_or_default()
            }
        };
        row(t, "cpu pauses before", line(&self.pauses_before));
        row(t, "cpu pauses after", line(&self.pauses_after));
        for (label, share, why) in PAUSE_MARKS {
            if let Some((when, p)) = self.pause_past_mark(share) {
                let what = format!(
                    "a thread spinning at top priority on {} {when} the run lost {:.1}% of its time {why}",
                    p.cpu,
                    share(p)
                );
                row(t, label, what);
            }
        }
    }

    fn others_row(&self, t: &mut String) {
        if self.other_processes.is_empty() {
            return;
        }
        let top: Vec<String> =
            self.other_processes.iter().take(4).map(|p| format!("{} {:.2} s", p.name, p.cpu_seconds)).collect();
        row(t, "other processes", format!("{} of CPU over the window", top.join(", ")));
    }

    /// The CPU that lost most, and how much.
    fn worst(&self) -> Option<(&str, f64)> {
        self.steal_percent.iter().map(|(n, p)| (n.as_str(), *p)).max_by(|a, b| a.1.total_cmp(&b.1))
    }
}

#[derive(Debug, Clone, Serialize, Default)]
pub(crate) struct MemoryView {
    pub gateway_pids: Vec<u32>,
    pub gateway_rss_before_bytes: u64,
    pub gateway_rss_connected_bytes: u64,
    pub gateway_bytes_per_connection: f64,
    pub generator_bytes_per_connection: f64,
}

fn count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One line of the table: the label in a column of its own, then the value.
fn row(t: &mut String, k: &str, v: String) {
    let _ = writeln!(t, "  {k:<24} {v}");
}

fn opt_ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.3} ms"))
}

fn pct_line(p: &Percentiles) -> String {
    if p.count == 0 {
        return "-".to_owned();
    }
    format!("p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3} ms", p.p50, p.p90, p.p99, p.p999, p.max)
}

fn map_line(m: &BTreeMap<String, u64>) -> String {
    m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

impl Report {
    /// The table printed at the end of a run.
    pub(crate) fn table(&self) -> String {
        let mut t = String::new();
        let c = &self.config;
        let _ = writeln!(t, "\nfanout-loadtest: {} ({})", self.scenario, self.description);
        row(
            &mut t,
            "layout",
            format!(
                "{} subscribers, {} channels, {} per subscriber, {} pub/s for {:.0}s, {} B payload, via {}",
                count(c.subscribers as u64),
                c.channels,
                c.channels_per_subscriber,
                c.rate,
                c.duration_s,
                c.payload_bytes,
                c.transport
            ),
        );
        let k = &self.connect;
        row(
            &mut t,
            "connections",
            format!(
                "{} of {} in {:.2}s ({:.0}/s), {} failed",
                count(k.established),
                count(k.attempted),
                k.duration_s,
                k.per_second,
                k.failed
            ),
        );
        if !k.errors.is_empty() {
            row(&mut t, "connect errors", map_line(&k.errors));
        }
        if k.errors.contains_key("too_many_open_files") {
            row(&mut t, "  hint", format!("the generator ran out of file descriptors (limit {}): raise `ulimit -Hn` or split the run over several generators", k.nofile_limit));
        }
        if k.errors.contains_key("http_429") {
            row(&mut t, "  hint", "429: the gateway's per-address connection rate limit; lift it on the nodes (--max-connections-per-ip-per-second 0), lower --connect-rate or spread --source-addrs".into());
        }
        row(&mut t, "connect latency", pct_line(&k.latency_ms));
        let p = &self.publish;
        row(
            &mut t,
            "published",
            format!(
                "{} of {} scheduled ({:.1}/s), {} failed",
                count(p.sent),
                count(p.scheduled),
                p.achieved_rate,
                p.failed
            ),
        );
        if !p.errors.is_empty() {
            row(&mut t, "publish errors", map_line(&p.errors));
        }
        if p.errors.contains_key("error_rate_limited") {
            row(&mut t, "  hint", "rate_limited: one connection's command rate limit; lift it on the nodes (--command-rate 0) or add --ws-publishers".into());
        }
        row(&mut t, "schedule lag", pct_line(&p.schedule_lag_ms));
        row(&mut t, "  of which clock", pct_line(&p.clock_lag_ms));
        row(&mut t, "publish answered after", pct_line(&p.answer_ms));
        let d = &self.deliveries;
        row(
            &mut t,
            "deliveries",
            format!("{} of {} expected, {:.0}/s", count(d.delivered), count(d.expected), d.per_second),
        );
        row(
            &mut t,
            "lost",
            format!(
                "{} ({:.4}%) on {} subscribers; {} duplicates, {} reordered, {} foreign",
                count(d.lost),
                d.loss_ratio * 100.0,
                d.subscribers_with_loss,
                d.duplicates,
                d.reordered,
                d.foreign
            ),
        );
        row(&mut t, "latency (end to end)", pct_line(&self.latency_ms));
        if let Some(per) = &self.latency_per_second {
            row(&mut t, "  p99 per second", per.line());
        }
        let x = &self.disconnects;
        let mut disc = format!(
            "{} (4008 slow consumer {}, 1001 draining {}, eof {}",
            x.total, x.slow_consumer_4008, x.draining_1001, x.eof
        );
        if !x.other_close_codes.is_empty() {
            let _ = write!(disc, ", {}", map_line(&x.other_close_codes));
        }
        disc.push(')');
        row(&mut t, "disconnects", disc);
        if let Some(ch) = &self.churn {
            row(
                &mut t,
                "churn",
                format!(
                    "{} cycles at {}/s held {:.1}s, {} failed {}",
                    ch.cycles,
                    ch.rate,
                    ch.hold_s,
                    ch.failed,
                    map_line(&ch.errors)
                ),
            );
            row(&mut t, "churn connect latency", pct_line(&ch.connect_latency_ms));
        }
        let g = &self.generator;
        row(
            &mut t,
            "generator cpu",
            format!(
                "{:.2}s over {:.1}s on {} cores = {:.0}% (busiest second {:.0}%), {:.0} deliveries per cpu-second",
                g.cpu_seconds,
                g.window_s,
                g.cores,
                g.cpu_percent,
                g.busiest_second_percent,
                g.deliveries_per_cpu_second
            ) + &g.spin_idle_seconds.map(|s| format!(" (spinning while idle: {s:.2}s taken off)")).unwrap_or_default(),
        );
        row(&mut t, "generator loop lag", pct_line(&g.receive_loop_lag_ms));
        if g.saturated {
            let mut why = g.saturation_reasons.join("; ");
            // Lag that the host's steal explains is not the generator's doing.
            if self.machine.as_ref().is_some_and(|m| m.disturbed) {
                why.push_str(" (the host also took CPU time: see the machine rows, which may give the cause)");
            }
            row(&mut t, "GENERATOR SATURATED", why);
        }
        let gw = &self.gateway;
        if !gw.nodes.is_empty() {
            row(
                &mut t,
                "gateway deliveries",
                format!(
                    "{} (slow-consumer disconnects {})",
                    gw.deliveries.map_or("-".into(), |v| count(v as u64)),
                    gw.slow_consumer_disconnects.map_or("-".into(), |v| count(v as u64))
                ),
            );
            row(
                &mut t,
                "gateway latency",
                format!("p50 {}  p99 {}", opt_ms(gw.latency_p50_ms), opt_ms(gw.latency_p99_ms)),
            );
            // Per node too: the nodes of one cluster need not be alike (the one that takes the
            // publishes, or shares its core with Redis, can run later than the rest).
            if gw.nodes.len() > 1 {
                for (i, n) in gw.nodes.iter().enumerate().filter(|(_, n)| n.latency_p99_ms.is_some()) {
                    row(
                        &mut t,
                        &format!("  node {}", i + 1),
                        format!("p50 {}  p99 {}  ({})", opt_ms(n.latency_p50_ms), opt_ms(n.latency_p99_ms), n.url),
                    );
                }
            }
            for n in gw.nodes.iter().filter(|n| n.error.is_some()) {
                row(&mut t, "  scrape failed", format!("{}: {}", n.url, n.error.as_deref().unwrap_or_default()));
            }
        }
        if let Some(cpu) = gw.cpu_seconds {
            let window = self.generator.window_s.max(1e-6);
            let per = gw
                .deliveries_per_cpu_second
                .map_or(String::new(), |d| format!(", {} deliveries per cpu-second", count(d as u64)));
            row(
                &mut t,
                "gateway cpu",
                format!("{cpu:.2}s over {window:.1}s = {:.0}% of one core{per}", cpu / window * 100.0),
            );
        }
        if let Some(m) = &self.machine {
            t.push_str(&m.rows());
        }
        if let Some(m) = &self.memory {
            row(
                &mut t,
                "gateway memory",
                format!(
                    "RSS {:.1} MiB -> {:.1} MiB, {:.0} bytes per connection (generator: {:.0})",
                    m.gateway_rss_before_bytes as f64 / 1048576.0,
                    m.gateway_rss_connected_bytes as f64 / 1048576.0,
                    m.gateway_bytes_per_connection,
                    m.generator_bytes_per_connection
                ),
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::Pauses;

    /// Half-busy CPUs that lost `steal` each.
    fn stolen(cpus: &[(&str, f64)]) -> Vec<CpuShare> {
        cpus.iter().map(|&(cpu, steal)| CpuShare { cpu: cpu.into(), busy: 50.0, softirq: 5.0, steal }).collect()
    }

    #[test]
    fn seconds_whose_p99_is_more_than_twice_the_median_are_named() {
        assert_eq!(SecondsView::of(&[(1.0, 0.5), (2.0, 9.0)]), None, "two seconds tell nothing");
        let seconds: Vec<(f64, f64)> =
            (4..=13).map(|s| (s as f64, if s % 3 == 2 { 4.0 } else { 0.5 + s as f64 / 100.0 })).collect();
        let v = SecondsView::of(&seconds).unwrap_or_default();
        assert_eq!(v.seconds, 10);
        assert_eq!(v.high_seconds_at_s, [5.0, 8.0, 11.0]);
        assert_eq!((v.worst_p99_ms, v.worst_at_s), (4.0, 5.0));
        assert!((v.median_p99_ms - 0.62).abs() < 1e-9, "the upper median of ten: {v:?}");
        assert_eq!(
            v.line(),
            "median 0.62 ms over 10 seconds; worst 4.00 ms (second ending 5s); 3 above twice the median, ending at 5, 8, 11 s"
        );
        let steady = SecondsView::of(&[(1.0, 1.0), (2.0, 1.1), (3.0, 0.9)]).unwrap_or_default();
        assert!(steady.high_seconds_at_s.is_empty() && !steady.line().contains("above"), "{steady:?}");
    }

    #[test]
    fn a_spinning_generator_s_cpu_is_not_called_saturated() {
        let both = vec![
            CpuShare { cpu: "cpu0".into(), busy: 99.0, softirq: 35.0, steal: 0.0 },
            CpuShare { cpu: "cpu1".into(), busy: 100.0, softirq: 12.0, steal: 0.0 },
        ];
        let m = MachineView::new(both.clone(), None).with_spinning(&[1]);
        assert_eq!(m.saturated_cpus, ["cpu0"], "the gateway's CPU is still full");
        assert_eq!(m.spinning_cpus, ["cpu1"]);
        let t = m.rows();
        assert!(t.contains("of the window; the generator spins on cpu1 (see generator cpu)"), "{t}");
        assert!(t.contains("CPU SATURATED            cpu0") && !t.contains("cpu1 (the"), "{t}");
        // Free to run on every CPU, it marks none: each may be the gateway's too.
        let m = MachineView::new(both, None).with_spinning(&[0, 1]);
        assert_eq!(m.saturated_cpus, ["cpu0", "cpu1"]);
        assert!(m.spinning_cpus.is_empty());
    }

    #[test]
    fn busy_cpus_and_a_saturated_one() {
        let idle = MachineView::new(stolen(&[("cpu0", 0.0), ("cpu1", 0.0)]), None);
        assert!(idle.saturated_cpus.is_empty() && !idle.disturbed);
        let t = idle.rows();
        assert!(
            t.contains("machine cpu busy         cpu0 50% (softirq 5%), cpu1 50% (softirq 5%) of the window"),
            "{t}"
        );
        assert!(!t.contains("CPU SATURATED"), "{t}");
        let full = vec![
            CpuShare { cpu: "cpu0".into(), busy: 99.5, softirq: 35.0, steal: 0.5 },
            CpuShare { cpu: "cpu1".into(), busy: 60.0, softirq: 2.0, steal: 0.0 },
        ];
        let m = MachineView::new(full, None);
        assert_eq!(m.saturated_cpus, ["cpu0"]);
        assert!(!m.disturbed, "a busy CPU is not the host's doing");
        let t = m.rows();
        assert!(t.contains("cpu0 100% (softirq 35%), cpu1 60% (softirq 2%)"), "{t}");
        assert!(t.contains("CPU SATURATED            cpu0") && t.contains("busy at least 95% of the window"), "{t}");
        let json = serde_json::to_value(&m).unwrap_or_default();
        assert_eq!(json["busy_percent"]["cpu0"], 99.5, "{json}");
        assert_eq!(json["softirq_percent"]["cpu1"], 2.0, "{json}");
        let many: Vec<CpuShare> = (0..8)
            .map(|i| CpuShare { cpu: format!("cpu{i}"), busy: i as f64 * 10.0, softirq: 1.0, steal: 0.0 })
            .collect();
        let t = MachineView::new(many, None).rows();
        assert!(t.contains("cpu7 70% (softirq 1%) at most, 35% on average over 8 cpus of the window"), "{t}");
    }

    #[test]
    fn percentiles_are_ordered_and_in_ms() {
        let mut h = crate::sub::new_histogram();
        for v in [1000u64, 2000, 3000, 100_000] {
            h.record(v).unwrap();
        }
        let p = Percentiles::of_micros(&h);
        assert_eq!(p.count, 4);
        assert!(p.p50 >= 1.0 && p.p50 <= p.p99 && p.p99 <= p.max);
        assert!((p.max - 100.0).abs() < 0.1);
        assert_eq!(Percentiles::of_micros(&crate::sub::new_histogram()), Percentiles::default());
    }

    #[test]
    fn table_mentions_the_essentials() {
        let mut r = Report { scenario: "broadcast".into(), ..Default::default() };
        r.deliveries.delivered = 1_234_567;
        r.generator.saturated = true;
        r.generator.saturation_reasons = vec!["cpu".into()];
        let t = r.table();
        assert!(t.contains("1,234,567") && t.contains("GENERATOR SATURATED") && t.contains("broadcast"));
        assert!(!t.contains("node 1"), "no per-node rows without nodes");
        assert!(t.contains("publish answered after   -"), "{t}");
        let node = |url: &str, p99: f64| NodeView {
            url: url.into(),
            latency_p50_ms: Some(1.0),
            latency_p99_ms: Some(p99),
            ..Default::default()
        };
        r.gateway.nodes = vec![node("http://a/metrics", 2.5)];
        assert!(!r.table().contains("node 1"), "one node: the gateway row is that node");
        r.gateway.nodes.push(node("http://b/metrics", 7.25));
        let t = r.table();
        assert!(t.contains("node 1") && t.contains("p99 2.500 ms  (http://a/metrics)"), "{t}");
        assert!(t.contains("node 2") && t.contains("p99 7.250 ms  (http://b/metrics)"), "{t}");
        assert!(!t.contains("gateway cpu"), "no pids, no row: {t}");
        r.generator.window_s = 20.0;
        r.gateway.cpu_seconds = Some(6.5);
        r.gateway.deliveries_per_cpu_second = Some(61_538.4);
        let t = r.table();
        assert!(
            t.contains("gateway cpu              6.50s over 20.0s = 32% of one core, 61,538 deliveries per cpu-second"),
            "{t}"
        );
        r.gateway.cpu_seconds = None;
        assert!(!t.contains("machine steal"), "no row where the machine was not read");
        assert!(!t.contains("the host also took"), "{t}");
        r.machine = Some(MachineView::new(stolen(&[("cpu0", 0.25), ("cpu1", 0.5)]), Some(3.0)));
        let t = r.table();
        assert!(
            t.contains("machine steal") && t.contains("cpu0 0.2%, cpu1 0.5% of the window (worst second 3.0%)"),
            "{t}"
        );
        assert!(!t.contains("HYPERVISOR STEAL"), "{t}");
        r.machine = Some(MachineView::new(stolen(&[("cpu0", 0.25), ("cpu1", 1.5)]), Some(4.0)));
        let t = r.table();
        assert!(t.contains("HYPERVISOR STEAL") && t.contains("cpu1 lost 1.5% of the window"), "{t}");
        assert!(!t.contains("one second"), "{t}");
        r.machine = Some(MachineView::new(stolen(&[("cpu0", 0.25), ("cpu1", 0.5)]), Some(7.5)));
        let t = r.table();
        assert!(t.contains("HYPERVISOR STEAL") && t.contains("one second lost 7.5% (75 ms) at once"), "{t}");
        assert!(!t.contains("of the window to other guests"), "{t}");
        assert!(t.contains("GENERATOR SATURATED      cpu (the host also took CPU time"), "{t}");
        let many = (0..16)
            .map(|i| CpuShare {
                cpu: format!("cpu{i}"),
                busy: 50.0,
                softirq: 5.0,
                steal: if i == 7 { 4.0 } else { 0.0 },
            })
            .collect();
        let t = {
            r.machine = Some(MachineView::new(many, None));
            r.table()
        };
        assert!(t.contains("cpu7 4.0% at most, 0.2% on average over 16 cpus of the window\n"), "{t}");
        assert!(!t.contains("host pauses"), "no probe, no row: {t}");

        // The spinning probes: their rows, and a warning when one lost a share past the mark.
        let pause = |cpu: &str, host: f64, other: f64| {
            let kind = |lost_percent: f64| Pauses {
                lost_percent,
                over_1ms: (lost_percent * 10.0) as u64,
                longest_ms: lost_percent * 5.0,
            };
            CpuPauses { cpu: cpu.into(), host: kind(host), other_threads: kind(other) }
        };
        let quiet = MachineView::new(stolen(&[("cpu0", 0.1)]), Some(0.5)).with_pauses(
            vec![pause("cpu0", 0.05, 0.5), pause("cpu1", 0.0, 0.0)],
            vec![pause("cpu0", 0.5, 0.25), pause("cpu1", 0.25, 0.0)],
        );
        assert!(!quiet.disturbed);
        r.machine = Some(quiet);
        let t = r.table();
        assert!(
            t.contains(
                "cpu pauses before        cpu0 0.05% host + 0.50% other threads (longest 2.5 ms), cpu1 0.00% host"
            ),
            "{t}"
        );
        assert!(t.contains("cpu pauses after         cpu0 0.50% host + 0.25% other threads (longest 2.5 ms)"), "{t}");
        assert!(!t.contains("HOST PAUSES") && !t.contains("OTHER THREADS") && !t.contains("the host also took"), "{t}");
        assert!(!t.contains("other processes"), "none given: {t}");
        let paused = MachineView::new(stolen(&[("cpu0", 0.1)]), Some(0.5))
            .with_pauses(vec![pause("cpu0", 0.05, 0.0)], vec![pause("cpu0", 1.25, 0.0)]);
        assert!(paused.disturbed, "steal says quiet, the probe does not");
        r.machine = Some(paused);
        let t = r.table();
        assert!(
            t.contains("HOST PAUSES")
                && t.contains("on cpu0 after the run lost 1.2% of its time without being switched out"),
            "{t}"
        );
        assert!(!t.contains("HYPERVISOR STEAL") && !t.contains("OTHER THREADS"), "each below its own mark: {t}");
        assert!(t.contains("the host also took CPU time"), "{t}");
        let json = serde_json::to_value(r.machine.as_ref().map(|m| m.pauses_after.clone())).unwrap_or_default();
        assert_eq!(json[0]["host"]["lost_percent"], 1.25, "{json}");
        let crowded = MachineView::new(stolen(&[("cpu0", 0.1)]), Some(0.5))
            .with_pauses(vec![pause("cpu1", 0.1, 1.5)], vec![pause("cpu1", 0.1, 0.2)])
            .with_others(vec![
                ProcessShare { pid: 78, name: "kdamond.0".into(), cpu_seconds: 0.31 },
                ProcessShare { pid: 900, name: "redis-server".into(), cpu_seconds: 0.7 },
            ]);
        assert!(crowded.disturbed, "other threads took the CPU");
        // The probe that lost most in all is not the one past a mark: the flag still sees it.
        let split = MachineView::new(stolen(&[("cpu0", 0.1)]), Some(0.5))
            .with_pauses(vec![pause("cpu0", 1.2, 0.0)], vec![pause("cpu0", 0.4, 0.9)]);
        assert!(split.disturbed, "cpu0 before the run lost 1.2% to the host");
        assert!(split.rows().contains("HOST PAUSES"), "{}", split.rows());
        let t = crowded.rows();
        assert!(t.contains("OTHER THREADS") && t.contains("top priority on cpu1 before the run lost 1.5%"), "{t}");
        assert!(!t.contains("HOST PAUSES"), "{t}");
        assert!(
            t.contains("other processes          kdamond.0 0.31 s, redis-server 0.70 s of CPU over the window"),
            "{t}"
        );
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
    }
}
