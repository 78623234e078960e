//! Long accuracy scenarios, run by `cargo xtask accuracy` (not by
//! `cargo xtask test`: minutes each). Each compares the agent with `ss -tan`
//! of the monitored namespace and writes target/accuracy/<scenario>.json,
//! which xtask turns into the report.

mod support;

use std::{
    io::Read,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::sleep,
    time::{Duration, Instant},
};

use serde_json::json;
use support::{
    Agent, Netns, VethPair, require_root,
    sampler::{Gate, Sampler, Samples},
    sockaddr,
};
use tcpstate::snapshot::StateCounts;
use tcpstate_common::TcpState;

fn report(
    scenario: &str,
    settle: Duration,
    ours: &StateCounts,
    truth: &StateCounts,
    samples: &Samples,
    extra: serde_json::Value,
) {
    let states: serde_json::Map<String, serde_json::Value> = TcpState::REPORTED
        .iter()
        .map(|s| (s.name().to_owned(), json!([ours.get(*s), truth.get(*s)])))
        .collect();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/accuracy");
    std::fs::create_dir_all(&dir).unwrap();
    let row = json!({
        "scenario": scenario,
        "settle_s": (settle.as_secs_f64() * 100.0).round() / 100.0,
        "longest_s": (samples.longest.as_secs_f64() * 100.0).round() / 100.0,
        "equal_share": samples.share_equal(),
        "samples": samples.taken,
        "widest": samples.widest_text(),
        "quiet": samples.quiet.as_ref().map(|q| json!({
            "samples": q.taken,
            "equal": q.equal,
            "widest": q.widest_text(),
        })),
        "states": states,
        "extra": extra,
    });
    std::fs::write(
        dir.join(format!("{scenario}.json")),
        serde_json::to_string_pretty(&row).unwrap(),
    )
    .unwrap();
    let quiet = samples.quiet.as_ref().map_or(String::new(), |q| {
        format!("; while the traffic was held: {}", q.describe())
    });
    println!(
        "{scenario}: settled in {settle:?}; sampled against ss: {}{quiet}\n{}",
        samples.describe(),
        support::table(ours, truth)
    );
}

/// Time until the agent equals ss (checked every 100 ms, at most `limit`).
fn settle(agent: &Agent, ns: &Netns, limit: Duration) -> (Duration, StateCounts, StateCounts) {
    let start = Instant::now();
    loop {
        let (ours, truth) = (agent.counts(), ns.ss_counts());
        if ours == truth || start.elapsed() > limit {
            return (start.elapsed(), ours, truth);
        }
        sleep(Duration::from_millis(100));
    }
}

/// A server in `ns` that closes every connection first (TIME_WAIT there).
fn closing_server(listener: TcpListener, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((s, _)) => drop(s),
                Err(_) => sleep(Duration::from_micros(200)),
            }
        }
    })
}

/// Clients in `ns` that connect, wait for the server's close, and close.
fn clients(
    ns: &Netns,
    to: SocketAddr,
    threads: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    gate: Arc<Gate>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..threads)
        .map(|_| {
            let (stop, done, gate) = (stop.clone(), done.clone(), gate.clone());
            let file = std::fs::File::open(format!("/run/netns/{}", ns.name)).unwrap();
            std::thread::spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                let mut buf = [0u8; 16];
                while !stop.load(Ordering::Relaxed) {
                    // One cycle, closed by the time it returns (the server
                    // closed first: the read saw its FIN).
                    gate.pass(|| {
                        if let Ok(mut c) =
                            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
                        {
                            let _ = c.read(&mut buf);
                            done.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            })
        })
        .collect()
}

/// TIME_WAIT sockets drain 60 s after they were made: sampled every 200 ms,
/// tcpstate's TIME_WAIT count must follow ss's.
#[test]
#[ignore = "long: run through `cargo xtask accuracy`"]
fn time_wait_drain() {
    require_root();
    let net = VethPair::new();
    let agent = Agent::start(&net.left, &[]);
    let sampler = Sampler::start(&agent, &net.left);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let server = closing_server(net.left.listen(&sockaddr(&net.left_v4, 9000)), stop.clone());
    let to: SocketAddr = sockaddr(&net.left_v4, 9000).parse().unwrap();
    let workers = clients(
        &net.right,
        to,
        4,
        stop.clone(),
        done.clone(),
        Arc::new(Gate::default()),
    );
    sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    workers.into_iter().for_each(|w| w.join().unwrap());
    server.join().unwrap();
    let made = done.load(Ordering::Relaxed);
    let (settled, ours, truth) = settle(&agent, &net.left, Duration::from_secs(10));
    assert_eq!(
        ours,
        truth,
        "before the drain:\n{}",
        support::table(&ours, &truth)
    );
    let peak = truth.get(TcpState::TimeWait);
    assert!(
        peak > 1000,
        "enough TIME_WAIT sockets to watch drain: {peak}"
    );
    // The kernel fires TIME_WAIT timers in batches (timer wheel buckets):
    // a sample taken while a batch fires catches ss before or after it. So
    // each of tcpstate's samples is bracketed by an ss read before and after
    // it; in step means within the bracket (the count only falls here).
    let start = Instant::now();
    let (mut worst, mut reads) = (0i64, 0);
    // The worst sample: seconds into the drain, ss before, tcpstate, ss after.
    let mut worst_at = (0.0f64, 0i64, 0i64, 0i64);
    loop {
        let before = net.left.ss_counts().get(TcpState::TimeWait) as i64;
        let ours = agent.counts().get(TcpState::TimeWait) as i64;
        let after = net.left.ss_counts().get(TcpState::TimeWait) as i64;
        let outside = (after - ours).max(ours - before).max(0);
        if outside > worst {
            worst = outside;
            worst_at = (start.elapsed().as_secs_f64(), before, ours, after);
        }
        reads += 1;
        if before == 0 && ours == 0 || start.elapsed() > Duration::from_secs(75) {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    let drained = start.elapsed();
    let (_, ours, truth) = settle(&agent, &net.left, Duration::from_secs(5));
    let samples = sampler.finish();
    report(
        "time_wait_drain",
        settled,
        &ours,
        &truth,
        &samples,
        json!({"connections": made, "time_wait_peak": peak, "bracket_reads": reads, "worst_outside_ss_bracket": worst, "worst_sample_s_before_ours_after": worst_at, "drained_after_s": drained.as_secs_f64()}),
    );
    assert_eq!(ours, truth);
    // A timer armed within a jiffy of a bucket edge may land either side of
    // it: allow a per-mille of stragglers, no more.
    assert!(
        worst <= peak as i64 / 1000 + 2,
        "TIME_WAIT left the bracket of ss by {worst} (of {peak}) while draining"
    );
}

/// At least 5,000 connection open/close cycles a second for 60 s (the
/// server closes first, so TIME_WAIT piles up and ports are reused while their
/// old connection is still in TIME_WAIT), then equal to ss after settling.
/// While it runs, every quiet sample (the clients held for a moment) is
/// equal to ss.
#[test]
#[ignore = "long: run through `cargo xtask accuracy`"]
fn churn_60s() {
    require_root();
    let net = VethPair::new();
    net.right.sysctl("net.ipv4.ip_local_port_range=1024 65535");
    let agent = Agent::start(&net.left, &["--max-flows", "1048576"]);
    let gate = Arc::new(Gate::default());
    let sampler = Sampler::start_gated(&agent, &net.left, gate.clone());
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let server = closing_server(net.left.listen(&sockaddr(&net.left_v4, 9001)), stop.clone());
    let to: SocketAddr = sockaddr(&net.left_v4, 9001).parse().unwrap();
    let workers = clients(&net.right, to, 6, stop.clone(), done.clone(), gate);
    let start = Instant::now();
    sleep(Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    let ran = start.elapsed();
    workers.into_iter().for_each(|w| w.join().unwrap());
    server.join().unwrap();
    let cycles = done.load(Ordering::Relaxed);
    let rate = cycles as f64 / ran.as_secs_f64();
    let (settled, ours, truth) = settle(&agent, &net.left, Duration::from_secs(10));
    let samples = sampler.finish();
    let snap = agent.snapshot();
    report(
        "churn_60s",
        settled,
        &ours,
        &truth,
        &samples,
        json!({"cycles": cycles, "cycles_per_s": rate.round(), "events": snap.events}),
    );
    assert_eq!(
        ours,
        truth,
        "after churn:\n{}",
        support::table(&ours, &truth)
    );
    assert!(rate >= 5000.0, "churn rate {rate:.0}/s below 5,000/s");
    samples.assert_quiet_exact("churn");
}

/// Python helper: opens `n` connections to `addr` and holds them until its
/// standard input closes (a process holds at most 20,000 descriptors here).
const HOLDER: &str = r#"
import socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.connect((host, port))
    held.append(s)
print("ready", flush=True)
sys.stdin.read()
"#;

/// 100,000 concurrent connections in one namespace (the server side never
/// accepts them: the kernel completes them into a deep backlog, so they cost
/// no descriptors), equal to ss.
#[test]
#[ignore = "long: run through `cargo xtask accuracy`"]
fn connections_100k() {
    use std::{
        io::BufRead,
        process::{Command, Stdio},
    };
    require_root();
    let net = VethPair::new();
    net.left.sysctl("net.core.somaxconn=65535");
    net.left.sysctl("net.ipv4.tcp_max_syn_backlog=65535");
    net.right.sysctl("net.ipv4.ip_local_port_range=1024 65535");
    let agent = Agent::start(&net.left, &[]);
    let sampler = Sampler::start(&agent, &net.left);
    let listeners: Vec<TcpListener> = (0..2)
        .map(|i| {
            let addr: SocketAddr = sockaddr(&net.left_v4, 9100 + i).parse().unwrap();
            net.left.run(|| {
                use nix::sys::socket::{
                    AddressFamily, SockFlag, SockType, SockaddrIn, bind, socket,
                };
                let fd = socket(
                    AddressFamily::Inet,
                    SockType::Stream,
                    SockFlag::empty(),
                    None,
                )
                .unwrap();
                let SocketAddr::V4(v4) = addr else {
                    unreachable!()
                };
                bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(v4)).unwrap();
                // SAFETY: a valid socket descriptor; nix caps its backlog type at
                // SOMAXCONN, the kernel caps it at net.core.somaxconn (raised above).
                assert_eq!(
                    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&fd), 65535) },
                    0
                );
                TcpListener::from(fd)
            })
        })
        .collect();
    const TOTAL: usize = 100_000;
    const PER_HELPER: usize = 12_500;
    let start = Instant::now();
    let helpers: Vec<_> = (0..TOTAL / PER_HELPER)
        .map(|i| {
            let port = 9100 + (i % 2) as u16;
            let mut child = Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &net.right.name,
                    "python3",
                    "-c",
                    HOLDER,
                    &net.left_v4,
                ])
                .args([port.to_string(), PER_HELPER.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("python3 helper");
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(
                line.trim(),
                "ready",
                "helper {i} could not open its connections"
            );
            child
        })
        .collect();
    let opened = start.elapsed();
    let (settled, ours, truth) = settle(&agent, &net.left, Duration::from_secs(20));
    let established = truth.get(TcpState::Established);
    let samples = sampler.finish();
    let snap = agent.snapshot();
    report(
        "connections_100k",
        settled,
        &ours,
        &truth,
        &samples,
        json!({"opened_in_s": opened.as_secs_f64(), "map_full": snap.events["map_full"]}),
    );
    assert_eq!(
        ours,
        truth,
        "with {TOTAL} connections:\n{}",
        support::table(&ours, &truth)
    );
    assert!(established >= TOTAL as u64, "{established} established");
    for mut h in helpers {
        drop(h.stdin.take());
        let _ = h.wait();
    }
    drop(listeners);
}
