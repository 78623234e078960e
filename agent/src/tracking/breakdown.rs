//! Connections per service and per remote address, by state. Built from
//! the flow map on the agent's once-a-second walk (and from the socket table
//! for LISTEN), cut to the top K keys by total with the rest summed as
//! "other", so what the view and the metrics show stays bounded however many
//! ports and peers a host has.
//!
//! A service is a port: a local port something listens on (`8080`), or for
//! a connection this host made, the remote port it went to (`→443`). An
//! ephemeral port is never a key of its own: fifty clients of one upstream
//! are one row, not fifty rows of one connection each.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use foldhash::HashMap;
use tcpstate_common::{Side, TcpState, Word};

use crate::{
    kernel::maps::FlowRef,
    snapshot::{Keyed, OTHER, StateCounts},
};

/// A local endpoint of a tracked connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalEnd {
    pub local: IpAddr,
    pub local_port: u16,
    pub remote: IpAddr,
    pub remote_port: u16,
    pub state: TcpState,
}

/// The local endpoints an entry counts (none, one, or two on loopback).
pub fn local_ends(flow: &FlowRef, word: Word) -> impl Iterator<Item = LocalEnd> {
    [Side::A, Side::B].into_iter().filter_map(move |side| {
        let state = word.counted(side);
        if state == TcpState::None {
            return None;
        }
        let (local, local_port) = flow.endpoint(side);
        let (remote, remote_port) = flow.endpoint(side.other());
        Some(LocalEnd {
            local,
            local_port,
            remote,
            remote_port,
            state,
        })
    })
}

impl FlowRef {
    /// The address and port of one side.
    pub fn endpoint(&self, side: Side) -> (IpAddr, u16) {
        match (self, side) {
            (FlowRef::V4(k), Side::A) => {
                (IpAddr::V4(Ipv4Addr::from(k.addr_a.to_ne_bytes())), k.port_a)
            }
            (FlowRef::V4(k), Side::B) => {
                (IpAddr::V4(Ipv4Addr::from(k.addr_b.to_ne_bytes())), k.port_b)
            }
            (FlowRef::V6(k), Side::A) => (IpAddr::V6(v6(&k.addr_a)), k.port_a),
            (FlowRef::V6(k), Side::B) => (IpAddr::V6(v6(&k.addr_b)), k.port_b),
        }
    }
}

fn v6(words: &[u32; 4]) -> Ipv6Addr {
    let mut b = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(b)
}

/// The service a connection belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Service {
    /// A local port: something listens there, or the port is outside the
    /// ephemeral range (a server whose listener has closed).
    Local(u16),
    /// The remote port of a connection from a local ephemeral port.
    Remote(u16),
}

/// The prefix of a [`Service::Remote`] key: `→443`.
pub const REMOTE_MARK: char = '→';

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Service::Local(p) => write!(f, "{p}"),
            Service::Remote(p) => write!(f, "{REMOTE_MARK}{p}"),
        }
    }
}

/// A set of ports, one bit each (8 KiB): asked once per entry on the walk,
/// where a hash lookup would cost more than the rest of the entry.
#[derive(Clone, Debug)]
pub struct PortSet(Box<[u64; 1024]>);

impl Default for PortSet {
    fn default() -> Self {
        PortSet(Box::new([0; 1024]))
    }
}

impl PortSet {
    pub fn insert(&mut self, port: u16) {
        self.0[usize::from(port >> 6)] |= 1 << (port & 63);
    }

    pub fn contains(&self, port: u16) -> bool {
        self.0[usize::from(port >> 6)] & (1 << (port & 63)) != 0
    }
}

impl FromIterator<u16> for PortSet {
    fn from_iter<I: IntoIterator<Item = u16>>(it: I) -> Self {
        let mut s = PortSet::default();
        for p in it {
            s.insert(p);
        }
        s
    }
}

impl<const N: usize> From<[u16; N]> for PortSet {
    fn from(ports: [u16; N]) -> Self {
        ports.into_iter().collect()
    }
}

/// What tells a service from a client: the namespace's listening ports and
/// its `net.ipv4.ip_local_port_range`.
#[derive(Clone, Debug, Default)]
pub struct Services {
    pub listening: PortSet,
    /// Inclusive; `(0, 0)` when unknown (then only listening ports are local
    /// services).
    pub ephemeral: (u16, u16),
}

impl Services {
    pub fn of(&self, end: &LocalEnd) -> Service {
        let (lo, hi) = self.ephemeral;
        let ephemeral = (lo..=hi).contains(&end.local_port) && hi > 0;
        if self.listening.contains(end.local_port) || (!ephemeral && hi > 0) {
            Service::Local(end.local_port)
        } else {
            Service::Remote(end.remote_port)
        }
    }
}

/// Connections by service and by remote address.
#[derive(Clone, Debug, Default)]
pub struct Breakdown {
    ports: HashMap<Service, StateCounts>,
    peers: HashMap<IpAddr, StateCounts>,
}

impl Breakdown {
    /// `end`, of `service` ([`Services::of`], which the walk asks once per
    /// end for this and for what needs attention).
    pub fn add(&mut self, end: &LocalEnd, service: Service) {
        bump(self.ports.entry(service).or_default(), end.state);
        bump(self.peers.entry(end.remote).or_default(), end.state);
    }

    /// A listening socket: counted under its port (it has no peer).
    pub fn add_listener(&mut self, port: u16) {
        bump(
            self.ports.entry(Service::Local(port)).or_default(),
            TcpState::Listen,
        );
    }

    /// The `k` services with the most connections, then "other".
    pub fn top_ports(&self, k: usize) -> Vec<Keyed> {
        top(self.ports.iter().map(|(p, c)| (p.to_string(), *c)), k)
    }

    /// The `k` remote addresses with the most connections, then "other".
    pub fn top_peers(&self, k: usize) -> Vec<Keyed> {
        top(self.peers.iter().map(|(a, c)| (a.to_string(), *c)), k)
    }
}

fn bump(c: &mut StateCounts, s: TcpState) {
    c.set(s, c.get(s) + 1);
}

/// Connections: every state but LISTEN (a listener is not a connection).
fn total(c: &StateCounts) -> u64 {
    c.0.iter().sum::<u64>() - c.get(TcpState::Listen)
}

/// The `k` largest rows by total (ties by key, so the order is stable), and
/// one "other" row summing the rest when there is a rest.
fn top(rows: impl Iterator<Item = (String, StateCounts)>, k: usize) -> Vec<Keyed> {
    let mut rows: Vec<Keyed> = rows
        .map(|(key, states)| Keyed {
            total: total(&states),
            key,
            states,
        })
        .collect();
    // By connections, then listeners, then key.
    rows.sort_by(|a, b| {
        b.total
            .cmp(&a.total)
            .then_with(|| {
                b.states
                    .get(TcpState::Listen)
                    .cmp(&a.states.get(TcpState::Listen))
            })
            .then_with(|| natural(&a.key, &b.key))
    });
    if rows.len() <= k {
        return rows;
    }
    let mut other = Keyed {
        key: OTHER.to_owned(),
        total: 0,
        states: StateCounts::default(),
    };
    for r in rows.drain(k..) {
        other.total += r.total;
        for (o, n) in other.states.0.iter_mut().zip(r.states.0) {
            *o += n;
        }
    }
    rows.push(other);
    rows
}

/// Numbers in numeric order (port 80 before 443, `→80` before `→443`),
/// anything else as text.
fn natural(a: &str, b: &str) -> std::cmp::Ordering {
    let num = |s: &str| s.trim_start_matches(REMOTE_MARK).parse::<u64>();
    match (num(a), num(b)) {
        (Ok(x), Ok(y)) => x.cmp(&y).then_with(|| a.cmp(b)),
        _ => a.cmp(b),
    }
}

#[cfg(test)]
mod tests {
    use tcpstate_common::FlowKey4;

    use super::*;
    use crate::snapshot::{PortFilter, PortSide};

    fn end(local_port: u16, remote: &str, state: TcpState) -> LocalEnd {
        LocalEnd {
            local: "10.0.0.100".parse().unwrap(),
            local_port,
            remote: remote.parse().unwrap(),
            remote_port: 40000,
            state,
        }
    }

    #[test]
    fn top_k_keeps_the_largest_and_sums_the_rest_as_other() {
        let s = Services {
            listening: [443, 80, 22, 8080].into(),
            ephemeral: (32768, 60999),
        };
        let mut b = Breakdown::default();
        let mut add = |e: LocalEnd| b.add(&e, s.of(&e));
        for _ in 0..5 {
            add(end(443, "10.0.0.1", TcpState::Established));
        }
        for _ in 0..3 {
            add(end(80, "10.0.0.2", TcpState::TimeWait));
        }
        add(end(22, "10.0.0.3", TcpState::Established));
        add(end(8080, "10.0.0.3", TcpState::CloseWait));
        b.add_listener(443);
        let ports = b.top_ports(2);
        let keys: Vec<&str> = ports.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["443", "80", "other"]);
        assert_eq!(ports[0].total, 5);
        assert_eq!(ports[0].states.get(TcpState::Listen), 1);
        assert_eq!(ports[2].total, 2);
        assert_eq!(ports[2].states.get(TcpState::Established), 1);
        assert_eq!(ports[2].states.get(TcpState::CloseWait), 1);
        // Ties (22 and 8080 both 1 with k = 4) in numeric order, no "other".
        let all: Vec<String> = b.top_ports(4).into_iter().map(|r| r.key).collect();
        assert_eq!(all, ["443", "80", "22", "8080"]);
        let peers = b.top_peers(1);
        assert_eq!(peers[0].key, "10.0.0.1");
        assert_eq!((peers[1].key.as_str(), peers[1].total), ("other", 5));
    }

    #[test]
    fn clients_are_grouped_by_the_service_they_reach() {
        let mut s = Services {
            listening: [8080].into(),
            ephemeral: (32768, 60999),
        };
        let mut b = Breakdown::default();
        let client = |local_port, remote_port| LocalEnd {
            local: "10.0.0.1".parse().unwrap(),
            local_port,
            remote: "10.0.0.9".parse().unwrap(),
            remote_port,
            state: TcpState::Established,
        };
        // Fifty clients of one upstream, each from its own ephemeral port.
        for i in 0..50 {
            {
                let e = client(52264 + i, 443);
                b.add(&e, s.of(&e));
            }
        }
        // Three clients of this host's listener (their ports are ephemeral
        // too, but the local end is the service).
        for i in 0..3 {
            {
                let e = client(8080, 40000 + i);
                b.add(&e, s.of(&e));
            }
        }
        // A server port outside the range whose listener has closed.
        {
            let e = client(9000, 41000);
            b.add(&e, s.of(&e));
        }
        // A listener inside the ephemeral range is still a service.
        s.listening.insert(40100);
        {
            let e = client(40100, 41001);
            b.add(&e, s.of(&e));
        }
        let rows: Vec<(String, u64)> = b
            .top_ports(10)
            .into_iter()
            .map(|r| (r.key, r.total))
            .collect();
        assert_eq!(
            rows,
            [
                ("→443".to_owned(), 50),
                ("8080".to_owned(), 3),
                ("9000".to_owned(), 1),
                ("40100".to_owned(), 1),
            ]
        );
        // Unknown range: only listening ports are local services.
        let s = Services {
            listening: [8080].into(),
            ephemeral: (0, 0),
        };
        assert_eq!(s.of(&client(9000, 41000)), Service::Remote(41000));
        assert_eq!(s.of(&client(8080, 41000)), Service::Local(8080));
    }

    #[test]
    fn local_ends_name_the_local_port_and_the_remote_address() {
        // 10.0.0.2:8080 (local, ESTABLISHED) talking to 10.0.0.9:50000.
        let local = u32::from_ne_bytes([10, 0, 0, 2]);
        let remote = u32::from_ne_bytes([10, 0, 0, 9]);
        let (key, side) = FlowKey4::new(0, remote, 50000, local, 8080);
        let server = side.other();
        let word = Word::EMPTY
            .with_state(server, TcpState::Established)
            .with_state(side, TcpState::Established)
            .with_local(server);
        let ends: Vec<LocalEnd> = local_ends(&FlowRef::V4(key), word).collect();
        assert_eq!(
            ends,
            [LocalEnd {
                local: "10.0.0.2".parse().unwrap(),
                local_port: 8080,
                remote: "10.0.0.9".parse().unwrap(),
                remote_port: 50000,
                state: TcpState::Established,
            }]
        );
    }

    #[test]
    fn port_filters_look_at_the_side_asked_for() {
        let f = |port, side| PortFilter {
            port: Some(port),
            side,
            netns: None,
        };
        assert!(f(443, PortSide::Local).matches(443, 50000));
        assert!(!f(443, PortSide::Remote).matches(443, 50000));
        assert!(f(50000, PortSide::Remote).matches(443, 50000));
        assert!(f(50000, PortSide::Any).matches(443, 50000));
        assert!(!f(22, PortSide::Any).matches(443, 50000));
        assert!(PortFilter::default().matches(1, 2));
    }
}
