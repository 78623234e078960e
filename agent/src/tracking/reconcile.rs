//! Reconciliation with the kernel's socket table: the policy for what packets
//! cannot settle (a FIN or RST lost before the probe saw it, a connection that
//! changed between the seeding read and the attach, a timer that fired a
//! moment before ours).
//!
//! Every `--reconcile-interval` the agent reads the socket table of the
//! namespace and compares it, socket by socket, with the local endpoints in the
//! flow maps. A mismatch seen twice, unchanged, is corrected (the kernel's
//! state wins; a socket the kernel no longer has is closed, one the maps miss
//! is added) through the probe's command program, so counters and entries
//! stay consistent: at the next check, or sooner, when the check's
//! mismatches are looked at again one socket at a time ([`CONFIRM_AFTER`]
//! later). Transient mismatches (a segment in flight between the two reads)
//! do not survive to a second look. Corrections and the last difference per
//! state are exported: on a healthy host both stay 0.

use std::collections::HashMap;

use netlink_packet_sock_diag::inet::StateFlags;
use tcpstate_common::{
    Side, TcpState, Word,
    command::{op, outcome},
    machine::peer_state,
};

use crate::{
    error::Result,
    kernel::{maps::FlowRef, probe::Probe, sockdiag::SockDiag},
    tracking::{seed::flow_of, timers::monotonic_ns},
};

/// How long after a check its mismatches are looked at again: far longer
/// than a segment in flight takes, well inside the second a difference may
/// last.
const CONFIRM_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

/// At most this many mismatches are confirmed one by one; more wait for the
/// next check of the whole table.
const CONFIRM_MAX: usize = 1024;

/// One local endpoint: a flow and its side.
pub type Endpoint = (FlowRef, Side);

/// A mismatch: what the flow maps say, what the kernel says (`None`: no socket).
pub type Mismatch = (TcpState, Option<TcpState>);

/// A change to make to the flow maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fix {
    /// Swap the entry's word from `expect` to `new`.
    Swap {
        flow: FlowRef,
        expect: Word,
        new: Word,
    },
    /// Create the entry (the kernel has a connection the maps lack).
    Seed { flow: FlowRef, word: Word },
}

/// Compares the maps' local endpoints with the kernel's sockets. Returns the
/// fixes for mismatches also present (unchanged) in `before`, and the
/// mismatches of this check, to pass as `before` next time.
pub fn plan(
    entries: &HashMap<FlowRef, Word>,
    kernel: &HashMap<Endpoint, TcpState>,
    before: &HashMap<Endpoint, Mismatch>,
) -> (Vec<(Fix, Mismatch)>, HashMap<Endpoint, Mismatch>) {
    let mut now: HashMap<Endpoint, Mismatch> = HashMap::new();
    // What the maps count, endpoint by endpoint.
    for (&flow, &w) in entries {
        for side in [Side::A, Side::B] {
            let ours = w.counted(side);
            let theirs = kernel.get(&(flow, side)).copied();
            if ours != TcpState::None && Some(ours) != theirs {
                now.insert((flow, side), (ours, theirs));
            }
        }
    }
    // What the kernel has that the maps do not count.
    for (&(flow, side), &theirs) in kernel {
        let ours = entries
            .get(&flow)
            .map_or(TcpState::None, |w| w.counted(side));
        if ours == TcpState::None {
            now.insert((flow, side), (TcpState::None, Some(theirs)));
        }
    }
    // Fix what was already wrong, the same way, at the previous check. Fixes
    // to one flow build on each other (both ends on this host).
    let mut words: HashMap<FlowRef, (Word, Word)> = HashMap::new();
    let mut seeds: HashMap<FlowRef, Word> = HashMap::new();
    let mut fixed = Vec::new();
    let mut confirmed: Vec<(&Endpoint, &Mismatch)> = now
        .iter()
        .filter(|(ep, m)| before.get(ep) == Some(m))
        .collect();
    confirmed.sort_by_key(|(ep, _)| format!("{ep:?}"));
    for (&(flow, side), &(_, theirs)) in confirmed {
        let target = theirs.unwrap_or(TcpState::Close);
        match entries.get(&flow) {
            Some(&w) if !w.is_reaping() => {
                let (_, cur) = words.entry(flow).or_insert((w, w));
                let base = if cur.is_dead() { Word::EMPTY } else { *cur };
                let mut new = base.with_state(side, target);
                if theirs.is_some() {
                    new = new.with_local(side);
                    if !new.is_local(side.other()) && new.state(side.other()) == TcpState::None {
                        new = new.with_state(side.other(), peer_state(target));
                    }
                }
                *cur = new.settle();
            }
            Some(_) => {}
            None => {
                let w = seeds.entry(flow).or_insert(Word::EMPTY);
                *w = w.with_state(side, target).with_local(side);
                if !w.is_local(side.other()) {
                    *w = w.with_state(side.other(), peer_state(target));
                }
            }
        }
    }
    for (flow, (expect, new)) in words {
        if new != expect {
            let m = mismatch_of(&now, flow);
            fixed.push((Fix::Swap { flow, expect, new }, m));
        }
    }
    for (flow, word) in seeds {
        let m = mismatch_of(&now, flow);
        fixed.push((
            Fix::Seed {
                flow,
                word: word.settle(),
            },
            m,
        ));
    }
    (fixed, now)
}

impl Fix {
    /// The flow it changes.
    pub fn flow(&self) -> FlowRef {
        match *self {
            Fix::Swap { flow, .. } | Fix::Seed { flow, .. } => flow,
        }
    }
}

fn mismatch_of(now: &HashMap<Endpoint, Mismatch>, flow: FlowRef) -> Mismatch {
    [Side::A, Side::B]
        .iter()
        .find_map(|s| now.get(&(flow, *s)).copied())
        .unwrap_or((TcpState::None, None))
}

/// The reconciler's memory and what it reports.
#[derive(Default)]
pub struct Reconciler {
    before: HashMap<Endpoint, Mismatch>,
    /// When the mismatches of the last check are looked at again, one
    /// socket at a time (CLOCK_MONOTONIC ns).
    confirm_at: Option<u64>,
    /// Corrections made, by the state the maps had counted (`None` slot:
    /// sockets the maps had missed).
    pub corrections: [u64; 16],
    /// At the last check: maps' count minus the kernel's, per state.
    pub drift: [i64; 16],
}

impl Reconciler {
    /// One check (and the fixes it confirms). `netns`: the namespace's
    /// slot; `entries`: its flow entries (read once for every namespace
    /// checked).
    pub fn check(
        &mut self,
        probe: &Probe,
        netns: u32,
        diag: &mut SockDiag,
        entries: Vec<(FlowRef, tcpstate_common::FlowEntry)>,
    ) -> Result<usize> {
        let mut kernel: HashMap<Endpoint, TcpState> = HashMap::new();
        let states = StateFlags::all() - StateFlags::LISTEN - StateFlags::CLOSE;
        diag.for_each(states, |s| {
            if let Some(ep) = flow_of(netns, s) {
                kernel.insert(ep, TcpState::from_bits(s.state));
            }
        })?;
        let entries: HashMap<FlowRef, Word> = entries
            .into_iter()
            .map(|(f, e)| (f, Word(e.word)))
            .collect();
        let counters = probe.counters(netns)?;
        let mut kernel_counts = [0i64; 16];
        for s in kernel.values() {
            kernel_counts[*s as usize] += 1;
        }
        for (i, d) in self.drift.iter_mut().enumerate() {
            *d = if i == TcpState::Listen as usize || i == TcpState::Close as usize {
                0
            } else {
                counters.states[i] - kernel_counts[i]
            };
        }
        let (fixes, now) = plan(&entries, &kernel, &self.before);
        self.before = now;
        let done = self.apply(probe, fixes)?;
        // What is left unfixed is looked at again soon.
        self.confirm_at = (!self.before.is_empty() && self.before.len() <= CONFIRM_MAX)
            .then(|| monotonic_ns() + CONFIRM_AFTER.as_nanos() as u64);
        Ok(done)
    }

    /// When the last check's mismatches are due to be confirmed, if any.
    pub fn confirm_at(&self) -> Option<u64> {
        self.confirm_at
    }

    /// The last check's mismatches, looked at again one socket at a time
    /// (an exact lookup each): those still the same are fixed. A check
    /// reads the whole table and runs once a second at most; a mismatch
    /// confirmed only by the next would last two seconds.
    pub fn confirm(&mut self, probe: &Probe, netns: u32, diag: &mut SockDiag) -> Result<usize> {
        self.confirm_at = None;
        let mut sides: HashMap<FlowRef, [bool; 2]> = HashMap::new();
        for &(flow, side) in self.before.keys() {
            sides.entry(flow).or_default()[side.index()] = true;
        }
        let mut entries: HashMap<FlowRef, Word> = HashMap::new();
        let mut kernel: HashMap<Endpoint, TcpState> = HashMap::new();
        for (flow, mut look) in sides {
            if let Some(e) = probe.flow_entry(&flow)? {
                let w = Word(e.word);
                for side in [Side::A, Side::B] {
                    look[side.index()] |= w.counted(side) != TcpState::None;
                }
                entries.insert(flow, w);
            }
            for side in [Side::A, Side::B].into_iter().filter(|s| look[s.index()]) {
                let (local, lport) = flow.endpoint(side);
                let (remote, rport) = flow.endpoint(side.other());
                let Some(s) = diag.lookup(local, lport, remote, rport)? else {
                    continue;
                };
                let state = TcpState::from_bits(s.state);
                if !matches!(state, TcpState::Listen | TcpState::Close | TcpState::None)
                    && flow_of(netns, &s) == Some((flow, side))
                {
                    kernel.insert((flow, side), state);
                }
            }
        }
        let (fixes, now) = plan(&entries, &kernel, &self.before);
        self.before = now;
        self.apply(probe, fixes)
    }

    /// Makes the fixes through the probe's command program; counts them.
    fn apply(&mut self, probe: &Probe, fixes: Vec<(Fix, Mismatch)>) -> Result<usize> {
        let mut done = 0;
        for (fix, (ours, _)) in fixes {
            let cmd = match fix {
                Fix::Swap { flow, expect, new } => {
                    let mut cmd = flow.command(expect.0, new.0);
                    cmd.op = op::CORRECT;
                    cmd
                }
                Fix::Seed { flow, word } => {
                    let mut cmd = flow.command(0, word.0);
                    cmd.op = op::SEED;
                    cmd.changed_ns = monotonic_ns();
                    cmd
                }
            };
            if probe.command(&cmd)? == outcome::DONE {
                self.corrections[ours as usize] += 1;
                done += 1;
                // Fixed: the same mismatch found again is news, and waits
                // for its own confirmation.
                for side in [Side::A, Side::B] {
                    self.before.remove(&(fix.flow(), side));
                }
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use tcpstate_common::FlowKey4;

    use super::*;

    fn flow(port: u16) -> (FlowRef, Side) {
        let (k, side) = FlowKey4::new(0, 1, port, 2, 80);
        (FlowRef::V4(k), side)
    }

    fn word(side: Side, ours: TcpState, peer: TcpState) -> Word {
        Word::EMPTY
            .with_state(side, ours)
            .with_state(side.other(), peer)
            .with_local(side)
    }

    #[test]
    fn a_mismatch_is_fixed_only_when_seen_twice_unchanged() {
        let (f, side) = flow(1000);
        let entries =
            HashMap::from([(f, word(side, TcpState::Established, TcpState::Established))]);
        let kernel = HashMap::new(); // the socket is gone
        let (fixes, seen) = plan(&entries, &kernel, &HashMap::new());
        assert!(fixes.is_empty(), "first sight: wait");
        let (fixes, _) = plan(&entries, &kernel, &seen);
        assert_eq!(fixes.len(), 1);
        let Fix::Swap { new, .. } = fixes[0].0 else {
            panic!("a swap")
        };
        assert_eq!(new.counted(side), TcpState::None);
        assert!(new.is_dead());
    }

    #[test]
    fn a_changed_mismatch_starts_over() {
        let (f, side) = flow(1000);
        let entries = HashMap::from([(f, word(side, TcpState::FinWait1, TcpState::CloseWait))]);
        let first = HashMap::from([((f, side), TcpState::FinWait2)]);
        let (_, seen) = plan(&entries, &first, &HashMap::new());
        let second = HashMap::from([((f, side), TcpState::TimeWait)]);
        let (fixes, _) = plan(&entries, &second, &seen);
        assert!(
            fixes.is_empty(),
            "the kernel moved on: a segment may be in flight"
        );
    }

    #[test]
    fn the_kernels_state_wins_and_missing_sockets_are_added() {
        let (f1, s1) = flow(1000);
        let (f2, s2) = flow(2000);
        let entries = HashMap::from([(f1, word(s1, TcpState::Established, TcpState::Established))]);
        let kernel = HashMap::from([
            ((f1, s1), TcpState::CloseWait),
            ((f2, s2), TcpState::Established),
        ]);
        let (_, seen) = plan(&entries, &kernel, &HashMap::new());
        let (fixes, _) = plan(&entries, &kernel, &seen);
        assert_eq!(fixes.len(), 2);
        for (fix, _) in fixes {
            match fix {
                Fix::Swap { flow, new, .. } => {
                    assert_eq!(flow, f1);
                    assert_eq!(new.counted(s1), TcpState::CloseWait);
                }
                Fix::Seed { flow, word } => {
                    assert_eq!(flow, f2);
                    assert_eq!(word.counted(s2), TcpState::Established);
                    assert_eq!(word.counted(s2.other()), TcpState::None);
                }
            }
        }
    }

    #[test]
    fn agreement_needs_no_fix() {
        let (f, side) = flow(1000);
        let entries = HashMap::from([(f, word(side, TcpState::TimeWait, TcpState::Close))]);
        let kernel = HashMap::from([((f, side), TcpState::TimeWait)]);
        let (fixes, seen) = plan(&entries, &kernel, &HashMap::new());
        assert!(fixes.is_empty() && seen.is_empty());
    }
}
