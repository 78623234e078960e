//! ICMP errors through the probe's ingress program, crafted: an error that
//! quotes a connect's SYN ends it, one that quotes a request's SYN-ACK drops
//! the request only for the codes the kernel drops it for, and malformed or
//! harmless ones change nothing. The expected effects are the kernel's
//! (`tcp_v4_err`, `tcp_v6_err`), checked on real sockets by the namespace
//! tests.
//! Needs root: `cargo xtask test` runs these.

mod support;

use std::net::IpAddr;

use support::{
    crafted::*,
    frames::{ACK, IcmpError, SYN, Tcp},
};
use tcpstate::kernel::probe::Probe;
use tcpstate_common::{Event, TcpState};

/// A local client's connect (SYN sent, through TC) to `server`.
fn connect(p: &Probe, client: &str, server: &str, port: u16) -> Tcp {
    let syn = Tcp::new(client, port, server, 80, SYN).seq(1000, 0);
    tc(p, &syn);
    syn
}

fn error(from: &str, icmp_type: u8, code: u8, quoted: &Tcp) -> IcmpError {
    IcmpError {
        from: from.parse().unwrap(),
        icmp_type,
        code,
        quoted: quoted.clone(),
        quote: 8,
    }
}

fn send(p: &Probe, e: &IcmpError) {
    assert_eq!(p.run_xdp(&e.frame()).unwrap(), XDP_PASS);
}

fn counts(p: &Probe) -> (i64, i64, u64, u64) {
    let c = p.counters(0).unwrap();
    (
        state_count(&c, TcpState::SynSent),
        state_count(&c, TcpState::SynRecv),
        event(&c, Event::IcmpErrors),
        event(&c, Event::IcmpEnded),
    )
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn an_icmp_error_quoting_a_syn_ends_the_connect() {
    for (client, server, unreachable) in [
        (
            "10.0.0.2",
            "10.0.0.1",
            [(3u8, 3u8), (3, 0), (3, 13), (11, 0), (12, 0)],
        ),
        (
            "fd00::2",
            "fd00::1",
            [(1, 4), (1, 0), (1, 1), (3, 0), (4, 0)],
        ),
    ] {
        let p = probe(1024, LOCAL);
        for (i, (t, code)) in unreachable.iter().enumerate() {
            let syn = connect(&p, client, server, 40_000 + i as u16);
            // An error about a sequence number the connect never sent: ignored.
            let mut stale = syn.clone();
            stale.seq = 7;
            let before = counts(&p).0;
            send(&p, &error(server, *t, *code, &stale));
            assert_eq!(counts(&p).0, before, "{client} type {t} code {code}: stale");
            send(&p, &error(server, *t, *code, &syn));
            assert_eq!(counts(&p).0, before - 1, "{client} type {t} code {code}");
        }
        let (syn_sent, _, errors, ended) = counts(&p);
        assert_eq!((syn_sent, errors, ended), (0, 10, 5), "{client}");
        let c = p.counters(0).unwrap();
        assert_eq!(
            event(&c, Event::HandshakesFailed),
            5,
            "the kernel's AttemptFails"
        );
        assert_eq!(event(&c, Event::ParseErrors), 0);
    }
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn path_mtu_and_redirect_messages_end_nothing() {
    let p = probe(1024, LOCAL);
    let syn4 = connect(&p, "10.0.0.2", "10.0.0.1", 40_100);
    let syn6 = connect(&p, "fd00::2", "fd00::1", 40_101);
    for f in [
        error("10.0.0.1", 3, 4, &syn4),  // fragmentation needed
        error("10.0.0.1", 5, 1, &syn4),  // redirect
        error("10.0.0.1", 11, 1, &syn4), // reassembly time exceeded
        error("fd00::1", 2, 0, &syn6),   // packet too big
    ] {
        send(&p, &f);
    }
    assert_eq!(counts(&p), (2, 0, 0, 0));
    let c = p.counters(0).unwrap();
    assert_eq!(event(&c, Event::NotTcp), 4);
}

/// A request (SYN_RECV) whose SYN-ACK an ICMP error answers.
fn requested(p: &Probe, client: &str, server: &str, port: u16) -> Tcp {
    xdp(p, &Tcp::new(client, port, server, 443, SYN).seq(100, 0));
    let synack = Tcp::new(server, 443, client, port, SYN | ACK).seq(9000, 101);
    tc(p, &synack);
    synack
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn an_icmp_error_drops_a_request_only_for_the_kernels_codes() {
    // (client, server, codes that drop the request, codes that do not)
    type Codes = [(u8, u8); 2];
    let cases: [(&str, &str, Codes, Codes); 2] = [
        ("10.0.0.1", "10.0.0.2", [(3, 1), (11, 0)], [(3, 3), (3, 13)]),
        ("fd00::1", "fd00::2", [(1, 4), (1, 1)], [(1, 0), (3, 0)]),
    ];
    for (client, server, drop, keep) in cases {
        let p = probe(1024, LOCAL);
        let mut port = 50_000;
        for (t, code) in keep {
            port += 1;
            let synack = requested(&p, client, server, port);
            send(&p, &error(client, t, code, &synack));
        }
        assert_eq!(counts(&p).1, 2, "{server}: kept");
        for (t, code) in drop {
            port += 1;
            let synack = requested(&p, client, server, port);
            let mut other = synack.clone();
            other.seq += 1;
            send(&p, &error(client, t, code, &other));
            assert_eq!(
                counts(&p).1,
                3,
                "{server}: not this request's sequence number"
            );
            send(&p, &error(client, t, code, &synack));
            assert_eq!(counts(&p).1, 2, "{server} type {t} code {code}: dropped");
        }
    }
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn a_quote_too_short_for_the_tcp_ports_is_a_parse_error() {
    let p = probe(1024, LOCAL);
    let syn = connect(&p, "10.0.0.2", "10.0.0.1", 40_200);
    let mut short = error("10.0.0.1", 3, 3, &syn);
    short.quote = 4;
    send(&p, &short);
    let c = p.counters(0).unwrap();
    assert_eq!(event(&c, Event::ParseErrors), 1);
    assert_eq!(state_count(&c, TcpState::SynSent), 1);
    // An ICMP error about a connection nobody tracks is counted nowhere.
    let other = Tcp::new("10.0.0.2", 1, "10.0.0.9", 2, SYN);
    send(&p, &error("10.0.0.9", 3, 3, &other));
    assert_eq!(event(&p.counters(0).unwrap(), Event::IcmpErrors), 0);
    let _: IpAddr = "10.0.0.2".parse().unwrap();
}
