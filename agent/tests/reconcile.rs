//! What the agent does where packets and the kernel's reports fell short:
//! a connection the flow maps lost (deleted behind the probe's back, as a
//! lost report would leave it) is found by the next check of the socket
//! table and restored within moments of it, not at the check after. Needs
//! root: `cargo xtask test` runs these.

mod support;

use std::{
    net::SocketAddr,
    thread::sleep,
    time::{Duration, Instant},
};

use support::{Agent, VethPair, require_root, sockaddr};
use tcpstate_common::TcpState;

/// The ids of `agent`'s IPv4 and IPv6 flow maps (its descriptors' fdinfo
/// names each map it holds).
fn flow_map_ids(agent: &Agent) -> Vec<u64> {
    let held = std::fs::read_dir(format!("/proc/{}/fdinfo", agent.pid())).expect("fdinfo");
    let mut ids: Vec<u64> = held
        .flatten()
        .filter_map(|f| std::fs::read_to_string(f.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("map_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.retain(|id| {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "show", "id", &id.to_string()])
            .output()
            .expect("bpftool");
        let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        matches!(m["name"].as_str(), Some("FLOWS4" | "FLOWS6"))
    });
    ids
}

/// The entries of map `id`, as bpftool dumps them.
fn map_entries(id: u64) -> Vec<serde_json::Value> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "id", &id.to_string()])
        .output()
        .expect("bpftool");
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool's JSON");
    entries.as_array().cloned().unwrap_or_default()
}

/// Whether a flow entry's key (as bpftool prints it) holds `port` (IPv4:
/// its ports in bytes 8-11, in either byte order).
fn key_has_port(entry: &serde_json::Value, port: u16) -> bool {
    let key: Vec<u8> = entry["key"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| u8::from_str_radix(b.as_str()?.trim_start_matches("0x"), 16).ok())
        .collect();
    key.len() == 16
        && [8, 10].iter().any(|&i| {
            let pair = [key[i], key[i + 1]];
            u16::from_le_bytes(pair) == port || u16::from_be_bytes(pair) == port
        })
}

/// Deletes the entries of the maps `ids` for local `port` behind the
/// probe's back: what a lost report or an unseen segment leaves, a
/// connection the maps miss. Returns how many.
fn forget_flows(ids: &[u64], port: u16) -> usize {
    let mut n = 0;
    for id in ids {
        for e in map_entries(*id).iter().filter(|e| key_has_port(e, port)) {
            let key: Vec<String> = e["key"]
                .as_array()
                .expect("a key of bytes")
                .iter()
                .map(|b| b.as_str().expect("hex").to_owned())
                .collect();
            let status = std::process::Command::new("bpftool")
                .args(["map", "delete", "id", &id.to_string(), "key"])
                .args(&key)
                .status()
                .expect("bpftool");
            assert!(status.success(), "deleting a flow entry");
            n += 1;
        }
    }
    n
}

/// A connection the flow maps lost (deleted behind the probe's back, as a
/// lost kernel report would leave it) is found by the next check of the
/// socket table and restored within a second of it: the check's mismatches
/// are confirmed one socket at a time moments later, not at the check
/// after (which would leave the difference for up to two periods).
#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn a_connection_the_maps_lost_is_restored_within_a_second_of_the_check() {
    require_root();
    let net = VethPair::new();
    let agent = Agent::start(&net.left, &["--reconcile-interval", "1"]);
    let peer: SocketAddr = sockaddr(&net.right_v4, 7500).parse().unwrap();
    let listener = net.right.listen(&peer.to_string());
    let ids = flow_map_ids(&agent);
    assert!(!ids.is_empty(), "the agent's flow maps");
    // (`conns` answers from a walk up to a second old: the maps themselves
    // are read here.)
    let held = |port| {
        ids.iter()
            .any(|id| map_entries(*id).iter().any(|e| key_has_port(e, port)))
    };
    for round in 0..3u64 {
        // A new connection each round: a mismatch fixed before is no
        // precedent for another.
        let client = net.left.connect(peer);
        let port = client.local_addr().unwrap().port();
        let _server = listener.accept().unwrap();
        sleep(Duration::from_millis(300 + 250 * round));
        let ss = net
            .left
            .ss_counts_where(&["sport", "=", &format!(":{port}")]);
        assert_eq!(ss.get(TcpState::Established), 1, "ss lists it");
        assert_eq!(forget_flows(&ids, port), 1, "one entry: the connection");
        let lost = Instant::now();
        while !held(port) {
            assert!(
                lost.elapsed() < Duration::from_millis(1400),
                "round {round}: the connection ss lists was still missing after {:?} \
                 (a check every second, and its confirmation)",
                lost.elapsed()
            );
            sleep(Duration::from_millis(20));
        }
        eprintln!("round {round}: restored after {:?}", lost.elapsed());
    }
}
