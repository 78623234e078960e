//! Whole conversations replayed segment by segment, with the expected Linux
//! state of each endpoint after each step (as `ss` shows it on a real host
//! for the same exchange).

use super::sim::*;
use crate::{
    flow::{EndSeq, Word},
    machine::*,
    state::TcpState::{self, *},
};

#[test]
fn three_way_handshake_from_every_vantage_point() {
    for (c, s) in PLACEMENTS {
        let mut sim = Sim::new(c, s);
        sim.handshake();
        assert_eq!(sim.word.is_local(C), c);
        assert_eq!(sim.word.is_local(S), s);
        assert!(!sim.word.is_dead());
    }
}

#[test]
fn active_close_by_client_walks_both_endpoints_through_every_state() {
    for (c, s) in PLACEMENTS {
        let mut sim = Sim::new(c, s);
        sim.handshake();
        sim.send(C, ACK, 100);
        sim.send(S, ACK, 0);
        sim.send(C, FIN | ACK, 0);
        assert_eq!(sim.states(), (FinWait1, CloseWait));
        sim.send(S, ACK, 0);
        assert_eq!(sim.states(), (FinWait2, CloseWait));
        sim.send(S, ACK, 50); // half-closed: the server may still send data
        assert_eq!(sim.states(), (FinWait2, CloseWait));
        sim.send(S, FIN | ACK, 0);
        assert_eq!(sim.states(), (TimeWait, LastAck));
        sim.send(C, ACK, 0);
        assert_eq!(sim.states(), (TimeWait, Close));
        // A local client still has a TIME_WAIT socket; a remote one leaves nothing local.
        assert_eq!(sim.word.is_dead(), !c);
    }
}

#[test]
fn active_close_by_server_puts_server_in_time_wait() {
    for (c, s) in PLACEMENTS {
        let mut sim = Sim::new(c, s);
        sim.handshake();
        sim.send(S, FIN | ACK, 0);
        assert_eq!(sim.states(), (CloseWait, FinWait1));
        // The client's ACK of the FIN rides on its own FIN (delayed ACK).
        sim.send(C, FIN | ACK, 0);
        assert_eq!(sim.states(), (LastAck, TimeWait));
        sim.send(S, ACK, 0);
        assert_eq!(sim.states(), (Close, TimeWait));
        assert_eq!(sim.word.is_dead(), !s);
    }
}

#[test]
fn fin_that_does_not_ack_our_fin_is_a_simultaneous_close() {
    let mut sim = Sim::new(true, true);
    sim.handshake();
    // Both FINs are built before either is delivered: they cross.
    let fin_c = sim.seg(C, FIN | ACK, 0);
    let fin_s = sim.seg(S, FIN | ACK, 0);
    sim.deliver(C, &fin_c);
    sim.deliver(S, &fin_s);
    assert_eq!(sim.states(), (Closing, Closing));
    // Each acknowledges the other's FIN.
    let ack_c = Segment {
        flags: ACK,
        meta: 0,
        seq: fin_c.end(),
        ack: fin_s.end(),
        len: 0,
    };
    let ack_s = Segment {
        flags: ACK,
        meta: 0,
        seq: fin_s.end(),
        ack: fin_c.end(),
        len: 0,
    };
    sim.deliver(C, &ack_c);
    assert_eq!(sim.states(), (Closing, TimeWait));
    sim.deliver(S, &ack_s);
    assert_eq!(sim.states(), (TimeWait, TimeWait));
    assert!(!sim.word.is_dead());
}

#[test]
fn simultaneous_open_ends_established_on_both_sides() {
    for (c, s) in PLACEMENTS {
        let mut sim = Sim::new(c, s);
        let syn_c = sim.seg(C, SYN, 0);
        let syn_s = sim.seg(S, SYN, 0);
        sim.deliver(C, &syn_c);
        sim.deliver(S, &syn_s);
        // A local endpoint moves on what its kernel sends, not on the SYN it receives.
        let c_after = if c { SynSent } else { SynRecv };
        assert_eq!(sim.states(), (c_after, SynSent));
        // Each answers the other's SYN with a SYN-ACK.
        let sa_c = Segment {
            flags: SYN | ACK,
            meta: 0,
            seq: syn_c.seq,
            ack: syn_s.end(),
            len: 0,
        };
        let sa_s = Segment {
            flags: SYN | ACK,
            meta: 0,
            seq: syn_s.seq,
            ack: syn_c.end(),
            len: 0,
        };
        sim.deliver(C, &sa_c);
        sim.deliver(S, &sa_s);
        assert_eq!(
            sim.states(),
            (Established, Established),
            "placement {c} {s}"
        );
    }
}

#[test]
fn retransmitted_syn_synack_and_fin_move_nothing_twice() {
    for (c, s) in PLACEMENTS {
        let mut sim = Sim::new(c, s);
        let syn = sim.send(C, SYN, 0);
        sim.deliver(C, &syn);
        assert_eq!(sim.states(), (SynSent, sim.after_syn()));
        let synack = sim.send(S, SYN | ACK, 0);
        sim.deliver(S, &synack);
        assert_eq!(sim.states(), (Established, SynRecv));
        sim.send(C, ACK, 0);
        // A late copy of the SYN-ACK after the handshake completed.
        sim.deliver(S, &synack);
        assert_eq!(sim.states(), (Established, Established));
        let fin = sim.send(C, FIN | ACK, 0);
        sim.deliver(C, &fin);
        assert_eq!(sim.states(), (FinWait1, CloseWait));
        sim.send(S, ACK, 0);
        sim.deliver(C, &fin);
        assert_eq!(sim.states(), (FinWait2, CloseWait));
        let fin_s = sim.send(S, FIN | ACK, 0);
        sim.send(C, ACK, 0);
        assert_eq!(sim.states(), (TimeWait, Close));
        // The server's FIN again (our ACK was lost): TIME_WAIT stays and re-arms.
        let touched = sim.touched;
        if c {
            sim.deliver(S, &fin_s);
            assert_eq!(sim.states(), (TimeWait, Close));
            assert_eq!(sim.touched, touched + 1);
        }
    }
}

#[test]
fn valid_rst_aborts_both_endpoints() {
    for (c, s) in PLACEMENTS {
        let mut sim = Sim::new(c, s);
        sim.handshake();
        sim.send(C, ACK, 10);
        sim.send(S, ACK, 0);
        sim.send(S, RST | ACK, 0);
        assert_eq!(sim.states(), (Close, Close));
        assert!(sim.word.is_dead());
        assert_eq!(sim.rst_ignored, 0);
    }
}

#[test]
fn rst_with_unacknowledged_data_in_flight_is_still_valid() {
    // The server sent data the client has not acknowledged yet; its RST carries
    // a sequence number past the client's last ACK but within what was sent.
    let mut sim = Sim::new(true, false);
    sim.handshake();
    sim.send(S, ACK, 500);
    sim.send(S, RST | ACK, 0);
    assert_eq!(sim.states(), (Close, Close));
}

#[test]
fn blind_or_stale_rst_from_remote_is_ignored() {
    let mut sim = Sim::new(true, false);
    sim.handshake();
    sim.send(C, ACK, 10);
    sim.send(S, ACK, 20);
    sim.send(C, ACK, 0);
    let blind = Segment {
        flags: RST,
        meta: 0,
        seq: sim.seq[S.index()].wrapping_add(1_000_000),
        ack: 0,
        len: 0,
    };
    sim.deliver(S, &blind);
    let stale = Segment {
        flags: RST,
        meta: 0,
        seq: sim.seq[S.index()].wrapping_sub(20),
        ack: 0,
        len: 0,
    };
    sim.deliver(S, &stale);
    assert_eq!(sim.states(), (Established, Established));
    assert_eq!(sim.rst_ignored, 2);
}

#[test]
fn rst_refusing_a_syn_ends_the_attempt_only_if_it_acks_the_syn() {
    let mut sim = Sim::new(true, false);
    let syn = sim.send(C, SYN, 0);
    let wrong = Segment {
        flags: RST | ACK,
        meta: 0,
        seq: 0,
        ack: syn.end().wrapping_add(7),
        len: 0,
    };
    sim.deliver(S, &wrong);
    assert_eq!(sim.states(), (SynSent, SynRecv));
    assert_eq!(sim.rst_ignored, 1);
    let refuse = Segment {
        flags: RST | ACK,
        meta: 0,
        seq: 0,
        ack: syn.end(),
        len: 0,
    };
    sim.deliver(S, &refuse);
    assert_eq!(sim.states(), (Close, Close));
    assert!(sim.word.is_dead());
}

#[test]
fn rst_kills_time_wait() {
    let mut sim = Sim::new(true, false);
    sim.handshake();
    sim.send(C, FIN | ACK, 0);
    sim.send(S, FIN | ACK, 0);
    sim.send(C, ACK, 0);
    assert_eq!(sim.states(), (TimeWait, Close));
    // The peer, its socket gone, answers a late segment with an RST in window.
    sim.send(S, RST, 0);
    assert_eq!(sim.states(), (Close, Close));
    assert!(sim.word.is_dead());
}

/// The entry keeps no FIN sequence number: a FIN is acknowledged when the
/// ACK covers the sender's `snd_nxt`, which the FIN sets exactly and nothing
/// after it moves.
#[test]
fn a_fin_is_acknowledged_by_its_own_end_whatever_else_was_seen() {
    for (c, s) in PLACEMENTS {
        let mut sim = Sim::new(c, s);
        sim.handshake();
        let forged = |sim: &Sim, ahead: u32| Segment {
            flags: ACK,
            meta: 0,
            seq: sim.seq[C.index()].wrapping_add(ahead),
            ack: sim.rcv[C.index()],
            len: 100,
        };
        // A segment claiming data far beyond what the client sent...
        sim.deliver(C, &forged(&sim, 50_000));
        sim.send(C, FIN | ACK, 0);
        assert_eq!(sim.states(), (FinWait1, CloseWait));
        // ...and another past the FIN: neither hides the FIN's ACK.
        sim.deliver(C, &forged(&sim, 9_000));
        sim.send(S, ACK, 0);
        assert_eq!(sim.states(), (FinWait2, CloseWait));
        sim.send(S, FIN | ACK, 0);
        assert_eq!(sim.states(), (TimeWait, LastAck));
        sim.send(C, ACK, 0);
        assert_eq!(sim.states(), (TimeWait, Close));
    }
}

#[test]
fn new_syn_on_a_time_wait_tuple_starts_afresh() {
    for (c, s) in PLACEMENTS {
        let mut sim = Sim::new(c, s);
        sim.handshake();
        sim.send(S, FIN | ACK, 0);
        sim.send(C, FIN | ACK, 0);
        sim.send(S, ACK, 0);
        assert_eq!(sim.states(), (Close, TimeWait));
        sim.seq = [90_000, 7_000_000];
        sim.send(C, SYN, 0);
        // A local TIME_WAIT stays until its kernel answers.
        let server = if s { TimeWait } else { SynRecv };
        assert_eq!(sim.states(), (SynSent, server));
        sim.send(S, SYN | ACK, 0);
        sim.send(C, ACK, 0);
        assert_eq!(sim.states(), (Established, Established));
        // The old connection's FIN must not be remembered: the server's
        // facts are those of its new SYN-ACK.
        assert_eq!(sim.ends[S.index()].snd_nxt, 7_000_001);
        sim.send(C, FIN | ACK, 0);
        assert_eq!(sim.states(), (FinWait1, CloseWait));
    }
}

/// A tuple reused through the server's TIME_WAIT: the client's new
/// connection remembers nothing of its old one. Its old FIN, kept, would
/// make its new FIN look like a retransmission and leave it in CLOSE_WAIT
/// when the server closes first again.
#[test]
fn a_tuple_reused_through_a_servers_time_wait_closes_like_a_new_one() {
    for (c, s) in PLACEMENTS {
        let mut sim = Sim::new(c, s);
        sim.server_closes_first();
        sim.seq = [90_000, 7_000_000];
        sim.send(C, SYN, 0);
        assert_eq!(sim.word.facts(C) & Word::FIN, 0, "placement {c} {s}");
        sim.send(S, SYN | ACK, 0);
        sim.send(C, ACK, 0);
        sim.send(C, ACK, 100);
        sim.send(S, ACK, 0);
        assert_eq!(sim.states(), (Established, Established));
        sim.send(S, FIN | ACK, 0);
        sim.send(C, ACK, 0);
        assert_eq!(sim.states(), (CloseWait, FinWait2), "placement {c} {s}");
        sim.send(C, FIN | ACK, 0);
        assert_eq!(sim.states(), (LastAck, TimeWait), "placement {c} {s}");
        sim.send(S, ACK, 0);
        assert_eq!(sim.states(), (Close, TimeWait), "placement {c} {s}");
    }
}

/// A SYN the TIME_WAIT does not take (its sequence number is not past the
/// old connection's): the kernel answers with the old connection's ACK,
/// the client answers that with an RST, which ends the TIME_WAIT, and stays
/// SYN_SENT: Linux never leaves SYN_SENT by sending an RST. Its SYN, sent
/// again a second later, opens the connection.
#[test]
fn a_challenged_syn_leaves_the_client_connecting_until_it_retries() {
    for (c, s) in PLACEMENTS {
        let mut sim = Sim::new(c, s);
        sim.server_closes_first();
        let isn = sim.seq[C.index()].wrapping_sub(5000);
        sim.seq[C.index()] = isn;
        sim.send(C, SYN, 0);
        let challenge = sim.seg(S, ACK, 0);
        sim.deliver(S, &challenge);
        let rst = Segment {
            flags: RST,
            meta: sim.meta(C),
            seq: challenge.ack,
            ack: 0,
            len: 0,
        };
        sim.deliver(C, &rst);
        assert_eq!(sim.states(), (SynSent, Close), "placement {c} {s}");
        assert_eq!(sim.rst_ignored, 0, "placement {c} {s}");
        // The SYN again, as it was.
        let syn = Segment {
            flags: SYN,
            meta: sim.meta(C),
            seq: isn,
            ack: 0,
            len: 0,
        };
        sim.deliver(C, &syn);
        assert_eq!(
            sim.states(),
            (SynSent, sim.after_syn()),
            "placement {c} {s}"
        );
        sim.rcv[S.index()] = isn.wrapping_add(1);
        sim.seq[S.index()] = 8_000_000;
        sim.send(S, SYN | ACK, 0);
        sim.send(C, ACK, 0);
        assert_eq!(
            sim.states(),
            (Established, Established),
            "placement {c} {s}"
        );
        assert_eq!(sim.handshakes_failed, 0, "no attempt failed");
        sim.send(S, FIN | ACK, 0);
        sim.send(C, FIN | ACK, 0);
        sim.send(S, ACK, 0);
        assert_eq!(sim.states(), (Close, TimeWait), "placement {c} {s}");
    }
}

/// A restart on a reused tuple forgets the old connection's facts of both
/// endpoints, also of the one that has not sent yet: here a local client
/// reuses its port while its old connection is in TIME_WAIT, and the remote
/// server's old facts must not judge its new SYN-ACK.
#[test]
fn a_reused_tuple_forgets_the_old_connections_facts_of_both_ends() {
    let mut sim = Sim::new(true, false);
    sim.handshake();
    sim.send(C, FIN | ACK, 0);
    sim.send(S, FIN | ACK, 0);
    sim.send(C, ACK, 0);
    assert_eq!(sim.states(), (TimeWait, Close));
    sim.seq = [500, 100];
    sim.send(C, SYN, 0);
    assert_eq!(sim.states(), (SynSent, SynRecv));
    assert_eq!(
        sim.word.facts(S),
        0,
        "nothing of the server's old connection"
    );
    sim.send(S, SYN | ACK, 0);
    sim.send(C, ACK, 0);
    assert_eq!(sim.states(), (Established, Established));
    sim.send(S, RST, 0);
    assert_eq!(sim.states(), (Close, Close));
    assert_eq!(sim.rst_ignored, 0);
}

#[test]
fn a_dead_entry_is_reopened_by_a_syn_and_ignores_everything_else() {
    let mut sim = Sim::new(true, false);
    sim.handshake();
    sim.send(S, RST | ACK, 0);
    assert!(sim.word.is_dead());
    let before = sim.word;
    sim.send(S, ACK, 10);
    sim.send(C, FIN | ACK, 0);
    assert_eq!(sim.word, before);
    sim.handshake();
    assert!(!sim.word.is_dead());
}

#[test]
fn reaping_entries_are_left_alone() {
    let w = Word::EMPTY.reaping();
    let seg = Segment {
        flags: SYN,
        meta: 0,
        seq: 1,
        ack: 0,
        len: 0,
    };
    let st = step(w, &EndSeq::default(), &EndSeq::default(), C, EGRESS, &seg);
    assert_eq!(st.word, w);
}

#[test]
fn segments_without_syn_never_open_a_flow() {
    for flags in [ACK, FIN | ACK, RST, RST | ACK, ACK | 0x08] {
        let seg = Segment {
            flags,
            meta: 0,
            seq: 1,
            ack: 1,
            len: 0,
        };
        let st = step(
            Word::EMPTY,
            &EndSeq::default(),
            &EndSeq::default(),
            C,
            INGRESS,
            &seg,
        );
        assert_eq!(st.word.counted(S), TcpState::None, "flags {flags:#x}");
        assert_eq!(st.word.counted(C), TcpState::None, "flags {flags:#x}");
    }
}

#[test]
fn only_local_endpoints_are_counted() {
    let mut sim = Sim::new(false, true);
    sim.handshake();
    assert_eq!(sim.word.counted(C), TcpState::None);
    assert_eq!(sim.word.counted(S), Established);
}

#[test]
fn expiry_closes_one_side_and_kills_the_entry_when_nothing_local_remains() {
    let mut sim = Sim::new(true, false);
    sim.handshake();
    sim.send(C, FIN | ACK, 0);
    sim.send(S, FIN | ACK, 0);
    sim.send(C, ACK, 0);
    let w = expire(sim.word, C);
    assert_eq!(w.state(C), Close);
    assert!(w.is_dead());
}

#[test]
fn the_steady_fast_path_agrees_with_step_everywhere_it_applies() {
    let mut applied = 0;
    for bits in 0u32..(1 << 18) {
        // The asked bits (18, 19) are the agent's: the same with them set.
        let bits = bits | if bits % 3 == 0 { 3 << 18 } else { 0 };
        let word = Word(bits);
        for sender in [C, S] {
            for flags in 0u8..=0x3f {
                let ends = [
                    EndSeq {
                        snd_nxt: 500,
                        ack: 9000,
                    },
                    EndSeq {
                        snd_nxt: 9000,
                        ack: 500,
                    },
                ];
                let seg = Segment {
                    flags,
                    meta: 0,
                    seq: ends[sender.index()].snd_nxt,
                    ack: 777,
                    len: 10,
                };
                if !is_steady(word, &seg) {
                    continue;
                }
                // The probe skips the fast path's lookup when this is false.
                assert!(seg.may_be_steady(), "{flags:#x}");
                applied += 1;
                // The locality the entry already records: steady segments
                // belong to entries whose local marks were set at creation.
                let local = Locality {
                    sender: word.is_local(sender),
                    receiver: word.is_local(sender.other()),
                };
                let st = step(
                    word,
                    &ends[sender.index()],
                    &ends[sender.other().index()],
                    sender,
                    local,
                    &seg,
                );
                assert_eq!(st.word, word, "{word:?} {sender:?} {flags:#x}");
                assert_eq!(st.sender, steady_facts(ends[sender.index()], &seg));
                assert!(!st.reset_receiver && !st.touch && !st.rst_ignored);
            }
        }
    }
    assert!(applied > 0);
}

#[test]
fn events_count_syns_to_local_endpoints_resets_and_failed_handshakes() {
    // A completed handshake and close: one SYN to a local server, nothing failed.
    for (c, s) in PLACEMENTS {
        let mut sim = Sim::new(c, s);
        sim.handshake();
        sim.send(C, FIN | ACK, 0);
        sim.send(S, FIN | ACK, 0);
        sim.send(C, ACK, 0);
        assert_eq!(sim.syns_to_local, s as u32, "{c} {s}");
        assert_eq!((sim.resets, sim.handshakes_failed), (0, 0));
    }
    // A refused connection: the SYN answered by RST+ACK. A local client
    // failed its handshake (the kernel's AttemptFails); a local server had
    // no socket to fail, and a refusal is no reset (EstabResets).
    for (c, s) in PLACEMENTS {
        let mut sim = Sim::new(c, s);
        let syn = sim.send(C, SYN, 0);
        // Retransmitted: another attempt seen, no second state move.
        sim.deliver(C, &syn);
        let refuse = Segment {
            flags: RST | ACK,
            meta: 0,
            seq: 0,
            ack: syn.end(),
            len: 0,
        };
        sim.deliver(S, &refuse);
        assert_eq!(sim.word.counted(C), None);
        assert_eq!(sim.word.counted(S), None);
        assert_eq!(sim.syns_to_local, 2 * s as u32);
        assert_eq!(sim.resets, 0);
        assert_eq!(sim.handshakes_failed, c as u32, "{c} {s}");
    }
    // A blind RST is not a reset.
    let mut sim = Sim::new(true, false);
    sim.handshake();
    let blind = Segment {
        flags: RST,
        meta: 0,
        seq: sim.seq[S.index()].wrapping_add(1 << 30),
        ack: 0,
        len: 0,
    };
    sim.deliver(S, &blind);
    assert_eq!((sim.resets, sim.rst_ignored), (0, 1));
    // An established connection reset is a reset, not a failed handshake.
    sim.send(S, RST, 0);
    assert_eq!((sim.resets, sim.handshakes_failed), (1, 0));
}
