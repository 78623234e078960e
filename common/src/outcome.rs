//! How a local endpoint's connection ended, decided when it closes: from
//! the state it left and, when a segment closed it, whether that segment
//! was an RST and who sent it. Counted per namespace as
//! [`Event::ClosedNormal`] and its siblings; named after Zeek's
//! `conn_state` codes in the README.

use crate::{counters::Event, flow::Side, state::TcpState};

/// What closed an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// An RST sent by this side of the entry.
    RstFrom(Side),
    /// Anything else: an ordinary segment, a kernel report, a timer, an
    /// ICMP error.
    Other,
    /// The agent's correction from the socket table: the end itself was not
    /// seen, so it has no outcome.
    Correction,
}

impl Cause {
    /// As a plain integer, for the probe's scratch and subprogram arguments.
    #[inline(always)]
    pub const fn to_u32(self) -> u32 {
        match self {
            Cause::Other => 0,
            Cause::RstFrom(Side::A) => 1,
            Cause::RstFrom(Side::B) => 2,
            Cause::Correction => 3,
        }
    }

    #[inline(always)]
    pub const fn from_u32(v: u32) -> Cause {
        match v {
            1 => Cause::RstFrom(Side::A),
            2 => Cause::RstFrom(Side::B),
            3 => Cause::Correction,
            _ => Cause::Other,
        }
    }

    /// The cause of a segment with TCP `flags` sent by `sender`.
    #[inline(always)]
    pub const fn of_segment(flags: u8, sender: Side) -> Cause {
        if flags & crate::machine::RST != 0 {
            Cause::RstFrom(sender)
        } else {
            Cause::Other
        }
    }
}

/// The outcome of a local endpoint on `side` that left state `left` for
/// closed because of `cause`.
///
/// An RST the endpoint's own kernel sent is a reset by this host; one from
/// the peer is a refusal when it answers a connect, a reset by the peer
/// otherwise. Without an RST: a handshake that ended unfinished timed out
/// (or was given up: an ICMP error, the application); a synchronized
/// connection that ended before both FINs was aborted by this host (a
/// peer's RST would have been seen on the wire first: the kernel reports
/// the close of an abort before its RST leaves); one that ended after its
/// FIN closed normally.
#[inline(always)]
pub const fn outcome(left: TcpState, side: Side, cause: Cause) -> Option<Event> {
    let left = left as u8;
    let handshake = left == TcpState::SynSent as u8 || left == TcpState::SynRecv as u8;
    let e = match cause {
        Cause::Correction => return None,
        Cause::RstFrom(s) if s as u8 == side as u8 => Event::ClosedResetLocal,
        Cause::RstFrom(_) if left == TcpState::SynSent as u8 => Event::ClosedRefused,
        Cause::RstFrom(_) => Event::ClosedResetRemote,
        Cause::Other if handshake => Event::ClosedHandshakeTimeout,
        Cause::Other
            if left == TcpState::Established as u8
                || left == TcpState::CloseWait as u8
                || left == TcpState::FinWait1 as u8 =>
        {
            Event::ClosedResetLocal
        }
        Cause::Other => Event::ClosedNormal,
    };
    Some(e)
}

/// Whether an endpoint that counted `old` ended when it came to count
/// `new`: it closed, or a new connection took its tuple over (a TIME_WAIT
/// reused by a SYN).
#[inline(always)]
pub const fn ended(old: TcpState, new: TcpState) -> bool {
    old as u8 != TcpState::None as u8
        && (new as u8 == TcpState::None as u8 || (opening(new) && !opening(old)))
}

#[inline(always)]
const fn opening(s: TcpState) -> bool {
    s as u8 == TcpState::SynSent as u8 || s as u8 == TcpState::SynRecv as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_way_of_closing_has_its_outcome() {
        use TcpState::*;
        let rst_peer = Cause::RstFrom(Side::B);
        let rst_self = Cause::RstFrom(Side::A);
        assert_eq!(
            outcome(SynSent, Side::A, rst_peer),
            Some(Event::ClosedRefused)
        );
        assert_eq!(
            outcome(SynSent, Side::A, Cause::Other),
            Some(Event::ClosedHandshakeTimeout)
        );
        assert_eq!(
            outcome(SynRecv, Side::A, Cause::Other),
            Some(Event::ClosedHandshakeTimeout)
        );
        assert_eq!(
            outcome(SynRecv, Side::A, rst_peer),
            Some(Event::ClosedResetRemote)
        );
        assert_eq!(
            outcome(Established, Side::A, rst_peer),
            Some(Event::ClosedResetRemote)
        );
        assert_eq!(
            outcome(Established, Side::A, rst_self),
            Some(Event::ClosedResetLocal)
        );
        assert_eq!(
            outcome(Established, Side::A, Cause::Other),
            Some(Event::ClosedResetLocal)
        );
        assert_eq!(
            outcome(CloseWait, Side::A, Cause::Other),
            Some(Event::ClosedResetLocal)
        );
        for s in [TimeWait, LastAck, Closing, FinWait2] {
            assert_eq!(
                outcome(s, Side::A, Cause::Other),
                Some(Event::ClosedNormal),
                "{s:?}"
            );
        }
        assert_eq!(
            outcome(LastAck, Side::B, Cause::RstFrom(Side::A)),
            Some(Event::ClosedResetRemote)
        );
        assert_eq!(
            outcome(Established, Side::A, Cause::Correction),
            Option::None
        );
        assert_eq!(
            Cause::of_segment(crate::machine::RST | 0x10, Side::B),
            rst_peer
        );
        assert_eq!(Cause::of_segment(0x11, Side::B), Cause::Other);
        for c in [Cause::Other, rst_peer, rst_self, Cause::Correction] {
            assert_eq!(Cause::from_u32(c.to_u32()), c);
        }
    }

    #[test]
    fn an_endpoint_ends_when_it_closes_or_its_tuple_is_reused() {
        use TcpState::*;
        assert!(ended(TimeWait, None));
        assert!(ended(TimeWait, SynRecv));
        assert!(ended(Established, None));
        assert!(!ended(None, SynSent));
        assert!(!ended(SynSent, SynRecv), "a simultaneous open goes on");
        assert!(!ended(SynSent, Established));
        assert!(!ended(Established, CloseWait));
    }
}
