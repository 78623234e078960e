//! Reference XDP programs for the benchmark: `ref_pass` returns at once;
//! `ref_lookup` parses Ethernet/IPv4/TCP (fixed 20-byte IPv4 header, no VLAN)
//! and does one 4-tuple HASH lookup with an atomic add, the least any
//! per-flow tracker does per packet; `ref_insert` inserts the 4-tuple, the
//! least a tracker does for a new flow.
#![no_std]
#![no_main]
#![allow(internal_features)]
#![feature(core_intrinsics)]
// Map keys are passed by reference on purpose: a by-value key is copied to
// the 512-byte stack first (or through a `memcpy` call).
#![allow(clippy::needless_borrows_for_generic_args)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    macros::{map, xdp},
    maps::HashMap,
    programs::XdpContext,
};

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Tuple {
    pub saddr: u32,
    pub daddr: u32,
    pub ports: u32,
}

/// The probe's key shape: both families in one map (IPv4 mapped into IPv6).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Tuple36 {
    pub a: [u32; 4],
    pub b: [u32; 4],
    pub ports: u32,
}

#[map]
static REF_FLOWS36: HashMap<Tuple36, u64> = HashMap::with_max_entries(262_144, 0);

#[xdp]
pub fn ref_lookup36(ctx: XdpContext) -> u32 {
    if let Some(t) = tuple(&ctx) {
        let k = Tuple36 {
            a: [0, 0, 0xffff_0000, t.saddr],
            b: [0, 0, 0xffff_0000, t.daddr],
            ports: t.ports,
        };
        if let Some(v) = REF_FLOWS36.get_ptr_mut(&k) {
            // SAFETY: a live map value.
            unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(v, 1) };
        }
    }
    XDP_PASS
}

#[map]
static REF_FLOWS: HashMap<Tuple, u64> = HashMap::with_max_entries(262_144, 0);

#[xdp]
pub fn ref_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[inline(always)]
fn tuple(ctx: &XdpContext) -> Option<Tuple> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 14 + 20 + 20 > end {
        return None;
    }
    // SAFETY: bounds checked above.
    unsafe {
        if *((start + 12) as *const u16) != 0x0008 || *((start + 14 + 9) as *const u8) != 6 {
            return None;
        }
        Some(Tuple {
            saddr: core::ptr::read_unaligned((start + 26) as *const u32),
            daddr: core::ptr::read_unaligned((start + 30) as *const u32),
            ports: core::ptr::read_unaligned((start + 34) as *const u32),
        })
    }
}

#[xdp]
pub fn ref_lookup(ctx: XdpContext) -> u32 {
    if let Some(t) = tuple(&ctx)
        && let Some(v) = REF_FLOWS.get_ptr_mut(&t)
    {
        // SAFETY: a live map value.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(v, 1) };
    }
    XDP_PASS
}

#[xdp]
pub fn ref_insert(ctx: XdpContext) -> u32 {
    if let Some(t) = tuple(&ctx) {
        let _ = REF_FLOWS.insert(&t, &1, 0);
    }
    XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
