//! The OpenMetrics/Prometheus endpoint (`tcpstate run --metrics ADDR`).
//!
//! Each scrape takes one snapshot of the agent (O(1) counters, the cached
//! per-port breakdown) and renders it through `prometheus-client`, the
//! official Rust client, into a fresh registry: every value is the agent's
//! own at that moment, so nothing is double-counted between scrapes.
//! State names follow node_exporter's `node_tcp_connection_states{state}`
//! spelling users already know (`established`, `time_wait`, ...).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::{prometheus_text, text},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tcpstate_common::TcpState;

use crate::{
    serve::reader::Reader,
    snapshot::{OTHER, Snapshot},
};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The two text formats: OpenMetrics for a Prometheus server that asks for
/// it, the classic Prometheus format (0.0.4) for everything else (curl,
/// `promtool check metrics`, older scrapers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Prometheus,
}

impl Format {
    /// From a request's `Accept` header.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS,
            Format::Prometheus => prometheus_text::CONTENT_TYPE,
        }
    }
}

/// Parses `--metrics`: `PORT`, `:PORT` (both on 127.0.0.1), `ADDR:PORT` or
/// `[V6]:PORT`.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    let port_only = s.strip_prefix(':').unwrap_or(s);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    s.parse()
        .map_err(|_| format!("{s:?} is not PORT, :PORT or ADDRESS:PORT"))
}

type Labels = Vec<(String, String)>;

fn label(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// node_exporter's spelling of a state: `established`, `time_wait`, ...
pub fn state_label(s: TcpState) -> String {
    s.name().to_ascii_lowercase()
}

fn event(snap: &Snapshot, name: &str) -> u64 {
    snap.events.get(name).and_then(|v| v.as_u64()).unwrap_or(0)
}

fn counter(registry: &mut Registry, name: &str, help: &str, value: u64) {
    let c: Counter = Counter::default();
    c.inc_by(value);
    registry.register(name, help, c);
}

fn counter_family(registry: &mut Registry, name: &str, help: &str, rows: &[(Labels, u64)]) {
    let f: Family<Labels, Counter> = Family::default();
    for (labels, v) in rows {
        f.get_or_create(labels).inc_by(*v);
    }
    registry.register(name, help, f);
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str, rows: &[(Labels, i64)]) {
    let f: Family<Labels, Gauge> = Family::default();
    for (labels, v) in rows {
        f.get_or_create(labels).set(*v);
    }
    registry.register(name, help, f);
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
        "TCP connections of the monitored namespace by state, as ss -tan counts them",
        &by_state,
    );

    let mut ports = Vec::new();
    for row in &snap.ports {
        for s in TcpState::REPORTED {
            ports.push((
                label(&[("port", &row.key), ("state", &state_label(s))]),
                row.states.get(s) as i64,
            ));
        }
    }
    gauge_family(
        &mut r,
        "port_connections",
        &format!(
            "Connections by local port and state: the ports with the most connections (run --top-k), the rest summed under port=\"{OTHER}\""
        ),
        &ports,
    );

    counter(
        &mut r,
        "connections_opened",
        "Connections opened (flows created, port reuse included)",
        event(snap, "flows_opened"),
    );
    counter(
        &mut r,
        "connections_closed",
        "Connections ended (no local socket left)",
        event(snap, "flows_closed"),
    );
    counter(
        &mut r,
        "resets",
        "RSTs that took effect, refused connection attempts included",
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
        "New connections not tracked because the flow map was full",
        event(snap, "map_full"),
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

/// Serves `/metrics` on `addr` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, reader: Arc<Reader>) -> std::io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        let reader = Arc::clone(&reader);
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let reader = Arc::clone(&reader);
                async move { Ok::<_, std::convert::Infallible>(respond(&req, &reader)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

fn respond(req: &Request<Incoming>, reader: &Reader) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, kind: &str, body: String| {
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, kind)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let format = Format::from_accept(
                req.headers()
                    .get(hyper::header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            let snap = reader.snapshot();
            match snap {
                Ok(s) => reply(StatusCode::OK, format.content_type(), render(&s, format)),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("reading the counts failed: {e}\n"),
                ),
            }
        }
        (&Method::GET, "/") => reply(
            StatusCode::OK,
            "text/plain",
            "tcpstate: metrics at /metrics\n".to_owned(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use tcpstate_common::{Counters, Event};

    use super::*;
    use crate::snapshot::{Keyed, StateCounts};

    #[test]
    fn listen_addresses_default_to_loopback() {
        assert_eq!(
            parse_listen("9977").unwrap(),
            "127.0.0.1:9977".parse().unwrap()
        );
        assert_eq!(
            parse_listen(":9977").unwrap(),
            "127.0.0.1:9977".parse().unwrap()
        );
        assert_eq!(
            parse_listen("0.0.0.0:80").unwrap(),
            "0.0.0.0:80".parse().unwrap()
        );
        assert_eq!(
            parse_listen("[::1]:80").unwrap(),
            "[::1]:80".parse().unwrap()
        );
        assert!(parse_listen("localhost").is_err());
    }

    #[test]
    fn every_state_is_a_series_and_counters_carry_the_snapshots_values() {
        let mut c = Counters::default();
        c.events[Event::Resets as usize] = 7;
        c.events[Event::PacketsOut as usize] = 11;
        let mut states = StateCounts::default();
        states.set(TcpState::TimeWait, 3);
        let mut snap = Snapshot::new(None, vec![], states, &c, 4096, 2);
        let mut port = StateCounts::default();
        port.set(TcpState::Established, 5);
        snap.ports = vec![Keyed {
            key: "443".into(),
            total: 5,
            states: port,
        }];
        let text = render(&snap, Format::OpenMetrics);
        for s in TcpState::REPORTED {
            let want = if s == TcpState::TimeWait { 3 } else { 0 };
            let line = format!(
                "tcpstate_connections{{state=\"{}\"}} {want}\n",
                state_label(s)
            );
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
        for line in [
            "tcpstate_resets_total 7\n",
            "tcpstate_packets_total{direction=\"out\"} 11\n",
            "tcpstate_timer_expirations_total 2\n",
            "tcpstate_port_connections{port=\"443\",state=\"established\"} 5\n",
            "tcpstate_flow_map_capacity{family=\"ipv6\"} 4096\n",
        ] {
            assert!(text.contains(line), "{line} missing:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        // The classic format names a counter's family with its _total.
        let classic = render(&snap, Format::Prometheus);
        assert!(
            classic.contains("# TYPE tcpstate_resets_total counter\n"),
            "{classic}"
        );
        assert!(!classic.contains("# EOF"));
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
    }
}
