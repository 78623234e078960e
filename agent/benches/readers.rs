//! `cargo xtask bench`: the time to read the eleven counts with 1,000, 10,000
//! and 100,000 connections in the monitored namespace, as each tool a user
//! might pick reads them, in the same run:
//!
//! - `tcpstate count` (a process asking the agent: O(1) counters + LISTEN);
//! - `ss -tan | awk '{++a[$1]} END {...}'`;
//! - `netstat -tan | awk '{++a[$6]} END {...}'`;
//! - node_exporter's way: one netlink inet_diag dump, counted by state
//!   (done in-process here, so without the cost of a process start).
//!
//! The connections are TIME_WAIT sockets (they cost no descriptor): a server
//! in the monitored namespace closes each connection first. `ss` and
//! `netstat` run through `nsenter --net`, which only joins the namespace.
//! Five timings per tool and size; the median is reported. Writes
//! target/bench/readers.json.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use netlink_packet_sock_diag::inet::StateFlags;
use serde_json::json;
use support::{Agent, Netns, VethPair, sockaddr};
use tcpstate::{netns::NetNs, sockdiag::SockDiag};
use tcpstate_common::TcpState;

const SIZES: [u64; 3] = [1_000, 10_000, 100_000];
const TIMINGS: usize = 5;

/// Makes TIME_WAIT sockets in `mon` until it holds `want` of them. The
/// servers (one per listener: a client port can only be reused on another
/// server port while its tuple is in TIME_WAIT) close first.
fn time_waits(mon: &Netns, peer: &Netns, listeners: &[TcpListener], want: u64) {
    let targets: Arc<Vec<SocketAddr>> =
        Arc::new(listeners.iter().map(|l| l.local_addr().unwrap()).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let servers: Vec<_> = listeners
        .iter()
        .map(|l| {
            let l = l.try_clone().unwrap();
            l.set_nonblocking(true).unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => drop(s),
                        Err(_) => std::thread::sleep(Duration::from_micros(100)),
                    }
                }
            })
        })
        .collect();
    while mon.ss_counts().get(TcpState::TimeWait) < want {
        let needed = want - mon.ss_counts().get(TcpState::TimeWait);
        let made = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (made, targets) = (made.clone(), targets.clone());
                let file = std::fs::File::open(format!("/run/netns/{}", peer.name)).unwrap();
                std::thread::spawn(move || {
                    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                    let mut buf = [0u8; 8];
                    let mut i = w;
                    while made.load(Ordering::Relaxed) < needed {
                        i += 1;
                        let to = targets[i % targets.len()];
                        if let Ok(mut c) =
                            std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2))
                        {
                            let _ = c.read(&mut buf);
                            made.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        workers.into_iter().for_each(|w| w.join().unwrap());
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    servers.into_iter().for_each(|s| s.join().unwrap());
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Milliseconds `f` takes, median of [`TIMINGS`].
fn time(mut f: impl FnMut()) -> f64 {
    median(
        (0..TIMINGS)
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
    assert!(
        nix::unistd::geteuid().is_root(),
        "run `cargo xtask bench` as root"
    );
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let net = VethPair::new();
    let (mon, peer) = (&net.left, &net.right);
    mon.sysctl("net.ipv4.tcp_max_tw_buckets=1048576");
    peer.sysctl("net.ipv4.ip_local_port_range=1024 65535");
    let agent = Agent::start(mon, &["--max-flows", "1048576"]);
    let listeners: Vec<TcpListener> = (0..8)
        .map(|i| mon.listen(&sockaddr(&net.left_v4, 9100 + i)))
        .collect();
    let ns = NetNs::named(&mon.name).unwrap();
    let mut diag = ns.run(SockDiag::open).unwrap();
    let mut rows = Vec::new();
    println!("reading the counts: milliseconds, median of {TIMINGS} (TIME_WAIT sockets)");
    println!(
        "{:>8} {:>10} {:>14} {:>10} {:>12} {:>14}",
        "conns", "tcpstate", "ss|awk", "netstat", "netlink", "ss / tcpstate"
    );
    for n in SIZES {
        time_waits(mon, peer, &listeners, n);
        let truth = mon.ss_counts();
        let have = truth.get(TcpState::TimeWait);
        agent.assert_matches_ss(mon, "before timing");
        let socket = agent.socket.clone();
        let t_tcpstate = time(|| {
            let out = support::tcpstate()
                .args(["count", "--socket"])
                .arg(&socket)
                .output()
                .unwrap();
            assert!(out.status.success());
        });
        let t_ss = time(|| {
            shell(
                &mon.name,
                "ss -tan | awk 'NR > 1 {++a[$1]} END {for (v in a) print v, a[v]}'",
            );
        });
        let t_netstat = time(|| {
            shell(
                &mon.name,
                "netstat -tan | awk '/^tcp/ {++a[$6]} END {for (v in a) print v, a[v]}'",
            );
        });
        let t_netlink = time(|| {
            let c = diag.count(StateFlags::all()).unwrap();
            assert!(c[TcpState::TimeWait as usize] >= have * 9 / 10);
        });
        println!(
            "{have:>8} {t_tcpstate:>10.2} {t_ss:>14.2} {t_netstat:>10.2} {t_netlink:>12.2} {:>14.1}",
            t_ss / t_tcpstate
        );
        rows.push(json!({
            "connections": have,
            "ms": {"tcpstate_count": t_tcpstate, "ss_awk": t_ss, "netstat_awk": t_netstat, "netlink_dump": t_netlink},
        }));
    }
    drop(agent);
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = std::fs::File::create(dir.join("readers.json")).unwrap();
    writeln!(f, "{}", serde_json::to_string_pretty(&rows).unwrap()).unwrap();
    println!("wrote target/bench/readers.json");
}
