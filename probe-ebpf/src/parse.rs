//! The probe's side of the shared parser (`tcpstate_common::parse`, which
//! `tcpstate replay` runs over captured frames): the kernel's packet as a
//! [`Frame`], the per-CPU [`Packet`] as where the headers go.

pub use tcpstate_common::parse::{ParseError, Parsed, parse};
use tcpstate_common::{
    Segment,
    machine::IcmpEffect,
    parse::{Frame, Headers},
};

/// A parsed TCP segment. Lives in a per-CPU scratch slot, not on the
/// 512-byte BPF stack.
#[repr(C)]
pub struct Packet {
    /// The namespace slot of the interface it was seen on, written by the
    /// namespace's entry program before anything else (first: the entry
    /// program writes this offset). Parsing leaves it.
    pub netns: u32,
    /// IPv6 addresses; for IPv4 only the first word is used.
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// 4 or 6.
    pub family: u32,
    pub sport: u16,
    pub dport: u16,
    pub seg: Segment,
    /// For an ICMP error: its [`IcmpEffect`] on the quoted segment's sender.
    pub icmp: u32,
    /// What the slow path is to do with it: [`Packet::SEGMENT`] or
    /// [`Packet::ICMP_ERROR`].
    pub kind: u16,
    /// The slow path's attempts so far for this segment.
    pub attempt: u16,
    /// Where the segment also belongs: the receiving socket's own view of
    /// it, when both sockets are this host's and a local NAT gives them
    /// different tuples (`nat::note_receiver`). `other_family` 0: nowhere.
    pub other_src: [u32; 4],
    pub other_dst: [u32; 4],
    pub other_family: u32,
    pub other_sport: u16,
    pub other_dport: u16,
    /// What the slow path changed, noted after it (`counts::account`).
    pub change: crate::counts::Change,
}

impl Packet {
    pub const SEGMENT: u16 = 0;
    pub const ICMP_ERROR: u16 = 1;

    /// Turns the segment into its receiver's pass, if it has one.
    #[inline(always)]
    pub fn take_receiver(&mut self) -> bool {
        if self.other_family == 0 {
            return false;
        }
        self.src = self.other_src;
        self.dst = self.other_dst;
        self.sport = self.other_sport;
        self.dport = self.other_dport;
        self.family = self.other_family;
        self.other_family = 0;
        self.seg.meta = (self.seg.meta & Segment::KERNEL_EVENTS) | Segment::FOR_RECEIVER;
        true
    }
}

/// The packet between the context's `data` and `data_end`.
pub struct Buffer {
    pub start: usize,
    pub end: usize,
}

impl Frame for Buffer {
    /// The check against the end is the one the verifier reads; the shared
    /// parser bounds `off` first.
    #[inline(always)]
    fn bytes<const N: usize>(&self, off: usize) -> Option<&[u8; N]> {
        if self.start + off + N > self.end {
            return None;
        }
        // SAFETY: the range was checked against the frame's end just above.
        Some(unsafe { &*((self.start + off) as *const [u8; N]) })
    }
}

impl Headers for Packet {
    #[inline(always)]
    fn v4(&mut self, src: u32, dst: u32) {
        self.family = 4;
        self.src[0] = src;
        self.dst[0] = dst;
    }

    #[inline(always)]
    fn v6(&mut self, src: [u32; 4], dst: [u32; 4]) {
        self.family = 6;
        self.src = src;
        self.dst = dst;
    }

    #[inline(always)]
    fn tcp(&mut self, sport: u16, dport: u16, seg: Segment) {
        self.sport = sport;
        self.dport = dport;
        self.seg = seg;
    }

    #[inline(always)]
    fn icmp(&mut self, effect: IcmpEffect) {
        self.icmp = effect as u32;
    }
}
