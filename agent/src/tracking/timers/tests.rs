use super::*;

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

fn word(a: TcpState, b: TcpState, a_local: bool) -> Word {
    let w = Word::EMPTY.with_state(Side::A, a).with_state(Side::B, b);
    if a_local {
        w.with_local(Side::A)
    } else {
        w.with_local(Side::B)
    }
}

fn nothing_told(_: Side) -> Option<Told> {
    None
}

#[test]
fn linux_default_retry_spans() {
    // tcp_synack_retries=5: a request is dropped after 63 s.
    assert_eq!(retries_span(5), Duration::from_secs(63));
    // tcp_syn_retries=6 with the default 4 linear timeouts: 11 SYNs, given
    // up 131 s after the first (127 s without linear timeouts).
    assert_eq!(syn_sent_span(6, 4), Duration::from_secs(131));
    assert_eq!(syn_sent_span(6, 0), Duration::from_secs(127));
    // Few retries: the time model (2^3 - 1 s) ends it first.
    assert_eq!(syn_sent_span(2, 4), Duration::from_secs(7));
}

#[test]
fn time_wait_fires_at_sixty_seconds_and_not_before() {
    let t = Timeouts::default();
    let w = word(TcpState::TimeWait, TcpState::Close, true).settle();
    let none = TellBook::default();
    assert_eq!(fire(w, 0, ns(Duration::from_secs(59)), &t, &none), None);
    let new = fire(w, 0, ns(Duration::from_secs(60)), &t, &none).expect("expired");
    assert_eq!(new.state(Side::A), TcpState::Close);
    assert!(new.is_dead());
    assert_eq!(
        plan(w, 0, &t, nothing_told),
        Some((ns(Duration::from_secs(60)), Action::Fire))
    );
}

#[test]
fn fin_wait2_and_requests_are_asked_not_closed() {
    let t = Timeouts::default();
    let fw2 = word(TcpState::FinWait2, TcpState::CloseWait, true);
    assert_eq!(
        plan(fw2, 0, &t, nothing_told),
        Some((ns(t.fin_wait2), Action::Ask(Side::A, Why::FinWait2)))
    );
    // Its deadline closes nothing by itself.
    let none = TellBook::default();
    assert_eq!(fire(fw2, 0, ns(Duration::from_secs(3600)), &t, &none), None);
    let req = word(TcpState::SynRecv, TcpState::SynSent, true);
    assert_eq!(
        plan(req, 0, &t, nothing_told),
        Some((ns(FIRST_REQUEST_LOOK), Action::Ask(Side::A, Why::Request)))
    );
}

#[test]
fn a_connect_has_a_timer_only_where_the_kernel_does_not_report() {
    let syn = word(TcpState::SynSent, TcpState::SynRecv, true);
    let t = Timeouts::default();
    assert_eq!(
        plan(syn, 7, &t, nothing_told),
        Some((7 + ns(t.syn_sent), Action::Ask(Side::A, Why::Connect)))
    );
    let reported = Timeouts {
        kernel_reports: true,
        ..Timeouts::default()
    };
    assert_eq!(plan(syn, 7, &reported, nothing_told), None);
}

#[test]
fn what_the_kernel_told_stands_while_the_word_does() {
    let t = Timeouts::default();
    let fw2 = word(TcpState::FinWait2, TcpState::CloseWait, true);
    let told = Told {
        word: fw2,
        at_ns: 42,
        action: Action::Fire,
    };
    assert_eq!(plan(fw2, 0, &t, |_| Some(told)), Some((42, Action::Fire)));
    let book = TellBook([Some(told), None]);
    let new = fire(fw2, 0, 42, &t, &book).expect("the orphan's timer fired");
    assert_eq!(new.counted(Side::A), TcpState::None);
    // The peer's FIN moved it on: what was told no longer applies.
    let tw = fw2.with_state(Side::A, TcpState::TimeWait);
    assert_eq!(
        plan(tw, 0, &t, |_| Some(told)),
        Some((ns(t.time_wait), Action::Fire))
    );
}

#[test]
fn remote_endpoints_and_untimed_states_are_left_alone() {
    let t = Timeouts::default();
    let remote_tw = word(TcpState::TimeWait, TcpState::Established, false);
    assert_eq!(plan(remote_tw, 0, &t, nothing_told), None);
    let est = word(TcpState::Established, TcpState::Established, true);
    assert_eq!(plan(est, 0, &t, nothing_told), None);
}

#[test]
fn with_the_kernels_wheel_time_wait_ends_at_the_bucket_end() {
    let clock = KernelClock {
        j0: 1_000_000,
        t0_ns: 4_000_000_000,
        hz: 250,
    };
    let t = Timeouts {
        clock: Some(clock),
        ..Timeouts::default()
    };
    let tw = word(TcpState::TimeWait, TcpState::Close, true).settle();
    let (at, _) = plan(tw, clock.t0_ns, &t, nothing_told).unwrap();
    // 15,000 jiffies ahead of jiffy 1,000,000: bucket end 1,015,296.
    assert_eq!(at, clock.t0_ns + (15_296 * 1_000_000_000 / 250));
    let none = TellBook::default();
    assert_eq!(fire(tw, clock.t0_ns, at - 1, &t, &none), None);
    assert!(fire(tw, clock.t0_ns, at, &t, &none).is_some());
}

#[test]
fn dead_entries_are_reaped_after_the_grace_period() {
    let t = Timeouts::default();
    let dead = word(TcpState::Close, TcpState::Close, true).settle();
    assert!(dead.is_dead());
    let none = TellBook::default();
    assert_eq!(fire(dead, 0, 0, &t, &none), None);
    assert_eq!(
        fire(dead, 0, ns(t.dead_grace), &t, &none),
        Some(dead.reaping())
    );
    assert_eq!(
        fire(dead.reaping(), 0, ns(Duration::from_secs(100)), &t, &none),
        None
    );
    assert_eq!(
        plan(dead, 5, &t, nothing_told),
        Some((5 + ns(t.dead_grace), Action::Fire))
    );
}

/// Connections passing through (`run --observe`): no socket to ask, so
/// each timed endpoint closes at Linux's default time for its state, each
/// on its own, and the other endpoint stays as it was.
#[test]
fn observed_endpoints_close_when_their_time_is_up_without_asking() {
    let t = Timeouts::default().observed();
    let both = |w: Word| w.with_local(Side::A).with_local(Side::B);
    let none = TellBook::default();
    let cases = [
        (TcpState::FinWait2, TcpState::CloseWait, t.fin_wait2),
        (TcpState::SynSent, TcpState::SynRecv, t.syn_recv),
        (TcpState::TimeWait, TcpState::Close, t.time_wait),
    ];
    for (a, b, first) in cases {
        let w = both(Word::EMPTY.with_state(Side::A, a).with_state(Side::B, b)).settle();
        let (at, action) = plan(w, 0, &t, nothing_told).expect("a deadline");
        assert_eq!((at, action), (ns(first), Action::Fire), "{a:?}/{b:?}");
        assert_eq!(fire(w, 0, at - 1, &t, &none), None, "{a:?}/{b:?} early");
        let new = fire(w, 0, at, &t, &none).expect("expired");
        let due: Vec<Side> = [Side::A, Side::B]
            .into_iter()
            .filter(|s| t.ends_at(w.state(*s), 0).is_some_and(|d| d <= at))
            .collect();
        for s in [Side::A, Side::B] {
            let want = if due.contains(&s) {
                TcpState::Close
            } else {
                w.state(s)
            };
            assert_eq!(new.state(s), want, "{a:?}/{b:?} side {s:?}");
        }
    }
    // SYN_SENT alone: its own (longer) span, not SYN_RECV's.
    let w = both(Word::EMPTY.with_state(Side::A, TcpState::SynSent));
    assert_eq!(
        plan(w, 0, &t, nothing_told),
        Some((ns(t.syn_sent), Action::Fire))
    );
}

#[test]
fn a_request_is_first_looked_up_well_within_a_second() {
    // A completion whose report never reached the probe leaves the entry
    // SYN_RECV until this look: it has to come with room to spare before
    // the 1 s that `ss` may differ, timer lateness included.
    let req = word(TcpState::SynRecv, TcpState::SynSent, true);
    let (at, action) = plan(req, 0, &Timeouts::default(), nothing_told).expect("a look");
    assert_eq!(action, Action::Ask(Side::A, Why::Request));
    assert!(
        at <= ns(Duration::from_millis(500)),
        "first look at {at} ns"
    );
}
