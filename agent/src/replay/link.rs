//! Link-layer headers in front of the shared parser
//! (`tcpstate_common::parse`): the parts of a capture the probe never sees.
//! Ethernet goes to the parser whole (it reads VLAN tags itself); Linux
//! cooked captures (`tcpdump -i any`: SLL, and SLL2 since libpcap 1.10),
//! raw IP and BSD loopback give the parser their EtherType and where the IP
//! header starts.

use pcap_parser::Linktype;
use tcpstate_common::parse::{ETH_P_IP, ETH_P_IPV6, Headers, ParseError, Parsed, network, parse};

/// OpenBSD's DLT_RAW (libpcap maps 12 or 14 to LINKTYPE_RAW by platform).
const RAW_12: i32 = 12;
const RAW_14: i32 = 14;

/// What a frame held.
pub enum Link {
    Parsed(Result<Parsed, ParseError>),
    /// A link type the replay does not read.
    Unsupported,
}

/// Parses `data`, a frame of link type `link`.
pub fn parse_frame<H: Headers>(link: Linktype, data: &[u8], out: &mut H) -> Link {
    let parsed = match link {
        Linktype::ETHERNET => parse(data, out),
        // Linux cooked v1: 16-byte header, the protocol (an EtherType) last.
        Linktype::LINUX_SLL => match data.get(14..16) {
            Some(p) => network(data, u16::from_be_bytes([p[0], p[1]]), 16, out),
            None => Err(ParseError::Malformed),
        },
        // Linux cooked v2: 20-byte header, the protocol first.
        Linktype::LINUX_SLL2 => match data.get(0..2) {
            Some(p) if data.len() >= 20 => network(data, u16::from_be_bytes([p[0], p[1]]), 20, out),
            _ => Err(ParseError::Malformed),
        },
        Linktype::RAW | Linktype::IPV4 | Linktype::IPV6 => raw_ip(data, out),
        Linktype(RAW_12) | Linktype(RAW_14) => raw_ip(data, out),
        // BSD loopback: a 4-byte address family in the capturing host's
        // byte order (NULL) or big-endian (LOOP).
        Linktype::NULL | Linktype::LOOP => match data.get(0..4) {
            Some(f) => {
                let family = if link == Linktype::LOOP || (f[0] == 0 && f[1] == 0) {
                    u32::from_be_bytes([f[0], f[1], f[2], f[3]])
                } else {
                    u32::from_le_bytes([f[0], f[1], f[2], f[3]])
                };
                match family {
                    2 => network(data, ETH_P_IP, 4, out),
                    // AF_INET6 on the BSDs, macOS and Linux.
                    10 | 24 | 28 | 30 => network(data, ETH_P_IPV6, 4, out),
                    _ => Ok(Parsed::NotTcp),
                }
            }
            None => Err(ParseError::Malformed),
        },
        _ => return Link::Unsupported,
    };
    Link::Parsed(parsed)
}

/// Where the network layer of a frame of link type `link` starts, and its
/// EtherType (for a link type that is not Ethernet, and a frame long
/// enough): what the kernel engine puts behind an Ethernet header of its own.
pub fn network_start(link: Linktype, data: &[u8]) -> Option<(u16, usize)> {
    let version = || match data.first().map(|b| b >> 4) {
        Some(4) => Some((ETH_P_IP, 0)),
        Some(6) => Some((ETH_P_IPV6, 0)),
        _ => None,
    };
    match link {
        Linktype::LINUX_SLL => data
            .get(14..16)
            .map(|p| (u16::from_be_bytes([p[0], p[1]]), 16)),
        Linktype::LINUX_SLL2 if data.len() >= 20 => {
            Some((u16::from_be_bytes([data[0], data[1]]), 20))
        }
        Linktype::RAW | Linktype::IPV4 | Linktype::IPV6 => version(),
        Linktype(RAW_12) | Linktype(RAW_14) => version(),
        Linktype::NULL | Linktype::LOOP => match data.get(4).map(|b| b >> 4) {
            Some(4) => Some((ETH_P_IP, 4)),
            Some(6) => Some((ETH_P_IPV6, 4)),
            _ => None,
        },
        _ => None,
    }
}

/// Raw IP: the version nibble says which.
fn raw_ip<H: Headers>(data: &[u8], out: &mut H) -> Result<Parsed, ParseError> {
    match data.first().map(|b| b >> 4) {
        Some(4) => network(data, ETH_P_IP, 0, out),
        Some(6) => network(data, ETH_P_IPV6, 0, out),
        _ => Err(ParseError::Malformed),
    }
}
