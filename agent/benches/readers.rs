//! `cargo xtask bench`: the time to read the eleven counts with 1,000,
//! 10,000, 100,000 and 1,000,000 connections in the monitored namespace, as
//! each tool a user might pick reads them, in the same run:
//!
//! - `tcpstate count` (a process asking the agent: O(1) counters + LISTEN);
//! - `ss -tan | awk '{++a[$1]} END {...}'`;
//! - `netstat -tan | awk '{++a[$6]} END {...}'`;
//! - node_exporter's way: one netlink inet_diag dump, counted by state
//!   (done in-process here, so without the cost of a process start).
//!
//! The connections are real and ESTABLISHED: clients in a peer namespace
//! connect to listeners in the monitored one, whose ends stay in the
//! listeners' accept queues (they need no descriptor there). A process may
//! hold 20,000 descriptors here and may not raise that, so the clients live
//! in holder processes of [`PER_HOLDER`] connections each: this bench binary
//! started again with [`HOLD`]. `ss` and `netstat` run through
//! `nsenter --net`, which only joins the namespace. Before timing, the
//! agent's counts must equal `ss`'s. Also reports the agent's resident
//! memory and its CPU share while the connections sit idle (20 s; 60 s at
//! a million), and how late its timers fired meanwhile: a trickle of 25
//! orphaned FIN_WAIT2 sockets a second (`tcp_fin_timeout` 1 s) keeps its
//! timers busy while it walks the flow maps and checks the socket table.
//! Writes target/bench/readers.json.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use netlink_packet_sock_diag::inet::StateFlags;
use serde_json::json;
use support::{Agent, Netns, VethPair, machine::cpu_seconds, memory_kb, sockaddr};
use tcpstate::{
    kernel::{netns::NetNs, sockdiag::SockDiag},
    snapshot::upkeep::{Runs, Upkeep},
};
use tcpstate_common::TcpState;

const SIZES: [u64; 4] = [1_000, 10_000, 100_000, 1_000_000];
/// Connections one holder process keeps open (its descriptor limit is 20,000).
const PER_HOLDER: u64 = 19_000;
/// Listening ports: a client address has 64,512 ports per destination.
const LISTENERS: u16 = 32;
/// The first argument that makes this binary a holder:
/// `HOLD NETNS COUNT ADDR...`.
const HOLD: &str = "--hold-connections";

/// Timings per tool and size (the median is reported); fewer at a million,
/// where one `netstat` takes seconds.
fn timings(n: u64) -> usize {
    if n >= 1_000_000 { 3 } else { 5 }
}

/// A holder: joins the namespace, opens `COUNT` connections round-robin to
/// the addresses, says "ready", and keeps them until its stdin closes (the
/// bench ended, or died).
fn hold(args: &[String]) {
    let netns = std::fs::File::open(format!("/run/netns/{}", args[0])).expect("namespace");
    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    let count: usize = args[1].parse().expect("count");
    let targets: Vec<SocketAddr> = args[2..].iter().map(|a| a.parse().unwrap()).collect();
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let to = targets[i % targets.len()];
        match TcpStream::connect_timeout(&to, Duration::from_secs(10)) {
            Ok(c) => held.push(c),
            Err(e) => {
                eprintln!("holder: connection {i} to {to}: {e}");
                std::process::exit(1);
            }
        }
    }
    println!("ready");
    std::io::stdout().flush().unwrap();
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

/// The holder processes; dropping them closes every connection.
struct Holders {
    procs: Vec<Child>,
    held: u64,
}

impl Holders {
    /// Starts holders until `want` connections are held, and waits for them.
    fn grow_to(&mut self, want: u64, peer: &Netns, targets: &[SocketAddr]) {
        let mut started = Vec::new();
        while self.held < want {
            let n = PER_HOLDER.min(want - self.held);
            let child = Command::new(std::env::current_exe().unwrap())
                .arg(HOLD)
                .arg(&peer.name)
                .arg(n.to_string())
                .args(targets.iter().map(|t| t.to_string()))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("holder");
            self.held += n;
            started.push(self.procs.len());
            self.procs.push(child);
        }
        for i in started {
            let out = self.procs[i].stdout.take().unwrap();
            let mut line = String::new();
            BufReader::new(out).read_line(&mut line).unwrap();
            assert_eq!(line.trim(), "ready", "a holder failed (its error is above)");
        }
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.kill();
        }
        for p in &mut self.procs {
            let _ = p.wait();
        }
    }
}

/// How long the agent's share of one CPU is measured while the connections
/// just sit there (its walks of the flow maps and its socket-table checks,
/// which it spaces out as they grow costly): long enough at a million to
/// cover at least one check.
fn idle_window(n: u64) -> Duration {
    Duration::from_secs(if n >= 1_000_000 { 60 } else { 20 })
}

/// For `window`: every 40 ms a connection to `orphans` whose server end
/// closes at once and whose client (in `peer`) never does, so the server's
/// end is an orphan in FIN_WAIT2 until its timer (a second). Returns the
/// clients, to be closed after.
fn trickle(peer: &Netns, orphans: &TcpListener, window: Duration) -> Vec<TcpStream> {
    let to = orphans.local_addr().unwrap();
    let start = Instant::now();
    let mut held = Vec::new();
    while start.elapsed() < window {
        held.push(peer.connect(to));
        drop(orphans.accept().expect("accept").0);
        std::thread::sleep(Duration::from_millis(40));
    }
    held
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Milliseconds `f` takes, median of `runs`.
fn time(runs: usize, mut f: impl FnMut()) -> f64 {
    median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

fn shell(ns: &str, pipeline: &str) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .args(["sh", "-c", pipeline])
        .output()
        .expect("nsenter");
    assert!(out.status.success(), "{pipeline}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(HOLD) {
        return hold(&args[2..]);
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "run `cargo xtask bench` as root"
    );
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let net = VethPair::new();
    let (mon, peer) = (&net.left, &net.right);
    // Room in the accept queues for every connection.
    mon.sysctl("net.core.somaxconn=65535");
    mon.sysctl("net.ipv4.tcp_fin_timeout=1");
    peer.sysctl("net.ipv4.ip_local_port_range=1024 65535");
    // As a user runs it: with the periodic socket-table checks (the test
    // helper turns them off unless asked).
    let agent = Agent::start(
        mon,
        &["--max-flows", "1048576", "--reconcile-interval", "10"],
    );
    let listeners: Vec<TcpListener> = (0..LISTENERS)
        .map(|i| mon.listen_backlog(sockaddr(&net.left_v4, 9100 + i).parse().unwrap(), 65535))
        .collect();
    let targets: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let orphans = mon.listen_backlog(sockaddr(&net.left_v4, 9099).parse().unwrap(), 1024);
    let mut holders = Holders {
        procs: Vec::new(),
        held: 0,
    };
    let ns = NetNs::named(&mon.name).unwrap();
    let mut diag = ns.run(SockDiag::open).unwrap();
    let mut rows = Vec::new();
    let cpu = support::machine::cpu_model();
    println!("CPU: {cpu}");
    println!("reading the counts: milliseconds, median of 5 (3 at 1M); ESTABLISHED connections");
    println!(
        "{:>8} {:>10} {:>12} {:>12} {:>10} {:>14} {:>11} {:>10}",
        "conns",
        "tcpstate",
        "ss|awk",
        "netstat",
        "netlink",
        "ss / tcpstate",
        "agent RSS",
        "agent CPU"
    );
    let mut late_rows = Vec::new();
    for n in SIZES {
        let t = Instant::now();
        holders.grow_to(n, peer, &targets);
        let opened = t.elapsed();
        let truth = agent.assert_matches_ss_within(mon, "before timing", Duration::from_secs(120));
        let have = truth.get(TcpState::Established);
        assert!(have >= n, "{have} ESTABLISHED, wanted {n}");
        let runs = timings(n);
        let socket = agent.socket.clone();
        let t_tcpstate = time(runs, || {
            let out = support::tcpstate()
                .args(["count", "--socket"])
                .arg(&socket)
                .output()
                .unwrap();
            assert!(out.status.success());
        });
        let t_ss = time(runs, || {
            shell(
                &mon.name,
                "ss -tan | awk 'NR > 1 {++a[$1]} END {for (v in a) print v, a[v]}'",
            );
        });
        let t_netstat = time(runs, || {
            shell(
                &mon.name,
                "netstat -tan | awk '/^tcp/ {++a[$6]} END {for (v in a) print v, a[v]}'",
            );
        });
        let t_netlink = time(runs, || {
            let c = diag.count(StateFlags::all()).unwrap();
            assert_eq!(c[TcpState::Established as usize], have);
        });
        let cpu_before = cpu_seconds(agent.pid());
        let up_before = agent.snapshot().upkeep;
        let held = trickle(peer, &orphans, idle_window(n));
        let cpu = (cpu_seconds(agent.pid()) - cpu_before) / idle_window(n).as_secs_f64();
        let up = agent.snapshot().upkeep;
        drop(held);
        let late = |u: &Upkeep| (u.timer_lateness.count(), u.timer_lateness.later_than(0.1));
        let ((t0, l0), (t1, l1)) = (late(&up_before), late(&up));
        let per = |r: &Runs, b: &Runs| {
            let runs = r.runs - b.runs;
            let cpu_ms = (r.cpu_seconds - b.cpu_seconds) * 1e3 / runs.max(1) as f64;
            (runs, cpu_ms, r.last_seconds * 1e3)
        };
        let (walks, checks) = (
            per(&up.walks, &up_before.walks),
            per(&up.checks, &up_before.checks),
        );
        late_rows.push(format!(
            "{have:>8} {:>7} {:>7} {:>9.1} {:>6} {:>9.1} {:>10.1} {:>7} {:>10.1} {:>10.1}",
            t1 - t0,
            l1 - l0,
            up.timer_lateness.max_seconds * 1e3,
            walks.0,
            walks.1,
            walks.2,
            checks.0,
            checks.1,
            checks.2
        ));
        let (rss, peak) = (
            memory_kb(agent.pid(), "VmRSS"),
            memory_kb(agent.pid(), "VmHWM"),
        );
        println!(
            "{have:>8} {t_tcpstate:>10.2} {t_ss:>12.2} {t_netstat:>12.2} {t_netlink:>10.2} {:>14.1} {:>7} MiB {:>9.1}%",
            t_ss / t_tcpstate,
            rss / 1024,
            cpu * 100.0
        );
        rows.push(json!({
            "cpu": cpu,
            "connections": have,
            "opened_s": opened.as_secs_f64(),
            "ms": {"tcpstate_count": t_tcpstate, "ss_awk": t_ss, "netstat_awk": t_netstat, "netlink_dump": t_netlink},
            "agent_rss_kib": rss,
            "agent_peak_rss_kib": peak,
            "agent_cpu_share": cpu,
            "timers": t1 - t0,
            "timers_over_100ms": l1 - l0,
            "timer_lateness_max_s": up.timer_lateness.max_seconds,
            "walks": walks.0, "walk_cpu_ms": walks.1, "walk_last_ms": walks.2,
            "checks": checks.0, "check_cpu_ms": checks.1, "check_last_ms": checks.2,
        }));
    }
    println!(
        "while idle: timers acted on (how many over 100 ms late), the latest so far (ms); walks and checks: runs, CPU ms each, wall ms of the last"
    );
    println!(
        "{:>8} {:>7} {:>7} {:>9} {:>6} {:>9} {:>10} {:>7} {:>10} {:>10}",
        "conns",
        "timers",
        ">100ms",
        "latest",
        "walks",
        "walk CPU",
        "walk wall",
        "checks",
        "check CPU",
        "check wall"
    );
    for r in late_rows {
        println!("{r}");
    }
    drop(agent);
    drop(holders);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = std::fs::File::create(dir.join("readers.json")).unwrap();
    writeln!(f, "{}", serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    println!("wrote target/bench/readers.json");
}
