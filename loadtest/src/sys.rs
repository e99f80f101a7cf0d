//! What the generator asks of the operating system: a higher open-file limit, its own CPU
//! time, the time the hypervisor took from the machine's CPUs, the resident memory of
//! gateway processes, and the clock its latencies are measured with.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use nix::sys::resource::{getrlimit, getrusage, setrlimit, Resource, UsageWho};

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force.
pub(crate) fn raise_nofile_limit() -> u64 {
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => hard,
            Err(_) => soft,
        },
        Ok((soft, _)) => soft,
        Err(_) => 0,
    }
}

/// Sets the calling thread's nice value (Linux applies PRIO_PROCESS with pid 0 to the
/// thread). Returns whether it took effect: lowering it needs CAP_SYS_NICE.
pub(crate) fn raise_thread_priority(nice: i32) -> bool {
    rustix::process::setpriority_process(None, nice).is_ok()
}

/// CPU time this process used so far.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuTimes {
    pub user: Duration,
    pub system: Duration,
    /// Peak resident set size in bytes.
    pub max_rss: u64,
}

impl CpuTimes {
    pub(crate) fn now() -> Self {
        let Ok(u) = getrusage(UsageWho::RUSAGE_SELF) else { return Self::default() };
        let tv = |t: nix::sys::time::TimeVal| {
            Duration::from_secs(t.tv_sec().max(0) as u64) + Duration::from_micros(t.tv_usec().max(0) as u64)
        };
        Self { user: tv(u.user_time()), system: tv(u.system_time()), max_rss: u.max_rss().max(0) as u64 * 1024 }
    }

    pub(crate) fn total(&self) -> Duration {
        self.user + self.system
    }

    /// CPU seconds used since `earlier`.
    pub(crate) fn since(&self, earlier: &CpuTimes) -> f64 {
        self.total().saturating_sub(earlier.total()).as_secs_f64()
    }
}

/// Cores this process may run on (its affinity mask and cgroup quota included).
pub(crate) fn available_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Reads the RSS of several processes through files opened once, up front: by the time
/// of the second reading every descriptor may be taken by connections.
pub(crate) struct RssProbe {
    files: Vec<std::fs::File>,
}

impl RssProbe {
    pub(crate) fn open(pids: &[u32]) -> Self {
        Self { files: pids.iter().filter_map(|p| std::fs::File::open(format!("/proc/{p}/status")).ok()).collect() }
    }

    /// Summed VmRSS in bytes of the processes still alive.
    pub(crate) fn read(&mut self) -> u64 {
        let mut total = 0;
        let mut text = String::new();
        for f in &mut self.files {
            if read_again(f, &mut text) {
                total += parse_vmrss(&text).unwrap_or(0);
            }
        }
        total
    }
}

/// Reads a `/proc` file opened earlier from its start into `text` (replacing what was
/// there); false if it could not be read.
fn read_again(file: &mut std::fs::File, text: &mut String) -> bool {
    use std::io::{Read, Seek};
    text.clear();
    file.rewind().is_ok() && file.read_to_string(text).is_ok()
}

/// The wall clock as it read when the generator started, advanced since by the monotonic
/// clock. Latencies are differences of two such readings (a publication's due time and its
/// arrival), and the wall clock itself cannot be trusted over a run: a machine whose time
/// is being corrected slews it (this VM's ran 0.5 % fast against the monotonic clock for
/// minutes, which added 5 ms per second of run to every latency), or steps it. Anchored
/// once, the readings stay comparable with other machines' wall clocks to within whatever
/// they agreed at the start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GenClock {
    wall_us: u64,
    at: Instant,
}

impl GenClock {
    fn start() -> Self {
        Self { wall_us: fanout_protocol::now_micros(), at: Instant::now() }
    }

    /// The reading for `instant` (µs since the epoch; earlier than the anchor reads as it).
    pub(crate) fn at(&self, instant: Instant) -> u64 {
        self.wall_us + instant.saturating_duration_since(self.at).as_micros() as u64
    }
}

static CLOCK: OnceLock<GenClock> = OnceLock::new();

/// Now on the generator's clock ([`GenClock`]), µs since the epoch. The first call anchors
/// it; `main` makes that call before anything is measured.
pub(crate) fn clock_us() -> u64 {
    CLOCK.get_or_init(GenClock::start).at(Instant::now())
}

/// Each CPU's time counters from `/proc/stat`, in clock ticks: (name, total, steal).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct CpuStat {
    cpus: Vec<(String, u64, u64)>,
}

impl CpuStat {
    /// Each CPU's steal over the time since `earlier`, as a percentage of that CPU's time:
    /// the share a hypervisor ran something else while this guest had work for the CPU.
    /// CPUs that did not tick in between (or are in only one reading) are left out.
    pub(crate) fn steal_since(&self, earlier: &CpuStat) -> Vec<(String, f64)> {
        self.cpus
            .iter()
            .filter_map(|(name, total, steal)| {
                let (_, t0, s0) = earlier.cpus.iter().find(|(n, _, _)| n == name)?;
                let dt = total.checked_sub(*t0).filter(|&d| d > 0)?;
                Some((name.clone(), steal.saturating_sub(*s0) as f64 / dt as f64 * 100.0))
            })
            .collect()
    }
}

/// The per-CPU lines of `/proc/stat` (`cpuN user nice system idle iowait irq softirq steal
/// guest guest_nice`; guest time is already inside user, so it is not added again).
fn parse_proc_stat(text: &str) -> CpuStat {
    let cpus = text
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let name = fields.next()?.to_owned();
            let v: Vec<u64> = fields.take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
            (v.len() == 8).then(|| (name, v.iter().sum(), v[7]))
        })
        .collect();
    CpuStat { cpus }
}

/// Reads `/proc/stat` through a file opened once, up front (as [`RssProbe`] does); an
/// empty reading where there is no such file (not Linux).
pub(crate) struct StealProbe {
    file: Option<std::fs::File>,
}

impl StealProbe {
    pub(crate) fn open() -> Self {
        Self { file: std::fs::File::open("/proc/stat").ok() }
    }

    pub(crate) fn read(&mut self) -> CpuStat {
        let mut text = String::new();
        let read = self.file.as_mut().is_some_and(|f| read_again(f, &mut text));
        if read {
            parse_proc_stat(&text)
        } else {
            CpuStat::default()
        }
    }
}

fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_figures() {
        assert!(raise_nofile_limit() > 0);
        let before = CpuTimes::now();
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        let after = CpuTimes::now();
        assert!(after.since(&before) > 0.0);
        assert!(after.max_rss > 0);
        let mut probe = RssProbe::open(&[std::process::id(), u32::MAX]);
        assert!(probe.read() > 0 && probe.read() > 0, "re-readable, missing pids skipped");
        assert!(available_cores() >= 1);
    }

    #[test]
    fn the_clock_follows_the_monotonic_clock_from_one_wall_reading() {
        let c = GenClock { wall_us: 1_000_000, at: Instant::now() };
        assert_eq!(c.at(c.at + Duration::from_secs(5)), 6_000_000, "elapsed time is Instant's, to the µs");
        assert_eq!(c.at(c.at + Duration::from_micros(1)), 1_000_001);
        assert_eq!(
            c.at(c.at.checked_sub(Duration::from_secs(1)).unwrap_or(c.at)),
            1_000_000,
            "never before the anchor"
        );
        let (a, b) = (clock_us(), clock_us());
        assert!(b >= a, "monotonic");
        let wall = fanout_protocol::now_micros();
        assert!(a.abs_diff(wall) < 60_000_000, "anchored to the wall clock: {a} against {wall}");
    }

    #[test]
    fn steal_per_cpu_from_proc_stat() {
        let before = parse_proc_stat(
            "cpu  10 0 10 70 0 0 0 10 5 0\ncpu0 5 0 5 35 0 0 0 5 0 0\ncpu1 5 0 5 35 0 0 0 5 0 0\nintr 1 2\ncpufreq x\n",
        );
        assert_eq!(before.cpus.len(), 2, "the aggregate line and non-CPU lines are skipped");
        assert_eq!(before.cpus[0], ("cpu0".to_owned(), 50, 5));
        // cpu0 ticks 100 more, 3 of them stolen; cpu1 does not tick; cpu2 appears.
        let after =
            parse_proc_stat("cpu0 40 0 20 82 0 0 0 8 0 0\ncpu1 5 0 5 35 0 0 0 5 0 0\ncpu2 1 0 1 1 0 0 0 1 0 0\n");
        let steal = after.steal_since(&before);
        assert_eq!(steal.len(), 1, "{steal:?}");
        assert_eq!(steal[0].0, "cpu0");
        assert!((steal[0].1 - 3.0).abs() < 1e-9, "{steal:?}");
        assert!(parse_proc_stat("cpu0 1 2\n").cpus.is_empty(), "short lines are not guessed at");
        // This machine's own file parses, when there is one.
        if std::path::Path::new("/proc/stat").exists() {
            let mut probe = StealProbe::open();
            let (a, b) = (probe.read(), probe.read());
            assert!(!a.cpus.is_empty() && b.cpus.len() == a.cpus.len(), "re-readable");
            assert!(b.steal_since(&a).iter().all(|(_, pct)| (0.0..=100.0).contains(pct)));
        }
    }

    #[test]
    fn vmrss_line() {
        assert_eq!(parse_vmrss("Name:\tx\nVmRSS:\t   1234 kB\n"), Some(1234 * 1024));
        assert_eq!(parse_vmrss("Name:\tx\n"), None);
    }
}
