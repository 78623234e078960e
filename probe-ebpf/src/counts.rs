//! The per-CPU counters and how each kind of program adds to them.
//!
//! Each namespace has two slots per CPU ([`CpuSlot::DATA_PATH`],
//! [`CpuSlot::PROCESS`]).
//! The packet programs run with bottom halves off or in softirq, so on one
//! CPU they never interrupt each other: plain adds. The agent's commands and
//! the kernel's reports run in process context, where a packet may
//! interrupt them (and a report may come from softirq too): they add to
//! their own slot, atomically.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{macros::map, maps::PerCpuArray};
use tcpstate_common::{
    Counters, CpuSlot, Event, Scratch, Side, TcpState, Word,
    machine::{handshakes_failed, resets},
};

use crate::parse::Packet;

/// Counters, two slots per namespace and CPU (the agent sizes it at load).
#[map]
pub static COUNTS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(
    tcpstate_common::netns::DEFAULT_MAX_NETNS * CpuSlot::PER_NETNS,
    0,
);

/// The segment being parsed, one per CPU; the namespace's entry program
/// writes its slot first.
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

const _: () = assert!(core::mem::size_of::<Packet>() <= core::mem::size_of::<Scratch>());
const _: () = assert!(
    core::mem::offset_of!(Packet, netns) as i16 == tcpstate_common::netns::SCRATCH_NETNS_OFFSET
);

/// Something the counters can be moved through.
pub trait Tally {
    fn state(&mut self, s: TcpState, delta: i64);
    fn events(&mut self, e: Event, n: u64);
    #[inline(always)]
    fn event(&mut self, e: Event) {
        self.events(e, 1);
    }
}

/// The data path's slot: plain adds.
impl Tally for Counters {
    #[inline(always)]
    fn state(&mut self, s: TcpState, delta: i64) {
        self.states[s as usize & 0xf] += delta;
    }
    #[inline(always)]
    fn events(&mut self, e: Event, n: u64) {
        let i = e as usize;
        if i < self.events.len() {
            self.events[i] += n;
        }
    }
}

/// The process-context slot: atomic adds.
pub struct Atomic(*mut Counters);

impl Tally for Atomic {
    #[inline(always)]
    fn state(&mut self, s: TcpState, delta: i64) {
        // SAFETY: a per-CPU map value, valid for the program's run.
        unsafe {
            let p = &raw mut (*self.0).states[s as usize & 0xf];
            atomic_xadd::<i64, i64, { AtomicOrdering::Relaxed }>(p, delta);
        }
    }
    #[inline(always)]
    fn events(&mut self, e: Event, n: u64) {
        let i = e as usize;
        if i < 32 {
            // SAFETY: as above; `i` is bounded by the array's length.
            unsafe {
                let p = &raw mut (*self.0).events[i];
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n);
            }
        }
    }
}

/// This CPU's scratch packet, and the data-path counters of the namespace
/// its entry program named.
#[inline(always)]
pub fn cpu_slot() -> Option<(&'static mut Counters, &'static mut Packet)> {
    // SAFETY: the scratch is only touched by packet programs running on this
    // CPU, which do not interrupt each other; it is large enough and 4-byte
    // aligned like `Packet` (asserted above).
    let pkt = unsafe { &mut *SCRATCH.get_ptr_mut(0)?.cast::<Packet>() };
    let c = COUNTS.get_ptr_mut(CpuSlot::index(pkt.netns, CpuSlot::DATA_PATH))?;
    // SAFETY: a valid map value; the data-path slot has one writer per CPU.
    Some((unsafe { &mut *c }, pkt))
}

/// This CPU's process-context counters of namespace slot `netns`.
#[inline(always)]
pub fn process_slot(netns: u32) -> Option<Atomic> {
    COUNTS
        .get_ptr_mut(CpuSlot::index(netns, CpuSlot::PROCESS))
        .map(Atomic)
}

/// Moves the per-state counters from what `old` counts to what `new` counts,
/// and counts what the change means (opened, closed, failed, reset).
#[inline(always)]
pub fn move_counts(c: &mut impl Tally, old: Word, new: Word) {
    for side in [Side::A, Side::B] {
        let (o, n) = (old.counted(side), new.counted(side));
        if o != n {
            if o != TcpState::None {
                c.state(o, -1);
            }
            if n != TcpState::None {
                c.state(n, 1);
            }
        }
    }
    let failed = handshakes_failed(old, new);
    if failed != 0 {
        c.events(Event::HandshakesFailed, failed as u64);
    }
    let reset = resets(old, new);
    if reset != 0 {
        c.events(Event::Resets, reset as u64);
    }
    let (was_dead, is_dead) = (old.is_dead() || old == Word::EMPTY, new.is_dead());
    if was_dead && !is_dead {
        c.event(Event::FlowsOpened);
    } else if !was_dead && is_dead {
        c.event(Event::FlowsClosed);
    }
}
