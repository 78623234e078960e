//! Podman through its Docker-compatible API service, under `run
//! --all-namespaces`: a container started, renamed, restarted and removed
//! while the agent runs; named as podman names it within 2 s, with
//! `podman` as its runtime, and counted as `nsenter -t PID -n ss -tan`
//! counts inside it. Needs root and podman (installed by `cargo xtask
//! test`).

mod support;

use std::{
    thread::sleep,
    time::{Duration, Instant},
};

use support::{
    Agent,
    hosts::{by_netns, inode_of, nsenter_ss, settle},
    podman::Podman,
    require_root,
};
use tcpstate_common::TcpState;

/// The row of container `name` in namespace `inode`, within 2 s.
fn row_of(agent: &Agent, name: &str, inode: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let row = by_netns(agent)
            .into_iter()
            .find(|r| r["container"]["name"] == name && r["netns"] == inode);
        if let Some(r) = row {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{name} in {inode} not named within 2 s: {:?}",
            by_netns(agent)
        );
        sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root and podman: run with `cargo xtask test`"]
fn podman_containers_are_named_through_rename_restart_and_removal() {
    require_root();
    let podman = Podman::start();
    let agent = Agent::start_all(&[
        "--podman-socket",
        &podman.socket(),
        "--docker-socket",
        "/nonexistent/docker.sock",
    ]);
    let id = podman.run_named(
        "tspm",
        "nc -ll -p 80 -e /bin/cat & sleep 1; sleep 1000 | nc 127.0.0.1 80",
    );
    let pid = podman.pid(&id);
    let inode = inode_of(&format!("/proc/{pid}/ns/net"));
    let row = row_of(&agent, "tspm", inode);
    assert_eq!(row["container"]["runtime"], "podman", "{row}");
    assert_eq!(row["container"]["id"], id.as_str(), "{row}");
    for sel in ["tspm", &id[..12]] {
        let view = agent.in_netns(sel);
        let t = settle(
            sel,
            Duration::from_secs(4),
            || view.try_counts(),
            || nsenter_ss(pid),
        );
        assert_eq!(t.get(TcpState::Established), 2, "{sel}: {t:?}");
    }
    podman.ok(&["rename", "tspm", "tspm2"]);
    row_of(&agent, "tspm2", inode);
    podman.ok(&["restart", "-t", "0", "tspm2"]);
    let pid2 = podman.pid(&id);
    let inode2 = inode_of(&format!("/proc/{pid2}/ns/net"));
    row_of(&agent, "tspm2", inode2);
    let view = agent.in_netns("tspm2");
    settle(
        "after the restart",
        Duration::from_secs(4),
        || view.try_counts(),
        || nsenter_ss(pid2),
    );
    podman.ok(&["rm", "-f", "-t", "0", "tspm2"]);
    let deadline = Instant::now() + Duration::from_secs(3);
    while by_netns(&agent)
        .iter()
        .any(|r| r["container"]["name"] == "tspm2")
    {
        assert!(
            Instant::now() < deadline,
            "a removed container is still listed"
        );
        sleep(Duration::from_millis(100));
    }
}
