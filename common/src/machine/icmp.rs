//! ICMP errors about a connection attempt: what Linux's `tcp_v4_err` and
//! `tcp_v6_err` do with them, so the probe can do the same when it sees one.
//!
//! The error quotes the start of a segment this host sent; its sequence
//! number must be one the endpoint has outstanding. Then:
//! - (the kernel skips a socket its application holds locked at that moment,
//!   as `connect()` does while its SYN goes out on a fast path: then it only
//!   notes the error and retries. Where the kernel reports its own state
//!   changes, a connect's end is left to that report.)
//! - a SYN_SENT socket is ended by any destination-unreachable error (but
//!   IPv4's "fragmentation needed"), parameter problem or time exceeded
//!   ([`IcmpEffect::EndsConnect`]); an established one only notes a soft
//!   error and keeps trying;
//! - a request socket (SYN_RECV) is dropped by a narrower set
//!   ([`IcmpEffect::EndsRequest`]): over IPv4 net/host unreachable, time
//!   exceeded and parameter problem (not port unreachable nor
//!   administratively prohibited); over IPv6 the "fatal" codes of
//!   `icmpv6_err_convert` (administratively prohibited, port unreachable,
//!   policy failure, reject route, unknown codes, parameter problem).

use crate::{
    flow::{EndSeq, Side, Word},
    machine::seq_ge,
    state::TcpState,
};

/// What an ICMP error does to the endpoint whose segment it quotes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpEffect {
    /// Nothing (redirects, "packet too big", fragment reassembly timeouts).
    Nothing = 0,
    /// Ends a connect in SYN_SENT.
    EndsConnect = 1,
    /// Ends a connect in SYN_SENT and drops a request socket in SYN_RECV.
    EndsRequest = 2,
}

impl IcmpEffect {
    /// An ICMPv4 error's effect, by type and code.
    #[inline(always)]
    pub const fn v4(icmp_type: u8, code: u8) -> IcmpEffect {
        match (icmp_type, code) {
            // Destination unreachable: net/host unreachable also drop requests.
            (3, 0 | 1) => IcmpEffect::EndsRequest,
            // Fragmentation needed is path MTU discovery, not an error.
            (3, 4) => IcmpEffect::Nothing,
            (3, 0..=15) => IcmpEffect::EndsConnect,
            // Time exceeded in transit (not: in reassembly), parameter problem.
            (11, 0) | (12, _) => IcmpEffect::EndsRequest,
            _ => IcmpEffect::Nothing,
        }
    }

    /// An ICMPv6 error's effect, by type and code.
    #[inline(always)]
    pub const fn v6(icmp_type: u8, code: u8) -> IcmpEffect {
        match (icmp_type, code) {
            // Destination unreachable: no route, beyond scope and address
            // unreachable are not fatal; the rest are.
            (1, 0 | 2 | 3) => IcmpEffect::EndsConnect,
            (1, _) => IcmpEffect::EndsRequest,
            // Time exceeded is not fatal; parameter problem is.
            (3, _) => IcmpEffect::EndsConnect,
            (4, _) => IcmpEffect::EndsRequest,
            // Packet too big (2) and everything else.
            _ => IcmpEffect::Nothing,
        }
    }

    #[inline(always)]
    pub const fn from_u32(v: u32) -> IcmpEffect {
        match v {
            1 => IcmpEffect::EndsConnect,
            2 => IcmpEffect::EndsRequest,
            _ => IcmpEffect::Nothing,
        }
    }
}

/// The word after an ICMP error that quotes a segment `side` sent with
/// sequence number `seq`; `facts` are `side`'s. `kernel_reports`: the
/// kernel reports full sockets' changes (a connect's end among them).
#[inline(always)]
pub fn icmp_error(
    word: Word,
    facts: &EndSeq,
    side: Side,
    effect: IcmpEffect,
    seq: u32,
    kernel_reports: bool,
) -> Word {
    if word.is_dead() || word.is_reaping() || !word.is_local(side) {
        return word;
    }
    let known = word.facts(side) & Word::SEEN != 0;
    // The ISN is one below `snd_nxt` after a SYN or a SYN-ACK.
    let isn = facts.snd_nxt.wrapping_sub(1);
    let ends = match word.state(side) {
        // The kernel takes sequence numbers from snd_una (the ISN) to snd_nxt.
        TcpState::SynSent => {
            !kernel_reports
                && effect as u32 != IcmpEffect::Nothing as u32
                && (!known || (seq_ge(seq, isn) && seq_ge(facts.snd_nxt, seq)))
        }
        // A request socket takes exactly its SYN-ACK's sequence number.
        TcpState::SynRecv => {
            effect as u32 == IcmpEffect::EndsRequest as u32 && (!known || seq == isn)
        }
        _ => false,
    };
    if ends {
        crate::machine::expire(word, side)
    } else {
        word
    }
}
