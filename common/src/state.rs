//! TCP socket states, numbered as in the Linux kernel (`include/net/tcp_states.h`).

/// A TCP endpoint state. The numbers are Linux's, so they index the kernel's
/// own tables too. `None` (0) means "no socket seen for this endpoint yet".
/// Every 4-bit value is a variant (the kernel's request and bound-inactive
/// pseudo-states, and two unused), so that decoding a word's state is a
/// mask, not a branch per state: the BPF verifier walks each branch.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum TcpState {
    #[default]
    None = 0,
    Established = 1,
    SynSent = 2,
    SynRecv = 3,
    FinWait1 = 4,
    FinWait2 = 5,
    TimeWait = 6,
    Close = 7,
    CloseWait = 8,
    LastAck = 9,
    Listen = 10,
    Closing = 11,
    /// The kernel's `TCP_NEW_SYN_RECV` (a request socket); reported as
    /// SYN_RECV, never stored.
    NewSynRecv = 12,
    /// The kernel's `TCP_BOUND_INACTIVE`; never stored.
    BoundInactive = 13,
    Unused14 = 14,
    Unused15 = 15,
}

/// Number of slots in per-state tables (states fit in four bits).
pub const STATE_SLOTS: usize = 16;

impl TcpState {
    /// The eleven states a user sees, in the order `tcpstate count` prints them.
    pub const REPORTED: [TcpState; 11] = [
        TcpState::Listen,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::Established,
        TcpState::FinWait1,
        TcpState::FinWait2,
        TcpState::CloseWait,
        TcpState::Closing,
        TcpState::LastAck,
        TcpState::TimeWait,
        TcpState::Close,
    ];

    /// Decodes a 4-bit state (higher bits are ignored).
    #[inline(always)]
    pub const fn from_bits(bits: u8) -> TcpState {
        // SAFETY: every value 0..=15 is a variant of this `repr(u8)` enum.
        unsafe { core::mem::transmute::<u8, TcpState>(bits & 0xf) }
    }

    /// The name netstat prints (and `tcpstate count` prints).
    pub const fn name(self) -> &'static str {
        match self {
            TcpState::None => "NONE",
            TcpState::Established => "ESTABLISHED",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::FinWait1 => "FIN_WAIT1",
            TcpState::FinWait2 => "FIN_WAIT2",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::Listen => "LISTEN",
            TcpState::Closing => "CLOSING",
            TcpState::NewSynRecv => "NEW_SYN_RECV",
            TcpState::BoundInactive => "BOUND_INACTIVE",
            TcpState::Unused14 | TcpState::Unused15 => "UNKNOWN",
        }
    }

    /// Parses a netstat name (as printed by [`TcpState::name`]) or an `ss` name
    /// (`ESTAB`, `SYN-SENT`, `UNCONN`, ...).
    pub fn parse(s: &str) -> Option<TcpState> {
        let state = match s {
            "ESTABLISHED" | "ESTAB" => TcpState::Established,
            "SYN_SENT" | "SYN-SENT" => TcpState::SynSent,
            "SYN_RECV" | "SYN-RECV" => TcpState::SynRecv,
            "FIN_WAIT1" | "FIN-WAIT-1" => TcpState::FinWait1,
            "FIN_WAIT2" | "FIN-WAIT-2" => TcpState::FinWait2,
            "TIME_WAIT" | "TIME-WAIT" => TcpState::TimeWait,
            "CLOSE" | "UNCONN" => TcpState::Close,
            "CLOSE_WAIT" | "CLOSE-WAIT" => TcpState::CloseWait,
            "LAST_ACK" | "LAST-ACK" => TcpState::LastAck,
            "LISTEN" => TcpState::Listen,
            "CLOSING" => TcpState::Closing,
            _ => return None,
        };
        Some(state)
    }

    /// True for states in which the endpoint has no socket (nothing to count).
    #[inline(always)]
    pub const fn is_gone(self) -> bool {
        const GONE: u32 = 1 << TcpState::None as u32 | 1 << TcpState::Close as u32;
        (GONE >> (self as u32 & 0xf)) & 1 != 0
    }

    /// True for states an endpoint enters by sending its FIN: it sends
    /// nothing new after that. (A bit test, not a branch per state: the BPF
    /// verifier walks each branch.)
    #[inline(always)]
    pub const fn has_sent_fin(self) -> bool {
        const SENT: u32 = 1 << TcpState::FinWait1 as u32
            | 1 << TcpState::FinWait2 as u32
            | 1 << TcpState::Closing as u32
            | 1 << TcpState::TimeWait as u32
            | 1 << TcpState::LastAck as u32;
        (SENT >> (self as u32 & 0xf)) & 1 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip_and_names_parse_back() {
        for bits in 0..16u8 {
            let s = TcpState::from_bits(bits);
            assert_eq!(s as u8, bits);
            assert_eq!(TcpState::from_bits(bits | 0xf0), s, "high bits ignored");
            if (1..=11).contains(&bits) {
                assert_eq!(TcpState::parse(s.name()), Some(s));
            }
        }
        assert_eq!(TcpState::REPORTED.len(), 11);
    }

    #[test]
    fn ss_names_parse() {
        assert_eq!(TcpState::parse("ESTAB"), Some(TcpState::Established));
        assert_eq!(TcpState::parse("FIN-WAIT-2"), Some(TcpState::FinWait2));
        assert_eq!(TcpState::parse("UNCONN"), Some(TcpState::Close));
        assert_eq!(TcpState::parse("bogus"), None);
    }
}
