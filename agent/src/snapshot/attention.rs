//! What needs attention, in every snapshot (bounded: the worst K of each):
//! listeners whose accept queue fills, connections held long in CLOSE_WAIT
//! and FIN_WAIT2, and clients running out of local ports toward one
//! upstream. Made on the once-a-second walk of the flow maps.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};
use tcpstate_common::TcpState;

use super::conns::Listener;

/// How long a CLOSE_WAIT or FIN_WAIT2 must have lasted to count as old
/// ([`Oldest::old`]): an application that has not closed a socket its peer
/// closed a minute ago is usually leaking it.
pub const OLD_AFTER_S: f64 = 60.0;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Attention {
    /// The listeners with the fullest accept queues.
    #[serde(default)]
    pub queues: Vec<Queue>,
    /// Per service, the oldest CLOSE_WAIT and FIN_WAIT2, oldest first.
    #[serde(default)]
    pub oldest: Vec<Oldest>,
    /// The (local address, upstream) pairs holding the most local ports.
    #[serde(default)]
    pub pressure: Vec<Pressure>,
    /// The upstreams whose connects failed lately, most first.
    #[serde(default)]
    pub failing: Vec<Failing>,
    /// The listening ports that left SYNs unanswered lately, most first.
    #[serde(default)]
    pub dropping: Vec<Dropping>,
}

/// A listening port whose SYNs went unanswered in the last one to two
/// minutes (a full accept queue or SYN backlog, a firewall).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dropping {
    pub netns: u64,
    pub port: u16,
    /// SYNs unanswered in the last one to two minutes.
    pub recent: u64,
    /// Since the agent started.
    pub unanswered: u64,
}

/// An upstream whose connects failed in the last one to two minutes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failing {
    pub netns: u64,
    /// `→ADDRESS:PORT`.
    pub service: String,
    /// Connects that failed in the last one to two minutes.
    pub recent: u64,
    /// Since the agent started: refused (an RST), never answered.
    pub refused: u64,
    pub handshake_timeout: u64,
    /// Its completed connects' 99th percentile, seconds.
    pub connect_p99_s: Option<f64>,
}

/// A listener in a namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Queue {
    pub netns: u64,
    #[serde(flatten)]
    pub listener: Listener,
}

/// The oldest connection of one state at one service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Oldest {
    pub netns: u64,
    /// The service key, as in `ports` (`8080`, `→5432`).
    pub service: String,
    #[serde(with = "super::conns::state_name")]
    pub state: TcpState,
    /// The oldest one's time in the state, seconds.
    pub age_s: f64,
    /// Connections of the service in that state.
    pub count: u64,
    /// Of those, how many have lasted [`OLD_AFTER_S`] or longer.
    pub old: u64,
}

/// Local ports one local address holds toward one remote address and port.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    pub netns: u64,
    pub local: IpAddr,
    pub remote: SocketAddr,
    /// Local ports it holds, in any state (TIME_WAIT included: the kernel
    /// cannot reuse them toward the same upstream either).
    pub ports: u64,
    /// The size of the namespace's `net.ipv4.ip_local_port_range`.
    pub range: u64,
}

impl Pressure {
    /// The share of the range in use: at 1 connect() to this upstream fails
    /// with EADDRNOTAVAIL.
    pub fn ratio(&self) -> f64 {
        if self.range == 0 {
            0.0
        } else {
            self.ports as f64 / self.range as f64
        }
    }
}

impl Attention {
    /// Every namespace's rows together, each list cut again to the `k`
    /// worst.
    pub fn merge<'a>(parts: impl Iterator<Item = &'a Attention>, k: usize) -> Attention {
        let mut all = Attention::default();
        for p in parts {
            all.queues.extend(p.queues.iter().cloned());
            all.oldest.extend(p.oldest.iter().cloned());
            all.pressure.extend(p.pressure.iter().cloned());
            all.failing.extend(p.failing.iter().cloned());
            all.dropping.extend(p.dropping.iter().cloned());
        }
        all.sort_and_cut(k);
        all
    }

    /// Worst first: the fullest queues, the oldest states, the highest
    /// port use; `k` of each.
    pub fn sort_and_cut(&mut self, k: usize) {
        let fill = |q: &Queue| (q.listener.queue as f64 + 1.0) / (q.listener.backlog as f64 + 1.0);
        self.queues.sort_by(|a, b| {
            fill(b)
                .total_cmp(&fill(a))
                .then(b.listener.syn_recv.cmp(&a.listener.syn_recv))
        });
        self.oldest.sort_by(|a, b| b.age_s.total_cmp(&a.age_s));
        self.pressure
            .sort_by(|a, b| b.ratio().total_cmp(&a.ratio()).then(b.ports.cmp(&a.ports)));
        self.failing.sort_by_key(|f| std::cmp::Reverse(f.recent));
        self.dropping.sort_by_key(|d| std::cmp::Reverse(d.recent));
        self.queues.truncate(k);
        self.oldest.truncate(k);
        self.pressure.truncate(k);
        self.failing.truncate(k);
        self.dropping.truncate(k);
    }
}
