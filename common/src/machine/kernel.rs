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
//! on as a TIME_WAIT socket (which reports nothing), so that close is a
//! question for the agent, not an answer.

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

/// The change a report `old -> new` about `side`'s socket makes to `word`
/// (`Word::EMPTY` when the tuple has no entry); `other_local` says whether
/// the peer's address is this host's, for a new entry.
#[inline(always)]
pub const fn kernel_change(
    word: Word,
    side: Side,
    other_local: bool,
    old: TcpState,
    new: TcpState,
) -> KernelChange {
    if word.is_reaping() {
        return KernelChange::Nothing;
    }
    let ours = word.state(side);
    let gone = word.is_dead() || word.0 == Word::EMPTY.0 || !word.is_local(side);
    match new {
        TcpState::Close => {
            if gone || matches!(ours, TcpState::Close | TcpState::None | TcpState::TimeWait) {
                KernelChange::Nothing
            } else if matches!(old, TcpState::FinWait2 | TcpState::Closing) {
                KernelChange::Ask
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
