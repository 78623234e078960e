//! Local NAT (a REDIRECT or DNAT in the monitored namespace, kube-proxy for
//! host-network clients, a service mesh's port redirect): the tuple on the
//! wire is not the socket's. The flow maps are keyed by the socket's tuple
//! (what the kernel's reports, the socket table and `ss` speak of); the
//! probe learns the translation from the first segment the socket sends (its
//! skb carries the socket) and keeps it here, keyed by the wire tuple, for
//! the segments that arrive.

use crate::flow::{FlowKey4, FlowKey6, Side};

/// Where a wire tuple's segments belong: the socket tuple `key`, and whether
/// the wire's endpoint A is the socket tuple's B (`flip` 1) or A (0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatTarget4 {
    pub key: FlowKey4,
    pub flip: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatTarget6 {
    pub key: FlowKey6,
    pub flip: u32,
}

const _: () = assert!(core::mem::size_of::<NatTarget4>() == 20);
const _: () = assert!(core::mem::size_of::<NatTarget6>() == 44);

/// Capacity of each translation map (translated connections at once).
pub const MAX_NAT_FLOWS: u32 = 65_536;

/// The side in the socket's tuple of a wire side.
#[inline(always)]
pub const fn through(flip: u32, wire: Side) -> Side {
    if flip & 1 == 0 { wire } else { wire.other() }
}

/// `flip` for a segment whose sender is `wire` in the wire tuple and
/// `socket` in the socket's.
#[inline(always)]
pub const fn flip_of(wire: Side, socket: Side) -> u32 {
    (wire as u32) ^ (socket as u32)
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` data without padding (sizes asserted above).
    unsafe impl aya::Pod for super::NatTarget4 {}
    unsafe impl aya::Pod for super::NatTarget6 {}
}
