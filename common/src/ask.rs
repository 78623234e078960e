//! Questions the probe puts to the agent through a ring buffer: sockets the
//! kernel changed in a way that only the kernel can tell the rest of (a full
//! socket that closed where a TIME_WAIT socket may take over). A ring of the
//! same records carries notices ([`Ask::TIMED`]): a local endpoint entered a
//! state the kernel ends on a timer, so the agent files that timer at once
//! rather than at its next walk of the flow maps.

use crate::{
    flow::{FlowKey4, FlowKey6, Side, Word},
    state::TcpState,
};

/// One question: look the socket of endpoint `side` of the flow up in the
/// socket table. `key4` in the IPv4 map when `family` is 4, else `key6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Ask {
    /// CLOCK_MONOTONIC nanoseconds when the kernel reported the change.
    pub at_ns: u64,
    pub key6: FlowKey6,
    pub key4: FlowKey4,
    pub family: u32,
    /// The endpoint ([`crate::Side`] as 0 or 1).
    pub side: u32,
    /// The kernel's state before the change it reported.
    pub old: u32,
    /// The kernel's state after it.
    pub new: u32,
}

impl Ask {
    /// In `old`: not a question but a notice (a local endpoint of the flow
    /// entered a timed state); `side` and `new` mean nothing then.
    pub const TIMED: u32 = 0xff;

    /// A notice about the flow `key4` (`family` 4) or `key6`.
    pub const fn timed(at_ns: u64, key6: FlowKey6, key4: FlowKey4, family: u32) -> Ask {
        Ask {
            at_ns,
            key6,
            key4,
            family,
            side: 0,
            old: Ask::TIMED,
            new: 0,
        }
    }

    pub const fn is_timed(&self) -> bool {
        self.old == Ask::TIMED
    }
}

/// A change from `old` to `new` put a local endpoint in a state the kernel
/// ends on a timer (TIME_WAIT, FIN_WAIT2, SYN_SENT, SYN_RECV). Not the end
/// of a connection: deleting a dead entry changes no count, and a reap filed
/// at once would make the agent's walk and check stand aside for it.
#[inline(always)]
pub const fn enters_timed(old: Word, new: Word) -> bool {
    if new.is_dead() {
        return false;
    }
    let sides = [Side::A, Side::B];
    let mut i = 0;
    while i < 2 {
        let (o, n) = (old.counted(sides[i]) as u8, new.counted(sides[i]) as u8);
        if o != n
            && (n == TcpState::TimeWait as u8
                || n == TcpState::FinWait2 as u8
                || n == TcpState::SynSent as u8
                || n == TcpState::SynRecv as u8)
        {
            return true;
        }
        i += 1;
    }
    false
}

const _: () = assert!(core::mem::size_of::<Ask>() == 80);
const _: () = assert!(core::mem::align_of::<Ask>() == 8);

/// Bytes of the ring buffer that carries them (a power of two of pages):
/// room for about 14,000 questions between two reads of the agent.
pub const ASK_RING_BYTES: u32 = 1 << 20;

/// Bytes of the ring buffer of notices ([`Ask::TIMED`]), apart from the
/// questions so that a burst of new connections cannot crowd them out:
/// about 55,000 notices between two reads of the agent.
pub const NOTICE_RING_BYTES: u32 = 1 << 22;

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, no padding (size asserted above).
unsafe impl aya::Pod for Ask {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_endpoint_entering_a_timed_state_is_noticed_once() {
        let est = Word::EMPTY
            .with_local(Side::A)
            .with_state(Side::A, TcpState::Established)
            .with_state(Side::B, TcpState::Established);
        let fw2 = est.with_state(Side::A, TcpState::FinWait2);
        assert!(enters_timed(est, fw2));
        assert!(!enters_timed(fw2, fw2), "already there");
        // A remote endpoint's timers are not this host's.
        let remote = est.with_state(Side::B, TcpState::TimeWait);
        assert!(!enters_timed(est, remote));
        assert!(!enters_timed(
            est,
            est.with_state(Side::A, TcpState::CloseWait)
        ));
        // A new entry in SYN_RECV (a SYN-ACK left).
        let req = Word::EMPTY
            .with_local(Side::B)
            .with_state(Side::B, TcpState::SynRecv)
            .with_state(Side::A, TcpState::SynSent);
        assert!(enters_timed(Word::EMPTY, req));
        // The end of a connection: its reaping is the walk's to file.
        let closed = est.with_state(Side::A, TcpState::Close).settle();
        assert!(closed.is_dead() && !enters_timed(est, closed));
        assert!(Ask::timed(0, FlowKey6::default(), FlowKey4::default(), 4).is_timed());
    }
}
