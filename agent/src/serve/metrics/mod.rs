//! The OpenMetrics/Prometheus endpoint (`tcpstate run --metrics ADDR`).
//!
//! Each scrape takes one snapshot of the agent (O(1) counters, the cached
//! per-port breakdown) and renders it through `prometheus-client`, the
//! official Rust client, into a fresh registry: every value is the agent's
//! own at that moment, so nothing is double-counted between scrapes.
//! State names follow node_exporter's `node_tcp_connection_states{state}`
//! spelling users already know (`established`, `time_wait`, ...).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
};
use prometheus_client::encoding::prometheus_text;

use crate::serve::reader::Reader;

mod attention;
mod durations;
mod kernel;
mod netns;
mod observed;
mod render;
mod server;
mod services;
mod upkeep;
pub mod web_config;

pub use render::{render, state_label};
pub use server::serve;

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

pub(super) fn respond(req: &Request<Incoming>, reader: &Reader) -> Response<Full<Bytes>> {
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
    use tcpstate_common::{Counters, Event, TcpState};

    use super::*;
    use crate::snapshot::{Keyed, Snapshot, StateCounts};

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
        let mut upstream = StateCounts::default();
        upstream.set(TcpState::Established, 2);
        snap.ports = vec![
            Keyed {
                key: "443".into(),
                total: 5,
                states: port,
            },
            Keyed {
                key: "→5432".into(),
                total: 2,
                states: upstream,
            },
        ];
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
            "tcpstate_port_connections{port=\"443\",side=\"local\",state=\"established\"} 5\n",
            "tcpstate_port_connections{port=\"5432\",side=\"remote\",state=\"established\"} 2\n",
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
