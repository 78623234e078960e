//! Per-namespace series: each monitored namespace's counts, refusals and
//! drift, labelled by its inode and `ip netns` name, and where they exist by
//! its Kubernetes namespace and pod or its container. `tcpstate_connections`
//! is their sum (the host's total); the two names differ so that summing
//! one never counts the other again.

use prometheus_client::registry::Registry;
use tcpstate_common::TcpState;

use super::render::{Labels, counter_family, gauge_family, label, state_label};
use crate::snapshot::Snapshot;

/// The labels Kubernetes dashboards join on, as kube-state-metrics and
/// cAdvisor spell them: `namespace`, `pod` and `uid` for a pod's namespace
/// (its containers share it, so `container` stays empty; `uid` alone names
/// a pod only its cgroup told of, and joins `kube_pod_info{uid}`),
/// `container` for a container outside Kubernetes. Empty labels are absent
/// to Prometheus.
fn kube_labels(ns: &crate::snapshot::NetnsCounts) -> [String; 4] {
    let pod = ns.pod.as_ref();
    let k8s_ns = pod.and_then(|p| p.namespace.clone()).unwrap_or_default();
    let pod_name = pod.and_then(|p| p.name.clone()).unwrap_or_default();
    let uid = pod.and_then(|p| p.uid.clone()).unwrap_or_default();
    let container = match (pod, &ns.container) {
        (None, Some(c)) => c
            .name
            .clone()
            .unwrap_or_else(|| crate::names::short_id(&c.id)),
        _ => String::new(),
    };
    [k8s_ns, pod_name, uid, container]
}

pub(super) fn register(r: &mut Registry, snap: &Snapshot) {
    let mut conns: Vec<(Labels, i64)> = Vec::new();
    let mut refused: Vec<(Labels, u64)> = Vec::new();
    let mut drift: Vec<(Labels, i64)> = Vec::new();
    for ns in &snap.namespaces {
        let inode = ns.netns.to_string();
        let name = ns.name.clone().unwrap_or_default();
        let [k8s_ns, pod, uid, container] = kube_labels(ns);
        let id = [
            ("netns", inode.as_str()),
            ("name", name.as_str()),
            ("namespace", k8s_ns.as_str()),
            ("pod", pod.as_str()),
            ("uid", uid.as_str()),
            ("container", container.as_str()),
        ];
        let with = |extra: (&'static str, &str)| {
            let mut l = id.to_vec();
            l.push(extra);
            label(&l)
        };
        for s in TcpState::REPORTED {
            let st = state_label(s);
            conns.push((with(("state", &st)), ns.states.get(s) as i64));
            if s != TcpState::Listen && s != TcpState::Close {
                let d = ns.drift.get(s.name()).and_then(|v| v.as_i64()).unwrap_or(0);
                drift.push((with(("state", &st)), d));
            }
        }
        refused.push((label(&id), ns.refused));
    }
    gauge_family(
        r,
        "netns_connections",
        "TCP connections of each monitored network namespace by state, as ss -tan inside it counts them (netns: its inode; name: its ip netns name; namespace, pod, uid: its Kubernetes pod; container: its container outside Kubernetes); their sum is tcpstate_connections",
        &conns,
    );
    counter_family(
        r,
        "netns_refused",
        "New connections of each namespace not tracked: the flow map full, or the namespace's share of it (--max-flows-per-netns) used up",
        &refused,
    );
    gauge_family(
        r,
        "netns_drift",
        "At each namespace's last reconciliation: tcpstate's count minus its socket table's, by state",
        &drift,
    );
}
