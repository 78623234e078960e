//! Local NAT: the flow maps are keyed by each socket's own tuple; the wire
//! may show another (see `tcpstate_common::nat`). A segment this host sends
//! carries its socket, whose tuple the TC egress program reads; when it is
//! not the wire's, the translation is kept (keyed by the wire tuple) for the
//! segments that arrive, and for ICMP errors, which quote the wire's.

use aya_ebpf::{
    bindings::__sk_buff,
    macros::map,
    maps::{Array, HashMap},
};
use tcpstate_common::{
    FlowKey4, FlowKey6, Side,
    nat::{MAX_NAT_FLOWS, NatTarget4, NatTarget6, flip_of, through},
};

use crate::{
    kernel::v4_mapped,
    parse::Packet,
    track::{local4, local6},
};

#[map]
pub static NAT4: HashMap<FlowKey4, NatTarget4> = HashMap::with_max_entries(MAX_NAT_FLOWS, 0);

#[map]
pub static NAT6: HashMap<FlowKey6, NatTarget6> = HashMap::with_max_entries(MAX_NAT_FLOWS, 0);

/// Non-zero once a translation was kept: until then no segment looks one up.
#[map]
static NAT_SEEN: Array<u32> = Array::with_max_entries(1, 0);

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const TCP_CLOSE: u32 = 7;
const TCP_LISTEN: u32 = 10;

/// A sending socket's own tuple, in the probe's form (`family` 0: none).
#[derive(Default)]
pub struct SockTuple {
    pub family: u32,
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
}

/// Fills `out` with the tuple of the socket a TC egress skb belongs to, if
/// it belongs to a connection's socket (not to the kernel's own reply
/// socket, which sends RSTs and TIME_WAIT ACKs, and is CLOSE). Written
/// field by field into a zeroed value: a moved `Option` of it would carry
/// undefined bytes the verifier refuses to read.
#[inline(always)]
pub fn sock_tuple(skb: *mut __sk_buff, out: &mut SockTuple) {
    // SAFETY: the context's socket pointer; the verifier rewrites the loads
    // below to the socket's fields after the null check.
    unsafe {
        let sk = (*skb).__bindgen_anon_2.sk;
        if sk.is_null() {
            return;
        }
        let state = (*sk).state;
        if state == TCP_CLOSE || state == TCP_LISTEN {
            return;
        }
        out.sport = (*sk).src_port as u16;
        out.dport = u16::from_be((*sk).dst_port);
        match (*sk).family {
            AF_INET => {
                out.family = 4;
                out.src[0] = (*sk).src_ip4;
                out.dst[0] = (*sk).dst_ip4;
            }
            AF_INET6 => {
                out.src = (*sk).src_ip6;
                out.dst = (*sk).dst_ip6;
                out.family = 6;
                if v4_mapped(&out.src) && v4_mapped(&out.dst) {
                    out.family = 4;
                    out.src = [out.src[3], 0, 0, 0];
                    out.dst = [out.dst[3], 0, 0, 0];
                }
            }
            _ => {}
        }
    }
}

#[inline(always)]
fn seen() -> bool {
    NAT_SEEN.get(0).is_some_and(|v| *v != 0)
}

#[inline(always)]
fn mark_seen() {
    if let Some(v) = NAT_SEEN.get_ptr_mut(0) {
        // SAFETY: an array element, valid for the program's run.
        unsafe { *v = 1 };
    }
}

/// The socket tuple and sender side a segment on wire tuple `wire` (sender
/// `side`) belongs to: the sending socket's own (`sock`, family 0: none),
/// kept when it differs; else a kept translation; else the wire's.
#[inline(always)]
pub fn translate4(wire: FlowKey4, side: Side, sock: &SockTuple) -> (FlowKey4, Side) {
    if sock.family == 4 {
        let t = sock;
        let (key, sender) = FlowKey4::new(wire.netns, t.src[0], t.sport, t.dst[0], t.dport);
        if key != wire {
            let target = NatTarget4 {
                key,
                flip: flip_of(side, sender),
            };
            if NAT4.insert(&wire, &target, 0).is_ok() {
                mark_seen();
            }
        }
        return (key, sender);
    }
    if seen()
        && let Some(t) = NAT4.get_ptr(&wire)
    {
        // SAFETY: a live map value.
        let t = unsafe { *t };
        return (t.key, through(t.flip, side));
    }
    (wire, side)
}

#[inline(always)]
pub fn translate6(wire: FlowKey6, side: Side, sock: &SockTuple) -> (FlowKey6, Side) {
    if sock.family == 6 {
        let t = sock;
        let (key, sender) = FlowKey6::new(wire.netns, t.src, t.sport, t.dst, t.dport);
        if key != wire {
            let target = NatTarget6 {
                key,
                flip: flip_of(side, sender),
            };
            if NAT6.insert(&wire, &target, 0).is_ok() {
                mark_seen();
            }
        }
        return (key, sender);
    }
    if seen()
        && let Some(t) = NAT6.get_ptr(&wire)
    {
        // SAFETY: a live map value.
        let t = unsafe { *t };
        return (t.key, through(t.flip, side));
    }
    (wire, side)
}

/// Rewrites a parsed segment's addresses and ports into its sockets' view
/// (sender first), where local NAT applies. True when it did.
#[inline(always)]
pub fn to_socket_view(pkt: &mut Packet, sock: &SockTuple) -> bool {
    if pkt.family == 6 {
        let (wire, side) = FlowKey6::new(pkt.netns, pkt.src, pkt.sport, pkt.dst, pkt.dport);
        let (key, sender) = translate6(wire, side, sock);
        if key == wire {
            return false;
        }
        (pkt.src, pkt.sport, pkt.dst, pkt.dport) = key.sent_by(sender);
    } else {
        let (wire, side) = FlowKey4::new(pkt.netns, pkt.src[0], pkt.sport, pkt.dst[0], pkt.dport);
        let (key, sender) = translate4(wire, side, sock);
        if key == wire {
            return false;
        }
        (pkt.src[0], pkt.sport, pkt.dst[0], pkt.dport) = key.sent_by(sender);
    }
    true
}

/// A segment's tuple on the wire, sender first.
pub struct Wire {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
}

impl Wire {
    #[inline(always)]
    pub fn of(pkt: &Packet) -> Wire {
        Wire {
            src: pkt.src,
            dst: pkt.dst,
            sport: pkt.sport,
            dport: pkt.dport,
        }
    }
}

/// Notes where a segment a local socket sent also belongs, for a second
/// pass: when both its sockets are this host's (loopback) and a local NAT
/// gives them different tuples, as a sidecar proxy's redirect does (the
/// application's socket speaks to the remote port, the proxy's to its own).
/// The receiver's entry must see what arrives, or a transition only the
/// receiver's kernel makes of it (an orphaned FIN_WAIT2 taking the peer's
/// FIN into TIME_WAIT, which it reports to no one) is missed. `translated`:
/// the sender's own tuple is not the wire's.
#[inline(always)]
pub fn note_receiver(pkt: &mut Packet, wire: &Wire, translated: bool) {
    // `pkt.other_family` is 0 here (the caller cleared it).
    if translated {
        // The receiver's tuple is the wire's, if the receiver is here.
        let here = if pkt.family == 6 {
            local6(pkt.netns, &wire.dst)
        } else {
            local4(pkt.netns, wire.dst[0])
        };
        if here {
            (pkt.other_src, pkt.other_dst) = (wire.src, wire.dst);
            (pkt.other_sport, pkt.other_dport) = (wire.sport, wire.dport);
            pkt.other_family = pkt.family;
        }
        return;
    }
    // The sender's tuple is the wire's: a kept translation of this wire
    // tuple is the receiver's.
    if !seen() {
        return;
    }
    if pkt.family == 6 {
        let (key, side) = FlowKey6::new(pkt.netns, wire.src, wire.sport, wire.dst, wire.dport);
        if let Some(t) = NAT6.get_ptr(&key) {
            // SAFETY: a live map value.
            let t = unsafe { *t };
            (
                pkt.other_src,
                pkt.other_sport,
                pkt.other_dst,
                pkt.other_dport,
            ) = t.key.sent_by(through(t.flip, side));
            pkt.other_family = 6;
        }
    } else {
        let (key, side) =
            FlowKey4::new(pkt.netns, wire.src[0], wire.sport, wire.dst[0], wire.dport);
        if let Some(t) = NAT4.get_ptr(&key) {
            // SAFETY: a live map value.
            let t = unsafe { *t };
            let (src, sport, dst, dport) = t.key.sent_by(through(t.flip, side));
            (pkt.other_src, pkt.other_dst) = ([src, 0, 0, 0], [dst, 0, 0, 0]);
            (pkt.other_sport, pkt.other_dport) = (sport, dport);
            pkt.other_family = 4;
        }
    }
}
