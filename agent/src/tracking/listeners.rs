//! One row per listening address and port: its accept queue and backlog
//! from the socket table, its handshakes under way (SYN_RECV) and its
//! connections from the flow maps.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use foldhash::{HashMap, HashMapExt};
use tcpstate_common::TcpState;

use crate::{kernel::sockdiag::SockInfo, snapshot::conns::Listener, tracking::breakdown::LocalEnd};

/// Listener rows being filled from a walk of the flow maps.
pub struct ListenerRows {
    rows: Vec<Listener>,
    /// (address, port) to the row of the listener there.
    at: HashMap<(IpAddr, u16), usize>,
}

impl ListenerRows {
    /// Rows for the listening sockets `socks` (one row per address and
    /// port, SO_REUSEPORT groups summed).
    pub fn new(socks: &[SockInfo]) -> ListenerRows {
        let mut rows: Vec<Listener> = Vec::new();
        let mut at = HashMap::new();
        for s in socks {
            let key = (unmapped(s.local), s.local_port);
            let i = *at.entry(key).or_insert_with(|| {
                rows.push(Listener {
                    local: SocketAddr::new(key.0, key.1),
                    sockets: 0,
                    queue: 0,
                    backlog: 0,
                    syn_recv: 0,
                    connections: 0,
                    unanswered: 0,
                    handshake_p50_s: None,
                    handshake_p99_s: None,
                });
                rows.len() - 1
            });
            let r = &mut rows[i];
            r.sockets += 1;
            r.queue += u64::from(s.recv_queue);
            r.backlog += u64::from(s.send_queue);
        }
        ListenerRows { rows, at }
    }

    /// A local endpoint: counted at the listener that accepted it, the one
    /// on its own address or else the wildcard one on its port (IPv4
    /// first, then a dual-stack `[::]`).
    pub fn add(&mut self, end: &LocalEnd) {
        if end.state == TcpState::Listen {
            return;
        }
        let port = end.local_port;
        let local = unmapped(end.local);
        let wild = match local {
            IpAddr::V4(_) => [
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ],
            IpAddr::V6(_) => [IpAddr::V6(Ipv6Addr::UNSPECIFIED); 2],
        };
        let found = [local, wild[0], wild[1]]
            .into_iter()
            .find_map(|a| self.at.get(&(a, port)).copied());
        if let Some(i) = found {
            let r = &mut self.rows[i];
            if end.state == TcpState::SynRecv {
                r.syn_recv += 1;
            } else {
                r.connections += 1;
            }
        }
    }

    /// The rows by port, then address.
    pub fn done(mut self) -> Vec<Listener> {
        self.rows.sort_by_key(|r| (r.local.port(), r.local.ip()));
        self.rows
    }
}

fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn listening(addr: &str, port: u16, queue: u32, backlog: u32) -> SockInfo {
        SockInfo {
            state: TcpState::Listen as u8,
            local: addr.parse().unwrap(),
            local_port: port,
            remote: "0.0.0.0".parse().unwrap(),
            remote_port: 0,
            timewait_left: None,
            timer: 0,
            expires: Duration::ZERO,
            recv_queue: queue,
            send_queue: backlog,
            inode: 1,
        }
    }

    fn end(local: &str, port: u16, state: TcpState) -> LocalEnd {
        LocalEnd {
            local: local.parse().unwrap(),
            local_port: port,
            remote: "10.9.9.9".parse().unwrap(),
            remote_port: 40000,
            state,
        }
    }

    #[test]
    fn ends_go_to_their_own_address_before_the_wildcard() {
        let mut rows = ListenerRows::new(&[
            listening("0.0.0.0", 80, 2, 128),
            listening("10.0.0.1", 80, 0, 16),
            listening("::", 443, 1, 4),
            listening("::", 443, 3, 4),
        ]);
        rows.add(&end("10.0.0.1", 80, TcpState::SynRecv));
        rows.add(&end("10.0.0.2", 80, TcpState::SynRecv));
        rows.add(&end("10.0.0.2", 80, TcpState::Established));
        // IPv4 to a dual-stack listener.
        rows.add(&end("10.0.0.2", 443, TcpState::CloseWait));
        // No listener on this port: a client's end.
        rows.add(&end("10.0.0.2", 50000, TcpState::Established));
        let rows = rows.done();
        let got: Vec<(String, u32, u64, u64, u64, u64)> = rows
            .iter()
            .map(|r| {
                (
                    r.local.to_string(),
                    r.sockets,
                    r.queue,
                    r.backlog,
                    r.syn_recv,
                    r.connections,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("0.0.0.0:80".to_owned(), 1, 2, 128, 1, 1),
                ("10.0.0.1:80".to_owned(), 1, 0, 16, 1, 0),
                ("[::]:443".to_owned(), 2, 4, 8, 0, 1),
            ]
        );
    }
}
