//! `cargo xtask bench`: one bulk TCP stream (iperf3) across a veth pair
//! between two namespaces, with nothing watching it, with tcpstate attached
//! to the receiving namespace (TC ingress, the default, and generic XDP),
//! and with nf_conntrack tracking the same traffic there (nftables `ct state`
//! rules).
//!
//! This VM's throughput swings by 2x within seconds, more than any difference
//! between configurations, so all four exist at once, each on a veth pair of
//! its own with an iperf3 server waiting, and short streams alternate between
//! them, round after round: each round's ratios compare runs seconds apart,
//! and the median ratio over many rounds is reported with a distribution-free
//! 95 % confidence interval (order statistics of the rounds' ratios).
//! Writes target/bench/throughput.json.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    io::Write,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::json;
use support::{Agent, Netns, VethPair};

const ROUNDS: usize = 36;
const SECONDS: u32 = 2;

/// An iperf3 server in a namespace, stopped when dropped.
struct Server(Child);

impl Server {
    fn start(ns: &Netns, ip: &str) -> Server {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "iperf3", "-s", "-B", ip])
            .stdout(Stdio::null())
            .spawn()
            .expect("iperf3 (Debian package iperf3)");
        Server(child)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Gbit/s of one iperf3 stream from `client` to the server at `server_ip`.
fn stream(client: &Netns, server_ip: &str) -> f64 {
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

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn median(v: &[f64]) -> f64 {
    quantile(v, 0.5)
}

/// A distribution-free confidence interval for the median of `v` (at least
/// 95 %): the k-th smallest and k-th largest values for the largest k such
/// that the median lies between them with probability >= 0.95 under the
/// binomial(n, 1/2) law of how many values fall below it.
fn median_ci(v: &[f64]) -> (f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    // P(X = i) for X ~ binomial(n, 1/2), built up without overflow.
    let mut p = vec![0.5f64.powi(n as i32); n + 1];
    for i in 1..=n {
        p[i] = p[i - 1] * (n - i + 1) as f64 / i as f64;
    }
    let k = (0..n / 2)
        .rev()
        .find(|&k| p[k..=n - k].iter().sum::<f64>() >= 0.95)
        .unwrap_or(0);
    (v[k], v[n - 1 - k])
}

/// "median [95 % CI lo-hi], above 1 in m of n rounds" of per-round ratios.
fn summary(v: &[f64]) -> String {
    let (lo, hi) = median_ci(v);
    let above = v.iter().filter(|r| **r >= 1.0).count();
    format!(
        "{:.3} [95 % CI {lo:.3}-{hi:.3}], >= 1 in {above} of {} rounds",
        median(v),
        v.len()
    )
}

fn conntrack_entries(ns: &Netns) -> u64 {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "cat",
            "/proc/sys/net/netfilter/nf_conntrack_count",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// One configuration: a veth pair whose left namespace receives the stream.
struct Setup {
    name: &'static str,
    // Dropped before the namespaces it runs in.
    _server: Server,
    net: VethPair,
    gbit_s: Vec<f64>,
}

impl Setup {
    fn new(name: &'static str) -> Setup {
        let net = VethPair::new();
        let server = Server::start(&net.left, &net.left_v4);
        Setup {
            name,
            _server: server,
            net,
            gbit_s: Vec::new(),
        }
    }

    fn run(&mut self) {
        let rate = stream(&self.net.right, &self.net.left_v4);
        self.gbit_s.push(rate);
    }
}

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the benchmark makes namespaces and attaches programs: run `cargo xtask bench` as root"
    );
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut none = Setup::new("none");
    let mut tc = Setup::new("tcpstate");
    let mut xdp = Setup::new("tcpstate --ingress xdp");
    let mut ct = Setup::new("conntrack");
    let agent_tc = Agent::start(&tc.net.left, &["--ingress", "tc"]);
    let agent_xdp = Agent::start(&xdp.net.left, &["--ingress", "xdp"]);
    nft(
        &ct.net.left,
        "table inet bench_ct {
            chain input { type filter hook input priority 0; ct state established,related accept; ct state new accept; }
            chain output { type filter hook output priority 0; ct state established,related accept; ct state new accept; }
        }",
    );
    std::thread::sleep(Duration::from_millis(500));
    for round in 0..ROUNDS {
        eprint!("round {}/{ROUNDS}\r", round + 1);
        // The order turns each round, so none of them always follows another.
        let mut order = [&mut none, &mut tc, &mut xdp, &mut ct];
        order.rotate_left(round % 4);
        for setup in order {
            setup.run();
        }
    }
    eprintln!();
    // Each was really watched: the probes saw the streams, conntrack tracked them.
    for (agent, what) in [(&agent_tc, "TC"), (&agent_xdp, "XDP")] {
        let seen = agent.snapshot().events["packets_in"].as_u64().unwrap_or(0);
        assert!(
            seen > 100_000,
            "the {what} probe saw the streams ({seen} packets in)"
        );
    }
    assert!(
        conntrack_entries(&ct.net.left) > 0,
        "conntrack tracked the streams"
    );
    drop((agent_tc, agent_xdp));

    let ratio = |a: &Setup, b: &Setup| -> Vec<f64> {
        a.gbit_s.iter().zip(&b.gbit_s).map(|(x, y)| x / y).collect()
    };
    let (tc_none, tc_ct, xdp_none, ct_none) = (
        ratio(&tc, &none),
        ratio(&tc, &ct),
        ratio(&xdp, &none),
        ratio(&ct, &none),
    );
    println!(
        "one TCP stream over veth, iperf3 {SECONDS} s, {ROUNDS} rounds alternating between four veth pairs"
    );
    println!("{:<24} {:>8} {:>14}", "Gbit/s", "median", "IQR");
    for s in [&none, &tc, &xdp, &ct] {
        println!(
            "{:<24} {:>8.2} {:>8.2}-{:.2}",
            s.name,
            median(&s.gbit_s),
            quantile(&s.gbit_s, 0.25),
            quantile(&s.gbit_s, 0.75)
        );
    }
    println!("per-round ratios, median with a distribution-free confidence interval:");
    println!("  tcpstate / none         {}", summary(&tc_none));
    println!("  tcpstate / conntrack    {}", summary(&tc_ct));
    println!("  tcpstate xdp / none     {}", summary(&xdp_none));
    println!("  conntrack / none        {}", summary(&ct_none));
    let out = json!({
        "seconds": SECONDS,
        "rounds": ROUNDS,
        "gbit_s": {
            "none": none.gbit_s,
            "tcpstate": tc.gbit_s,
            "tcpstate_ingress_xdp": xdp.gbit_s,
            "conntrack": ct.gbit_s,
        },
        "median_ratio_tcpstate_vs_none": median(&tc_none),
        "median_ratio_tcpstate_vs_none_ci95": median_ci(&tc_none),
        "median_ratio_tcpstate_vs_conntrack": median(&tc_ct),
        "median_ratio_tcpstate_vs_conntrack_ci95": median_ci(&tc_ct),
        "median_ratio_tcpstate_ingress_xdp_vs_none": median(&xdp_none),
        "median_ratio_tcpstate_ingress_xdp_vs_none_ci95": median_ci(&xdp_none),
        "median_ratio_conntrack_vs_none": median(&ct_none),
        "median_ratio_conntrack_vs_none_ci95": median_ci(&ct_none),
    });
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = std::fs::File::create(dir.join("throughput.json")).unwrap();
    writeln!(f, "{}", serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("wrote target/bench/throughput.json");
}
