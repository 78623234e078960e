//! The connections themselves (`tcpstate conns`) and the listeners
//! (`tcpstate listeners`), as the agent answers them on the control socket.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tcpstate_common::TcpState;

/// What `conns` asks for. States are the kernel's numbers (empty: all).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnFilter {
    #[serde(default)]
    pub states: Vec<u8>,
    /// Either end's port, like `ss '( sport = :N or dport = :N )'`.
    #[serde(default)]
    pub port: Option<u16>,
    /// Only connections this many seconds or longer in their state.
    #[serde(default)]
    pub older_s: Option<f64>,
    /// Name each socket's owning processes (reads /proc/PID/fd of every
    /// process: on demand only).
    #[serde(default)]
    pub process: bool,
    /// One namespace (its inode); `None`: every one the agent monitors.
    #[serde(default)]
    pub netns: Option<u64>,
}

impl ConnFilter {
    pub fn wants(&self, c: &Conn) -> bool {
        let state_ok = self.states.is_empty() || self.states.contains(&(c.state as u8));
        let port_ok = self
            .port
            .is_none_or(|p| c.local.port() == p || c.peer.port() == p);
        let age_ok = self
            .older_s
            .is_none_or(|min| c.age_s.is_some_and(|a| a >= min));
        state_ok && port_ok && age_ok
    }
}

/// A process holding a socket, as `ss -p` prints it: `("comm",pid=N,fd=M)`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    pub comm: String,
    pub fd: u32,
}

/// One local endpoint, one row of `ss -tan`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Conn {
    #[serde(with = "state_name")]
    pub state: TcpState,
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// Seconds since the endpoint entered its state (TIME_WAIT: since the
    /// timer was last re-armed). `None` for listeners, whose age no segment
    /// shows.
    pub age_s: Option<f64>,
    /// The state began before the agent watched the namespace: `age_s` is
    /// how long it has been watched, a lower bound.
    #[serde(default)]
    pub age_at_least: bool,
    /// With `--process`: who holds the socket (none for TIME_WAIT and
    /// request sockets, and for sockets closed by their process).
    #[serde(default)]
    pub owners: Vec<Owner>,
}

/// One listening address and port: every socket listening there (several
/// with SO_REUSEPORT) summed, as `ss -ltn` shows them one per line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Listener {
    pub local: SocketAddr,
    /// Listening sockets on this address and port.
    pub sockets: u32,
    /// Connections completed and not yet accepted (`ss -ltn` Recv-Q).
    pub queue: u64,
    /// The accept queue's limit (`ss -ltn` Send-Q: min(backlog, somaxconn)).
    pub backlog: u64,
    /// Handshakes under way to this address and port (SYN_RECV).
    pub syn_recv: u64,
    /// Connections to it that completed and are open now (ESTABLISHED,
    /// CLOSE_WAIT, ... whose local end is this address and port).
    pub connections: u64,
    /// SYNs to its port that found no connection and were never answered
    /// (dropped: a full queue, a firewall), since the agent started. Per
    /// port: listeners on several addresses of one port share it.
    #[serde(default)]
    pub unanswered: u64,
    /// Its port's completed handshakes since the agent started (first
    /// SYN-ACK to completion): the median and the 99th percentile, seconds.
    #[serde(default)]
    pub handshake_p50_s: Option<f64>,
    #[serde(default)]
    pub handshake_p99_s: Option<f64>,
}

impl Listener {
    /// The queue is full: the kernel (`sk_acceptq_is_full`: length above
    /// the limit, so a backlog of N holds N + 1) drops the next completed
    /// handshake and counts it in ListenOverflows.
    pub fn full(&self) -> bool {
        self.queue > self.backlog
    }
}

/// One namespace's part of an answer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NetnsRows<T> {
    pub netns: u64,
    pub name: Option<String>,
    pub rows: Vec<T>,
    /// The namespace's kernel counters for listeners since boot (TcpExt
    /// ListenOverflows, ListenDrops); only in `listeners` answers.
    #[serde(default)]
    pub listen_overflows: Option<u64>,
    #[serde(default)]
    pub listen_drops: Option<u64>,
    /// The namespace's completed handshakes since the agent started (how
    /// long each took: its first SYN-ACK to the connection's completion);
    /// only in `listeners` answers.
    #[serde(default)]
    pub handshakes: Option<super::durations::Histogram>,
}

/// States by name on the wire (`"CLOSE_WAIT"`), as `count --json` spells them.
pub(crate) mod state_name {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use tcpstate_common::TcpState;

    pub fn serialize<S: Serializer>(s: &TcpState, out: S) -> Result<S::Ok, S::Error> {
        out.serialize_str(s.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TcpState, D::Error> {
        let name = String::deserialize(d)?;
        TcpState::parse(&name).ok_or_else(|| D::Error::custom(format!("no state {name:?}")))
    }
}

/// A state as a user spells it on the command line: `close-wait`,
/// `CLOSE_WAIT`, `estab`, `time-wait`, `syn-recv`.
pub fn parse_state(s: &str) -> Option<TcpState> {
    TcpState::parse(&s.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(state: TcpState, lport: u16, pport: u16, age: Option<f64>) -> Conn {
        Conn {
            state,
            local: SocketAddr::from(([10, 0, 0, 1], lport)),
            peer: SocketAddr::from(([10, 0, 0, 2], pport)),
            age_s: age,
            age_at_least: false,
            owners: vec![],
        }
    }

    #[test]
    fn filters_pick_by_state_port_and_age() {
        let cw = conn(TcpState::CloseWait, 8080, 50000, Some(30.0));
        let est = conn(TcpState::Established, 8080, 50001, Some(1.0));
        let f = ConnFilter {
            states: vec![TcpState::CloseWait as u8],
            ..Default::default()
        };
        assert!(f.wants(&cw) && !f.wants(&est));
        let f = ConnFilter {
            port: Some(50001),
            ..Default::default()
        };
        assert!(!f.wants(&cw) && f.wants(&est));
        let f = ConnFilter {
            older_s: Some(10.0),
            ..Default::default()
        };
        assert!(f.wants(&cw) && !f.wants(&est));
        // A listener has no age: never "older than".
        assert!(!f.wants(&conn(TcpState::Listen, 8080, 0, None)));
    }

    #[test]
    fn states_are_named_on_the_wire_and_parsed_as_users_spell_them() {
        let j = serde_json::to_value(conn(TcpState::CloseWait, 1, 2, None)).unwrap();
        assert_eq!(j["state"], "CLOSE_WAIT");
        let back: Conn = serde_json::from_value(j).unwrap();
        assert_eq!(back.state, TcpState::CloseWait);
        assert_eq!(parse_state("close-wait"), Some(TcpState::CloseWait));
        assert_eq!(parse_state("estab"), Some(TcpState::Established));
        assert_eq!(parse_state("bogus"), None);
    }

    #[test]
    fn a_queue_at_its_backlog_is_full() {
        let l = |queue, backlog| Listener {
            local: SocketAddr::from(([0, 0, 0, 0], 80)),
            sockets: 1,
            queue,
            backlog,
            syn_recv: 0,
            connections: 0,
            unanswered: 0,
            handshake_p50_s: None,
            handshake_p99_s: None,
        };
        assert!(!l(3, 8).full());
        assert!(!l(8, 8).full());
        assert!(l(9, 8).full());
        assert!(l(1, 0).full());
    }
}
