//! Header parsing, shared by the probe (over the kernel's packet buffer)
//! and the host (over a captured frame): Ethernet, up to two 802.1Q/802.1ad
//! tags, IPv4 (options included), IPv6 (a bounded chain of extension
//! headers), TCP; and ICMP/ICMPv6 errors that quote a TCP segment.
//!
//! Every read goes through [`Frame::bytes`] with an offset first checked
//! against [`MAX_OFFSET`]: the verifier needs both bounds in the probe, and
//! on the host they make a malformed frame an error, never a panic.

use crate::machine::{IcmpEffect, Segment};

/// Most IPv6 extension headers followed before giving up.
pub const MAX_IPV6_EXT: usize = 6;
/// Largest header offset the parser accepts; keeps offsets provably bounded.
pub const MAX_OFFSET: usize = 2048;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// Where the bytes come from: the kernel's packet (bounds checked against
/// its end) or a captured frame.
pub trait Frame {
    /// Bytes `[off, off + N)`, if they are inside the frame.
    fn bytes<const N: usize>(&self, off: usize) -> Option<&[u8; N]>;
}

impl Frame for [u8] {
    #[inline(always)]
    fn bytes<const N: usize>(&self, off: usize) -> Option<&[u8; N]> {
        self.get(off..off.checked_add(N)?)?.try_into().ok()
    }
}

/// Where the parsed fields go (the probe's per-CPU scratch, or a host
/// struct). Addresses are words exactly as they lie in the frame (network
/// byte order).
pub trait Headers {
    fn v4(&mut self, src: u32, dst: u32);
    fn v6(&mut self, src: [u32; 4], dst: [u32; 4]);
    /// The TCP segment (for an ICMP error: the quoted one, its sequence
    /// number only).
    fn tcp(&mut self, sport: u16, dport: u16, seg: Segment);
    /// The segment is quoted by an ICMP error with this effect.
    fn icmp(&mut self, _effect: IcmpEffect) {}
    /// The IP packet's length by its header (what Zeek counts as IP bytes).
    fn ip_len(&mut self, _len: u32) {}
}

pub enum Parsed {
    /// A TCP segment, written into the caller's [`Headers`].
    Tcp,
    NotTcp,
    /// A non-first IP fragment: no TCP header to read.
    Fragment,
    /// An ICMP error about a TCP segment: the caller's [`Headers`] hold the
    /// quoted segment (its addresses, ports and sequence number) and the
    /// error's effect.
    IcmpError,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    Malformed,
    Ipv6ExtTooDeep,
}

#[inline(always)]
fn bytes<const N: usize, F: Frame + ?Sized>(f: &F, off: usize) -> Result<&[u8; N], ParseError> {
    if off > MAX_OFFSET {
        return Err(ParseError::Malformed);
    }
    f.bytes::<N>(off).ok_or(ParseError::Malformed)
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

#[inline(always)]
fn addr6(ip: &[u8; 40], at: usize) -> [u32; 4] {
    [
        raw32(ip, at),
        raw32(ip, at + 4),
        raw32(ip, at + 8),
        raw32(ip, at + 12),
    ]
}

/// A frame that begins with an Ethernet header.
#[inline(always)]
pub fn parse<F: Frame + ?Sized, H: Headers>(f: &F, out: &mut H) -> Result<Parsed, ParseError> {
    let eth = bytes::<14, F>(f, 0)?;
    network(f, be16(eth, 12), 14, out)
}

/// What follows a link-layer header that ends at `off` and names its
/// payload `proto` (an EtherType): VLAN tags, then IPv4 or IPv6.
#[inline(always)]
pub fn network<F: Frame + ?Sized, H: Headers>(
    f: &F,
    proto: u16,
    off: usize,
    out: &mut H,
) -> Result<Parsed, ParseError> {
    let (mut proto, mut off) = (proto, off);
    for _ in 0..2 {
        if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
            let tag = bytes::<4, F>(f, off)?;
            proto = be16(tag, 2);
            off += 4;
        }
    }
    match proto {
        ETH_P_IP => ipv4(f, off, out),
        ETH_P_IPV6 => ipv6(f, off, out),
        _ => Ok(Parsed::NotTcp),
    }
}

#[inline(always)]
fn ipv4<F: Frame + ?Sized, H: Headers>(
    f: &F,
    off: usize,
    out: &mut H,
) -> Result<Parsed, ParseError> {
    let ip = bytes::<20, F>(f, off)?;
    let ihl = (ip[0] & 0x0f) as usize * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Err(ParseError::Malformed);
    }
    if be16(ip, 6) & 0x1fff != 0 {
        return Ok(Parsed::Fragment);
    }
    if ip[9] == IPPROTO_ICMP {
        return icmp4(f, off + ihl, out);
    }
    if ip[9] != IPPROTO_TCP {
        return Ok(Parsed::NotTcp);
    }
    let total = be16(ip, 2) as usize;
    if total < ihl {
        return Err(ParseError::Malformed);
    }
    out.v4(raw32(ip, 12), raw32(ip, 16));
    out.ip_len(total as u32);
    tcp(f, off + ihl, total - ihl, out)
}

#[inline(always)]
fn ipv6<F: Frame + ?Sized, H: Headers>(
    f: &F,
    off: usize,
    out: &mut H,
) -> Result<Parsed, ParseError> {
    let ip = bytes::<40, F>(f, off)?;
    // The kernel drops a version other than 6 (ipv6_rcv): so does the parser.
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
            IPPROTO_ICMPV6 => return icmp6(f, l4, out),
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                let h = bytes::<2, F>(f, l4)?;
                next = h[0];
                (h[1] as usize + 1) * 8
            }
            // Authentication header: (len + 2) * 4 bytes.
            51 => {
                let h = bytes::<2, F>(f, l4)?;
                next = h[0];
                (h[1] as usize + 2) * 4
            }
            // Fragment header: only the first fragment carries TCP.
            44 => {
                let h = bytes::<8, F>(f, l4)?;
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
    out.v6(addr6(ip, 8), addr6(ip, 24));
    out.ip_len(payload as u32 + 40);
    tcp(f, l4, payload - ext, out)
}

/// `ip_payload` is the length of the TCP header plus data, from the IP header.
#[inline(always)]
fn tcp<F: Frame + ?Sized, H: Headers>(
    f: &F,
    off: usize,
    ip_payload: usize,
    out: &mut H,
) -> Result<Parsed, ParseError> {
    let th = bytes::<20, F>(f, off)?;
    let doff = (th[12] >> 4) as usize * 4;
    if doff < 20 {
        return Err(ParseError::Malformed);
    }
    let seg = Segment {
        flags: th[13],
        // Set by the caller, which knows where the segment was seen.
        meta: 0,
        seq: be32(th, 4),
        ack: be32(th, 8),
        // Segmentation offload may leave the IP length short of the headers
        // on a super-packet: an underflow reads as no payload.
        len: ip_payload.saturating_sub(doff) as u32,
    };
    out.tcp(be16(th, 0), be16(th, 2), seg);
    Ok(Parsed::Tcp)
}

/// An ICMPv4 error at `off`: type, code, then the quoted IPv4 header and at
/// least the first 8 bytes of TCP (ports and sequence number: all the kernel
/// reads, and all a router must quote).
#[inline(always)]
fn icmp4<F: Frame + ?Sized, H: Headers>(
    f: &F,
    off: usize,
    out: &mut H,
) -> Result<Parsed, ParseError> {
    let icmp = bytes::<8, F>(f, off)?;
    let effect = IcmpEffect::v4(icmp[0], icmp[1]);
    if effect as u32 == IcmpEffect::Nothing as u32 {
        return Ok(Parsed::NotTcp);
    }
    let ip = bytes::<20, F>(f, off + 8)?;
    let ihl = (ip[0] & 0x0f) as usize * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Err(ParseError::Malformed);
    }
    if ip[9] != IPPROTO_TCP || be16(ip, 6) & 0x1fff != 0 {
        return Ok(Parsed::NotTcp);
    }
    let th = bytes::<8, F>(f, off + 8 + ihl)?;
    out.v4(raw32(ip, 12), raw32(ip, 16));
    quoted(th, effect, out)
}

/// An ICMPv6 error at `off`: the quoted IPv6 header must be followed by TCP
/// at once (the kernel also skips extension headers there; quoted segments
/// with them are counted as not TCP).
#[inline(always)]
fn icmp6<F: Frame + ?Sized, H: Headers>(
    f: &F,
    off: usize,
    out: &mut H,
) -> Result<Parsed, ParseError> {
    let icmp = bytes::<8, F>(f, off)?;
    let effect = IcmpEffect::v6(icmp[0], icmp[1]);
    if effect as u32 == IcmpEffect::Nothing as u32 {
        return Ok(Parsed::NotTcp);
    }
    let ip = bytes::<40, F>(f, off + 8)?;
    if ip[0] >> 4 != 6 {
        return Err(ParseError::Malformed);
    }
    if ip[6] != IPPROTO_TCP {
        return Ok(Parsed::NotTcp);
    }
    let th = bytes::<8, F>(f, off + 48)?;
    out.v6(addr6(ip, 8), addr6(ip, 24));
    quoted(th, effect, out)
}

#[inline(always)]
fn quoted<H: Headers>(th: &[u8; 8], effect: IcmpEffect, out: &mut H) -> Result<Parsed, ParseError> {
    let seg = Segment {
        seq: be32(th, 4),
        ..Segment::default()
    };
    out.tcp(be16(th, 0), be16(th, 2), seg);
    out.icmp(effect);
    Ok(Parsed::IcmpError)
}

#[cfg(test)]
mod tests;
