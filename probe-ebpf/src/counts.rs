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
    ask::enters_timed,
    machine::{handshakes_failed, resets},
    outcome::{Cause, ended, outcome},
    services::{Ends, Kind, What},
};

use crate::{
    ask::notice,
    durations::note_durations,
    parse::Packet,
    services::{listening, note_service},
};

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

/// What a change means beyond the counts: how each local endpoint that
/// ended did (`cause`: what closed it), and how long the local endpoints
/// spent in what they left (`units`: since the entry's stamp), for the
/// namespace and for the service of each end (`ends`: the flow's).
#[inline(always)]
pub fn note_change(
    c: &mut impl Tally,
    netns: u32,
    old: Word,
    new: Word,
    units: u32,
    cause: Cause,
    ends: &Ends,
) {
    let mut full = false;
    for side in [Side::A, Side::B] {
        let (o, n) = (old.counted(side), new.counted(side));
        // A handshake's end is its side's service: SYN_SENT reaches a
        // remote one, SYN_RECV answers for a local one.
        let kind = match o {
            TcpState::SynSent => Kind::REMOTE,
            TcpState::SynRecv => Kind::LOCAL,
            _ => Kind::BY_PORT,
        } as u32;
        let side_kind = side as u32 | kind << 1;
        if ended(o, n)
            && let Some(e) = outcome(o, side, cause)
        {
            c.event(e);
            let what = e as u32 - Event::ClosedNormal as u32;
            full |= !note_service(netns, ends, side_kind, what, 0);
        }
        if n == TcpState::Established && kind != Kind::BY_PORT as u32 {
            full |= !note_service(netns, ends, side_kind, What::TIME, units);
        }
    }
    if full {
        c.event(Event::ServicesFull);
    }
    note_durations(netns, old.0, new.0, units);
}

/// A change the data path made, kept in the scratch for after `track`
/// returns ([`account`]): noting it inside `track` would be checked by the
/// verifier once per path through the state machine.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Change {
    pub old: u32,
    pub new: u32,
    /// Stamp units since the entry's stamp before the change.
    pub units: u32,
    /// [`Cause::to_u32`] in bits 0-1, and [`Change::SYN`] or
    /// [`Change::ANSWER`] with the side of the local end they concern
    /// ([`Change::SIDE_B`]).
    pub flags: u32,
    /// The flow's endpoints (the socket's view).
    pub ends: Ends,
}

impl Change {
    /// A change from `old` to `new`, `units` after the entry's stamp, for
    /// `cause`, on the flow `ends` writes.
    #[inline(always)]
    pub fn of(old: Word, new: Word, units: u32, cause: Cause) -> Change {
        Change {
            old: old.0,
            new: new.0,
            units,
            flags: cause.to_u32(),
            ..Change::NONE
        }
    }

    /// A SYN reached a local endpoint and found no connection.
    pub const SYN: u32 = 1 << 2;
    /// A local endpoint answered a SYN (a SYN-ACK; a cookie's included).
    pub const ANSWER: u32 = 1 << 3;
    /// The end `SYN` or `ANSWER` concerns is B.
    pub const SIDE_B: u32 = 1 << 4;
    /// The entry was made by this change (`old` is empty): only its timer
    /// is noted, nothing ended or was timed.
    pub const CREATED: u32 = 1 << 5;

    pub const NONE: Change = Change {
        old: 0,
        new: 0,
        units: 0,
        flags: 0,
        ends: Ends {
            addr: [[0; 4]; 2],
            port: [0; 2],
            family: 0,
        },
    };
}

/// Notes a change (if any) in namespace slot `netns`: the change itself,
/// and a SYN to or an answer from a listening port. A subprogram (one per
/// kind of counters): checked once, not once per path of its caller; in
/// the slow path after `track`'s frame is gone (their frames together
/// would pass the 512-byte stack).
#[inline(never)]
pub fn account<T: Tally>(c: &mut T, netns: u32, ch: &Change) {
    let ends = &ch.ends;
    let what = if ch.flags & Change::SYN != 0 {
        What::SYN
    } else if ch.flags & Change::ANSWER != 0 {
        What::ANSWER
    } else {
        0
    };
    if what != 0 {
        let side = if ch.flags & Change::SIDE_B != 0 {
            Side::B
        } else {
            Side::A
        };
        // Only a listening port's: a port scan must not fill the table.
        if listening(netns, ends.port[side.index()])
            && !note_service(netns, ends, side as u32, what, 0)
        {
            c.event(Event::ServicesFull);
        }
    }
    if ch.old == ch.new {
        return;
    }
    let (old, new) = (Word(ch.old), Word(ch.new));
    if enters_timed(old, new) && !notice(netns, ends) {
        c.event(Event::NoticesLost);
    }
    if ch.flags & Change::CREATED != 0 {
        return;
    }
    let cause = Cause::from_u32(ch.flags & 3);
    note_change(c, netns, old, new, ch.units, cause, ends);
}
