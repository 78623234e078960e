//! Answering "what are the counts now" without waiting for the agent's
//! maintenance work (the once-a-second walk, reconciliation, timers), which
//! takes the host's lock for as long as the flow map is large. A reader
//! holds its own handle on the per-CPU counters, the rest of the snapshot
//! as the last tick published it (which namespaces there are, and in which
//! slots), and for one namespace its own sock_diag socket (for LISTEN). With
//! every namespace LISTEN is the probe's count, which the kernel's reports
//! move: no dump of the socket table per read, however many namespaces.

use std::{os::fd::AsFd, sync::Mutex, time::Instant};

use aya::maps::{Map, MapData, PerCpuArray};
use tcpstate_common::{Counters, TcpState};

use crate::{
    error::{Error, Result},
    kernel::{maps::sum_counters, sockdiag::SockDiag},
    snapshot::{Snapshot, StateCounts, events_by_name},
};

pub struct Reader {
    per_cpu: PerCpuArray<MapData, Counters>,
    diag: Option<Mutex<SockDiag>>,
    latest: Mutex<Snapshot>,
    started: Instant,
}

impl Reader {
    /// `per_cpu`: the probe's counter map; `diag`: a sock_diag socket opened
    /// in the one monitored namespace (`None`: LISTEN as each namespace's
    /// counts have it); `first`: a snapshot to start from.
    pub fn new(
        per_cpu: &MapData,
        diag: Option<SockDiag>,
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
            diag: diag.map(Mutex::new),
            latest: Mutex::new(first),
            started,
        })
    }

    /// What the last tick learnt (namespaces, ports, peers, drift, map fill, ...).
    pub fn publish(&self, snap: Snapshot) {
        *self.latest.lock().expect("reader lock") = snap;
    }

    /// The counts now (O(1) in the number of connections, O(namespaces)),
    /// with the rest as of the last tick.
    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut snap = self.latest.lock().expect("reader lock").clone();
        let listening = match &self.diag {
            Some(d) => Some(d.lock().expect("reader lock").listening()?),
            None => None,
        };
        let mut total = Counters::default();
        let mut states = StateCounts::default();
        for ns in snap.namespaces.iter_mut() {
            let c = sum_counters(&self.per_cpu, ns.slot)?;
            let mut s = StateCounts::from_slots(&c.states);
            match listening {
                Some(n) => s.set(TcpState::Listen, n),
                // Without the kernel's reports the probe's LISTEN does not
                // move: the last tick's look at the table stands.
                None if !snap.kernel_reports => {
                    s.set(TcpState::Listen, ns.states.get(TcpState::Listen))
                }
                None => {}
            }
            ns.states = s;
            states = states.plus(&s);
            total.accumulate(&c);
        }
        total.derive();
        if let Some(o) = snap.observed.as_mut() {
            let c = sum_counters(&self.per_cpu, o.slot)?;
            o.states = StateCounts::from_slots(&c.states).json();
            o.events = events_by_name(&c);
        }
        snap.states = states.json();
        snap.events = events_by_name(&total);
        snap.uptime_ms = self.started.elapsed().as_millis() as u64;
        Ok(snap)
    }
}
