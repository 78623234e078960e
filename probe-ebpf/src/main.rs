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
    EbpfContext,
    bindings::{TC_ACT_UNSPEC, xdp_action::XDP_PASS},
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map, xdp},
    maps::PerCpuArray,
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::warn;
use tcpstate_common::{Counters, Event};

use crate::{
    parse::{Packet, ParseError, Parsed, parse},
    track::{Tracked, count, cpu_slot, track},
};

/// When this CPU last logged a full flow map (the log is at most once a
/// second per CPU; the `map_full` counter counts every refusal).
#[map]
static MAP_FULL_LOGGED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn tcpstate_xdp(ctx: XdpContext) -> u32 {
    match try_xdp(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_xdp(ctx: &XdpContext) -> Result<u32, u32> {
    let (c, pkt) = cpu_slot().ok_or(XDP_PASS)?;
    count(c, Event::PacketsXdp);
    observe(ctx, ctx.data(), ctx.data_end(), c, pkt);
    Ok(XDP_PASS)
}

/// TC egress. Returns TC_ACT_UNSPEC ("no verdict, go on"): with nothing else
/// attached the packet is sent as is, and a program attached after this one
/// still gets to decide, as if the monitor were not there.
#[classifier]
pub fn tcpstate_tc(ctx: TcContext) -> i32 {
    match try_tc(&ctx) {
        Ok(action) | Err(action) => action,
    }
}

fn try_tc(ctx: &TcContext) -> Result<i32, i32> {
    let (c, pkt) = cpu_slot().ok_or(TC_ACT_UNSPEC)?;
    count(c, Event::PacketsTc);
    observe(ctx, ctx.data(), ctx.data_end(), c, pkt);
    Ok(TC_ACT_UNSPEC)
}

#[inline(always)]
fn observe<C: EbpfContext>(ctx: &C, start: usize, end: usize, c: &mut Counters, pkt: &mut Packet) {
    match parse(start, end, pkt) {
        // TCP segments are not counted here: every frame is counted once as
        // a packet and non-TCP ones once more by kind, so userspace derives
        // them (one write less per segment).
        Ok(Parsed::Tcp) => {
            if track(pkt, c) == Tracked::MapFull {
                log_map_full(ctx, c);
            }
        }
        Ok(Parsed::NotTcp) => count(c, Event::NotTcp),
        Ok(Parsed::Fragment) => count(c, Event::Fragments),
        Err(ParseError::Malformed) => count(c, Event::ParseErrors),
        Err(ParseError::Ipv6ExtTooDeep) => count(c, Event::Ipv6ExtTooDeep),
    }
}

/// Warns through aya-log that the flow map refused a flow, at most once a
/// second per CPU.
#[inline(never)]
fn log_map_full<C: EbpfContext>(ctx: &C, c: &Counters) {
    let Some(last) = MAP_FULL_LOGGED.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: helper without preconditions; `last` is this CPU's slot.
    let now = unsafe { bpf_ktime_get_ns() };
    unsafe {
        if now.wrapping_sub(*last) < 1_000_000_000 {
            return;
        }
        *last = now;
    }
    let refused = c.events[Event::MapFull as usize & 0xf];
    warn!(
        ctx,
        "flow map full: a new connection is not tracked ({} refused on this CPU so far)", refused
    );
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
