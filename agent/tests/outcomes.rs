//! How connections end and how long their steps take, against the kernel's
//! own answers: each outcome made by real traffic, its count equal to the
//! namespace's SNMP counters (AttemptFails, EstabResets, OutRsts) and to
//! what the test did, phase by phase; handshake and connect times equal to
//! what the connecting application measured, with the first SYN-ACK (or
//! SYN) lost so that the kernel's one-second retransmission is the answer;
//! time in CLOSE_WAIT equal to how long the test held it. Needs root:
//! `cargo xtask test` runs these.

mod support;

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpListener, TcpStream},
    thread::sleep,
    time::{Duration, Instant},
};

use support::{Agent, Netns, VethPair, abort, nft, nft_script, require_root, tcpstate};
use tcpstate::snapshot::{Snapshot, durations::Histogram, services::Service};
use tcpstate_common::durations::upper_bound_seconds;

/// Polls the agent until `f` holds (at most 5 s), returning the snapshot
/// that satisfied it; panics with `what` and the last snapshot's value.
fn until(agent: &Agent, what: &str, f: impl Fn(&Snapshot) -> bool) -> Snapshot {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let snap = agent.snapshot();
        if f(&snap) {
            return snap;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: not seen within 5 s; events {:?}, durations {:?}",
                snap.events, snap.durations
            );
        }
        sleep(Duration::from_millis(50));
    }
}

fn row<'a>(snap: &'a Snapshot, name: &str) -> &'a Histogram {
    snap.durations
        .get(name)
        .unwrap_or_else(|| panic!("the snapshot has no {name} row"))
}

fn event(snap: &Snapshot, name: &str) -> u64 {
    snap.events[name].as_u64().unwrap()
}

/// A connect from `ns` that takes as long as the kernel needs, timed as the
/// application sees it.
fn timed_connect(ns: &Netns, to: SocketAddr) -> (TcpStream, Duration) {
    ns.run(|| {
        let t = Instant::now();
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(10)).expect("connect");
        (s, t.elapsed())
    })
}

/// Connects while the first segment `rule` matches is dropped in `dropper`
/// (the rule is taken away after 300 ms, so the kernel's retransmission one
/// second later gets through).
fn connect_losing_first(
    client: &Netns,
    dropper: &Netns,
    rule: &str,
    to: SocketAddr,
) -> (TcpStream, Duration) {
    nft_script(
        dropper,
        &format!(
            "table inet lose {{\n chain c {{\n type filter hook input priority 0;\n {rule}\n }}\n}}\n"
        ),
    );
    std::thread::scope(|s| {
        let conn = s.spawn(|| timed_connect(client, to));
        sleep(Duration::from_millis(300));
        nft(dropper, "delete table inet lose");
        conn.join().expect("the connect thread")
    })
}

/// `n` connects from `client` to `addr`, held open: `name`'s row (of the
/// agent's snapshot) then counts `n`, each within a millisecond (bucket 4
/// ends at 1.05 ms) and no longer in all than the application's connects
/// and a millisecond each. Returns the row's sum.
fn fast_ones(
    agent: &Agent,
    name: &str,
    client: &Netns,
    addr: SocketAddr,
    n: u64,
    held: &mut Vec<TcpStream>,
) -> f64 {
    let mut waited = Duration::ZERO;
    for _ in 0..n {
        let (s, took) = timed_connect(client, addr);
        waited += took;
        held.push(s);
    }
    let snap = until(agent, name, |s| row(s, name).count() == n);
    let h = row(&snap, name);
    assert!(
        h.buckets[5..].iter().all(|n| *n == 0),
        "{name}: each within {} s: {:?}",
        upper_bound_seconds(4),
        h.buckets
    );
    assert!(
        h.sum_seconds() < waited.as_secs_f64() + 0.001 * n as f64,
        "{name}: {} s in all, the application's connects {waited:?}",
        h.sum_seconds()
    );
    h.sum_seconds()
}

/// One more connect, whose first segment `rule` matches is lost in
/// `dropper`: `name`'s row gains one observation within 10 ms of what the
/// application's connect() waited (over 0.9 s: the kernel's resend after
/// one second).
#[allow(clippy::too_many_arguments)]
fn one_lost(
    agent: &Agent,
    name: &str,
    client: &Netns,
    dropper: &Netns,
    rule: &str,
    addr: SocketAddr,
    before: (u64, f64),
    held: &mut Vec<TcpStream>,
) -> Snapshot {
    let (s, took) = connect_losing_first(client, dropper, rule, addr);
    held.push(s);
    assert!(
        took > Duration::from_millis(900),
        "{name}: nothing was lost: {took:?}"
    );
    let snap = until(agent, name, |s| row(s, name).count() == before.0 + 1);
    let ours = row(&snap, name).sum_seconds() - before.1;
    assert!(
        (ours - took.as_secs_f64()).abs() < 0.010,
        "{name}: {ours:.4} s by tcpstate, {took:?} by the application's connect()"
    );
    snap
}

/// Handshake time, on the answering side: five handshakes take well under a
/// millisecond; one whose first SYN-ACK the client's firewall drops takes
/// what the client's connect() took (the server's SYN-ACK retransmission
/// after its initial RTO of one second).
#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn handshake_time_is_the_syn_ack_retransmission_the_client_waited_for() {
    require_root();
    let net = VethPair::new();
    let addr: SocketAddr = format!("{}:7100", net.left_v4).parse().unwrap();
    let _listener: TcpListener = net.left.listen(&addr.to_string());
    let agent = Agent::start(&net.left, &[]);
    let mut held = Vec::new();
    let sum = fast_ones(&agent, "handshake", &net.right, addr, 5, &mut held);
    let rule = "tcp sport 7100 tcp flags & (syn | ack) == (syn | ack) drop";
    let snap = one_lost(
        &agent,
        "handshake",
        &net.right,
        &net.right,
        rule,
        addr,
        (5, sum),
        &mut held,
    );
    // SYN_RECV's own row holds the same six.
    assert_eq!(row(&snap, "syn_recv").count(), 6);

    // `tcpstate listeners` as a user runs it: the namespace's handshakes,
    // and the listener's own row (its port's; no SYN left unanswered).
    let v = listeners(&agent);
    let hs = &v[0]["handshakes"];
    assert_eq!(hs["count"], 6, "{v}");
    assert!(hs["p50_seconds"].as_f64().unwrap() < 0.001, "{v}");
    assert!(hs["p99_seconds"].as_f64().unwrap() > 0.5, "{v}");
    let row = listener_row(&agent, addr);
    assert!(row["handshake_p50_s"].as_f64().unwrap() < 0.001, "{row}");
    assert!(row["handshake_p99_s"].as_f64().unwrap() > 0.5, "{row}");
    assert_eq!(row["unanswered"], 0, "{row}");
    agent.assert_matches_ss(&net.left, "after the handshakes");
}

/// Connect time, on the connecting side: one whose first SYN the server's
/// firewall drops takes what the application's connect() took.
#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn connect_time_is_what_the_application_waited_for() {
    require_root();
    let net = VethPair::new();
    let addr: SocketAddr = format!("{}:7101", net.left_v4).parse().unwrap();
    let _listener: TcpListener = net.left.listen(&addr.to_string());
    let agent = Agent::start(&net.right, &[]);
    let mut held = Vec::new();
    let sum = fast_ones(&agent, "connect", &net.right, addr, 3, &mut held);
    let rule = "tcp dport 7101 tcp flags & (syn | ack) == syn drop";
    let snap = one_lost(
        &agent,
        "connect",
        &net.right,
        &net.left,
        rule,
        addr,
        (3, sum),
        &mut held,
    );
    assert_eq!(row(&snap, "syn_sent").count(), 4);
    agent.assert_matches_ss(&net.right, "after the connects");
}

/// `tcpstate listeners --json`, as a user runs it.
fn listeners(agent: &Agent) -> serde_json::Value {
    let out = tcpstate()
        .args(["listeners", "--json", "--socket"])
        .arg(&agent.socket)
        .output()
        .expect("tcpstate listeners");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `tcpstate listeners --json`'s row for `addr`.
fn listener_row(agent: &Agent, addr: SocketAddr) -> serde_json::Value {
    let v = listeners(agent);
    v[0]["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["local"] == addr.to_string())
        .unwrap_or_else(|| panic!("no listener {addr}: {v}"))
        .clone()
}

/// A listener whose accept queue is full drops every SYN (the kernel's
/// ListenOverflows and ListenDrops): its row's unanswered SYNs never
/// exceed the growth of ListenDrops while the clients retransmit (sampled
/// every 250 ms), and equal it once they stop.
#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn unanswered_syns_are_the_listen_drops_of_a_full_queue() {
    require_root();
    let net = VethPair::new();
    let (mon, peer) = (&net.left, &net.right);
    let addr: SocketAddr = format!("{}:7103", net.left_v4).parse().unwrap();
    let _never_accepts = mon.listen_backlog(addr, 1);
    let agent = Agent::start(mon, &[]);
    // The agent knows the port listens (its first look at the table).
    let deadline = Instant::now() + Duration::from_secs(5);
    while agent.snapshot().uptime_ms < 1500 {
        assert!(Instant::now() < deadline);
        sleep(Duration::from_millis(100));
    }
    // Two handshakes fill a queue of 1 (it holds 2).
    let _queued: Vec<TcpStream> = (0..2).map(|_| timed_connect(peer, addr).0).collect();
    let drops = || mon.snmp("TcpExt", "ListenDrops");
    let before = drops();
    let overflows = mon.snmp("TcpExt", "ListenOverflows");
    let unanswered = || listener_row(&agent, addr)["unanswered"].as_u64().unwrap();
    assert_eq!(unanswered(), 0, "the first two were answered");
    let clients: Vec<_> = (0..4)
        .map(|_| support::connect_nonblocking(peer, addr))
        .collect();
    // SYNs at 0, 1 and 3 s, each dropped.
    let start = Instant::now();
    let mut samples = 0;
    while start.elapsed() < Duration::from_millis(4500) {
        let ours = unanswered();
        let truth = drops() - before;
        assert!(
            ours <= truth,
            "{ours} SYNs unanswered by tcpstate, but the kernel dropped {truth}"
        );
        samples += 1;
        sleep(Duration::from_millis(250));
    }
    drop(clients);
    sleep(Duration::from_millis(200));
    let truth = drops() - before;
    assert!(
        truth >= 8,
        "four clients' SYNs were dropped at 0, 1 and 3 s: {truth}"
    );
    assert_eq!(
        mon.snmp("TcpExt", "ListenOverflows") - overflows,
        truth,
        "every drop was the full queue's"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ours = unanswered();
        if ours == truth {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tcpstate's unanswered SYNs {ours}, the kernel's ListenDrops grew {truth}"
        );
        sleep(Duration::from_millis(100));
    }
    // What needs attention (`top`, `watch --json`) names the port.
    let snap = agent.snapshot();
    let dropping: Vec<(u16, u64)> = snap
        .attention
        .dropping
        .iter()
        .map(|d| (d.port, d.recent))
        .collect();
    assert_eq!(dropping, [(7103, truth)], "what needs attention");
    println!("{samples} samples; {truth} SYNs dropped and counted unanswered");
}

/// The client namespace's outcomes so far, and its kernel's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Tally {
    normal: u64,
    refused: u64,
    timeout: u64,
    reset_local: u64,
    reset_remote: u64,
    attempt_fails: u64,
    estab_resets: u64,
    out_rsts: u64,
}

fn tally(agent: &Agent, ns: &Netns) -> Tally {
    let snap = agent.snapshot();
    Tally {
        normal: event(&snap, "closed_normal"),
        refused: event(&snap, "closed_refused"),
        timeout: event(&snap, "closed_handshake_timeout"),
        reset_local: event(&snap, "closed_reset_local"),
        reset_remote: event(&snap, "closed_reset_remote"),
        attempt_fails: ns.snmp("Tcp", "AttemptFails"),
        estab_resets: ns.snmp("Tcp", "EstabResets"),
        out_rsts: ns.snmp("Tcp", "OutRsts"),
    }
}

/// Waits until the outcomes reach `want` (counted from `base`) and checks
/// them, and the kernel's counters, against it.
fn expect(agent: &Agent, ns: &Netns, base: Tally, want: [u64; 5], phase: &str) -> Tally {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = tally(agent, ns);
    loop {
        let got = [
            now.normal - base.normal,
            now.refused - base.refused,
            now.timeout - base.timeout,
            now.reset_local - base.reset_local,
            now.reset_remote - base.reset_remote,
        ];
        if got == want || Instant::now() > deadline {
            assert_eq!(
                got, want,
                "{phase}: [normal, refused, handshake_timeout, reset_local, reset_remote]"
            );
            break;
        }
        sleep(Duration::from_millis(50));
        now = tally(agent, ns);
    }
    let [_, refused, timeout, reset_local, reset_remote] = want;
    assert_eq!(
        now.attempt_fails - base.attempt_fails,
        refused + timeout,
        "{phase}: refused and timed-out connects are the kernel's AttemptFails"
    );
    assert_eq!(
        now.estab_resets - base.estab_resets,
        reset_local + reset_remote,
        "{phase}: resets from ESTABLISHED are the kernel's EstabResets"
    );
    assert_eq!(
        now.out_rsts - base.out_rsts,
        reset_local,
        "{phase}: this host's resets are the RSTs it sent (OutRsts)"
    );
    now
}

/// Each outcome made by real traffic on the client's side, one phase at a
/// time: refused, timed out, reset by the client, reset by the server, and
/// closed normally after a CLOSE_WAIT the test held for a known time.
#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn each_outcome_is_counted_as_the_kernel_counts_it() {
    require_root();
    let net = VethPair::new();
    let (client, server) = (&net.right, &net.left);
    // Two tries (one retransmission) before a connect times out: 3 s.
    client.sysctl("net.ipv4.tcp_syn_retries=1");
    let at = |port: u16| -> SocketAddr { format!("{}:{port}", net.left_v4).parse().unwrap() };
    let listener = server.listen(&at(7102).to_string());
    let agent = Agent::start(client, &[]);
    let base = tally(&agent, client);

    for _ in 0..2 {
        let err = client
            .run(|| TcpStream::connect_timeout(&at(7199), Duration::from_secs(5)))
            .expect_err("nothing listens on 7199");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused);
    }
    let t = expect(&agent, client, base, [0, 2, 0, 0, 0], "refused");

    nft(server, "add table inet quiet");
    nft(
        server,
        "add chain inet quiet c { type filter hook input priority 0; }",
    );
    nft(server, "add rule inet quiet c tcp dport 7198 drop");
    std::thread::scope(|s| {
        let tries: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    client.run(|| TcpStream::connect_timeout(&at(7198), Duration::from_secs(20)))
                })
            })
            .collect();
        for t in tries {
            let err = t.join().unwrap().expect_err("SYNs to 7198 are dropped");
            assert_eq!(err.kind(), ErrorKind::TimedOut, "the kernel gave up");
        }
    });
    let t = expect(&agent, client, t, [0, 0, 2, 0, 0], "timed out");

    let pair = || {
        let c = client.connect(at(7102));
        let (s, _) = listener.accept().expect("accept");
        (c, s)
    };
    let mut servers = Vec::new();
    for _ in 0..2 {
        let (c, s) = pair();
        abort(c);
        servers.push(s);
    }
    let t = expect(&agent, client, t, [0, 0, 0, 2, 0], "reset by the client");

    let mut clients = Vec::new();
    for _ in 0..2 {
        let (c, s) = pair();
        abort(s);
        clients.push(c);
    }
    let t = expect(&agent, client, t, [0, 0, 0, 0, 2], "reset by the server");

    // The server closes first: the client sits in CLOSE_WAIT for as long
    // as the test holds it, then closes through LAST_ACK.
    let closing: Vec<(TcpStream, TcpStream)> = (0..3).map(|_| pair()).collect();
    let mut clients = Vec::new();
    for (c, s) in closing {
        drop(s);
        clients.push(c);
    }
    let waiting = Instant::now();
    let deadline = waiting + Duration::from_secs(5);
    while client.ss_counts().get(tcpstate_common::TcpState::CloseWait) < 3 {
        assert!(Instant::now() < deadline, "the FINs arrive");
        sleep(Duration::from_millis(5));
    }
    let seen = waiting.elapsed();
    sleep(Duration::from_millis(800));
    let held = waiting.elapsed();
    drop(clients);
    let t = expect(&agent, client, t, [3, 0, 0, 0, 0], "closed normally");
    let snap = until(&agent, "three CLOSE_WAITs left", |s| {
        row(s, "close_wait").count() == 3
    });
    let mean = row(&snap, "close_wait").mean_seconds().unwrap();
    let (low, high) = ((held - seen).as_secs_f64(), held.as_secs_f64());
    assert!(
        mean >= low - 0.005 && mean <= high + 0.005,
        "CLOSE_WAIT lasted {mean:.4} s on average; the test held it {low:.4} to {high:.4} s"
    );
    assert_eq!(row(&snap, "last_ack").count(), 3);
    let _ = t;

    // The same ends, per upstream: what each port's connects came to.
    let snap = agent.snapshot();
    let upstream = |port: u16| {
        snap.services
            .iter()
            .find(|s| s.service == Service::Remote(at(port)))
            .unwrap_or_else(|| panic!("no row for upstream {port}: {:?}", snap.services))
    };
    let closed = |port| upstream(port).closed.by_outcome().map(|(_, n)| n);
    assert_eq!(closed(7199), [0, 2, 0, 0, 0], "refused by 7199");
    assert_eq!(closed(7198), [0, 0, 2, 0, 0], "never answered by 7198");
    assert_eq!(
        closed(7102),
        [3, 0, 0, 2, 2],
        "7102's normal closes and resets"
    );
    assert_eq!(upstream(7102).times.count(), 7, "seven connects completed");
    let failing: Vec<(String, u64)> = snap
        .attention
        .failing
        .iter()
        .map(|f| (f.service.clone(), f.recent))
        .collect();
    for port in [7199, 7198] {
        assert!(
            failing.contains(&(format!("→{}", at(port)), 2)),
            "{port} fails lately: {failing:?}"
        );
    }
    assert_eq!(failing.len(), 2, "7102 never failed: {failing:?}");
    agent.assert_matches_ss(client, "after every outcome");
    drop(servers);
}
