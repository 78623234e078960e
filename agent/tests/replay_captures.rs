//! `tcpstate replay` on real public captures (tests/captures/, BSD
//! licensed, from tcpdump's and gopacket's test suites): the counts at the
//! end and each connection's outcome in the log, against what the capture
//! is known to hold (`tcpdump -nn -r` lists it; tests/captures/README.md).
//! No root needed.

mod support;

use std::collections::HashMap;

use support::capture::{log_rows, replay};
use tcpstate::snapshot::StateCounts;
use tcpstate_common::TcpState;

fn capture(name: &str) -> String {
    format!("{}/tests/captures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn counts(name: &str, args: &[&str]) -> (StateCounts, String) {
    let (status, out, err) = replay(&capture(name), &[args, &["--json"]].concat());
    assert_eq!(status, 0, "{name}: {err}");
    (
        StateCounts::from_json(&serde_json::from_str(&out).unwrap()).unwrap(),
        err,
    )
}

fn only(pairs: &[(TcpState, u64)]) -> StateCounts {
    let mut c = StateCounts::default();
    for (s, n) in pairs {
        c.set(*s, *n);
    }
    c
}

/// A row of the log, by field name.
type Row = HashMap<String, String>;
/// By originator port: (conn_state, orig_tcp_state, resp_tcp_state).
type ByPort = HashMap<u16, (String, String, String)>;

/// The log's rows, and their outcomes by originator port.
fn log(name: &str) -> (Vec<Row>, ByPort) {
    let (status, out, err) = replay(&capture(name), &["--conns", "-"]);
    assert_eq!(status, 0, "{name}: {err}");
    let rows: Vec<Row> = log_rows(&out);
    let by_port = rows
        .iter()
        .map(|r| {
            (
                r["id.orig_p"].parse().unwrap(),
                (
                    r["conn_state"].clone(),
                    r["orig_tcp_state"].clone(),
                    r["resp_tcp_state"].clone(),
                ),
            )
        })
        .collect();
    (rows, by_port)
}

fn state_of(by_port: &ByPort, port: u16) -> &str {
    &by_port
        .get(&port)
        .unwrap_or_else(|| panic!("no row for port {port}: {by_port:?}"))
        .0
}

#[test]
fn a_closed_connection_leaves_its_first_closer_in_time_wait() {
    let (c, _) = counts("print-flags.pcap", &[]);
    assert_eq!(c, only(&[(TcpState::TimeWait, 1)]));
    let (rows, by_port) = log("print-flags.pcap");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        by_port[&55920],
        ("SF".into(), "TIME_WAIT".into(), "LAST_ACK".into())
    );
}

#[test]
fn bgp_sessions_refused_open_and_closed_by_the_server() {
    let (c, err) = counts("bgp-4byte-asn.pcap", &[]);
    // Three sessions open at both ends; the closed one's server in TIME_WAIT.
    assert_eq!(
        c,
        only(&[(TcpState::Established, 6), (TcpState::TimeWait, 1)])
    );
    assert!(err.contains("12 not TCP"), "{err}");
    let (server, _) = counts("bgp-4byte-asn.pcap", &["--local", "1.0.0.2"]);
    assert_eq!(server, only(&[(TcpState::TimeWait, 1)]));
    let (rows, by_port) = log("bgp-4byte-asn.pcap");
    assert_eq!(rows.len(), 6);
    assert_eq!(state_of(&by_port, 34995), "REJ");
    assert_eq!(state_of(&by_port, 43415), "REJ");
    for open in [42741, 35169, 34883] {
        assert_eq!(state_of(&by_port, open), "S1");
    }
    assert_eq!(
        by_port[&33993],
        ("SF".into(), "LAST_ACK".into(), "TIME_WAIT".into())
    );
}

#[test]
fn a_cooked_capture_of_redis_on_loopback() {
    let (c, _) = counts("resp_3_malicious.pcap", &[]);
    // 16 clients and one server closed first; the one seen only closing
    // holds no state tcpstate saw begin.
    assert_eq!(c, only(&[(TcpState::TimeWait, 17)]));
    let (rows, by_port) = log("resp_3_malicious.pcap");
    assert_eq!(rows.len(), 18);
    assert!(rows.iter().all(|r| r["conn_state"] == "SF"), "{rows:?}");
    assert_eq!(by_port[&52767].2, "TIME_WAIT");
    assert_eq!(by_port[&52759].1, "-", "picked up midstream: no state");
}

#[test]
fn a_pcapng_over_two_weeks_of_openflow() {
    let (c, err) = counts("of13_ericsson.pcapng", &[]);
    assert_eq!(c, StateCounts::default());
    assert!(err.contains("174 frames, 174 TCP segments"), "{err}");
    let (rows, by_port) = log("of13_ericsson.pcapng");
    assert_eq!(rows.len(), 21);
    assert_eq!(state_of(&by_port, 56439), "REJ");
    assert_eq!(state_of(&by_port, 56440), "RSTO");
    assert_eq!(rows.iter().filter(|r| r["conn_state"] == "OTH").count(), 19);
}

#[test]
fn ipv6_on_bsd_loopback() {
    let (c, _) = counts("test_loopback.pcap", &[]);
    assert_eq!(c, only(&[(TcpState::Established, 2)]));
    let (_, by_port) = log("test_loopback.pcap");
    assert_eq!(state_of(&by_port, 58806), "S1");
    assert_eq!(state_of(&by_port, 58799), "OTH");
}

#[test]
fn a_pcapng_of_three_interfaces_with_one_timestamp() {
    let (c, _) = counts("gopacket-test300.pcapng", &[]);
    assert_eq!(c, StateCounts::default());
    let (rows, by_port) = log("gopacket-test300.pcapng");
    assert_eq!(rows.len(), 1);
    assert_eq!(state_of(&by_port, 46920), "RSTO");
}
