//! Pods named through the Kubernetes CRI of a real containerd: sandboxes
//! made, recreated and removed through the CRI as the kubelet does it,
//! while the agent runs with `--all-namespaces`; each pod named (namespace,
//! name, UID) within 2 s and counted as `nsenter -t PID -n ss -tan` counts
//! inside it, in `count`, the `pod:NS/NAME` selector and the metrics'
//! kube-state-metrics labels; a `hostNetwork` pod never named nor counted
//! apart from the host. Needs root and containerd with the CNI plugins
//! (installed by `cargo xtask test`).

mod support;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    thread::sleep,
    time::{Duration, Instant},
};

use support::{
    Agent,
    containerd::{Containerd, Sandbox},
    hosts::{by_netns, inode_of, nsenter_ss, settle},
    require_root,
};
use tcpstate_common::TcpState;

const UID: &str = "0f7c2a9e-3b1d-4c5e-8a6f-9d2b1c3e4f50";

/// The `count --by-netns --json` row of pod `ns/name` in namespace
/// `inode`, within 2 s.
fn row_of(agent: &Agent, ns: &str, name: &str, inode: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let row = by_netns(agent).into_iter().find(|r| {
            r["netns"] == inode && r["pod"]["namespace"] == ns && r["pod"]["name"] == name
        });
        if let Some(r) = row {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "pod {ns}/{name} in {inode} not named within 2 s: {:?}",
            by_netns(agent)
        );
        sleep(Duration::from_millis(50));
    }
}

/// A listener in the pod and `n` connections to it, all inside the pod.
fn serve(pod: &Sandbox, n: usize) -> (TcpListener, Vec<TcpStream>, Vec<TcpStream>) {
    pod.run(|| {
        let l = TcpListener::bind("127.0.0.1:8080").expect("bind in the pod");
        let clients: Vec<TcpStream> = (0..n)
            .map(|_| TcpStream::connect("127.0.0.1:8080").expect("connect in the pod"))
            .collect();
        let servers = (0..n).map(|_| l.accept().expect("accept").0).collect();
        (l, clients, servers)
    })
}

fn metric(port: &str, series: &str) -> Option<String> {
    let (_, body) = support::http::http_get(&format!("127.0.0.1:{port}"), "/metrics", None);
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.split_whitespace().last())
        .map(str::to_owned)
}

#[test]
#[ignore = "needs root and containerd: run with `cargo xtask test`"]
fn pods_are_named_through_the_cri_and_counted_as_ss_inside_them() {
    require_root();
    let mut ctd = Containerd::start();
    let port = support::http::free_port().to_string();
    let socket = ctd.socket().display().to_string();
    let agent = Agent::start_all(&[
        "--cri-socket",
        &socket,
        "--docker-socket",
        "/nonexistent/docker.sock",
        "--metrics",
        &port,
    ]);

    let pod = ctd.run_pod("shop", "cart", UID, 0, false);
    let inode = inode_of(&format!("/proc/{}/ns/net", pod.pid));
    let row = row_of(&agent, "shop", "cart", inode);
    assert_eq!(row["pod"]["uid"], UID, "{row}");
    assert_eq!(row["container"]["runtime"], "containerd", "{row}");
    assert_eq!(row["container"]["id"], pod.id.as_str(), "{row}");

    // Traffic inside the pod: counted there, as ss inside it counts.
    let (mut l, mut clients, mut servers) = serve(&pod, 3);
    for sel in ["pod:shop/cart", &pod.id[..12]] {
        let view = agent.in_netns(sel);
        let t = settle(
            sel,
            Duration::from_secs(3),
            || view.try_counts(),
            || nsenter_ss(pod.pid),
        );
        assert_eq!(t.get(TcpState::Established), 6, "{sel}: {t:?}");
        assert_eq!(t.get(TcpState::Listen), 1, "{sel}: {t:?}");
    }
    // The metrics carry kube-state-metrics' labels, pod UID included.
    let series = format!(
        "tcpstate_netns_connections{{netns=\"{inode}\",name=\"{}\",namespace=\"shop\",pod=\"cart\",uid=\"{UID}\",container=\"\",state=\"established\"}} ",
        row["name"].as_str().unwrap_or_default()
    );
    assert_eq!(
        metric(&port, &series).as_deref(),
        Some(
            nsenter_ss(pod.pid)
                .get(TcpState::Established)
                .to_string()
                .as_str()
        ),
        "{series}"
    );
    // Connections that close are followed inside the pod.
    clients.truncate(1);
    servers.truncate(1);
    let view = agent.in_netns("pod:shop/cart");
    settle(
        "after two closed",
        Duration::from_secs(3),
        || view.try_counts(),
        || nsenter_ss(pod.pid),
    );
    clients[0].write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    servers[0].read_exact(&mut b).unwrap();

    // hostNetwork: the node's namespace; never a pod there, never counted
    // twice.
    let host_pod = ctd.run_pod("kube-system", "node-agent", UID, 0, true);
    let host_inode = inode_of("/proc/self/ns/net");
    assert_eq!(
        inode_of(&format!("/proc/{}/ns/net", host_pod.pid)),
        host_inode,
        "a hostNetwork sandbox is in the node's namespace"
    );
    sleep(Duration::from_millis(2500));
    let rows = by_netns(&agent);
    assert!(
        rows.iter().all(|r| r["pod"]["name"] != "node-agent"),
        "a hostNetwork pod is named: {rows:?}"
    );
    let host_row = rows
        .iter()
        .find(|r| r["netns"] == host_inode)
        .expect("the host's row");
    assert!(host_row["pod"].is_null(), "{host_row}");

    // Recreated, as the kubelet does when a sandbox dies: the same pod in
    // a new namespace, followed within 2 s; the old one is gone.
    drop((l, clients, servers));
    ctd.remove_pod(&pod.id);
    let pod2 = ctd.run_pod("shop", "cart", UID, 1, false);
    let inode2 = inode_of(&format!("/proc/{}/ns/net", pod2.pid));
    assert_ne!(inode2, inode, "a new sandbox has a new namespace");
    let row = row_of(&agent, "shop", "cart", inode2);
    assert_eq!(row["container"]["id"], pod2.id.as_str(), "{row}");
    (l, clients, servers) = serve(&pod2, 2);
    let view = agent.in_netns("pod:shop/cart");
    let t = settle(
        "the recreated pod",
        Duration::from_secs(3),
        || view.try_counts(),
        || nsenter_ss(pod2.pid),
    );
    assert_eq!(t.get(TcpState::Established), 4, "{t:?}");
    assert!(
        by_netns(&agent).iter().all(|r| r["netns"] != inode),
        "the old sandbox's namespace is still listed"
    );

    // Deleted: its row goes.
    drop((l, clients, servers));
    ctd.remove_pod(&pod2.id);
    let deadline = Instant::now() + Duration::from_secs(3);
    while by_netns(&agent).iter().any(|r| r["pod"]["name"] == "cart") {
        assert!(Instant::now() < deadline, "a deleted pod is still listed");
        sleep(Duration::from_millis(100));
    }
}
