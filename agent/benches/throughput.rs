//! `cargo xtask bench`: one bulk TCP stream (iperf3, 3 s) across a veth pair
//! between two namespaces, with nothing watching it, with tcpstate attached
//! to the receiving namespace (TC ingress, the default, and generic XDP),
//! and with nf_conntrack tracking the same
//! traffic there (an nftables `ct state` rule). The three run in turn, round
//! after round, so the machine's drift touches all alike; the median round's
//! ratios are reported. Writes target/bench/throughput.json.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{io::Write, path::PathBuf, process::Command, time::Duration};

use serde_json::json;
use support::{Agent, Netns, VethPair};

const ROUNDS: usize = 7;
const SECONDS: u32 = 3;

/// Gbit/s of one iperf3 stream from `client` to the server in `server`.
fn stream(server: &Netns, client: &Netns, server_ip: &str) -> f64 {
    let mut srv = Command::new("ip")
        .args([
            "netns",
            "exec",
            &server.name,
            "iperf3",
            "-s",
            "-1",
            "-B",
            server_ip,
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 (Debian package iperf3)");
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &client.name,
            "iperf3",
            "-J",
            "-c",
            server_ip,
        ])
        .args(["-t", &SECONDS.to_string()])
        .output()
        .expect("iperf3 client");
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 -J output");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .expect("iperf3 reports the received rate")
        / 1e9
}

fn nft(ns: &Netns, rules: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft: {rules}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the benchmark makes namespaces and attaches programs: run `cargo xtask bench` as root"
    );
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let net = VethPair::new();
    let (mon, peer) = (&net.left, &net.right);
    let ip = net.left_v4.clone();
    let (mut bare, mut probed, mut xdp, mut tracked) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let with_agent = |ingress: &str| {
        let agent = Agent::start(mon, &["--reconcile-interval", "10", "--ingress", ingress]);
        let rate = stream(mon, peer, &ip);
        let seen = agent.snapshot().events["packets_in"].as_u64().unwrap_or(0);
        assert!(
            seen > 10_000,
            "the probe saw the stream ({seen} packets in)"
        );
        rate
    };
    for round in 0..ROUNDS {
        eprint!("round {}/{ROUNDS}\r", round + 1);
        bare.push(stream(mon, peer, &ip));
        probed.push(with_agent("tc"));
        xdp.push(with_agent("xdp"));

        nft(
            mon,
            "table inet bench_ct {
                chain input { type filter hook input priority 0; ct state established,related accept; ct state new accept; }
                chain output { type filter hook output priority 0; ct state established,related accept; ct state new accept; }
            }",
        );
        tracked.push(stream(mon, peer, &ip));
        let ct = Command::new("ip")
            .args([
                "netns",
                "exec",
                &mon.name,
                "cat",
                "/proc/sys/net/netfilter/nf_conntrack_count",
            ])
            .output()
            .unwrap();
        let entries: u64 = String::from_utf8_lossy(&ct.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        assert!(entries > 0, "conntrack tracked the stream");
        nft(mon, "delete table inet bench_ct");
    }
    eprintln!();
    let ratios =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
    let (vs_bare, vs_ct) = (ratios(&probed, &bare), ratios(&probed, &tracked));
    let xdp_vs_bare = ratios(&xdp, &bare);
    let range = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::MAX, f64::min);
        let hi = v.iter().copied().fold(f64::MIN, f64::max);
        format!("{lo:.3}-{hi:.3}")
    };
    println!("one TCP stream over veth, iperf3 {SECONDS} s, median of {ROUNDS} rounds (Gbit/s)");
    println!(
        "{:<28} {:>8}",
        "no probe",
        format!("{:.2}", median(bare.clone()))
    );
    println!(
        "{:<28} {:>8}",
        "tcpstate (XDP skb + TC)",
        format!("{:.2}", median(probed.clone()))
    );
    println!(
        "{:<28} {:>8}",
        "nf_conntrack (nft ct state)",
        format!("{:.2}", median(tracked.clone()))
    );
    println!(
        "tcpstate / no probe: {:.3} (rounds {}); tcpstate / conntrack: {:.3} (rounds {})",
        median(vs_bare.clone()),
        range(&vs_bare),
        median(vs_ct.clone()),
        range(&vs_ct)
    );
    println!(
        "tcpstate --ingress xdp / no probe: {:.3} (rounds {})",
        median(xdp_vs_bare.clone()),
        range(&xdp_vs_bare)
    );
    let out = json!({
        "seconds": SECONDS,
        "rounds": ROUNDS,
        "gbit_s": { "none": bare, "tcpstate": probed, "tcpstate_ingress_xdp": xdp, "conntrack": tracked },
        "median_ratio_tcpstate_vs_none": median(vs_bare),
        "median_ratio_tcpstate_ingress_xdp_vs_none": median(xdp_vs_bare),
        "median_ratio_tcpstate_vs_conntrack": median(vs_ct),
    });
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = std::fs::File::create(dir.join("throughput.json")).unwrap();
    writeln!(f, "{}", serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("wrote target/bench/throughput.json");
}
