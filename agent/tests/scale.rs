//! A million tracked flows in a running agent. The test runs the agent's own
//! loaded XDP program (found by name, run with BPF_PROG_TEST_RUN, so it
//! updates the agent's maps) on a million distinct handshakes of the
//! namespace's address: its SYN and the peer's SYN-ACK, each pair one
//! ESTABLISHED connection. The frames' known contents are the truth:
//! exactly 100,000, then 1,000,000 ESTABLISHED, none refused, the counters
//! equal a recount of the entries, and `count` stays fast. The agent's
//! memory at both sizes is printed.
//!
//! Needs root: `cargo xtask test` runs it.

mod support;

use std::{
    borrow::Cow,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use aya_obj::programs::xdp::XdpAttachType;
use support::{
    Agent, VethPair,
    frames::{ACK, SYN, Tcp},
    require_root, tcpstate,
};
use tcpstate_common::TcpState;

/// The agent's loaded `tcpstate_xdp` (the only agent running).
fn agents_xdp() -> Xdp {
    let info = aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter(|p| p.name_as_str() == Some("tcpstate_xdp"))
        .max_by_key(|p| p.id())
        .expect("the agent's XDP program is loaded");
    Xdp::from_program_info(
        info,
        Cow::Borrowed("tcpstate_xdp"),
        XdpAttachType::Interface,
    )
    .expect("a handle on the agent's program")
}

fn count_ms(agent: &Agent) -> f64 {
    let mut v: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let out = tcpstate()
                .args(["count", "--socket"])
                .arg(&agent.socket)
                .output()
                .unwrap();
            assert!(out.status.success());
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[2]
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn a_million_flows_are_tracked_exactly() {
    require_root();
    let net = VethPair::new();
    let agent = Agent::start(
        &net.left,
        &["--max-flows", "1048576", "--reconcile-interval", "0"],
    );
    let prog = agents_xdp();
    let local: Ipv4Addr = net.left_v4.parse().unwrap();
    let run = |frame: &[u8]| {
        let opts = TestRunOptions {
            data_in: Some(frame),
            ..TestRunOptions::new()
        };
        assert_eq!(prog.test_run(opts).unwrap().return_value, 2, "XDP_PASS");
    };
    let base = agent.snapshot();
    let mut sent = 0u32;
    for target in [100_000u32, 1_000_000] {
        let started = Instant::now();
        while sent < target {
            // 198.18.0.0/15: 64 ports per address, all distinct tuples.
            let remote = Ipv4Addr::from(0xc612_0000 + (sent >> 6)).to_string();
            let port = 1024 + (sent & 63) as u16;
            let local = local.to_string();
            run(&Tcp::new(&local, port, &remote, 443, SYN).seq(7, 0).frame());
            run(&Tcp::new(&remote, 443, &local, port, SYN | ACK)
                .seq(900, 8)
                .frame());
            sent += 1;
        }
        let injected = started.elapsed();
        // Two of the agent's once-a-second walks over the full map.
        std::thread::sleep(Duration::from_millis(2200));
        let counts = agent.counts();
        let snap = agent.snapshot();
        assert_eq!(
            counts.get(TcpState::Established),
            u64::from(target),
            "every handshake is one connection"
        );
        assert_eq!(
            snap.events["map_full"].as_u64(),
            base.events["map_full"].as_u64(),
            "nothing refused below the capacity"
        );
        let verify = tcpstate()
            .args(["count", "--verify", "--socket"])
            .arg(&agent.socket)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&verify.stdout);
        assert!(
            text.contains("counters agree with its entries"),
            "{text}{}",
            String::from_utf8_lossy(&verify.stderr)
        );
        let ms = count_ms(&agent);
        assert!(ms < 100.0, "count took {ms} ms with {target} flows");
        let (rss, peak) = (
            support::memory_kb(agent.pid(), "VmRSS"),
            support::memory_kb(agent.pid(), "VmHWM"),
        );
        eprintln!(
            "{target} flows: injected in {injected:?}; map {:?}; count {ms:.1} ms; agent RSS {} MiB (peak {} MiB)",
            snap.flows_in_map,
            rss / 1024,
            peak / 1024
        );
    }
}
