//! Capture files written byte by byte, as the format specifications lay
//! them out (libpcap's pcap, the IETF pcapng draft), for the replay tests:
//! each format, byte order, timestamp resolution and link type.

use super::frames::{ACK, FIN, RST, SYN, Tcp};

pub const LINK_ETHERNET: u32 = 1;
pub const LINK_RAW: u32 = 101;
pub const LINK_SLL: u32 = 113;
pub const LINK_IPV4: u32 = 228;
pub const LINK_SLL2: u32 = 276;

/// A frame: when (epoch ns), its bytes, and its length on the wire.
pub struct Rec {
    pub ts_ns: u64,
    pub data: Vec<u8>,
    pub orig_len: u32,
}

impl Rec {
    pub fn new(ts_ns: u64, data: Vec<u8>) -> Rec {
        let orig_len = data.len() as u32;
        Rec {
            ts_ns,
            data,
            orig_len,
        }
    }
}

/// The IP packet of an Ethernet frame the builder made (untagged).
pub fn ip_of(eth: &[u8]) -> Vec<u8> {
    eth[14..].to_vec()
}

/// `t` with the link header of `link`.
pub fn framed(t: &Tcp, link: u32) -> Vec<u8> {
    let eth = t.frame();
    let proto = [eth[12], eth[13]];
    let ip = ip_of(&eth);
    let mut f = match link {
        LINK_ETHERNET => return eth,
        LINK_RAW | LINK_IPV4 => Vec::new(),
        // packet type 0 (to us), ARPHRD_ETHER, address length 6, address, protocol.
        LINK_SLL => {
            let mut h = vec![0, 0, 0, 1, 0, 6, 2, 0, 0, 0, 0, 1, 0, 0];
            h.extend(proto);
            h
        }
        // protocol, reserved, ifindex 2, ARPHRD_ETHER, packet type, address length, address.
        LINK_SLL2 => {
            let mut h = proto.to_vec();
            h.extend([0, 0, 0, 0, 0, 2, 0, 1, 0, 6]);
            h.extend([2, 0, 0, 0, 0, 1, 0, 0]);
            h
        }
        other => panic!("no builder for link type {other}"),
    };
    f.extend(ip);
    f
}

/// A pcap file: microsecond or nanosecond stamps, either byte order.
pub fn pcap(link: u32, nanos: bool, big_endian: bool, recs: &[Rec]) -> Vec<u8> {
    let w32 = |v: u32| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let w16 = |v: u16| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let mut f = Vec::new();
    f.extend(w32(if nanos { 0xa1b2_3c4d } else { 0xa1b2_c3d4 }));
    f.extend(w16(2));
    f.extend(w16(4));
    f.extend(w32(0));
    f.extend(w32(0));
    f.extend(w32(65535));
    f.extend(w32(link));
    for r in recs {
        let frac = r.ts_ns % 1_000_000_000;
        f.extend(w32((r.ts_ns / 1_000_000_000) as u32));
        f.extend(w32(if nanos { frac } else { frac / 1000 } as u32));
        f.extend(w32(r.data.len() as u32));
        f.extend(w32(r.orig_len));
        f.extend(&r.data);
    }
    f
}

/// A pcapng file (little-endian): a section, one interface of `link`
/// stamping in units of 10^-`tsresol` s, enhanced packet blocks.
pub fn pcapng(link: u32, tsresol: u8, recs: &[Rec]) -> Vec<u8> {
    let mut f = Vec::new();
    let block = |f: &mut Vec<u8>, kind: u32, body: &[u8]| {
        let pad = body.len().div_ceil(4) * 4 - body.len();
        let len = (12 + body.len() + pad) as u32;
        f.extend(kind.to_le_bytes());
        f.extend(len.to_le_bytes());
        f.extend(body);
        f.extend(std::iter::repeat_n(0u8, pad));
        f.extend(len.to_le_bytes());
    };
    // Section header: byte-order magic, version 1.0, section length unknown.
    let mut shb = Vec::new();
    shb.extend(0x1a2b_3c4du32.to_le_bytes());
    shb.extend(1u16.to_le_bytes());
    shb.extend(0u16.to_le_bytes());
    shb.extend((-1i64).to_le_bytes());
    block(&mut f, 0x0a0d_0d0a, &shb);
    // Interface: link type, reserved, snap length, if_tsresol, end of options.
    let mut idb = Vec::new();
    idb.extend((link as u16).to_le_bytes());
    idb.extend(0u16.to_le_bytes());
    idb.extend(0u32.to_le_bytes());
    idb.extend(9u16.to_le_bytes());
    idb.extend(1u16.to_le_bytes());
    idb.extend([tsresol, 0, 0, 0]);
    idb.extend([0, 0, 0, 0]);
    block(&mut f, 1, &idb);
    let unit = 10u64.pow(9 - u32::from(tsresol.min(9)));
    for r in recs {
        let ts = r.ts_ns / unit;
        let mut epb = Vec::new();
        epb.extend(0u32.to_le_bytes());
        epb.extend(((ts >> 32) as u32).to_le_bytes());
        epb.extend((ts as u32).to_le_bytes());
        epb.extend((r.data.len() as u32).to_le_bytes());
        epb.extend(r.orig_len.to_le_bytes());
        epb.extend(&r.data);
        block(&mut f, 6, &epb);
    }
    f
}

pub const T0: u64 = 1_765_000_000_000_000_000;
pub const MS: u64 = 1_000_000;
pub const S: u64 = 1_000_000_000;

/// The story every file tells: from the host 10.0.0.1 / fd00::1,
/// - a connection closed normally by the host first (TIME_WAIT from 1 s),
/// - one left open (a keepalive at 30 s and 70 s),
/// - one refused, one never answered (SYN_SENT),
/// - one over IPv6, left open.
pub fn story() -> Vec<(u64, Tcp)> {
    let (h, p) = ("10.0.0.1", "10.0.0.2");
    let t = |src: &str, sp, dst: &str, dp, f, seq, ack| Tcp::new(src, sp, dst, dp, f).seq(seq, ack);
    let mut data = t(h, 40001, p, 80, ACK, 101, 501);
    data.payload = 10;
    vec![
        (0, t(h, 40001, p, 80, SYN, 100, 0)),
        (MS, t(p, 80, h, 40001, SYN | ACK, 500, 101)),
        (2 * MS, t(h, 40001, p, 80, ACK, 101, 501)),
        (3 * MS, data),
        (4 * MS, t(p, 80, h, 40001, ACK, 501, 111)),
        (10 * MS, t(h, 40002, p, 80, SYN, 7000, 0)),
        (11 * MS, t(p, 80, h, 40002, SYN | ACK, 9000, 7001)),
        (12 * MS, t(h, 40002, p, 80, ACK, 7001, 9001)),
        (20 * MS, t(h, 40003, p, 81, SYN, 300, 0)),
        (21 * MS, t(p, 81, h, 40003, RST | ACK, 0, 301)),
        (30 * MS, t(h, 40004, p, 82, SYN, 400, 0)),
        (40 * MS, t("fd00::1", 40005, "fd00::2", 80, SYN, 1, 0)),
        (
            41 * MS,
            t("fd00::2", 80, "fd00::1", 40005, SYN | ACK, 50, 2),
        ),
        (42 * MS, t("fd00::1", 40005, "fd00::2", 80, ACK, 2, 51)),
        (S, t(h, 40001, p, 80, FIN | ACK, 111, 501)),
        (S + MS, t(p, 80, h, 40001, ACK, 501, 112)),
        (S + 2 * MS, t(p, 80, h, 40001, FIN | ACK, 501, 112)),
        (S + 3 * MS, t(h, 40001, p, 80, ACK, 112, 502)),
        (30 * S, t(h, 40002, p, 80, ACK, 7000, 9001)),
        (70 * S, t(h, 40002, p, 80, ACK, 7000, 9001)),
    ]
}

/// One client port used three times against a server (the host,
/// 10.0.0.1:80) that closes first, so each new SYN meets its TIME_WAIT:
/// the second SYN is behind the old connection's sequence numbers and is
/// challenged (the TIME_WAIT's old ACK, the client's RST, the SYN again
/// 10 ms later), the third is ahead and taken. Each connection ends with
/// the server in TIME_WAIT.
pub fn reuse_story() -> Vec<(u64, Tcp)> {
    let (c, s) = ("10.0.0.2", "10.0.0.1");
    let up = |f, seq, ack| Tcp::new(c, 40010, s, 80, f).seq(seq, ack);
    let down = |f, seq, ack| Tcp::new(s, 80, c, 40010, f).seq(seq, ack);
    // One connection from `at`: client ISN `ci`, server ISN `si`, closed by
    // the server first.
    let conn = |at: u64, ci: u32, si: u32| {
        vec![
            (at, up(SYN, ci, 0)),
            (at + MS, down(SYN | ACK, si, ci + 1)),
            (at + 2 * MS, up(ACK, ci + 1, si + 1)),
            (at + 100 * MS, down(FIN | ACK, si + 1, ci + 1)),
            (at + 101 * MS, up(ACK, ci + 1, si + 2)),
            (at + 200 * MS, up(FIN | ACK, ci + 1, si + 2)),
            (at + 201 * MS, down(ACK, si + 2, ci + 2)),
        ]
    };
    let mut v = conn(0, 1_000_000, 5_000);
    // Behind 1_000_002, where the TIME_WAIT expects the client: challenged.
    v.push((S, up(SYN, 900_000, 0)));
    v.push((S + MS, down(ACK, 5_002, 1_000_002)));
    v.push((S + 2 * MS, Tcp::new(c, 40010, s, 80, RST).seq(1_000_002, 0)));
    let mut again = conn(S + 12 * MS, 900_000, 70_000);
    v.append(&mut again);
    // Ahead of 900_002: taken.
    v.append(&mut conn(2 * S, 2_000_000, 90_000));
    v
}

pub fn recs(link: u32, vlan: bool) -> Vec<Rec> {
    recs_of(story(), link, vlan)
}

/// A story's segments as frames of `link`, from [`T0`] on.
pub fn recs_of(story: Vec<(u64, Tcp)>, link: u32, vlan: bool) -> Vec<Rec> {
    story
        .into_iter()
        .filter(|(_, t)| link != LINK_IPV4 || t.src.is_ipv4())
        .map(|(at, mut t)| {
            if vlan {
                t.vlans = vec![0x8100];
            }
            Rec::new(T0 + at, framed(&t, link))
        })
        .collect()
}
