//! The tcpstate probe: TC ingress (or XDP) sees every frame entering a
//! monitored interface, TC egress every frame the host sends on it; both
//! feed the flow maps. An endpoint is local when its address is one of the
//! namespace's (the agent keeps LOCAL4/LOCAL6 current), so forwarded traffic
//! counts nowhere among the host's own (with `--observe` it counts apart:
//! `observe.rs`). The kernel's own reports of socket state changes
//! (`kernel.rs`) add what no segment shows. The probe is a monitor: every
//! path lets the packet through unchanged.
//!
//! The attached programs parse and take the fast path; a segment that may
//! change a state (or an ICMP error about one) goes on to the slow path, a
//! program of its own reached by tail call. The verifier then checks the
//! state machine once, instead of once for each way the parser got there.
#![no_std]
#![no_main]
// BPF_CMPXCHG through the compiler intrinsic (see `track::swap_word`).
#![allow(internal_features)]
#![feature(core_intrinsics)]
// Map keys are passed by reference on purpose: a by-value key is copied to
// the 512-byte stack first (or through a `memcpy` call).
#![allow(clippy::needless_borrows_for_generic_args)]

mod ask;
mod command;
mod counts;
mod durations;
mod kernel;
mod nat;
mod observe;
mod parse;
mod services;
mod track;

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action::XDP_PASS},
    macros::{classifier, map, xdp},
    maps::ProgramArray,
    programs::{TcContext, XdpContext},
};
use tcpstate_common::{Counters, Event, Segment};

use crate::{
    counts::{Change, Tally, account, cpu_slot},
    nat::{SockTuple, Wire, note_receiver, sock_tuple, to_socket_view},
    observe::to_observer,
    parse::{Buffer, Packet, ParseError, Parsed, parse},
    track::{Attempt, SLOW_ATTEMPTS, fast, icmp, track},
};

/// The slow path's program for the XDP program, and for the TC programs: a
/// tail call stays within its program type, and a jump table belongs to the
/// type of the first program that uses it. The agent fills them at load.
#[map]
static SLOW_XDP: ProgramArray = ProgramArray::with_max_entries(1, 0);
#[map]
static SLOW_TC: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The programs below that namespaces' entry programs tail-call (the agent
/// writes an entry program per namespace, with the namespace's slot in it,
/// and fills these; `tcpstate_common::netns`). Never called from here.
#[map]
static ENTRY_TC: ProgramArray = ProgramArray::with_max_entries(2, 0);
#[map]
static ENTRY_XDP: ProgramArray = ProgramArray::with_max_entries(1, 0);

#[xdp]
pub fn tcpstate_xdp(ctx: XdpContext) -> u32 {
    match try_xdp(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_xdp(ctx: &XdpContext) -> Result<u32, u32> {
    let (c, pkt) = cpu_slot().ok_or(XDP_PASS)?;
    c.event(Event::PacketsIn);
    if observe(ctx.data(), ctx.data_end(), c, pkt, || 0, |_| {}) {
        slow_path(ctx, &SLOW_XDP, c);
    }
    Ok(XDP_PASS)
}

/// TC egress. Returns TC_ACT_UNSPEC ("no verdict, go on"): with nothing else
/// attached the packet is sent as is, and a program attached after this one
/// still gets to decide, as if the monitor were not there.
#[classifier]
pub fn tcpstate_tc(ctx: TcContext) -> i32 {
    match try_tc(&ctx, Event::PacketsOut) {
        Ok(action) | Err(action) => action,
    }
}

/// TC ingress: what arrives, as an skb. On interfaces without native XDP
/// this is the cheaper hook: generic XDP must first copy every segmented or
/// cloned skb into a linear buffer (BENCHMARKS.md measures it).
#[classifier]
pub fn tcpstate_tc_in(ctx: TcContext) -> i32 {
    match try_tc(&ctx, Event::PacketsIn) {
        Ok(action) | Err(action) => action,
    }
}

#[inline(always)]
fn try_tc(ctx: &TcContext, direction: Event) -> Result<i32, i32> {
    let (c, pkt) = cpu_slot().ok_or(TC_ACT_UNSPEC)?;
    c.event(direction);
    let egress = direction as u32 == Event::PacketsOut as u32;
    let meta = || {
        if !egress {
            return 0;
        }
        // SAFETY: reading the context's socket pointer (the verifier
        // rewrites the access); it is only compared with null.
        let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
        Segment::EGRESS | if sk.is_null() { Segment::NO_SOCKET } else { 0 }
    };
    // What arrives has no socket yet (the stack finds it after this hook).
    let sock = |out: &mut SockTuple| {
        if egress {
            sock_tuple(ctx.skb.skb, out)
        }
    };
    if observe(ctx.data(), ctx.data_end(), c, pkt, meta, sock) {
        slow_path(ctx, &SLOW_TC, c);
    }
    Ok(TC_ACT_UNSPEC)
}

/// Parses and takes the fast path; true when the slow path must run on
/// what is now in `pkt`. `meta` says how the segment was seen
/// ([`Segment::EGRESS`], ...), `sock` the sending socket's own tuple; both
/// are asked only for a segment the fast path did not take.
#[inline(always)]
fn observe(
    start: usize,
    end: usize,
    c: &mut Counters,
    pkt: &mut Packet,
    meta: impl Fn() -> u8,
    sock: impl Fn(&mut SockTuple),
) -> bool {
    match parse(&Buffer { start, end }, pkt) {
        // TCP segments are not counted here: every frame is counted once as
        // a packet and non-TCP ones once more by kind, so userspace derives
        // them (one write less per segment).
        Ok(Parsed::Tcp) => {
            if fast(pkt) {
                return false;
            }
            // Passing through (with --observe): the observer's entry, as the
            // wire shows it on either hook; no socket, no translation.
            if to_observer(pkt) {
                if fast(pkt) {
                    return false;
                }
                pkt.other_family = 0;
                pkt.kind = Packet::SEGMENT;
                pkt.attempt = 0;
                return true;
            }
            // Local NAT: the sockets' own tuple, then the fast path again.
            let mut own = SockTuple::default();
            sock(&mut own);
            let wire = Wire::of(pkt);
            let translated = to_socket_view(pkt, &own);
            if translated && fast(pkt) {
                return false;
            }
            pkt.other_family = 0;
            if own.family != 0 {
                note_receiver(pkt, &wire, translated);
            }
            pkt.seg.meta = meta();
            pkt.kind = Packet::SEGMENT;
            pkt.attempt = 0;
            true
        }
        // Not a TCP segment, but about one: counted as not TCP too.
        Ok(Parsed::IcmpError) => {
            c.event(Event::NotTcp);
            pkt.seg.meta = 0;
            to_observer(pkt);
            pkt.kind = Packet::ICMP_ERROR;
            pkt.other_family = 0;
            true
        }
        Ok(Parsed::NotTcp) => {
            c.event(Event::NotTcp);
            false
        }
        Ok(Parsed::Fragment) => {
            c.event(Event::Fragments);
            false
        }
        Err(ParseError::Malformed) => {
            c.event(Event::ParseErrors);
            false
        }
        Err(ParseError::Ipv6ExtTooDeep) => {
            c.event(Event::Ipv6ExtTooDeep);
            false
        }
    }
}

/// Goes on to the slow path; returns only if it could not (its program
/// missing from the jump table), which is counted.
#[inline(always)]
fn slow_path<C: aya_ebpf::EbpfContext>(ctx: &C, table: &ProgramArray, c: &mut Counters) {
    // SAFETY: a tail call leaves this program; the slow path reads what
    // this one left in the per-CPU scratch, which nothing else on this CPU
    // touches in between.
    unsafe { table.tail_call(ctx, 0) };
    c.event(Event::SlowPathMissing);
}

/// The slow path for the XDP program.
#[xdp]
pub fn tcpstate_slow_xdp(ctx: XdpContext) -> u32 {
    slow(&ctx, &SLOW_XDP);
    XDP_PASS
}

/// The slow path for the TC programs.
#[classifier]
pub fn tcpstate_slow_tc(ctx: TcContext) -> i32 {
    slow(&ctx, &SLOW_TC);
    TC_ACT_UNSPEC
}

/// One attempt at what the attached program left in the scratch; another
/// (this program again) when another CPU changed the entry meanwhile.
#[inline(always)]
fn slow<C: aya_ebpf::EbpfContext>(ctx: &C, table: &ProgramArray) {
    let Some((c, pkt)) = cpu_slot() else {
        return;
    };
    pkt.change = Change::NONE;
    if pkt.kind == Packet::ICMP_ERROR {
        icmp(pkt, c);
        account(c, pkt.netns, &pkt.change);
        return;
    }
    let attempt = pkt.attempt;
    if track(pkt, c, attempt == 0) == Attempt::Done {
        account(c, pkt.netns, &pkt.change);
        // The receiving socket's own entry, where a local NAT gives it one.
        if pkt.take_receiver() {
            pkt.attempt = 0;
            // SAFETY: as in `slow_path`: this program again, on the same scratch.
            unsafe { table.tail_call(ctx, 0) };
            c.event(Event::SlowPathMissing);
        }
        return;
    }
    if u32::from(attempt) + 1 >= SLOW_ATTEMPTS {
        c.event(Event::CasConflicts);
        return;
    }
    pkt.attempt = attempt + 1;
    // SAFETY: as in `slow_path`: this program again, on the same scratch.
    unsafe { table.tail_call(ctx, 0) };
    c.event(Event::SlowPathMissing);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
