//! A real container runtime under `run --all-namespaces`: containers
//! started and stopped while the agent runs, each equal to `nsenter -t PID
//! -n ss -tan`; the host's firewall left as it was. Needs root and
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
