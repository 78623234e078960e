//! What the agent reports: the eleven state counts and the probe's events,
//! and how `tcpstate count` prints them.

pub mod attention;
pub mod conns;
pub mod durations;
mod netns;
pub mod observed;
pub mod services;
pub mod upkeep;

pub use netns::{NetnsCounts, Selector};
use serde::{Deserialize, Serialize};
use tcpstate_common::{Counters, Event, TcpState};

/// Counts of the eleven reported states, in [`TcpState::REPORTED`] order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateCounts(pub [u64; 11]);

impl StateCounts {
    pub fn get(&self, s: TcpState) -> u64 {
        TcpState::REPORTED
            .iter()
            .position(|r| *r == s)
            .map_or(0, |i| self.0[i])
    }

    pub fn set(&mut self, s: TcpState, n: u64) {
        if let Some(i) = TcpState::REPORTED.iter().position(|r| *r == s) {
            self.0[i] = n;
        }
    }

    /// From per-state values indexed by the kernel's state number (a value
    /// below zero, possible for an instant while CPUs' counters settle, reads 0).
    pub fn from_slots(slots: &[i64; 16]) -> StateCounts {
        let mut c = StateCounts::default();
        for s in TcpState::REPORTED {
            c.set(s, slots[s as usize].max(0) as u64);
        }
        c
    }

    /// `STATE N` lines, the shape of `netstat -n | awk '/^tcp/ {++a[$NF]} END {for (v in a) print v, a[v]}'`.
    pub fn lines(&self) -> String {
        TcpState::REPORTED
            .iter()
            .zip(self.0)
            .map(|(s, n)| format!("{} {n}\n", s.name()))
            .collect()
    }

    /// Both counts, state by state.
    pub fn plus(&self, o: &StateCounts) -> StateCounts {
        let mut c = *self;
        for (a, b) in c.0.iter_mut().zip(o.0) {
            *a += b;
        }
        c
    }

    /// One JSON object mapping the eleven names to numbers, in the fixed order.
    pub fn json(&self) -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = TcpState::REPORTED
            .iter()
            .zip(self.0)
            .map(|(s, n)| (s.name().to_owned(), n.into()))
            .collect();
        serde_json::Value::Object(map)
    }

    /// Parses what [`StateCounts::json`] printed.
    pub fn from_json(v: &serde_json::Value) -> Option<StateCounts> {
        let mut c = StateCounts::default();
        for s in TcpState::REPORTED {
            c.set(s, v.get(s.name())?.as_u64()?);
        }
        Some(c)
    }
}

impl Serialize for StateCounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.json().serialize(s)
    }
}

impl<'de> Deserialize<'de> for StateCounts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        StateCounts::from_json(&v)
            .ok_or_else(|| serde::de::Error::custom("expected the eleven state counts"))
    }
}

/// The eleven counts: states from the probe's counters, LISTEN from the
/// socket table.
pub fn live_counts(counters: &Counters, listening: u64) -> StateCounts {
    let mut states = StateCounts::from_slots(&counters.states);
    states.set(TcpState::Listen, listening);
    states
}

/// The probe's events by name (see `tcpstate_common::Event`).
pub fn events_by_name(counters: &Counters) -> serde_json::Map<String, serde_json::Value> {
    Event::ALL
        .iter()
        .map(|e| (e.name().to_owned(), counters.events[*e as usize].into()))
        .collect()
}

/// The key under which everything past the top K is summed.
pub const OTHER: &str = "other";

/// One row: a port or an address, and its connections by state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keyed {
    pub key: String,
    /// Connections (LISTEN, in `states`, is not one).
    pub total: u64,
    pub states: StateCounts,
}

/// Which port of a connection a filter looks at (as `ss sport`/`dport`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortSide {
    /// The local endpoint's port.
    Local,
    /// The remote endpoint's port.
    Remote,
    /// Either.
    #[default]
    Any,
}

/// A filter on connections by port (and, with every namespace watched, by
/// namespace: its inode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortFilter {
    pub port: Option<u16>,
    pub side: PortSide,
    #[serde(default)]
    pub netns: Option<u64>,
}

impl PortFilter {
    pub fn matches(&self, local_port: u16, remote_port: u16) -> bool {
        match (self.port, self.side) {
            (None, _) => true,
            (Some(p), PortSide::Local) => local_port == p,
            (Some(p), PortSide::Remote) => remote_port == p,
            (Some(p), PortSide::Any) => local_port == p || remote_port == p,
        }
    }
}

/// The agent's answer to a client.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub netns: Option<String>,
    pub interfaces: Vec<String>,
    /// Eleven states, name to count.
    pub states: serde_json::Value,
    /// Probe events by name (see `tcpstate_common::Event`).
    pub events: serde_json::Map<String, serde_json::Value>,
    pub flow_map_capacity: u32,
    /// Entries the agent expired on the kernel's timers.
    pub expired: u64,
    /// At the last reconciliation: tcpstate's count minus the socket table's,
    /// per state (all 0 on a healthy host).
    #[serde(default)]
    pub drift: serde_json::Map<String, serde_json::Value>,
    /// Corrections reconciliation made, by the state tcpstate had counted
    /// (`NONE`: connections the flow maps had missed).
    #[serde(default)]
    pub corrections: serde_json::Map<String, serde_json::Value>,
    /// Connections the kernel closed without TIME_WAIT since the agent started
    /// (`net.ipv4.tcp_max_tw_buckets` reached; TcpExt TCPTimeWaitOverflow).
    #[serde(default)]
    pub time_wait_overflow: u64,
    /// The socket table's own counts, read for this answer (`count --verify`).
    #[serde(default)]
    pub kernel: Option<serde_json::Value>,
    /// The states the flow map's entries hold, recounted entry by entry for
    /// this answer (`count --verify`): the in-kernel counters must equal them.
    #[serde(default)]
    pub entries: Option<serde_json::Value>,
    /// Connections by service (a local port that listens, `→PORT` for the
    /// remote port of connections this host made), the top K and "other"
    /// (LISTEN included).
    #[serde(default)]
    pub ports: Vec<Keyed>,
    /// Connections by remote address, the top K and "other".
    #[serde(default)]
    pub peers: Vec<Keyed>,
    /// The worst listeners, oldest CLOSE_WAIT/FIN_WAIT2 and port pressure.
    #[serde(default)]
    pub attention: attention::Attention,
    /// Entries in the IPv4 and the IPv6 flow map at the last walk (each map
    /// holds up to `flow_map_capacity`).
    #[serde(default)]
    pub flows_in_map: [u64; 2],
    /// Sockets the agent looked up in the kernel's table (when only the
    /// kernel could tell what became of them), and endpoints it set from the
    /// answers.
    #[serde(default)]
    pub asked: [u64; 2],
    /// The kernel reports its sockets' state changes to the probe.
    #[serde(default)]
    pub kernel_reports: bool,
    /// Kernel reports the kernel skipped (the program was running on that
    /// CPU already); each sends the agent to the socket table.
    #[serde(default)]
    pub kernel_reports_missed: u64,
    /// ...and its connects as they start (where the kernel allows fentry
    /// programs): a connect whose SYN never leaves is counted too.
    #[serde(default)]
    pub connect_reports: bool,
    /// Milliseconds since the agent started (the clock of rates).
    #[serde(default)]
    pub uptime_ms: u64,
    /// The agent's version.
    #[serde(default)]
    pub version: String,
    /// The agent watches every namespace of the host (`run -A`): the counts
    /// above are their sum.
    #[serde(default)]
    pub all_namespaces: bool,
    /// Each monitored namespace's counts (one entry when the agent watches
    /// one namespace).
    #[serde(default)]
    pub namespaces: Vec<NetnsCounts>,
    /// How long local endpoints spent in each state they left, and how
    /// long connects and handshakes took (as of the last tick).
    #[serde(default)]
    pub durations: durations::Timings,
    /// Per namespace and service (a local port, or an upstream address
    /// and port), how connections ended, handshake times and unanswered
    /// SYNs: the `--top-k` most active of each kind (as of the last tick).
    #[serde(default)]
    pub services: Vec<services::ServiceRow>,
    /// With `run --observe`: the connections passing through, apart from
    /// the host's own (which the counts above are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed: Option<observed::Observed>,
    /// What the agent's own upkeep costs (its CPU time and memory, walks,
    /// checks, how late its timers fired).
    #[serde(default)]
    pub upkeep: upkeep::Upkeep,
}

impl Snapshot {
    pub fn new(
        netns: Option<String>,
        interfaces: Vec<String>,
        states: StateCounts,
        counters: &Counters,
        capacity: u32,
        expired: u64,
    ) -> Snapshot {
        let events = events_by_name(counters);
        Snapshot {
            netns,
            interfaces,
            states: states.json(),
            events,
            flow_map_capacity: capacity,
            expired,
            drift: Default::default(),
            corrections: Default::default(),
            time_wait_overflow: 0,
            kernel: None,
            entries: None,
            ports: Vec::new(),
            peers: Vec::new(),
            attention: Default::default(),
            flows_in_map: [0; 2],
            asked: [0; 2],
            kernel_reports: false,
            connect_reports: false,
            kernel_reports_missed: 0,
            uptime_ms: 0,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            all_namespaces: false,
            namespaces: Vec::new(),
            durations: Default::default(),
            services: Vec::new(),
            observed: None,
            upkeep: Default::default(),
        }
    }

    /// Snapshots of many namespaces summed: counts, events, breakdowns,
    /// losses. The breakdowns are merged in one pass over all of them (with
    /// hundreds of namespaces, merging pairwise was most of a tick).
    pub fn sum(parts: &[Snapshot]) -> Option<Snapshot> {
        let (first, rest) = parts.split_first()?;
        let mut total = first.clone();
        for o in rest {
            total.add(o);
        }
        total.ports = merge_keyed(parts.iter().map(|p| p.ports.as_slice()));
        total.peers = merge_keyed(parts.iter().map(|p| p.peers.as_slice()));
        Some(total)
    }

    /// Adds another namespace's snapshot, all but the breakdowns.
    fn add(&mut self, o: &Snapshot) {
        let sum_counts = |a: &serde_json::Value, b: &serde_json::Value| match (
            StateCounts::from_json(a),
            StateCounts::from_json(b),
        ) {
            (Some(x), Some(y)) => x.plus(&y).json(),
            _ => a.clone(),
        };
        self.states = sum_counts(&self.states, &o.states);
        if let (Some(a), Some(b)) = (&self.kernel, &o.kernel) {
            self.kernel = Some(sum_counts(a, b));
        }
        if let (Some(a), Some(b)) = (&self.entries, &o.entries) {
            self.entries = Some(sum_counts(a, b));
        }
        add_maps(&mut self.events, &o.events);
        add_maps(&mut self.drift, &o.drift);
        add_maps(&mut self.corrections, &o.corrections);
        self.durations.add(&o.durations);
        self.services.extend(o.services.iter().cloned());
        self.interfaces.extend(o.interfaces.iter().cloned());
        self.expired += o.expired;
        self.time_wait_overflow += o.time_wait_overflow;
        for i in 0..2 {
            self.flows_in_map[i] += o.flows_in_map[i];
            self.asked[i] += o.asked[i];
        }
    }

    pub fn state_counts(&self) -> Option<StateCounts> {
        StateCounts::from_json(&self.states)
    }

    pub fn kernel_counts(&self) -> Option<StateCounts> {
        StateCounts::from_json(self.kernel.as_ref()?)
    }

    pub fn entry_counts(&self) -> Option<StateCounts> {
        StateCounts::from_json(self.entries.as_ref()?)
    }
}

/// Adds the numbers of `b` into `a`, key by key.
fn add_maps(
    a: &mut serde_json::Map<String, serde_json::Value>,
    b: &serde_json::Map<String, serde_json::Value>,
) {
    for (k, v) in b {
        let sum = match (a.get(k), v) {
            (Some(x), y) if x.is_u64() && y.is_u64() => {
                (x.as_u64().unwrap_or(0) + y.as_u64().unwrap_or(0)).into()
            }
            (Some(x), y) => (x.as_i64().unwrap_or(0) + y.as_i64().unwrap_or(0)).into(),
            (None, y) => y.clone(),
        };
        a.insert(k.clone(), sum);
    }
}

/// Two breakdowns summed key by key, the largest first, "other" last.
fn merge_keyed<'a>(lists: impl Iterator<Item = &'a [Keyed]>) -> Vec<Keyed> {
    let mut by_key: std::collections::HashMap<&str, Keyed> = std::collections::HashMap::new();
    for k in lists.flatten() {
        by_key
            .entry(k.key.as_str())
            .and_modify(|o| {
                o.total += k.total;
                o.states = o.states.plus(&k.states);
            })
            .or_insert_with(|| k.clone());
    }
    let mut out: Vec<Keyed> = by_key.into_values().collect();
    out.sort_by(|x, y| {
        (x.key == OTHER)
            .cmp(&(y.key == OTHER))
            .then(y.total.cmp(&x.total))
            .then(x.key.cmp(&y.key))
    });
    out
}

/// Per-state values by name; `None` (slot 0) is named NONE.
pub fn by_state<T: Copy + Into<serde_json::Value>>(
    slots: &[T; 16],
) -> serde_json::Map<String, serde_json::Value> {
    let mut names = vec![TcpState::None];
    names.extend(TcpState::REPORTED);
    names
        .into_iter()
        .map(|s| (s.name().to_owned(), slots[s as usize].into()))
        .collect()
}

/// `count --verify`: both columns and the difference; true when they agree.
pub fn verify_table(ours: &StateCounts, kernel: &StateCounts) -> (String, bool) {
    let mut out = format!(
        "{:<12} {:>9} {:>9} {:>6}\n",
        "STATE", "TCPSTATE", "KERNEL", "DIFF"
    );
    let mut same = true;
    for s in TcpState::REPORTED {
        let (a, b) = (ours.get(s), kernel.get(s));
        same &= a == b;
        out += &format!(
            "{:<12} {a:>9} {b:>9} {:>6}\n",
            s.name(),
            a as i64 - b as i64
        );
    }
    (out, same)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn empty() -> Snapshot {
        Snapshot::new(
            None,
            Vec::new(),
            StateCounts::default(),
            &Counters::default(),
            0,
            0,
        )
    }

    #[test]
    fn lines_list_all_eleven_states_in_fixed_order_with_zeros() {
        let mut c = StateCounts::default();
        c.set(TcpState::Established, 3);
        c.set(TcpState::TimeWait, 7);
        let text = c.lines();
        let names: Vec<&str> = text.lines().map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(
            names,
            [
                "LISTEN",
                "SYN_SENT",
                "SYN_RECV",
                "ESTABLISHED",
                "FIN_WAIT1",
                "FIN_WAIT2",
                "CLOSE_WAIT",
                "CLOSING",
                "LAST_ACK",
                "TIME_WAIT",
                "CLOSE"
            ]
        );
        assert!(
            text.contains("ESTABLISHED 3\n")
                && text.contains("TIME_WAIT 7\n")
                && text.contains("LISTEN 0\n")
        );
    }

    #[test]
    fn json_round_trips() {
        let c = StateCounts([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
        assert_eq!(StateCounts::from_json(&c.json()), Some(c));
        assert_eq!(c.json().as_object().unwrap().len(), 11);
    }

    #[test]
    fn negative_transients_read_as_zero() {
        let mut slots = [0i64; 16];
        slots[TcpState::Established as usize] = -1;
        slots[TcpState::FinWait2 as usize] = 4;
        let c = StateCounts::from_slots(&slots);
        assert_eq!(c.get(TcpState::Established), 0);
        assert_eq!(c.get(TcpState::FinWait2), 4);
    }
}
