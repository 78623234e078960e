//! A tracker's part of the once-a-second walk of the flow maps (timers,
//! breakdowns, listeners, local NAT), and counting by port from the maps.

use netlink_packet_sock_diag::inet::StateFlags;
use tcpstate_common::{FlowEntry, Side, TcpState};

use super::Tracker;
use crate::{
    error::Result,
    kernel::{maps::FlowRef, probe::Probe},
    snapshot::{PortFilter, StateCounts},
    tracking::{
        answers,
        attention::Watch,
        breakdown::{Breakdown, Services, local_ends},
        seed,
        timers::{Why, monotonic_ns},
    },
};

/// The most endpoints asked about after the kernel gave up on connections.
const TIMEOUT_SUSPECTS: usize = 256;

impl Tracker {
    /// Once a second: with this namespace's entries of one walk of the flow
    /// maps (and the translations read just before it), applies the kernel's
    /// timers and breaks the connections down by port and by peer. With
    /// `look`, reads the listeners from the socket table (else those of the
    /// last look), and with `listen_counted` too holds the probe's LISTEN
    /// count to the table's.
    pub fn sweep(
        &mut self,
        probe: &mut Probe,
        entries: &[(FlowRef, FlowEntry)],
        translations: Vec<(FlowRef, FlowRef)>,
        listen_counted: bool,
        look: bool,
    ) -> Result<()> {
        if look {
            let mut listeners = Vec::new();
            self.diag
                .for_each(StateFlags::LISTEN, |s| listeners.push(s.clone()))?;
            self.listening = listeners.len() as u64;
            self.listeners = listeners;
            if listen_counted {
                self.hold_listening(probe, self.listening)?;
            }
        }
        let services = Services {
            listening: self.listeners.iter().map(|s| s.local_port).collect(),
            ephemeral: self.ephemeral,
        };
        let listening = self.listeners.iter().map(|s| s.local_port).collect();
        self.services
            .tell(probe, self.slot, listening, self.ephemeral)?;
        let now = monotonic_ns();
        let mut watch = Watch::new(self.identity.inode, &services, &self.listeners, now);
        let mut b = Breakdown::default();
        for (flow, e) in entries {
            for end in local_ends(flow, tcpstate_common::Word(e.word)) {
                let service = services.of(&end);
                b.add(&end, service);
                watch.add(&end, service, e.changed_ns(now));
            }
        }
        for s in &self.listeners {
            b.add_listener(s.local_port);
        }
        self.attention = watch.done(self.top_k);
        self.breakdown = b;
        let v4 = entries
            .iter()
            .filter(|(f, _)| matches!(f, FlowRef::V4(_)))
            .count() as u64;
        self.flows_in_map = [v4, entries.len() as u64 - v4];
        if std::mem::take(&mut self.timed_out) {
            self.ask_about_timeouts(entries, now);
        }
        // (Fires what is due now: the questions just put too.)
        let stats = self
            .timers
            .file(entries, probe, Some(&mut self.diag), &self.timeouts)?;
        self.count(stats);
        self.forget_translations(probe, translations, entries)
    }

    /// The kernel gave up on connections (its TCPAbortOnTimeout grew): it
    /// reported each close, but should a report not have taken effect,
    /// nothing else would show it (no segment; reconciliation may be off
    /// or seconds away). So the kernel is asked about each local endpoint
    /// that may be one: still open, with data its peer had not
    /// acknowledged (what a retransmission or user timeout gives up on),
    /// at most [`TIMEOUT_SUSPECTS`] of them, each a one-socket lookup.
    fn ask_about_timeouts(&mut self, entries: &[(FlowRef, FlowEntry)], now: u64) {
        let mut asked = 0;
        for (flow, e) in entries {
            let word = tcpstate_common::Word(e.word);
            for side in [Side::A, Side::B] {
                let (mine, peer) = (e.ends[side.index()], e.ends[side.other().index()]);
                let unacked = (mine.snd_nxt.wrapping_sub(peer.ack) as i32) > 0;
                if unacked && answers::still_asked(word, side, Why::TimedOut) {
                    self.timers.question(*flow, side, Why::TimedOut, now);
                    asked += 1;
                }
            }
            if asked >= TIMEOUT_SUSPECTS {
                tracing::debug!(
                    "{}: more connections with unacknowledged data than asked about",
                    self.identity
                );
                return;
            }
        }
    }

    /// The probe's LISTEN count against the table's: a difference seen at
    /// two walks in a row (a report the kernel skipped, a listener made
    /// while the count was seeded) is corrected; one seen once may be a
    /// listener opening between the two reads.
    fn hold_listening(&mut self, probe: &Probe, table: u64) -> Result<()> {
        let ours = probe.counters(self.slot)?.states[TcpState::Listen as usize];
        let off = ours - table as i64;
        if off != 0 && self.listen_off == Some(off) {
            seed::seed_listening_by(probe, self.slot, -off)?;
            self.reconciler.corrections[TcpState::Listen as usize] += off.unsigned_abs();
            self.listen_off = None;
        } else {
            self.listen_off = (off != 0).then_some(off);
        }
        Ok(())
    }

    /// Local NAT: translations whose connection the flow maps no longer
    /// hold (or hold dead) are forgotten.
    fn forget_translations(
        &mut self,
        probe: &mut Probe,
        translations: Vec<(FlowRef, FlowRef)>,
        entries: &[(FlowRef, FlowEntry)],
    ) -> Result<()> {
        if translations.is_empty() {
            return Ok(());
        }
        let live: std::collections::HashSet<FlowRef> = entries
            .iter()
            .filter(|(_, e)| !tcpstate_common::Word(e.word).is_dead())
            .map(|(f, _)| *f)
            .collect();
        for (wire, socket) in translations {
            if !live.contains(&socket) {
                probe.forget_translation(&wire)?;
            }
        }
        Ok(())
    }

    /// The counts of the connections `filter` selects, read now from the
    /// flow maps (and LISTEN from the socket table): O(connections).
    pub fn count_filtered(&mut self, probe: &Probe, filter: &PortFilter) -> Result<StateCounts> {
        let mut c = StateCounts::default();
        for (flow, e) in probe.flow_entries()? {
            if flow.netns() != self.slot {
                continue;
            }
            for end in local_ends(&flow, tcpstate_common::Word(e.word)) {
                if filter.matches(end.local_port, end.remote_port) {
                    c.set(end.state, c.get(end.state) + 1);
                }
            }
        }
        let mut listening = 0;
        self.diag.for_each(StateFlags::LISTEN, |s| {
            // A listener has no remote port: only a local or any-side filter picks it.
            if filter.matches(s.local_port, 0) && filter.port != Some(0) {
                listening += 1;
            }
        })?;
        c.set(TcpState::Listen, listening);
        Ok(c)
    }
}
