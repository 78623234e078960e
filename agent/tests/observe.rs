//! `run --observe` on a router, and on a bridge, against ground truth: a
//! namespace that only forwards (or bridges) between two others. While real connections pass through it
//! (handshakes, closes by either side, a half close, resets, a refused
//! connect, a churn of short connections, then one port used again and
//! again through the server's TIME_WAIT), the agent's observed counts
//! are compared every 100 ms with both ends' `ss -tan` together, and its
//! own counts with the router's `ss -tan`, which its own connections move
//! at the same time: each difference must be gone within a second.
//! Needs root: `cargo xtask test` runs these.

mod support;

use std::{
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::sleep,
    time::{Duration, Instant},
};

use support::{
    Agent, Netns, abort,
    http::{free_port, http_get},
    require_root,
    routed::Routed,
    sockaddr, table,
};
use tcpstate::snapshot::StateCounts;
use tcpstate_common::TcpState;

/// The longest a difference may last.
const LIMIT: Duration = Duration::from_secs(1);

/// An address as an ss filter names it.
fn ss_host(ip: &str) -> String {
    if ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_owned()
    }
}

/// One end's ss of what passes through the router: its connections to the
/// router's own addresses left out, and LISTEN (no segment shows a
/// listener, so an observer counts none).
fn end_ss(ns: &Netns, router: &[String; 2]) -> StateCounts {
    let (v4, v6) = (ss_host(&router[0]), ss_host(&router[1]));
    let mut c = if v4.is_empty() {
        ns.ss_counts()
    } else {
        ns.ss_counts_where(&["not", "(", "dst", &v4, "or", "dst", &v6, ")"])
    };
    c.set(TcpState::Listen, 0);
    c
}

/// Both ends' ss together: what an observer in the middle must count.
fn ends_ss(net: &Routed) -> StateCounts {
    end_ss(&net.left, &net.router_left).plus(&end_ss(&net.right, &net.router_right))
}

/// Every state's truth lies between the agent's two reads around it.
fn bracketed(a: &StateCounts, truth: &StateCounts, b: &StateCounts) -> bool {
    TcpState::REPORTED.iter().all(|s| {
        let (x, y) = (a.get(*s), b.get(*s));
        (x.min(y)..=x.max(y)).contains(&truth.get(*s))
    })
}

/// How long a comparison stayed unequal, at most, and what it looked like.
#[derive(Default)]
struct Apart {
    since: Option<Instant>,
    longest: Duration,
    worst: String,
    samples: usize,
    equal: usize,
}

impl Apart {
    fn note(&mut self, equal: bool, ours: &StateCounts, truth: &StateCounts) {
        self.samples += 1;
        if equal {
            self.equal += 1;
            self.since = None;
            return;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() > self.longest {
            self.longest = since.elapsed();
            self.worst = table(ours, truth);
        }
    }

    fn assert_within(&self, what: &str) {
        assert!(self.samples >= 20, "{what}: only {} samples", self.samples);
        assert!(
            self.longest < LIMIT,
            "{what}: tcpstate and ss stayed apart for {:?} ({} of {} samples equal); the longest difference:\n{}",
            self.longest,
            self.equal,
            self.samples,
            self.worst
        );
        eprintln!(
            "{what}: {} of {} samples equal, longest difference {:?}",
            self.equal, self.samples, self.longest
        );
    }
}

/// Samples both comparisons every 100 ms until `stop`.
fn sample(agent: &Agent, net: &Routed, stop: &AtomicBool) -> (Apart, Apart) {
    let (mut observed, mut host) = (Apart::default(), Apart::default());
    while !stop.load(Ordering::Relaxed) {
        let (a, truth, b) = (agent.observed(), ends_ss(net), agent.observed());
        observed.note(bracketed(&a, &truth, &b), &b, &truth);
        let (a, truth, b) = (agent.counts(), net.router.ss_counts(), agent.counts());
        host.note(bracketed(&a, &truth, &b), &b, &truth);
        sleep(Duration::from_millis(100));
    }
    (observed, host)
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn accept(l: &TcpListener) -> TcpStream {
    l.accept().expect("accept").0
}

/// The settled counts must be equal (waits up to `LIMIT` for them).
fn assert_settled(agent: &Agent, net: &Routed, what: &str) -> StateCounts {
    let deadline = Instant::now() + LIMIT;
    loop {
        let (ours, truth) = (agent.observed(), ends_ss(net));
        if ours == truth {
            return truth;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: observed counts and both ends' ss differ\n{}",
            table(&ours, &truth)
        );
        sleep(Duration::from_millis(50));
    }
}

/// The router's own connections, which its host counts must show and its
/// observed counts must not: one each way, one closed (TIME_WAIT).
fn own_connections(net: &Routed, fam: usize) -> Box<dyn std::any::Any + Send> {
    let l = &net.left_addr[fam];
    let at_router = net.router.listen(&sockaddr(&net.router_left[fam], 7300));
    let own_in = (
        net.left.connect(at_router.local_addr().unwrap()),
        accept(&at_router),
    );
    let at_left_for_router = net.left.listen(&sockaddr(l, 7301));
    let to = at_left_for_router.local_addr().unwrap();
    let (c, s) = (net.router.connect(to), accept(&at_left_for_router));
    drop(c);
    sleep(Duration::from_millis(100));
    drop(s);
    Box::new((at_router, own_in, at_left_for_router))
}

/// The scenario, over addresses of family `fam` (0: IPv4, 1: IPv6).
fn scenario(net: &Routed, agent: &Agent, fam: usize) -> Vec<Box<dyn std::any::Any + Send>> {
    let (l, r) = (&net.left_addr[fam], &net.right_addr[fam]);
    let mut held: Vec<Box<dyn std::any::Any + Send>> = Vec::new();
    if !net.router_left[fam].is_empty() {
        held.push(own_connections(net, fam));
    }
    let at_left = net.left.listen(&sockaddr(l, 7101));
    let at_right = net.right.listen(&sockaddr(r, 7102));
    let to_left: SocketAddr = at_left.local_addr().unwrap();
    let to_right: SocketAddr = at_right.local_addr().unwrap();
    let mut pairs: Vec<(TcpStream, TcpStream)> = (0..7)
        .map(|i| {
            if i % 2 == 0 {
                (net.right.connect(to_left), accept(&at_left))
            } else {
                (net.left.connect(to_right), accept(&at_right))
            }
        })
        .collect();
    let seen = assert_settled(agent, net, "seven established");
    assert_eq!(
        seen.get(TcpState::Established),
        14,
        "both ends of seven connections"
    );

    // Normal closes, each side first once: a TIME_WAIT at each end.
    let (c, s) = pairs.remove(0);
    drop(s);
    sleep(Duration::from_millis(100));
    drop(c);
    let (c, s) = pairs.remove(0);
    drop(c);
    sleep(Duration::from_millis(100));
    drop(s);
    // A half close: FIN_WAIT2 at one end, CLOSE_WAIT at the other.
    let (c, s) = pairs.remove(0);
    c.shutdown(Shutdown::Write).unwrap();
    held.push(Box::new((c, s)));
    // Resets, by the client and by the server.
    let (c, s) = pairs.remove(0);
    abort(c);
    drop(s);
    let (c, s) = pairs.remove(0);
    abort(s);
    drop(c);
    // Refused: nothing listens there.
    let refused: SocketAddr = sockaddr(r, 7199).parse().unwrap();
    let res = net
        .left
        .run(|| TcpStream::connect_timeout(&refused, Duration::from_secs(2)));
    assert!(res.is_err(), "a connect to a closed port is refused");
    sleep(Duration::from_millis(300));
    let seen = assert_settled(agent, net, "closed, half closed, reset, refused");
    assert!(seen.get(TcpState::TimeWait) >= 2 && seen.get(TcpState::FinWait2) == 1);

    // A churn of short connections through the router, each way, half of
    // them closed server first: the clients' ports come round again while
    // the server's TIME_WAIT of an old connection on that tuple lingers.
    for i in 0..300 {
        let (c, s) = if i % 2 == 0 {
            (net.left.connect(to_right), accept(&at_right))
        } else {
            (net.right.connect(to_left), accept(&at_left))
        };
        if i % 4 < 2 {
            drop(c);
            drop(s);
        } else {
            drop(s);
            drop(c);
        }
        sleep(Duration::from_millis(10));
    }
    sleep(Duration::from_millis(500));
    assert_settled(agent, net, "after the churn");
    reuse_through_time_wait(net, agent, fam);
    held.push(Box::new((pairs, at_left, at_right)));
    held
}

/// Bytes that carry a server's expected sequence number past where the
/// client's next ISN on the same tuple will be for the next four seconds
/// (Linux's ISN clock ticks 15.6 million a second).
const PAST_THE_ISN_CLOCK: u64 = 64 << 20;

/// One client port, used again and again for connections the server
/// closes first: each new SYN meets the server's TIME_WAIT of the one
/// before. The client sends no timestamps, so the TIME_WAIT judges the SYN
/// by its sequence number alone. After a connection that carried
/// [`PAST_THE_ISN_CLOCK`] bytes the SYN is behind and challenged: the
/// TIME_WAIT answers with its old ACK, the client answers that with an RST
/// (which ends the TIME_WAIT) and stays SYN_SENT until it sends its SYN
/// again, moments later. After one that carried nothing, the SYN is taken.
/// Each connection is left closed for longer than a difference may last,
/// and the last SYN is taken, so nothing that follows hides a mistake.
fn reuse_through_time_wait(net: &Routed, agent: &Agent, fam: usize) {
    use std::io::{Read, Write};
    let at_right = net.right.listen(&sockaddr(&net.right_addr[fam], 7104));
    let to = at_right.local_addr().unwrap();
    let from: SocketAddr = sockaddr(&net.left_addr[fam], 7400).parse().unwrap();
    net.left.sysctl("net.ipv4.tcp_timestamps=0");
    let (mut taken, mut challenged) = (0, 0);
    for i in 0..6 {
        let rsts = net.left.snmp("Tcp", "OutRsts");
        let mut c = net.left.connect_from(from, to);
        let mut s = accept(&at_right);
        match (i, net.left.snmp("Tcp", "OutRsts") > rsts) {
            (0, _) => {}
            (_, true) => challenged += 1,
            (_, false) => taken += 1,
        }
        if i % 3 == 0 {
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    c.write_all(&vec![0; PAST_THE_ISN_CLOCK as usize])
                        .expect("send")
                });
                let read =
                    std::io::copy(&mut (&mut s).take(PAST_THE_ISN_CLOCK), &mut std::io::sink());
                assert_eq!(read.expect("receive"), PAST_THE_ISN_CLOCK);
            });
        }
        drop(s);
        sleep(Duration::from_millis(100));
        drop(c);
        sleep(LIMIT + Duration::from_millis(100));
    }
    net.left.sysctl("net.ipv4.tcp_timestamps=1");
    assert!(
        taken >= 1 && challenged >= 1,
        "both ways through a TIME_WAIT: {taken} SYNs taken, {challenged} challenged"
    );
    eprintln!("reused through TIME_WAIT: {taken} SYNs taken, {challenged} challenged");
    assert_settled(agent, net, "after reusing a port through TIME_WAIT");
}

fn observed_scenario(net: Routed, fam: usize) {
    require_root();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let agent = Agent::start(&net.router, &["--observe", "--metrics", &listen]);
    let view = agent.in_netns(&net.router.name);
    let stop = Arc::new(AtomicBool::new(false));
    let (observed, host) = std::thread::scope(|s| {
        let sampler = s.spawn(|| sample(&view, &net, &stop));
        // Stops the sampler also when the scenario panics (the scope waits
        // for it before the panic goes on).
        let _stop = StopOnDrop(&stop);
        let held = scenario(&net, &agent, fam);
        sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        let out = sampler.join().expect("the sampler");
        drop(held);
        out
    });
    observed.assert_within("observed counts against both ends' ss");
    host.assert_within("the router's own counts against its ss");

    // The exporter says the same, under names of their own.
    let truth = assert_settled(&agent, &net, "at the end");
    let (_, body) = http_get(&listen, "/metrics", None);
    for s in TcpState::REPORTED {
        let line = format!(
            "tcpstate_observed_connections{{state=\"{}\"}} {}",
            s.name().to_ascii_lowercase(),
            truth.get(s)
        );
        assert!(body.lines().any(|l| l == line), "no {line:?} in\n{body}");
    }
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_router_observing_counts_what_passes_as_both_ends_do_ipv4() {
    observed_scenario(Routed::new(), 0);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_router_observing_counts_what_passes_as_both_ends_do_ipv6() {
    observed_scenario(Routed::new(), 1);
}

/// A bridge with no address of its own: every frame it sees passes
/// through (in on one port, out on the other); its own counts stay 0.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_bridge_observing_counts_what_passes_as_both_ends_do() {
    observed_scenario(Routed::bridged(), 0);
}

/// Where the ends' sysctls shorten a timed state, `--observe-timeouts`
/// says so: both ends end orphaned FIN_WAIT2 sockets after 3 s
/// (`tcp_fin_timeout`), and so must the observer, sampled as they do.
#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn observed_timers_last_as_long_as_given() {
    require_root();
    let net = Routed::new();
    for end in [&net.left, &net.right] {
        end.sysctl("net.ipv4.tcp_fin_timeout=3");
    }
    let agent = Agent::start(
        &net.router,
        &["--observe", "--observe-timeouts", "fin-wait2=3s"],
    );
    let view = agent.in_netns(&net.router.name);
    let (l, r) = (&net.left_addr[0], &net.right_addr[0]);
    let at_left = net.left.listen(&sockaddr(l, 7111));
    let at_right = net.right.listen(&sockaddr(r, 7112));
    let stop = AtomicBool::new(false);
    let (observed, _) = std::thread::scope(|s| {
        let sampler = s.spawn(|| sample(&view, &net, &stop));
        let _stop = StopOnDrop(&stop);
        // Each way: the client closes, the server keeps its socket (CLOSE_WAIT),
        // and the client's orphan waits in FIN_WAIT2 for its timer.
        let mut servers = Vec::new();
        for (from, to, l) in [
            (&net.left, &at_right, &at_right),
            (&net.right, &at_left, &at_left),
        ] {
            let c = from.connect(to.local_addr().unwrap());
            servers.push(accept(l));
            drop(c);
        }
        sleep(Duration::from_millis(500));
        let seen = assert_settled(&agent, &net, "two orphans in FIN_WAIT2");
        assert_eq!(seen.get(TcpState::FinWait2), 2);
        sleep(Duration::from_secs(4));
        let seen = assert_settled(&agent, &net, "after their 3 s");
        assert_eq!(seen.get(TcpState::FinWait2), 0, "both ends ended them");
        assert_eq!(seen.get(TcpState::CloseWait), 2);
        stop.store(true, Ordering::Relaxed);
        let out = sampler.join().expect("the sampler");
        drop(servers);
        out
    });
    observed.assert_within("observed counts against both ends' ss");
}

/// `--observe-timeouts` without `--observe`, or naming no timed state: one
/// clear line, and nothing starts.
#[test]
fn observe_timeouts_misused_are_refused_clearly() {
    for (args, says) in [
        (&["--observe-timeouts", "fin-wait2=3s"][..], "--observe"),
        (
            &["--observe", "--observe-timeouts", "established=3s"][..],
            "the timed states are time-wait, fin-wait2, syn-sent, syn-recv",
        ),
        (
            &["--observe", "--observe-timeouts", "time-wait=soon"][..],
            "is not a duration",
        ),
    ] {
        let out = support::tcpstate()
            .arg("run")
            .args(args)
            .output()
            .expect("tcpstate runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(err.contains(says), "{args:?}: no {says:?} in\n{err}");
    }
}
