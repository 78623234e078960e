//! The kernel's timers, applied to flow entries: a local endpoint in
//! TIME_WAIT, FIN_WAIT2, SYN_SENT or SYN_RECV leaves the socket table when
//! Linux's timer for that state fires, without sending a packet. The agent
//! walks the flow maps once a second, files each running timer by its
//! deadline ([`Timers`]), and closes the endpoints that are due through the
//! probe's command program (same compare-and-swap and counter update as the
//! data path), then deletes entries that no longer hold a local socket.

use std::{collections::BTreeMap, time::Duration};

use tcpstate_common::{FlowEntry, Side, TcpState, Word, command::outcome, machine::expire};

use crate::{
    error::Result,
    kernel::{
        clock::KernelClock,
        netns::sysctl_u64,
        probe::{FlowRef, Probe},
    },
};

/// How long each timed state lasts in the monitored namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP_TIMEWAIT_LEN: fixed at 60 s in Linux.
    pub time_wait: Duration,
    /// net.ipv4.tcp_fin_timeout (orphaned FIN_WAIT2 sockets).
    pub fin_wait2: Duration,
    /// Until the last SYN retransmission (net.ipv4.tcp_syn_retries) times out.
    pub syn_sent: Duration,
    /// Until the last SYN-ACK retransmission (net.ipv4.tcp_synack_retries) times out.
    pub syn_recv: Duration,
    /// How long a dead entry stays before it is deleted.
    pub dead_grace: Duration,
    /// The kernel's timer wheel, for TIME_WAIT and FIN_WAIT2 (None: exact).
    pub clock: Option<KernelClock>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            time_wait: Duration::from_secs(60),
            fin_wait2: Duration::from_secs(60),
            syn_sent: retries_span(6),
            syn_recv: retries_span(5),
            dead_grace: Duration::from_secs(1),
            clock: None,
        }
    }
}

/// Time from the first transmission until the retransmission timer gives up
/// after `retries` retries, with the initial RTO of 1 s doubling each time.
pub fn retries_span(retries: u64) -> Duration {
    Duration::from_secs((1u64 << (retries.min(30) + 1)) - 1)
}

impl Timeouts {
    /// Reads the sysctls of the calling thread's network namespace.
    pub fn from_sysctls() -> Timeouts {
        let d = Timeouts::default();
        Timeouts {
            fin_wait2: sysctl_u64("net/ipv4/tcp_fin_timeout")
                .map_or(d.fin_wait2, Duration::from_secs),
            syn_sent: sysctl_u64("net/ipv4/tcp_syn_retries").map_or(d.syn_sent, retries_span),
            syn_recv: sysctl_u64("net/ipv4/tcp_synack_retries").map_or(d.syn_recv, retries_span),
            clock: KernelClock::read(),
            ..d
        }
    }

    pub fn for_state(&self, s: TcpState) -> Option<Duration> {
        match s {
            TcpState::TimeWait => Some(self.time_wait),
            TcpState::FinWait2 => Some(self.fin_wait2),
            TcpState::SynSent => Some(self.syn_sent),
            TcpState::SynRecv => Some(self.syn_recv),
            _ => None,
        }
    }

    /// When the kernel ends a local endpoint that entered `s` at `since_ns`.
    pub fn ends_at(&self, s: TcpState, since_ns: u64) -> Option<u64> {
        let limit = self.for_state(s)?;
        Some(match (s, self.clock) {
            // TIME_WAIT and FIN_WAIT2 (time-wait sockets): wheel timers.
            (TcpState::TimeWait | TcpState::FinWait2, Some(clock)) => {
                clock.fire_ns(since_ns, limit)
            }
            _ => since_ns.saturating_add(limit.as_nanos() as u64),
        })
    }
}

/// When [`decide`] first wants to change an entry that changed at
/// `changed_ns`: the earliest of its local endpoints' timers (or the end of a
/// dead entry's grace). `None` for an entry no timer ends.
pub fn deadline(word: Word, changed_ns: u64, t: &Timeouts) -> Option<u64> {
    if word.is_reaping() {
        return None;
    }
    if word.is_dead() {
        return Some(changed_ns.saturating_add(t.dead_grace.as_nanos() as u64));
    }
    [Side::A, Side::B]
        .into_iter()
        .filter(|s| word.is_local(*s))
        .filter_map(|s| t.ends_at(word.state(s), changed_ns))
        .min()
}

/// What an entry that changed at `changed_ns` needs at `now_ns`: the word to
/// swap in, or `None` to leave it.
pub fn decide(word: Word, changed_ns: u64, now_ns: u64, t: &Timeouts) -> Option<Word> {
    if word.is_reaping() {
        return None;
    }
    if word.is_dead() {
        return deadline(word, changed_ns, t)
            .is_some_and(|at| now_ns >= at)
            .then(|| word.reaping());
    }
    let mut new = word;
    for side in [Side::A, Side::B] {
        if word.is_local(side)
            && t.ends_at(word.state(side), changed_ns)
                .is_some_and(|at| now_ns >= at)
        {
            new = expire(new, side);
        }
    }
    (new != word).then_some(new)
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SweepStats {
    pub expired: u64,
    pub reaped: u64,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// The kernel's timers, kept to within a fraction of a second: a walk of the
/// flow maps once a second finds every entry with a timer running and files
/// it by deadline; a short tick fires what is due. An entry that changed since
/// the walk is left alone (its swap finds a different word) and filed again
/// by the next walk.
#[derive(Default)]
pub struct Timers {
    due: BTreeMap<u64, Vec<(FlowRef, Word, u64)>>,
}

/// How far ahead a walk files timers: ten walk periods when walks are quick,
/// twice the longest gap between walks when they are slow (see the agent's
/// pacing), so a walk delayed by a busy machine never leaves a due timer
/// unfiled.
pub const FILING_HORIZON: Duration = Duration::from_secs(10);
const FILING_HORIZON_NS: u64 = FILING_HORIZON.as_nanos() as u64;

impl Timers {
    /// Walks the flow maps: acts on what is due, files the rest.
    pub fn walk(&mut self, probe: &Probe, t: &Timeouts) -> Result<SweepStats> {
        // Collect first: deleting while walking the map would restart the walk.
        let entries = probe.flow_entries()?;
        self.file(&entries, probe, t)
    }

    /// Files the timers of `entries` (read from the flow maps just before)
    /// and acts on what is due.
    pub fn file(
        &mut self,
        entries: &[(FlowRef, FlowEntry)],
        probe: &Probe,
        t: &Timeouts,
    ) -> Result<SweepStats> {
        self.due.clear();
        // Only what falls due in the next seconds is filed: later deadlines
        // are filed by a later walk, so a million half-open connections do
        // not mean a million timers held in memory.
        let now = monotonic_ns();
        let horizon = now.saturating_add(FILING_HORIZON_NS);
        for &(flow, entry) in entries {
            let changed_ns = entry.changed_ns(now);
            if let Some(at) = deadline(Word(entry.word), changed_ns, t)
                && at <= horizon
            {
                self.due
                    .entry(at)
                    .or_default()
                    .push((flow, Word(entry.word), changed_ns));
            }
        }
        self.fire(probe, t)
    }

    /// Fires every filed timer whose deadline has passed.
    pub fn fire(&mut self, probe: &Probe, t: &Timeouts) -> Result<SweepStats> {
        let now = monotonic_ns();
        let later = self.due.split_off(&now.saturating_add(1));
        let due = std::mem::replace(&mut self.due, later);
        let mut stats = SweepStats::default();
        for (flow, word, changed_ns) in due.into_values().flatten() {
            let Some(new) = decide(word, changed_ns, now, t) else {
                continue;
            };
            // CHANGED: a packet moved the entry first; the next walk files it again.
            if probe.command(&flow.command(word.0, new.0))? == outcome::DONE {
                if new.is_reaping() {
                    stats.reaped += 1;
                } else {
                    stats.expired += 1;
                    // A dead entry is deleted after its grace: file that too.
                    if let Some(at) = deadline(new, now, t) {
                        self.due.entry(at).or_default().push((flow, new, now));
                    }
                }
            }
        }
        Ok(stats)
    }
}

/// One full pass: act on everything due now.
pub fn sweep(probe: &Probe, t: &Timeouts) -> Result<SweepStats> {
    Timers::default().walk(probe, t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(d: Duration) -> u64 {
        d.as_nanos() as u64
    }

    fn word(a: TcpState, b: TcpState, a_local: bool) -> Word {
        let w = Word::EMPTY.with_state(Side::A, a).with_state(Side::B, b);
        if a_local {
            w.with_local(Side::A)
        } else {
            w.with_local(Side::B)
        }
    }

    #[test]
    fn linux_default_retry_spans() {
        // tcp_syn_retries=6 gives up after 127 s; tcp_synack_retries=5 after 63 s.
        assert_eq!(retries_span(6), Duration::from_secs(127));
        assert_eq!(retries_span(5), Duration::from_secs(63));
    }

    #[test]
    fn time_wait_expires_at_sixty_seconds_and_not_before() {
        let t = Timeouts::default();
        let w = word(TcpState::TimeWait, TcpState::Close, true).settle();
        assert_eq!(decide(w, 0, ns(Duration::from_secs(59)), &t), None);
        let new = decide(w, 0, ns(Duration::from_secs(60)), &t).expect("expired");
        assert_eq!(new.state(Side::A), TcpState::Close);
        assert!(new.is_dead());
    }

    #[test]
    fn remote_endpoints_and_untimed_states_are_left_alone() {
        let t = Timeouts::default();
        let remote_tw = word(TcpState::TimeWait, TcpState::Established, false);
        assert_eq!(
            decide(remote_tw, 0, ns(Duration::from_secs(3600)), &t),
            None
        );
        let est = word(TcpState::Established, TcpState::Established, true);
        assert_eq!(decide(est, 0, ns(Duration::from_secs(3600)), &t), None);
    }

    #[test]
    fn with_the_kernels_wheel_time_wait_ends_at_the_bucket_end() {
        let clock = KernelClock {
            j0: 1_000_000,
            t0_ns: 4_000_000_000,
            hz: 250,
        };
        let t = Timeouts {
            clock: Some(clock),
            ..Timeouts::default()
        };
        let tw = word(TcpState::TimeWait, TcpState::Close, true).settle();
        let at = deadline(tw, clock.t0_ns, &t).unwrap();
        // 15,000 jiffies ahead of jiffy 1,000,000: bucket end 1,015,296.
        assert_eq!(at, clock.t0_ns + (15_296 * 1_000_000_000 / 250));
        assert_eq!(decide(tw, clock.t0_ns, at - 1, &t), None);
        assert!(decide(tw, clock.t0_ns, at, &t).is_some());
        // Handshake timers are retransmission timers: not rounded.
        let syn = word(TcpState::SynSent, TcpState::SynRecv, true);
        assert_eq!(deadline(syn, 7, &t), Some(7 + 127_000_000_000));
    }

    #[test]
    fn deadlines_are_the_earliest_local_timer() {
        let t = Timeouts::default();
        let tw = word(TcpState::TimeWait, TcpState::Close, true).settle();
        assert_eq!(deadline(tw, 5, &t), Some(5 + 60_000_000_000));
        let est = word(TcpState::Established, TcpState::Established, true);
        assert_eq!(deadline(est, 5, &t), None);
        let remote_tw = word(TcpState::TimeWait, TcpState::Established, false);
        assert_eq!(deadline(remote_tw, 5, &t), None);
        let dead = word(TcpState::Close, TcpState::Close, true).settle();
        assert_eq!(deadline(dead, 5, &t), Some(5 + 1_000_000_000));
        // The deadline is exactly when `decide` starts acting.
        let at = deadline(tw, 0, &t).unwrap();
        assert_eq!(decide(tw, 0, ns(Duration::from_nanos(at - 1)), &t), None);
        assert!(decide(tw, 0, ns(Duration::from_nanos(at)), &t).is_some());
    }

    #[test]
    fn dead_entries_are_reaped_after_the_grace_period() {
        let t = Timeouts::default();
        let dead = word(TcpState::Close, TcpState::Close, true).settle();
        assert!(dead.is_dead());
        assert_eq!(decide(dead, 0, ns(Duration::ZERO), &t), None);
        assert_eq!(decide(dead, 0, ns(t.dead_grace), &t), Some(dead.reaping()));
        assert_eq!(
            decide(dead.reaping(), 0, ns(Duration::from_secs(100)), &t),
            None
        );
    }
}
