//! The probe loaded but not attached, run on crafted frames with
//! BPF_PROG_TEST_RUN, and what its maps then hold.

use std::net::IpAddr;

use tcpstate::kernel::probe::{Probe, ProbeOptions};
use tcpstate_common::{Counters, Event, FlowKey4, FlowKey6, Side, TcpState, Word};

use super::{frames::Tcp, require_root};

pub const XDP_PASS: u32 = 2;
/// TC_ACT_UNSPEC: "no verdict", the packet goes on unchanged.
pub const TC_ACT_UNSPEC: i32 = -1;

/// A loaded (not attached) probe that takes `local` as the host's addresses.
pub fn probe(max_flows: u32, local: &[&str]) -> Probe {
    require_root();
    let mut p = Probe::load(
        &ProbeOptions {
            max_flows,
            ..ProbeOptions::default()
        },
        None,
    )
    .expect("load the probe");
    let addrs: Vec<IpAddr> = local.iter().map(|a| a.parse().unwrap()).collect();
    p.set_local_addresses(0, &addrs)
        .expect("set the local addresses");
    p
}

/// The host's addresses in these tests: 10.0.0.2, fd00::2, 10.1.1.1 and fd00::5.
pub const LOCAL: &[&str] = &["10.0.0.2", "fd00::2", "10.1.1.1", "fd00::5"];

/// Address words as they lie in the frame.
pub fn words(b: &[u8]) -> Vec<u32> {
    b.chunks(4)
        .map(|w| u32::from_ne_bytes(w.try_into().unwrap()))
        .collect()
}

/// The entry the frame's 4-tuple names, and which side its receiver is.
pub fn entry_of(p: &Probe, t: &Tcp) -> Option<(Word, Side)> {
    let (entry, sender) = match (t.src, t.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let (key, sender) = FlowKey4::new(
                0,
                words(&s.octets())[0],
                t.sport,
                words(&d.octets())[0],
                t.dport,
            );
            (p.flows4().unwrap().get(&key, 0).ok()?, sender)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let (s, d) = (words(&s.octets()), words(&d.octets()));
            let (key, sender) = FlowKey6::new(
                0,
                s.try_into().unwrap(),
                t.sport,
                d.try_into().unwrap(),
                t.dport,
            );
            (p.flows6().unwrap().get(&key, 0).ok()?, sender)
        }
        _ => panic!("mixed families"),
    };
    Some((Word(entry.word), sender.other()))
}

pub fn state_count(c: &Counters, s: TcpState) -> i64 {
    c.states[s as usize]
}

pub fn event(c: &Counters, e: Event) -> u64 {
    c.events[e as usize]
}

pub fn flow_count(p: &Probe) -> usize {
    p.flow_entries().unwrap().len()
}

pub fn xdp(p: &Probe, t: &Tcp) {
    assert_eq!(p.run_xdp(&t.frame()).unwrap(), XDP_PASS);
}

pub fn tc(p: &Probe, t: &Tcp) {
    assert_eq!(p.run_tc(&t.frame()).unwrap(), TC_ACT_UNSPEC);
}
