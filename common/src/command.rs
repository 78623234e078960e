//! Commands the agent runs in the kernel through BPF_PROG_TEST_RUN of the
//! probe's `tcpstate_command` program, so that its changes to a flow entry go
//! through the same compare-and-swap and counter update as the data path.

use crate::flow::{FlowKey4, FlowKey6};

/// A change to one flow entry: `key4` in the IPv4 map when `family` is 4,
/// else `key6` in the IPv6 map.
///
/// - [`op::SWAP`]: replace the state word with `new` if it still equals
///   `expect`, moving the per-state counters accordingly; a `new` word that
///   is marked reaping deletes the entry.
/// - [`op::SEED`]: create the entry with word `new`, last changed at
///   `changed_ns`, unless packets created it first; count it.
/// - [`op::CLOCK`]: touch no entry; write the kernel's clocks, read at one
///   moment, into the command (returned as BPF_PROG_TEST_RUN's data out):
///   CLOCK_MONOTONIC into `changed_ns`, jiffies into `expect` (low half)
///   and `new` (high half). The agent pairs them to know which jiffy the
///   kernel's timers were armed in ([`Command::jiffies`]).
/// - [`op::CORRECT`]: as [`op::SWAP`], for the agent's correction from
///   the socket table: the counters move, but the change is no outcome and
///   no duration (the end itself was not seen).
/// - [`op::LISTEN`]: add `new` (as an i32) to the LISTEN count of the
///   namespace slot in `key4.netns` (family 4): the agent's seed and
///   corrections of the count the kernel's reports move.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Command {
    pub key4: FlowKey4,
    pub family: u32,
    pub key6: FlowKey6,
    pub op: u32,
    pub expect: u32,
    pub new: u32,
    /// CLOCK_MONOTONIC nanoseconds (the probe stamps the entry with it).
    pub changed_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Command>() == 80);

/// What a [`Command`] does.
pub mod op {
    pub const SWAP: u32 = 0;
    pub const SEED: u32 = 1;
    pub const CLOCK: u32 = 2;
    pub const LISTEN: u32 = 3;
    pub const CORRECT: u32 = 4;
}

/// What the command program returns (XDP action codes, since it is an XDP program).
pub mod outcome {
    /// The word was swapped.
    pub const DONE: u32 = 2; // XDP_PASS
    /// The word had changed since the agent read it; nothing was done.
    pub const CHANGED: u32 = 1; // XDP_DROP
    /// No such entry (or a malformed command, or a full map for a seed).
    pub const MISSING: u32 = 0; // XDP_ABORTED
}

impl Command {
    /// The jiffies an [`op::CLOCK`] command came back with.
    pub const fn jiffies(&self) -> u64 {
        (self.new as u64) << 32 | self.expect as u64
    }

    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `#[repr(C)]` without padding (asserted above).
        unsafe {
            core::slice::from_raw_parts(
                (self as *const Command).cast::<u8>(),
                core::mem::size_of::<Command>(),
            )
        }
    }
}
