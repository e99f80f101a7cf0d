//! What the generator asks of the operating system: a higher open-file limit, its own CPU
//! time, what the machine's CPUs did (busy, softirq, steal, the pauses a spinning thread
//! sees, other processes' CPU), the resident memory of gateway processes, and the clock
//! its latencies are measured with.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use nix::sys::resource::{getrlimit, getrusage, setrlimit, Resource, UsageWho};
use serde::Serialize;

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

/// One CPU's time counters from `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Default, PartialEq)]
struct CpuTicks {
    name: String,
    total: u64,
    /// Idle and waiting for I/O.
    idle: u64,
    softirq: u64,
    steal: u64,
}

/// What one CPU did over a stretch of time, in percent of that time.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CpuShare {
    pub cpu: String,
    /// Running anything of this guest's: user, system, interrupts.
    pub busy: f64,
    /// Of that, the kernel's deferred interrupt work (on loopback: receiving what was sent).
    pub softirq: f64,
    /// Taken by the hypervisor for something else while this guest had work for the CPU.
    pub steal: f64,
}

/// Each CPU's time counters from `/proc/stat`, and when they were read.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct CpuStat {
    cpus: Vec<CpuTicks>,
    at: Option<Instant>,
}

impl CpuStat {
    /// What each CPU did since `earlier`, in percent of the time between the two readings.
    /// CPUs that did not tick in between (or are in only one reading) are left out.
    ///
    /// The wall time between the readings is the measure, not the sum of the ticks: on a
    /// tickless kernel idle and steal time are kept exactly, but busy time only where a
    /// tick found the CPU busy, so work that comes in bursts shorter than a tick between
    /// idle spells is not counted at all. Seen here: a gateway using 34 % of a core (its
    /// own precise CPU time) showed 3 % busy, its ticks summing to 306 over 5 s instead of
    /// 500. So busy is what idle and steal leave, and softirq is its share of the ticks
    /// that were counted as busy.
    pub(crate) fn since(&self, earlier: &CpuStat) -> Vec<CpuShare> {
        let wall = match (self.at, earlier.at) {
            (Some(now), Some(then)) => Some(now.saturating_duration_since(then).as_secs_f64() * USER_HZ),
            _ => None,
        };
        self.cpus
            .iter()
            .filter_map(|now| {
                let then = earlier.cpus.iter().find(|c| c.name == now.name)?;
                let ticked = now.total.checked_sub(then.total).filter(|&d| d > 0)? as f64;
                let d = |a: u64, b: u64| a.saturating_sub(b) as f64;
                let (idle, steal, softirq) =
                    (d(now.idle, then.idle), d(now.steal, then.steal), d(now.softirq, then.softirq));
                let span = wall.filter(|w| *w >= ticked.max(1.0)).unwrap_or(ticked);
                let busy = (100.0 - (idle + steal) / span * 100.0).max(0.0);
                let counted_busy = ticked - idle - steal;
                Some(CpuShare {
                    cpu: now.name.clone(),
                    busy,
                    softirq: if counted_busy > 0.0 { busy * softirq / counted_busy } else { 0.0 },
                    steal: steal / span * 100.0,
                })
            })
            .collect()
    }

    /// Each CPU's steal since `earlier`, in percent of its time.
    pub(crate) fn steal_since(&self, earlier: &CpuStat) -> Vec<(String, f64)> {
        self.since(earlier).into_iter().map(|c| (c.cpu, c.steal)).collect()
    }

    /// The numbers of the CPUs read.
    fn cpu_numbers(&self) -> Vec<usize> {
        self.cpus.iter().filter_map(|c| cpu_number(&c.name)).collect()
    }
}

/// The number in a CPU's name (`cpu3` is 3).
pub(crate) fn cpu_number(name: &str) -> Option<usize> {
    name.strip_prefix("cpu")?.parse().ok()
}

/// Whether the CPU named `name` is one of `cpus` (by number).
pub(crate) fn cpu_among(name: &str, cpus: &[usize]) -> bool {
    cpu_number(name).is_some_and(|n| cpus.contains(&n))
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
            (v.len() == 8).then(|| CpuTicks {
                name,
                total: v.iter().sum(),
                idle: v[3] + v[4],
                softirq: v[6],
                steal: v[7],
            })
        })
        .collect();
    CpuStat { cpus, at: Some(Instant::now()) }
}

/// Reads `/proc/stat` through a file opened once, up front (as [`RssProbe`] does); an
/// empty reading where there is no such file (not Linux).
pub(crate) struct CpuStatProbe {
    file: Option<std::fs::File>,
}

impl CpuStatProbe {
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

/// A pause shorter than this is not counted: an interrupt or a timer tick takes a few µs,
/// and what a latency figure feels is the CPU gone for a millisecond or more.
pub(crate) const PAUSE_FLOOR: Duration = Duration::from_micros(100);

/// Pauses of one kind that a spinning thread saw.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Default)]
pub(crate) struct Pauses {
    /// The share of the probe lost in pauses of at least [`PAUSE_FLOOR`].
    pub lost_percent: f64,
    /// Pauses of a millisecond or more.
    pub over_1ms: u64,
    pub longest_ms: f64,
}

impl Pauses {
    /// Adds one pause (to `lost_percent` as seconds, until [`spin_on`] divides).
    fn add(&mut self, pause: Duration) {
        self.lost_percent += pause.as_secs_f64();
        self.longest_ms = self.longest_ms.max(pause.as_secs_f64() * 1000.0);
        self.over_1ms += u64::from(pause >= Duration::from_millis(1));
    }
}

/// What a thread spinning on one CPU at the highest priority it may take saw of it: the
/// time the CPU was away from it, split by whether this guest's scheduler switched it out.
/// Measured here (a 10 s probe, both CPUs idle): the host took 0.11 % and 0.21 %, about
/// what `/proc/stat` charged as steal (0.2 % each), while other threads of the guest took
/// 0.32 % and 1.24 % in slices of up to 12 ms: the kernel's own threads (`kdamond`, the
/// DAMON memory monitor that image runs) get the CPU even from a nice −20 thread, and from
/// a gateway at nice 0 all the more.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct CpuPauses {
    pub cpu: String,
    /// Gone without the guest switching the thread out: the host ran something else (or
    /// the guest's own interrupts ran long).
    pub host: Pauses,
    /// Switched out for another thread of this guest, kernel threads included.
    pub other_threads: Pauses,
}

/// Spins one thread on each CPU in `/proc/stat` for `length` at once, and reports what
/// each saw. CPUs the process may not run on are skipped. It takes each CPU whole for
/// `length`, so call it only while nothing is being measured.
pub(crate) fn probe_pauses(length: Duration) -> Vec<CpuPauses> {
    let cpus = CpuStatProbe::open().read().cpu_numbers();
    std::thread::scope(|scope| {
        let probes: Vec<_> = cpus.iter().map(|&cpu| scope.spawn(move || spin_on(cpu, length))).collect();
        probes.into_iter().filter_map(|p| p.join().ok().flatten()).collect()
    })
}

/// [`probe_pauses`] on a blocking thread, so a runtime's other tasks (a signal handler,
/// idle clients' pings) are not held up; nothing at all for a zero length.
pub(crate) async fn probe_pauses_async(length: Duration) -> Vec<CpuPauses> {
    if length.is_zero() {
        return Vec::new();
    }
    tokio::task::spawn_blocking(move || probe_pauses(length)).await.unwrap_or_default()
}

/// Waits (up to `limit`) until the processes in `pids` used no CPU for a tenth of a
/// second: after a run the nodes are still closing connections, and a probe started then
/// would count their work as other threads'.
pub(crate) async fn until_idle(pids: &[u32], limit: Duration) {
    let give_up = Instant::now() + limit;
    let mut last = ProcessCpu::of(pids);
    while Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = ProcessCpu::of(pids);
        if now.total_since(&last) == 0.0 {
            return;
        }
        last = now;
    }
}

/// The CPUs this thread may run on (empty where that cannot be read).
pub(crate) fn own_cpus() -> Vec<usize> {
    let Ok(set) = rustix::thread::sched_getaffinity(None) else { return Vec::new() };
    (0..rustix::thread::CpuSet::MAX_CPU).filter(|&n| set.is_set(n)).collect()
}

fn spin_on(cpu: usize, length: Duration) -> Option<CpuPauses> {
    let mut only = rustix::thread::CpuSet::new();
    only.set(cpu);
    rustix::thread::sched_setaffinity(None, &only).ok()?;
    // Whatever still takes the CPU from a nice −20 thread takes it from the gateway too.
    raise_thread_priority(-20);
    let mut switches = own_context_switches();
    let (mut host, mut other_threads) = (Pauses::default(), Pauses::default());
    let start = Instant::now();
    let mut last = start;
    loop {
        let now = Instant::now();
        let pause = now - last;
        last = now;
        if pause >= PAUSE_FLOOR {
            let s = own_context_switches();
            if s == switches {
                host.add(pause);
            } else {
                other_threads.add(pause);
            }
            switches = s;
            // The system call is not a pause.
            last = Instant::now();
        }
        if now - start >= length {
            break;
        }
    }
    let took = start.elapsed().as_secs_f64();
    for p in [&mut host, &mut other_threads] {
        p.lost_percent = p.lost_percent / took * 100.0;
    }
    Some(CpuPauses { cpu: format!("cpu{cpu}"), host, other_threads })
}

/// Times the guest's scheduler switched the calling thread out, either way.
fn own_context_switches() -> i64 {
    getrusage(UsageWho::RUSAGE_THREAD)
        .map(|u| u.voluntary_context_switches() + u.involuntary_context_switches())
        .unwrap_or(0)
}

/// CPU time of every process on the machine but some, from `/proc/*/stat`.
#[derive(Debug, Clone, Default)]
pub(crate) struct ProcessCpu {
    /// pid → (name, user + system clock ticks).
    ticks: std::collections::HashMap<u32, (String, u64)>,
}

/// Kernel clock ticks per second in `/proc` files: USER_HZ, fixed at 100 in the ABI of
/// every architecture this runs on.
const USER_HZ: f64 = 100.0;

/// One process's CPU use over a window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct ProcessShare {
    pub pid: u32,
    pub name: String,
    pub cpu_seconds: f64,
}

impl ProcessCpu {
    /// Only the processes in `pids` (those still there).
    pub(crate) fn of(pids: &[u32]) -> Self {
        let read = |pid: &u32| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((*pid, parse_pid_stat(&stat)?))
        };
        Self { ticks: pids.iter().filter_map(read).collect() }
    }

    /// All CPU seconds since `earlier`.
    pub(crate) fn total_since(&self, earlier: &ProcessCpu) -> f64 {
        self.since(earlier).iter().map(|p| p.cpu_seconds).sum()
    }

    /// Every process but those in `except`. Unreadable ones (gone meanwhile) are skipped.
    pub(crate) fn read(except: &[u32]) -> Self {
        let Ok(dir) = std::fs::read_dir("/proc") else { return Self::default() };
        let pids: Vec<u32> = dir
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
            .filter(|pid| !except.contains(pid))
            .collect();
        Self::of(&pids)
    }

    /// The processes that used CPU since `earlier`, most first. One that started since
    /// counts from zero; one that ended is not seen.
    pub(crate) fn since(&self, earlier: &ProcessCpu) -> Vec<ProcessShare> {
        let mut used: Vec<ProcessShare> = self
            .ticks
            .iter()
            .filter_map(|(pid, (name, t))| {
                let t0 = earlier.ticks.get(pid).map_or(0, |(_, t0)| *t0);
                let d = t.checked_sub(t0).filter(|&d| d > 0)?;
                Some(ProcessShare { pid: *pid, name: name.clone(), cpu_seconds: d as f64 / USER_HZ })
            })
            .collect();
        used.sort_by(|a, b| b.cpu_seconds.total_cmp(&a.cpu_seconds).then(a.pid.cmp(&b.pid)));
        used
    }
}

/// The name and user + system ticks in a `/proc/PID/stat` line. The name is in parentheses
/// and may hold spaces and parentheses itself, so the fields are counted from the last `)`.
fn parse_pid_stat(line: &str) -> Option<(String, u64)> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let name = line.get(open + 1..close)?.to_owned();
    // After the name: state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    // cmajflt, then utime and stime.
    let mut rest = line.get(close + 1..)?.split_whitespace().skip(11);
    let utime: u64 = rest.next()?.parse().ok()?;
    let stime: u64 = rest.next()?.parse().ok()?;
    Some((name, utime + stime))
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
        assert_eq!(before.cpus[0], CpuTicks { name: "cpu0".to_owned(), total: 50, idle: 35, softirq: 0, steal: 5 });
        // cpu0 ticks 100 more, 3 of them stolen; cpu1 does not tick; cpu2 appears.
        let after =
            parse_proc_stat("cpu0 40 0 20 82 0 0 0 8 0 0\ncpu1 5 0 5 35 0 0 0 5 0 0\ncpu2 1 0 1 1 0 0 0 1 0 0\n");
        let steal = after.steal_since(&before);
        assert_eq!(steal.len(), 1, "{steal:?}");
        assert_eq!(steal[0].0, "cpu0");
        assert!((steal[0].1 - 3.0).abs() < 1e-9, "{steal:?}");
        assert!(parse_proc_stat("cpu0 1 2\n").cpus.is_empty(), "short lines are not guessed at");
        // cpu0 ticks 100 more: 15 user, 10 system, 47 idle, 2 iowait, 23 softirq, 3 steal.
        let later = parse_proc_stat("cpu0 20 0 15 82 2 0 23 8 0 0\n");
        let share = later.since(&before);
        assert_eq!(share.len(), 1);
        let c = &share[0];
        assert!(
            (c.busy - 48.0).abs() < 1e-9 && (c.softirq - 23.0).abs() < 1e-9 && (c.steal - 3.0).abs() < 1e-9,
            "{c:?}"
        );
        // Read 5 s apart, a tickless CPU that counted only 306 ticks: 296 idle, 2 steal, 8
        // busy of which 2 softirq. Busy is what idle and steal leave of the 500 ticks.
        let t0 = Instant::now();
        let at = |text: &str, when: Instant| CpuStat { at: Some(when), ..parse_proc_stat(text) };
        let first = at("cpu0 100 0 100 1000 0 0 0 10 0 0\n", t0);
        let second = at("cpu0 104 0 102 1296 0 0 2 12 0 0\n", t0 + Duration::from_secs(5));
        let c = &second.since(&first)[0];
        assert!((c.busy - 40.4).abs() < 1e-9, "{c:?}");
        assert!((c.steal - 0.4).abs() < 1e-9 && (c.softirq - 40.4 / 4.0).abs() < 1e-9, "{c:?}");
        // This machine's own file parses, when there is one.
        if std::path::Path::new("/proc/stat").exists() {
            let mut probe = CpuStatProbe::open();
            let (a, b) = (probe.read(), probe.read());
            assert!(!a.cpus.is_empty() && b.cpus.len() == a.cpus.len(), "re-readable");
            assert!(b.steal_since(&a).iter().all(|(_, pct)| (0.0..=100.0).contains(pct)));
        }
    }

    #[test]
    fn a_spinning_probe_on_each_cpu() {
        let pauses = probe_pauses(Duration::from_millis(20));
        assert!(!pauses.is_empty() || !std::path::Path::new("/proc/stat").exists(), "at least our own CPU");
        for p in &pauses {
            assert!(p.cpu.starts_with("cpu"), "{p:?}");
            for kind in [p.host, p.other_threads] {
                assert!((0.0..=100.0).contains(&kind.lost_percent), "{p:?}");
                assert!(kind.over_1ms == 0 || kind.longest_ms >= 1.0, "{p:?}");
                assert!(kind.longest_ms == 0.0 || kind.longest_ms >= PAUSE_FLOOR.as_secs_f64() * 1000.0, "{p:?}");
            }
        }
        let stat = parse_proc_stat("cpu0 1 0 1 1 0 0 0 1 0 0\ncpu7 1 0 1 1 0 0 0 1 0 0\n");
        assert_eq!(stat.cpu_numbers(), [0, 7]);
    }

    #[test]
    fn other_processes_cpu_from_proc() {
        let line = "1234 (tokio (rt) worker) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 30 0 0 20 0 4 0 100 0 0";
        assert_eq!(parse_pid_stat(line), Some(("tokio (rt) worker".to_owned(), 280)));
        assert_eq!(parse_pid_stat("1 (x) S 1 2"), None, "short lines are not guessed at");
        let mut before = ProcessCpu::default();
        before.ticks.insert(1, ("a".into(), 100));
        before.ticks.insert(2, ("b".into(), 50));
        let mut after = before.clone();
        after.ticks.insert(1, ("a".into(), 110));
        after.ticks.insert(3, ("new".into(), 40));
        let used = after.since(&before);
        let names: Vec<_> = used.iter().map(|p| (p.name.as_str(), p.cpu_seconds)).collect();
        assert_eq!(names, [("new", 0.4), ("a", 0.1)], "idle ones left out, busiest first");
        assert!((after.total_since(&before) - 0.5).abs() < 1e-9);
        if std::path::Path::new("/proc/self/stat").exists() {
            let me = std::process::id();
            assert_eq!(ProcessCpu::of(&[me, u32::MAX]).ticks.len(), 1, "missing pids skipped");
            assert!(ProcessCpu::read(&[]).ticks.contains_key(&me), "this process is read");
            assert!(!ProcessCpu::read(&[me]).ticks.contains_key(&me), "and can be left out");
        }
    }

    #[test]
    fn vmrss_line() {
        assert_eq!(parse_vmrss("Name:\tx\nVmRSS:\t   1234 kB\n"), Some(1234 * 1024));
        assert_eq!(parse_vmrss("Name:\tx\n"), None);
    }
}
