//! What the generator asks of the operating system: a higher open-file limit, its own CPU
//! time, and the resident memory of gateway processes.

use std::time::Duration;

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
        use std::io::{Read, Seek};
        let mut total = 0;
        let mut text = String::new();
        for f in &mut self.files {
            text.clear();
            if f.rewind().is_ok() && f.read_to_string(&mut text).is_ok() {
                total += parse_vmrss(&text).unwrap_or(0);
            }
        }
        total
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
    fn vmrss_line() {
        assert_eq!(parse_vmrss("Name:\tx\nVmRSS:\t   1234 kB\n"), Some(1234 * 1024));
        assert_eq!(parse_vmrss("Name:\tx\n"), None);
    }
}
