//! Frames built byte by byte for the packet tests: Ethernet, optional VLAN
//! tags, IPv4 (optional options) or IPv6 (optional extension headers), TCP.

use std::net::IpAddr;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

#[derive(Clone)]
pub struct Tcp {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub payload: usize,
    /// 802.1Q / 802.1ad tags (outermost first): their TPIDs.
    pub vlans: Vec<u16>,
    /// IPv4 option bytes (padded to 4 by the builder).
    pub ip_options: usize,
    /// IPv6 extension headers before TCP: (next-header code, length in bytes).
    pub ext: Vec<(u8, usize)>,
}

impl Tcp {
    pub fn new(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Tcp {
        Tcp {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport,
            dport,
            seq: 1000,
            ack: 0,
            flags,
            payload: 0,
            vlans: Vec::new(),
            ip_options: 0,
            ext: Vec::new(),
        }
    }

    pub fn seq(mut self, seq: u32, ack: u32) -> Tcp {
        self.seq = seq;
        self.ack = ack;
        self
    }

    pub fn frame(&self) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        for tpid in &self.vlans {
            f.extend(tpid.to_be_bytes());
            f.extend(0x0064u16.to_be_bytes()); // VLAN 100
        }
        let mut tcp = Vec::new();
        tcp.extend(self.sport.to_be_bytes());
        tcp.extend(self.dport.to_be_bytes());
        tcp.extend(self.seq.to_be_bytes());
        tcp.extend(self.ack.to_be_bytes());
        tcp.push(5 << 4);
        tcp.push(self.flags);
        tcp.extend(65535u16.to_be_bytes());
        tcp.extend([0, 0, 0, 0]); // checksum, urgent pointer
        tcp.extend(std::iter::repeat_n(0x61, self.payload));
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let opts = self.ip_options.div_ceil(4) * 4;
                let ihl = 20 + opts;
                f.extend(0x0800u16.to_be_bytes());
                f.push(0x40 | (ihl / 4) as u8);
                f.push(0);
                f.extend(((ihl + tcp.len()) as u16).to_be_bytes());
                f.extend([0, 0, 0x40, 0]); // id, DF
                f.extend([64, 6, 0, 0]); // ttl, TCP, checksum
                f.extend(s.octets());
                f.extend(d.octets());
                f.extend(std::iter::repeat_n(1u8, opts)); // NOP options
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let ext_len: usize = self.ext.iter().map(|(_, l)| l).sum();
                f.extend(0x86ddu16.to_be_bytes());
                f.extend([0x60, 0, 0, 0]);
                f.extend(((ext_len + tcp.len()) as u16).to_be_bytes());
                f.push(self.ext.first().map_or(6, |(code, _)| *code));
                f.push(64);
                f.extend(s.octets());
                f.extend(d.octets());
                for (i, (code, len)) in self.ext.iter().enumerate() {
                    let next = self.ext.get(i + 1).map_or(6, |(c, _)| *c);
                    let mut h = vec![0u8; *len];
                    h[0] = next;
                    h[1] = match code {
                        51 => (len / 4 - 2) as u8,
                        44 => 0,
                        _ => (len / 8 - 1) as u8,
                    };
                    f.extend(h);
                }
            }
            _ => panic!("mixed address families"),
        }
        f.extend(tcp);
        f
    }
}

/// An ICMP (or ICMPv6) error from `from` about `quoted`, a segment the
/// error's receiver sent: the outer header goes back to the segment's
/// sender, and the error quotes the segment's IP header and the first
/// `quote` bytes of its TCP header (8 is all a router must quote).
pub struct IcmpError {
    pub from: IpAddr,
    pub icmp_type: u8,
    pub code: u8,
    pub quoted: Tcp,
    pub quote: usize,
}

impl IcmpError {
    pub fn frame(&self) -> Vec<u8> {
        let inner = self.quoted.frame();
        // The quoted segment's IP header and the start of its TCP header.
        let ip_len = match self.quoted.src {
            IpAddr::V4(_) => 20,
            IpAddr::V6(_) => 40,
        };
        let quoted = &inner[14..14 + ip_len + self.quote.min(20)];
        let mut icmp = vec![self.icmp_type, self.code, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(quoted);
        let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
        match (self.from, self.quoted.src) {
            (IpAddr::V4(from), IpAddr::V4(to)) => {
                f.extend(0x0800u16.to_be_bytes());
                f.extend([0x45, 0]);
                f.extend(((20 + icmp.len()) as u16).to_be_bytes());
                f.extend([0, 0, 0, 0, 64, 1, 0, 0]);
                f.extend(from.octets());
                f.extend(to.octets());
            }
            (IpAddr::V6(from), IpAddr::V6(to)) => {
                f.extend(0x86ddu16.to_be_bytes());
                f.extend([0x60, 0, 0, 0]);
                f.extend((icmp.len() as u16).to_be_bytes());
                f.extend([58, 64]);
                f.extend(from.octets());
                f.extend(to.octets());
            }
            _ => panic!("mixed address families"),
        }
        f.extend(icmp);
        f
    }
}
