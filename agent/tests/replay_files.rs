//! `tcpstate replay` on capture files made byte by byte: every format,
//! byte order, timestamp resolution and link type gives the same counts
//! for the same frames; the kernel's timers run on the capture's clock;
//! what cannot be read is said, counted, and never panics (10,000 mutated
//! captures). No root needed.

mod support;

use std::{io::Write, process::Stdio};

use support::{
    capture::{log_rows, replay},
    frames::{ACK, Tcp},
    pcapw::{
        LINK_ETHERNET, LINK_IPV4, LINK_RAW, LINK_SLL, LINK_SLL2, MS, Rec, T0, pcap, pcapng, recs,
        recs_of, reuse_story,
    },
    rng::Rng,
    tcpstate,
};
use tcpstate::snapshot::StateCounts;
use tcpstate_common::TcpState;

/// A capture file of the test's, removed when dropped (also on a panic).
struct Temp(String);

impl std::ops::Deref for Temp {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write(name: &str, bytes: &[u8]) -> Temp {
    let path = std::env::temp_dir().join(format!("tcpstate-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    Temp(path.to_string_lossy().into_owned())
}

fn counts(file: &str, args: &[&str]) -> StateCounts {
    let mut all = args.to_vec();
    all.push("--json");
    let (status, out, err) = replay(file, &all);
    assert_eq!(status, 0, "replay {file} {args:?}: {err}");
    StateCounts::from_json(&serde_json::from_str(&out).unwrap()).unwrap()
}

fn expect(pairs: &[(TcpState, u64)]) -> StateCounts {
    let mut c = StateCounts::default();
    for (s, n) in pairs {
        c.set(*s, *n);
    }
    c
}

const HOST: [&str; 4] = ["--local", "10.0.0.1", "--local", "fd00::1"];

#[test]
fn every_format_and_link_type_replays_the_same_story() {
    let at_30 = expect(&[
        (TcpState::Established, 2),
        (TcpState::SynSent, 1),
        (TcpState::TimeWait, 1),
    ]);
    let files = [
        (
            "eth-us.pcap",
            pcap(LINK_ETHERNET, false, false, &recs(LINK_ETHERNET, false)),
        ),
        (
            "eth-ns-be.pcap",
            pcap(LINK_ETHERNET, true, true, &recs(LINK_ETHERNET, false)),
        ),
        (
            "vlan.pcap",
            pcap(LINK_ETHERNET, false, false, &recs(LINK_ETHERNET, true)),
        ),
        (
            "sll.pcap",
            pcap(LINK_SLL, true, false, &recs(LINK_SLL, false)),
        ),
        (
            "sll2.pcap",
            pcap(LINK_SLL2, false, false, &recs(LINK_SLL2, false)),
        ),
        (
            "raw.pcap",
            pcap(LINK_RAW, false, false, &recs(LINK_RAW, false)),
        ),
        (
            "eth-ns.pcapng",
            pcapng(LINK_ETHERNET, 9, &recs(LINK_ETHERNET, false)),
        ),
        (
            "sll2-us.pcapng",
            pcapng(LINK_SLL2, 6, &recs(LINK_SLL2, false)),
        ),
    ];
    for (name, bytes) in &files {
        let f = write(name, bytes);
        assert_eq!(
            counts(&f, &[&HOST[..], &["--at", "+30"]].concat()),
            at_30,
            "{name}"
        );
        // At the end (70 s): the TIME_WAIT (from 1 s) is over.
        let end = counts(&f, &HOST);
        assert_eq!(end.get(TcpState::TimeWait), 0, "{name}");
        assert_eq!(end.get(TcpState::Established), 2, "{name}");
        drop(f);
    }
    // Raw IPv4 (link type 228) carries only the IPv4 frames.
    let f = write(
        "ipv4.pcap",
        &pcap(LINK_IPV4, false, false, &recs(LINK_IPV4, false)),
    );
    let mut v4 = at_30;
    v4.set(TcpState::Established, 1);
    assert_eq!(counts(&f, &[&HOST[..], &["--at", "+30"]].concat()), v4);
    drop(f);
}

#[test]
fn time_wait_ends_sixty_seconds_after_it_began_unless_told_otherwise() {
    let f = write(
        "tw.pcap",
        &pcap(LINK_ETHERNET, true, false, &recs(LINK_ETHERNET, false)),
    );
    // Linux's TCP_TIMEWAIT_LEN: 60 s from the last ACK (at 1.003 s).
    let tw = |at: &str, extra: &[&str]| {
        counts(&f, &[&HOST[..], &["--at", at], extra].concat()).get(TcpState::TimeWait)
    };
    assert_eq!(tw("+60.9", &[]), 1);
    assert_eq!(tw("+61.1", &[]), 0);
    assert_eq!(tw("+10.9", &["--timeouts", "time-wait=10s"]), 1);
    assert_eq!(tw("+11.1", &["--timeouts", "time-wait=10s"]), 0);
    // The handshake's timer: the unanswered connect ends when told.
    let syn = counts(
        &f,
        &[&HOST[..], &["--at", "+25", "--timeouts", "syn-sent=20s"]].concat(),
    );
    assert_eq!(syn.get(TcpState::SynSent), 0);
    // A timeline every 10 s: TIME_WAIT in the rows up to 60 s, not at 70.
    let (status, out, err) = replay(&f, &[&HOST[..], &["--every", "10s", "--csv"]].concat());
    assert_eq!(status, 0, "{err}");
    let rows: Vec<&str> = out.lines().collect();
    assert!(rows[0].starts_with("time,offset_s,LISTEN,"), "{out}");
    let col = rows[0].split(',').position(|c| c == "TIME_WAIT").unwrap();
    let tw_by_row: Vec<(String, String)> = rows[1..]
        .iter()
        .map(|r| {
            let v: Vec<&str> = r.split(',').collect();
            (v[1].to_owned(), v[col].to_owned())
        })
        .collect();
    let want: Vec<(String, String)> = [
        ("10.000000", "1"),
        ("20.000000", "1"),
        ("30.000000", "1"),
        ("40.000000", "1"),
        ("50.000000", "1"),
        ("60.000000", "1"),
        ("70.000000", "0"),
        ("70.000000", "0"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(tw_by_row, want, "{out}");
    drop(f);
}

#[test]
fn an_observer_counts_both_ends() {
    let f = write(
        "obs.pcap",
        &pcap(LINK_ETHERNET, false, false, &recs(LINK_ETHERNET, false)),
    );
    // At 30 s: two connections open at both ends; the closed one's server
    // is gone (LAST_ACK acknowledged), its client in TIME_WAIT; the
    // unanswered SYN's client in SYN_SENT (its server never answered).
    let both = counts(&f, &["--at", "+30"]);
    let want = expect(&[
        (TcpState::Established, 4),
        (TcpState::SynSent, 1),
        (TcpState::TimeWait, 1),
    ]);
    assert_eq!(both, want);
    // The other end alone.
    let server = counts(
        &f,
        &["--at", "+30", "--local", "10.0.0.2", "--local", "fd00::2"],
    );
    assert_eq!(server, expect(&[(TcpState::Established, 2)]));
    drop(f);
}

/// Port reuse through the server's TIME_WAIT, the SYN challenged once and
/// taken once: three connections, each begun by the client's SYN, each
/// closed normally. The client stays SYN_SENT through the challenge.
#[test]
fn a_port_reused_through_a_servers_time_wait_is_three_connections() {
    let recs = recs_of(reuse_story(), LINK_ETHERNET, false);
    let f = write("reuse.pcap", &pcap(LINK_ETHERNET, false, false, &recs));
    let (status, out, err) = replay(&f, &["--conns", "-"]);
    assert_eq!(status, 0, "{err}");
    let rows = log_rows(&out);
    assert_eq!(rows.len(), 3, "{out}");
    for r in &rows {
        assert_eq!(
            (&*r["id.orig_h"], &*r["id.orig_p"]),
            ("10.0.0.2", "40010"),
            "{out}"
        );
        assert_eq!(r["conn_state"], "SF", "{out}");
        // The server closed first: the client's last state was LAST_ACK.
        assert_eq!(
            (&*r["orig_tcp_state"], &*r["resp_tcp_state"]),
            ("LAST_ACK", "TIME_WAIT"),
            "{out}"
        );
    }
    assert_eq!(
        rows[1]["history"], "SaRhAfF",
        "the challenge in the middle one"
    );
    // Between the client's RST and its SYN again: only the client, still
    // connecting (the RST ended the TIME_WAIT).
    let between = counts(&f, &["--at", "+1.005"]);
    assert_eq!(between, expect(&[(TcpState::SynSent, 1)]));
    // At the end: the server's last TIME_WAIT, on its own and as observed.
    let end = expect(&[(TcpState::TimeWait, 1)]);
    assert_eq!(counts(&f, &[]), end);
    assert_eq!(counts(&f, &["--local", "10.0.0.1"]), end);
    assert_eq!(counts(&f, &["--local", "10.0.0.2"]), StateCounts::default());
    drop(f);
}

#[test]
fn the_connection_log_is_what_zeek_tools_read() {
    let f = write(
        "log.pcap",
        &pcap(LINK_ETHERNET, false, false, &recs(LINK_ETHERNET, false)),
    );
    let (status, out, err) = replay(&f, &["--conns", "-"]);
    assert_eq!(status, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "#separator \\x09");
    let fields: Vec<&str> = lines
        .iter()
        .find_map(|l| l.strip_prefix("#fields\t"))
        .unwrap()
        .split('\t')
        .collect();
    let types: Vec<&str> = lines
        .iter()
        .find_map(|l| l.strip_prefix("#types\t"))
        .unwrap()
        .split('\t')
        .collect();
    assert_eq!(fields.len(), types.len());
    assert!(lines.last().unwrap().starts_with("#close\t"));
    let rows: Vec<Vec<&str>> = lines
        .iter()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split('\t').collect())
        .collect();
    assert_eq!(rows.len(), 5, "{out}");
    let col = |n: &str| fields.iter().position(|f| *f == n).unwrap();
    let by_port = |p: &str| rows.iter().find(|r| r[col("id.orig_p")] == p).unwrap();
    for r in &rows {
        assert_eq!(r.len(), fields.len(), "{r:?}");
    }
    let closed = by_port("40001");
    assert_eq!(closed[col("conn_state")], "SF");
    assert_eq!(closed[col("history")], "ShADaFf");
    assert_eq!(closed[col("orig_bytes")], "10");
    assert_eq!(closed[col("orig_tcp_state")], "TIME_WAIT");
    assert_eq!(closed[col("id.resp_h")], "10.0.0.2");
    assert_eq!(by_port("40002")[col("conn_state")], "S1");
    assert_eq!(by_port("40003")[col("conn_state")], "REJ");
    assert_eq!(by_port("40004")[col("conn_state")], "S0");
    assert_eq!(by_port("40004")[col("duration")], "-");
    assert_eq!(by_port("40005")[col("id.orig_h")], "fd00::1");
    drop(f);
}

#[test]
fn standard_input_is_read_with_a_dash() {
    let bytes = pcapng(LINK_ETHERNET, 9, &recs(LINK_ETHERNET, false));
    let mut child = tcpstate()
        .args([
            "replay", "-", "--json", "--local", "10.0.0.1", "--local", "fd00::1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = StateCounts::from_json(&serde_json::from_slice(&out.stdout).unwrap()).unwrap();
    assert_eq!(c.get(TcpState::Established), 2);
}

#[test]
fn what_cannot_be_read_is_said_in_one_line_and_counted() {
    let good = pcap(LINK_ETHERNET, false, false, &recs(LINK_ETHERNET, false));
    let cases: Vec<(&str, Vec<u8>, i32, &str)> = vec![
        ("empty", Vec::new(), 1, "it is empty"),
        (
            "magic",
            b"GIF89a, not a capture at all".to_vec(),
            1,
            "not a pcap or pcapng",
        ),
        (
            "header",
            good[..10].to_vec(),
            1,
            "ends inside its file header",
        ),
        ("cut", good[..good.len() - 7].to_vec(), 1, "truncated"),
    ];
    for (name, bytes, want, says) in cases {
        let f = write(name, &bytes);
        let (status, _, err) = replay(&f, &[]);
        assert_eq!(status, want, "{name}: {err}");
        assert!(err.contains(says), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
        drop(f);
    }
    // A cut file still gives what came before the cut.
    let f = write("cut2", &good[..good.len() - 7]);
    let (_, out, err) = replay(&f, &["--local", "10.0.0.1", "--local", "fd00::1"]);
    assert!(out.contains("ESTABLISHED 2"), "{out}\n{err}");
    assert!(err.contains("19 frames"), "{err}");
    drop(f);

    // Unknown link types and frames cut before their TCP header: counted.
    let mut recs = recs(LINK_ETHERNET, false);
    let short = &mut recs[0];
    short.data.truncate(14 + 20 + 6);
    let other = pcap(105, false, false, &recs[..3]);
    let f = write("wifi", &other);
    let (status, _, err) = replay(&f, &[]);
    assert_eq!(status, 0, "{err}");
    assert!(err.contains("3 of link type 105 (not read)"), "{err}");
    drop(f);
    let f = write("snap", &pcap(LINK_ETHERNET, false, false, &recs));
    let (status, _, err) = replay(&f, &[]);
    assert_eq!(status, 0, "{err}");
    assert!(err.contains("1 cut by the snap length"), "{err}");
    drop(f);

    // Nonsense arguments.
    let (status, _, err) = replay("-", &["--local", "10.0.0.1/40"]);
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("--local"), "{err}");
}

/// A number below `n`.
fn below(rng: &mut Rng, n: usize) -> usize {
    rng.below(n as u64) as usize
}

/// Flips, overwrites, cuts, duplicates and splices bytes.
fn mutate(base: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = base.to_vec();
    for _ in 0..1 + below(rng, 4) {
        if b.is_empty() {
            break;
        }
        let at = below(rng, b.len());
        match below(rng, 6) {
            0 => b[at] ^= 1 << below(rng, 8),
            1 => b[at] = rng.next() as u8,
            2 => b.truncate(at),
            3 => {
                let len = below(rng, 16).min(b.len() - at);
                let chunk = b[at..at + len].to_vec();
                let to = below(rng, b.len());
                b.splice(to..to, chunk);
            }
            4 => {
                // A length field's neighbourhood: large values.
                for x in b.iter_mut().skip(at).take(4) {
                    *x = 0xff;
                }
            }
            _ => {
                let len = below(rng, 8).min(b.len() - at);
                b.drain(at..at + len);
            }
        }
    }
    b
}

#[test]
fn ten_thousand_mutated_captures_end_in_counts_or_a_clear_error() {
    use tcpstate::replay::{Options, capture::Capture, local::Locals, replay as run};
    let bases = [
        pcap(LINK_ETHERNET, false, false, &recs(LINK_ETHERNET, true)),
        pcap(LINK_SLL2, true, true, &recs(LINK_SLL2, false)),
        pcapng(LINK_ETHERNET, 9, &recs(LINK_ETHERNET, false)),
        pcapng(LINK_RAW, 6, &recs(LINK_RAW, false)),
    ];
    let opts = Options {
        input: "mutated".into(),
        locals: Locals::Observe,
        timeouts: Default::default(),
        at: None,
        every: None,
        conns: None,
    };
    let mut rng = Rng(0x7c9_5eed);
    let (mut read, mut refused, mut ended_early) = (0, 0, 0);
    for i in 0..10_000 {
        let bytes = mutate(&bases[i % bases.len()], &mut rng);
        match Capture::open(std::io::Cursor::new(bytes), "mutated") {
            Err(e) => {
                assert!(!e.to_string().is_empty());
                refused += 1;
            }
            Ok(cap) => match run(cap, &opts) {
                Ok(s) if s.error.is_some() => ended_early += 1,
                Ok(_) => read += 1,
                Err(e) => panic!("mutation {i}: {e}"),
            },
        }
    }
    // The mutations reach every outcome.
    assert!(
        read > 1000 && refused > 100 && ended_early > 1000,
        "{read} {refused} {ended_early}"
    );
    eprintln!("read whole: {read}, refused: {refused}, ended early: {ended_early}");
}

#[test]
fn a_record_larger_than_the_read_buffer_is_read() {
    // A GRO super-packet of 200 kB, as a capture on a veth holds them.
    let mut recs = recs(LINK_ETHERNET, false);
    let mut big = Tcp::new("10.0.0.1", 40002, "10.0.0.2", 80, ACK).seq(7001, 9001);
    big.payload = 60_000;
    let mut data = big.frame();
    data.extend(std::iter::repeat_n(0x61, 140_000));
    recs.insert(8, Rec::new(T0 + 13 * MS, data));
    let f = write("big.pcap", &pcap(LINK_ETHERNET, false, false, &recs));
    let (status, _, err) = replay(&f, &[]);
    assert_eq!(status, 0, "{err}");
    assert!(err.contains("21 frames, 21 TCP segments"), "{err}");
    drop(f);
}
