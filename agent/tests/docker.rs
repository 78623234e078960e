//! A real container runtime under `run --all-namespaces`: containers
//! started and stopped while the agent runs, each equal to `nsenter -t PID
//! -n ss -tan`, named as Docker names them through renames and restarts;
//! the host's firewall left as it was. Needs root and
//! docker.io (installed by `cargo xtask test`).

mod support;

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use support::{
    Agent,
    docker::{Dockerd, firewall},
    hosts::{by_netns, inode_of, nsenter_ss, settle},
    require_root,
};
use tcpstate::snapshot::StateCounts;
use tcpstate_common::TcpState;

/// Waits (at most 3 s) until the agent's count of container `pid`'s
/// namespace equals ss inside it.
fn settled(agent: &Agent, what: &str, pid: u32) -> StateCounts {
    let view = agent.in_netns(&format!("pid:{pid}"));
    settle(
        what,
        Duration::from_secs(3),
        || view.try_counts(),
        || nsenter_ss(pid),
    )
}

fn listed(agent: &Agent, inode: u64) -> bool {
    by_netns(agent).iter().any(|r| r["netns"] == inode)
}

/// The `count --by-netns --json` row of container `name`, within `secs`
/// of asking, checked by `ok`.
fn row_of(
    agent: &Agent,
    name: &str,
    secs: u64,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let row = by_netns(agent)
            .into_iter()
            .find(|r| r["container"]["name"] == name);
        if let Some(r) = row.filter(|r| ok(r)) {
            return Some(r);
        }
        if Instant::now() > deadline {
            return None;
        }
        sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root and docker.io: run with `cargo xtask test`"]
fn containers_are_named_through_rename_restart_and_removal() {
    require_root();
    let before = firewall();
    {
        let docker = Dockerd::start();
        let port = support::http::free_port().to_string();
        let agent = Agent::start_all(&["--docker-socket", &docker.socket(), "--metrics", &port]);
        let id = docker.run_named(
            "tsweb",
            "nc -ll -p 80 -e /bin/cat & sleep 1; sleep 1000 | nc 127.0.0.1 80",
        );
        let (pid, _) = docker.inspect(&id);
        let inode = inode_of(&format!("/proc/{pid}/ns/net"));
        let row = row_of(&agent, "tsweb", 2, |r| r["netns"] == inode)
            .unwrap_or_else(|| panic!("tsweb not named within 2 s: {:?}", by_netns(&agent)));
        assert_eq!(row["container"]["id"], id.as_str(), "{row}");
        assert_eq!(row["container"]["runtime"], "docker", "{row}");
        assert!(row["pod"].is_null(), "no Kubernetes here: {row}");
        sleep(Duration::from_millis(1200));
        // Selected by its name and its short id, counted as ss inside it.
        for sel in ["tsweb", &id[..12]] {
            let view = agent.in_netns(sel);
            let t = settle(
                sel,
                Duration::from_secs(3),
                || view.try_counts(),
                || nsenter_ss(pid),
            );
            assert_eq!(t.get(TcpState::Established), 2, "{sel}: {t:?}");
        }
        // The metrics carry the name as cAdvisor's `container` label.
        let (_, body) = support::http::http_get(&format!("127.0.0.1:{port}"), "/metrics", None);
        let series = format!(
            "tcpstate_netns_connections{{netns=\"{inode}\",name=\"\",namespace=\"\",pod=\"\",uid=\"\",container=\"tsweb\",state=\"established\"}} "
        );
        let line = body.lines().find(|l| l.starts_with(&series));
        assert_eq!(
            line.and_then(|l| l.split_whitespace().last()),
            Some(
                nsenter_ss(pid)
                    .get(TcpState::Established)
                    .to_string()
                    .as_str()
            ),
            "{series} in:\n{body}"
        );
        // Renamed: the new name within 2 s, the old one no longer selects.
        docker.ok(&["rename", "tsweb", "tsweb2"]);
        row_of(&agent, "tsweb2", 2, |r| r["netns"] == inode)
            .unwrap_or_else(|| panic!("the rename not followed: {:?}", by_netns(&agent)));
        let old = support::tcpstate()
            .args(["count", "--netns", "tsweb", "--socket"])
            .arg(&agent.socket)
            .output()
            .unwrap();
        assert_eq!(old.status.code(), Some(1), "the old name still selects");
        // Restarted: the same container in a new namespace.
        docker.ok(&["restart", "-t", "0", "tsweb2"]);
        let (pid2, _) = docker.inspect(&id);
        let inode2 = inode_of(&format!("/proc/{pid2}/ns/net"));
        assert_ne!(inode2, inode, "a restart makes a new namespace");
        row_of(&agent, "tsweb2", 2, |r| r["netns"] == inode2)
            .unwrap_or_else(|| panic!("the restart not followed: {:?}", by_netns(&agent)));
        let view = agent.in_netns("tsweb2");
        settle(
            "after the restart",
            Duration::from_secs(4),
            || view.try_counts(),
            || nsenter_ss(pid2),
        );
        // Removed: its row goes.
        docker.ok(&["rm", "-f", "tsweb2"]);
        let deadline = Instant::now() + Duration::from_secs(3);
        while by_netns(&agent)
            .iter()
            .any(|r| r["container"]["name"] == "tsweb2")
        {
            assert!(
                Instant::now() < deadline,
                "a removed container is still listed"
            );
            sleep(Duration::from_millis(100));
        }
    }
    assert_eq!(firewall(), before, "the host's firewall is as it was");
}

#[test]
#[ignore = "needs root and docker.io: run with `cargo xtask test`"]
fn containers_started_and_stopped_under_the_agent_each_equal_ss() {
    require_root();
    let before = firewall();
    let forwarding = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap();
    {
        let docker = Dockerd::start();
        let agent = Agent::start_all(&[]);
        // A server with an echo listener and a connection to itself on
        // loopback, and clients that each hold a connection to it.
        let server = docker.run(
            "nc -ll -p 80 -e /bin/cat & nc -ll -p 81 -e /bin/cat & sleep 1; sleep 1000 | nc 127.0.0.1 81",
        );
        let (spid, sip) = docker.inspect(&server);
        sleep(Duration::from_millis(1500));
        let clients: Vec<String> = (0..3)
            .map(|i| {
                let holds = "sleep 1000 | nc SERVER 80 & "
                    .repeat(i + 1)
                    .replace("SERVER", &sip);
                docker.run(&format!("{holds} sleep 1000"))
            })
            .collect();
        sleep(Duration::from_secs(1));
        let t = settled(&agent, "the server container", spid);
        assert_eq!(t.get(TcpState::Listen), 2, "{t:?}");
        assert_eq!(t.get(TcpState::Established), 2 + 6, "{t:?}");
        let mut pids = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            let (pid, _) = docker.inspect(c);
            let t = settled(&agent, &format!("client {i}"), pid);
            assert_eq!(
                t.get(TcpState::Established),
                i as u64 + 1,
                "client {i}: {t:?}"
            );
            pids.push(pid);
        }
        // A client stopped: its namespace goes, the server's ends follow ss.
        let gone = inode_of(&format!("/proc/{}/ns/net", pids[2]));
        docker.ok(&["rm", "-f", &clients[2]]);
        let deadline = Instant::now() + Duration::from_secs(3);
        while listed(&agent, gone) {
            assert!(
                Instant::now() < deadline,
                "a removed container's namespace is still listed"
            );
            sleep(Duration::from_millis(100));
        }
        settled(&agent, "the server after a client went", spid);
        // One started later is monitored as the others.
        let late = docker.run(&format!("sleep 1000 | nc {sip} 80 & sleep 1000"));
        let (lpid, _) = docker.inspect(&late);
        sleep(Duration::from_millis(500));
        let t = settled(&agent, "a container started later", lpid);
        assert_eq!(t.get(TcpState::Established), 1);
        settled(&agent, "the server with the late client", spid);
    }
    assert_eq!(firewall(), before, "the host's firewall is as it was");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap(),
        forwarding
    );
}
