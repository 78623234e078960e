//! When the kernel's TIME_WAIT and FIN_WAIT2 timers really fire. Linux arms
//! them for 60 s (or tcp_fin_timeout) in jiffies on its timer wheel, which
//! files a timer that far out in a coarse bucket and fires it at the bucket's
//! end: with HZ=250 a 60 s timer fires up to 2.048 s late, in batches. To
//! drain in step with `ss`, the agent computes the same bucket.

use std::time::Duration;

/// The kernel's jiffies clock against CLOCK_MONOTONIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelClock {
    /// Jiffies at `t0_ns`.
    pub j0: u64,
    /// CLOCK_MONOTONIC nanoseconds.
    pub t0_ns: u64,
    pub hz: u64,
}

/// Timer wheel constants (kernel/time/timer.c): 64 buckets a level, each
/// level 8 times coarser than the one below.
const LVL_CLK_SHIFT: u32 = 3;
const LVL_SIZE: u64 = 64;

impl KernelClock {
    /// Pairs jiffies with CLOCK_MONOTONIC as read by the probe at one moment
    /// (`clocks`), at a jiffy's start: sampled back to back until jiffies
    /// move, so the tick is known within one sample (microseconds). A timer
    /// armed near a bucket edge is then filed in the kernel's own bucket;
    /// with /proc/timer_list's pairing (up to a jiffy off) about one in a
    /// thousand landed a bucket (2 s) off. `None` if jiffies never move.
    pub fn from_clocks(mut clocks: impl FnMut() -> Option<(u64, u64)>) -> Option<KernelClock> {
        let tick = |clocks: &mut dyn FnMut() -> Option<(u64, u64)>| {
            let (j, mut before) = clocks()?;
            // A jiffy is at most 10 ms (HZ=100); give it 50.
            for _ in 0..200_000 {
                let (jn, t) = clocks()?;
                if jn != j {
                    return Some((jn, before + (t - before) / 2));
                }
                before = t;
            }
            None
        };
        let first = tick(&mut clocks)?;
        std::thread::sleep(Duration::from_millis(200));
        KernelClock::from_pairs(first, tick(&mut clocks)?)
    }

    /// Reads /proc/timer_list twice (200 ms apart) for the jiffies/monotonic
    /// pairing and HZ. `None` where it cannot be read (then timers are taken
    /// as exact).
    pub fn read() -> Option<KernelClock> {
        let first = sample()?;
        std::thread::sleep(Duration::from_millis(200));
        KernelClock::from_pairs(first, sample()?)
    }

    /// The clock from two (jiffies, CLOCK_MONOTONIC ns) pairs some time
    /// apart: HZ is the standard value nearest to the rate they show.
    fn from_pairs((j1, t1): (u64, u64), (j2, t2): (u64, u64)) -> Option<KernelClock> {
        let measured = (j2 - j1) as f64 * 1e9 / (t2 - t1) as f64;
        let hz = [100u64, 250, 300, 1000]
            .into_iter()
            .min_by_key(|hz| (*hz as f64 - measured).abs() as u64)?;
        Some(KernelClock {
            j0: j2,
            t0_ns: t2,
            hz,
        })
    }

    fn jiffies_at(&self, ns: u64) -> u64 {
        // Floor, also for moments before the pairing (seeded timers).
        let dt = ns as i128 - self.t0_ns as i128;
        (self.j0 as i128 + (dt * self.hz as i128).div_euclid(1_000_000_000)) as u64
    }

    fn ns_at(&self, jiffies: u64) -> u64 {
        let dj = jiffies as i128 - self.j0 as i128;
        (self.t0_ns as i128 + (dj * 1_000_000_000).div_euclid(self.hz as i128)) as u64
    }

    /// When a timer armed at `armed_ns` for `timeout` fires.
    pub fn fire_ns(&self, armed_ns: u64, timeout: Duration) -> u64 {
        let delta = timeout.as_secs() * self.hz
            + u64::from(timeout.subsec_nanos()) * self.hz / 1_000_000_000;
        let expires = self.jiffies_at(armed_ns) + delta;
        self.ns_at(bucket_end(expires, delta))
    }
}

/// The jiffy at which the wheel fires a timer due at `expires`, armed `delta`
/// jiffies ahead: the end of its bucket on the level `delta` selects.
pub fn bucket_end(expires: u64, delta: u64) -> u64 {
    let mut lvl = 0;
    while lvl < 8 && delta >= (LVL_SIZE - 1) << (lvl * LVL_CLK_SHIFT) {
        lvl += 1;
    }
    if lvl == 0 {
        return expires;
    }
    let shift = lvl * LVL_CLK_SHIFT;
    ((expires >> shift) + 1) << shift
}

/// One (jiffies, monotonic ns) pair from /proc/timer_list.
fn sample() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/timer_list").ok()?;
    let now = text
        .lines()
        .find_map(|l| l.strip_prefix("now at "))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let jiffies = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("jiffies: "))?
        .trim()
        .parse()
        .ok()?;
    Some((jiffies, now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sixty_seconds_at_250_hz_fall_in_512_jiffy_buckets() {
        // 15,000 jiffies ahead: level 3, 512-jiffy buckets (2.048 s).
        assert_eq!(bucket_end(100_000, 15_000), 100_352);
        assert_eq!(
            bucket_end(100_352, 15_000),
            100_864,
            "a bucket end itself moves to the next"
        );
        // At 1000 Hz: 60,000 jiffies, level 4, 4096-jiffy buckets.
        assert_eq!(bucket_end(1_000_000, 60_000), 1_003_520);
        // Near timers are exact.
        assert_eq!(bucket_end(500, 10), 500);
    }

    #[test]
    fn the_pairing_finds_the_tick() {
        // A 250 Hz kernel whose jiffy 1000 began at 7,000,001,234 ns.
        const BASE: i64 = 7_000_001_234;
        let jiffy = |ns: i64| 1000 + (ns - BASE).div_euclid(4_000_000);
        // Its time runs with the real one (the pairing really sleeps),
        // plus 3 µs a call.
        let start = std::time::Instant::now();
        let mut calls = 0i64;
        let clocks = || {
            calls += 1;
            let now = 7_000_000_000 + start.elapsed().as_nanos() as i64 + calls * 3_000;
            Some((jiffy(now) as u64, now as u64))
        };
        let c = KernelClock::from_clocks(clocks).unwrap();
        assert_eq!(c.hz, 250);
        // Moments 2 µs either side of tick edges, before and after the
        // pairing, map to the kernel's jiffy.
        for edge in [
            BASE - 40_000_000,
            BASE + 4_000_000 * 3,
            BASE + 60_000_000_000,
        ] {
            for ns in [edge - 2_000, edge + 2_000] {
                assert_eq!(c.jiffies_at(ns as u64) as i64, jiffy(ns), "at {ns}");
            }
        }
    }

    #[test]
    fn fire_times_are_never_early_and_late_by_less_than_a_bucket() {
        let clock = KernelClock {
            j0: 4_296_000_000,
            t0_ns: 5_000_000_000_000,
            hz: 250,
        };
        for armed in (0..50).map(|i| clock.t0_ns + i * 37_000_000) {
            let fire = clock.fire_ns(armed, Duration::from_secs(60));
            let nominal = armed + 60_000_000_000;
            assert!(fire + 4_000_000 >= nominal, "early: {fire} < {nominal}");
            assert!(
                fire <= nominal + 2_048_000_000 + 4_000_000,
                "late by more than a bucket"
            );
        }
    }
}
