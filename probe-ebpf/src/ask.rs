//! The ring buffer of questions for the agent ([`Ask`]): sockets whose new
//! state only the socket table can tell.

use aya_ebpf::{macros::map, maps::RingBuf};
use tcpstate_common::{Ask, FlowKey4, FlowKey6, Side, TcpState, ask::ASK_RING_BYTES};

#[map]
pub static ASKS: RingBuf = RingBuf::with_byte_size(ASK_RING_BYTES, 0);

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
