//! Applies a parsed segment (or an ICMP error about one) to the flow map and
//! the per-state counters.
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
    maps::{Array, HashMap},
};
use tcpstate_common::{
    Counters, EndSeq, Event, FlowEntry, FlowKey4, FlowKey6, Locality, Segment, Side, Word,
    machine::{IcmpEffect, icmp_error, is_steady, steady_facts, step},
    netns::{DEFAULT_MAX_NETNS, LocalKey4, LocalKey6},
    outcome::Cause,
    services::Ends,
};

use crate::{
    counts::{Change, Tally, move_counts},
    nat::{SockTuple, translate4, translate6},
    observe::observed,
    parse::Packet,
};

/// Default size of the flow map; the agent sets the real one at load time.
const DEFAULT_MAX_FLOWS: u32 = 262_144;
/// Attempts at one update when another CPU changes the same entry at the
/// same moment, in the kernel report's program (each a path more for the
/// verifier). Giving up is counted.
pub const CAS_ATTEMPTS: usize = 2;
/// Attempts of the slow path for one segment: the first (an insert, for a
/// SYN), a lookup when the insert found the tuple taken, one more when
/// another CPU changed the entry at the same moment. The slow path retries
/// by running again (a tail call to itself), so the verifier checks one
/// attempt. Giving up is counted.
pub const SLOW_ATTEMPTS: u32 = 3;
/// Addresses the namespaces may have together (the agent sizes the maps).
pub const MAX_LOCAL_ADDRS: u32 = 4096;
pub const EEXIST: i32 = 17;

/// Set by the agent at load when the kernel's own reports of state changes
/// reach the probe (`kernel.rs`): then the ACK that completes a local
/// passive open waits for that report ([`Segment::KERNEL_EVENTS`]).
#[unsafe(no_mangle)]
static KERNEL_EVENTS: u8 = 0;

/// Entries one namespace may hold in the flow maps together (0: no limit);
/// set by the agent at load (`--max-flows-per-netns`).
#[unsafe(no_mangle)]
static FLOWS_PER_NETNS: u32 = 0;

/// Entries each namespace slot holds in the flow maps: added to by every
/// insert, taken from by every delete (all in the probe: the command
/// program deletes for the agent).
#[map]
static NETNS_FLOWS: Array<u32> = Array::with_max_entries(DEFAULT_MAX_NETNS, 0);

/// Whether namespace slot `netns` may have one more entry.
#[inline(always)]
pub fn share_left(netns: u32) -> bool {
    // SAFETY: a read-only global the agent sets at load.
    let limit = unsafe { core::ptr::read_volatile(&FLOWS_PER_NETNS) };
    limit == 0 || NETNS_FLOWS.get(netns).is_none_or(|n| *n < limit)
}

/// One entry more (`delta` 1) or fewer (`u32::MAX`, i.e. -1) for `netns`.
#[inline(always)]
pub fn note_flows(netns: u32, delta: u32) {
    if let Some(p) = NETNS_FLOWS.get_ptr_mut(netns) {
        // SAFETY: a map value, 4-byte aligned; only atomic adds change it.
        unsafe {
            core::intrinsics::atomic_xadd::<u32, u32, { AtomicOrdering::Relaxed }>(p, delta);
        }
    }
}

/// Inserts a new entry for `netns` unless its share is used up; counts it.
#[inline(always)]
pub fn insert_entry<K>(
    map: &HashMap<K, FlowEntry>,
    key: &K,
    entry: &FlowEntry,
    netns: u32,
    c: &mut impl Tally,
) -> Result<(), i32> {
    if !share_left(netns) {
        c.event(Event::NetnsShareFull);
        return Err(0);
    }
    let res = map.insert(key, entry, BPF_NOEXIST as u64);
    match res {
        Ok(()) => note_flows(netns, 1),
        Err(e) if e == -EEXIST => {}
        Err(_) => c.event(Event::MapFull),
    }
    res
}

/// IPv4 flows.
#[map]
pub static FLOWS4: HashMap<FlowKey4, FlowEntry> = HashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

/// IPv6 flows.
#[map]
pub static FLOWS6: HashMap<FlowKey6, FlowEntry> = HashMap::with_max_entries(DEFAULT_MAX_FLOWS, 0);

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

/// The word of a live map value.
#[inline(always)]
pub fn read_word(p: *const FlowEntry) -> Word {
    // SAFETY: `p` is a live map value (see `swap_word`).
    Word(unsafe { core::ptr::read_volatile(&raw const (*p).word) })
}

/// After a successful swap from `old` (stamped `since`) to `new`: the
/// entry's stamp moves when what it counts changed ([`Word::restamps`]).
/// Returns the stamp units from `since` to now.
#[inline(always)]
pub fn restamp(p: *mut FlowEntry, old: Word, new: Word, since: u32) -> u32 {
    let now = now_stamp();
    if old.restamps(new) {
        // SAFETY: `p` is a live map value (see `swap_word`).
        unsafe { (*p).changed = now };
    }
    now.wrapping_sub(since)
}

/// The entry's `changed` stamp.
#[inline(always)]
pub fn read_stamp(p: *const FlowEntry) -> u32 {
    // SAFETY: `p` is a live map value (see `swap_word`).
    unsafe { core::ptr::read_volatile(&raw const (*p).changed) }
}

/// Now, as a flow entry's `changed` stamp.
#[inline(always)]
pub fn now_stamp() -> u32 {
    // SAFETY: helper without preconditions.
    FlowEntry::stamp(unsafe { bpf_ktime_get_ns() })
}

/// The fast path, in the attached programs: true when the segment needed
/// no more (both ends established, no flag that moves a state).
#[inline(always)]
pub fn fast(pkt: &Packet) -> bool {
    if pkt.family == 6 {
        let (key, sender) = FlowKey6::new(pkt.netns, pkt.src, pkt.sport, pkt.dst, pkt.dport);
        steady(&FLOWS6, &key, sender, &pkt.seg)
    } else {
        let (key, sender) = FlowKey4::new(pkt.netns, pkt.src[0], pkt.sport, pkt.dst[0], pkt.dport);
        steady(&FLOWS4, &key, sender, &pkt.seg)
    }
}

/// What one attempt of the slow path came to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Done,
    /// Another CPU changed the entry at the same moment (or created it
    /// first): look again.
    Again,
}

/// The slow path, in the tail-called program: one attempt to create the
/// entry or move its state word. `first` is the first attempt for this
/// segment (the caller retries by running the program again). The segment
/// is in its sockets' view already (`nat.rs`).
///
/// A BPF subprogram, not inlined: the verifier then continues after it once
/// per distinct result instead of once per path through the state machine
/// (inlined, the receiver's pass that follows nearly doubled the slow
/// path's verified instructions, to 850k of the kernel's 1M).
#[inline(never)]
pub fn track(pkt: &mut Packet, c: &mut Counters, first: bool) -> Attempt {
    if pkt.family == 6 {
        let (key, sender) = FlowKey6::new(pkt.netns, pkt.src, pkt.sport, pkt.dst, pkt.dport);
        let ns = pkt.netns;
        let both = observed(&pkt.seg);
        let local = || {
            if both {
                return 3;
            }
            local6(ns, &pkt.src) as u32 | (local6(ns, &pkt.dst) as u32) << 1
        };
        transition(
            &FLOWS6,
            &key,
            &mut pkt.seg,
            sender as u32,
            local,
            c,
            first,
            ns,
            &mut pkt.change,
        )
    } else {
        let (key, sender) = FlowKey4::new(pkt.netns, pkt.src[0], pkt.sport, pkt.dst[0], pkt.dport);
        let ns = pkt.netns;
        let both = observed(&pkt.seg);
        let local = || {
            if both {
                return 3;
            }
            local4(ns, pkt.src[0]) as u32 | (local4(ns, pkt.dst[0]) as u32) << 1
        };
        transition(
            &FLOWS4,
            &key,
            &mut pkt.seg,
            sender as u32,
            local,
            c,
            first,
            ns,
            &mut pkt.change,
        )
    }
}

/// Each namespace's own IPv4 addresses (the agent keeps them current).
#[map]
pub static LOCAL4: HashMap<LocalKey4, u8> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

/// Each namespace's own IPv6 addresses.
#[map]
pub static LOCAL6: HashMap<LocalKey6, u8> = HashMap::with_max_entries(MAX_LOCAL_ADDRS, 0);

/// Is this IPv4 address (wire order) one of namespace `netns`'s? All of
/// 127.0.0.0/8 is, without being listed.
#[inline(always)]
pub fn local4(netns: u32, addr: u32) -> bool {
    addr.to_ne_bytes()[0] == 127 || LOCAL4.get_ptr(&LocalKey4 { netns, addr }).is_some()
}

#[inline(always)]
pub fn local6(netns: u32, addr: &[u32; 4]) -> bool {
    LOCAL6.get_ptr(&LocalKey6 { netns, addr: *addr }).is_some()
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
    if !is_steady(read_word(p), seg) {
        return false;
    }
    // SAFETY: `p` is a live map value (see `swap_word`).
    let prev = unsafe { (*p).ends[sender.index()] };
    let facts = steady_facts(prev, seg);
    if facts != prev {
        unsafe { (*p).ends[sender.index()] = facts };
    }
    true
}

/// One attempt of the slow path: create the entry or swap in the new state
/// word. `sender_is_b` arrives as a plain integer: the verifier must see the
/// mask that bounds it, which the compiler would drop from an enum whose
/// range it knows. `local` looks the addresses up (bit 0: sender, bit 1:
/// receiver); it runs only for a new or reused entry, since a live entry's
/// local marks were set when it was created (fewer paths for the verifier).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn transition<K: WriteEnds>(
    map: &HashMap<K, FlowEntry>,
    key: &K,
    seg: &mut Segment,
    sender_is_b: u32,
    local: impl Fn() -> u32,
    c: &mut Counters,
    first: bool,
    netns: u32,
    change: &mut Change,
) -> Attempt {
    // Read opaquely, so that the mask stays in the code for the verifier to
    // bound the index with (the compiler knows the value is 0 or 1 and
    // would drop it).
    // SAFETY: a plain read of a local.
    let s = (unsafe { core::ptr::read_volatile(&sender_is_b) } & 1) as usize;
    let r = s ^ 1;
    let sender = if s == 0 { Side::A } else { Side::B };
    // SAFETY: a read-only global the agent sets at load. The kernel reports
    // nothing of connections only passing through.
    let reports = if observed(seg) {
        0
    } else {
        (unsafe { core::ptr::read_volatile(&KERNEL_EVENTS) }) & Segment::KERNEL_EVENTS
    };
    seg.meta |= reports;
    let looked_up = || {
        let bits = local();
        Locality {
            sender: bits & 1 != 0,
            receiver: bits & 2 != 0,
        }
    };
    // A SYN-ACK leaving this host (the SYN before it made nothing) and,
    // where the kernel does not report its connects, a SYN: usually a new
    // flow. Create it without looking first (the insert says EEXIST when the
    // tuple has an entry, and the next attempt looks it up).
    let leaving = seg.meta & Segment::EGRESS != 0;
    let assumed = first
        && seg.may_open()
        && if seg.opens_a_flow() {
            reports == 0
        } else {
            leaving
        };
    let found = if assumed { None } else { map.get_ptr_mut(key) };
    let Some(p) = found else {
        if !seg.may_open() {
            return Attempt::Done;
        }
        let none = EndSeq::default();
        let local = looked_up();
        let st = step(Word::EMPTY, &none, &none, sender, local, seg);
        count_once(seg, st.word, sender, local.sender, c);
        note_syn(change, key, seg, st.word, sender, local.sender, leaving);
        // Nothing local holds a socket (a SYN to this host, which its
        // kernel has not answered; a SYN cookie): no new entry, though an
        // existing one may hold the tuple (a TIME_WAIT).
        if st.word.is_dead() {
            return if assumed {
                Attempt::Again
            } else {
                Attempt::Done
            };
        }
        let mut entry = FlowEntry {
            word: st.word.0,
            changed: now_stamp(),
            ends: [none; 2],
        };
        entry.ends[s] = st.sender;
        return match insert_entry(map, key, &entry, netns, c) {
            Ok(()) => {
                move_counts(c, Word::EMPTY, st.word);
                // For its timer's notice (`account`).
                change.new = st.word.0;
                change.flags |= Change::CREATED;
                key.write_ends(&mut change.ends);
                Attempt::Done
            }
            // Another CPU created it first: apply the segment to theirs.
            Err(e) if e == -EEXIST => Attempt::Again,
            // Counted (map full, or the namespace's share used up).
            Err(_) => Attempt::Done,
        };
    };
    let old = read_word(p);
    let since = read_stamp(p);
    // SAFETY: `p` is a live map value (see `swap_word`).
    let (sf, rf) = unsafe { ((*p).ends[s], (*p).ends[r]) };
    if old.is_reaping() {
        c.event(Event::ReapSkipped);
        return Attempt::Done;
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
        c.event(Event::RstIgnored);
    }
    count_once(seg, st.word, sender, local.sender, c);
    // The sender's facts are written before the swap, so whoever sees the
    // new state also sees them. Each half has one writer: the segments its
    // endpoint sends.
    unsafe {
        if st.sender != sf {
            (*p).ends[s] = st.sender;
        }
    }
    if st.word == old {
        if st.touch {
            unsafe { (*p).changed = now_stamp() };
        }
        return Attempt::Done;
    }
    if !swap_word(p, old, st.word) {
        return Attempt::Again;
    }
    let units = restamp(p, old, st.word, since);
    move_counts(c, old, st.word);
    change.old = old.0;
    change.new = st.word.0;
    change.units = units;
    change.flags = Cause::of_segment(seg.flags, sender).to_u32();
    key.write_ends(&mut change.ends);
    // A new connection on a live entry's tuple (port reuse through
    // TIME_WAIT): one flow ended, another began.
    if st.restarted && !old.is_dead() {
        c.event(Event::FlowsClosed);
        c.event(Event::FlowsOpened);
    }
    Attempt::Done
}

/// A flow key's endpoints, written where the service table will want
/// them (field by field: a copy through the stack would grow `track`'s
/// frame, which with the slow path's is at the 512-byte limit).
pub trait WriteEnds {
    fn write_ends(&self, out: &mut Ends);
}

impl WriteEnds for FlowKey4 {
    #[inline(always)]
    fn write_ends(&self, out: &mut Ends) {
        out.addr = [[self.addr_a, 0, 0, 0], [self.addr_b, 0, 0, 0]];
        out.port = [self.port_a, self.port_b];
        out.family = 4;
    }
}

impl WriteEnds for FlowKey6 {
    #[inline(always)]
    fn write_ends(&self, out: &mut Ends) {
        out.addr = [self.addr_a, self.addr_b];
        out.port = [self.port_a, self.port_b];
        out.family = 6;
    }
}

/// Marks a SYN that reached a local endpoint and found no connection, or
/// a local endpoint's answer to one (a SYN-ACK leaving that found none:
/// the first, or a cookie's), for the service table (`counts::account`).
#[inline(always)]
fn note_syn<K: WriteEnds>(
    change: &mut Change,
    key: &K,
    seg: &Segment,
    word: Word,
    sender: Side,
    sender_local: bool,
    leaving: bool,
) {
    let flags = if seg.is_syn_to_local(word, sender) {
        Change::SYN | ((sender.other() as u32) << 4)
    } else if leaving && sender_local && seg.is_syn_ack() {
        Change::ANSWER | ((sender as u32) << 4)
    } else {
        return;
    };
    change.flags = flags;
    key.write_ends(&mut change.ends);
}

/// A private mark on a segment's `meta` once its events are counted (a
/// retry after a lost insert race or a lookup must not count them twice).
const COUNTED: u8 = 0x80;

/// Counts what the segment is (a SYN to this host, a SYN cookie sent), once.
#[inline(always)]
fn count_once(seg: &mut Segment, word: Word, sender: Side, sender_local: bool, c: &mut Counters) {
    if seg.meta & COUNTED != 0 {
        return;
    }
    seg.meta |= COUNTED;
    if seg.is_syn_to_local(word, sender) {
        c.event(Event::SynsReceived);
    }
    if sender_local && seg.is_syn_cookie() {
        c.event(Event::SynCookies);
    }
}

/// An ICMP error quoting a segment this host sent: ends a connect or a
/// request as the kernel does when it receives it. The quote is the wire's
/// tuple (translated, where local NAT applies).
///
/// A subprogram: its keys stay off the slow path's own frame, which with
/// `track`'s is at the verifier's 512 bytes.
#[inline(never)]
pub fn icmp(pkt: &mut Packet, c: &mut Counters) {
    let effect = IcmpEffect::from_u32(pkt.icmp);
    let through = observed(&pkt.seg);
    if pkt.family == 6 {
        let (wire, side) = FlowKey6::new(pkt.netns, pkt.src, pkt.sport, pkt.dst, pkt.dport);
        let (key, sender) = translate6(wire, side, &SockTuple::default());
        icmp_on(
            &FLOWS6,
            &key,
            sender as u32,
            effect,
            pkt.seg.seq,
            through,
            c,
            &mut pkt.change,
        );
    } else {
        let (wire, side) = FlowKey4::new(pkt.netns, pkt.src[0], pkt.sport, pkt.dst[0], pkt.dport);
        let (key, sender) = translate4(wire, side, &SockTuple::default());
        icmp_on(
            &FLOWS4,
            &key,
            sender as u32,
            effect,
            pkt.seg.seq,
            through,
            c,
            &mut pkt.change,
        );
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn icmp_on<K: WriteEnds>(
    map: &HashMap<K, FlowEntry>,
    key: &K,
    sender_is_b: u32,
    effect: IcmpEffect,
    seq: u32,
    observed: bool,
    c: &mut Counters,
    change: &mut Change,
) {
    let s = (sender_is_b & 1) as usize;
    let side = if s == 0 { Side::A } else { Side::B };
    let Some(p) = map.get_ptr_mut(key) else {
        return;
    };
    c.event(Event::IcmpErrors);
    let old = read_word(p);
    let since = read_stamp(p);
    // SAFETY: `p` is a live map value (see `swap_word`).
    let facts = unsafe { (*p).ends[s] };
    // SAFETY: a read-only global the agent sets at load.
    let reports = !observed && unsafe { core::ptr::read_volatile(&KERNEL_EVENTS) } != 0;
    let new = icmp_error(old, &facts, side, effect, seq, reports);
    if new != old && swap_word(p, old, new) {
        let units = restamp(p, old, new, since);
        move_counts(c, old, new);
        change.old = old.0;
        change.new = new.0;
        change.units = units;
        change.flags = Cause::Other.to_u32();
        key.write_ends(&mut change.ends);
        c.event(Event::IcmpEnded);
    }
}
