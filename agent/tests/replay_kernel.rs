//! One engine: every test capture through the loaded probe
//! (BPF_PROG_TEST_RUN) and through the host's replay, frame by frame, with
//! the same counts after each frame, both for one host's addresses and as
//! an observer (the probe loaded as `run --observe` loads it); and `replay
//! --kernel` as a user runs it.
//! Needs root: `cargo xtask test` runs these.

mod support;

use support::{
    capture::replay,
    pcapw::{
        LINK_ETHERNET, LINK_RAW, LINK_SLL, LINK_SLL2, pcap, pcapng, recs, recs_of, reuse_story,
    },
    require_root,
};
use tcpstate::replay::{
    capture::Capture,
    kernel::compare,
    local::{Locals, Prefix},
};

fn locals(addrs: &[&str]) -> Locals {
    Locals::Host(addrs.iter().map(|a| Prefix::parse(a).unwrap()).collect())
}

/// Both engines over `bytes`, with `addrs` as the host's (none: as an
/// observer); panics with where they parted.
pub fn assert_one_engine(name: &str, bytes: Vec<u8>, addrs: &[&str]) -> u64 {
    let cap = Capture::open(std::io::Cursor::new(bytes), name).unwrap();
    let who = if addrs.is_empty() {
        Locals::Observe
    } else {
        locals(addrs)
    };
    let (frames, parted) = compare(cap, &who).expect("both engines ran");
    assert!(
        parted.is_empty(),
        "{name}, --local {addrs:?}: the engines part: {parted:#?}"
    );
    frames
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_probe_and_the_host_count_every_story_frame_alike() {
    require_root();
    let files = [
        (
            "eth.pcap",
            pcap(LINK_ETHERNET, false, false, &recs(LINK_ETHERNET, false)),
        ),
        (
            "vlan.pcap",
            pcap(LINK_ETHERNET, true, false, &recs(LINK_ETHERNET, true)),
        ),
        (
            "sll.pcap",
            pcap(LINK_SLL, false, false, &recs(LINK_SLL, false)),
        ),
        ("sll2.pcapng", pcapng(LINK_SLL2, 9, &recs(LINK_SLL2, false))),
        (
            "raw.pcap",
            pcap(LINK_RAW, false, false, &recs(LINK_RAW, false)),
        ),
    ];
    for (name, bytes) in files {
        let sides: [&[&str]; 3] = [&["10.0.0.1", "fd00::1"], &["10.0.0.2", "fd00::2"], &[]];
        for side in sides {
            assert_eq!(assert_one_engine(name, bytes.clone(), side), 20);
        }
    }
    // A port reused through the server's TIME_WAIT, challenged once.
    let reuse = reuse_story();
    let n = reuse.len() as u64;
    let bytes = pcap(
        LINK_ETHERNET,
        false,
        false,
        &recs_of(reuse, LINK_ETHERNET, false),
    );
    for side in [&["10.0.0.1"][..], &["10.0.0.2"], &[]] {
        assert_eq!(assert_one_engine("reuse.pcap", bytes.clone(), side), n);
    }
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn replay_kernel_prints_the_probes_counts() {
    require_root();
    let path = std::env::temp_dir().join(format!("tcpstate-kernel-{}.pcap", std::process::id()));
    std::fs::write(
        &path,
        pcap(LINK_ETHERNET, false, false, &recs(LINK_ETHERNET, false)),
    )
    .unwrap();
    let file = path.to_str().unwrap();
    let args = ["--local", "10.0.0.1", "--local", "fd00::1"];
    let (status, kernel, err) = replay(file, &[&args[..], &["--kernel"]].concat());
    assert_eq!(status, 0, "{err}");
    assert!(
        err.contains("20 frames through the probe (0 it could not be given)"),
        "{err}"
    );
    // No timers in the kernel engine: the TIME_WAIT the host's clock ends
    // at 61 s is still there.
    let (_, host, _) = replay(
        file,
        &[&args[..], &["--timeouts", "time-wait=1000s"]].concat(),
    );
    assert_eq!(kernel, host);
    assert!(kernel.contains("TIME_WAIT 1"), "{kernel}");
    // Without addresses it observes: both endpoints of each connection,
    // as the host engine's observer counts them.
    let (status, kernel, err) = replay(file, &["--kernel"]);
    assert_eq!(status, 0, "{err}");
    let (_, host, _) = replay(file, &["--timeouts", "time-wait=1000s"]);
    assert_eq!(kernel, host);
    assert!(kernel.contains("TIME_WAIT 1"), "{kernel}");
    // The probe's table holds addresses, not prefixes.
    let (status, _, err) = replay(file, &["--kernel", "--local", "10.0.0.0/24"]);
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("single addresses"), "{err}");
    std::fs::remove_file(path).unwrap();
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_probe_and_the_host_count_every_real_capture_alike() {
    require_root();
    let bgp = [
        "1.0.0.1", "1.0.0.2", "1.0.2.1", "1.0.2.2", "1.0.3.1", "1.0.3.2", "1.0.4.1", "1.0.4.2",
    ];
    let cases: [(&str, &[&str], u64); 6] = [
        ("print-flags.pcap", &["127.0.0.1"], 10),
        ("bgp-4byte-asn.pcap", &bgp, 91),
        ("resp_3_malicious.pcap", &["127.0.0.1"], 163),
        ("of13_ericsson.pcapng", &["127.0.0.1"], 174),
        ("test_loopback.pcap", &["::1"], 24),
        (
            "gopacket-test300.pcapng",
            &["172.16.71.4", "112.80.248.76"],
            32,
        ),
    ];
    for (name, addrs, frames) in cases {
        let path = format!("{}/tests/captures/{name}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(path).unwrap();
        assert_eq!(
            assert_one_engine(name, bytes.clone(), addrs),
            frames,
            "{name}"
        );
        assert_eq!(assert_one_engine(name, bytes, &[]), frames, "{name}");
    }
}
