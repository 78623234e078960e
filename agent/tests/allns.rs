//! `tcpstate run --all-namespaces`: one agent counts every network
//! namespace of the host, each exactly as `ss -tan` inside it shows it, as
//! namespaces and interfaces come and go. Needs root: `cargo xtask test`
//! runs these.

mod support;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use support::{
    Agent, Netns, VethPair,
    hosts::{
        Bridge, Unshared, by_netns, host_ss, inode_of, link_exists, nsenter_ss, refs_to, settle,
        wait_ready,
    },
    require_root,
    sampler::Sampler,
    sh, tcpstate, thread_caps,
};
use tcpstate::snapshot::StateCounts;
use tcpstate_common::TcpState;

fn accept(l: &TcpListener) -> TcpStream {
    l.accept().expect("accept").0
}

fn host_inode() -> u64 {
    inode_of("/proc/self/ns/net")
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn containers_behind_a_bridge_each_count_their_own() {
    require_root();
    let bridge = Bridge::new();
    let cs: Vec<_> = (0..8).map(|i| bridge.container(10 + i)).collect();
    let agent = Agent::start_all(&[]);
    let views: Vec<Agent> = cs.iter().map(|c| agent.in_netns(&c.ns.name)).collect();
    let host = agent.in_netns(&host_inode().to_string());
    for (c, v) in cs.iter().zip(&views) {
        settle(
            &format!("{} empty", c.ns.name),
            Duration::from_secs(3),
            || v.try_counts(),
            || c.ns.ss_counts(),
        );
    }
    let watched = &cs[1];
    let ((), samples) = Sampler::during(&views[1], &watched.ns, || {
        let mut keep = Vec::new();
        let host_l = TcpListener::bind(format!("{}:0", bridge.v4)).expect("host listener");
        let listeners: Vec<TcpListener> = cs
            .iter()
            .map(|c| c.ns.listen(&format!("{}:80", c.v4)))
            .collect();
        let v6: Vec<TcpListener> = cs
            .iter()
            .map(|c| c.ns.listen(&format!("[{}]:81", c.v6)))
            .collect();
        for (i, c) in cs.iter().enumerate() {
            let next = (i + 1) % cs.len();
            // Container to container through the bridge: held open, and one
            // closed by the client (FIN_WAIT2 here, CLOSE_WAIT there).
            let a = c.ns.connect(listeners[next].local_addr().unwrap());
            keep.push((a, accept(&listeners[next])));
            let b = c.ns.connect(listeners[next].local_addr().unwrap());
            let b_srv = accept(&listeners[next]);
            b.shutdown(std::net::Shutdown::Write).unwrap();
            keep.push((b, b_srv));
            let six = c.ns.connect(v6[next].local_addr().unwrap());
            keep.push((six, accept(&v6[next])));
            // To the host and from the host.
            let up = c.ns.connect(host_l.local_addr().unwrap());
            keep.push((up, accept(&host_l)));
            let down = TcpStream::connect(listeners[i].local_addr().unwrap()).unwrap();
            keep.push((down, accept(&listeners[i])));
            // Loopback inside every other one: one held, one closed (TIME_WAIT).
            if i % 2 == 0 {
                let lo = c.ns.listen("127.0.0.1:82");
                let x = c.ns.connect(lo.local_addr().unwrap());
                keep.push((x, accept(&lo)));
                let y = c.ns.connect(lo.local_addr().unwrap());
                let y_srv = accept(&lo);
                drop(y);
                sleep(Duration::from_millis(20));
                drop(y_srv);
            }
        }
        for (c, v) in cs.iter().zip(&views) {
            let t = settle(
                &format!("{} with traffic", c.ns.name),
                Duration::from_secs(3),
                || v.try_counts(),
                || c.ns.ss_counts(),
            );
            assert!(t.get(TcpState::Established) >= 4, "{}: {t:?}", c.ns.name);
        }
        // The host's own sockets: its listener and its ends of the
        // connections to and from the containers, nothing of what passes
        // the bridge between two containers.
        let t = settle(
            "the host namespace",
            Duration::from_secs(5),
            || host.try_counts(),
            host_ss,
        );
        assert!(t.get(TcpState::Established) >= 16, "host: {t:?}");
        // Held a while (the sampler reads on), then all closed at once.
        sleep(Duration::from_secs(2));
        drop(keep);
        drop(listeners);
        drop(v6);
        for (c, v) in cs.iter().zip(&views) {
            settle(
                &format!("{} closed", c.ns.name),
                Duration::from_secs(3),
                || v.try_counts(),
                || c.ns.ss_counts(),
            );
        }
        // TIME_WAIT of the closed ones, still sampled.
        sleep(Duration::from_secs(1));
    });
    samples.assert_exact(&format!("{} while the containers talked", watched.ns.name));
    // The total is the sum of the namespaces, and every container is listed once.
    let rows = by_netns(&agent);
    let mut sum = StateCounts::default();
    for r in &rows {
        sum = sum.plus(&StateCounts::from_json(&r["states"]).expect("eleven states"));
    }
    let total = agent.counts();
    assert!(
        total == sum || agent.counts() == sum,
        "count is the sum of count --by-netns: {total:?} vs {sum:?}"
    );
    for c in &cs {
        let inode = inode_of(&format!("/run/netns/{}", c.ns.name));
        let listed: Vec<_> = rows.iter().filter(|r| r["netns"] == inode).collect();
        assert_eq!(listed.len(), 1, "{} listed once: {rows:?}", c.ns.name);
        assert_eq!(listed[0]["name"], c.ns.name.as_str());
    }
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_same_tuple_in_two_namespaces_is_two_connections() {
    require_root();
    // Two isolated pairs with the same addresses, as pods on one node have.
    let (one, two) = (VethPair::new(), VethPair::new());
    assert_eq!(one.left_v4, two.left_v4);
    let agent = Agent::start_all(&[]);
    let mut keep = Vec::new();
    for pair in [&one, &two] {
        let l = pair.right.listen(&format!("{}:8000", pair.right_v4));
        let to: SocketAddr = l.local_addr().unwrap();
        let from: SocketAddr = format!("{}:41000", pair.left_v4).parse().unwrap();
        let c = pair.left.connect_from(from, to);
        keep.push((c, accept(&l), l));
    }
    for ns in [&one.left, &one.right, &two.left, &two.right] {
        let t = settle(
            &ns.name,
            Duration::from_secs(3),
            || agent.in_netns(&ns.name).try_counts(),
            || ns.ss_counts(),
        );
        assert_eq!(t.get(TcpState::Established), 1, "{}", ns.name);
    }
    // Closing one leaves the other as it is.
    let (c, s, _l) = keep.remove(0);
    drop(c);
    sleep(Duration::from_millis(50));
    drop(s);
    for ns in [&one.left, &one.right, &two.left, &two.right] {
        settle(
            &format!("{} after one closed", ns.name),
            Duration::from_secs(3),
            || agent.in_netns(&ns.name).try_counts(),
            || ns.ss_counts(),
        );
    }
    assert_eq!(
        agent
            .in_netns(&two.left.name)
            .counts()
            .get(TcpState::Established),
        1
    );
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn namespaces_that_come_and_go_are_followed_and_never_kept_alive() {
    require_root();
    let waited = support::hosts::wait_for_quiet_rtnl();
    eprintln!("the kernel's rtnl lock was free again after {waited:?}");
    let agent = Agent::start_all(&[]);
    let pid = agent.pid();

    // A named namespace made after the agent started, its interface moved
    // in after the namespace appeared (as a CNI plugin does).
    let late = Netns::new("tsn");
    let inode = inode_of(&format!("/run/netns/{}", late.name));
    let view = agent.in_netns(&late.name);
    settle(
        "a namespace made later",
        Duration::from_secs(2),
        || view.try_counts(),
        || late.ss_counts(),
    );
    let host_end = support::unique("tsh");
    sh(&[
        "ip", "link", "add", &host_end, "type", "veth", "peer", "name", "tsmoved",
    ]);
    sh(&["ip", "addr", "add", "10.233.0.1/24", "dev", &host_end]);
    sh(&["ip", "link", "set", &host_end, "up"]);
    sleep(Duration::from_millis(300));
    sh(&["ip", "link", "set", "tsmoved", "netns", &late.name]);
    sh(&[
        "ip",
        "-n",
        &late.name,
        "addr",
        "add",
        "10.233.0.2/24",
        "dev",
        "tsmoved",
    ]);
    sh(&["ip", "-n", &late.name, "link", "set", "tsmoved", "up"]);
    sleep(Duration::from_secs(2));
    let l = late.listen("10.233.0.2:9000");
    let conns: Vec<(TcpStream, TcpStream)> = (0..3)
        .map(|_| {
            (
                TcpStream::connect(l.local_addr().unwrap()).unwrap(),
                accept(&l),
            )
        })
        .collect();
    let t = settle(
        "an interface moved in later",
        Duration::from_secs(1),
        || view.try_counts(),
        || late.ss_counts(),
    );
    assert_eq!(t.get(TcpState::Established), 3);

    // A namespace only a process holds.
    let un = Unshared::start();
    let sel = format!("pid:{}", un.pid());
    let by_pid = agent.in_netns(&sel);
    let t = settle(
        "a namespace only a process holds",
        Duration::from_secs(2),
        || by_pid.try_counts(),
        || nsenter_ss(un.pid()),
    );
    assert_eq!(
        (t.get(TcpState::Listen), t.get(TcpState::Established)),
        (1, 2)
    );
    let un_inode = inode_of(&format!("/proc/{}/ns/net", un.pid()));

    // Deleted while its connections are open (the test's sockets still
    // hold it in the kernel, as a lingering socket does): its counts go.
    drop(late);
    let deadline = Instant::now() + Duration::from_secs(2);
    while by_netns(&agent).iter().any(|r| r["netns"] == inode) {
        assert!(
            Instant::now() < deadline,
            "a deleted namespace still listed after 2 s"
        );
        sleep(Duration::from_millis(100));
    }
    assert!(
        refs_to(pid, inode).is_empty(),
        "the agent refers to a deleted namespace: {:?}",
        refs_to(pid, inode)
    );
    drop(conns);
    drop(l);
    // Nothing of the agent holds it: the kernel frees it, and the veth
    // end inside goes, taking the host's end with it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while link_exists(&host_end) {
        assert!(
            Instant::now() < deadline,
            "the deleted namespace was not freed: something keeps it alive"
        );
        sleep(Duration::from_millis(100));
    }
    drop(un);
    let deadline = Instant::now() + Duration::from_secs(3);
    while !refs_to(pid, un_inode).is_empty()
        || by_netns(&agent).iter().any(|r| r["netns"] == un_inode)
    {
        assert!(
            Instant::now() < deadline,
            "the agent keeps an ended process's namespace: {:?}",
            refs_to(pid, un_inode)
        );
        sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_hundred_namespaces_each_equal_ss() {
    require_root();
    let spaces: Vec<Netns> = (0..100).map(|_| Netns::new("tsh")).collect();
    let agent = Agent::start_all(&[]);
    let mut keep = Vec::new();
    for (i, ns) in spaces.iter().enumerate() {
        let l = ns.listen("127.0.0.1:7200");
        for _ in 0..(i % 3 + 1) {
            let c = ns.connect(l.local_addr().unwrap());
            keep.push((c, accept(&l)));
        }
        keep_listener(&mut keep, l);
    }
    for ns in &spaces {
        settle(
            &ns.name,
            Duration::from_secs(3),
            || agent.in_netns(&ns.name).try_counts(),
            || ns.ss_counts(),
        );
    }
}

fn keep_listener(_keep: &mut [(TcpStream, TcpStream)], l: TcpListener) {
    // Listeners stay open for the test's life.
    std::mem::forget(l);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_flood_in_one_namespace_leaves_another_its_share() {
    require_root();
    let (flooded, other) = (Netns::new("tsf"), Netns::new("tso"));
    let agent = Agent::start_all(&["--max-flows", "2048", "--max-flows-per-netns", "512"]);
    // Far more connections than the whole flow map holds, on loopback.
    let script = "import socket,resource,time\n\
resource.setrlimit(resource.RLIMIT_NOFILE,(20000,20000))\n\
l=socket.socket(); l.bind(('127.0.0.1',7300)); l.listen(4096)\n\
cs=[]\n\
for i in range(3000):\n  cs.append(socket.create_connection(('127.0.0.1',7300)))\n\
print('ready',flush=True); time.sleep(600)\n";
    let mut flood = Command::new("ip")
        .args(["netns", "exec", &flooded.name, "python3", "-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python");
    wait_ready(&mut flood);
    // The other namespace's new connections are all tracked.
    let l = other.listen("127.0.0.1:7301");
    let conns: Vec<(TcpStream, TcpStream)> = (0..50)
        .map(|_| (other.connect(l.local_addr().unwrap()), accept(&l)))
        .collect();
    let view = agent.in_netns(&other.name);
    let t = settle(
        "the namespace beside the flood",
        Duration::from_secs(3),
        || view.try_counts(),
        || other.ss_counts(),
    );
    assert_eq!(t.get(TcpState::Established), 100);
    // Refusals are the last tick's (once a second).
    let row = |name: &str| {
        agent
            .snapshot()
            .namespaces
            .into_iter()
            .find(|n| n.name.as_deref() == Some(name))
            .expect("listed")
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while row(&flooded.name).refused == 0 {
        assert!(
            Instant::now() < deadline,
            "the flooded namespace's refusals are counted"
        );
        sleep(Duration::from_millis(100));
    }
    assert_eq!(row(&other.name).refused, 0);
    drop(conns);
    let _ = flood.kill();
    let _ = flood.wait();
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn count_names_namespaces_as_scripts_expect() {
    require_root();
    let ns = Netns::new("tsq");
    let agent = Agent::start_all(&[]);
    let inode = inode_of(&format!("/run/netns/{}", ns.name));
    let _l = ns.listen("127.0.0.1:7400");
    settle(
        "by name",
        Duration::from_secs(3),
        || agent.in_netns(&ns.name).try_counts(),
        || ns.ss_counts(),
    );
    for sel in [inode.to_string(), ns.name.clone()] {
        let out = tcpstate()
            .args(["count", "--netns", &sel, "--socket"])
            .arg(&agent.socket)
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert_eq!(text.lines().count(), 11, "{text}");
        assert!(text.contains("LISTEN 1\n"), "{text}");
    }
    let out = tcpstate()
        .args(["count", "--netns", "no-such-ns", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("no-such-ns"), "{err}");
    let rows = by_netns(&agent);
    let row = rows.iter().find(|r| r["netns"] == inode).expect("listed");
    let keys: Vec<&String> = row.as_object().unwrap().keys().collect();
    // Issue 10's shape, with who owns the namespace (null: nobody says).
    assert_eq!(keys, ["netns", "name", "pid", "container", "pod", "states"]);
    assert!(row["container"].is_null() && row["pod"].is_null(), "{row}");
    assert_eq!(row["states"]["LISTEN"], 1);
    assert!(
        rows.iter().any(|r| r["netns"] == host_inode()),
        "the host namespace is listed"
    );
    let text = tcpstate()
        .args(["count", "--by-netns", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(
        text.lines()
            .any(|l| l.split_whitespace().take(3).collect::<Vec<_>>()
                == [inode.to_string().as_str(), ns.name.as_str(), "1"]),
        "{text}"
    );
}

/// The effective set of these capabilities, as /proc prints it.
fn mask(bits: &[u32]) -> String {
    format!("{:016x}", bits.iter().fold(0u64, |m, b| m | 1 << b))
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn one_thread_keeps_what_following_namespaces_takes() {
    require_root();
    let agent = Agent::start_all(&[]);
    // CAP_NET_ADMIN 12, CAP_BPF 39; and CAP_DAC_READ_SEARCH 2, CAP_SYS_PTRACE
    // 19, CAP_SYS_ADMIN 21, CAP_PERFMON 38.
    let attach = mask(&[12, 39]);
    let follow = mask(&[2, 12, 19, 21, 38, 39]);
    // The reader of /proc/PID/fd (`conns --process`): CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE.
    let read_fds = mask(&[2, 19]);
    let check = |when: &str| {
        let caps = thread_caps(agent.pid());
        for (task, name, eff) in &caps {
            let want = match name.as_str() {
                "tcpstate-keeper" => &follow,
                "tcpstate-netns" => &attach,
                "tcpstate-owners" => &read_fds,
                _ => "0000000000000000",
            };
            assert_eq!(eff, want, "{task} ({name}) {when}");
        }
        let keepers = caps
            .iter()
            .filter(|(_, n, _)| n == "tcpstate-keeper")
            .count();
        assert_eq!(keepers, 1, "one keeper thread {when}: {caps:?}");
    };
    check("once started");
    // A namespace made now is still entered, attached and counted.
    let ns = Netns::new("tsk");
    let _l = ns.listen("127.0.0.1:7500");
    settle(
        "a namespace made after the privileges were dropped",
        Duration::from_secs(3),
        || agent.in_netns(&ns.name).try_counts(),
        || ns.ss_counts(),
    );
    check("with a namespace started later");
}
