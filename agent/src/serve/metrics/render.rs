//! One snapshot as metrics, in a fresh registry (see the module above).

use prometheus_client::{
    encoding::{prometheus_text, text},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tcpstate_common::{Event, TcpState};

use super::Format;
use crate::snapshot::{OTHER, Snapshot};

pub(super) type Labels = Vec<(String, String)>;

pub(super) fn label(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// node_exporter's spelling of a state: `established`, `time_wait`, ...
pub fn state_label(s: TcpState) -> String {
    s.name().to_ascii_lowercase()
}

pub(super) fn event(snap: &Snapshot, name: &str) -> u64 {
    snap.events.get(name).and_then(|v| v.as_u64()).unwrap_or(0)
}

pub(super) fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

pub(super) fn counter_family(
    registry: &mut Registry,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) {
    let f: Family<Labels, Counter> = Family::default();
    for (labels, v) in rows {
        f.get_or_create(labels).inc_by(*v);
    }
    registry.register(name, help, f);
}

pub(super) fn gauge_family(
    registry: &mut Registry,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) {
    let f: Family<Labels, Gauge> = Family::default();
    for (labels, v) in rows {
        f.get_or_create(labels).set(*v);
    }
    registry.register(name, help, f);
}

/// A service key of the breakdown (`8080`, `→443`, `other`) as the
/// `port` and `side` labels.
pub(super) fn service_labels(key: &str) -> (&str, &str) {
    match key.strip_prefix(crate::tracking::breakdown::REMOTE_MARK) {
        Some(port) => (port, "remote"),
        None if key == OTHER => (key, ""),
        None => (key, "local"),
    }
}

/// One snapshot in `format`.
pub fn render(snap: &Snapshot, format: Format) -> String {
    let mut r = Registry::with_prefix("tcpstate");
    let states = snap.state_counts().unwrap_or_default();
    let by_state: Vec<(Labels, i64)> = TcpState::REPORTED
        .iter()
        .map(|s| (label(&[("state", &state_label(*s))]), states.get(*s) as i64))
        .collect();
    gauge_family(
        &mut r,
        "connections",
        "TCP connections by state, as ss -tan counts them: of the monitored namespace, or with --all-namespaces the host's total (the sum of tcpstate_netns_connections)",
        &by_state,
    );

    let mut ports = Vec::new();
    for row in &snap.ports {
        let (port, side) = service_labels(&row.key);
        for s in TcpState::REPORTED {
            ports.push((
                label(&[("port", port), ("side", side), ("state", &state_label(s))]),
                row.states.get(s) as i64,
            ));
        }
    }
    gauge_family(
        &mut r,
        "port_connections",
        &format!(
            "Connections by service and state: side=\"local\" a local port that listens (or lies outside ip_local_port_range), side=\"remote\" the remote port of connections this host made; the services with the most connections (run --top-k), the rest summed under port=\"{OTHER}\""
        ),
        &ports,
    );

    counter(
        &mut r,
        "connections_opened",
        "Connections opened (flows created, port reuse included)",
        event(snap, "flows_opened"),
    );
    let outcomes: Vec<(Labels, u64)> = Event::OUTCOMES
        .iter()
        .map(|(e, name)| (label(&[("outcome", name)]), event(snap, e.name())))
        .collect();
    counter_family(
        &mut r,
        "connections_closed",
        "Local endpoints that ended, by how: normal (both FINs; Zeek SF), refused (an RST answered the connect; REJ), handshake_timeout (never completed; S0), reset_local (this host sent the RST or gave up), reset_remote (the peer's RST)",
        &outcomes,
    );
    counter(
        &mut r,
        "resets",
        "Local endpoints that left ESTABLISHED or CLOSE_WAIT for closed: reset, or given up by the kernel (its EstabResets)",
        event(snap, "resets"),
    );
    counter(
        &mut r,
        "syns_received",
        "Connection attempts (SYN without ACK, retransmissions included) to this host",
        event(snap, "syns_received"),
    );
    counter(
        &mut r,
        "handshakes_failed",
        "Local endpoints that left SYN_SENT or SYN_RECV for closed: refused, reset or unanswered",
        event(snap, "handshakes_failed"),
    );
    counter(
        &mut r,
        "timer_expirations",
        "Endpoints closed on the kernel's timers (TIME_WAIT, FIN_WAIT2, SYN_SENT, SYN_RECV) by the agent",
        snap.expired,
    );
    counter(
        &mut r,
        "time_wait_overflow",
        "Connections the kernel closed without TIME_WAIT (net.ipv4.tcp_max_tw_buckets reached) since the agent started",
        snap.time_wait_overflow,
    );

    counter_family(
        &mut r,
        "packets",
        "Frames the probe saw, by direction (in: received; out: sent by this host)",
        &[
            (label(&[("direction", "in")]), event(snap, "packets_in")),
            (label(&[("direction", "out")]), event(snap, "packets_out")),
        ],
    );
    counter(
        &mut r,
        "tcp_segments",
        "TCP segments the probe parsed",
        event(snap, "tcp_segments"),
    );
    counter_family(
        &mut r,
        "frames_skipped",
        "Frames without a TCP header to read, by reason",
        &[
            (label(&[("reason", "not_tcp")]), event(snap, "not_tcp")),
            (label(&[("reason", "fragment")]), event(snap, "fragments")),
        ],
    );
    counter_family(
        &mut r,
        "parse_errors",
        "Frames the probe could not parse, by reason",
        &[
            (
                label(&[("reason", "malformed")]),
                event(snap, "parse_errors"),
            ),
            (
                label(&[("reason", "ipv6_ext_too_deep")]),
                event(snap, "ipv6_ext_too_deep"),
            ),
        ],
    );
    counter(
        &mut r,
        "map_full",
        "New connections not tracked because the flow map was full (or, with --all-namespaces, their namespace's share of it: see tcpstate_netns_refused)",
        event(snap, "map_full") + event(snap, "netns_share_full"),
    );
    counter(
        &mut r,
        "rst_ignored",
        "RSTs ignored as blind or stale",
        event(snap, "rst_ignored"),
    );
    counter(
        &mut r,
        "cas_conflicts",
        "Segment updates abandoned after repeated compare-and-swap conflicts",
        event(snap, "cas_conflicts"),
    );
    counter(
        &mut r,
        "reap_skipped",
        "Segments of a flow the agent was deleting at that moment",
        event(snap, "reap_skipped"),
    );

    gauge_family(
        &mut r,
        "flow_map_entries",
        "Entries in the flow map, by address family",
        &[
            (label(&[("family", "ipv4")]), snap.flows_in_map[0] as i64),
            (label(&[("family", "ipv6")]), snap.flows_in_map[1] as i64),
        ],
    );
    let cap = snap.flow_map_capacity as i64;
    gauge_family(
        &mut r,
        "flow_map_capacity",
        "Entries the flow map holds at most, by address family",
        &[
            (label(&[("family", "ipv4")]), cap),
            (label(&[("family", "ipv6")]), cap),
        ],
    );

    let drift: Vec<(Labels, i64)> = TcpState::REPORTED
        .iter()
        .filter(|s| **s != TcpState::Listen && **s != TcpState::Close)
        .map(|s| {
            let v = snap
                .drift
                .get(s.name())
                .and_then(|v| v.as_i64())
                .unwrap_or(0);
            (label(&[("state", &state_label(*s))]), v)
        })
        .collect();
    gauge_family(
        &mut r,
        "drift",
        "At the last reconciliation: tcpstate's count minus the kernel socket table's, by state (0 on a healthy host)",
        &drift,
    );
    let corrections: Vec<(Labels, u64)> = snap
        .corrections
        .iter()
        .map(|(k, v)| {
            (
                label(&[("state", &k.to_ascii_lowercase())]),
                v.as_u64().unwrap_or(0),
            )
        })
        .collect();
    counter_family(
        &mut r,
        "reconcile_corrections",
        "Connections reconciliation corrected, by the state tcpstate had counted (none: connections it had missed)",
        &corrections,
    );

    super::kernel::register(&mut r, snap);
    super::netns::register(&mut r, snap);
    super::attention::register(&mut r, snap);
    super::durations::register(&mut r, snap);
    super::services::register(&mut r, snap);
    super::observed::register(&mut r, snap);
    super::upkeep::register(&mut r, snap);

    gauge_family(
        &mut r,
        "build_info",
        "The agent's version (value 1)",
        &[(label(&[("version", &snap.version)]), 1)],
    );
    let mut out = String::new();
    match format {
        Format::OpenMetrics => text::encode(&mut out, &r),
        Format::Prometheus => prometheus_text::encode(&mut out, &r),
    }
    .expect("writing to a String cannot fail");
    out
}
