//! The series of the service table ([`crate::snapshot::services`]): per
//! namespace and service, how connections ended, handshake (or connect)
//! times, a listening port's SYNs and those left unanswered. The snapshot
//! carries the `--top-k` most active services of each kind, so the
//! cardinality is bounded; every row carries its namespace's inode.

use prometheus_client::registry::Registry;

use super::{
    durations::histogram_family,
    render::{Labels, counter_family, label},
};
use crate::snapshot::{
    Snapshot,
    services::{Service, ServiceRow},
};

/// `netns`, `side` (`local` or `remote`), `address` (the upstream's; empty
/// for a local port) and `port`.
fn service_labels(row: &ServiceRow) -> Labels {
    let netns = row.netns.to_string();
    match row.service {
        Service::Local(port) => label(&[
            ("netns", &netns),
            ("side", "local"),
            ("address", ""),
            ("port", &port.to_string()),
        ]),
        Service::Remote(a) => label(&[
            ("netns", &netns),
            ("side", "remote"),
            ("address", &a.ip().to_string()),
            ("port", &a.port().to_string()),
        ]),
    }
}

pub(super) fn register(r: &mut Registry, snap: &Snapshot) {
    let mut closed = Vec::new();
    let mut times = Vec::new();
    let mut syns = Vec::new();
    let mut unanswered = Vec::new();
    for row in &snap.services {
        let labels = service_labels(row);
        for (outcome, n) in row.closed.by_outcome() {
            let mut l = labels.clone();
            l.push(("outcome".to_owned(), outcome.to_owned()));
            closed.push((l, n));
        }
        times.push((labels.clone(), &row.times));
        if let Service::Local(port) = row.service
            && row.syns > 0
        {
            let l = label(&[
                ("netns", &row.netns.to_string()),
                ("port", &port.to_string()),
            ]);
            syns.push((l.clone(), row.syns));
            unanswered.push((l, row.unanswered));
        }
    }
    counter_family(
        r,
        "service_connections_closed",
        "Local endpoints that ended, per service (side=\"local\": a local port that listens or lies outside ip_local_port_range; side=\"remote\": the upstream address and port a connection reached) and outcome; the --top-k most active services of each side",
        &closed,
    );
    histogram_family(
        r,
        "service_handshake_duration_seconds",
        "Completed handshakes per service: a local port's from its first SYN-ACK to completion, an upstream's connects from the first SYN to the SYN-ACK; the --top-k most active services of each side",
        &times,
    );
    counter_family(
        r,
        "listen_syns",
        "SYNs that reached a listening port and found no connection (each retransmission counted, as ListenDrops counts)",
        &syns,
    );
    counter_family(
        r,
        "listen_syns_unanswered",
        "Of those, SYNs this host never answered (no SYN-ACK a tick later: a full accept queue or SYN backlog, a firewall): what the kernel counts only per namespace in ListenDrops",
        &unanswered,
    );
}
