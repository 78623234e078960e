//! Applies a parsed segment to the flow map and the per-state counters.
//!
//! The state word of an entry changes only by compare-and-swap, and the
//! counters move by the difference between the old and the new word right
//! after a successful swap, so the counters always equal what the entries
//! count, whichever CPU sees which segment.

use core::intrinsics::{AtomicOrdering, atomic_cxchg};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use tcpstate_common::{
    Counters, CpuSlot, EndSeq, Event, FlowEntry, FlowKey4, FlowKey6, Locality, Segment, Side,
    TcpState, Word,
    machine::{handshakes_failed, is_steady, steady_facts, step},
};

use crate::parse::Packet;

/// Default size of the flow map; the agent sets the real one at load time.
const DEFAULT_MAX_FLOWS: u32 = 262_144;
/// Attempts at one update when another CPU changes the same entry at the
/// same moment (one retry covers a lost insert race or a lost swap; more
/// would multiply the paths the verifier walks). Giving up is counted.
const CAS_ATTEMPTS: usize = 2;
/// Addresses one namespace may have (the agent warns beyond).
pub const MAX_LOCAL_ADDRS: u32 = 4096;
pub const EEXIST: i32 = 17;

/// IPv4 flows.
#[map]
pub static FLOWS4: HashMap<FlowKey4, FlowEntry> = HashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// IPv6 flows.
#[map]
pub static FLOWS6: HashMap<FlowKey6, FlowEntry> = HashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// Counters and scratch, one slot per CPU.
#[map]
pub static PER_CPU: PerCpuArray<CpuSlot> = PerCpuArray::with_max_entries(1, 0);

const _: () = assert!(core::mem::size_of::<Packet>() <= core::mem::size_of::<[u32; 16]>());

/// This CPU's counters and scratch packet.
#[inline(always)]
pub fn cpu_slot() -> Option<(&'static mut Counters, &'static mut Packet)> {
    // SAFETY: a per-CPU slot is only touched by programs running on this CPU,
    // which do not preempt each other; the scratch area is large enough and
    // 4-byte aligned like `Packet` (asserted above).
    PER_CPU.get_ptr_mut(0).map(|p| unsafe {
        (
            &mut (*p).counters,
            &mut *((&raw mut (*p).scratch).cast::<Packet>()),
        )
    })
}

#[inline(always)]
pub fn count(c: &mut Counters, e: Event) {
    let i = e as usize;
    if i < c.events.len() {
        c.events[i] += 1;
    }
}

/// Moves the per-state counters from what `old` counts to what `new` counts.
#[inline(always)]
pub fn move_counts(c: &mut Counters, old: Word, new: Word) {
    for side in [Side::A, Side::B] {
        let (o, n) = (old.counted(side), new.counted(side));
        if o != n {
            if o != TcpState::None {
                c.states[o as usize & 0xf] -= 1;
            }
            if n != TcpState::None {
                c.states[n as usize & 0xf] += 1;
            }
        }
    }
    let failed = handshakes_failed(old, new);
    if failed != 0 {
        c.events[Event::HandshakesFailed as usize] += failed as u64;
    }
    let (was_dead, is_dead) = (old.is_dead() || old == Word::EMPTY, new.is_dead());
    if was_dead && !is_dead {
        count(c, Event::FlowsOpened);
    } else if !was_dead && is_dead {
        count(c, Event::FlowsClosed);
    }
}

/// Atomically replaces the word at `p` if it still equals `old`.
#[inline(always)]
pub fn swap_word(p: *mut FlowEntry, old: Word, new: Word) -> bool {
    // The bpf target has no `AtomicU64::compare_exchange` (its spec predates
    // BPF_CMPXCHG), but LLVM lowers the intrinsic to BPF_CMPXCHG with cpu v3.
    // SAFETY: `p` points into a map value, 8-byte aligned, valid for the
    // program's run (RCU); the word is only ever changed by this swap.
    let (_, swapped) = unsafe {
        atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*p).word,
            old.0,
            new.0,
        )
    };
    swapped
}

/// Now, as a flow entry's `changed` stamp.
#[inline(always)]
fn now_stamp() -> u32 {
    // SAFETY: helper without preconditions.
    FlowEntry::stamp(unsafe { bpf_ktime_get_ns() })
}

#[inline(always)]
pub fn track(pkt: &Packet, c: &mut Counters) {
    if pkt.family == 6 {
        let (key, sender) = FlowKey6::new(pkt.src, pkt.sport, pkt.dst, pkt.dport);
        if steady(&FLOWS6, &key, sender, &pkt.seg) {
            return;
        }
        let local = || local6(&pkt.src) as u32 | (local6(&pkt.dst) as u32) << 1;
        transition(&FLOWS6, &key, &pkt.seg, sender as u32, local, c);
    } else {
        let (key, sender) = FlowKey4::new(pkt.src[0], pkt.sport, pkt.dst[0], pkt.dport);
        if steady(&FLOWS4, &key, sender, &pkt.seg) {
            return;
        }
        let local = || local4(pkt.src[0]) as u32 | (local4(pkt.dst[0]) as u32) << 1;
        transition(&FLOWS4, &key, &pkt.seg, sender as u32, local, c);
    }
}

/// The namespace's own IPv4 addresses (the agent keeps them current).
#[map]
pub static LOCAL4: HashMap<u32, u8> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

/// The namespace's own IPv6 addresses.
#[map]
pub static LOCAL6: HashMap<[u32; 4], u8> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

/// Is this IPv4 address (wire order) one of the host's? All of 127.0.0.0/8
/// is, without being listed.
#[inline(always)]
fn local4(addr: u32) -> bool {
    addr.to_ne_bytes()[0] == 127 || LOCAL4.get_ptr(&addr).is_some()
}

#[inline(always)]
fn local6(addr: &[u32; 4]) -> bool {
    LOCAL6.get_ptr(addr).is_some()
}

/// The fast path: most segments find both ends established and carry no
/// flag that moves a state. Only the sender's sequence facts change; no
/// swap, no counters. Returns false when the slow path must run.
#[inline(always)]
fn steady<K>(map: &HashMap<K, FlowEntry>, key: &K, sender: Side, seg: &Segment) -> bool {
    // A SYN, FIN or RST always takes the slow path: no lookup here for it.
    if !seg.may_be_steady() {
        return false;
    }
    let Some(p) = map.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: `p` is a live map value (see `swap_word`).
    let old = Word(unsafe { core::ptr::read_volatile(&raw const (*p).word) });
    if !is_steady(old, seg) {
        return false;
    }
    let prev = unsafe { (*p).ends[sender.index()] };
    let facts = steady_facts(prev, seg);
    if facts != prev {
        unsafe { (*p).ends[sender.index()] = facts };
    }
    true
}

/// The slow path: create the entry or swap in the new state word.
/// `sender_is_b` arrives as a plain integer: the verifier must see the mask
/// that bounds it, which the compiler would drop from an enum whose range it
/// knows. `local` looks the addresses up (bit 0: sender, bit 1: receiver);
/// it runs only for a new or reused entry, since a live entry's local marks
/// were set when it was created (fewer paths for the verifier to walk).
#[inline(always)]
fn transition<K>(
    map: &HashMap<K, FlowEntry>,
    key: &K,
    seg: &Segment,
    sender_is_b: u32,
    local: impl Fn() -> u32,
    c: &mut Counters,
) {
    let s = (sender_is_b & 1) as usize;
    let r = s ^ 1;
    let sender = if s == 0 { Side::A } else { Side::B };
    let looked_up = || {
        let bits = local();
        Locality {
            sender: bits & 1 != 0,
            receiver: bits & 2 != 0,
        }
    };
    // A SYN without ACK nearly always opens a new flow: create it without
    // looking first (the insert says EEXIST when the tuple has an entry, and
    // the next attempt looks it up).
    let mut assume_new = seg.opens_a_flow();
    for _ in 0..CAS_ATTEMPTS {
        let found = if assume_new {
            assume_new = false;
            None
        } else {
            map.get_ptr_mut(key)
        };
        match found {
            None => {
                if !seg.may_open() {
                    return;
                }
                let none = EndSeq::default();
                let st = step(Word::EMPTY, &none, &none, sender, looked_up(), seg);
                let mut entry = FlowEntry {
                    word: st.word.0,
                    changed: now_stamp(),
                    ends: [none; 2],
                };
                entry.ends[s] = st.sender;
                match map.insert(key, &entry, BPF_NOEXIST as u64) {
                    Ok(()) => {
                        move_counts(c, Word::EMPTY, st.word);
                        if seg.is_syn_to_local(st.word, sender) {
                            count(c, Event::SynsReceived);
                        }
                        return;
                    }
                    // Another CPU created it first: apply the segment to theirs.
                    Err(e) if e == -EEXIST => continue,
                    Err(_) => {
                        count(c, Event::MapFull);
                        if seg.is_syn_to_local(st.word, sender) {
                            count(c, Event::SynsReceived);
                        }
                        return;
                    }
                }
            }
            Some(p) => {
                // SAFETY: `p` is a live map value (see `swap_word`).
                let (old, sf, rf) = unsafe {
                    (
                        Word(core::ptr::read_volatile(&raw const (*p).word)),
                        (*p).ends[s],
                        (*p).ends[r],
                    )
                };
                if old.is_reaping() {
                    count(c, Event::ReapSkipped);
                    return;
                }
                let local = if old.is_dead() {
                    looked_up()
                } else {
                    Locality {
                        sender: old.is_local(sender),
                        receiver: old.is_local(sender.other()),
                    }
                };
                let st = step(old, &sf, &rf, sender, local, seg);
                if st.rst_ignored {
                    count(c, Event::RstIgnored);
                }
                // The sender's facts are written before the swap, so whoever
                // sees the new state also sees them. Each half has one writer:
                // the segments its endpoint sends.
                unsafe {
                    if st.sender != sf {
                        (*p).ends[s] = st.sender;
                    }
                }
                if st.word == old {
                    if st.touch {
                        unsafe { (*p).changed = now_stamp() };
                    }
                    if seg.is_syn_to_local(st.word, sender) {
                        count(c, Event::SynsReceived);
                    }
                    return;
                }
                if swap_word(p, old, st.word) {
                    unsafe { (*p).changed = now_stamp() };
                    move_counts(c, old, st.word);
                    if seg.is_syn_to_local(st.word, sender) {
                        count(c, Event::SynsReceived);
                    }
                    if seg.reset_accepted(old, st.word) {
                        count(c, Event::Resets);
                    }
                    // A new connection on a live entry's tuple (port reuse
                    // through TIME_WAIT): one flow ended, another began.
                    if st.reset_receiver && !old.is_dead() {
                        count(c, Event::FlowsClosed);
                        count(c, Event::FlowsOpened);
                    }
                    return;
                }
            }
        }
    }
    count(c, Event::CasConflicts);
}
