use super::*;

#[derive(Default, Debug)]
struct Out {
    family: u32,
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    seg: Segment,
    effect: Option<IcmpEffect>,
    ip_len: u32,
}

impl Headers for Out {
    fn v4(&mut self, src: u32, dst: u32) {
        self.family = 4;
        self.src[0] = src;
        self.dst[0] = dst;
    }
    fn v6(&mut self, src: [u32; 4], dst: [u32; 4]) {
        self.family = 6;
        self.src = src;
        self.dst = dst;
    }
    fn tcp(&mut self, sport: u16, dport: u16, seg: Segment) {
        (self.sport, self.dport, self.seg) = (sport, dport, seg);
    }
    fn icmp(&mut self, effect: IcmpEffect) {
        self.effect = Some(effect);
    }
    fn ip_len(&mut self, len: u32) {
        self.ip_len = len;
    }
}

fn tcp_header(sport: u16, dport: u16, seq: u32, flags: u8) -> Vec<u8> {
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = flags;
    t
}

fn ipv4(proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![
        0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    ip[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    ip.extend_from_slice(payload);
    ip
}

fn ether(proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend_from_slice(&proto.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
fn an_ipv4_segment_behind_two_vlan_tags() {
    let mut seg = tcp_header(40000, 80, 7, 0x02);
    seg.extend_from_slice(b"abc");
    let mut f = ether(0x88a8, &[0, 1, 0x81, 0x00, 0, 2, 0x08, 0x00]);
    f.extend_from_slice(&ipv4(6, &seg));
    let mut out = Out::default();
    assert!(matches!(parse(&f[..], &mut out), Ok(Parsed::Tcp)));
    assert_eq!(out.family, 4);
    assert_eq!(out.src[0].to_ne_bytes(), [10, 0, 0, 1]);
    assert_eq!((out.sport, out.dport, out.seg.seq), (40000, 80, 7));
    assert_eq!((out.seg.flags, out.seg.len, out.ip_len), (0x02, 3, 43));
}

#[test]
fn an_ipv6_segment_after_an_extension_header() {
    let mut ip = vec![0x60, 0, 0, 0, 0, 0, 0, 64];
    ip.extend_from_slice(&[0xfd; 16]);
    ip.extend_from_slice(&[0xfe; 16]);
    let tcp = tcp_header(1, 2, 3, 0x11);
    let hop = [6u8, 0, 0, 0, 0, 0, 0, 0];
    ip[4..6].copy_from_slice(&((hop.len() + tcp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&hop);
    ip.extend_from_slice(&tcp);
    let mut out = Out::default();
    assert!(matches!(
        network(&ip[..], ETH_P_IPV6, 0, &mut out),
        Ok(Parsed::Tcp)
    ));
    assert_eq!(
        (out.family, out.sport, out.dport, out.seg.len),
        (6, 1, 2, 0)
    );
    assert_eq!(out.dst[3].to_ne_bytes(), [0xfe; 4]);
}

#[test]
fn an_icmp_error_quotes_the_segment_it_is_about() {
    let quoted = ipv4(6, &tcp_header(5, 6, 99, 0x02)[..8]);
    let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&quoted);
    let f = ether(0x0800, &ipv4(1, &icmp));
    let mut out = Out::default();
    assert!(matches!(parse(&f[..], &mut out), Ok(Parsed::IcmpError)));
    assert_eq!((out.sport, out.dport, out.seg.seq), (5, 6, 99));
    assert_eq!(out.effect, Some(IcmpEffect::EndsConnect));
}

#[test]
fn every_truncation_of_a_frame_is_an_error_not_a_panic() {
    let f = ether(0x0800, &ipv4(6, &tcp_header(1, 2, 3, 0x10)));
    for cut in 0..f.len() {
        let mut out = Out::default();
        assert_eq!(
            parse(&f[..cut], &mut out).err(),
            Some(ParseError::Malformed),
            "{cut}"
        );
    }
}

#[test]
fn what_is_not_tcp_says_so() {
    let mut out = Out::default();
    let udp = ether(0x0800, &ipv4(17, &[0; 8]));
    assert!(matches!(parse(&udp[..], &mut out), Ok(Parsed::NotTcp)));
    let arp = ether(0x0806, &[0; 28]);
    assert!(matches!(parse(&arp[..], &mut out), Ok(Parsed::NotTcp)));
    let mut frag = ipv4(6, &[0; 20]);
    frag[7] = 8;
    assert!(matches!(
        network(&frag[..], ETH_P_IP, 0, &mut out),
        Ok(Parsed::Fragment)
    ));
}
