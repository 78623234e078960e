//! The probe's programs run on crafted frames with BPF_PROG_TEST_RUN: the
//! frames' known contents decide the expected flow entries and counters, and
//! every verdict must let the packet through.
//! Needs root: `cargo xtask test` runs these.

mod support;

use support::{
    crafted::*,
    frames::{ACK, FIN, RST, SYN, Tcp},
};
use tcpstate::{
    kernel::{probe::Probe, sockdiag::SockDiag},
    tracking::timers::{self, Timeouts},
};
use tcpstate_common::{Event, Side, TcpState, Word};

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn a_syn_in_every_encapsulation_opens_one_flow() {
    let p = probe(1024, LOCAL);
    let mut port = 40_000;
    let mut next = |src: &str, dst: &str| {
        port += 1;
        Tcp::new(src, port, dst, 80, SYN)
    };
    let mut cases = vec![
        ("IPv4", next("10.0.0.1", "10.0.0.2")),
        (
            "IPv4 with 12 option bytes",
            Tcp {
                ip_options: 12,
                ..next("10.0.0.1", "10.0.0.2")
            },
        ),
        (
            "IPv4 with 40 option bytes",
            Tcp {
                ip_options: 40,
                ..next("10.0.0.1", "10.0.0.2")
            },
        ),
        (
            "802.1Q",
            Tcp {
                vlans: vec![0x8100],
                ..next("10.0.0.1", "10.0.0.2")
            },
        ),
        (
            "802.1ad + 802.1Q",
            Tcp {
                vlans: vec![0x88a8, 0x8100],
                ..next("10.0.0.1", "10.0.0.2")
            },
        ),
        ("IPv6", next("fd00::1", "fd00::2")),
        (
            "IPv6 hop-by-hop, routing, dest-opts",
            Tcp {
                ext: vec![(0, 8), (43, 24), (60, 16)],
                ..next("fd00::1", "fd00::2")
            },
        ),
        (
            "IPv6 first fragment",
            Tcp {
                ext: vec![(44, 8)],
                ..next("fd00::1", "fd00::2")
            },
        ),
        (
            "IPv6 authentication header",
            Tcp {
                ext: vec![(51, 16)],
                ..next("fd00::1", "fd00::2")
            },
        ),
        (
            "IPv6 in QinQ",
            Tcp {
                vlans: vec![0x88a8, 0x8100],
                ext: vec![(60, 8)],
                ..next("fd00::1", "fd00::2")
            },
        ),
    ];
    // SYNs to the host: counted as such, but no flow until it answers.
    for (name, t) in &cases {
        assert_eq!(p.run_xdp(&t.frame()).unwrap(), XDP_PASS, "{name}");
        assert!(
            entry_of(&p, t).is_none(),
            "{name}: a SYN alone keeps nothing"
        );
    }
    let c = p.counters(0).unwrap();
    assert_eq!(event(&c, Event::TcpSegments), cases.len() as u64);
    assert_eq!(event(&c, Event::SynsReceived), cases.len() as u64);
    assert_eq!(event(&c, Event::ParseErrors), 0);
    assert_eq!(flow_count(&p), 0);

    // The host answers each through TC, in the same encapsulation: its
    // request sockets, SYN_RECV.
    for (name, t) in cases.iter_mut() {
        std::mem::swap(&mut t.src, &mut t.dst);
        std::mem::swap(&mut t.sport, &mut t.dport);
        t.flags = SYN | ACK;
        tc(&p, t);
        let (word, receiver) =
            entry_of(&p, t).unwrap_or_else(|| panic!("{name}: no flow entry for its 4-tuple"));
        let sender = receiver.other();
        assert_eq!(word.state(sender), TcpState::SynRecv, "{name}");
        assert!(
            word.is_local(sender) && !word.is_local(receiver),
            "{name}: only the sender (10.0.0.2 or fd00::2) is local"
        );
    }
    let c = p.counters(0).unwrap();
    assert_eq!(state_count(&c, TcpState::SynRecv), cases.len() as i64);
    assert_eq!(flow_count(&p), cases.len());
    assert_eq!(event(&c, Event::PacketsOut), cases.len() as u64);
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn malformed_and_foreign_frames_pass_untouched_and_are_counted() {
    let p = probe(1024, LOCAL);
    let syn4 = Tcp::new("10.0.0.1", 1, "10.0.0.2", 2, SYN).frame();
    let syn6 = Tcp {
        ext: vec![(0, 8)],
        ..Tcp::new("fd00::1", 1, "fd00::2", 2, SYN)
    }
    .frame();
    let mut malformed = 0;
    // Every truncation inside the headers (the kernel needs 14 bytes at least).
    for frame in [&syn4, &syn6] {
        for len in 14..frame.len() {
            let cut = &frame[..len];
            assert_eq!(p.run_xdp(cut).unwrap(), XDP_PASS, "truncated to {len}");
            malformed += 1;
            // The kernel's skb test harness refuses frames shorter than the
            // Ethernet header plus a minimal IP header; those it accepts must pass.
            match p.run_tc(cut) {
                Ok(v) => {
                    assert_eq!(v, TC_ACT_UNSPEC, "truncated to {len}");
                    malformed += 1;
                }
                Err(e) => assert!(len < 14 + 20 + 20, "TC test run of {len} bytes failed: {e}"),
            }
        }
    }
    let mut bad_ihl = syn4.clone();
    bad_ihl[14] = 0x44; // IHL 4 (16 bytes): below the minimum
    let mut bad_doff = syn4.clone();
    bad_doff[14 + 20 + 12] = 0x30; // TCP data offset 3
    let mut bad_version = syn4.clone();
    bad_version[14] = 0x65;
    // An IPv6 ethertype carrying version 4: the kernel drops it, so must we.
    let mut bad_version6 = syn6.clone();
    bad_version6[14] = 0x40;
    for f in [&bad_ihl, &bad_doff, &bad_version, &bad_version6] {
        assert_eq!(p.run_xdp(f).unwrap(), XDP_PASS);
        malformed += 1;
    }
    let mut fragment4 = syn4.clone();
    fragment4[14 + 6] = 0x00;
    fragment4[14 + 7] = 0x10; // fragment offset 16 (x 8 bytes)
    let fragment6 = {
        let mut f = Tcp {
            ext: vec![(44, 8)],
            ..Tcp::new("fd00::1", 1, "fd00::2", 2, SYN)
        }
        .frame();
        f[14 + 40 + 3] = 0x08; // fragment offset 1 (x 8 bytes)
        f
    };
    let mut udp = syn4.clone();
    udp[14 + 9] = 17;
    let mut arp = syn4.clone();
    arp[12] = 0x08;
    arp[13] = 0x06;
    let too_deep = Tcp {
        ext: vec![(60, 8); 7],
        ..Tcp::new("fd00::1", 1, "fd00::2", 2, SYN)
    }
    .frame();
    for f in [&fragment4, &fragment6, &udp, &arp, &too_deep] {
        assert_eq!(p.run_xdp(f).unwrap(), XDP_PASS);
    }
    let c = p.counters(0).unwrap();
    assert_eq!(event(&c, Event::ParseErrors), malformed);
    assert_eq!(event(&c, Event::Fragments), 2);
    assert_eq!(event(&c, Event::NotTcp), 2);
    assert_eq!(event(&c, Event::Ipv6ExtTooDeep), 1);
    assert_eq!(event(&c, Event::TcpSegments), 0);
    assert_eq!(flow_count(&p), 0, "no malformed frame may create a flow");
    assert!(
        c.states.iter().all(|n| *n == 0),
        "no state counted: {:?}",
        c.states
    );
}

/// A connection to a local server, seen as the host sees it: the client's
/// segments arrive through XDP, the server's leave through TC. The expected
/// states are the server's per RFC 9293 at each step.
#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn a_whole_connection_through_both_hooks() {
    let p = probe(1024, LOCAL);
    let (cip, sip) = ("fd00::9", "fd00::5"); // the server is local
    let client = |flags, seq, ack| Tcp::new(cip, 50_000, sip, 443, flags).seq(seq, ack);
    let server = |flags, seq, ack| Tcp::new(sip, 443, cip, 50_000, flags).seq(seq, ack);
    let local = |p: &Probe, s: TcpState| state_count(&p.counters(0).unwrap(), s);

    xdp(&p, &client(SYN, 100, 0));
    assert_eq!(
        local(&p, TcpState::SynRecv),
        0,
        "not before the host answers"
    );
    xdp(&p, &client(SYN, 100, 0)); // retransmitted SYN
    tc(&p, &server(SYN | ACK, 900, 101));
    assert_eq!(local(&p, TcpState::SynRecv), 1);
    xdp(&p, &client(SYN, 100, 0)); // and again, after the answer
    assert_eq!(local(&p, TcpState::SynRecv), 1);
    xdp(&p, &client(ACK, 101, 901));
    assert_eq!(
        (
            local(&p, TcpState::SynRecv),
            local(&p, TcpState::Established)
        ),
        (0, 1)
    );
    xdp(
        &p,
        &Tcp {
            payload: 200,
            ..client(ACK, 101, 901)
        },
    );
    tc(&p, &server(ACK, 901, 301));
    // A blind RST far outside the window leaves the connection alone.
    xdp(&p, &client(RST, 7_000_000, 0));
    assert_eq!(local(&p, TcpState::Established), 1);
    assert_eq!(event(&p.counters(0).unwrap(), Event::RstIgnored), 1);
    xdp(&p, &client(FIN | ACK, 301, 901));
    assert_eq!(
        (
            local(&p, TcpState::Established),
            local(&p, TcpState::CloseWait)
        ),
        (0, 1)
    );
    tc(&p, &server(FIN | ACK, 901, 302));
    assert_eq!(
        (local(&p, TcpState::CloseWait), local(&p, TcpState::LastAck)),
        (0, 1)
    );
    xdp(&p, &client(ACK, 302, 902));
    let c = p.counters(0).unwrap();
    assert!(
        c.states.iter().all(|n| *n == 0),
        "the server's socket is gone: {:?}",
        c.states
    );
    assert_eq!(
        (event(&c, Event::FlowsOpened), event(&c, Event::FlowsClosed)),
        (1, 1)
    );

    // The agent's sweep deletes the dead entry through the command program.
    assert_eq!(flow_count(&p), 1);
    let t = Timeouts {
        dead_grace: std::time::Duration::ZERO,
        ..Timeouts::default()
    };
    let stats = timers::sweep(&p, &mut SockDiag::open().unwrap(), &t).unwrap();
    assert_eq!(stats.reaped, 1);
    assert_eq!(flow_count(&p), 0);

    // Port reuse after the deletion starts afresh.
    xdp(&p, &client(SYN, 5000, 0));
    tc(&p, &server(SYN | ACK, 7000, 5001));
    assert_eq!(local(&p, TcpState::SynRecv), 1);
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn time_wait_expires_through_the_command_program() {
    let p = probe(1024, LOCAL);
    let (cip, sip) = ("10.1.1.1", "10.1.1.2"); // the client is local
    let local_client = |flags, seq, ack| Tcp::new(cip, 40_000, sip, 80, flags).seq(seq, ack);
    let remote_server = |flags, seq, ack| Tcp::new(sip, 80, cip, 40_000, flags).seq(seq, ack);
    tc(&p, &local_client(SYN, 1, 0));
    xdp(&p, &remote_server(SYN | ACK, 50, 2));
    tc(&p, &local_client(ACK, 2, 51));
    tc(&p, &local_client(FIN | ACK, 2, 51));
    xdp(&p, &remote_server(FIN | ACK, 51, 3));
    tc(&p, &local_client(ACK, 3, 52));
    let c = p.counters(0).unwrap();
    assert_eq!(state_count(&c, TcpState::TimeWait), 1);
    // Not yet: TIME_WAIT lasts 60 s.
    timers::sweep(&p, &mut SockDiag::open().unwrap(), &Timeouts::default()).unwrap();
    assert_eq!(state_count(&p.counters(0).unwrap(), TcpState::TimeWait), 1);
    let now = Timeouts {
        time_wait: std::time::Duration::ZERO,
        ..Timeouts::default()
    };
    let stats = timers::sweep(&p, &mut SockDiag::open().unwrap(), &now).unwrap();
    assert_eq!(stats.expired, 1);
    assert_eq!(state_count(&p.counters(0).unwrap(), TcpState::TimeWait), 0);
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn a_full_flow_map_is_counted_and_counts_stay_exact() {
    let p = probe(4, LOCAL);
    for port in 0..6 {
        tc(&p, &Tcp::new("10.0.0.2", 1000 + port, "10.0.0.1", 80, SYN));
    }
    let c = p.counters(0).unwrap();
    assert_eq!(event(&c, Event::MapFull), 2);
    assert_eq!(
        state_count(&c, TcpState::SynSent),
        4,
        "only stored flows are counted"
    );
    assert_eq!(flow_count(&p), 4);
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn forwarded_traffic_counts_nowhere_and_loopback_counts_both_ends() {
    let p = probe(1024, LOCAL);
    // Neither address is the host's: a router or bridge forwarding it sees the
    // segment at ingress and again at egress.
    let syn = Tcp::new("192.168.7.1", 1000, "192.168.7.2", 80, SYN);
    xdp(&p, &syn);
    tc(&p, &syn);
    let c = p.counters(0).unwrap();
    assert!(
        c.states.iter().all(|n| *n == 0),
        "forwarded: {:?}",
        c.states
    );
    // 127.0.0.0/8 is local without being listed: both ends count.
    xdp(&p, &Tcp::new("127.0.0.1", 1000, "127.0.0.7", 80, SYN));
    xdp(
        &p,
        &Tcp::new("127.0.0.7", 80, "127.0.0.1", 1000, SYN | ACK).seq(5, 1001),
    );
    let c = p.counters(0).unwrap();
    assert_eq!(
        (
            state_count(&c, TcpState::Established),
            state_count(&c, TcpState::SynRecv)
        ),
        (1, 1)
    );
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn local_addresses_follow_the_namespace() {
    let mut p = probe(1024, &["10.0.0.2"]);
    tc(&p, &Tcp::new("10.0.0.2", 1000, "10.0.0.1", 80, SYN));
    assert_eq!(state_count(&p.counters(0).unwrap(), TcpState::SynSent), 1);
    // 10.0.0.2 removed, 10.0.0.3 added: only the new address counts now.
    p.set_local_addresses(0, &["10.0.0.3".parse().unwrap()])
        .unwrap();
    tc(&p, &Tcp::new("10.0.0.2", 1001, "10.0.0.1", 80, SYN));
    tc(&p, &Tcp::new("10.0.0.3", 1002, "10.0.0.1", 80, SYN));
    assert_eq!(state_count(&p.counters(0).unwrap(), TcpState::SynSent), 2);
}

/// Thousands of random segments on a few tuples, through both programs, then
/// the timer sweep: at every check the per-state counters must equal what the
/// flow entries in the kernel hold for their local endpoints.
#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn counters_always_equal_what_the_entries_hold() {
    let p = probe(1024, LOCAL);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let flags = [
        SYN,
        SYN | ACK,
        ACK,
        ACK,
        ACK,
        FIN | ACK,
        RST,
        RST | ACK,
        FIN,
    ];
    let hosts = [
        ("10.0.0.2", "10.0.0.1"),
        ("fd00::2", "fd00::1"),
        ("127.0.0.1", "127.0.0.1"),
    ];
    let check = |p: &Probe, when: &str| {
        let mut held = [0i64; 16];
        for (_, e) in p.flow_entries().unwrap() {
            let w = Word(e.word);
            for side in [Side::A, Side::B] {
                let s = w.counted(side);
                if s != TcpState::None {
                    held[s as usize] += 1;
                }
            }
        }
        assert_eq!(p.counters(0).unwrap().states, held, "{when}");
        held.iter().sum::<i64>()
    };
    let mut counted = 0;
    for round in 0..20 {
        for _ in 0..1000 {
            let r = next();
            let (local, remote) = hosts[(r % 3) as usize];
            let port = 40_000 + (r >> 8) as u16 % 8;
            let f = flags[((r >> 16) % flags.len() as u64) as usize];
            let (seq, ack) = ((r >> 24) as u32 % 4 * 100, (r >> 40) as u32 % 4 * 100);
            let outbound = (r >> 60) & 1 == 1;
            let t = if outbound {
                Tcp::new(local, port, remote, 80, f).seq(seq, ack)
            } else {
                Tcp::new(remote, 80, local, port, f).seq(seq, ack)
            };
            if outbound && !local.starts_with("127.") {
                tc(&p, &t);
            } else {
                xdp(&p, &t);
            }
        }
        counted += check(&p, &format!("after round {round}"));
    }
    assert!(
        counted > 0,
        "the random segments must have opened some flows"
    );
    let now = Timeouts {
        time_wait: std::time::Duration::ZERO,
        fin_wait2: std::time::Duration::ZERO,
        syn_sent: std::time::Duration::ZERO,
        syn_recv: std::time::Duration::ZERO,
        dead_grace: std::time::Duration::ZERO,
        clock: None,
        kernel_reports: false,
        observed: false,
    };
    let mut diag = SockDiag::open().unwrap();
    timers::sweep(&p, &mut diag, &now).unwrap();
    check(&p, "after the sweep");
    timers::sweep(&p, &mut diag, &now).unwrap();
    check(&p, "after the second sweep");
}

/// Port reuse: a new SYN on a tuple whose local end is in TIME_WAIT; the
/// kernel lets it through the time-wait socket and answers with a SYN-ACK,
/// which ends the old connection and starts the new one.
#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn a_syn_on_a_time_wait_tuple_starts_a_new_counted_flow() {
    let p = probe(1024, LOCAL);
    let (cip, sip) = ("10.1.1.9", "10.1.1.1"); // the server is local
    let client = |flags, seq, ack| Tcp::new(cip, 41_000, sip, 80, flags).seq(seq, ack);
    let server = |flags, seq, ack| Tcp::new(sip, 80, cip, 41_000, flags).seq(seq, ack);
    xdp(&p, &client(SYN, 1, 0));
    tc(&p, &server(SYN | ACK, 500, 2));
    xdp(&p, &client(ACK, 2, 501));
    tc(&p, &server(FIN | ACK, 501, 2));
    xdp(&p, &client(FIN | ACK, 2, 502));
    tc(&p, &server(ACK, 502, 3));
    let c = p.counters(0).unwrap();
    assert_eq!(state_count(&c, TcpState::TimeWait), 1);
    xdp(&p, &client(SYN, 90_000, 0));
    let c = p.counters(0).unwrap();
    assert_eq!(
        state_count(&c, TcpState::TimeWait),
        1,
        "until the kernel answers"
    );
    tc(&p, &server(SYN | ACK, 700_000, 90_001));
    let c = p.counters(0).unwrap();
    assert_eq!(
        (
            state_count(&c, TcpState::TimeWait),
            state_count(&c, TcpState::SynRecv)
        ),
        (0, 1)
    );
    assert_eq!(
        (event(&c, Event::FlowsOpened), event(&c, Event::FlowsClosed)),
        (2, 1)
    );
}
