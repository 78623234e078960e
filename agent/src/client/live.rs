//! What a live client keeps between two snapshots of the agent: the history of
//! each state's count (for sparklines) and the rates of the probe's events.
//! Pure: `tcpstate top` and `tcpstate watch` both feed it snapshots.

use std::collections::VecDeque;

use serde::Serialize;
use tcpstate_common::TcpState;

use crate::snapshot::Snapshot;

/// Events per second, from two snapshots' counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Connections opened (flows created).
    pub opens: f64,
    /// Connections closed.
    pub closes: f64,
    /// RSTs that took effect.
    pub resets: f64,
    /// Connection attempts (SYNs) to this host.
    pub syns: f64,
    /// Handshakes that failed (refused, reset or timed out).
    pub failed_handshakes: f64,
    /// Packets the probe saw, both hooks.
    pub packets: f64,
}

impl Rates {
    /// The rates between `before` and `now`; `None` if the clock did not move
    /// forward (the same snapshot twice, or an agent restarted in between).
    pub fn between(before: &Snapshot, now: &Snapshot) -> Option<Rates> {
        if now.uptime_ms <= before.uptime_ms {
            return None;
        }
        let secs = (now.uptime_ms - before.uptime_ms) as f64 / 1000.0;
        let per_s = |names: &[&str]| -> f64 {
            let sum = |s: &Snapshot| -> u64 {
                names
                    .iter()
                    .map(|n| s.events.get(*n).and_then(|v| v.as_u64()).unwrap_or(0))
                    .sum()
            };
            sum(now).saturating_sub(sum(before)) as f64 / secs
        };
        Some(Rates {
            opens: per_s(&["flows_opened"]),
            closes: per_s(&["flows_closed"]),
            resets: per_s(&["resets"]),
            syns: per_s(&["syns_received"]),
            failed_handshakes: per_s(&["handshakes_failed"]),
            packets: per_s(&["packets_in", "packets_out"]),
        })
    }
}

/// A live client's memory: the last snapshot, the rates since the one
/// before, and up to `capacity` past counts of each state.
#[derive(Clone, Debug)]
pub struct Live {
    capacity: usize,
    history: Vec<VecDeque<u64>>,
    pub last: Option<Snapshot>,
    /// `None` until two snapshots of the same agent run were seen.
    pub rates: Option<Rates>,
}

impl Live {
    pub fn new(capacity: usize) -> Live {
        Live {
            capacity,
            history: vec![VecDeque::with_capacity(capacity); TcpState::REPORTED.len()],
            last: None,
            rates: None,
        }
    }

    /// Takes a new snapshot. An agent that restarted (its uptime went back)
    /// starts the history afresh.
    pub fn update(&mut self, snap: Snapshot) {
        if let Some(before) = &self.last {
            match Rates::between(before, &snap) {
                Some(r) => self.rates = Some(r),
                None if snap.uptime_ms < before.uptime_ms => {
                    self.history.iter_mut().for_each(VecDeque::clear);
                    self.rates = None;
                }
                None => {}
            }
        }
        if let Some(counts) = snap.state_counts() {
            for (h, n) in self.history.iter_mut().zip(counts.0) {
                if h.len() == self.capacity {
                    h.pop_front();
                }
                h.push_back(n);
            }
        }
        self.last = Some(snap);
    }

    /// The past counts of `state`, oldest first.
    pub fn history(&self, state: TcpState) -> Vec<u64> {
        TcpState::REPORTED
            .iter()
            .position(|s| *s == state)
            .map(|i| self.history[i].iter().copied().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use tcpstate_common::Counters;

    use super::*;
    use crate::snapshot::StateCounts;

    fn snap(uptime_ms: u64, established: u64, opened: u64, xdp: u64, tc: u64) -> Snapshot {
        let mut c = Counters::default();
        c.events[tcpstate_common::Event::FlowsOpened as usize] = opened;
        c.events[tcpstate_common::Event::PacketsIn as usize] = xdp;
        c.events[tcpstate_common::Event::PacketsOut as usize] = tc;
        let mut states = StateCounts::default();
        states.set(TcpState::Established, established);
        let mut s = Snapshot::new(None, vec![], states, &c, 1024, 0);
        s.uptime_ms = uptime_ms;
        s
    }

    #[test]
    fn rates_are_counter_deltas_over_the_agents_clock() {
        let r = Rates::between(&snap(1000, 0, 10, 100, 50), &snap(3000, 0, 30, 300, 250)).unwrap();
        assert_eq!(r.opens, 10.0);
        assert_eq!(r.packets, 200.0);
        assert_eq!(r.resets, 0.0);
        assert!(Rates::between(&snap(3000, 0, 0, 0, 0), &snap(3000, 0, 5, 0, 0)).is_none());
    }

    #[test]
    fn history_keeps_the_last_capacity_counts_and_restarts_with_the_agent() {
        let mut live = Live::new(3);
        for (t, n) in [(1000, 1), (2000, 2), (3000, 3), (4000, 4)] {
            live.update(snap(t, n, 0, 0, 0));
        }
        assert_eq!(live.history(TcpState::Established), [2, 3, 4]);
        assert_eq!(live.history(TcpState::Listen), [0, 0, 0]);
        live.update(snap(500, 9, 0, 0, 0));
        assert_eq!(live.history(TcpState::Established), [9]);
    }
}
