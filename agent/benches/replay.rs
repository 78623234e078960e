//! `cargo xtask bench`: `tcpstate replay` against `tshark -q -z conv,tcp`
//! on the same capture, side by side in one run: a synthetic capture of
//! 100,000 connections (each a handshake, seven data segments and their
//! ACKs, and a FIN close each way: 21 frames), a thousand of them under way
//! at once, cut by a snap length of 54 bytes as `tcpdump -s` would.
//! Reports frames a second of CPU time (both run on one core) and wall
//! time; the ratio is per round, alternating the two. Needs no root;
//! without tshark (`apt install tshark`) only replay is timed. Writes
//! target/bench/replay.json.

#[path = "../tests/support/machine.rs"]
#[allow(dead_code)]
mod machine;

use std::{
    io::{BufWriter, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use serde_json::json;

const CONNS: u32 = 100_000;
const AT_ONCE: u32 = 1000;
const ROUNDS: usize = 5;

/// An Ethernet/IPv4/TCP header (54 bytes) for a segment of `len` bytes.
fn frame(
    (src, sport): ([u8; 4], u16),
    (dst, dport): ([u8; 4], u16),
    flags: u8,
    seq: u32,
    ack: u32,
    len: u16,
) -> Vec<u8> {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend([0x45, 0]);
    f.extend((40 + len).to_be_bytes());
    f.extend([0, 0, 0x40, 0, 64, 6, 0, 0]);
    f.extend(src);
    f.extend(dst);
    f.extend(sport.to_be_bytes());
    f.extend(dport.to_be_bytes());
    f.extend(seq.to_be_bytes());
    f.extend(ack.to_be_bytes());
    f.extend([0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

/// One connection's 21 segments.
fn conversation(i: u32) -> Vec<Vec<u8>> {
    let c = [10, 1, (i >> 16) as u8, (i >> 8) as u8];
    let s = [10, 2, 0, 1];
    let port = 1024 + (i % 60_000) as u16;
    let (cs, ss) = (i.wrapping_mul(7919), i.wrapping_mul(104_729));
    let (syn, ack, psh, fin) = (0x02, 0x10, 0x18, 0x11);
    let mut v = vec![
        frame((c, port), (s, 80), syn, cs, 0, 0),
        frame((s, 80), (c, port), syn | ack, ss, cs + 1, 0),
        frame((c, port), (s, 80), ack, cs + 1, ss + 1, 0),
    ];
    for k in 0..7u32 {
        v.push(frame(
            (s, 80),
            (c, port),
            psh,
            ss + 1 + k * 1000,
            cs + 1,
            1000,
        ));
        v.push(frame(
            (c, port),
            (s, 80),
            ack,
            cs + 1,
            ss + 1 + (k + 1) * 1000,
            0,
        ));
    }
    let se = ss + 1 + 7000;
    v.push(frame((c, port), (s, 80), fin, cs + 1, se, 0));
    v.push(frame((s, 80), (c, port), ack, se, cs + 2, 0));
    v.push(frame((s, 80), (c, port), fin, se, cs + 2, 0));
    v.push(frame((c, port), (s, 80), ack, cs + 2, se + 1, 0));
    v
}

/// Writes the capture; returns its frame count.
fn write_capture(path: &Path) -> u64 {
    let mut out = BufWriter::new(std::fs::File::create(path).unwrap());
    out.write_all(&[0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0])
        .unwrap();
    out.write_all(&[0; 8]).unwrap();
    out.write_all(&54u32.to_le_bytes()).unwrap();
    out.write_all(&1u32.to_le_bytes()).unwrap();
    let (mut frames, mut ts_us) = (0u64, 1_765_000_000_000_000u64);
    // AT_ONCE conversations interleaved, frame by frame, then the next batch.
    for batch in 0..CONNS / AT_ONCE {
        let convs: Vec<Vec<Vec<u8>>> = (0..AT_ONCE)
            .map(|j| conversation(batch * AT_ONCE + j))
            .collect();
        for step in 0..21 {
            for c in &convs {
                let f = &c[step];
                let orig = 14 + u16::from_be_bytes([f[16], f[17]]) as u32;
                ts_us += 5;
                let rec = [
                    ((ts_us / 1_000_000) as u32).to_le_bytes(),
                    ((ts_us % 1_000_000) as u32).to_le_bytes(),
                    (f.len() as u32).to_le_bytes(),
                    orig.to_le_bytes(),
                ]
                .concat();
                out.write_all(&rec).unwrap();
                out.write_all(f).unwrap();
                frames += 1;
            }
        }
    }
    out.flush().unwrap();
    frames
}

/// CPU seconds of the children so far (user + system).
fn children_cpu() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out pointer.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Runs `cmd`, output discarded: (CPU seconds, wall seconds).
fn timed(cmd: &mut Command) -> (f64, f64) {
    let (cpu0, wall0) = (children_cpu(), Instant::now());
    let st = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "{cmd:?} failed");
    (children_cpu() - cpu0, wall0.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cpu = machine::cpu_model();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let cap = dir.join("replay.pcap");
    let frames = write_capture(&cap);
    let tshark = Command::new("tshark")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    println!(
        "replay vs tshark -z conv,tcp: {frames} frames, {CONNS} connections, median of {ROUNDS} (CPU: {cpu})"
    );
    let replay = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tcpstate"));
        c.arg("replay").arg(&cap).arg("-q");
        c
    };
    let with_log = || {
        let mut c = replay();
        c.args(["--conns", "/dev/null"]);
        c
    };
    let conv = || {
        let mut c = Command::new("tshark");
        c.args(["-q", "-z", "conv,tcp", "-r"]).arg(&cap);
        c
    };
    let (mut r, mut l, mut t, mut ratios) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let a = timed(&mut replay());
        let b = timed(&mut with_log());
        r.push(a);
        l.push(b);
        if tshark {
            let c = timed(&mut conv());
            ratios.push(c.0 / a.0);
            t.push(c);
        }
    }
    let rate = |v: &[(f64, f64)]| frames as f64 / median(v.iter().map(|x| x.0).collect());
    let wall = |v: &[(f64, f64)]| median(v.iter().map(|x| x.1).collect());
    println!(
        "replay             {:>12.0} frames/s of CPU  ({:.2} s wall)",
        rate(&r),
        wall(&r)
    );
    println!(
        "replay --conns     {:>12.0} frames/s of CPU  ({:.2} s wall)",
        rate(&l),
        wall(&l)
    );
    let mut rows = vec![
        json!({"case": "replay", "frames_per_cpu_s": rate(&r), "wall_s": wall(&r)}),
        json!({"case": "replay --conns", "frames_per_cpu_s": rate(&l), "wall_s": wall(&l)}),
    ];
    if tshark {
        let lo = ratios.iter().copied().fold(f64::MAX, f64::min);
        let hi = ratios.iter().copied().fold(0.0, f64::max);
        println!(
            "tshark -z conv,tcp {:>12.0} frames/s of CPU  ({:.2} s wall); replay is {:.1}x faster ({lo:.1}-{hi:.1})",
            rate(&t),
            wall(&t),
            median(ratios.clone())
        );
        rows.push(json!({"case": "tshark -q -z conv,tcp", "frames_per_cpu_s": rate(&t), "wall_s": wall(&t), "replay_speedup_median": median(ratios)}));
    } else {
        println!("tshark is not installed (apt install tshark): replay alone was timed");
    }
    let mut f = std::fs::File::create(dir.join("replay.json")).unwrap();
    writeln!(
        f,
        "{}",
        json!({"cpu": cpu, "frames": frames, "connections": CONNS, "cases": rows})
    )
    .unwrap();
    let _ = std::fs::remove_file(&cap);
}
