//! The probe's service table (`tcpstate_common::services`) as a snapshot
//! carries it: per namespace and service, how its connections ended, its
//! handshake (or, for an upstream, connect) times, and for a listening port
//! the SYNs it received and left unanswered.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};
use tcpstate_common::{
    Event,
    services::{Kind, ServiceKey, ServiceStats},
};

use super::durations::Histogram;

/// One service of one namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceRow {
    pub netns: u64,
    /// A local port (`8080`), or the remote address and port connections
    /// reach (`→10.0.0.9:5432`).
    pub service: Service,
    /// Local endpoints that ended, by outcome (`normal`, `refused`, ...).
    pub closed: Closed,
    /// A listening port's SYNs that found no connection, each retransmission
    /// counted; and those still unanswered a tick later.
    pub syns: u64,
    pub unanswered: u64,
    /// Completed handshakes: a local service's from its first SYN-ACK, an
    /// upstream's connects from the first SYN.
    pub times: Histogram,
}

/// What a service is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Service {
    Local(u16),
    Remote(SocketAddr),
}

impl Service {
    pub fn of(key: &ServiceKey) -> Service {
        if key.kind == Kind::LOCAL {
            return Service::Local(key.port);
        }
        let ip = if key.family == 6 {
            let mut b = [0u8; 16];
            for (i, w) in key.addr.iter().enumerate() {
                b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        } else {
            IpAddr::V4(Ipv4Addr::from(key.addr[0].to_ne_bytes()))
        };
        Service::Remote(SocketAddr::new(ip, key.port))
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Service::Local(p) => write!(f, "{p}"),
            Service::Remote(a) => write!(f, "→{a}"),
        }
    }
}

/// Ends by outcome, named as `tcpstate_connections_closed_total`'s label.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Closed {
    pub normal: u64,
    pub refused: u64,
    pub handshake_timeout: u64,
    pub reset_local: u64,
    pub reset_remote: u64,
}

impl Closed {
    pub fn of(outcomes: &[u64; 5]) -> Closed {
        let [
            normal,
            refused,
            handshake_timeout,
            reset_local,
            reset_remote,
        ] = *outcomes;
        Closed {
            normal,
            refused,
            handshake_timeout,
            reset_local,
            reset_remote,
        }
    }

    /// By outcome, in [`Event::OUTCOMES`]' order, with their labels.
    pub fn by_outcome(&self) -> [(&'static str, u64); 5] {
        let v = [
            self.normal,
            self.refused,
            self.handshake_timeout,
            self.reset_local,
            self.reset_remote,
        ];
        std::array::from_fn(|i| (Event::OUTCOMES[i].1, v[i]))
    }

    pub fn total(&self) -> u64 {
        self.by_outcome().iter().map(|(_, n)| n).sum()
    }

    /// Connects that failed: refused or never answered.
    pub fn failed(&self) -> u64 {
        self.refused + self.handshake_timeout
    }
}

impl ServiceRow {
    pub fn of(netns: u64, key: &ServiceKey, stats: &ServiceStats, unanswered: u64) -> ServiceRow {
        ServiceRow {
            netns,
            service: Service::of(key),
            closed: Closed::of(&stats.outcomes),
            syns: stats.syns,
            unanswered,
            times: Histogram {
                buckets: stats.times.buckets.to_vec(),
                sum_units: stats.times.sum,
            },
        }
    }

    /// How much happened at it: ends, handshakes and SYNs (what ranks the
    /// services the metrics name one by one).
    pub fn activity(&self) -> u64 {
        self.closed.total() + self.times.count() + self.syns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_their_service() {
        let local = ServiceKey {
            netns: 1,
            port: 8080,
            kind: Kind::LOCAL,
            ..Default::default()
        };
        assert_eq!(Service::of(&local).to_string(), "8080");
        let remote = ServiceKey {
            netns: 1,
            port: 5432,
            kind: Kind::REMOTE,
            family: 4,
            addr: [u32::from_ne_bytes([10, 0, 0, 9]), 0, 0, 0],
        };
        assert_eq!(Service::of(&remote).to_string(), "→10.0.0.9:5432");
        let mut v6 = remote;
        v6.family = 6;
        v6.addr = [
            u32::from_ne_bytes([0xfd, 0, 0, 0]),
            0,
            0,
            u32::from_ne_bytes([0, 0, 0, 2]),
        ];
        assert_eq!(Service::of(&v6).to_string(), "→[fd00::2]:5432");
        let closed = Closed::of(&[1, 2, 3, 4, 5]);
        assert_eq!(closed.by_outcome()[2], ("handshake_timeout", 3));
        assert_eq!((closed.total(), closed.failed()), (15, 5));
    }
}
