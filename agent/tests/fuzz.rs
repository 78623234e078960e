//! A million frames through the probe's programs with BPF_PROG_TEST_RUN:
//! well-formed segments in every encapsulation, the same cut short or
//! corrupted where the parser must notice, foreign and fragmented frames,
//! then random and randomly mutated bytes. Every verdict must let the frame
//! through; for frames built with a known kind the event counters must equal
//! the tally of kinds sent; after everything the per-state counters must
//! equal what the flow map's entries hold.
//!
//! `TCPSTATE_FUZZ_FRAMES` changes the number of frames (default 1,000,000).
//! Needs root: `cargo xtask test` runs it.

mod support;

use std::net::IpAddr;

use support::{
    frames::{ACK, FIN, RST, SYN, Tcp},
    require_root,
    rng::Rng,
};
use tcpstate::kernel::probe::{Probe, ProbeOptions};
use tcpstate_common::{Event, Side, TcpState, Word};

const XDP_PASS: u32 = 2;
const TC_ACT_UNSPEC: i32 = -1;

/// What a frame must be counted as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    Tcp,
    NotTcp,
    Fragment,
    Malformed,
    TooDeep,
}

const V4: [&str; 4] = ["10.0.0.2", "10.0.0.7", "10.1.1.1", "192.0.2.9"];
const V6: [&str; 4] = ["fd00::2", "fd00::7", "fd00::5", "2001:db8::9"];
/// The "host's" addresses among them.
const LOCAL: [&str; 4] = ["10.0.0.2", "10.1.1.1", "fd00::2", "fd00::5"];

/// A well-formed segment: random addresses from a small pool (so segments
/// meet the same flows), ports, flags, VLAN tags, IP options or extension
/// headers, payload.
fn segment(r: &mut Rng) -> Tcp {
    let v6 = r.chance(40);
    let pool: &[&str] = if v6 { &V6 } else { &V4 };
    let (src, dst) = (*r.pick(pool), *r.pick(pool));
    let flags = *r.pick(&[SYN, SYN | ACK, ACK, ACK, ACK, FIN | ACK, RST, RST | ACK])
        | if r.chance(5) { r.below(256) as u8 } else { 0 };
    let mut t = Tcp::new(
        src,
        40000 + r.below(8) as u16,
        dst,
        80 + r.below(4) as u16,
        flags,
    )
    .seq(r.next() as u32, r.next() as u32);
    t.payload = r.below(3) as usize * 100;
    for _ in 0..r.below(3) {
        t.vlans.push(*r.pick(&[0x8100, 0x88a8]));
    }
    if v6 {
        for _ in 0..r.below(5) {
            t.ext
                .push(*r.pick(&[(0, 8), (60, 8), (60, 16), (43, 24), (51, 12)]));
        }
    } else {
        t.ip_options = r.below(11) as usize * 4;
    }
    t
}

/// Where the IP header starts in `t.frame()`.
fn ip_at(t: &Tcp) -> usize {
    14 + 4 * t.vlans.len()
}

/// A frame and the kind it must be counted as.
fn known(r: &mut Rng) -> (Vec<u8>, Kind) {
    let mut t = segment(r);
    let v6 = matches!(t.src, IpAddr::V6(_));
    match r.below(100) {
        0..=49 => (t.frame(), Kind::Tcp),
        50..=64 => {
            // Cut anywhere inside the headers (a frame keeps its 14-byte
            // Ethernet header: the kernel's test harness needs it).
            let f = t.frame();
            let headers = f.len() - t.payload;
            let len = 14 + r.below((headers - 14) as u64) as usize;
            (f[..len].to_vec(), Kind::Malformed)
        }
        65..=69 => {
            let mut f = t.frame();
            let at = ip_at(&t);
            if v6 {
                f[at] = (r.below(16) as u8 & !0x6 | 0x1) << 4; // version != 6
            } else if r.chance(50) {
                f[at] = 0x40 | r.below(5) as u8; // IHL below 5
            } else {
                f[at] = (r.below(16) as u8 & !0x4 | 0x1) << 4 | 5; // version != 4
            }
            (f, Kind::Malformed)
        }
        70..=74 => {
            let mut f = t.frame();
            let doff_at = f.len() - t.payload - 20 + 12;
            f[doff_at] = (r.below(5) as u8) << 4; // data offset below 5
            (f, Kind::Malformed)
        }
        75..=84 => {
            let mut f = t.frame();
            let at = ip_at(&t);
            if r.chance(20) {
                // Another ethertype: ARP, LLDP, MPLS, ...
                let et: u16 = *r.pick(&[0x0806, 0x88cc, 0x8847, 0x0842, 0x9000]);
                f[at - 2..at].copy_from_slice(&et.to_be_bytes());
            } else if v6 {
                let last_next = if t.ext.is_empty() {
                    at + 6
                } else {
                    at + 40
                        + t.ext[..t.ext.len() - 1]
                            .iter()
                            .map(|(_, l)| l)
                            .sum::<usize>()
                };
                f[last_next] = *r.pick(&[17, 58, 132, 59]);
            } else {
                f[at + 9] = *r.pick(&[1, 17, 47, 132]);
            }
            (f, Kind::NotTcp)
        }
        85..=92 => {
            if v6 {
                t.ext.push((44, 8));
                let mut f = t.frame();
                let frag = ip_at(&t)
                    + 40
                    + t.ext[..t.ext.len() - 1]
                        .iter()
                        .map(|(_, l)| l)
                        .sum::<usize>();
                let offset = 1 + r.below(8000) as u16; // in 8-byte units, not 0
                f[frag + 2..frag + 4].copy_from_slice(&(offset << 3).to_be_bytes());
                (f, Kind::Fragment)
            } else {
                let mut f = t.frame();
                let at = ip_at(&t);
                let offset = 1 + r.below(8000) as u16;
                f[at + 6..at + 8]
                    .copy_from_slice(&(offset | (r.below(2) as u16 * 0x2000)).to_be_bytes());
                (f, Kind::Fragment)
            }
        }
        _ => {
            if v6 {
                t.ext = (0..7 + r.below(3))
                    .map(|_| *r.pick(&[(0, 8), (60, 8)]))
                    .collect();
                (t.frame(), Kind::TooDeep)
            } else {
                (t.frame(), Kind::Tcp)
            }
        }
    }
}

/// Random bytes, or a well-formed segment with random bytes overwritten.
fn unknown(r: &mut Rng) -> Vec<u8> {
    if r.chance(30) {
        let len = 14 + r.below(300) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| r.next() as u8).collect();
        // Often an IP ethertype, so the parser goes deeper.
        let et: u16 = *r.pick(&[0x0800, 0x86dd, 0x8100, 0x88a8, 0x0800]);
        f[12..14].copy_from_slice(&et.to_be_bytes());
        f
    } else {
        let mut f = segment(r).frame();
        for _ in 0..1 + r.below(6) {
            let at = r.below(f.len() as u64) as usize;
            f[at] = r.next() as u8;
        }
        if r.chance(20) {
            f.truncate(14 + r.below((f.len() - 14) as u64) as usize);
        }
        f
    }
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn a_million_frames_all_pass_and_every_one_is_accounted_for() {
    require_root();
    let frames: u64 = std::env::var("TCPSTATE_FUZZ_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut p = Probe::load(
        &ProbeOptions {
            max_flows: 65_536,
            ..ProbeOptions::default()
        },
        None,
    )
    .expect("load the probe");
    let local: Vec<IpAddr> = LOCAL.iter().map(|a| a.parse().unwrap()).collect();
    p.set_local_addresses(0, &local).unwrap();
    let mut r = Rng(0x7c9_5eed_u64 ^ frames);
    let mut sent = std::collections::HashMap::<Kind, u64>::new();
    let (mut xdp_runs, mut tc_runs) = (0u64, 0u64);
    let mut run = |p: &mut Probe, f: &[u8], r: &mut Rng| {
        // Half through TC egress; the kernel's skb harness refuses frames
        // shorter than Ethernet + minimal IP + TCP, XDP takes them all.
        if r.chance(50) && f.len() >= 54 {
            let v = p
                .run_tc(f)
                .unwrap_or_else(|e| panic!("TC run of {} bytes: {e}", f.len()));
            assert_eq!(v, TC_ACT_UNSPEC, "TC verdict for {f:02x?}");
            tc_runs += 1;
        } else {
            let v = p
                .run_xdp(f)
                .unwrap_or_else(|e| panic!("XDP run of {} bytes: {e}", f.len()));
            assert_eq!(v, XDP_PASS, "XDP verdict for {f:02x?}");
            xdp_runs += 1;
        }
    };
    // Phase 1: kinds known by construction.
    let known_frames = frames * 4 / 5;
    for _ in 0..known_frames {
        let (f, kind) = known(&mut r);
        run(&mut p, &f, &mut r);
        *sent.entry(kind).or_default() += 1;
    }
    let c = p.counters(0).unwrap();
    let ev = |e: Event| c.events[e as usize];
    let got = |k: Kind| sent.get(&k).copied().unwrap_or(0);
    assert_eq!(ev(Event::PacketsIn) + ev(Event::PacketsOut), known_frames);
    assert_eq!(ev(Event::TcpSegments), got(Kind::Tcp), "{sent:?}");
    assert_eq!(ev(Event::ParseErrors), got(Kind::Malformed), "{sent:?}");
    assert_eq!(ev(Event::NotTcp), got(Kind::NotTcp), "{sent:?}");
    assert_eq!(ev(Event::Fragments), got(Kind::Fragment), "{sent:?}");
    assert_eq!(ev(Event::Ipv6ExtTooDeep), got(Kind::TooDeep), "{sent:?}");
    assert!(got(Kind::Tcp) > 0 && got(Kind::Malformed) > 0 && got(Kind::TooDeep) > 0);
    // Phase 2: random and mutated bytes.
    for _ in known_frames..frames {
        let f = unknown(&mut r);
        run(&mut p, &f, &mut r);
    }
    let c = p.counters(0).unwrap();
    assert_eq!(c.events[Event::PacketsIn as usize], xdp_runs);
    assert_eq!(c.events[Event::PacketsOut as usize], tc_runs);
    assert_eq!(xdp_runs + tc_runs, frames);
    // The flow map: every entry a valid word, and the per-state counters
    // exactly what the entries hold.
    let mut held = [0i64; 16];
    for (_, e) in p.flow_entries().unwrap() {
        let w = Word(e.word);
        for side in [Side::A, Side::B] {
            let s = w.counted(side);
            assert!(
                s == TcpState::None || TcpState::REPORTED.contains(&s),
                "an entry holds state {s:?}"
            );
            if s != TcpState::None {
                held[s as usize] += 1;
            }
        }
    }
    assert_eq!(c.states, held, "counters vs the entries");
    eprintln!(
        "{frames} frames ({xdp_runs} XDP, {tc_runs} TC): {sent:?}; {} flows, states {:?}",
        p.flow_entries().unwrap().len(),
        &held[..12]
    );
}
