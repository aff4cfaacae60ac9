//! Whether the machine was idle during a measurement.
//!
//! ggml's CPU threads wait for each other at every op, so when another process takes a core
//! for part of a measurement, every configuration slows down by an amount that depends on
//! when it ran, and ratios between configurations mean nothing. `dspark bench` samples the
//! machine's load around each timed window and flags the ones that were not idle.
//!
//! Three sources, best first:
//! - CPU time used by other processes: `/proc/stat` (busy jiffies of all cores, steal time
//!   included, so a noisy neighbour on the host counts too) minus this process's own
//!   (`/proc/self/stat`). This ignores DSpark's and ggml's own threads, which a pressure
//!   measure would count whenever they outnumber the cores for a moment.
//! - `/proc/pressure/cpu` (Linux PSI): the `some` line's `total` is the time, in µs, during
//!   which at least one runnable task waited for a CPU. Its growth over the window, as a
//!   fraction of the window's wall time, is the share of the measurement that something
//!   (another process, or more threads than cores) was kept off a core.
//! - `/proc/loadavg` when PSI is missing: its fourth field counts runnable tasks at the moment
//!   of reading (the reading thread included; ggml's workers sleep between graphs). Sampled at
//!   both ends of the window.

/// A window is busy when runnable tasks waited for a CPU more than this share of its wall
/// time (PSI). Idle machines measure well under 1%; a single competing busy process on the
/// cores in use pushes it to tens of percent.
pub const MAX_STALL_FRACTION: f64 = 0.10;

/// A window is busy when other processes (or the hypervisor, as steal time) used more than
/// this many cores on average. Idle machines measure about 0.01.
pub const MAX_OTHER_CORES: f64 = 0.10;

/// Jiffies from /proc/stat and /proc/self/stat.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuTimes {
    /// Busy time of all cores (user, nice, system, irq, softirq, steal).
    pub busy: u64,
    /// All time of all cores (busy, idle, iowait).
    pub total: u64,
    /// This process's user + system time.
    pub own: u64,
    /// Cores counted in /proc/stat.
    pub cores: u32,
}

/// One reading of the load sources.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadSample {
    /// CPU times, when /proc/stat and /proc/self/stat could be read.
    pub cpu: Option<CpuTimes>,
    /// PSI `some` total stall time, µs.
    pub stall_us: Option<u64>,
    /// Runnable tasks from /proc/loadavg, the reader included.
    pub runnable: Option<u32>,
}

/// What was seen over one window.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Load {
    /// Cores used on average by other processes over the window.
    Others(f64),
    /// PSI stall time over the window, as a fraction of its wall time.
    Stall(f64),
    /// No PSI: the most runnable tasks besides the reader at either end of the window, and
    /// the cores left free by the threads in use.
    Runnable { others: u32, spare_cores: u32 },
    /// Neither source could be read.
    Unknown,
}

impl Load {
    /// Whether the window was not idle (see [`MAX_STALL_FRACTION`]; without PSI: more other
    /// runnable tasks than cores left free). Unknown counts as idle: there is nothing to warn on.
    pub fn busy(self) -> bool {
        match self {
            Load::Others(c) => c > MAX_OTHER_CORES,
            Load::Stall(f) => f > MAX_STALL_FRACTION,
            Load::Runnable { others, spare_cores } => others > spare_cores,
            Load::Unknown => false,
        }
    }

    /// Human-readable reading, for the warning.
    pub fn describe(self) -> String {
        match self {
            Load::Others(c) => format!("other processes used {c:.2} cores"),
            Load::Stall(f) => format!("CPU pressure: tasks waited for a core {:.0}% of the time", 100.0 * f),
            Load::Runnable { others, spare_cores } => {
                format!("{others} other runnable task(s) for {spare_cores} spare core(s) (/proc/loadavg)")
            }
            Load::Unknown => "load unknown".into(),
        }
    }
}

/// The `total=` of the `some` line of /proc/pressure/cpu text, in µs.
pub fn parse_psi_some_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace().find_map(|f| f.strip_prefix("total=")).and_then(|v| v.parse().ok())
}

/// Busy and total jiffies and the core count from /proc/stat text.
pub fn parse_stat(text: &str) -> Option<(u64, u64, u32)> {
    let f: Vec<u64> = text.lines().next()?.strip_prefix("cpu ")?.split_whitespace().map(|x| x.parse().ok()).collect::<Option<_>>()?;
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    let cores = text.lines().filter(|l| l.starts_with("cpu") && !l.starts_with("cpu ")).count() as u32;
    Some((busy, busy + at(3) + at(4), cores))
}

/// utime + stime from /proc/self/stat text (the fields after the parenthesised name).
pub fn parse_self_stat(text: &str) -> Option<u64> {
    let rest: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    Some(rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?)
}

/// The runnable count (the part before `/` in the fourth field) of /proc/loadavg text.
pub fn parse_loadavg_runnable(text: &str) -> Option<u32> {
    text.split_whitespace().nth(3)?.split_once('/')?.0.parse().ok()
}

/// The load over a window of `wall_s` seconds between two samples, for `threads` threads on
/// `cores` cores. PSI wins when both samples have it.
pub fn classify(before: LoadSample, after: LoadSample, wall_s: f64, threads: usize, cores: usize) -> Load {
    if let (Some(a), Some(b)) = (before.cpu, after.cpu) {
        let total = b.total.saturating_sub(a.total);
        if total > 0 {
            let others = b.busy.saturating_sub(a.busy).saturating_sub(b.own.saturating_sub(a.own));
            return Load::Others(others as f64 / total as f64 * f64::from(b.cores.max(1)));
        }
    }
    if let (Some(a), Some(b)) = (before.stall_us, after.stall_us) {
        if wall_s > 0.0 {
            return Load::Stall(b.saturating_sub(a) as f64 / 1e6 / wall_s);
        }
    }
    let others = [before.runnable, after.runnable].into_iter().flatten().map(|n| n.saturating_sub(1)).max();
    match others {
        Some(others) => Load::Runnable { others, spare_cores: cores.saturating_sub(threads) as u32 },
        None => Load::Unknown,
    }
}

/// Reads the load sources now.
pub fn sample() -> LoadSample {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let cpu = read("/proc/stat").as_deref().and_then(parse_stat).zip(read("/proc/self/stat").as_deref().and_then(parse_self_stat));
    LoadSample {
        cpu: cpu.map(|((busy, total, cores), own)| CpuTimes { busy, total, own, cores }),
        stall_us: read("/proc/pressure/cpu").as_deref().and_then(parse_psi_some_total),
        runnable: read("/proc/loadavg").as_deref().and_then(parse_loadavg_runnable),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PSI: &str = "some avg10=1.97 avg60=5.88 avg300=11.91 total=71099749\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";

    #[test]
    fn parses_proc_text() {
        assert_eq!(parse_psi_some_total(PSI), Some(71_099_749));
        assert_eq!(parse_psi_some_total("full avg10=0.00 total=5\n"), None);
        assert_eq!(parse_psi_some_total(""), None);
        assert_eq!(parse_loadavg_runnable("1.90 1.57 0.73 2/94 6358\n"), Some(2));
        assert_eq!(parse_loadavg_runnable("1.90 1.57"), None);
    }

    #[test]
    fn other_processes_cpu_time_decides_and_own_threads_do_not_count() {
        assert_eq!(parse_stat("cpu  10 1 5 100 2 1 1 3 0 0\ncpu0 5 0 2 50 1 0 0 1 0 0\ncpu1 5 1 3 50 1 1 1 2 0 0\n"), Some((21, 123, 2)));
        assert_eq!(parse_self_stat("42 (dspark (x)) R 1 2 3 4 5 6 7 8 9 10 70 30 0 0"), Some(100));
        let c = |busy, total, own| LoadSample { cpu: Some(CpuTimes { busy, total, own, cores: 2 }), stall_us: Some(0), runnable: Some(9) };
        // 200 jiffies of the 2 cores pass; this process used 190 of the 190 busy: idle, however
        // many of its own threads waited (PSI says 100% here).
        let (a, b) = (c(1000, 5000, 300), c(1190, 5200, 490));
        assert_eq!(classify(a, b, 1.0, 2, 2), Load::Others(0.0));
        assert!(!classify(a, b, 1.0, 2, 2).busy());
        // Others used 30 of 200 jiffies: 0.3 cores, busy.
        let b = c(1190, 5200, 460);
        assert!((matches!(classify(a, b, 1.0, 2, 2), Load::Others(x) if (x - 0.3).abs() < 1e-9)));
        assert!(classify(a, b, 1.0, 2, 2).busy());
    }

    #[test]
    fn stall_over_ten_percent_is_busy() {
        let s = |us| LoadSample { cpu: None, stall_us: Some(us), runnable: Some(9) };
        // 2 s window: 0.1 s stalled is 5% (idle), 0.3 s is 15% (busy), whatever loadavg says.
        assert_eq!(classify(s(1_000_000), s(1_100_000), 2.0, 2, 2), Load::Stall(0.05));
        assert!(!classify(s(1_000_000), s(1_100_000), 2.0, 2, 2).busy());
        assert!(classify(s(1_000_000), s(1_300_000), 2.0, 2, 2).busy());
        // Exactly at the threshold is still idle.
        assert!(!classify(s(0), s(200_000), 2.0, 2, 2).busy());
    }

    #[test]
    fn loadavg_fallback_counts_other_runnable_tasks() {
        let l = |n| LoadSample { cpu: None, stall_us: None, runnable: Some(n) };
        // Only the reader runnable: idle.
        assert!(!classify(l(1), l(1), 1.0, 2, 2).busy());
        // One other task with every core in use: busy, at either end of the window.
        assert_eq!(classify(l(1), l(2), 1.0, 2, 2), Load::Runnable { others: 1, spare_cores: 0 });
        assert!(classify(l(2), l(1), 1.0, 2, 2).busy());
        // One other task, one spare core: idle.
        assert!(!classify(l(2), l(2), 1.0, 1, 2).busy());
        // PSI on one side only falls back to loadavg.
        let half = LoadSample { cpu: None, stall_us: Some(5), runnable: Some(3) };
        assert_eq!(classify(half, l(1), 1.0, 2, 2), Load::Runnable { others: 2, spare_cores: 0 });
        assert_eq!(classify(LoadSample::default(), LoadSample::default(), 1.0, 2, 2), Load::Unknown);
        assert!(!Load::Unknown.busy());
    }
}
