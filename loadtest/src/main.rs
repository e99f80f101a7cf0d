//! `fanout-loadtest`: the command line of the load generator (issue 4). Answers "how many
//! connections and deliveries per second does this cluster hold, at what latency".

mod metrics;
mod plot;
mod publish;
mod recovery;
mod report;
mod run;
mod scan;
mod scenario;
mod storm;
mod sub;
mod sys;
mod ws;

use std::{net::IpAddr, path::PathBuf, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::scenario::Transport;

#[derive(Parser)]
#[command(
    name = "fanout-loadtest",
    version,
    about = "Load generator for fanout clusters: connections, deliveries/s, end-to-end latency"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a scenario (a built-in name, or a path to a .toml file).
    Run(Box<RunArgs>),
    /// Lists the built-in scenarios.
    List,
    /// Prints a scenario with the given overrides applied, as TOML.
    Show {
        scenario: String,
        #[command(flatten)]
        overrides: Box<Overrides>,
        #[arg(long)]
        scenario_dir: Option<PathBuf>,
    },
}

/// Scenario values a flag may override.
#[derive(Args, Clone, Default)]
struct Overrides {
    /// Subscriber connections.
    #[arg(long, short = 'n')]
    subscribers: Option<usize>,
    /// Channels publications rotate over.
    #[arg(long, short = 'c')]
    channels: Option<usize>,
    /// Channels each subscriber is on.
    #[arg(long, short = 'k')]
    channels_per_subscriber: Option<usize>,
    /// Publications per second, over all channels (0: hold idle).
    #[arg(long, short = 'r')]
    rate: Option<f64>,
    /// How long to publish (or hold), e.g. 30s, 2m.
    #[arg(long, short = 'd', value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Size of each publication's data in bytes.
    #[arg(long)]
    payload: Option<usize>,
    #[arg(long, value_enum)]
    transport: Option<Transport>,
    /// Churn clients started per second.
    #[arg(long)]
    churn_rate: Option<f64>,
    /// How long each churn client stays.
    #[arg(long, value_parser = humantime::parse_duration)]
    churn_hold: Option<Duration>,
    /// Recovery scenario: how often each subscriber leaves.
    #[arg(long, value_parser = humantime::parse_duration)]
    recover_every: Option<Duration>,
    /// Recovery scenario: how long a subscriber stays away.
    #[arg(long, value_parser = humantime::parse_duration)]
    recover_away: Option<Duration>,
}

#[derive(Args)]
struct RunArgs {
    /// Built-in scenario name (see `list`) or path to a scenario .toml file.
    scenario: String,
    #[command(flatten)]
    overrides: Overrides,
    /// Read NAME.toml from this directory before falling back to the built-in scenarios.
    #[arg(long)]
    scenario_dir: Option<PathBuf>,
    /// Gateway WebSocket URL(s); subscribers are spread round-robin. Repeatable or comma-separated.
    #[arg(long = "url", short = 'u', value_delimiter = ',', env = "FANOUT_LOADTEST_URLS")]
    urls: Vec<String>,
    /// A node's internal listener for --transport http, e.g. http://127.0.0.1:9090.
    #[arg(long)]
    http_url: Option<String>,
    /// API key for the HTTP transport.
    #[arg(long, env = "FANOUT_API_KEY")]
    api_key: Option<String>,
    /// Redis for --transport redis.
    #[arg(long)]
    redis_url: Option<String>,
    /// Redis channel prefix the gateway uses.
    #[arg(long, default_value = fanout_publisher::DEFAULT_REDIS_PREFIX)]
    redis_prefix: String,
    /// Worker threads for subscribers (0: one per available core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// New connections per second (0: as fast as possible).
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Limit for connecting, upgrading and subscribing one connection.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Local addresses to bind before connecting (round-robin), to go past ~28k
    /// connections per source address: 127.0.0.1,127.0.0.2,…
    #[arg(long, value_delimiter = ',')]
    source_addrs: Vec<IpAddr>,
    /// Pause between the last subscription and the first publication, so every node's
    /// Redis subscriptions are in place.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Longest wait for outstanding deliveries after the last publication.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// WebSocket publisher connections (each channel always uses the same one).
    #[arg(long, default_value_t = 1)]
    ws_publishers: usize,
    /// Concurrent HTTP publish requests (each channel always uses the same lane).
    #[arg(long, default_value_t = 32)]
    http_concurrency: usize,
    /// HTTP transport: each lane sends everything that queued up behind its request in
    /// flight as one POST /api/publish_batch (up to 1,000 publications).
    #[arg(long)]
    http_batch: bool,
    /// The publishing clock wakes at most once per window and sends everything due by then
    /// together (0: wake for every publication). Lag up to the window shows in the schedule
    /// lag and, since latency counts from the intended time, in the latency figures.
    #[arg(long, default_value = "250us", value_parser = humantime::parse_duration)]
    batch_window: Duration,
    /// Before the run and after it, spin a thread on each of this machine's CPUs this long
    /// and report the time it lost to the host and to other threads (0s: skip).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    host_probe: Duration,
    /// The subscriber workers spin while they wait for data instead of sleeping, so a
    /// gateway on the same machine does not pay for waking them (an interrupt to another
    /// CPU per write that finds its reader asleep). Their idle spinning is taken off the
    /// generator's CPU figures; the machine rows still show its CPUs busy.
    #[arg(long)]
    spin: bool,
    /// A node's internal /metrics to scrape before and after. Repeatable.
    #[arg(long = "metrics-url")]
    metrics_urls: Vec<String>,
    /// Gateway process id(s) whose RSS to measure before and after connecting. Repeatable.
    #[arg(long = "gateway-pid")]
    gateway_pids: Vec<u32>,
    /// Write the report as JSON here.
    #[arg(long)]
    json_out: Option<PathBuf>,
    /// Write the latency percentile curve as SVG here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// No progress lines.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Exit with status 2 when any delivery was lost.
    #[arg(long)]
    fail_on_loss: bool,
    /// Channel names are `loadtest:RUN:INDEX`; fixing RUN lets other listeners join
    /// (default: unique per run, so runs never hear each other).
    #[arg(long)]
    run_id: Option<String>,
}

/// The scenario with the flags' values in place of its own. Its description names what was
/// overridden, since a built-in one states the figures it was written with ("at 1,000
/// publications/s") and would otherwise head a report of a run at another rate.
fn apply(mut s: scenario::Scenario, o: &Overrides) -> scenario::Scenario {
    let mut changed = Vec::new();
    if let Some(v) = o.subscribers {
        changed.push("subscribers");
        s.subscribers = v;
    }
    if let Some(v) = o.channels {
        changed.push("channels");
        s.channels = v;
        s.channels_per_subscriber = s.channels_per_subscriber.min(v.max(1));
    }
    if let Some(v) = o.channels_per_subscriber {
        changed.push("channels_per_subscriber");
        s.channels_per_subscriber = v;
    }
    if let Some(v) = o.rate {
        changed.push("rate");
        s.rate = v;
    }
    if let Some(v) = o.duration {
        changed.push("duration");
        s.duration = v;
    }
    if let Some(v) = o.payload {
        changed.push("payload");
        s.payload = v;
    }
    if let Some(v) = o.transport {
        changed.push("transport");
        s.transport = v;
    }
    if let Some(v) = o.churn_rate {
        changed.push("churn_rate");
        s.churn_rate = v;
    }
    if let Some(v) = o.churn_hold {
        changed.push("churn_hold");
        s.churn_hold = v;
    }
    if o.recover_every.is_some() {
        changed.push("recover_every");
        s.recover_every = o.recover_every;
    }
    if o.recover_away.is_some() {
        changed.push("recover_away");
        s.recover_away = o.recover_away;
    }
    if !changed.is_empty() {
        s.description = format!("{}; overridden here: {}", s.description, changed.join(", ").replace('_', " "));
    }
    s
}

fn main() -> anyhow::Result<()> {
    // Anchors the clock every latency is measured with (see `sys::GenClock`).
    sys::clock_us();
    match Cli::parse().command {
        Command::List => {
            for (name, description) in scenario::builtin() {
                println!("{name:<10} {description}");
            }
            Ok(())
        }
        Command::Show { scenario: name, overrides, scenario_dir } => {
            let s = apply(scenario::load(&name, scenario_dir.as_deref())?, &overrides);
            print!("{}", toml::to_string(&s)?);
            Ok(())
        }
        Command::Run(args) => run_command(*args),
    }
}

/// Prints a report's table, writes its JSON when asked, and exits 2 with `lost` (what
/// `--fail-on-loss` found) when there is any.
fn finish(
    table: &str,
    report: &impl serde::Serialize,
    json_out: Option<&std::path::Path>,
    lost: Option<String>,
) -> anyhow::Result<()> {
    print!("{table}");
    if let Some(path) = json_out {
        std::fs::write(path, serde_json::to_vec_pretty(report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(lost) = lost {
        eprintln!("fanout-loadtest: {lost}");
        std::process::exit(2);
    }
    Ok(())
}

fn run_command(args: RunArgs) -> anyhow::Result<()> {
    let s = apply(scenario::load(&args.scenario, args.scenario_dir.as_deref())?, &args.overrides);
    let name = args.scenario.trim_end_matches(".toml").rsplit('/').next().unwrap_or(&args.scenario).to_owned();
    if s.storm {
        let cfg = storm::StormConfig {
            scenario: s,
            drain_pid: *args.gateway_pids.first().context("the storm drains the first node: --gateway-pid")?,
            urls: args.urls,
            redis_url: args.redis_url.context("the storm publishes its check through --redis-url")?,
            source_addrs: args.source_addrs.clone(),
            run_id: args.run_id.unwrap_or_else(|| format!("s{}", std::process::id())),
            quiet: args.quiet,
            host_probe: args.host_probe,
        };
        let report = storm::run_blocking(cfg)?;
        let lost = (report.not_back > 0 || report.starved > 0)
            .then(|| format!("{} clients not back, {} starved", report.not_back, report.starved));
        return finish(&report.table(), &report, args.json_out.as_deref(), lost.filter(|_| args.fail_on_loss));
    }
    if s.recover_every.is_some() {
        let cfg = recovery::RecoveryConfig {
            scenario: s,
            urls: args.urls,
            http_url: args.http_url.context("the recovery scenario publishes through --http-url")?,
            api_key: args.api_key,
            run_id: args.run_id.unwrap_or_else(|| format!("r{}", std::process::id())),
            quiet: args.quiet,
        };
        let report = recovery::run_blocking(cfg)?;
        let lost = (report.gaps > 0 || report.duplicates > 0 || report.incomplete > 0).then(|| {
            format!("{} gaps, {} duplicates, {} incomplete", report.gaps, report.duplicates, report.incomplete)
        });
        return finish(&report.table(), &report, args.json_out.as_deref(), lost.filter(|_| args.fail_on_loss));
    }
    let cfg = run::RunConfig {
        name,
        scenario: s,
        urls: args.urls,
        http_url: args.http_url,
        api_key: args.api_key,
        redis_url: args.redis_url,
        redis_prefix: args.redis_prefix,
        threads: args.threads,
        connect_rate: args.connect_rate,
        connect_concurrency: args.connect_concurrency,
        connect_timeout: args.connect_timeout,
        source_addrs: args.source_addrs,
        settle: args.settle,
        drain: args.drain,
        ws_publishers: args.ws_publishers,
        http_concurrency: args.http_concurrency,
        http_batch: args.http_batch,
        batch_window: args.batch_window,
        host_probe: args.host_probe,
        spin: args.spin,
        metrics_urls: args.metrics_urls,
        gateway_pids: args.gateway_pids,
        quiet: args.quiet,
        run_id: args.run_id,
    };
    // The control loop is light; the subscriber workers and the publisher run their own
    // runtimes on their own threads.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (report, latency) = rt.block_on(run::run(cfg))?;
    print!("{}", report.table());
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let title = format!("{}: end-to-end latency, {} deliveries", report.scenario, report.deliveries.delivered);
        std::fs::write(path, plot::svg(&latency, &title)).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.fail_on_loss && report.deliveries.lost > 0 {
        eprintln!("fanout-loadtest: {} deliveries lost", report.deliveries.lost);
        std::process::exit(2);
    }
    Ok(())
}
