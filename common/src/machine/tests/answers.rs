//! A local endpoint moves on what its kernel does, not on what it receives:
//! SYNs the kernel drops, SYN cookies, SYN-ACKs to a socket that is gone,
//! the ACK of a full accept queue, a TIME_WAIT a SYN may or may not end,
//! a close the kernel reported before the FIN left; ICMP errors; and the
//! kernel's own reports.

use super::sim::*;
use crate::{
    flow::{EndSeq, Side, Word},
    machine::*,
    state::TcpState::{self, *},
};

#[test]
fn a_syn_alone_leaves_a_local_server_without_a_socket() {
    for client_local in [false, true] {
        let mut sim = Sim::new(client_local, true);
        let syn = sim.send(C, SYN, 0);
        // Retransmitted, as clients do when the kernel drops their SYNs.
        for _ in 0..3 {
            sim.deliver(C, &syn);
        }
        assert_eq!(sim.word.counted(S), None, "no SYN_RECV before a SYN-ACK");
        assert_eq!(sim.syns_to_local, 4);
        // The kernel answers: now it has a request socket.
        sim.send(S, SYN | ACK, 0);
        assert_eq!(sim.word.counted(S), SynRecv);
    }
}

#[test]
fn a_syn_cookie_keeps_nothing_and_its_ack_makes_nothing() {
    let mut sim = Sim::new(false, true);
    sim.send(C, SYN, 0);
    let mut cookie = sim.seg(S, SYN | ACK, 0);
    cookie.meta = Segment::EGRESS | Segment::NO_SOCKET;
    assert!(cookie.is_syn_cookie());
    sim.deliver(S, &cookie);
    sim.seq[S.index()] = cookie.seq.wrapping_add(1);
    sim.rcv[C.index()] = cookie.seq.wrapping_add(1);
    assert_eq!(sim.word.counted(S), None);
    // If the kernel makes a socket of the cookie's ACK, it reports it; the
    // ACK alone makes nothing.
    sim.send(C, ACK, 0);
    assert_eq!(sim.word.counted(S), None);
    // The same SYN-ACK with its request socket attached is kept.
    let mut sim = Sim::new(false, true);
    sim.send(C, SYN, 0);
    sim.send(S, SYN | ACK, 0);
    assert_eq!(sim.word.counted(S), SynRecv);
}

#[test]
fn a_syn_ack_to_a_local_socket_that_is_gone_makes_no_connection() {
    let mut sim = Sim::new(true, false);
    sim.send(C, SYN, 0);
    // The kernel ended the connect (an ICMP error, a timeout): closed.
    sim.word = expire(sim.word, C);
    assert!(sim.word.is_dead());
    // A late SYN-ACK reopens the dead entry but finds no SYN_SENT socket.
    sim.send(S, SYN | ACK, 0);
    assert_eq!(sim.word.counted(C), None, "no phantom ESTABLISHED");
}

#[test]
fn where_the_kernel_reports_it_the_final_ack_does_not_complete_a_passive_open() {
    for mode in [0, Segment::KERNEL_EVENTS] {
        let mut sim = Sim::new(false, true);
        sim.mode = mode;
        sim.send(C, SYN, 0);
        sim.send(S, SYN | ACK, 0);
        sim.send(C, ACK, 0);
        // A full accept queue makes the kernel hold the request: only its
        // report says when the connection is really there.
        let want = if mode == 0 { Established } else { SynRecv };
        assert_eq!(sim.word.counted(S), want, "mode {mode}");
        // The active side needs no report: a SYN-ACK is proof enough.
        let mut sim = Sim::new(true, false);
        sim.mode = mode;
        sim.handshake();
        assert_eq!(sim.word.counted(C), Established);
    }
}

#[test]
fn a_local_time_wait_lasts_until_its_kernel_answers_a_new_syn() {
    // The kernel keeps the TIME_WAIT socket and answers with an ACK.
    let mut sim = Sim::new(false, true);
    sim.server_closes_first();
    sim.seq[C.index()] = sim.seq[C.index()].wrapping_sub(5000);
    sim.send(C, SYN, 0);
    assert_eq!(sim.word.counted(S), TimeWait);
    sim.send(S, ACK, 0);
    assert_eq!(sim.word.counted(S), TimeWait);
    // The kernel accepts a later SYN: the SYN-ACK starts a new connection.
    let mut sim = Sim::new(false, true);
    sim.server_closes_first();
    sim.seq = [90_000, 7_000_000];
    sim.send(C, SYN, 0);
    assert_eq!(sim.word.counted(S), TimeWait);
    sim.send(S, SYN | ACK, 0);
    assert_eq!(sim.word.counted(S), SynRecv);
    sim.send(C, ACK, 0);
    assert_eq!(sim.states(), (Established, Established));
}

/// `close()` with data still queued: the kernel reports FIN_WAIT1 before
/// the data and the FIN leave. ACKs of that data are not ACKs of the FIN.
#[test]
fn a_close_reported_before_the_fin_waits_for_the_fin_and_its_ack() {
    for (c, s) in PLACEMENTS {
        let mut sim = Sim::new(c, s);
        sim.handshake();
        sim.word = sim.word.with_state(C, FinWait1);
        let data = sim.send(C, ACK, 1000);
        sim.send(S, ACK, 0);
        assert_eq!(sim.states(), (FinWait1, Established), "data acknowledged");
        sim.send(C, FIN | ACK, 0);
        assert_eq!(sim.states(), (FinWait1, CloseWait));
        // A retransmission of the data does not move the FIN's end.
        sim.deliver(C, &data);
        sim.send(S, ACK, 0);
        assert_eq!(sim.states(), (FinWait2, CloseWait));
    }
}

#[test]
fn icmp_effects_are_the_kernels() {
    use IcmpEffect::*;
    // IPv4 destination unreachable: net and host unreachable drop requests
    // too; fragmentation needed is no error.
    assert_eq!(IcmpEffect::v4(3, 0), EndsRequest);
    assert_eq!(IcmpEffect::v4(3, 1), EndsRequest);
    for code in [2, 3, 5, 6, 9, 10, 13, 15] {
        assert_eq!(IcmpEffect::v4(3, code), EndsConnect, "code {code}");
    }
    assert_eq!(IcmpEffect::v4(3, 4), Nothing);
    assert_eq!(IcmpEffect::v4(3, 16), Nothing);
    assert_eq!(IcmpEffect::v4(11, 0), EndsRequest);
    assert_eq!(IcmpEffect::v4(11, 1), Nothing, "reassembly timeout");
    assert_eq!(IcmpEffect::v4(12, 0), EndsRequest);
    assert_eq!(IcmpEffect::v4(5, 0), Nothing, "redirect");
    assert_eq!(IcmpEffect::v4(0, 0), Nothing, "echo reply");
    // IPv6: the fatal codes drop requests, the rest end only a connect.
    for code in [0, 2, 3] {
        assert_eq!(IcmpEffect::v6(1, code), EndsConnect, "code {code}");
    }
    for code in [1, 4, 5, 6, 7] {
        assert_eq!(IcmpEffect::v6(1, code), EndsRequest, "code {code}");
    }
    assert_eq!(IcmpEffect::v6(2, 0), Nothing, "packet too big");
    assert_eq!(IcmpEffect::v6(3, 0), EndsConnect);
    assert_eq!(IcmpEffect::v6(4, 0), EndsRequest);
    assert_eq!(IcmpEffect::v6(128, 0), Nothing, "echo request");
}

#[test]
fn an_icmp_error_ends_a_connect_whose_syn_it_quotes() {
    let mut sim = Sim::new(true, false);
    let syn = sim.send(C, SYN, 0);
    let facts = sim.ends[C.index()];
    let w = sim.word;
    for effect in [IcmpEffect::EndsConnect, IcmpEffect::EndsRequest] {
        // The SYN's own sequence number.
        assert_eq!(
            icmp_error(w, &facts, C, effect, syn.seq, false).counted(C),
            None
        );
        // A quote of something this socket never sent is ignored.
        let stale = syn.seq.wrapping_sub(100);
        assert_eq!(icmp_error(w, &facts, C, effect, stale, false), w);
    }
    assert_eq!(
        icmp_error(w, &facts, C, IcmpEffect::Nothing, syn.seq, false),
        w
    );
    // Where the kernel reports its own changes, the connect's end is its to
    // say (it skips a socket its application holds locked).
    assert_eq!(
        icmp_error(w, &facts, C, IcmpEffect::EndsRequest, syn.seq, true),
        w
    );
    // A remote endpoint is not ours to end.
    assert_eq!(
        icmp_error(
            w,
            &sim.ends[S.index()],
            S,
            IcmpEffect::EndsRequest,
            0,
            false
        ),
        w
    );
}

#[test]
fn an_icmp_error_drops_a_request_only_when_it_is_fatal_for_one() {
    let mut sim = Sim::new(false, true);
    sim.send(C, SYN, 0);
    let synack = sim.send(S, SYN | ACK, 0);
    let facts = sim.ends[S.index()];
    let w = sim.word;
    for reports in [false, true] {
        assert_eq!(
            icmp_error(w, &facts, S, IcmpEffect::EndsRequest, synack.seq, reports).counted(S),
            None,
            "a request socket reports nothing: the error ends it either way"
        );
    }
    assert_eq!(
        icmp_error(w, &facts, S, IcmpEffect::EndsConnect, synack.seq, false),
        w
    );
    let other = synack.seq.wrapping_add(1);
    assert_eq!(
        icmp_error(w, &facts, S, IcmpEffect::EndsRequest, other, false),
        w
    );
    // Established connections only note a soft error.
    sim.send(C, ACK, 0);
    let w = sim.word;
    let facts = sim.ends[S.index()];
    assert_eq!(
        icmp_error(w, &facts, S, IcmpEffect::EndsRequest, synack.seq, false),
        w
    );
}

fn established(local: [bool; 2]) -> Word {
    let mut sim = Sim::new(local[0], local[1]);
    sim.handshake();
    sim.word
}

#[test]
fn kernel_reports_set_the_reporting_endpoint_and_nothing_else() {
    let w = established([true, false]);
    // close() with data queued: FIN_WAIT1 before the FIN is seen.
    let KernelChange::Set(fw1) = kernel_change(w, C, false, Established, FinWait1) else {
        panic!("a set")
    };
    assert_eq!((fw1.state(C), fw1.state(S)), (FinWait1, Established));
    assert_eq!(fw1.facts(C), w.facts(C), "the facts stay");
    // Said again: nothing.
    assert_eq!(
        kernel_change(fw1, C, false, Established, FinWait1),
        KernelChange::Nothing
    );
    // A timeout, an ICMP error, an application closing a connect: closed.
    for from in [SynSent, Established, FinWait1, CloseWait, LastAck] {
        let w = w.with_state(C, from);
        let KernelChange::Set(gone) = kernel_change(w, C, false, from, Close) else {
            panic!("{from:?}: a set")
        };
        assert_eq!(gone.counted(C), None, "{from:?}");
        assert!(gone.is_dead());
    }
    // FIN_WAIT2 and CLOSING may go on as TIME_WAIT sockets: ask.
    for from in [FinWait2, Closing] {
        let w = w.with_state(C, from);
        assert_eq!(kernel_change(w, C, false, from, Close), KernelChange::Ask);
    }
    // A TIME_WAIT the segments already showed outlives its full socket.
    let tw = w.with_state(C, TimeWait);
    assert_eq!(
        kernel_change(tw, C, false, FinWait2, Close),
        KernelChange::Nothing
    );
    // A remote endpoint's socket is not in this host.
    assert_eq!(
        kernel_change(w, S, false, Established, Close),
        KernelChange::Nothing
    );
    // LISTEN comes from the socket table; a child reports SYN_RECV before
    // its tuple is set.
    assert_eq!(
        kernel_change(w, C, false, Close, Listen),
        KernelChange::Nothing
    );
    assert_eq!(
        kernel_change(w, C, false, Listen, SynRecv),
        KernelChange::Nothing
    );
}

/// Applies the kernel's report `old -> new` about `side`'s socket, as the
/// probe does (a question changes nothing until answered).
fn report(sim: &mut Sim, side: Side, old: TcpState, new: TcpState) {
    if let KernelChange::Set(w) = kernel_change(sim.word, side, false, old, new) {
        sim.word = w;
    }
}

/// The probe sees an arriving segment before the kernel acts on it; the
/// kernel's reports come after. A FIN+ACK takes a local FIN_WAIT1 straight
/// to TIME_WAIT, then the kernel reports FIN_WAIT1 -> FIN_WAIT2 and, as the
/// TIME_WAIT socket takes over, FIN_WAIT2 -> CLOSE: neither may take the
/// endpoint back (under churn that left thousands in FIN_WAIT2 for seconds).
#[test]
fn reports_that_follow_the_segment_do_not_take_it_back() {
    for client_local in [false, true] {
        let mut sim = Sim::new(client_local, true);
        sim.handshake();
        report(&mut sim, S, Established, FinWait1);
        sim.send(S, FIN | ACK, 0);
        let fin = sim.send(C, FIN | ACK, 0);
        assert_eq!(sim.word.counted(S), TimeWait);
        report(&mut sim, S, FinWait1, FinWait2);
        assert_eq!(sim.word.counted(S), TimeWait, "FIN_WAIT2 reported late");
        assert_eq!(
            kernel_change(sim.word, S, false, FinWait2, Close),
            KernelChange::Nothing,
            "no question about a TIME_WAIT the segments showed"
        );
        // Its ACK of the peer's FIN, and the peer's retransmitted FIN.
        sim.send(S, ACK, 0);
        sim.deliver(C, &fin);
        assert_eq!(sim.word.counted(S), TimeWait);
    }
}

/// The ACK of our FIN and the peer's FIN handled on two CPUs at once: the
/// ACK hands the orphan over to a FIN_WAIT2 timewait socket while the FIN,
/// already seen on the wire, waits on the full socket and is dropped with
/// it. The report asks; the table says FIN_WAIT2; the resent FIN ends it.
#[test]
fn a_fin_the_closing_socket_dropped_is_asked_about_and_its_resend_counts() {
    for client_local in [false, true] {
        let mut sim = Sim::new(client_local, true);
        sim.handshake();
        report(&mut sim, S, Established, FinWait1);
        sim.send(S, FIN | ACK, 0);
        sim.send(C, ACK, 0);
        let fin = sim.send(C, FIN | ACK, 0);
        assert_eq!(
            sim.word.counted(S),
            TimeWait,
            "the FIN, as the wire shows it"
        );
        report(&mut sim, S, FinWait1, FinWait2);
        assert_eq!(
            kernel_report(
                sim.word,
                S,
                client_local,
                FinWait2,
                Close,
                Handover::FinWait2
            ),
            KernelChange::Ask,
            "the successor is a FIN_WAIT2: the FIN did not reach it"
        );
        // The kernel's table answers FIN_WAIT2.
        sim.word = sim.word.with_state(S, FinWait2);
        sim.deliver(C, &fin);
        assert_eq!(sim.word.counted(S), TimeWait, "the resent FIN");
    }
}

#[test]
fn a_kernel_report_about_a_socket_without_an_entry_makes_one() {
    // A connection completed from a SYN cookie, or on an interface the probe
    // does not watch: counted from the report, the remote peer guessed.
    let KernelChange::Set(w) = kernel_change(Word::EMPTY, Side::B, false, SynRecv, Established)
    else {
        panic!("a set")
    };
    assert_eq!(w.counted(Side::B), Established);
    assert_eq!(w.counted(Side::A), None);
    assert_eq!(w.state(Side::A), Established, "the peer, guessed");
    // Both ends on this host: the peer reports its own state.
    let KernelChange::Set(w) = kernel_change(Word::EMPTY, Side::B, true, SynSent, Established)
    else {
        panic!("a set")
    };
    assert_eq!(
        (w.counted(Side::A), w.counted(Side::B)),
        (None, Established)
    );
    assert!(w.is_local(Side::A));
    // A tuple whose old connection is over starts afresh.
    let old = established([true, false]).with_state(C, TimeWait).settle();
    let KernelChange::Set(w) = kernel_change(old, C, false, SynSent, Established) else {
        panic!("a set")
    };
    assert_eq!(
        w.facts(C) | w.facts(S),
        0,
        "the old connection's facts are gone"
    );
    assert_eq!(w.counted(C), Established);
}

#[test]
fn nothing_asks_about_a_reaping_entry() {
    let w = established([true, false]).reaping();
    for (old, new) in [
        (Established, Close),
        (FinWait2, Close),
        (Established, FinWait1),
    ] {
        assert_eq!(kernel_change(w, C, false, old, new), KernelChange::Nothing);
    }
    let _ = EndSeq::default();
    let _: TcpState = None;
}

/// Item 4 of the exactness work: once the agent set an endpoint to the
/// kernel's state (a check, a lookup, a report), the segments the peer goes
/// on resending (its SYN, SYN-ACK, data, FIN, ACKs) must not bring a state
/// back that the kernel does not have. The rule that guarantees it: a
/// received segment never makes a local socket the kernel has not made
/// (no SYN_RECV without a SYN-ACK sent, no ESTABLISHED out of anything but
/// SYN_SENT, a closed endpoint reopens only by what it sends itself), and
/// every rule fires only from the state before its transition.
#[test]
fn the_kernels_word_is_not_undone_by_what_the_peer_resends() {
    for mode in [0, Segment::KERNEL_EVENTS] {
        // The peer's whole repertoire, as the segments of a handshake, some
        // data and a close would be resent.
        let resend = |sim: &mut Sim, from: Side| {
            let mut out = Vec::new();
            for flags in [SYN, SYN | ACK, ACK, FIN | ACK] {
                for len in [0, 100] {
                    let mut seg = sim.seg(from, flags, len);
                    seg.seq = seg.seq.wrapping_sub(len);
                    out.push(seg);
                }
            }
            out
        };
        // A request the kernel dropped (timeout, closed listener): closed.
        // A connect the kernel gave up: closed. An established socket the
        // kernel ended silently: closed.
        for (client_local, setup) in [(false, "request"), (true, "connect"), (true, "established")]
        {
            let mut sim = Sim::new(client_local, !client_local);
            sim.mode = mode;
            let local = if client_local { C } else { S };
            let peer = local.other();
            sim.send(C, SYN, 0);
            if setup != "connect" {
                sim.send(S, SYN | ACK, 0);
            }
            if setup == "established" {
                sim.send(C, ACK, 0);
                sim.word = sim.word.with_state(local, Established);
            }
            sim.word = expire(sim.word, local);
            for seg in resend(&mut sim, peer) {
                sim.deliver(peer, &seg);
                assert_eq!(
                    sim.word.counted(local),
                    None,
                    "{setup}, mode {mode}: {seg:?} brought a socket back"
                );
            }
        }
        // A request the kernel holds (its accept queue full): the client's
        // resent ACKs and data do not complete it where the kernel reports
        // completions.
        if mode != 0 {
            let mut sim = Sim::new(false, true);
            sim.mode = mode;
            sim.send(C, SYN, 0);
            sim.send(S, SYN | ACK, 0);
            for _ in 0..3 {
                sim.send(C, ACK, 0);
                sim.send(C, ACK, 100);
                assert_eq!(sim.word.counted(S), SynRecv);
            }
        }
        // A FIN_WAIT2 its application holds: data and ACKs resent keep it.
        let mut sim = Sim::new(true, false);
        sim.mode = mode;
        sim.handshake();
        sim.send(C, FIN | ACK, 0);
        sim.send(S, ACK, 0);
        assert_eq!(sim.word.counted(C), FinWait2);
        for seg in resend(&mut sim, S)
            .into_iter()
            .filter(|s| s.flags & (SYN | FIN) == 0)
        {
            sim.deliver(S, &seg);
            assert_eq!(sim.word.counted(C), FinWait2, "{seg:?}");
        }
    }
    let _: TcpState = None;
    let _ = EndSeq::default();
    let _ = Word::EMPTY;
}

/// A sidecar proxy on loopback: the application's socket and the proxy's
/// have different tuples (a redirect), so each has an entry of its own, and
/// each segment also passes through its receiver's entry
/// ([`Segment::FOR_RECEIVER`]). In the proxy's entry the application's
/// address is local but is not that entry's socket: it never moves, or the
/// application would be counted twice.
#[test]
fn a_pass_for_the_receiver_moves_the_receiver_only() {
    fn to_proxy(sim: &mut Sim, flags: u8) {
        let mut seg = sim.seg(C, flags, 0);
        seg.meta |= Segment::FOR_RECEIVER;
        sim.deliver(C, &seg);
        let end = seg.seq.wrapping_add(((flags & (SYN | FIN)) != 0) as u32);
        sim.seq[C.index()] = end;
        sim.rcv[S.index()] = end;
    }
    let mut sim = Sim::new(true, true);
    to_proxy(&mut sim, SYN);
    assert_eq!(sim.word.counted(C), None, "not the application's entry");
    assert_eq!(sim.word.counted(S), None, "no request before the SYN-ACK");
    sim.send(S, SYN | ACK, 0);
    to_proxy(&mut sim, ACK);
    assert_eq!(
        (sim.word.counted(C), sim.word.counted(S)),
        (None, Established)
    );
    to_proxy(&mut sim, FIN | ACK);
    assert_eq!(
        (sim.word.counted(C), sim.word.counted(S)),
        (None, CloseWait)
    );
    sim.send(S, FIN | ACK, 0);
    to_proxy(&mut sim, ACK);
    assert_eq!((sim.word.counted(C), sim.word.counted(S)), (None, None));
}

/// A full socket that reports its close from FIN_WAIT2 or CLOSING shows
/// what took its place: nothing (still hashed: `tcp_max_tw_buckets`
/// reached, a reset), a TIME_WAIT socket, or an orphan's FIN_WAIT2. The
/// probe reads it and asks the agent nothing.
#[test]
fn a_close_from_fin_wait2_or_closing_says_what_took_over() {
    let w = established([true, false]);
    let counted = |c: KernelChange| match c {
        KernelChange::Set(n) => n.counted(C),
        other => panic!("a set, not {other:?}"),
    };
    for from in [FinWait2, Closing] {
        let w = w.with_state(C, from);
        let report = |h| kernel_report(w, C, false, from, Close, h);
        assert_eq!(report(Handover::Unknown), KernelChange::Ask);
        assert_eq!(report(Handover::AtLimit), KernelChange::Ask);
        assert_eq!(counted(report(Handover::TimeWait)), TimeWait);
    }
    let fw2 = w.with_state(C, FinWait2);
    assert_eq!(
        kernel_report(fw2, C, false, FinWait2, Close, Handover::FinWait2),
        KernelChange::Set(fw2.settle()),
        "the same state, stamped now: its timer starts"
    );
    // The segments showed a TIME_WAIT the kernel may have had no room for.
    let tw = w.with_state(C, TimeWait);
    for (h, then) in [
        (Handover::AtLimit, KernelChange::Ask),
        (Handover::Unknown, KernelChange::Nothing),
        // The peer's FIN, seen on the wire, had not reached the socket.
        (Handover::FinWait2, KernelChange::Ask),
    ] {
        assert_eq!(
            kernel_report(tw, C, false, FinWait2, Close, h),
            then,
            "{h:?}"
        );
    }
    assert_eq!(
        kernel_report(tw, C, false, FinWait2, Close, Handover::TimeWait),
        KernelChange::Nothing
    );
}
