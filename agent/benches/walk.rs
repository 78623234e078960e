//! `cargo xtask bench`: the agent's once-a-second walk of the flow maps per
//! entry, as it was (the breakdown by service and peer) and with what
//! needs attention filled too (listeners' rows, oldest CLOSE_WAIT and
//! FIN_WAIT2 per service, port pressure), side by side in one run over a
//! million synthetic entries: a server (inbound to 32 listening ports) and
//! a client (outbound from 16 addresses to 32 upstreams, some in TIME_WAIT
//! and CLOSE_WAIT). Needs no root. Writes target/bench/walk.json.

#[path = "../tests/support/machine.rs"]
#[allow(dead_code)]
mod machine;

use std::{hint::black_box, io::Write, path::PathBuf, time::Instant};

use serde_json::json;
use tcpstate::{
    kernel::{maps::FlowRef, sockdiag::SockInfo},
    tracking::{
        attention::Watch,
        breakdown::{Breakdown, Services, local_ends},
    },
};
use tcpstate_common::{FlowEntry, FlowKey4, TcpState, Word};

const ENTRIES: u32 = 1_000_000;
const ROUNDS: usize = 7;

fn ip(a: u8, b: u8, c: u8, d: u8) -> u32 {
    u32::from_ne_bytes([a, b, c, d])
}

/// One local endpoint per entry, in `state`, from `local`:`lport` to
/// `remote`:`rport`.
fn entry(local: u32, lport: u16, remote: u32, rport: u16, state: TcpState) -> (FlowRef, FlowEntry) {
    let (key, side) = FlowKey4::new(0, local, lport, remote, rport);
    let word = Word::EMPTY
        .with_state(side, state)
        .with_state(side.other(), TcpState::Established)
        .with_local(side);
    let e = FlowEntry {
        word: word.0,
        changed: FlowEntry::stamp(1_000_000_000),
        ..FlowEntry::default()
    };
    (FlowRef::V4(key), e)
}

fn server() -> (Vec<(FlowRef, FlowEntry)>, Vec<SockInfo>) {
    let local = ip(10, 0, 0, 1);
    let entries = (0..ENTRIES)
        .map(|i| {
            let remote = ip(10, 1, (i >> 16) as u8, (i >> 8) as u8);
            entry(
                local,
                9100 + (i % 32) as u16,
                remote,
                32768 + (i % 28000) as u16,
                TcpState::Established,
            )
        })
        .collect();
    let listeners = (0..32)
        .map(|p| SockInfo {
            state: TcpState::Listen as u8,
            local: "10.0.0.1".parse().unwrap(),
            local_port: 9100 + p,
            remote: "0.0.0.0".parse().unwrap(),
            remote_port: 0,
            timewait_left: None,
            timer: 0,
            expires: Default::default(),
            recv_queue: 0,
            send_queue: 4096,
            inode: 1,
        })
        .collect();
    (entries, listeners)
}

fn client() -> Vec<(FlowRef, FlowEntry)> {
    (0..ENTRIES)
        .map(|i| {
            let local = ip(10, 0, 1, (i % 16) as u8);
            let remote = ip(10, 2, 0, ((i / 16) % 32) as u8);
            let state = match i % 10 {
                0..=5 => TcpState::Established,
                6..=8 => TcpState::TimeWait,
                _ => TcpState::CloseWait,
            };
            entry(
                local,
                32768 + ((i / 512) % 28000) as u16,
                remote,
                5432,
                state,
            )
        })
        .collect()
}

/// Milliseconds of the median of [`ROUNDS`] walks of `f`.
fn median_ms(mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn walk(entries: &[(FlowRef, FlowEntry)], listeners: &[SockInfo], attention: bool) {
    let services = Services {
        listening: listeners.iter().map(|s| s.local_port).collect(),
        ephemeral: (32768, 60999),
    };
    let now = 2_000_000_000;
    let mut b = Breakdown::default();
    let mut w = Watch::new(1, &services, listeners, now);
    for (flow, e) in entries {
        for end in local_ends(flow, Word(e.word)) {
            let service = services.of(&end);
            b.add(&end, service);
            if attention {
                w.add(&end, service, e.changed_ns(now));
            }
        }
    }
    black_box(b.top_ports(10));
    black_box(w.done(10));
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cpu = machine::cpu_model();
    println!("the once-a-second walk, {ENTRIES} entries, median of {ROUNDS} (CPU: {cpu})");
    let (srv, listening) = server();
    let cli = client();
    let mut rows = Vec::new();
    for (name, entries, listeners) in [("server", &srv, &listening[..]), ("client", &cli, &[][..])]
    {
        let before = median_ms(|| walk(entries, listeners, false));
        let with = median_ms(|| walk(entries, listeners, true));
        println!(
            "{name:<7} breakdown {before:7.1} ms  + attention {with:7.1} ms  ({:.2}x, {:.0} ns/entry more)",
            with / before,
            (with - before) * 1e6 / f64::from(ENTRIES)
        );
        rows.push(json!({"case": name, "breakdown_ms": before, "with_attention_ms": with, "ratio": with / before}));
    }
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench/walk.json");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let mut f = std::fs::File::create(&out).unwrap();
    writeln!(
        f,
        "{}",
        json!({"cpu": cpu, "entries": ENTRIES, "cases": rows})
    )
    .unwrap();
}
