//! The series of what needs attention ([`crate::snapshot::attention`]):
//! accept queues, the oldest CLOSE_WAIT and FIN_WAIT2 per service, port
//! pressure. Each is the `--top-k` worst, so their cardinality is bounded;
//! every row carries its namespace's inode (`netns`), as the per-namespace
//! series do.

use prometheus_client::{
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

use super::render::{Labels, gauge_family, label, service_labels, state_label};
use crate::snapshot::{
    Snapshot,
    attention::{OLD_AFTER_S, Oldest},
};

pub(super) fn register(r: &mut Registry, snap: &Snapshot) {
    let a = &snap.attention;
    let mut length = Vec::new();
    let mut limit = Vec::new();
    for q in &a.queues {
        let l = &q.listener;
        let labels = label(&[
            ("netns", &q.netns.to_string()),
            ("address", &l.local.ip().to_string()),
            ("port", &l.local.port().to_string()),
        ]);
        length.push((labels.clone(), l.queue as i64));
        limit.push((labels, l.backlog as i64));
    }
    gauge_family(
        r,
        "listen_queue_length",
        "Connections completed and not yet accepted, per listening address and port (ss -ltn Recv-Q); the --top-k fullest",
        &length,
    );
    gauge_family(
        r,
        "listen_queue_limit",
        "The accept queue's limit (ss -ltn Send-Q: min(backlog, somaxconn)); the kernel drops handshakes while the length is above it",
        &limit,
    );

    let held = |o: &Oldest| {
        let (port, side) = service_labels(&o.service);
        label(&[
            ("netns", &o.netns.to_string()),
            ("port", port),
            ("side", side),
            ("state", &state_label(o.state)),
        ])
    };
    let oldest: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
    for o in &a.oldest {
        oldest.get_or_create(&held(o)).set(o.age_s);
    }
    r.register(
        "oldest_connection_seconds",
        "Per service, how long its oldest CLOSE_WAIT or FIN_WAIT2 connection has been in that state (a CLOSE_WAIT that grows old is a socket its application never closes); the --top-k oldest",
        oldest,
    );
    let old: Vec<(Labels, i64)> = a.oldest.iter().map(|o| (held(o), o.old as i64)).collect();
    gauge_family(
        r,
        "old_connections",
        &format!(
            "Per service, CLOSE_WAIT or FIN_WAIT2 connections in that state for {OLD_AFTER_S} s or longer"
        ),
        &old,
    );

    let ratio: Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
    let mut ports = Vec::new();
    for p in &a.pressure {
        let labels = label(&[
            ("netns", &p.netns.to_string()),
            ("local", &p.local.to_string()),
            ("remote", &p.remote.ip().to_string()),
            ("port", &p.remote.port().to_string()),
        ]);
        ratio.get_or_create(&labels).set(p.ratio());
        ports.push((labels, p.ports as i64));
    }
    r.register(
        "port_pressure_ratio",
        "Local ports one local address holds toward one remote address and port, in any state, over the size of net.ipv4.ip_local_port_range (at 1 connect() fails with EADDRNOTAVAIL); the --top-k highest",
        ratio,
    );
    gauge_family(
        r,
        "port_pressure_ports",
        "The local ports behind tcpstate_port_pressure_ratio",
        &ports,
    );
}
