//! The connections passing through a monitored namespace (`run --observe`),
//! kept in a slot of their own. The probe tracks both endpoints of each;
//! what no segment shows is only the timers, and with no socket here to
//! ask, each timed state ends when its time is up: Linux's default, or what
//! `--observe-timeouts` gives (as `replay --observe` ends them on the
//! capture's clock). No seeding, no
//! socket-table checks: the table holds none of these.

use tcpstate_common::FlowEntry;

use crate::{
    error::Result,
    kernel::{maps::FlowRef, probe::Probe},
    snapshot::observed::Observed,
    tracking::timers::{Timeouts, Timers},
};

pub struct Observer {
    slot: u32,
    timers: Timers,
    timeouts: Timeouts,
    expired: u64,
    flows_in_map: [u64; 2],
}

impl Observer {
    /// Gives the traffic passing through namespace slot `of` its own slot;
    /// its timed states last `timeouts` (Linux's defaults unless given).
    pub fn start(probe: &mut Probe, of: u32, timeouts: Timeouts) -> Result<Observer> {
        Ok(Observer {
            slot: probe.register_observer(of)?,
            timers: Timers::default(),
            timeouts: timeouts.observed(),
            expired: 0,
            flows_in_map: [0; 2],
        })
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Its part of the once-a-second walk: files the timers due soon.
    pub fn sweep(&mut self, probe: &Probe, entries: &[(FlowRef, FlowEntry)]) -> Result<()> {
        let v4 = entries
            .iter()
            .filter(|(f, _)| matches!(f, FlowRef::V4(_)))
            .count() as u64;
        self.flows_in_map = [v4, entries.len() as u64 - v4];
        let stats = self.timers.file(entries, probe, None, &self.timeouts)?;
        self.expired += stats.expired;
        Ok(())
    }

    /// Acts on the timers due; returns when the next one is.
    pub fn fire_timers(&mut self, probe: &Probe) -> Result<Option<u64>> {
        let stats = self.timers.fire(probe, None, &self.timeouts)?;
        self.expired += stats.expired;
        Ok(self.timers.next_ns())
    }

    pub fn next_timer_ns(&self) -> Option<u64> {
        self.timers.next_ns()
    }

    /// The probe's notice: an endpoint of the flow entered a timed state.
    pub fn notice(&mut self, q: &tcpstate_common::Ask) {
        if q.is_timed() {
            self.timers.notice(FlowRef::of_ask(q));
        }
    }

    /// How late its timers fired.
    pub fn lateness(&self) -> &crate::snapshot::upkeep::Lateness {
        &self.timers.late
    }

    pub fn snapshot(&self, probe: &Probe) -> Result<Observed> {
        Ok(Observed::new(
            self.slot,
            &probe.counters(self.slot)?,
            self.expired,
            self.flows_in_map,
        ))
    }
}
