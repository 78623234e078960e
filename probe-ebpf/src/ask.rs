//! The ring buffer of questions for the agent ([`Ask`]): sockets whose new
//! state only the socket table can tell.

use aya_ebpf::{macros::map, maps::RingBuf};
use tcpstate_common::{
    Ask, FlowKey4, FlowKey6, Side, TcpState,
    ask::{ASK_RING_BYTES, NOTICE_RING_BYTES},
    services::Ends,
};

#[map]
pub static ASKS: RingBuf = RingBuf::with_byte_size(ASK_RING_BYTES, 0);

/// The notices of timed states ([`notice`]).
#[map]
pub static NOTICES: RingBuf = RingBuf::with_byte_size(NOTICE_RING_BYTES, 0);

/// Tells the agent that a local endpoint of the flow `ends` (in namespace
/// slot `netns`) entered a timed state ([`Ask::TIMED`]); false when the ring
/// is full (the agent's next walk files the timer then).
#[inline(always)]
pub fn notice(netns: u32, ends: &Ends) -> bool {
    let Some(mut slot) = NOTICES.reserve::<Ask>(0) else {
        return false;
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
    let key4 = FlowKey4 {
        addr_a: ends.addr[0][0],
        addr_b: ends.addr[1][0],
        port_a: ends.port[0],
        port_b: ends.port[1],
        netns,
    };
    let key6 = FlowKey6 {
        addr_a: ends.addr[0],
        addr_b: ends.addr[1],
        port_a: ends.port[0],
        port_b: ends.port[1],
        netns,
    };
    slot.write(Ask::timed(now, key6, key4, ends.family));
    slot.submit(0);
    true
}

/// Puts one question; false when the ring is full (the agent is behind).
#[inline(always)]
pub fn ask(
    at_ns: u64,
    key6: &FlowKey6,
    key4: &FlowKey4,
    family: u32,
    side: Side,
    old: TcpState,
    new: TcpState,
) -> bool {
    let Some(mut slot) = ASKS.reserve::<Ask>(0) else {
        return false;
    };
    slot.write(Ask {
        at_ns,
        key6: *key6,
        key4: *key4,
        family,
        side: side as u32,
        old: old as u32,
        new: new as u32,
    });
    slot.submit(0);
    true
}
