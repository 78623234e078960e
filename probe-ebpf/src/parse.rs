//! Header parsing with the bounds checks the verifier needs: Ethernet, up to
//! two 802.1Q/802.1ad tags, IPv4 (options included), IPv6 (a bounded chain of
//! extension headers), TCP; and ICMP/ICMPv6 errors that quote a TCP segment.

use tcpstate_common::{Segment, machine::IcmpEffect};

/// Most IPv6 extension headers followed before giving up.
const MAX_IPV6_EXT: usize = 6;
/// Largest header offset the parser accepts; keeps offsets provably bounded.
const MAX_OFFSET: usize = 2048;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

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

pub enum Parsed {
    /// A TCP segment, written into the caller's [`Packet`].
    Tcp,
    NotTcp,
    /// A non-first IP fragment: no TCP header to read.
    Fragment,
    /// An ICMP error about a TCP segment: the caller's [`Packet`] holds the
    /// quoted segment (its addresses, ports and sequence number) and the
    /// error's effect.
    IcmpError,
}

pub enum ParseError {
    Malformed,
    Ipv6ExtTooDeep,
}

/// Bytes `[off, off + N)` of the frame, if they are inside it.
#[inline(always)]
fn bytes<const N: usize>(
    start: usize,
    end: usize,
    off: usize,
) -> Result<&'static [u8; N], ParseError> {
    if off > MAX_OFFSET || start + off + N > end {
        return Err(ParseError::Malformed);
    }
    // SAFETY: the range was checked against the frame's end just above.
    Ok(unsafe { &*((start + off) as *const [u8; N]) })
}

#[inline(always)]
fn be16(b: &[u8], i: usize) -> u16 {
    u16::from_be_bytes([b[i], b[i + 1]])
}

#[inline(always)]
fn be32(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// An address word exactly as it lies in the frame (network byte order).
#[inline(always)]
fn raw32(b: &[u8], i: usize) -> u32 {
    u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// A BPF subprogram of its own, so that its locals do not add to the stack of
/// the state-transition path.
#[inline(always)]
pub fn parse(start: usize, end: usize, out: &mut Packet) -> Result<Parsed, ParseError> {
    let eth = bytes::<14>(start, end, 0)?;
    let mut proto = be16(eth, 12);
    let mut off = 14;
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            let tag = bytes::<4>(start, end, off)?;
            proto = be16(tag, 2);
            off += 4;
        }
    }
    match proto {
        ETH_P_IP => ipv4(start, end, off, out),
        ETH_P_IPV6 => ipv6(start, end, off, out),
        _ => Ok(Parsed::NotTcp),
    }
}

#[inline(always)]
fn ipv4(start: usize, end: usize, off: usize, out: &mut Packet) -> Result<Parsed, ParseError> {
    let ip = bytes::<20>(start, end, off)?;
    let ihl = (ip[0] & 0x0f) as usize * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Err(ParseError::Malformed);
    }
    if be16(ip, 6) & 0x1fff != 0 {
        return Ok(Parsed::Fragment);
    }
    if ip[9] == IPPROTO_ICMP {
        return icmp4(start, end, off + ihl, out);
    }
    if ip[9] != IPPROTO_TCP {
        return Ok(Parsed::NotTcp);
    }
    let total = be16(ip, 2) as usize;
    if total < ihl {
        return Err(ParseError::Malformed);
    }
    out.family = 4;
    out.src[0] = raw32(ip, 12);
    out.dst[0] = raw32(ip, 16);
    tcp(start, end, off + ihl, total - ihl, out)
}

#[inline(always)]
fn ipv6(start: usize, end: usize, off: usize, out: &mut Packet) -> Result<Parsed, ParseError> {
    let ip = bytes::<40>(start, end, off)?;
    // The kernel drops a version other than 6 (ipv6_rcv): so does the probe.
    if ip[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    let payload = be16(ip, 4) as usize;
    let mut next = ip[6];
    let mut l4 = off + 40;
    let mut ext = 0usize;
    for _ in 0..MAX_IPV6_EXT {
        let len = match next {
            IPPROTO_TCP => break,
            IPPROTO_ICMPV6 => return icmp6(start, end, l4, out),
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                let h = bytes::<2>(start, end, l4)?;
                next = h[0];
                (h[1] as usize + 1) * 8
            }
            // Authentication header: (len + 2) * 4 bytes.
            51 => {
                let h = bytes::<2>(start, end, l4)?;
                next = h[0];
                (h[1] as usize + 2) * 4
            }
            // Fragment header: only the first fragment carries TCP.
            44 => {
                let h = bytes::<8>(start, end, l4)?;
                if be16(h, 2) & 0xfff8 != 0 {
                    return Ok(Parsed::Fragment);
                }
                next = h[0];
                8
            }
            _ => return Ok(Parsed::NotTcp),
        };
        l4 += len;
        ext += len;
    }
    if next != IPPROTO_TCP {
        return Err(ParseError::Ipv6ExtTooDeep);
    }
    if payload < ext {
        return Err(ParseError::Malformed);
    }
    out.family = 6;
    out.src = [raw32(ip, 8), raw32(ip, 12), raw32(ip, 16), raw32(ip, 20)];
    out.dst = [raw32(ip, 24), raw32(ip, 28), raw32(ip, 32), raw32(ip, 36)];
    tcp(start, end, l4, payload - ext, out)
}

/// `ip_payload` is the length of the TCP header plus data, from the IP header.
#[inline(always)]
fn tcp(
    start: usize,
    end: usize,
    off: usize,
    ip_payload: usize,
    out: &mut Packet,
) -> Result<Parsed, ParseError> {
    let th = bytes::<20>(start, end, off)?;
    let doff = (th[12] >> 4) as usize * 4;
    if doff < 20 {
        return Err(ParseError::Malformed);
    }
    out.sport = be16(th, 0);
    out.dport = be16(th, 2);
    out.seg = Segment {
        flags: th[13],
        // Set by the caller, which knows where the segment was seen.
        meta: 0,
        seq: be32(th, 4),
        ack: be32(th, 8),
        // Segmentation offload may leave the IP length short of the headers
        // on a super-packet: an underflow reads as no payload.
        len: ip_payload.saturating_sub(doff) as u32,
    };
    Ok(Parsed::Tcp)
}

/// An ICMPv4 error at `off`: type, code, then the quoted IPv4 header and at
/// least the first 8 bytes of TCP (ports and sequence number: all the kernel
/// reads, and all a router must quote).
#[inline(always)]
fn icmp4(start: usize, end: usize, off: usize, out: &mut Packet) -> Result<Parsed, ParseError> {
    let icmp = bytes::<8>(start, end, off)?;
    let effect = IcmpEffect::v4(icmp[0], icmp[1]);
    if effect as u32 == IcmpEffect::Nothing as u32 {
        return Ok(Parsed::NotTcp);
    }
    let ip = bytes::<20>(start, end, off + 8)?;
    let ihl = (ip[0] & 0x0f) as usize * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Err(ParseError::Malformed);
    }
    if ip[9] != IPPROTO_TCP || be16(ip, 6) & 0x1fff != 0 {
        return Ok(Parsed::NotTcp);
    }
    let th = bytes::<8>(start, end, off + 8 + ihl)?;
    out.family = 4;
    out.src[0] = raw32(ip, 12);
    out.dst[0] = raw32(ip, 16);
    quoted(th, effect, out)
}

/// An ICMPv6 error at `off`: the quoted IPv6 header must be followed by TCP
/// at once (the kernel also skips extension headers there; quoted segments
/// with them are counted as not TCP).
#[inline(always)]
fn icmp6(start: usize, end: usize, off: usize, out: &mut Packet) -> Result<Parsed, ParseError> {
    let icmp = bytes::<8>(start, end, off)?;
    let effect = IcmpEffect::v6(icmp[0], icmp[1]);
    if effect as u32 == IcmpEffect::Nothing as u32 {
        return Ok(Parsed::NotTcp);
    }
    let ip = bytes::<40>(start, end, off + 8)?;
    if ip[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    if ip[6] != IPPROTO_TCP {
        return Ok(Parsed::NotTcp);
    }
    let th = bytes::<8>(start, end, off + 48)?;
    out.family = 6;
    out.src = [raw32(ip, 8), raw32(ip, 12), raw32(ip, 16), raw32(ip, 20)];
    out.dst = [raw32(ip, 24), raw32(ip, 28), raw32(ip, 32), raw32(ip, 36)];
    quoted(th, effect, out)
}

#[inline(always)]
fn quoted(th: &[u8; 8], effect: IcmpEffect, out: &mut Packet) -> Result<Parsed, ParseError> {
    out.sport = be16(th, 0);
    out.dport = be16(th, 2);
    out.seg = Segment {
        seq: be32(th, 4),
        ..Segment::default()
    };
    out.icmp = effect as u32;
    Ok(Parsed::IcmpError)
}
