//! Answering "what are the counts now" without waiting for the agent's
//! maintenance work (the once-a-second walk, reconciliation, timers), which
//! takes the agent's lock for as long as the flow map is large. A reader
//! holds its own handle on the per-CPU counters and its own sock_diag socket
//! (for LISTEN), and the rest of the snapshot as the last tick published it.

use std::{os::fd::AsFd, sync::Mutex, time::Instant};

use aya::maps::{Map, MapData, PerCpuArray};
use netlink_packet_sock_diag::inet::StateFlags;
use tcpstate_common::{Counters, CpuSlot, Event, TcpState};

use crate::{
    error::{Error, Result},
    snapshot::{Snapshot, StateCounts},
    sockdiag::SockDiag,
};

pub struct Reader {
    per_cpu: PerCpuArray<MapData, CpuSlot>,
    diag: Mutex<SockDiag>,
    latest: Mutex<Snapshot>,
    started: Instant,
}

impl Reader {
    /// `per_cpu`: the probe's counter map; `diag`: a sock_diag socket opened
    /// in the monitored namespace; `first`: a snapshot to start from.
    pub fn new(
        per_cpu: &MapData,
        diag: SockDiag,
        first: Snapshot,
        started: Instant,
    ) -> Result<Reader> {
        let fd = per_cpu
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| Error::io("duplicating the counters' descriptor", e))?;
        let per_cpu = PerCpuArray::try_from(Map::PerCpuArray(MapData::from_fd(fd)?))?;
        Ok(Reader {
            per_cpu,
            diag: Mutex::new(diag),
            latest: Mutex::new(first),
            started,
        })
    }

    /// What the last tick learnt (ports, peers, drift, map fill, ...).
    pub fn publish(&self, snap: Snapshot) {
        *self.latest.lock().expect("reader lock") = snap;
    }

    /// The counts now (O(1) in the number of connections), with the rest as
    /// of the last tick.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut counters = Counters::default();
        for cpu in self.per_cpu.get(&0, 0)?.iter() {
            counters.accumulate(&cpu.counters);
        }
        counters.derive();
        let mut states = StateCounts::from_slots(&counters.states);
        let table = self
            .diag
            .lock()
            .expect("reader lock")
            .count(StateFlags::LISTEN)?;
        states.set(TcpState::Listen, table[TcpState::Listen as usize]);
        let mut snap = self.latest.lock().expect("reader lock").clone();
        snap.states = states.json();
        snap.events = Event::ALL
            .iter()
            .map(|e| (e.name().to_owned(), counters.events[*e as usize].into()))
            .collect();
        snap.uptime_ms = self.started.elapsed().as_millis() as u64;
        Ok(snap)
    }
}
