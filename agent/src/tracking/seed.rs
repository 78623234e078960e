//! Connections that exist before the probe is attached: read from the
//! kernel's socket table (sock_diag) and written into the flow maps through
//! the probe's command program, which counts them. Seeding runs after the
//! programs are attached, so a connection is either seen by packets or
//! seeded; if packets created its entry first, the seed is dropped.

use std::{collections::HashMap, net::IpAddr};

use netlink_packet_sock_diag::inet::StateFlags;
use tcpstate_common::{
    Command, FlowKey4, FlowKey6, Side, TcpState, Word,
    command::{op, outcome},
    machine::peer_state,
};

use crate::{
    error::Result,
    kernel::{
        maps::{FlowRef, ipv6_words},
        probe::Probe,
        sockdiag::{SockDiag, SockInfo},
    },
    tracking::timers::{Timeouts, monotonic_ns},
};

/// An address as the probe stores it: IPv4 (also an IPv4-mapped IPv6
/// address, which travels as IPv4 on the wire) or IPv6, words in wire order.
enum Addr {
    V4(u32),
    V6([u32; 4]),
}

fn addr(ip: IpAddr) -> Addr {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(v4) => Addr::V4(u32::from_ne_bytes(v4.octets())),
        IpAddr::V6(v6) => Addr::V6(ipv6_words(&v6)),
    }
}

/// The flow a socket of namespace slot `netns` belongs to and the side its
/// local endpoint is.
pub fn flow_of(netns: u32, s: &SockInfo) -> Option<(FlowRef, Side)> {
    match (addr(s.local), addr(s.remote)) {
        (Addr::V4(l), Addr::V4(r)) => {
            let (k, side) = FlowKey4::new(netns, l, s.local_port, r, s.remote_port);
            Some((FlowRef::V4(k), side))
        }
        (Addr::V6(l), Addr::V6(r)) => {
            let (k, side) = FlowKey6::new(netns, l, s.local_port, r, s.remote_port);
            Some((FlowRef::V6(k), side))
        }
        _ => None,
    }
}

/// The seed commands for a socket table read at `now_ns`. Both ends of a
/// connection inside the namespace (loopback) become one entry. `netns`:
/// the namespace's slot.
pub fn plan(netns: u32, sockets: &[SockInfo], now_ns: u64, t: &Timeouts) -> Vec<Command> {
    let mut flows: HashMap<FlowRef, (Word, u64)> = HashMap::new();
    for s in sockets {
        let state = TcpState::from_bits(s.state);
        if state.is_gone() || state == TcpState::Listen {
            continue;
        }
        let Some((flow, side)) = flow_of(netns, s) else {
            continue;
        };
        // A timer already running started before now: date the entry back so
        // that it expires when the kernel's does.
        let changed = match (s.timewait_left, t.for_state(state)) {
            (Some(left), Some(full)) => {
                now_ns.saturating_sub(full.saturating_sub(left).as_nanos() as u64)
            }
            _ => now_ns,
        };
        let (word, at) = flows.entry(flow).or_insert((Word::EMPTY, changed));
        *word = word.with_state(side, state).with_local(side);
        if !word.is_local(side.other()) {
            *word = word.with_state(side.other(), peer_state(state));
        }
        *at = (*at).min(changed);
    }
    flows
        .into_iter()
        .map(|(flow, (word, at))| {
            let mut cmd = flow.command(0, word.settle().0);
            cmd.op = op::SEED;
            cmd.changed_ns = at;
            cmd
        })
        .collect()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeedStats {
    /// Entries created from the socket table.
    pub seeded: u64,
    /// Already tracked from packets.
    pub already: u64,
    /// Refused: the flow map is full.
    pub map_full: u64,
}

/// Seeds the flow maps from the socket table of `diag`'s namespace.
pub fn seed(probe: &Probe, netns: u32, diag: &mut SockDiag, t: &Timeouts) -> Result<SeedStats> {
    let mut sockets = Vec::new();
    let states = StateFlags::all() - StateFlags::LISTEN - StateFlags::CLOSE;
    diag.for_each(states, |s| sockets.push(s.clone()))?;
    let mut stats = SeedStats::default();
    for cmd in plan(netns, &sockets, monotonic_ns(), t) {
        match probe.command(&cmd)? {
            outcome::DONE => stats.seeded += 1,
            outcome::CHANGED => stats.already += 1,
            _ => stats.map_full += 1,
        }
    }
    Ok(stats)
}

/// Makes the probe's LISTEN count of namespace slot `netns` equal
/// `listening` (the socket table's, read just now); the kernel's reports
/// move it from here.
pub fn seed_listening(probe: &Probe, netns: u32, listening: u64) -> Result<()> {
    let now = probe.counters(netns)?.states[TcpState::Listen as usize];
    seed_listening_by(probe, netns, listening as i64 - now)
}

/// Moves the probe's LISTEN count of slot `netns` by `delta`.
pub fn seed_listening_by(probe: &Probe, netns: u32, delta: i64) -> Result<()> {
    if delta == 0 {
        return Ok(());
    }
    let cmd = Command {
        op: op::LISTEN,
        family: 4,
        key4: FlowKey4 {
            netns,
            ..Default::default()
        },
        new: delta as i32 as u32,
        ..Command::default()
    };
    probe.command(&cmd)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn sock(state: TcpState, local: &str, lport: u16, remote: &str, rport: u16) -> SockInfo {
        SockInfo {
            state: state as u8,
            local: local.parse().unwrap(),
            local_port: lport,
            remote: remote.parse().unwrap(),
            remote_port: rport,
            timewait_left: None,
            timer: 0,
            expires: Duration::ZERO,
            recv_queue: 0,
            send_queue: 0,
            inode: 0,
        }
    }

    #[test]
    fn both_ends_on_this_host_make_one_entry_counting_both() {
        let socks = [
            sock(TcpState::Established, "127.0.0.1", 5000, "127.0.0.1", 40000),
            sock(TcpState::Established, "127.0.0.1", 40000, "127.0.0.1", 5000),
        ];
        let cmds = plan(0, &socks, 1_000, &Timeouts::default());
        assert_eq!(cmds.len(), 1);
        let w = Word(cmds[0].new);
        assert_eq!(
            (w.counted(Side::A), w.counted(Side::B)),
            (TcpState::Established, TcpState::Established)
        );
        assert_eq!((cmds[0].op, cmds[0].family), (op::SEED, 4));
    }

    #[test]
    fn a_remote_peer_is_inferred_and_not_counted() {
        let cmds = plan(
            0,
            &[sock(TcpState::FinWait2, "fd00::1", 80, "fd00::2", 40000)],
            5,
            &Timeouts::default(),
        );
        let w = Word(cmds[0].new);
        let (local, remote) = if w.is_local(Side::A) {
            (Side::A, Side::B)
        } else {
            (Side::B, Side::A)
        };
        assert_eq!(w.counted(local), TcpState::FinWait2);
        assert_eq!(w.state(remote), TcpState::CloseWait);
        assert_eq!(w.counted(remote), TcpState::None);
        assert_eq!(cmds[0].family, 6);
    }

    #[test]
    fn ipv4_mapped_sockets_go_to_the_ipv4_map() {
        let cmds = plan(
            0,
            &[sock(
                TcpState::Established,
                "::ffff:10.0.0.1",
                80,
                "::ffff:10.0.0.2",
                999,
            )],
            5,
            &Timeouts::default(),
        );
        assert_eq!(cmds[0].family, 4);
        let expected = FlowKey4::new(
            0,
            u32::from_ne_bytes([10, 0, 0, 1]),
            80,
            u32::from_ne_bytes([10, 0, 0, 2]),
            999,
        )
        .0;
        assert_eq!(cmds[0].key4, expected);
    }

    #[test]
    fn a_running_time_wait_timer_is_dated_back() {
        let mut tw = sock(TcpState::TimeWait, "10.0.0.1", 40000, "10.0.0.2", 80);
        tw.timewait_left = Some(Duration::from_secs(20));
        let now = 1_000_000_000_000;
        let cmds = plan(0, &[tw], now, &Timeouts::default());
        // 60 s timer with 20 s left: it started 40 s ago.
        assert_eq!(cmds[0].changed_ns, now - 40_000_000_000);
    }

    #[test]
    fn listeners_and_closed_sockets_are_not_seeded() {
        let socks = [
            sock(TcpState::Listen, "0.0.0.0", 80, "0.0.0.0", 0),
            sock(TcpState::Close, "10.0.0.1", 1, "10.0.0.2", 2),
        ];
        assert!(plan(0, &socks, 5, &Timeouts::default()).is_empty());
    }
}
