//! The tcpstate probe: XDP sees every frame entering a monitored interface,
//! TC egress every frame the host sends on it; both feed the flow maps. An
//! endpoint is local when its address is one of the namespace's (the agent
//! keeps LOCAL4/LOCAL6 current), so forwarded traffic counts nowhere. The
//! probe is a monitor: every path lets the packet through unchanged.
#![no_std]
#![no_main]
// BPF_CMPXCHG through the compiler intrinsic (see `track::swap_word`).
#![allow(internal_features)]
#![feature(core_intrinsics)]
// Map keys are passed by reference on purpose: a by-value key is copied to
// the 512-byte stack first (or through a `memcpy` call).
#![allow(clippy::needless_borrows_for_generic_args)]

mod command;
mod parse;
mod track;

use aya_ebpf::{
    bindings::{TC_ACT_UNSPEC, xdp_action::XDP_PASS},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use tcpstate_common::{Counters, Event};

use crate::{
    parse::{Packet, ParseError, Parsed, parse},
    track::{count, cpu_slot, track},
};

#[xdp]
pub fn tcpstate_xdp(ctx: XdpContext) -> u32 {
    match try_xdp(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_xdp(ctx: &XdpContext) -> Result<u32, u32> {
    let (c, pkt) = cpu_slot().ok_or(XDP_PASS)?;
    count(c, Event::PacketsIn);
    observe(ctx.data(), ctx.data_end(), c, pkt);
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
    count(c, direction);
    observe(ctx.data(), ctx.data_end(), c, pkt);
    Ok(TC_ACT_UNSPEC)
}

#[inline(always)]
fn observe(start: usize, end: usize, c: &mut Counters, pkt: &mut Packet) {
    match parse(start, end, pkt) {
        // TCP segments are not counted here: every frame is counted once as
        // a packet and non-TCP ones once more by kind, so userspace derives
        // them (one write less per segment).
        // A full map is counted (`map_full`); the agent logs its growth.
        Ok(Parsed::Tcp) => track(pkt, c),
        Ok(Parsed::NotTcp) => count(c, Event::NotTcp),
        Ok(Parsed::Fragment) => count(c, Event::Fragments),
        Err(ParseError::Malformed) => count(c, Event::ParseErrors),
        Err(ParseError::Ipv6ExtTooDeep) => count(c, Event::Ipv6ExtTooDeep),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
