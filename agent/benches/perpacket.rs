//! `cargo xtask bench`: per-packet cost of the probe through
//! BPF_PROG_TEST_RUN, beside two reference programs run in the same process
//! on the same frames. Writes target/bench/perpacket.json.

#[path = "../tests/support/frames.rs"]
#[allow(dead_code)]
mod frames;
#[path = "../tests/support/machine.rs"]
#[allow(dead_code)]
mod machine;

use std::{io::Write, path::PathBuf};

use aya::{
    Ebpf,
    maps::HashMap,
    programs::{TestRun, TestRunOptions, Xdp},
};
use frames::{ACK, FIN, SYN, Tcp};
use serde_json::json;
use tcpstate::kernel::{
    maps::FlowRef,
    probe::{Probe, ProbeOptions},
};
use tcpstate_common::{
    FlowKey4,
    nat::{NatTarget4, flip_of},
};

/// Runs per case for the repeated (steady-state) cases.
const REPEAT: u32 = 2_000_000;
/// Distinct flows for the cases that need a new flow per run.
const FLOWS: u16 = 20_000;
/// Rounds; the median round is reported.
const ROUNDS: usize = 9;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Refs {
    ebpf: Ebpf,
}

impl Refs {
    fn load() -> Refs {
        let path = std::env::var("TCPSTATE_BENCH_REFS_OBJ")
            .expect("run through `cargo xtask bench` (TCPSTATE_BENCH_REFS_OBJ)");
        let mut ebpf = Ebpf::load_file(&path).expect("load the reference programs");
        for name in ["ref_pass", "ref_lookup", "ref_insert", "ref_lookup36"] {
            let p: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
            p.load().expect("load reference program");
        }
        Refs { ebpf }
    }

    fn time(&self, name: &str, frame: &[u8], repeat: u32) -> f64 {
        let p: &Xdp = self.ebpf.program(name).unwrap().try_into().unwrap();
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::new()
        };
        p.test_run(opts).expect("test run").duration.as_nanos() as f64
    }

    /// Seeds the 4-tuple of `frame` so that `ref_lookup` finds it.
    fn seed(&mut self, frame: &[u8]) {
        let mut map: HashMap<_, [u32; 3], u64> =
            HashMap::try_from(self.ebpf.map_mut("REF_FLOWS").unwrap()).unwrap();
        let w = |o: usize| u32::from_ne_bytes(frame[o..o + 4].try_into().unwrap());
        map.insert([w(26), w(30), w(34)], 0, 0).unwrap();
        let mut map36: HashMap<_, [u32; 9], u64> =
            HashMap::try_from(self.ebpf.map_mut("REF_FLOWS36").unwrap()).unwrap();
        map36
            .insert(
                [0, 0, 0xffff_0000, w(26), 0, 0, 0xffff_0000, w(30), w(34)],
                0,
                0,
            )
            .unwrap();
    }
}

/// The probe, with the benchmark's server address (10.0.0.1) as the host's own.
fn load(opts: &ProbeOptions) -> Probe {
    let mut probe = Probe::load(opts, None).expect("load the probe");
    probe
        .set_local_addresses(0, &["10.0.0.1".parse().unwrap()])
        .expect("local addresses");
    probe
}

/// The CPU's model name (ratios differ between CPU kinds of the same VM).
/// The inode of the bench's own network namespace.
fn netns_inode() -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/net").unwrap().ino()
}

/// With `--observe`: the host's own established ACK (found in its slot
/// first: nothing more), and a forwarded one (neither address the host's:
/// missed there, found not local, then the fast path in the observer's
/// slot), each through the namespace's entry program.
fn observing(
    opts: &ProbeOptions,
    own_ack: &[u8],
    establish: &dyn Fn(&Probe, u16),
) -> (f64, f64, Vec<(String, u32)>) {
    use tcpstate::kernel::entry::Hook;
    let mut p = Probe::load(
        &ProbeOptions {
            observe: true,
            max_netns: 2,
            ..opts.clone()
        },
        None,
    )
    .expect("load the probe to observe");
    let slot = p.register_netns(netns_inode()).unwrap();
    p.set_local_addresses(slot, &["10.0.0.1".parse().unwrap()])
        .unwrap();
    let observer = p.register_observer(slot).unwrap();
    establish(&p, 1);
    let own = p.time_entry(slot, Hook::Xdp, own_ack, REPEAT).unwrap();
    let there = |flags, seq, ack| Tcp::new("10.0.1.5", 1, "10.0.2.7", 80, flags).seq(seq, ack);
    let back = |flags, seq, ack| Tcp::new("10.0.2.7", 80, "10.0.1.5", 1, flags).seq(seq, ack);
    for f in [
        there(SYN, 100, 0),
        back(SYN | ACK, 900, 101),
        there(ACK, 101, 901),
    ] {
        p.run_entry(slot, Hook::Xdp, &f.frame()).unwrap();
    }
    let ack = Tcp {
        payload: 0,
        ..there(ACK, 101, 901)
    }
    .frame();
    let passing = p.time_entry(slot, Hook::Xdp, &ack, REPEAT).unwrap();
    // The case measures what it says: both ends established, in the
    // observer's slot, and the host's own counts untouched by it.
    let est = |s| p.counters(s).unwrap().states[tcpstate_common::TcpState::Established as usize];
    assert_eq!((est(observer), est(slot)), (2, 1), "the observed flow");
    (own, passing, p.verifier_counts())
}

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the benchmark loads eBPF programs: run `cargo xtask bench` as root"
    );
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let probe_opts = ProbeOptions {
        max_flows: 262_144,
        // So that a namespace gets an XDP entry program (the cases below
        // run the XDP program).
        ingress: tcpstate::kernel::probe::Ingress::XdpGeneric,
        ..ProbeOptions::default()
    };
    let mut refs = Refs::load();

    // One established flow (server local: client segments arrive via XDP).
    let client_at = |sport: u16, dport: u16, flags: u8, seq: u32, ack: u32| {
        Tcp::new("10.0.0.9", sport, "10.0.0.1", dport, flags).seq(seq, ack)
    };
    let server_at = |sport: u16, dport: u16, flags: u8, seq: u32, ack: u32| {
        Tcp::new("10.0.0.1", dport, "10.0.0.9", sport, flags).seq(seq, ack)
    };
    let client = |sport, flags, seq, ack| client_at(sport, 443, flags, seq, ack);
    let server = |sport, flags, seq, ack| server_at(sport, 443, flags, seq, ack);
    let establish_at = |p: &Probe, sport: u16, dport: u16| {
        p.run_xdp(&client_at(sport, dport, SYN, 100, 0).frame())
            .unwrap();
        p.run_tc(&server_at(sport, dport, SYN | ACK, 900, 101).frame())
            .unwrap();
        p.run_xdp(&client_at(sport, dport, ACK, 101, 901).frame())
            .unwrap();
    };
    let establish = |p: &Probe, sport: u16| establish_at(p, sport, 443);
    let ip4 = |s: &str| u32::from_ne_bytes(s.parse::<std::net::Ipv4Addr>().unwrap().octets());
    let ack = Tcp {
        payload: 0,
        ..client(1, ACK, 101, 901)
    }
    .frame();
    let udp = {
        let mut f = ack.clone();
        f[14 + 9] = 17;
        f
    };
    refs.seed(&ack);

    let mut rows: Vec<(&str, Vec<f64>)> = [
        "syn_to_host",
        "syn_out_new",
        "synack_new",
        "ack_established",
        "ack_netns",
        "ack_netns_observing",
        "ack_observed",
        "ack_translated",
        "fin",
        "non_tcp",
        "ref_pass",
        "ref_lookup",
        "ref_insert",
        "ref_pass_single",
        "ref_lookup36",
    ]
    .into_iter()
    .map(|n| (n, Vec::new()))
    .collect();
    let mut push =
        |name: &str, v: f64| rows.iter_mut().find(|(n, _)| *n == name).unwrap().1.push(v);

    let mut observe_verified = Vec::new();
    for round in 0..ROUNDS {
        eprint!("round {}/{ROUNDS}\r", round + 1);
        // Steady state: the same frame many times.
        let mut probe = load(&probe_opts);
        establish(&probe, 1);
        push(
            "ack_established",
            probe.time_program("tcpstate_xdp", &ack, REPEAT).unwrap(),
        );
        // The same ACK as an attached interface runs it: through its
        // namespace's entry program, which names the namespace and
        // tail-calls the program above.
        let slot = probe.register_netns(netns_inode()).unwrap();
        assert_eq!(slot, 0, "the first namespace has slot 0, as the flow's key");
        // A new slot starts empty: the address and the flow again.
        probe
            .set_local_addresses(slot, &["10.0.0.1".parse().unwrap()])
            .unwrap();
        establish(&probe, 1);
        push(
            "ack_netns",
            probe
                .time_entry(slot, tcpstate::kernel::entry::Hook::Xdp, &ack, REPEAT)
                .unwrap(),
        );
        push(
            "non_tcp",
            probe.time_program("tcpstate_xdp", &udp, REPEAT).unwrap(),
        );
        let (own, passing, verified) = observing(&probe_opts, &ack, &establish);
        observe_verified = verified;
        push("ack_netns_observing", own);
        push("ack_observed", passing);
        // Local NAT: the wire says port 443, the socket (a REDIRECT) 8443.
        // An untranslated flow never looks at the translations (the fast
        // path finds it first); a translated one misses, translates, and
        // takes the fast path on the socket's tuple.
        let mut probe = probe;
        establish_at(&probe, 2, 8443);
        let (wire, wire_side) = FlowKey4::new(0, ip4("10.0.0.9"), 2, ip4("10.0.0.1"), 443);
        let (key, sock_side) = FlowKey4::new(0, ip4("10.0.0.9"), 2, ip4("10.0.0.1"), 8443);
        probe
            .keep_translation4(
                wire,
                NatTarget4 {
                    key,
                    flip: flip_of(wire_side, sock_side),
                },
            )
            .unwrap();
        let translated = Tcp {
            payload: 0,
            ..client(2, ACK, 101, 901)
        }
        .frame();
        push(
            "ack_translated",
            probe
                .time_program("tcpstate_xdp", &translated, REPEAT)
                .unwrap(),
        );
        // The case measures what it says: the wire's tuple made no entry.
        assert!(
            probe.flow_entry(&FlowRef::V4(wire)).unwrap().is_none()
                && probe.flow_entry(&FlowRef::V4(key)).unwrap().is_some(),
            "the translated ACK did not reach the socket's entry"
        );
        push("ref_pass", refs.time("ref_pass", &ack, REPEAT));
        push("ref_lookup", refs.time("ref_lookup", &ack, REPEAT));
        push("ref_lookup36", refs.time("ref_lookup36", &ack, REPEAT));

        // One run per distinct SYN (the kernel times the run alone). A SYN
        // to this host keeps nothing until the host answers: a lookup.
        let syns: Vec<Vec<u8>> = (0..FLOWS)
            .map(|i| client(10_000 + i, SYN, 100, 0).frame())
            .collect();
        let mut t = 0.0;
        for f in &syns {
            t += probe.time_program("tcpstate_xdp", f, 1).unwrap();
        }
        push("syn_to_host", t / FLOWS as f64);
        // The host's answer creates the flow: its SYN-ACK, through TC.
        let mut t = 0.0;
        for i in 0..FLOWS {
            let f = server(10_000 + i, SYN | ACK, 900, 101).frame();
            t += probe.time_program("tcpstate_tc", &f, 1).unwrap();
        }
        push("synack_new", t / FLOWS as f64);
        // A connect of the host's own: its SYN creates the flow.
        let mut t = 0.0;
        for i in 0..FLOWS {
            let f = server(30_000 + i, SYN, 900, 0).frame();
            t += probe.time_program("tcpstate_tc", &f, 1).unwrap();
        }
        push("syn_out_new", t / FLOWS as f64);
        let mut t = 0.0;
        for f in &syns {
            t += refs.time("ref_insert", f, 1);
        }
        push("ref_insert", t / FLOWS as f64);
        let mut t = 0.0;
        for f in &syns {
            t += refs.time("ref_pass", f, 1);
        }
        push("ref_pass_single", t / FLOWS as f64);

        // A FIN on an established flow, each a real transition.
        let probe = load(&probe_opts);
        for i in 0..FLOWS {
            establish(&probe, 10_000 + i);
        }
        let mut t = 0.0;
        for i in 0..FLOWS {
            t += probe
                .time_program(
                    "tcpstate_xdp",
                    &client(10_000 + i, FIN | ACK, 101, 901).frame(),
                    1,
                )
                .unwrap();
        }
        push("fin", t / FLOWS as f64);
    }
    eprintln!();

    let series = |name: &str| rows.iter().find(|(n, _)| *n == name).unwrap().1.clone();
    let ns = |name: &str| median(series(name));
    // Ratios are taken within each round (both measured seconds apart), then
    // the median round is reported: steadier than a ratio of medians when the
    // machine's speed drifts between rounds.
    let ratio = |a: &str, b: &str| {
        let mut r: Vec<f64> = series(a)
            .iter()
            .zip(series(b))
            .map(|(x, y)| x / y)
            .collect();
        r.sort_by(|x, y| x.partial_cmp(y).unwrap());
        format!(
            "{:.2}x {b} (rounds {:.2}-{:.2})",
            r[r.len() / 2],
            r[0],
            r[r.len() - 1]
        )
    };
    let cpu = machine::cpu_model();
    println!("CPU: {cpu}");
    println!("per-packet cost, BPF_PROG_TEST_RUN, median of {ROUNDS} rounds");
    println!("{:<20} {:>8}  ratio", "case", "ns");
    let mut out = Vec::new();
    for (name, _) in &rows {
        let v = ns(name);
        let ratio = match *name {
            "ack_established" | "ack_translated" | "non_tcp" => ratio(name, "ref_lookup"),
            // The cost of knowing the namespace (goal: at most 1.10).
            "ack_netns" => ratio(name, "ack_established"),
            // Observing costs the host's own traffic nothing...
            "ack_netns_observing" => ratio(name, "ack_netns"),
            // ...and what passes through about one more lookup round.
            "ack_observed" => ratio(name, "ref_lookup"),
            // One run per frame, like the insert reference.
            "syn_to_host" | "synack_new" | "syn_out_new" | "fin" => ratio(name, "ref_insert"),
            "ref_lookup" | "ref_lookup36" => ratio(name, "ref_pass"),
            "ref_insert" => ratio(name, "ref_pass_single"),
            _ => String::new(),
        };
        println!("{name:<20} {v:>8.1}  {ratio}");
        out.push(
            json!({ "case": name, "ns": (v * 10.0).round() / 10.0, "ratio": ratio, "cpu": cpu }),
        );
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let mut f = std::fs::File::create(dir.join("perpacket.json")).unwrap();
    writeln!(f, "{}", serde_json::to_string_pretty(&out).unwrap()).unwrap();
    println!("wrote target/bench/perpacket.json");

    // What the verifier walks for each program, with the kernel's reports
    // as a running agent loads them (the offsets from this kernel's BTF).
    println!();
    println!("verifier: instructions processed per program (limit 1,000,000)");
    let layout = tcpstate::kernel::btf::Btf::kernel()
        .and_then(|btf| tcpstate::kernel::btf::sock_layout(&btf))
        .ok();
    let full = Probe::load(&probe_opts, layout).expect("load the probe with its reports");
    let counts = full.verifier_counts();
    for (name, n) in &counts {
        println!("{name:<20} {n:>9}");
    }
    // Loaded to observe (no kernel reports: the packet programs' share).
    for (name, n) in observe_verified.iter().filter(|(n, _)| n.contains("xdp")) {
        println!("{:<20} {n:>9}  (--observe)", name);
    }
    let mut f = std::fs::File::create(dir.join("verifier.json")).unwrap();
    writeln!(f, "{}", serde_json::to_string_pretty(&counts).unwrap()).unwrap();
    drop(full);

    // Kernel memory per tracked flow: the flow maps are preallocated, so
    // what the kernel accounts for them divided by their capacity.
    println!();
    println!("kernel memory of the flow maps (fdinfo memlock), per flow of capacity");
    println!(
        "{:<10} {:>12} {:>12} {:>8} {:>8}",
        "capacity", "FLOWS4", "FLOWS6", "B/v4", "B/v6"
    );
    let mut mem = Vec::new();
    // Powers of two: the kernel sizes the bucket array to one.
    for capacity in [131_072u32, 262_144, 1_048_576] {
        let p = load(&ProbeOptions {
            max_flows: capacity,
            ..ProbeOptions::default()
        });
        let (v4, v6) = (
            p.map_memory("FLOWS4").unwrap(),
            p.map_memory("FLOWS6").unwrap(),
        );
        let (b4, b6) = (v4 as f64 / capacity as f64, v6 as f64 / capacity as f64);
        println!("{capacity:<10} {v4:>12} {v6:>12} {b4:>8.1} {b6:>8.1}");
        mem.push(json!({
            "capacity": capacity,
            "flows4_bytes": v4,
            "flows6_bytes": v6,
            "bytes_per_flow_v4": (b4 * 10.0).round() / 10.0,
            "bytes_per_flow_v6": (b6 * 10.0).round() / 10.0,
        }));
    }
    let mut f = std::fs::File::create(dir.join("memory.json")).unwrap();
    writeln!(f, "{}", serde_json::to_string_pretty(&mem).unwrap()).unwrap();
    println!("wrote target/bench/memory.json");
}
