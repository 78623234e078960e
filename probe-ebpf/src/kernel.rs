//! `tcpstate_kernel`: the kernel's own report of every full socket's state
//! change (the `inet_sock_set_state` tracepoint, as a raw tracepoint: no
//! tracefs needed); and `tcpstate_connect`, at `tcp_connect()`, the one
//! moment a connecting socket's tuple is complete (its SYN_SENT report
//! comes before the port is chosen), for a connect whose SYN never reaches
//! the wire (the host's own firewall drops it). It sets the reporting
//! socket's endpoint to the state the kernel just gave it, through the same
//! compare-and-swap and counter update as the data path. This is how the
//! counts learn what no segment shows: a connect given up or refused by an
//! ICMP error, a timeout, a `close()` whose FIN waits behind queued data,
//! an application that closes a connecting socket. A close where a timewait socket may take over is
//! decided by the namespace's death row ([`handover`]), or, at its limit,
//! becomes a question for the agent ([`crate::ask`]).
//!
//! The tracepoint fires for every socket of the host: a report is read
//! only when its socket is TCP and in a monitored namespace, whose inode
//! numbers the agent keeps in [`NETNS_SLOTS`] (with the slot each has); the
//! offsets of what is read it sets at load ([`SockLayout`]).
//!
//! Listening sockets send no segments: a socket entering or leaving LISTEN
//! moves its namespace's LISTEN count here, so reading LISTEN needs no
//! socket-table dump (the agent seeds the count once, and reconciliation
//! checks it).

use aya_ebpf::{
    helpers::bpf_probe_read_kernel,
    macros::{fentry, map, raw_tracepoint},
    maps::HashMap,
    programs::{FEntryContext, RawTracePointContext},
};
use tcpstate_common::{
    EndSeq, Event, FlowEntry, FlowKey4, FlowKey6, Side, SockLayout, TcpState, Word,
    layout::SOCK_DONE,
    machine::{Handover, KernelChange, kernel_report},
    netns::DEFAULT_MAX_NETNS,
    outcome::Cause,
};

use crate::{
    ask::ask,
    counts::{Atomic, Change as Noted, Tally, account, move_counts, process_slot},
    track::{
        CAS_ATTEMPTS, EEXIST, FLOWS4, FLOWS6, WriteEnds, insert_entry, local4, local6, now_stamp,
        read_stamp, read_word, restamp, swap_word,
    },
};

/// The monitored namespaces: inode number to slot.
#[map]
pub static NETNS_SLOTS: HashMap<u32, u32> = HashMap::with_max_entries(DEFAULT_MAX_NETNS, 0);

/// Set by the agent at load from the kernel's BTF; all zero: do nothing.
#[unsafe(no_mangle)]
static SOCK_LAYOUT: SockLayout = SockLayout {
    family: 0,
    sport: 0,
    dport: 0,
    rcv_saddr: 0,
    daddr: 0,
    v6_rcv_saddr: 0,
    v6_daddr: 0,
    net: 0,
    protocol: 0,
    net_inum: 0,
    flags: 0,
    tw_count: 0,
    tw_max: 0,
    enabled: 0,
};

/// One report: the socket's old and new state, and for a close from
/// FIN_WAIT2 or CLOSING what the socket shows of its successor.
#[derive(Clone, Copy)]
struct Change {
    old: TcpState,
    new: TcpState,
    handover: Handover,
}

/// What became of a socket closing from FIN_WAIT2 or CLOSING. The kernel
/// makes the timewait socket first (counting it in the namespace's death
/// row) and closes the full one after, so at this report a count at or one
/// short of `tcp_max_tw_buckets` leaves it open whether there was room;
/// below, there was: a FIN received (SOCK_DONE) makes it a TIME_WAIT, else
/// an orphan's FIN_WAIT2. (The socket's own hash link cannot tell: the
/// close unhashes it before it reports.)
#[inline(always)]
fn handover(sk: usize, net: usize, layout: &SockLayout, old: TcpState, new: TcpState) -> Handover {
    if new != TcpState::Close || !matches!(old, TcpState::FinWait2 | TcpState::Closing) {
        return Handover::Unknown;
    }
    if at(&layout.tw_count) == 0 || at(&layout.tw_max) == 0 {
        return Handover::Unknown;
    }
    let (Ok(count), Ok(max), Ok(flags)) = (
        read::<u32>(net, at(&layout.tw_count)),
        read::<i32>(net, at(&layout.tw_max)),
        read::<u64>(sk, at(&layout.flags)),
    ) else {
        return Handover::Unknown;
    };
    // The kernel refused a successor when `count - 1 >= max` before making
    // it, and a successor made adds one: above `max` here may be either.
    // At `max` too, for a concurrent close elsewhere in the namespace.
    if count as i64 >= max as i64 {
        Handover::AtLimit
    } else if old == TcpState::Closing || flags & (1 << SOCK_DONE) != 0 {
        Handover::TimeWait
    } else {
        Handover::FinWait2
    }
}

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPPROTO_TCP: u16 = 6;

/// Why a report was passed over (the tracepoint ignores the result; the
/// entry point returns it).
const SKIPPED: i32 = 1;

#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn tcpstate_kernel(ctx: RawTracePointContext) -> i32 {
    match try_report(&ctx) {
        Ok(()) => 0,
        Err(code) => code,
    }
}

/// A field of the layout (a read-only global: read it, do not let the
/// compiler fold the all-zero default in).
#[inline(always)]
fn at(field: &u32) -> usize {
    // SAFETY: a plain read of a global.
    unsafe { core::ptr::read_volatile(field) as usize }
}

/// Reads a `T` at `base + off` of kernel memory.
#[inline(always)]
fn read<T>(base: usize, off: usize) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel checks the address and copies into a
    // value of its own; nothing is dereferenced here.
    unsafe { bpf_probe_read_kernel((base + off) as *const T) }.map_err(|_| SKIPPED)
}

fn try_report(ctx: &RawTracePointContext) -> Result<(), i32> {
    let sk: usize = ctx.arg(0);
    let old = TcpState::from_bits(ctx.arg::<u64>(1) as u8);
    let new = TcpState::from_bits(ctx.arg::<u64>(2) as u8);
    if new == TcpState::None {
        return Err(SKIPPED);
    }
    if new == TcpState::Listen {
        return listening(sk, true);
    }
    if old == TcpState::Listen {
        // A listener closing; or a request's child socket, cloned from its
        // listener and reported as leaving LISTEN for SYN_RECV (the
        // listener stays): nothing for the flow maps either way.
        return if new == TcpState::Close {
            listening(sk, false)
        } else {
            Err(SKIPPED)
        };
    }
    report(sk, old, new)
}

/// A TCP socket of a monitored namespace started (`up`) or stopped
/// listening: its namespace's LISTEN count moves.
#[inline(always)]
fn listening(sk: usize, up: bool) -> Result<(), i32> {
    let layout = &SOCK_LAYOUT;
    let netns = monitored(sk, layout)?.1;
    let mut c = process_slot(netns).ok_or(SKIPPED)?;
    c.state(TcpState::Listen, if up { 1 } else { -1 });
    Ok(())
}

/// The socket's `struct net` and its namespace slot, if it is a TCP socket
/// of a monitored namespace.
#[inline(always)]
fn monitored(sk: usize, layout: &SockLayout) -> Result<(usize, u32), i32> {
    if at(&layout.enabled) == 0 {
        return Err(SKIPPED);
    }
    if read::<u16>(sk, at(&layout.protocol))? != IPPROTO_TCP {
        return Err(SKIPPED);
    }
    let net: usize = read(sk, at(&layout.net))?;
    let inum: u32 = read(net, at(&layout.net_inum))?;
    let slot = NETNS_SLOTS.get_ptr(&inum).ok_or(SKIPPED)?;
    // SAFETY: a live map value.
    Ok((net, unsafe { *slot }))
}

#[fentry(function = "tcp_connect")]
pub fn tcpstate_connect(ctx: FEntryContext) -> i32 {
    match try_connect(&ctx) {
        Ok(()) => 0,
        Err(code) => code,
    }
}

/// A connect's SYN is about to be sent: the socket is SYN_SENT, its tuple
/// complete.
fn try_connect(ctx: &FEntryContext) -> Result<(), i32> {
    let sk: usize = ctx.arg(0);
    report(sk, TcpState::Close, TcpState::SynSent)
}

/// Applies the change `old -> new` of the TCP socket at `sk`, if it is one
/// of the monitored namespace's.
#[inline(always)]
fn report(sk: usize, old: TcpState, new: TcpState) -> Result<(), i32> {
    let layout = &SOCK_LAYOUT;
    let (net, ns) = monitored(sk, layout)?;
    let lport = u16::from_be(read(sk, at(&layout.sport))?);
    let rport = u16::from_be(read(sk, at(&layout.dport))?);
    // Not connected (yet): a connect reports SYN_SENT before its port is chosen.
    if lport == 0 || rport == 0 {
        return Err(SKIPPED);
    }
    let mut c = process_slot(ns).ok_or(SKIPPED)?;
    let change = Change {
        old,
        new,
        handover: handover(sk, net, layout, old, new),
    };
    match read::<u16>(sk, at(&layout.family))? {
        AF_INET => {
            let l: u32 = read(sk, at(&layout.rcv_saddr))?;
            let r: u32 = read(sk, at(&layout.daddr))?;
            report4(ns, l, lport, r, rport, change, &mut c);
        }
        AF_INET6 => {
            let l: [u32; 4] = read(sk, at(&layout.v6_rcv_saddr))?;
            let r: [u32; 4] = read(sk, at(&layout.v6_daddr))?;
            // An IPv4 peer of a dual-stack socket: IPv4 on the wire.
            if v4_mapped(&l) && v4_mapped(&r) {
                report4(ns, l[3], lport, r[3], rport, change, &mut c);
            } else {
                let (key, side) = FlowKey6::new(ns, l, lport, r, rport);
                let other_local = || local6(ns, &r);
                let asked = |at_ns| ask(at_ns, &key, &FlowKey4::default(), 6, side, old, new);
                apply(
                    &FLOWS6,
                    &key,
                    ns,
                    side as u32,
                    other_local,
                    change,
                    asked,
                    &mut c,
                );
            }
        }
        _ => return Err(SKIPPED),
    }
    Ok(())
}

/// An IPv4 address mapped into IPv6 (`::ffff:a.b.c.d`).
#[inline(always)]
pub fn v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[inline(always)]
fn report4(ns: u32, l: u32, lport: u16, r: u32, rport: u16, change: Change, c: &mut Atomic) {
    let (key, side) = FlowKey4::new(ns, l, lport, r, rport);
    let other_local = || local4(ns, r);
    let (old, new) = (change.old, change.new);
    let asked = |at_ns| ask(at_ns, &FlowKey6::default(), &key, 4, side, old, new);
    apply(
        &FLOWS4,
        &key,
        ns,
        side as u32,
        other_local,
        change,
        asked,
        c,
    );
}

/// Applies the report `old -> new` about endpoint `side_is_b` of `key`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn apply<K: WriteEnds>(
    map: &HashMap<K, FlowEntry>,
    key: &K,
    netns: u32,
    side_is_b: u32,
    other_local: impl Fn() -> bool,
    change: Change,
    asked: impl Fn(u64) -> bool,
    c: &mut Atomic,
) {
    let Change { old, new, handover } = change;
    let side = if side_is_b & 1 == 0 { Side::A } else { Side::B };
    for _ in 0..CAS_ATTEMPTS {
        match map.get_ptr_mut(key) {
            Some(p) => {
                let w = read_word(p);
                let since = read_stamp(p);
                let peer_local = if w.is_dead() {
                    other_local()
                } else {
                    w.is_local(side.other())
                };
                match kernel_report(w, side, peer_local, old, new, handover) {
                    KernelChange::Nothing => return,
                    KernelChange::Ask => {
                        // SAFETY: helper without preconditions.
                        let now = unsafe { aya_ebpf::helpers::bpf_ktime_get_ns() };
                        c.event(if asked(now) {
                            Event::Asked
                        } else {
                            Event::AskLost
                        });
                        return;
                    }
                    KernelChange::Set(nw) => {
                        if swap_word(p, w, nw) {
                            let units = restamp(p, w, nw, since);
                            move_counts(c, w, nw);
                            let mut ch = Noted::of(w, nw, units, Cause::Other);
                            key.write_ends(&mut ch.ends);
                            account(c, netns, &ch);
                            c.event(Event::KernelReports);
                            return;
                        }
                    }
                }
            }
            None => {
                let KernelChange::Set(nw) =
                    kernel_report(Word::EMPTY, side, other_local(), old, new, handover)
                else {
                    return;
                };
                let entry = FlowEntry {
                    word: nw.0,
                    changed: now_stamp(),
                    ends: [EndSeq::default(); 2],
                };
                match insert_entry(map, key, &entry, netns, c) {
                    Ok(()) => {
                        move_counts(c, Word::EMPTY, nw);
                        c.event(Event::KernelReports);
                        return;
                    }
                    Err(e) if e == -EEXIST => continue,
                    // Counted (map full, or the namespace's share used up).
                    Err(_) => return,
                }
            }
        }
    }
    c.event(Event::CasConflicts);
}
