//! Observer mode (`run --observe`): connections that only pass through the
//! host (a router, a bridge, a mirror port's feed) are tracked with both
//! endpoints, under a slot of their own, so what the host's own sockets
//! count never changes. Off unless the agent sets [`OBSERVE`] at load: the
//! verifier then drops the branch, and the data path costs what it did.

use aya_ebpf::{macros::map, maps::Array};
use tcpstate_common::{Segment, netns::DEFAULT_MAX_NETNS};

use crate::{
    parse::Packet,
    track::{local4, local6},
};

/// Set by the agent at load with `--observe`.
#[unsafe(no_mangle)]
static OBSERVE: u8 = 0;

/// Per namespace slot: its observer's slot plus one (0: none).
#[map]
static OBSERVER: Array<u32> = Array::with_max_entries(DEFAULT_MAX_NETNS, 0);

/// Moves a segment (or the segment an ICMP error quotes) that no address
/// of its namespace sent or receives to that namespace's observer slot,
/// marked [`Segment::OBSERVED`]. True when it did.
#[inline(always)]
pub fn to_observer(pkt: &mut Packet) -> bool {
    // SAFETY: a read-only global the agent sets at load.
    if unsafe { core::ptr::read_volatile(&OBSERVE) } == 0 {
        return false;
    }
    let ns = pkt.netns;
    let local = if pkt.family == 6 {
        local6(ns, &pkt.src) || local6(ns, &pkt.dst)
    } else {
        local4(ns, pkt.src[0]) || local4(ns, pkt.dst[0])
    };
    if local {
        return false;
    }
    let Some(&to) = OBSERVER.get(ns) else {
        return false;
    };
    if to == 0 {
        return false;
    }
    pkt.netns = to - 1;
    pkt.seg.meta = Segment::OBSERVED;
    true
}

/// Whether the slow path's segment is an observed one.
#[inline(always)]
pub fn observed(seg: &Segment) -> bool {
    seg.meta & Segment::OBSERVED != 0
}
