//! Spacing for the agent's periodic jobs whose cost grows with the number of
//! connections (the walk of the flow maps, the socket-table check): after a
//! run that cost `t` of CPU time, the next waits at least `factor × t`, so
//! the job never takes more than 1/(factor + 1) of a CPU, however large the
//! tables get. CPU time, not wall time: on a starved machine a run's wall
//! time says how busy the machine was, not what the run cost.

use std::time::{Duration, Instant};

/// CPU time (user and system) the calling thread has used.
fn thread_cpu_time() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

/// Runs `f` and returns its result and the CPU time it cost this thread.
pub fn cpu_cost<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let before = thread_cpu_time();
    let out = f();
    (out, thread_cpu_time().saturating_sub(before))
}

/// How early a run may come (see [`Pacer::due`]).
pub const TICK_JITTER: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
pub struct Pacer {
    /// The gap when runs are quick.
    every: Duration,
    /// How many times its last duration a run waits at least.
    factor: u32,
    /// The longest gap, whatever the runs cost (timers depend on the walk).
    cap: Option<Duration>,
    /// When the last run started (`None`: never ran, so due at once).
    last: Option<Instant>,
    took: Duration,
}

impl Pacer {
    pub fn new(every: Duration, factor: u32, cap: Option<Duration>) -> Pacer {
        Pacer {
            every,
            factor,
            cap,
            last: None,
            took: Duration::ZERO,
        }
    }

    /// The wait after the last run.
    pub fn gap(&self) -> Duration {
        let gap = self.every.max(self.took * self.factor);
        self.cap.map_or(gap, |cap| gap.min(cap))
    }

    /// Whether a run is due at `now`: the gap has passed since the last run
    /// started, give or take [`TICK_JITTER`] (the agent asks once a second,
    /// on a timer that may fire a little early or late).
    pub fn due(&self, now: Instant) -> bool {
        self.last
            .is_none_or(|last| now.saturating_duration_since(last) + TICK_JITTER >= self.gap())
    }

    /// A run that started at `started` cost `took` (CPU time).
    pub fn ran(&mut self, started: Instant, took: Duration) {
        self.last = Some(started);
        self.took = took;
    }
}

/// A round of socket-table checks, one per namespace, spread over the
/// round's period: with hundreds of namespaces, checking all of them in one
/// tick held the host's lock (and the timers) for most of a second. Each
/// tick takes its share; the round's CPU time, summed, paces the next.
#[derive(Debug, Default)]
pub struct Round {
    queue: std::collections::VecDeque<u32>,
    share: usize,
    started: Option<Instant>,
    cost: Duration,
}

impl Round {
    /// Whether a round is under way.
    pub fn running(&self) -> bool {
        self.started.is_some()
    }

    /// Starts a round over `slots`, to be done in about `ticks` ticks.
    pub fn start(&mut self, slots: impl IntoIterator<Item = u32>, ticks: u32, now: Instant) {
        self.queue = slots.into_iter().collect();
        self.share = self.queue.len().div_ceil(ticks.max(1) as usize).max(1);
        self.started = Some(now);
        self.cost = Duration::ZERO;
    }

    /// The namespaces this tick checks.
    pub fn take(&mut self) -> Vec<u32> {
        let n = self.share.min(self.queue.len());
        self.queue.drain(..n).collect()
    }

    /// A check of the round cost `took`.
    pub fn add(&mut self, took: Duration) {
        self.cost += took;
    }

    /// When the queue is empty: the round is over, and when it started and
    /// what it cost are returned (once).
    pub fn finished(&mut self) -> Option<(Instant, Duration)> {
        if !self.queue.is_empty() {
            return None;
        }
        self.started.take().map(|at| (at, self.cost))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn cpu_cost_counts_work_not_sleep() {
        let ((), slept) = cpu_cost(|| std::thread::sleep(Duration::from_millis(50)));
        assert!(slept < Duration::from_millis(20), "{slept:?}");
        let (_, spun) = cpu_cost(|| {
            let t = std::time::Instant::now();
            let mut x = 0u64;
            while t.elapsed() < Duration::from_millis(50) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            x
        });
        assert!(spun >= Duration::from_millis(30), "{spun:?}");
    }

    #[test]
    fn quick_runs_keep_the_period_slow_ones_stretch_it_up_to_the_cap() {
        let mut p = Pacer::new(SEC, 9, Some(5 * SEC));
        let t0 = Instant::now();
        assert!(p.due(t0), "never ran: due at once");
        p.ran(t0, Duration::from_millis(20));
        assert_eq!(p.gap(), SEC);
        assert!(!p.due(t0 + SEC / 2) && p.due(t0 + SEC));
        // A tick a few milliseconds early still runs it.
        assert!(p.due(t0 + SEC - Duration::from_millis(5)));
        p.ran(t0, Duration::from_millis(300));
        assert_eq!(p.gap(), Duration::from_millis(2700));
        p.ran(t0, Duration::from_millis(800));
        assert_eq!(p.gap(), 5 * SEC, "capped");
        let uncapped = Pacer {
            cap: None,
            ..p.clone()
        };
        assert_eq!(uncapped.gap(), Duration::from_millis(7200));
    }

    #[test]
    fn a_round_is_spread_over_its_ticks_and_reports_its_whole_cost_once() {
        let mut r = Round::default();
        assert!(!r.running());
        let t0 = Instant::now();
        r.start(0..25, 10, t0);
        let mut seen = Vec::new();
        let mut ticks = 0;
        while r.running() {
            let now = r.take();
            assert!(now.len() <= 3, "{now:?}");
            for _ in &now {
                r.add(Duration::from_millis(2));
            }
            seen.extend(now);
            ticks += 1;
            if let Some((at, cost)) = r.finished() {
                assert_eq!((at, cost), (t0, Duration::from_millis(50)));
            }
        }
        assert_eq!(
            seen,
            (0..25).collect::<Vec<_>>(),
            "each namespace once, in order"
        );
        assert_eq!(ticks, 9, "25 namespaces, 3 a tick");
        assert_eq!(r.finished(), None, "reported once");
        // One namespace: checked at once, as before rounds.
        r.start([7], 10, t0);
        assert_eq!(r.take(), vec![7]);
        assert!(r.finished().is_some());
    }
}
