//! The flow map's key and value.
//!
//! One entry per connection: the key orders the two endpoints canonically so
//! that both directions of a connection meet in the same entry. Endpoint `A` is
//! the one with the lower (address, port); `B` the other.

use crate::state::TcpState;

/// Which endpoint of a flow entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    A = 0,
    B = 1,
}

impl Side {
    pub const fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
    /// 0 or 1. Masked so that the BPF verifier can bound an index it
    /// reloads from the stack.
    #[inline(always)]
    pub const fn index(self) -> usize {
        (self as usize) & 1
    }
}

/// Flow map key for IPv6 connections. Addresses are in network byte order as
/// they appear on the wire; ports are in host byte order. IPv4 connections
/// have a map of their own with the shorter [`FlowKey4`]: hashing and
/// comparing 12 bytes instead of 36 is a measurable part of the per-packet cost.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey6 {
    pub addr_a: [u32; 4],
    pub addr_b: [u32; 4],
    pub port_a: u16,
    pub port_b: u16,
    /// The namespace's slot ([`crate::netns`]): the same tuple open in two
    /// namespaces is two connections.
    pub netns: u32,
}

const _: () = assert!(core::mem::size_of::<FlowKey6>() == 40);
const _: () = assert!(core::mem::align_of::<FlowKey6>() == 4);

/// Flow map key for IPv4 connections (same conventions as [`FlowKey6`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey4 {
    pub addr_a: u32,
    pub addr_b: u32,
    pub port_a: u16,
    pub port_b: u16,
    /// The namespace's slot, as in [`FlowKey6`].
    pub netns: u32,
}

const _: () = assert!(core::mem::size_of::<FlowKey4>() == 16);

impl FlowKey6 {
    /// The canonical key for a segment from `src` to `dst` in namespace
    /// slot `netns`, and the sender's side.
    #[inline(always)]
    pub fn new(
        netns: u32,
        src: [u32; 4],
        sport: u16,
        dst: [u32; 4],
        dport: u16,
    ) -> (FlowKey6, Side) {
        let mut src_first = sport <= dport;
        let mut i = 4;
        while i > 0 {
            i -= 1;
            if src[i] != dst[i] {
                src_first = src[i] < dst[i];
            }
        }
        let (a, pa, b, pb, side) = if src_first {
            (src, sport, dst, dport, Side::A)
        } else {
            (dst, dport, src, sport, Side::B)
        };
        (
            FlowKey6 {
                addr_a: a,
                addr_b: b,
                port_a: pa,
                port_b: pb,
                netns,
            },
            side,
        )
    }

    /// The inverse of [`FlowKey6::new`]: (src, sport, dst, dport) of a
    /// segment `sender` sends.
    #[inline(always)]
    pub fn sent_by(&self, sender: Side) -> ([u32; 4], u16, [u32; 4], u16) {
        match sender {
            Side::A => (self.addr_a, self.port_a, self.addr_b, self.port_b),
            Side::B => (self.addr_b, self.port_b, self.addr_a, self.port_a),
        }
    }
}

impl FlowKey4 {
    /// The canonical key for a segment from `src` to `dst` in namespace
    /// slot `netns`, and the sender's side.
    #[inline(always)]
    pub fn new(netns: u32, src: u32, sport: u16, dst: u32, dport: u16) -> (FlowKey4, Side) {
        if src < dst || (src == dst && sport <= dport) {
            (
                FlowKey4 {
                    addr_a: src,
                    addr_b: dst,
                    port_a: sport,
                    port_b: dport,
                    netns,
                },
                Side::A,
            )
        } else {
            (
                FlowKey4 {
                    addr_a: dst,
                    addr_b: src,
                    port_a: dport,
                    port_b: sport,
                    netns,
                },
                Side::B,
            )
        }
    }

    /// The inverse of [`FlowKey4::new`]: (src, sport, dst, dport) of a
    /// segment `sender` sends.
    #[inline(always)]
    pub fn sent_by(&self, sender: Side) -> (u32, u16, u32, u16) {
        match sender {
            Side::A => (self.addr_a, self.port_a, self.addr_b, self.port_b),
            Side::B => (self.addr_b, self.port_b, self.addr_a, self.port_a),
        }
    }
}

/// Sequence facts about one endpoint, written only from segments that this
/// endpoint sends (so the two halves of an entry have one writer each).
/// Whether each field is known yet is kept in the state word
/// ([`Word::facts`]), and the sequence number of the
/// endpoint's FIN is `snd_nxt - 1` once it has sent one (the FIN is the last
/// thing an endpoint sends), so an endpoint needs 8 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndSeq {
    /// One past the highest sequence number this endpoint has sent; after
    /// its FIN, one past the FIN.
    pub snd_nxt: u32,
    /// The last acknowledgement number this endpoint sent.
    pub ack: u32,
}

const _: () = assert!(core::mem::size_of::<EndSeq>() == 8);

/// Flow map value: 24 bytes, so that an IPv6 flow costs the kernel 128 bytes
/// (element header 48 + key 40 + value 24 + bucket 16) and an IPv4 flow 104.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEntry {
    /// The state word ([`Word`]); changed only by compare-and-swap, so every
    /// change is applied exactly once to the in-kernel counters.
    pub word: u32,
    /// When the state last changed (or a timer was re-armed): CLOCK_MONOTONIC
    /// in units of 2^16 ns (65.5 µs), wrapping every 78 hours. See
    /// [`FlowEntry::stamp`] and [`FlowEntry::changed_ns`].
    pub changed: u32,
    /// Per-endpoint sequence facts, indexed by [`Side`].
    pub ends: [EndSeq; 2],
}

const _: () = assert!(core::mem::size_of::<FlowEntry>() == 24);

impl FlowEntry {
    /// Bits of a CLOCK_MONOTONIC nanosecond value below [`FlowEntry::changed`]'s unit.
    const STAMP_SHIFT: u32 = 16;

    /// The `changed` field for CLOCK_MONOTONIC time `ns`.
    #[inline(always)]
    pub const fn stamp(ns: u64) -> u32 {
        (ns >> Self::STAMP_SHIFT) as u32
    }

    /// When the entry last changed, in CLOCK_MONOTONIC nanoseconds, read at
    /// `now_ns` (which must not be more than 78 hours later): the middle of
    /// the stamped unit, so the error is at most ±33 µs.
    pub const fn changed_ns(&self, now_ns: u64) -> u64 {
        let age = Self::stamp(now_ns).wrapping_sub(self.changed) as u64;
        let unit = (now_ns >> Self::STAMP_SHIFT).saturating_sub(age);
        (unit << Self::STAMP_SHIFT) + (1 << (Self::STAMP_SHIFT - 1))
    }
}

/// The packed state word of a flow entry:
/// bits 0-3 state of A, 4-7 state of B, 8 A is local, 9 B is local,
/// 10 dead (no local socket left; the entry counts nothing and may be reused),
/// 11 reaping (being deleted by the agent; the data path leaves it alone),
/// 12-13 A's/B's `snd_nxt` is known, 14-15 A's/B's `ack` is known,
/// 16-17 A's/B's FIN has been seen (its `snd_nxt` is one past it),
/// 18-19 the agent has been asked about A's/B's socket and not yet answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Word(pub u32);

impl Word {
    pub const EMPTY: Word = Word(0);
    const LOCAL_A: u32 = 1 << 8;
    pub(crate) const DEAD: u32 = 1 << 10;
    pub(crate) const REAPING: u32 = 1 << 11;
    const SEEN_A: u32 = 1 << 12;
    const ACKED_A: u32 = 1 << 14;
    const FIN_A: u32 = 1 << 16;
    /// Both endpoints' FIN bits.
    pub(crate) const FINS: u32 = 3 << 16;
    const ASKED_A: u32 = 1 << 18;
    /// `snd_nxt` and `ack` of both endpoints known (what the fast path needs).
    pub const ALL_FACTS: u32 = 0xf << 12;
    /// An endpoint's `snd_nxt` is known ([`Word::facts`]).
    pub const SEEN: u32 = 1;
    /// An endpoint's `ack` is known ([`Word::facts`]).
    pub const ACKED: u32 = 2;
    /// An endpoint's FIN has been seen: its `snd_nxt` is one past the FIN
    /// and nothing it sends later moves it ([`Word::facts`]).
    pub const FIN: u32 = 4;

    #[inline(always)]
    pub const fn state(self, side: Side) -> TcpState {
        TcpState::from_bits(((self.0 >> (4 * side as u32)) & 0xf) as u8)
    }
    #[inline(always)]
    pub const fn with_state(self, side: Side, s: TcpState) -> Word {
        let shift = 4 * side as u32;
        Word((self.0 & !(0xf << shift)) | ((s as u32) << shift))
    }
    #[inline(always)]
    pub const fn is_local(self, side: Side) -> bool {
        self.0 & (Self::LOCAL_A << side as u32) != 0
    }
    #[inline(always)]
    pub const fn with_local(self, side: Side) -> Word {
        Word(self.0 | (Self::LOCAL_A << side as u32))
    }
    /// Marks the sender and/or receiver local, without a branch (the BPF
    /// verifier walks every branch of the state machine once per way in).
    #[inline(always)]
    pub const fn with_locality(self, sender: Side, local: crate::machine::Locality) -> Word {
        let s = (local.sender as u32) << (8 + sender as u32);
        let r = (local.receiver as u32) << (8 + sender.other() as u32);
        Word(self.0 | s | r)
    }
    /// Which of `side`'s facts are known: [`Word::SEEN`], [`Word::ACKED`],
    /// [`Word::FIN`].
    #[inline(always)]
    pub const fn facts(self, side: Side) -> u32 {
        let s = side as u32;
        ((self.0 >> (12 + s)) & Self::SEEN)
            | ((self.0 >> (13 + s)) & Self::ACKED)
            | ((self.0 >> (14 + s)) & Self::FIN)
    }
    /// Records which of `side`'s facts are known (replacing what was recorded).
    #[inline(always)]
    pub const fn with_facts(self, side: Side, known: u32) -> Word {
        let s = side as u32;
        let bits = (Self::SEEN_A | Self::ACKED_A | Self::FIN_A) << s;
        let set = ((known & Self::SEEN) << (12 + s))
            | ((known & Self::ACKED) << (13 + s))
            | ((known & Self::FIN) << (14 + s));
        Word((self.0 & !bits) | set)
    }
    /// The agent has been asked about `side`'s socket and has not answered
    /// yet: the probe does not ask again.
    #[inline(always)]
    pub const fn is_asked(self, side: Side) -> bool {
        self.0 & (Self::ASKED_A << side as u32) != 0
    }
    #[inline(always)]
    pub const fn with_asked(self, side: Side, asked: bool) -> Word {
        let bit = Self::ASKED_A << side as u32;
        if asked {
            Word(self.0 | bit)
        } else {
            Word(self.0 & !bit)
        }
    }
    #[inline(always)]
    pub const fn is_dead(self) -> bool {
        self.0 & Self::DEAD != 0
    }
    #[inline(always)]
    pub const fn is_reaping(self) -> bool {
        self.0 & Self::REAPING != 0
    }
    /// The word that marks an entry the agent is deleting.
    #[inline(always)]
    pub const fn reaping(self) -> Word {
        Word(self.0 | Self::REAPING)
    }

    /// The state each endpoint contributes to the per-state counters: the
    /// endpoint's state if it is local and the entry is live, else `None`.
    #[inline(always)]
    pub const fn counted(self, side: Side) -> TcpState {
        if self.0 & (Self::DEAD | Self::REAPING) != 0 || !self.is_local(side) {
            return TcpState::None;
        }
        match self.state(side) {
            TcpState::Close => TcpState::None,
            s => s,
        }
    }

    /// Whether a change to `new` changes what the entry counts (a local
    /// endpoint's state, or the entry's life): what its `changed` stamp
    /// dates. A remote endpoint's own moves do not, so a local endpoint's
    /// age and its timers run from its own last change.
    #[inline(always)]
    ///
    /// One comparison of masked bits (each branch is a path more for the
    /// BPF verifier): the state nibbles of the endpoints local before or
    /// after, and the local, dead and reaping marks.
    pub const fn restamps(self, new: Word) -> bool {
        const fn local_states(w: u32) -> u32 {
            (((w >> 8) & 1) * 0xf) | (((w >> 9) & 1) * 0xf0)
        }
        let watched = local_states(self.0)
            | local_states(new.0)
            | Self::LOCAL_A
            | Self::LOCAL_A << 1
            | Self::DEAD
            | Self::REAPING;
        (self.0 ^ new.0) & watched != 0
    }

    /// Marks the word dead when no local endpoint holds a socket any more
    /// (or, for a flow with no local endpoint, when neither side does).
    #[inline(always)]
    pub const fn settle(self) -> Word {
        let a_gone = self.state(Side::A).is_gone();
        let b_gone = self.state(Side::B).is_gone();
        let a_local = self.is_local(Side::A);
        let b_local = self.is_local(Side::B);
        let dead = if a_local || b_local {
            (a_gone || !a_local) && (b_gone || !b_local)
        } else {
            a_gone && b_gone
        };
        if dead {
            Word(self.0 | Self::DEAD)
        } else {
            self
        }
    }
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` data without padding (sizes asserted above).
    unsafe impl aya::Pod for super::FlowKey4 {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::FlowEntry {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_by_gives_back_the_segment_a_key_was_made_of() {
        for (src, sport, dst, dport) in [(1, 80, 2, 5000), (2, 5000, 1, 80), (7, 9, 7, 3)] {
            let (k, side) = FlowKey4::new(0, src, sport, dst, dport);
            assert_eq!(k.sent_by(side), (src, sport, dst, dport));
            assert_eq!(k.sent_by(side.other()), (dst, dport, src, sport));
            let (a, b) = ([0, 0, 0, src], [0, 0, 0, dst]);
            let (k, side) = FlowKey6::new(0, a, sport, b, dport);
            assert_eq!(k.sent_by(side), (a, sport, b, dport));
        }
    }

    #[test]
    fn both_directions_share_one_key() {
        let x = [0, 0, 0, 0x0a00_0001u32.to_be()];
        let y = [0, 0, 0, 0x0a00_0002u32.to_be()];
        let (k1, s1) = FlowKey6::new(0, x, 40000, y, 80);
        let (k2, s2) = FlowKey6::new(0, y, 80, x, 40000);
        assert_eq!(k1, k2);
        assert_ne!(s1, s2);
        // Same address (loopback): the port decides.
        let (k3, s3) = FlowKey6::new(0, x, 80, x, 40000);
        let (k4, s4) = FlowKey6::new(0, x, 40000, x, 80);
        assert_eq!(k3, k4);
        assert_eq!((s3, s4), (Side::A, Side::B));
        // The first differing word decides, whatever the later ones say.
        let hi = [1, 0, 0, 0];
        let lo = [0, 9, 9, 9];
        assert_eq!(FlowKey6::new(0, lo, 9, hi, 1).1, Side::A);
        assert_eq!(FlowKey6::new(0, hi, 1, lo, 9).1, Side::B);

        let (a, b) = (0x0a00_0001u32.to_be(), 0x0a00_0002u32.to_be());
        let (k5, s5) = FlowKey4::new(0, a, 40000, b, 80);
        let (k6, s6) = FlowKey4::new(0, b, 80, a, 40000);
        assert_eq!(k5, k6);
        assert_ne!(s5, s6);
        assert_eq!(
            FlowKey4::new(0, a, 80, a, 40000).0,
            FlowKey4::new(0, a, 40000, a, 80).0
        );
    }

    #[test]
    fn word_fields_are_independent() {
        let w = Word::EMPTY
            .with_state(Side::A, TcpState::Established)
            .with_state(Side::B, TcpState::TimeWait)
            .with_local(Side::B);
        assert_eq!(w.state(Side::A), TcpState::Established);
        assert_eq!(w.state(Side::B), TcpState::TimeWait);
        assert!(!w.is_local(Side::A) && w.is_local(Side::B));
        assert_eq!(w.counted(Side::A), TcpState::None);
        assert_eq!(w.counted(Side::B), TcpState::TimeWait);
        assert_eq!(w.reaping().counted(Side::B), TcpState::None);
    }

    #[test]
    fn facts_bits_are_per_side_and_replaced_not_accumulated() {
        let w = Word::EMPTY
            .with_state(Side::A, TcpState::Established)
            .with_facts(Side::A, Word::SEEN)
            .with_facts(Side::B, Word::ACKED);
        assert_eq!(w.facts(Side::A), Word::SEEN);
        assert_eq!(w.facts(Side::B), Word::ACKED);
        assert_eq!(w.state(Side::A), TcpState::Established);
        let w = w.with_facts(Side::A, Word::ACKED);
        assert_eq!(w.facts(Side::A), Word::ACKED);
        let both = Word::SEEN | Word::ACKED;
        let all = w.with_facts(Side::A, both).with_facts(Side::B, both);
        assert_eq!(all.0 & Word::ALL_FACTS, Word::ALL_FACTS);
    }

    #[test]
    fn stamps_read_back_within_half_a_unit_across_the_wrap() {
        let unit = 1u64 << 16;
        for changed in [0, 12_345_678_901, (1u64 << 48) - 5, 5 * (1 << 48) + 777] {
            let e = FlowEntry {
                changed: FlowEntry::stamp(changed),
                ..FlowEntry::default()
            };
            // Read back up to 78 hours later, across the 32-bit wrap.
            for later in [0, 1, 60_000_000_000, (1u64 << 48) - 2 * unit] {
                let got = e.changed_ns(changed + later);
                assert!(
                    got.abs_diff(changed) <= unit / 2,
                    "{changed} +{later}: {got}"
                );
            }
        }
    }

    #[test]
    fn settle_marks_dead_only_without_local_sockets() {
        let w = Word::EMPTY
            .with_local(Side::A)
            .with_state(Side::A, TcpState::Close)
            .with_state(Side::B, TcpState::TimeWait);
        assert!(
            w.settle().is_dead(),
            "remote TIME_WAIT alone keeps nothing local"
        );
        let w = w.with_local(Side::B);
        assert!(!w.settle().is_dead(), "local TIME_WAIT is a socket");
        let remote_only = Word::EMPTY.with_state(Side::A, TcpState::Established);
        assert!(!remote_only.settle().is_dead());
    }
}
