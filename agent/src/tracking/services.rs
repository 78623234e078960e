//! One namespace's services, as the probe's service table has them each
//! tick: what the snapshot shows of them, and the probe's picture of which
//! local ports are services (its listening ports and port range), kept
//! equal to the socket table's.

use std::collections::{BTreeSet, HashMap};

use tcpstate_common::services::{ServiceKey, ServiceStats};

use crate::{
    error::Result,
    kernel::probe::Probe,
    snapshot::services::{Service, ServiceRow},
};

/// How long a failed connect or an unanswered SYN counts as recent
/// (`failing`, `dropping`).
const RECENT_S: u64 = 60;

#[derive(Default)]
pub struct ServiceBook {
    /// Per service: its SYNs at the last look, and the SYNs found
    /// unanswered so far.
    syns: HashMap<ServiceKey, (u64, u64)>,
    /// Per service: its failed connects and unanswered SYNs when the last
    /// window began, and when the one before it began (what `failing` and
    /// `dropping` count from).
    newer: HashMap<ServiceKey, (u64, u64)>,
    older: HashMap<ServiceKey, (u64, u64)>,
    window_started: Option<std::time::Instant>,
    /// The rows of the last look.
    pub rows: Vec<ServiceRow>,
    /// Upstreams whose connects failed in the last 60 to 120 s, with how
    /// many failed.
    pub failing: Vec<(ServiceRow, u64)>,
    /// Listening ports that left SYNs unanswered in the last 60 to 120 s,
    /// with how many.
    pub dropping: Vec<(ServiceRow, u64)>,
    /// What the probe was last told: listening ports and port range.
    told: (BTreeSet<u16>, u32),
}

impl ServiceBook {
    /// Takes this tick's look at the table (this namespace's entries).
    ///
    /// A SYN is unanswered when the answers counted now do not cover the
    /// SYNs counted at the last look: the kernel answers within
    /// microseconds, so a SYN a tick old with no answer was dropped. The
    /// count only grows.
    pub fn look(&mut self, inode: u64, table: Vec<(ServiceKey, ServiceStats)>) {
        let now = std::time::Instant::now();
        let renew = self
            .window_started
            .is_none_or(|t| now.duration_since(t).as_secs() >= RECENT_S);
        if renew {
            self.window_started = Some(now);
        }
        let mut syns = HashMap::with_capacity(table.len());
        let mut rows = Vec::with_capacity(table.len());
        let (mut failing, mut dropping) = (Vec::new(), Vec::new());
        if renew {
            self.older = std::mem::take(&mut self.newer);
        }
        for (key, stats) in table {
            let (before, unanswered) = self.syns.get(&key).copied().unwrap_or((0, 0));
            let unanswered = unanswered.max(before.saturating_sub(stats.answered));
            syns.insert(key, (stats.syns, unanswered));
            let row = ServiceRow::of(inode, &key, &stats, unanswered);
            let failed = row.closed.failed();
            if renew {
                self.newer.insert(key, (failed, unanswered));
            }
            // The table began empty with the agent: what a service the
            // older window did not have counted, it counted within it.
            let since = self.older.get(&key).copied().unwrap_or((0, 0));
            // A local service's failures are handshakes it answered that
            // never completed: not connects of this host's.
            if matches!(row.service, Service::Remote(_)) && failed > since.0 {
                failing.push((row.clone(), failed - since.0));
            }
            if unanswered > since.1 {
                dropping.push((row.clone(), unanswered - since.1));
            }
            rows.push(row);
        }
        failing.sort_by_key(|f| std::cmp::Reverse(f.1));
        dropping.sort_by_key(|f| std::cmp::Reverse(f.1));
        self.syns = syns;
        self.rows = rows;
        self.failing = failing;
        self.dropping = dropping;
    }

    /// Tells the probe which local ports are services: those that listen,
    /// and the namespace's port range (only what changed).
    pub fn tell(
        &mut self,
        probe: &mut Probe,
        slot: u32,
        listening: BTreeSet<u16>,
        range: (u16, u16),
    ) -> Result<()> {
        let range = if range == (0, 0) {
            0
        } else {
            range.0 as u32 | (range.1 as u32) << 16
        };
        if range != self.told.1 {
            probe.set_port_range(slot, range)?;
            self.told.1 = range;
        }
        if listening != self.told.0 {
            let gone: Vec<u16> = self.told.0.difference(&listening).copied().collect();
            let new: Vec<u16> = listening.difference(&self.told.0).copied().collect();
            probe.set_listening(slot, &new, &gone)?;
            self.told.0 = listening;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tcpstate_common::services::Kind;

    use super::*;

    fn port(p: u16) -> ServiceKey {
        ServiceKey {
            netns: 0,
            port: p,
            kind: Kind::LOCAL,
            ..Default::default()
        }
    }

    fn stats(syns: u64, answered: u64) -> ServiceStats {
        ServiceStats {
            syns,
            answered,
            ..Default::default()
        }
    }

    #[test]
    fn a_syn_unanswered_for_a_tick_is_counted_and_stays_counted() {
        let mut b = ServiceBook::default();
        // A SYN counted, its answer not yet: not unanswered at first sight.
        b.look(7, vec![(port(80), stats(1, 0))]);
        assert_eq!(b.rows[0].unanswered, 0);
        // Answered by the next tick: never unanswered.
        b.look(7, vec![(port(80), stats(3, 1))]);
        assert_eq!(b.rows[0].unanswered, 0);
        // Three SYNs a tick old, one answer: two dropped.
        b.look(7, vec![(port(80), stats(3, 1))]);
        assert_eq!(b.rows[0].unanswered, 2);
        assert_eq!(b.dropping[0].1, 2, "dropped lately");
        assert!(b.failing.is_empty(), "a listening port is no upstream");
        // Later answers to later SYNs never lower it.
        b.look(7, vec![(port(80), stats(10, 9))]);
        assert_eq!(b.rows[0].unanswered, 2);
    }

    #[test]
    fn failing_upstreams_are_those_whose_connects_failed_lately() {
        let mut b = ServiceBook::default();
        let db = ServiceKey {
            netns: 0,
            port: 5432,
            kind: Kind::REMOTE,
            family: 4,
            addr: [1, 0, 0, 0],
        };
        let failed = |n| ServiceStats {
            outcomes: [0, n, 0, 0, 0],
            ..Default::default()
        };
        b.look(7, vec![(db, failed(4))]);
        assert_eq!(b.failing[0].1, 4, "the table began with the agent");
        b.look(7, vec![(db, failed(6))]);
        assert_eq!(b.failing[0].1, 6);
        // Two windows later, only what failed since the older one began.
        b.window_started = Some(std::time::Instant::now() - std::time::Duration::from_secs(61));
        b.look(7, vec![(db, failed(7))]);
        assert_eq!(b.failing[0].1, 3, "since the first look, a window ago");
        b.window_started = Some(std::time::Instant::now() - std::time::Duration::from_secs(61));
        b.look(7, vec![(db, failed(7))]);
        assert!(b.failing.is_empty(), "nothing failed since a minute ago");
    }
}
