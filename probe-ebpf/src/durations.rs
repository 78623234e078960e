//! The durations table (`tcpstate_common::durations`): at each state
//! change, how long each local endpoint that changed spent in the state it
//! left, and how long a completed handshake took. Only changes reach here
//! (never the fast path), and adds are atomic: one table per namespace,
//! shared by every CPU, instead of a copy per CPU.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{macros::map, maps::Array};
use tcpstate_common::{
    Durations, Side, Word,
    durations::{BUCKETS, ROWS, bucket, rows_left},
    netns::DEFAULT_MAX_NETNS,
};

/// One table per namespace slot (the agent sizes it at load).
#[map]
pub static DURATIONS: Array<Durations> = Array::with_max_entries(DEFAULT_MAX_NETNS, 0);

/// Adds what the change `old -> new` of an entry last stamped `units` ago
/// means to namespace slot `netns`'s table. A BPF subprogram, not inlined:
/// its callers are checked once per result, not once per path through it,
/// and its arguments are plain integers.
#[inline(never)]
pub fn note_durations(netns: u32, old: u32, new: u32, units: u32) {
    let (old, new) = (Word(old), Word(new));
    if old == new {
        return;
    }
    let Some(t) = DURATIONS.get_ptr_mut(netns) else {
        return;
    };
    let b = bucket(units) & (BUCKETS - 1);
    for side in [Side::A, Side::B] {
        let (left, also) = rows_left(old, new, side);
        if left != 0 {
            add(t, left, b, units);
        }
        if also != 0 {
            add(t, also, b, units);
        }
    }
}

#[inline(always)]
fn add(t: *mut Durations, row: usize, b: usize, units: u32) {
    let row = row & (ROWS - 1);
    // SAFETY: a map value, valid for the program's run; the indexes are
    // masked to the arrays' lengths; only atomic adds change it.
    unsafe {
        let h = &raw mut (*t).rows[row];
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*h).buckets[b], 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*h).sum, units as u64);
    }
}
