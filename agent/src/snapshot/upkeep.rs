//! What the agent's own upkeep costs: its process (CPU time, memory), the
//! walks of the flow maps and the socket-table checks it made, and how late
//! its timers fired. A timer late by more than a fraction of a second is a
//! count that differs from `ss` for that long; a walk or a check that
//! holds the agent's lock is what makes one late.

use serde::{Deserialize, Serialize};

/// Upper bounds of the lateness buckets, in seconds (the last is every
/// other lateness).
pub const LATENESS_BOUNDS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// How late timers fired: per bucket of [`LATENESS_BOUNDS`] (and one past
/// the last), not cumulative.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Lateness {
    pub buckets: [u64; LATENESS_BOUNDS.len() + 1],
    pub sum_seconds: f64,
    pub max_seconds: f64,
}

impl Lateness {
    /// One timer (or question) acted on `late_ns` after its moment.
    pub fn record(&mut self, late_ns: u64) {
        let s = late_ns as f64 / 1e9;
        let b = LATENESS_BOUNDS
            .iter()
            .position(|bound| s <= *bound)
            .unwrap_or(LATENESS_BOUNDS.len());
        self.buckets[b] += 1;
        self.sum_seconds += s;
        self.max_seconds = self.max_seconds.max(s);
    }

    pub fn add(&mut self, o: &Lateness) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a += b;
        }
        self.sum_seconds += o.sum_seconds;
        self.max_seconds = self.max_seconds.max(o.max_seconds);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Timers that fired later than `seconds` (a bucket bound).
    pub fn later_than(&self, seconds: f64) -> u64 {
        LATENESS_BOUNDS
            .iter()
            .position(|b| *b >= seconds)
            .map_or(0, |i| self.buckets[i + 1..].iter().sum())
    }
}

/// A periodic job's runs and what they cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Runs {
    pub runs: u64,
    /// CPU time, summed over the runs.
    pub cpu_seconds: f64,
    /// Wall time of the last run (the agent's lock is held for part of it).
    pub last_seconds: f64,
}

impl Runs {
    pub fn ran(&mut self, cpu: std::time::Duration, wall: std::time::Duration) {
        self.runs += 1;
        self.cpu_seconds += cpu.as_secs_f64();
        self.last_seconds = wall.as_secs_f64();
    }
}

/// The agent's upkeep as of a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Upkeep {
    /// The agent process's CPU time (user and system) since it started.
    pub cpu_seconds: f64,
    /// Its resident memory now.
    pub resident_bytes: u64,
    /// Walks of the flow maps (timers, breakdowns).
    pub walks: Runs,
    /// Socket-table checks (one per namespace checked).
    pub checks: Runs,
    pub timer_lateness: Lateness,
}

impl Upkeep {
    /// Reads the process's CPU time and memory (Linux's `/proc/self`).
    pub fn of_process(&mut self) {
        if let Ok(u) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            self.cpu_seconds = secs(u.user_time()) + secs(u.system_time());
        }
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .unwrap_or(4096) as u64;
        self.resident_bytes = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |pages| pages * page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lateness_lands_in_its_bucket_and_counts_what_passed_a_bound() {
        let mut l = Lateness::default();
        for ms in [0, 3, 40, 100, 101, 700, 30_000] {
            l.record(ms * 1_000_000);
        }
        assert_eq!(l.count(), 7);
        assert_eq!(l.buckets[0], 1);
        assert_eq!(l.buckets[LATENESS_BOUNDS.len()], 1, "past the last bound");
        assert_eq!(l.later_than(0.1), 3);
        assert_eq!(l.later_than(10.0), 1);
        assert_eq!(l.max_seconds, 30.0);
    }
}
