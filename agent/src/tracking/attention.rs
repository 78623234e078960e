//! Filling a namespace's [`Attention`] from one walk of the flow maps:
//! each local endpoint is added once, in constant memory per listener,
//! service and upstream (never per connection).

use std::net::{IpAddr, SocketAddr};

use foldhash::{HashMap, HashMapExt};
use tcpstate_common::TcpState;

use crate::{
    kernel::sockdiag::SockInfo,
    snapshot::attention::{Attention, OLD_AFTER_S, Oldest, Pressure, Queue},
    tracking::{
        breakdown::{LocalEnd, Service, Services},
        listeners::ListenerRows,
    },
};

pub struct Watch<'a> {
    netns: u64,
    services: &'a Services,
    now_ns: u64,
    listeners: ListenerRows,
    /// (service, state) to (count, oldest change, old ones).
    held: HashMap<(Service, TcpState), (u64, u64, u64)>,
    /// Local ports per (local address, upstream), clients' ends only.
    ports: HashMap<(IpAddr, SocketAddr), u64>,
}

impl<'a> Watch<'a> {
    /// For namespace `netns` (its inode) with these listening sockets, read
    /// at CLOCK_MONOTONIC `now_ns`.
    pub fn new(netns: u64, services: &'a Services, listening: &[SockInfo], now_ns: u64) -> Self {
        Watch {
            netns,
            services,
            now_ns,
            listeners: ListenerRows::new(listening),
            held: HashMap::new(),
            ports: HashMap::new(),
        }
    }

    /// One local endpoint of `service` whose state last changed at
    /// `changed_ns`.
    pub fn add(&mut self, end: &LocalEnd, service: Service, changed_ns: u64) {
        if self.services.listening.contains(end.local_port) {
            self.listeners.add(end);
        }
        if matches!(end.state, TcpState::CloseWait | TcpState::FinWait2) {
            let age = self.now_ns.saturating_sub(changed_ns);
            let old = age as f64 >= OLD_AFTER_S * 1e9;
            let h = self
                .held
                .entry((service, end.state))
                .or_insert((0, u64::MAX, 0));
            h.0 += 1;
            h.1 = h.1.min(changed_ns);
            h.2 += u64::from(old);
        }
        if matches!(service, Service::Remote(_)) {
            let upstream = SocketAddr::new(end.remote, end.remote_port);
            *self.ports.entry((end.local, upstream)).or_default() += 1;
        }
    }

    /// The `k` worst of each.
    pub fn done(self, k: usize) -> Attention {
        let netns = self.netns;
        let (lo, hi) = self.services.ephemeral;
        let range = if hi >= lo && hi > 0 {
            u64::from(hi - lo) + 1
        } else {
            0
        };
        let mut a = Attention {
            queues: self
                .listeners
                .done()
                .into_iter()
                .map(|listener| Queue { netns, listener })
                .collect(),
            oldest: self
                .held
                .into_iter()
                .map(|((service, state), (count, since, old))| Oldest {
                    netns,
                    service: service.to_string(),
                    state,
                    age_s: self.now_ns.saturating_sub(since) as f64 / 1e9,
                    count,
                    old,
                })
                .collect(),
            pressure: self
                .ports
                .into_iter()
                .map(|((local, remote), ports)| Pressure {
                    netns,
                    local,
                    remote,
                    ports,
                    range,
                })
                .collect(),
            // Filled from the service table (`tracker.rs`).
            failing: Vec::new(),
            dropping: Vec::new(),
        };
        a.sort_and_cut(k);
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn end(local_port: u16, remote: &str, remote_port: u16, state: TcpState) -> LocalEnd {
        LocalEnd {
            local: "10.0.0.1".parse().unwrap(),
            local_port,
            remote: remote.parse().unwrap(),
            remote_port,
            state,
        }
    }

    #[test]
    fn the_worst_of_each_come_first() {
        let services = Services {
            listening: [8080].into(),
            ephemeral: (60000, 60099),
        };
        let mut w = Watch::new(7, &services, &[], 1000 * SEC);
        // 30 ports to one upstream (TIME_WAIT counts), 10 to another.
        for i in 0..30 {
            let e = end(60000 + i, "10.0.0.9", 5432, TcpState::TimeWait);
            w.add(&e, services.of(&e), 999 * SEC);
        }
        for i in 0..10 {
            let e = end(60050 + i, "10.0.0.8", 443, TcpState::Established);
            w.add(&e, services.of(&e), 999 * SEC);
        }
        // CLOSE_WAIT at the service: 90 s, 70 s and 5 s old.
        for at in [910, 930, 995] {
            let e = end(8080, "10.0.0.7", 40000, TcpState::CloseWait);
            w.add(&e, services.of(&e), at * SEC);
        }
        let a = w.done(5);
        let p: Vec<(String, u64, f64)> = a
            .pressure
            .iter()
            .map(|p| (p.remote.to_string(), p.ports, p.ratio()))
            .collect();
        assert_eq!(
            p,
            [
                ("10.0.0.9:5432".to_owned(), 30, 0.3),
                ("10.0.0.8:443".to_owned(), 10, 0.1)
            ]
        );
        assert_eq!(a.oldest.len(), 1);
        let o = &a.oldest[0];
        assert_eq!(
            (o.service.as_str(), o.state, o.count, o.old),
            ("8080", TcpState::CloseWait, 3, 2)
        );
        assert!((o.age_s - 90.0).abs() < 1e-9);
    }
}
