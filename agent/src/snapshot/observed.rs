//! The connections passing through the host (`run --observe`), apart from
//! its own: both endpoints of each are counted, as a middlebox sees them,
//! so one connection adds two to the counts (one per endpoint), as the two
//! ends' `ss -tan` together would show it.

use serde::{Deserialize, Serialize};
use tcpstate_common::Counters;

use super::{StateCounts, events_by_name};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    /// The observer's place in the probe (its counters' slot).
    pub slot: u32,
    /// Eleven states, name to count (LISTEN is always 0: no segment shows
    /// a listener).
    pub states: serde_json::Value,
    /// What the probe saw of them that is unusual (map full, CAS
    /// conflicts, SYNs unanswered, ...), by event name.
    pub events: serde_json::Map<String, serde_json::Value>,
    /// Endpoints whose timed state (TIME_WAIT, FIN_WAIT2, SYN_SENT,
    /// SYN_RECV) ran out on Linux's default timers.
    pub expired: u64,
    /// Entries in the IPv4 and the IPv6 flow map at the last walk.
    pub flows_in_map: [u64; 2],
}

impl Observed {
    pub fn new(slot: u32, counters: &Counters, expired: u64, flows_in_map: [u64; 2]) -> Observed {
        Observed {
            slot,
            states: StateCounts::from_slots(&counters.states).json(),
            events: events_by_name(counters),
            expired,
            flows_in_map,
        }
    }

    pub fn state_counts(&self) -> StateCounts {
        StateCounts::from_json(&self.states).unwrap_or_default()
    }
}
