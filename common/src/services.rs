//! The service table: per namespace and service, how connections ended,
//! how long their handshakes took, and the SYNs a listening port received
//! and answered. The probe adds to it at state changes (never on the fast
//! path); the agent reads it each tick.
//!
//! A service is what the agent's breakdown calls one: a local port that
//! listens or lies outside `ip_local_port_range` ([`Kind::LOCAL`], keyed by
//! the port alone, so IPv4 and IPv6 and every address of it are one), or
//! else the remote address and port a connection reaches ([`Kind::REMOTE`]).
//! An end still in its handshake needs no rule: SYN_RECV is a local
//! service's, SYN_SENT a remote one's.

use crate::{
    durations::Histogram,
    flow::{FlowKey4, FlowKey6, Side},
};

/// Which kind of service a key names.
pub struct Kind;

impl Kind {
    pub const LOCAL: u8 = 0;
    pub const REMOTE: u8 = 1;
    /// Not a key's: "decide by the port" (a listening or non-ephemeral
    /// local port is [`Kind::LOCAL`], else [`Kind::REMOTE`]).
    pub const BY_PORT: u8 = 2;
}

/// A service table key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    /// The namespace's slot.
    pub netns: u32,
    pub port: u16,
    /// [`Kind::LOCAL`] or [`Kind::REMOTE`].
    pub kind: u8,
    /// 4 or 6 for a remote service; 0 for a local one.
    pub family: u8,
    /// The remote address (wire order; IPv4 in the first word); zero for
    /// a local service.
    pub addr: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 24);

/// What the table counts for one service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceStats {
    /// Local endpoints that ended, by outcome (in the order of
    /// [`crate::Event::OUTCOMES`]).
    pub outcomes: [u64; OUTCOMES],
    /// SYNs that reached a listening port and found no connection (each
    /// retransmission counted, as the kernel's ListenDrops counts).
    pub syns: u64,
    /// Those this host answered (a SYN-ACK, a cookie's included).
    pub answered: u64,
    /// Completed handshakes: a local service's (first SYN-ACK to
    /// completion), a remote one's connects (first SYN to SYN-ACK).
    pub times: Histogram,
}

pub const OUTCOMES: usize = 5;

const _: () = assert!(core::mem::size_of::<ServiceStats>() == 320);

/// What one addition to the table is (the probe's `note_service`): an
/// outcome (0 to [`OUTCOMES`] - 1), or one of these.
pub struct What;

impl What {
    pub const TIME: u32 = 5;
    pub const SYN: u32 = 6;
    pub const ANSWER: u32 = 7;
}

/// A listening port of a namespace (the agent keeps the probe's set equal
/// to the socket table's listeners).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ListenKey {
    pub netns: u32,
    pub port: u16,
    pub pad: u16,
}

const _: () = assert!(core::mem::size_of::<ListenKey>() == 8);

/// A namespace's `ip_local_port_range` as the probe keeps it: low port in
/// the low half, high port in the high half; 0 for Linux's default.
#[inline(always)]
pub const fn ephemeral(range: u32, port: u16) -> bool {
    let (lo, hi) = if range == 0 {
        (32768, 60999)
    } else {
        (range & 0xffff, range >> 16)
    };
    port as u32 >= lo && port as u32 <= hi
}

/// A flow's two endpoints, as the service table needs them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ends {
    pub addr: [[u32; 4]; 2],
    pub port: [u16; 2],
    /// 4 or 6.
    pub family: u32,
}

const _: () = assert!(core::mem::size_of::<Ends>() == 40);

impl Ends {
    #[inline(always)]
    pub const fn of4(k: &FlowKey4) -> Ends {
        Ends {
            addr: [[k.addr_a, 0, 0, 0], [k.addr_b, 0, 0, 0]],
            port: [k.port_a, k.port_b],
            family: 4,
        }
    }

    #[inline(always)]
    pub const fn of6(k: &FlowKey6) -> Ends {
        Ends {
            addr: [k.addr_a, k.addr_b],
            port: [k.port_a, k.port_b],
            family: 6,
        }
    }

    /// The key of the service that endpoint `side` (a local one) belongs
    /// to, as `kind` says ([`Kind::BY_PORT`] decided by `listening` and
    /// `range` for its port).
    #[inline(always)]
    pub fn service(
        &self,
        netns: u32,
        side: Side,
        kind: u8,
        listening: impl Fn(u16) -> bool,
        range: u32,
    ) -> ServiceKey {
        let (me, peer) = (side.index(), side.other().index());
        let port = self.port[me];
        let local = match kind {
            Kind::LOCAL => true,
            Kind::REMOTE => false,
            _ => !ephemeral(range, port) || listening(port),
        };
        if local {
            ServiceKey {
                netns,
                port,
                kind: Kind::LOCAL,
                family: 0,
                addr: [0; 4],
            }
        } else {
            ServiceKey {
                netns,
                port: self.port[peer],
                kind: Kind::REMOTE,
                family: self.family as u8,
                addr: self.addr[peer],
            }
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `#[repr(C)]`, no padding (sizes asserted above).
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceStats {}
    unsafe impl aya::Pod for super::ListenKey {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_end_belongs_to_its_listening_port_or_to_what_it_reaches() {
        let (k, side) = FlowKey4::new(3, 0x0100_000a, 41000, 0x0200_000a, 5432);
        let ends = Ends::of4(&k);
        let none = |_| false;
        let client = ends.service(3, side, Kind::BY_PORT, none, 0);
        assert_eq!(
            (client.kind, client.port, client.addr[0], client.family),
            (Kind::REMOTE, 5432, 0x0200_000a, 4)
        );
        // The same end, its port listening: the local service.
        let listens = |p| p == 41000;
        let server = ends.service(3, side, Kind::BY_PORT, listens, 0);
        assert_eq!(
            (server.kind, server.port, server.addr),
            (Kind::LOCAL, 41000, [0; 4])
        );
        // The peer's end (port 5432, outside the range) is a local service.
        let other = ends.service(3, side.other(), Kind::BY_PORT, none, 0);
        assert_eq!((other.kind, other.port), (Kind::LOCAL, 5432));
        // A narrowed range: 41000 is no longer ephemeral.
        let range = 40000 | 40099 << 16;
        assert!(!ephemeral(range, 41000) && ephemeral(range, 40050));
        assert_eq!(
            ends.service(3, side, Kind::BY_PORT, none, range).kind,
            Kind::LOCAL
        );
        // An explicit kind wins.
        assert_eq!(
            ends.service(3, side, Kind::REMOTE, listens, 0).kind,
            Kind::REMOTE
        );
    }
}
