//! Names of namespaces when no runtime's API answers: a process in a
//! namespace of its own, placed in a cgroup with the path the kubelet gives
//! a pod's container, is reported with that pod's UID and that container's
//! id. Needs root: `cargo xtask test` runs it.

mod support;

use std::{
    path::PathBuf,
    thread::sleep,
    time::{Duration, Instant},
};

use support::{
    Agent,
    hosts::{Unshared, by_netns, inode_of, nsenter_ss, settle},
    require_root,
};

/// A cgroup-v1 `pids` hierarchy path made for the test, removed on drop
/// (its processes moved back to the root first).
struct Cgroup(Vec<PathBuf>);

impl Cgroup {
    /// `/sys/fs/cgroup/pids/<rel>`, each level made.
    fn make(rel: &str) -> Cgroup {
        let mut made = Vec::new();
        let mut at = PathBuf::from(ROOT);
        for part in rel.split('/') {
            at.push(part);
            if !at.exists() {
                std::fs::create_dir(&at).expect("making a cgroup");
                made.push(at.clone());
            }
        }
        Cgroup(made)
    }

    fn add(&self, pid: u32) {
        let leaf = self.0.last().expect("a cgroup made");
        std::fs::write(leaf.join("cgroup.procs"), pid.to_string()).expect("moving a process in");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.split_whitespace() {
                    let _ = std::fs::write(PathBuf::from(ROOT).join("cgroup.procs"), pid);
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}

const ROOT: &str = "/sys/fs/cgroup/pids";

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_kubelet_style_cgroup_gives_the_pod_uid_and_container_id() {
    require_root();
    if !PathBuf::from(ROOT).join("cgroup.procs").exists() {
        // cgroup v2 only: the same path under the unified hierarchy.
        panic!("no cgroup-v1 pids hierarchy at {ROOT} on this machine");
    }
    let uid = "5d3a1f2e-7c4b-4e9a-8f6d-1b2c3d4e5f60";
    let id = "3f4e1c0b9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
    let held = Unshared::start();
    let cg = Cgroup::make(&format!("kubepods/besteffort/pod{uid}/{id}"));
    cg.add(held.pid());
    let inode = inode_of(&format!("/proc/{}/ns/net", held.pid()));
    let port = support::http::free_port().to_string();
    let agent = Agent::start_all(&["--metrics", &port]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let row = loop {
        let row = by_netns(&agent).into_iter().find(|r| r["netns"] == inode);
        if let Some(r) = row.filter(|r| !r["pod"].is_null()) {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "the namespace has no pod after 5 s: {:?}",
            by_netns(&agent)
        );
        sleep(Duration::from_millis(200));
    };
    assert_eq!(row["pod"]["uid"], uid, "{row}");
    assert!(row["pod"]["name"].is_null(), "a cgroup names no pod: {row}");
    assert_eq!(row["container"]["id"], id, "{row}");
    // Selected by the id, its counts are its own: ss inside it.
    let view = agent.in_netns(&id[..12]);
    settle(
        "selected by its container id",
        Duration::from_secs(3),
        || view.try_counts(),
        || nsenter_ss(held.pid()),
    );
    // Its metrics carry the UID as kube-state-metrics' `uid` label (the
    // only key a dashboard can join a nameless pod on), the container
    // empty as for every pod.
    let (_, body) = support::http::http_get(&format!("127.0.0.1:{port}"), "/metrics", None);
    let series = format!(
        "tcpstate_netns_connections{{netns=\"{inode}\",name=\"\",namespace=\"\",pod=\"\",uid=\"{uid}\",container=\"\",state=\"established\"}} "
    );
    let value = body
        .lines()
        .find(|l| l.starts_with(&series))
        .and_then(|l| l.split_whitespace().last());
    let truth = nsenter_ss(held.pid()).get(tcpstate_common::TcpState::Established);
    assert_eq!(
        value,
        Some(truth.to_string().as_str()),
        "{series} in:\n{body}"
    );
    drop(cg);
}
