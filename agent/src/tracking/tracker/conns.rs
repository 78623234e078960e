//! A tracker's connections one by one (`tcpstate conns`) and its listeners
//! (`tcpstate listeners`): states and ages from the flow maps, listeners
//! and queues from the socket table, read when asked.

use std::{collections::HashMap, net::SocketAddr};

use netlink_packet_sock_diag::inet::StateFlags;
use tcpstate_common::{FlowEntry, Side, TcpState, Word};

use super::Tracker;
use crate::{
    error::Result,
    kernel::{maps::FlowRef, nsinfo},
    snapshot::conns::{Conn, ConnFilter, Listener, NetnsRows},
    tracking::{breakdown::local_ends, listeners::ListenerRows, seed},
};

impl Tracker {
    /// The connections `filter` selects among this namespace's `entries`
    /// (of one walk of the flow maps, read at CLOCK_MONOTONIC `now_ns`) and
    /// its listening sockets, each with its socket's inode when
    /// `filter.process` asks for owners (0: none, or not asked).
    pub fn conns(
        &mut self,
        entries: &[(FlowRef, FlowEntry)],
        filter: &ConnFilter,
        now_ns: u64,
    ) -> Result<Vec<(Conn, u32)>> {
        let inodes = if filter.process {
            self.inodes()?
        } else {
            HashMap::new()
        };
        let mut out = Vec::new();
        for (flow, e) in entries {
            let word = Word(e.word);
            for side in [Side::A, Side::B] {
                let state = word.counted(side);
                if state == TcpState::None {
                    continue;
                }
                let changed = e.changed_ns(now_ns);
                let (la, lp) = flow.endpoint(side);
                let (pa, pp) = flow.endpoint(side.other());
                let conn = Conn {
                    state,
                    local: SocketAddr::new(la, lp),
                    peer: SocketAddr::new(pa, pp),
                    age_s: Some(now_ns.saturating_sub(changed) as f64 / 1e9),
                    age_at_least: changed <= self.seeded_ns,
                    owners: Vec::new(),
                };
                if filter.wants(&conn) {
                    let inode = inodes.get(&(*flow, side)).copied().unwrap_or(0);
                    out.push((conn, inode));
                }
            }
        }
        self.diag.for_each(StateFlags::LISTEN, |s| {
            let conn = Conn {
                state: TcpState::Listen,
                local: SocketAddr::new(s.local, s.local_port),
                peer: SocketAddr::new(s.remote, 0),
                age_s: None,
                age_at_least: false,
                owners: Vec::new(),
            };
            if filter.wants(&conn) {
                out.push((conn, if filter.process { s.inode } else { 0 }));
            }
        })?;
        Ok(out)
    }

    /// The inode of every connected socket of the namespace, by its flow
    /// and side (TIME_WAIT and request sockets have none).
    fn inodes(&mut self) -> Result<HashMap<(FlowRef, Side), u32>> {
        let mut inodes = HashMap::new();
        let slot = self.slot;
        let states = StateFlags::all() - StateFlags::LISTEN - StateFlags::CLOSE;
        self.diag.for_each(states, |s| {
            if s.inode != 0
                && let Some(at) = seed::flow_of(slot, s)
            {
                inodes.insert(at, s.inode);
            }
        })?;
        Ok(inodes)
    }

    /// This namespace's listeners, read from the socket table now, with
    /// what `entries` (of one walk) hold of their connections, and the
    /// namespace's ListenOverflows and ListenDrops.
    pub fn listeners(&mut self, entries: &[(FlowRef, FlowEntry)]) -> Result<NetnsRows<Listener>> {
        let mut socks = Vec::new();
        self.diag
            .for_each(StateFlags::LISTEN, |s| socks.push(s.clone()))?;
        let mut rows = ListenerRows::new(&socks);
        for (flow, e) in entries {
            for end in local_ends(flow, Word(e.word)) {
                rows.add(&end);
            }
        }
        let (overflows, drops) = self.ns.run(|| {
            Ok((
                nsinfo::snmp_counter("TcpExt", "ListenOverflows"),
                nsinfo::snmp_counter("TcpExt", "ListenDrops"),
            ))
        })?;
        Ok(NetnsRows {
            netns: self.identity.inode,
            name: self.identity.name.clone(),
            rows: rows.done(),
            listen_overflows: overflows,
            listen_drops: drops,
            handshakes: None,
        })
    }
}
