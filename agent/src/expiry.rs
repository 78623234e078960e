//! The kernel's timers, applied to flow entries: a local endpoint in
//! TIME_WAIT, FIN_WAIT2, SYN_SENT or SYN_RECV leaves the socket table when
//! Linux's timer for that state fires, without sending a packet. The agent
//! sweeps the flow map once a second and closes such endpoints through the
//! probe's command program (same compare-and-swap and counter update as the
//! data path), then deletes entries that no longer hold a local socket.

use std::time::Duration;

use tcpstate_common::{Side, TcpState, Word, command::outcome, machine::expire};

use crate::{error::Result, netns::sysctl_u64, probe::Probe};

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
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            time_wait: Duration::from_secs(60),
            fin_wait2: Duration::from_secs(60),
            syn_sent: retries_span(6),
            syn_recv: retries_span(5),
            dead_grace: Duration::from_secs(1),
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
}

/// What one entry needs, given its age in its current state: the word to
/// swap in, or `None` to leave it.
pub fn decide(word: Word, age: Duration, t: &Timeouts) -> Option<Word> {
    if word.is_reaping() {
        return None;
    }
    if word.is_dead() {
        return (age >= t.dead_grace).then(|| word.reaping());
    }
    let mut new = word;
    for side in [Side::A, Side::B] {
        if word.is_local(side)
            && t.for_state(word.state(side))
                .is_some_and(|limit| age >= limit)
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

/// One pass over the flow map.
pub fn sweep(probe: &Probe, t: &Timeouts) -> Result<SweepStats> {
    let now = monotonic_ns();
    // Collect first: deleting while walking the map would restart the walk.
    let entries = probe.flow_entries()?;
    let mut stats = SweepStats::default();
    for (key, entry) in entries {
        let word = Word(entry.word);
        let age = Duration::from_nanos(now.saturating_sub(entry.changed_ns));
        let Some(new) = decide(word, age, t) else {
            continue;
        };
        let cmd = key.command(word.0, new.0);
        // CHANGED means a packet moved the entry first; the next sweep looks again.
        if probe.command(&cmd)? == outcome::DONE {
            if new.is_reaping() {
                stats.reaped += 1;
            } else {
                stats.expired += 1;
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(decide(w, Duration::from_secs(59), &t), None);
        let new = decide(w, Duration::from_secs(60), &t).expect("expired");
        assert_eq!(new.state(Side::A), TcpState::Close);
        assert!(new.is_dead());
    }

    #[test]
    fn remote_endpoints_and_untimed_states_are_left_alone() {
        let t = Timeouts::default();
        let remote_tw = word(TcpState::TimeWait, TcpState::Established, false);
        assert_eq!(decide(remote_tw, Duration::from_secs(3600), &t), None);
        let est = word(TcpState::Established, TcpState::Established, true);
        assert_eq!(decide(est, Duration::from_secs(3600), &t), None);
    }

    #[test]
    fn dead_entries_are_reaped_after_the_grace_period() {
        let t = Timeouts::default();
        let dead = word(TcpState::Close, TcpState::Close, true).settle();
        assert!(dead.is_dead());
        assert_eq!(decide(dead, Duration::ZERO, &t), None);
        assert_eq!(decide(dead, t.dead_grace, &t), Some(dead.reaping()));
        assert_eq!(decide(dead.reaping(), Duration::from_secs(100), &t), None);
    }
}
