//! The kernel's own reports of a full socket's state changes (the
//! `sock:inet_sock_set_state` tracepoint): the truth at that moment, for the
//! changes no segment shows (a connect given up or refused by an ICMP
//! error, a timeout, `close()` with data still queued, an application that
//! closes a connecting socket) and the ones whose segment the kernel may
//! drop (the ACK that completes a passive open while the accept queue is
//! full).
//!
//! Only the reporting socket's own endpoint is set; its peer is left to the
//! segments. A full socket that closes in FIN_WAIT2 or CLOSING usually goes
//! on as a timewait socket (which reports nothing): what the probe could
//! tell of it at the report ([`Handover`]) decides, and where it could not,
//! the close is a question for the agent.

use crate::{
    flow::{Side, Word},
    machine::{expire, peer_state},
    state::TcpState,
};

/// What a kernel report does to an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelChange {
    /// Nothing to do (already so, or not about a connection).
    Nothing,
    /// Swap in this word.
    Set(Word),
    /// The socket closed where a TIME_WAIT socket may take over: ask the
    /// kernel which.
    Ask,
}

/// What the probe could tell, at a full socket's close from FIN_WAIT2 or
/// CLOSING, of the timewait socket that may take its place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handover {
    /// Not read (the kernel's layout unknown): ask the agent, unless the
    /// segments showed the TIME_WAIT already.
    Unknown,
    /// The namespace's timewait sockets were at `tcp_max_tw_buckets` (or
    /// one short: the count includes a successor made just now). The
    /// kernel may have had no room, even where the segments showed the
    /// TIME_WAIT: ask.
    AtLimit,
    /// A TIME_WAIT socket took over (the peer's FIN arrived in FIN_WAIT2, or
    /// the ACK of ours in CLOSING), its 60 s starting now.
    TimeWait,
    /// An orphan in FIN_WAIT2 went on as a timewait socket in FIN_WAIT2,
    /// its `tcp_fin_timeout` starting now.
    FinWait2,
}

/// The change a report `old -> new` about `side`'s socket makes to `word`
/// (`Word::EMPTY` when the tuple has no entry); `other_local` says whether
/// the peer's address is this host's, for a new entry. A close from
/// FIN_WAIT2 or CLOSING is a question ([`kernel_report`] answers it where
/// the probe could read the socket).
#[inline(always)]
pub const fn kernel_change(
    word: Word,
    side: Side,
    other_local: bool,
    old: TcpState,
    new: TcpState,
) -> KernelChange {
    kernel_report(word, side, other_local, old, new, Handover::Unknown)
}

/// [`kernel_change`], with what the socket showed of a close from
/// FIN_WAIT2 or CLOSING.
#[inline(always)]
pub const fn kernel_report(
    word: Word,
    side: Side,
    other_local: bool,
    old: TcpState,
    new: TcpState,
    handover: Handover,
) -> KernelChange {
    if word.is_reaping() {
        return KernelChange::Nothing;
    }
    let ours = word.state(side);
    let gone = word.is_dead() || word.0 == Word::EMPTY.0 || !word.is_local(side);
    match new {
        TcpState::Close => {
            let time_wait = matches!(ours, TcpState::TimeWait);
            if gone || matches!(ours, TcpState::Close | TcpState::None) {
                KernelChange::Nothing
            } else if matches!(old, TcpState::FinWait2 | TcpState::Closing) {
                match handover {
                    // The segments may have shown the TIME_WAIT already.
                    Handover::Unknown if time_wait => KernelChange::Nothing,
                    Handover::Unknown | Handover::AtLimit => KernelChange::Ask,
                    Handover::TimeWait if time_wait => KernelChange::Nothing,
                    Handover::TimeWait => {
                        KernelChange::Set(word.with_state(side, TcpState::TimeWait).settle())
                    }
                    // The segments showed the peer's FIN, the socket had
                    // not taken it: it may reach the successor, or have
                    // been dropped with the full socket closing under it
                    // (the ACK of our FIN and the peer's FIN handled on two
                    // CPUs at once; the peer resends it a retransmission
                    // timeout later). Only the table can tell.
                    Handover::FinWait2 if time_wait => KernelChange::Ask,
                    // The same word, stamped now: the timer starts here.
                    Handover::FinWait2 => {
                        KernelChange::Set(word.with_state(side, TcpState::FinWait2).settle())
                    }
                }
            } else if time_wait {
                KernelChange::Nothing
            } else {
                KernelChange::Set(expire(word, side))
            }
        }
        // A connection's states. LISTEN is counted from the socket table,
        // and a child socket reports SYN_RECV before its tuple is set.
        TcpState::SynSent
        | TcpState::Established
        | TcpState::FinWait1
        | TcpState::FinWait2
        | TcpState::CloseWait
        | TcpState::LastAck
        | TcpState::Closing => {
            if !gone && ours as u8 == new as u8 {
                return KernelChange::Nothing;
            }
            // The probe sees a segment before the kernel acts on it and the
            // report comes after: a FIN+ACK takes a local FIN_WAIT1 to
            // TIME_WAIT at once, and the kernel's FIN_WAIT1 -> FIN_WAIT2
            // follows. A TIME_WAIT socket reports nothing more, so a state
            // behind it is stale (a reused tuple starts with SYN_SENT or
            // ESTABLISHED).
            if !gone
                && matches!(ours, TcpState::TimeWait)
                && !matches!(new, TcpState::SynSent | TcpState::Established)
            {
                return KernelChange::Nothing;
            }
            // A socket the entry does not hold (yet, or any more: a reused
            // tuple): a new entry, as the socket table would seed it.
            let base = if gone || matches!(ours, TcpState::TimeWait | TcpState::Close) {
                // A local peer reports its own state; a remote one is guessed
                // (and not counted).
                let fresh = Word::EMPTY.with_local(side);
                if other_local {
                    fresh.with_local(side.other())
                } else {
                    fresh.with_state(side.other(), peer_state(new))
                }
            } else {
                word
            };
            KernelChange::Set(base.with_state(side, new).with_local(side).settle())
        }
        _ => KernelChange::Nothing,
    }
}
