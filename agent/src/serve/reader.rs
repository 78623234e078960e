//! Answering "what are the counts now" without waiting for the agent's
//! maintenance work (the once-a-second walk, reconciliation, timers), which
//! takes the agent's lock for as long as the flow map is large. A reader
//! holds its own handle on the per-CPU counters and its own sock_diag socket
//! (for LISTEN), and the rest of the snapshot as the last tick published it.

use std::{os::fd::AsFd, sync::Mutex, time::Instant};

use aya::maps::{Map, MapData, PerCpuArray};
use tcpstate_common::CpuSlot;

use crate::{
    error::{Error, Result},
    kernel::{maps::sum_counters, sockdiag::SockDiag},
    snapshot::{Snapshot, events_by_name, live_counts},
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
        let counters = sum_counters(&self.per_cpu)?;
        let listening = self.diag.lock().expect("reader lock").listening()?;
        let mut snap = self.latest.lock().expect("reader lock").clone();
        snap.states = live_counts(&counters, listening).json();
        snap.events = events_by_name(&counters);
        snap.uptime_ms = self.started.elapsed().as_millis() as u64;
        Ok(snap)
    }
}
