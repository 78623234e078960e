//! How long local endpoints spent in a state when they left it, and how
//! long their handshakes took: one histogram table per namespace, added to
//! by the probe at each state change (never on the fast path) and read by
//! the agent.
//!
//! Durations are counted in the unit of [`FlowEntry::changed`] (2^16 ns,
//! 65.5 µs), from the entry's stamp to the change. Buckets double: bucket
//! `b` holds durations of at most `2^b` units (bucket 0: up to 65.5 µs,
//! bucket 14: about 1.07 s, bucket 30: about 19.5 h), and the last one
//! holds the rest.
//!
//! [`FlowEntry::changed`]: crate::FlowEntry::changed

use crate::{Word, flow::Side, state::TcpState};

/// Buckets per row.
pub const BUCKETS: usize = 32;

/// Rows: one per state (indexed by the state's number: time spent in it),
/// and two for the transitions people ask about.
pub const ROWS: usize = 16;

/// SYN_SENT to ESTABLISHED: a connect, from the first SYN out to the
/// SYN-ACK in (retransmissions included).
pub const CONNECT: usize = TcpState::NewSynRecv as usize;

/// SYN_RECV to ESTABLISHED: a handshake this host answered, from its first
/// SYN-ACK to the kernel's completing it.
pub const HANDSHAKE: usize = TcpState::BoundInactive as usize;

/// One histogram: counts per bucket and the sum, in stamp units.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Histogram {
    pub buckets: [u64; BUCKETS],
    pub sum: u64,
}

const _: () = assert!(core::mem::size_of::<Histogram>() == 264);

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: [0; BUCKETS],
            sum: 0,
        }
    }
}

/// A namespace's table: [`ROWS`] histograms.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Durations {
    pub rows: [Histogram; ROWS],
}

const _: () = assert!(core::mem::size_of::<Durations>() == 4224);

/// The bucket of a duration of `units` (2^16 ns each): the smallest `b`
/// with `units <= 2^b`, the last bucket past that.
#[inline(always)]
pub const fn bucket(units: u32) -> usize {
    let b = 32 - units.saturating_sub(1).leading_zeros() as usize;
    if b >= BUCKETS { BUCKETS - 1 } else { b }
}

/// The upper bound of bucket `b` in seconds (`f64::INFINITY` for the last).
pub fn upper_bound_seconds(b: usize) -> f64 {
    if b >= BUCKETS - 1 {
        f64::INFINITY
    } else {
        ((1u64 << b) << 16) as f64 / 1e9
    }
}

/// A stamp-unit count in seconds.
pub fn units_seconds(units: u64) -> f64 {
    (units << 16) as f64 / 1e9
}

/// The rows that a change from `old` to `new` adds to, for each side: the
/// state a local endpoint left, and [`CONNECT`] or [`HANDSHAKE`] when that
/// was a handshake completing. 0 (the `None` row, never a state left) where
/// nothing is added.
#[inline(always)]
pub const fn rows_left(old: Word, new: Word, side: Side) -> (usize, usize) {
    let (o, n) = (old.counted(side), new.counted(side));
    if o as u8 == n as u8 || o as u8 == TcpState::None as u8 {
        return (0, 0);
    }
    let also = if n as u8 == TcpState::Established as u8 {
        if o as u8 == TcpState::SynSent as u8 {
            CONNECT
        } else if o as u8 == TcpState::SynRecv as u8 {
            HANDSHAKE
        } else {
            0
        }
    } else {
        0
    };
    (o as usize & (ROWS - 1), also)
}

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, only u64 fields (no padding; sizes asserted above).
unsafe impl aya::Pod for Durations {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_double_from_one_unit() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(2), 1);
        assert_eq!(bucket(3), 2);
        assert_eq!(bucket(4), 2);
        assert_eq!(bucket(5), 3);
        // One second is 15259 units: just above 2^13, so bucket 14 (1.07 s).
        let second = (1_000_000_000u64 >> 16) as u32;
        assert_eq!(bucket(second), 14);
        assert!(upper_bound_seconds(14) > 1.0 && upper_bound_seconds(13) < 1.0);
        assert_eq!(bucket(u32::MAX), BUCKETS - 1);
        assert_eq!(bucket(1 << 30), 30);
        assert_eq!(bucket((1 << 30) + 1), 31);
        assert!(upper_bound_seconds(31).is_infinite());
        for b in 0..BUCKETS - 1 {
            let top = 1u32 << b;
            assert_eq!(bucket(top), b, "2^{b} units is bucket {b}'s top");
            assert_eq!(bucket(top + 1), b + 1);
        }
    }

    #[test]
    fn rows_name_the_state_left_and_the_handshakes() {
        let local_a = |s: TcpState| Word::EMPTY.with_state(Side::A, s).with_local(Side::A);
        let est = local_a(TcpState::Established);
        assert_eq!(
            rows_left(local_a(TcpState::SynSent), est, Side::A),
            (TcpState::SynSent as usize, CONNECT)
        );
        assert_eq!(
            rows_left(local_a(TcpState::SynRecv), est, Side::A),
            (TcpState::SynRecv as usize, HANDSHAKE)
        );
        assert_eq!(
            rows_left(est, local_a(TcpState::CloseWait), Side::A),
            (TcpState::Established as usize, 0)
        );
        // Entering a state leaves none; a remote endpoint is not counted.
        assert_eq!(rows_left(Word::EMPTY, est, Side::A), (0, 0));
        let remote = Word::EMPTY.with_state(Side::B, TcpState::SynSent);
        let remote_est = Word::EMPTY.with_state(Side::B, TcpState::Established);
        assert_eq!(rows_left(remote, remote_est, Side::B), (0, 0));
        assert_eq!(rows_left(est, est, Side::A), (0, 0));
    }
}
