//! The questions behind the counts, against the kernel's own answers:
//! `tcpstate conns` lists what `ss -tan` lists (and its owners what
//! `ss -tanp` finds), with ages within 100 ms of when the test made each
//! state; `tcpstate listeners` shows the accept queue and backlog of
//! `ss -ltn`, SYN_RECV as `ss` counts it, and the namespace's
//! ListenOverflows while a listener that never accepts is driven past its
//! backlog; the top services group a client's connections by the port they
//! reach. Needs root: `cargo xtask test` runs these.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr, TcpStream},
    os::fd::OwnedFd,
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use support::{Agent, Netns, VethPair, connect_nonblocking, require_root, sockaddr, tcpstate};
use tcpstate_common::TcpState;

/// (state, local, peer), addresses as the probe sees them on the wire.
type Row = (TcpState, SocketAddr, SocketAddr);

/// An IPv4-mapped address (a dual-stack socket's view) as the IPv4 one.
fn unmapped(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        _ => a,
    }
}

/// `ss`'s `10.0.0.1:80`, `[fd00::1]:80`, `0.0.0.0:*`.
fn ss_addr(text: &str) -> SocketAddr {
    let (ip, port) = text.rsplit_once(':').expect("ss prints addr:port");
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = if ip == "*" {
        "::".parse().unwrap()
    } else {
        ip.split('%').next().unwrap().parse().expect("an address")
    };
    unmapped(SocketAddr::new(ip, port.parse().unwrap_or(0)))
}

/// The owners ss found: `users:(("comm",pid=1,fd=3),...)` as (pid, comm, fd).
fn ss_users(text: &str) -> Vec<(u32, String, u32)> {
    let mut out = Vec::new();
    for part in text.split("((").skip(1).flat_map(|p| p.split("),(")) {
        let mut comm = String::new();
        let (mut pid, mut fd) = (0, 0);
        for field in part.trim_end_matches("))").split(',') {
            if let Some(c) = field.strip_prefix('"') {
                comm = c.trim_end_matches('"').to_owned();
            } else if let Some(p) = field.strip_prefix("pid=") {
                pid = p.parse().unwrap();
            } else if let Some(f) = field.strip_prefix("fd=") {
                fd = f.trim_end_matches(')').parse().unwrap();
            }
        }
        out.push((pid, comm, fd));
    }
    out.sort();
    out
}

/// `ss -tanH` (with `-p`: and owners) of `ns`: the ground truth.
fn ss_rows(ns: &Netns, process: bool) -> BTreeMap<Row, Vec<(u32, String, u32)>> {
    let flags = if process { "-tanpH" } else { "-tanH" };
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ss", flags])
        .output()
        .expect("ss");
    assert!(out.status.success());
    let mut rows = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let state = TcpState::parse(f[0]).expect("a state");
        let key = (state, ss_addr(f[3]), ss_addr(f[4]));
        let users = f.get(5).map_or_else(Vec::new, |u| ss_users(u));
        rows.insert(key, users);
    }
    rows
}

/// `tcpstate conns --json ARGS` as a user runs it.
fn conns(agent: &Agent, args: &[&str]) -> Vec<serde_json::Value> {
    try_conns(agent, args).unwrap_or_else(|e| panic!("conns failed: {e}"))
}

/// The same, with what it said on failure (a namespace not monitored yet).
fn try_conns(agent: &Agent, args: &[&str]) -> Result<Vec<serde_json::Value>, String> {
    let out = tcpstate()
        .args(["conns", "--json", "--socket"])
        .arg(&agent.socket)
        .args(args)
        .output()
        .expect("tcpstate conns");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(serde_json::from_slice(&out.stdout).expect("conns --json prints a JSON array"))
}

fn row_of(v: &serde_json::Value) -> Row {
    let addr = |k: &str| unmapped(v[k].as_str().unwrap().parse().unwrap());
    let state = TcpState::parse(v["state"].as_str().unwrap()).unwrap();
    let peer = if state == TcpState::Listen {
        ss_addr(&format!(
            "{}:*",
            v["peer"].as_str().unwrap().rsplit_once(':').unwrap().0
        ))
    } else {
        addr("peer")
    };
    (state, addr("local"), peer)
}

fn owners_of(v: &serde_json::Value) -> Vec<(u32, String, u32)> {
    let mut o: Vec<(u32, String, u32)> = v["owners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["pid"].as_u64().unwrap() as u32,
                o["comm"].as_str().unwrap().to_owned(),
                o["fd"].as_u64().unwrap() as u32,
            )
        })
        .collect();
    o.sort();
    o
}

/// Polls `f` until it returns `None` (agreement) or `limit` passes; the
/// last difference is the panic message. The agent gives the same answer
/// to the same question for a second, so a change may take that long.
fn agree_within(what: &str, limit: Duration, mut f: impl FnMut() -> Option<String>) {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            None => return,
            Some(diff) if Instant::now() > deadline => {
                panic!("{what}: still different after {limit:?}:\n{diff}")
            }
            Some(_) => sleep(Duration::from_millis(100)),
        }
    }
}

/// The set `conns` lists against the set `ss -tan` lists (with `process`:
/// each socket's owners too).
fn conns_differ(agent: &Agent, ns: &Netns, process: bool) -> Option<String> {
    let args: &[&str] = if process { &["--process"] } else { &[] };
    let ours: BTreeMap<Row, Vec<(u32, String, u32)>> = conns(agent, args)
        .iter()
        .map(|v| (row_of(v), owners_of(v)))
        .collect();
    let truth = ss_rows(ns, process);
    let (a, b): (BTreeSet<&Row>, BTreeSet<&Row>) = (ours.keys().collect(), truth.keys().collect());
    if a != b {
        return Some(format!(
            "only tcpstate: {:?}\nonly ss: {:?}",
            a.difference(&b).collect::<Vec<_>>(),
            b.difference(&a).collect::<Vec<_>>()
        ));
    }
    if process {
        for (row, owners) in &truth {
            if ours[row] != *owners {
                return Some(format!(
                    "{row:?}: tcpstate says {:?}, ss -p {owners:?}",
                    ours[row]
                ));
            }
        }
    }
    None
}

const LIMIT: Duration = Duration::from_millis(2500);

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn conns_are_what_ss_lists_with_ages_and_owners() {
    require_root();
    let net = VethPair::new();
    let (mon, peer) = (&net.left, &net.right);
    let agent = Agent::start(mon, &[]);
    let check = |what: &str, process: bool| {
        agree_within(what, LIMIT, || conns_differ(&agent, mon, process));
    };
    check("no sockets", false);

    let server = mon.listen(&sockaddr(&net.left_v4, 7101));
    let upstream = peer.listen(&sockaddr(&net.right_v4, 7102));
    let inbound: Vec<(TcpStream, TcpStream)> = (0..4)
        .map(|_| {
            let c = peer.connect(server.local_addr().unwrap());
            (c, server.accept().unwrap().0)
        })
        .collect();
    let outbound: Vec<(TcpStream, TcpStream)> = (0..2)
        .map(|_| {
            let c = mon.connect(upstream.local_addr().unwrap());
            (c, upstream.accept().unwrap().0)
        })
        .collect();
    // Both ends of a loopback connection are this namespace's: two rows.
    let lo = mon.listen("127.0.0.1:7103");
    let lo_client = mon.connect(lo.local_addr().unwrap());
    let lo_server = lo.accept().unwrap().0;
    check("established, inbound, outbound and loopback", false);
    check("owners", true);

    // CLOSE_WAIT at known moments: the peer closes, this side holds on.
    let mut inbound = inbound.into_iter();
    let mut held = Vec::new();
    let mut closed_at = Vec::new();
    for pause in [1500, 2000] {
        let (client, accepted) = inbound.next().unwrap();
        drop(client);
        closed_at.push(Instant::now());
        held.push(accepted);
        sleep(Duration::from_millis(pause));
    }
    // TIME_WAIT: this side closes first.
    let mut outbound = outbound.into_iter();
    let (c, s) = outbound.next().unwrap();
    drop(c);
    sleep(Duration::from_millis(50));
    drop(s);
    check("close_wait and time_wait", false);

    let before = Instant::now();
    let cw = conns(&agent, &["--state", "close-wait"]);
    let after = Instant::now();
    assert_eq!(cw.len(), 2, "{cw:#?}");
    // Oldest first.
    for (row, at) in cw.iter().zip(&closed_at) {
        let age = row["age_s"].as_f64().unwrap();
        let lo = before.duration_since(*at).as_secs_f64() - 0.1;
        let hi = after.duration_since(*at).as_secs_f64() + 0.1;
        assert!(
            (lo..=hi).contains(&age) && row["age_at_least"] == false,
            "a CLOSE_WAIT made {:.3}-{:.3} s before was reported {age} s old: {row}",
            lo + 0.1,
            hi - 0.1
        );
        assert_eq!(
            row["local"].as_str().unwrap().rsplit_once(':').unwrap().1,
            "7101"
        );
    }
    println!(
        "CLOSE_WAIT ages {:?} for states made {:?} before the query",
        cw.iter()
            .map(|r| r["age_s"].as_f64().unwrap())
            .collect::<Vec<_>>(),
        closed_at
            .iter()
            .map(|t| before.duration_since(*t))
            .collect::<Vec<_>>()
    );
    let older = conns(&agent, &["--state", "close-wait", "--older", "2.75s"]);
    assert_eq!(
        older.len(),
        1,
        "only the first is older than 2.75 s: {older:#?}"
    );
    let port = conns(&agent, &["--port", "7102", "--state", "estab"]);
    assert_eq!(port.len(), 1, "one outbound connection is left: {port:#?}");
    // The snapshot's oldest CLOSE_WAIT of service 7101, made on the walk
    // once a second: its count equal to ss's, its age at most that second
    // behind.
    agree_within("the oldest CLOSE_WAIT", LIMIT, || {
        let snap = agent.snapshot();
        let now = Instant::now();
        let Some(o) = snap
            .attention
            .oldest
            .iter()
            .find(|o| o.service == "7101" && o.state == TcpState::CloseWait)
            .cloned()
        else {
            return Some(format!(
                "no oldest CLOSE_WAIT at 7101: {:?}",
                snap.attention
            ));
        };
        let truth = mon
            .ss_counts_where(&["sport", "=", ":7101"])
            .get(TcpState::CloseWait);
        let age = now.duration_since(closed_at[0]).as_secs_f64();
        (o.count != truth || o.age_s > age + 0.1 || o.age_s < age - 1.2)
            .then(|| format!("{o:?}: ss has {truth}, the oldest is {age:.3} s old"))
    });
    check("owners, after the closes", true);

    // The text form has one line per connection under its header.
    let text = tcpstate()
        .args(["conns", "--process", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert_eq!(
        text.lines().count(),
        ss_rows(mon, false).len() + 1,
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("CLOSE_WAIT") && l.contains("users:((")),
        "{text}"
    );
    drop((held, inbound, outbound, lo_client, lo_server));
    check("after everything closed", false);
}

/// `ss -ltnH` of `ns` for `local`: (Recv-Q, Send-Q).
fn ss_queue(ns: &Netns, local: SocketAddr) -> (u64, u64) {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ss", "-ltnH"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| ss_addr(f[3]) == local)
        .map(|f| (f[1].parse().unwrap(), f[2].parse().unwrap()))
        .expect("ss lists the listener")
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn listeners_show_the_queue_ss_shows_while_it_overflows() {
    require_root();
    let net = VethPair::new();
    let (mon, peer) = (&net.left, &net.right);
    let agent = Agent::start(mon, &[]);
    let local: SocketAddr = sockaddr(&net.left_v4, 7201).parse().unwrap();
    // A listener that never accepts.
    let _never_accepts = mon.listen_backlog(local, 2);
    let overflows_before = mon.snmp("TcpExt", "ListenOverflows");
    // Eight clients at once: a queue of 2 holds 3, the rest are dropped
    // and their SYNs (and some final ACKs) retransmitted.
    let _clients: Vec<OwnedFd> = (0..8).map(|_| connect_nonblocking(peer, local)).collect();
    let listeners = || -> Vec<serde_json::Value> {
        let out = tcpstate()
            .args(["listeners", "--json", "--socket"])
            .arg(&agent.socket)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let differs = || -> Option<String> {
        let answer = listeners();
        let ns = &answer[0];
        let row = ns["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["local"] == local.to_string())?
            .clone();
        let (q, b) = ss_queue(mon, local);
        let syn_recv = mon
            .ss_counts_where(&["sport", "=", ":7201"])
            .get(TcpState::SynRecv);
        let overflows = mon.snmp("TcpExt", "ListenOverflows");
        let ours = (
            row["queue"].as_u64().unwrap(),
            row["backlog"].as_u64().unwrap(),
            row["syn_recv"].as_u64().unwrap(),
            ns["listen_overflows"].as_u64().unwrap(),
        );
        (ours != (q, b, syn_recv, overflows)).then(|| {
            format!(
                "tcpstate (queue, backlog, SYN_RECV, ListenOverflows) {ours:?}, ss and the kernel {:?}",
                (q, b, syn_recv, overflows)
            )
        })
    };
    // Sampled while the clients' SYNs are retransmitted (1 s, 3 s, ...).
    let start = Instant::now();
    let mut samples = 0;
    while start.elapsed() < Duration::from_secs(5) {
        agree_within("the listener", LIMIT, differs);
        samples += 1;
        sleep(Duration::from_millis(300));
    }
    let answer = listeners();
    let row = answer[0]["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["local"] == local.to_string())
        .unwrap()
        .clone();
    let grew = mon.snmp("TcpExt", "ListenOverflows") - overflows_before;
    println!("{samples} samples agreed; at the end {row}; ListenOverflows grew {grew}");
    assert_eq!(row["backlog"], 2);
    assert_eq!(row["queue"], 3, "a backlog of 2 holds 3");
    assert_eq!(row["full"], true);
    assert!(grew > 0, "the queue overflowed");
    // The snapshot (metrics, `top`, `watch`) has the same queue.
    agree_within("the snapshot's queue", LIMIT, || {
        let snap = agent.snapshot();
        let q = snap
            .attention
            .queues
            .iter()
            .find(|q| q.listener.local == local);
        let truth = ss_queue(mon, local);
        match q {
            Some(q) if (q.listener.queue, q.listener.backlog) == truth && q.listener.full() => None,
            other => Some(format!("{other:?}, ss {truth:?}")),
        }
    });
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn top_services_group_clients_by_the_port_they_reach() {
    require_root();
    let net = VethPair::new();
    let (mon, peer) = (&net.left, &net.right);
    // A range of 100 local ports: twelve connections hold 12% of it.
    mon.sysctl("net.ipv4.ip_local_port_range=40000 40099");
    let agent = Agent::start(mon, &[]);
    let upstream = peer.listen(&sockaddr(&net.right_v4, 7301));
    let service = mon.listen(&sockaddr(&net.left_v4, 7302));
    let mut held = Vec::new();
    for _ in 0..12 {
        held.push(mon.connect(upstream.local_addr().unwrap()));
        held.push(upstream.accept().unwrap().0);
    }
    for _ in 0..3 {
        held.push(peer.connect(service.local_addr().unwrap()));
        held.push(service.accept().unwrap().0);
    }
    // Two of the twelve closed by this side first: TIME_WAIT still holds
    // their ports.
    for _ in 0..2 {
        let client = held.remove(0);
        let accepted = held.remove(0);
        drop(client);
        sleep(Duration::from_millis(50));
        drop(accepted);
    }
    let ephemeral: BTreeSet<String> = ss_rows(mon, false)
        .keys()
        .filter(|(_, _, p)| p.port() == 7301)
        .map(|(_, l, _)| l.port().to_string())
        .collect();
    assert_eq!(ephemeral.len(), 12);
    assert!(
        ephemeral
            .iter()
            .all(|p| (40000..=40099).contains(&p.parse::<u16>().unwrap())),
        "connects take ports from the narrowed range: {ephemeral:?}"
    );
    agree_within("services", Duration::from_secs(4), || {
        let snap = agent.snapshot();
        let row = |key: &str| snap.ports.iter().find(|r| r.key == key).map(|r| r.states);
        let to_upstream = mon.ss_counts_where(&["dport", "=", ":7301"]);
        let at_service = mon.ss_counts_where(&["sport", "=", ":7302"]);
        let keys: Vec<&str> = snap.ports.iter().map(|r| r.key.as_str()).collect();
        if let Some(k) = keys.iter().find(|k| ephemeral.contains(**k)) {
            return Some(format!("an ephemeral port has its own row {k}: {keys:?}"));
        }
        (row("→7301") != Some(to_upstream) || row("7302") != Some(at_service)).then(|| {
            format!(
                "rows {keys:?}: →7301 {:?} (ss {to_upstream:?}), 7302 {:?} (ss {at_service:?})",
                row("→7301"),
                row("7302")
            )
        })
    });
    // Port pressure: the ports toward the upstream, against ss's count of
    // that group (any state) and the range's size.
    let upstream_addr = upstream.local_addr().unwrap();
    agree_within("port pressure", Duration::from_secs(4), || {
        let snap = agent.snapshot();
        let held_ports = ss_rows(mon, false)
            .keys()
            .filter(|(_, _, p)| *p == upstream_addr)
            .count() as u64;
        let row = snap
            .attention
            .pressure
            .iter()
            .find(|p| p.remote == upstream_addr)
            .cloned();
        match row {
            Some(p)
                if p.ports == held_ports
                    && p.range == 100
                    && (p.ratio() - held_ports as f64 / 100.0).abs() < 1e-9 =>
            {
                None
            }
            other => Some(format!("pressure {other:?}, ss holds {held_ports} of 100")),
        }
    });
    // `watch --json` carries the same.
    let out = tcpstate()
        .args(["watch", "--json", "--count", "1", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &line["attention"]["pressure"][0];
    assert_eq!(p["remote"], upstream_addr.to_string(), "{line}");
    assert_eq!(p["ports"], 12);
    drop(held);
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn every_namespace_has_its_own_listeners_and_port_range() {
    require_root();
    let agent = Agent::start_all(&[]);
    let (a, b) = (Netns::new("tia"), Netns::new("tib"));
    a.sysctl("net.ipv4.ip_local_port_range=40000 40049");
    b.sysctl("net.ipv4.ip_local_port_range=50000 50199");
    let (la, lb) = (a.listen("127.0.0.1:7401"), b.listen("127.0.0.1:7402"));
    let mut held = Vec::new();
    for (ns, l, n) in [(&a, &la, 5), (&b, &lb, 8)] {
        for _ in 0..n {
            held.push(ns.connect(l.local_addr().unwrap()));
            held.push(l.accept().unwrap().0);
        }
    }
    let inode = |ns: &Netns| support::hosts::inode_of(&format!("/run/netns/{}", ns.name));
    for (ns, l, n, range) in [(&a, &la, 5u64, 50u64), (&b, &lb, 8, 200)] {
        let sel = ns.name.clone();
        agree_within(&format!("conns of {sel}"), Duration::from_secs(10), || {
            let ours: BTreeSet<Row> = match try_conns(&agent, &["--netns", &sel]) {
                Ok(rows) => rows.iter().map(row_of).collect(),
                Err(e) => return Some(e),
            };
            let truth: BTreeSet<Row> = ss_rows(ns, false).into_keys().collect();
            (ours != truth).then(|| format!("tcpstate {ours:?}\nss {truth:?}"))
        });
        // Its port pressure against its own range, in the host's snapshot.
        let upstream = l.local_addr().unwrap();
        agree_within(&format!("pressure in {sel}"), LIMIT, || {
            let snap = agent.snapshot();
            let p = snap
                .attention
                .pressure
                .iter()
                .find(|p| p.netns == inode(ns) && p.remote == upstream)
                .cloned();
            match p {
                Some(p) if (p.ports, p.range) == (n, range) => None,
                other => Some(format!("{other:?}: want {n} of {range}")),
            }
        });
        let out = tcpstate()
            .args(["listeners", "--json", "--netns", &sel, "--socket"])
            .arg(&agent.socket)
            .output()
            .unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(answer.as_array().unwrap().len(), 1, "{answer}");
        let rows = answer[0]["listeners"].as_array().unwrap();
        assert_eq!(rows.len(), 1, "{answer}");
        assert_eq!(rows[0]["local"], upstream.to_string());
        assert_eq!(rows[0]["connections"], n, "{answer}");
        assert_eq!(rows[0]["backlog"], ss_queue(ns, upstream).1);
    }
    drop(held);
}
