//! Questions the probe puts to the agent through a ring buffer: sockets the
//! kernel changed in a way that only the kernel can tell the rest of (a full
//! socket that closed where a TIME_WAIT socket may take over).

use crate::flow::{FlowKey4, FlowKey6};

/// One question: look the socket of endpoint `side` of the flow up in the
/// socket table. `key4` in the IPv4 map when `family` is 4, else `key6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ask {
    /// CLOCK_MONOTONIC nanoseconds when the kernel reported the change.
    pub at_ns: u64,
    pub key6: FlowKey6,
    pub key4: FlowKey4,
    pub family: u32,
    /// The endpoint ([`crate::Side`] as 0 or 1).
    pub side: u32,
    /// The kernel's state before the change it reported.
    pub old: u32,
    /// The kernel's state after it.
    pub new: u32,
}

const _: () = assert!(core::mem::size_of::<Ask>() == 80);
const _: () = assert!(core::mem::align_of::<Ask>() == 8);

/// Bytes of the ring buffer that carries them (a power of two of pages):
/// room for about 14,000 questions between two reads of the agent.
pub const ASK_RING_BYTES: u32 = 1 << 20;

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, no padding (size asserted above).
unsafe impl aya::Pod for Ask {}
