//! The service table (`tcpstate_common::services`): per namespace and
//! service, outcomes, handshake times, and a listening port's SYNs and
//! answers. Added to at state changes only, atomically (one table for every
//! CPU). The agent keeps `LISTENING` and `NETNS_PORTS` current, which say
//! which local ports are services.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{Array, HashMap},
};
use tcpstate_common::{
    Side,
    durations::{BUCKETS, bucket},
    netns::DEFAULT_MAX_NETNS,
    services::{Ends, ListenKey, OUTCOMES, ServiceKey, ServiceStats, What},
};

/// Services the table holds at most (across namespaces); an addition to a
/// service it has no room for is counted (`Event::ServicesFull`).
pub const MAX_SERVICES: u32 = 4096;

#[map]
pub static SERVICES: HashMap<ServiceKey, ServiceStats> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// A zeroed value to insert from (320 bytes would not fit the stack).
#[map]
static SERVICE_ZERO: Array<ServiceStats> = Array::with_max_entries(1, 0);

/// Each namespace's listening ports.
#[map]
pub static LISTENING: HashMap<ListenKey, u8> = HashMap::with_max_entries(16384, 0);

/// Each namespace's `ip_local_port_range` (`services::ephemeral`).
#[map]
pub static NETNS_PORTS: Array<u32> = Array::with_max_entries(DEFAULT_MAX_NETNS, 0);

/// Whether `port` listens in namespace slot `netns`.
#[inline(always)]
pub fn listening(netns: u32, port: u16) -> bool {
    LISTENING
        .get_ptr(&ListenKey {
            netns,
            port,
            pad: 0,
        })
        .is_some()
}

/// Adds `what` (an outcome, a time of `units`, a SYN or an answer) about
/// the local endpoint `side` of `ends` to its service, whose kind is
/// `kind` (`services::Kind`). False when the table had no room. A
/// subprogram: checked once, whatever its callers' paths.
#[inline(never)]
pub fn note_service(netns: u32, ends: &Ends, side_kind: u32, what: u32, units: u32) -> bool {
    let side = if side_kind & 1 == 0 { Side::A } else { Side::B };
    let range = NETNS_PORTS.get(netns).copied().unwrap_or(0);
    let key = ends.service(
        netns,
        side,
        (side_kind >> 1) as u8,
        |p| listening(netns, p),
        range,
    );
    let p = match SERVICES.get_ptr_mut(&key) {
        Some(p) => p,
        None => {
            let Some(zero) = SERVICE_ZERO.get(0) else {
                return true;
            };
            // Another CPU may insert it first: then the lookup finds theirs.
            let _ = SERVICES.insert(&key, zero, BPF_NOEXIST as u64);
            match SERVICES.get_ptr_mut(&key) {
                Some(p) => p,
                None => return false,
            }
        }
    };
    // SAFETY: a map value, valid for the program's run; indexes masked to
    // the arrays' lengths; only atomic adds change it.
    unsafe {
        let field = match what {
            What::TIME => {
                let b = bucket(units) & (BUCKETS - 1);
                add(&raw mut (*p).times.sum, units as u64);
                &raw mut (*p).times.buckets[b]
            }
            What::SYN => &raw mut (*p).syns,
            What::ANSWER => &raw mut (*p).answered,
            o => {
                let i = o as usize;
                if i >= OUTCOMES {
                    return true;
                }
                &raw mut (*p).outcomes[i]
            }
        };
        add(field, 1);
    }
    true
}

#[inline(always)]
unsafe fn add(p: *mut u64, n: u64) {
    // SAFETY: the caller's (a map value's field).
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, n) };
}
