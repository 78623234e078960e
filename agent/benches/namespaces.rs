//! `cargo xtask bench`: many network namespaces under one `run -A` agent.
//! [`COUNT`] namespaces (`TCPSTATE_BENCH_NETNS` sets another number), each
//! with a veth whose other end is in the bench's namespace and a listener
//! with a few connections on loopback. Reports, in one run: the time from
//! the agent's start until every namespace is listed, the agent's resident
//! memory and CPU share while all sits idle, the latency of `tcpstate count`
//! and `count --by-netns`, against a shell loop running `ip netns exec NS ss
//! -tan` in each namespace; and checks a sample of namespaces against their
//! ss. Two passes side by side: namespaces sharing the host's socket table
//! (the kernel's default: every sock_diag dump in one walks the whole
//! host's table) and namespaces owning a small one
//! (`net.ipv4.tcp_child_ehash_entries`). Writes target/bench/namespaces.json.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    io::Write,
    net::{TcpListener, TcpStream},
    os::fd::AsFd,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;
use support::{
    Agent,
    machine::{cpu_model, cpu_seconds},
    memory_kb, tcpstate, unique,
};

const COUNT: usize = 500;

/// The namespaces, removed on drop (with their veths).
struct Spaces(Vec<String>);

impl Drop for Spaces {
    fn drop(&mut self) {
        let mut batch = String::new();
        for n in &self.0 {
            batch += &format!("netns del {n}\n");
        }
        ip_batch(&batch, true);
    }
}

fn ip_batch(cmds: &str, force: bool) {
    let mut ip = Command::new("ip");
    if force {
        ip.arg("-force");
    }
    let mut child = ip
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stderr(if force {
            Stdio::null()
        } else {
            Stdio::inherit()
        })
        .spawn()
        .expect("ip");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(cmds.as_bytes())
        .unwrap();
    let st = child.wait().unwrap();
    assert!(force || st.success(), "ip -batch failed");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn timed(f: impl Fn()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64() * 1000.0
}

fn main() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the benchmark makes namespaces: run `cargo xtask bench` as root"
    );
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: usize = std::env::var("TCPSTATE_BENCH_NETNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(COUNT);
    let cpu = cpu_model();
    let shared = pass(n, None);
    // The same with every namespace owning a socket table of its own.
    let own = pass(n, Some(OWN_TABLE));
    println!("CPU: {cpu}");
    println!(
        "{n} namespaces (a veth each, {} connections on loopback), one `run -A` agent",
        shared.conns
    );
    println!("                                 shared table   own tables ({OWN_TABLE} buckets)");
    let row = |what: &str, unit: &str, f: &dyn Fn(&Pass) -> f64| {
        println!(
            "{what:<32} {:>9.2} {unit:<4} {:>9.2} {unit}",
            f(&shared),
            f(&own)
        )
    };
    row("agent answering", "s", &|p| p.answered_s);
    row("all namespaces monitored", "s", &|p| p.all_monitored_s);
    row("agent RSS, idle", "MiB", &|p| p.rss_mib);
    row("agent CPU, idle (20 s)", "%", &|p| p.cpu_share * 100.0);
    row("tcpstate count", "ms", &|p| p.count_ms);
    row("tcpstate count --by-netns", "ms", &|p| p.by_netns_ms);
    row("ip netns exec NS ss -tan, all", "ms", &|p| p.ss_loop_ms);
    println!(
        "ss loop / count --by-netns: {:.0}x (shared), {:.0}x (own); idle CPU own/shared: {:.2}x",
        shared.ss_loop_ms / shared.by_netns_ms,
        own.ss_loop_ms / own.by_netns_ms,
        own.cpu_share / shared.cpu_share
    );
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let out = json!({
        "cpu": cpu, "namespaces": n, "connections": shared.conns,
        "shared_table": shared.json(), "own_tables": own.json(), "own_table_buckets": OWN_TABLE,
    });
    std::fs::write(
        dir.join("namespaces.json"),
        serde_json::to_string_pretty(&out).unwrap(),
    )
    .unwrap();
    println!("wrote target/bench/namespaces.json");
}

/// What one pass measured.
struct Pass {
    conns: usize,
    answered_s: f64,
    all_monitored_s: f64,
    rss_mib: f64,
    cpu_share: f64,
    count_ms: f64,
    by_netns_ms: f64,
    ss_loop_ms: f64,
}

impl Pass {
    fn json(&self) -> serde_json::Value {
        json!({
            "answering_s": self.answered_s, "all_monitored_s": self.all_monitored_s,
            "rss_mib": self.rss_mib, "idle_cpu_share": self.cpu_share,
            "count_ms": self.count_ms, "count_by_netns_ms": self.by_netns_ms,
            "ss_loop_ms": self.ss_loop_ms,
        })
    }
}

/// Buckets of each namespace's own socket table in the second pass.
const OWN_TABLE: u32 = 1024;

/// `net.ipv4.tcp_child_ehash_entries` set while it lives (namespaces made
/// meanwhile get a table of their own), restored on drop.
struct ChildTables(String);

impl ChildTables {
    fn set(buckets: u32) -> ChildTables {
        const PATH: &str = "/proc/sys/net/ipv4/tcp_child_ehash_entries";
        let was = std::fs::read_to_string(PATH).expect("tcp_child_ehash_entries (Linux 6.1+)");
        std::fs::write(PATH, buckets.to_string()).unwrap();
        ChildTables(was.trim().to_owned())
    }
}

impl Drop for ChildTables {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/net/ipv4/tcp_child_ehash_entries", &self.0);
    }
}

/// One pass: `n` namespaces made (each with a table of `own_table` buckets
/// of its own, or sharing the host's), an agent started on them, measured,
/// and all removed.
fn pass(n: usize, own_table: Option<u32>) -> Pass {
    let tables = own_table.map(ChildTables::set);
    let tag = unique("tsb");
    let names: Vec<String> = (0..n).map(|i| format!("{tag}n{i}")).collect();
    let spaces = Spaces(names.clone());
    let mut batch = String::new();
    for (i, ns) in names.iter().enumerate() {
        batch += &format!("netns add {ns}\n");
        batch += &format!(
            "link add {tag}h{i} type veth peer name eth0 netns {ns}\nlink set {tag}h{i} up\n"
        );
    }
    let t = Instant::now();
    ip_batch(&batch, false);
    eprintln!("{n} namespaces with a veth each made in {:?}", t.elapsed());
    // A listener and one to three connections on loopback in each.
    let limit = libc::rlimit {
        rlim_cur: 20_000,
        rlim_max: 20_000,
    };
    // SAFETY: a plain struct for the call; raising our own descriptor limit.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    let mut keep: Vec<(TcpListener, Vec<(TcpStream, TcpStream)>)> = Vec::new();
    for (i, ns) in names.iter().enumerate() {
        let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        let held = std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
                // Started from this thread, `ip` runs in its namespace.
                for dev in ["lo", "eth0"] {
                    let st = Command::new("ip")
                        .args(["link", "set", dev, "up"])
                        .status()
                        .unwrap();
                    assert!(st.success(), "ip link set {dev} up");
                }
                let l = TcpListener::bind("127.0.0.1:7000").unwrap();
                let conns = (0..(i % 3 + 1))
                    .map(|_| {
                        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
                        (c, l.accept().unwrap().0)
                    })
                    .collect::<Vec<_>>();
                (l, conns)
            })
            .join()
            .unwrap()
        });
        keep.push(held);
    }
    let conns: usize = keep.iter().map(|(_, c)| c.len()).sum();

    let started = Instant::now();
    let agent = Agent::start_all(&["--reconcile-interval", "10"]);
    let answered = started.elapsed();
    let listed = |agent: &Agent| -> usize {
        let out = tcpstate()
            .args(["count", "--by-netns", "--json", "--socket"])
            .arg(&agent.socket)
            .output()
            .unwrap();
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        rows.as_array().map_or(0, |r| {
            r.iter()
                .filter(|r| r["name"].as_str().is_some_and(|s| s.starts_with(&tag)))
                .count()
        })
    };
    while listed(&agent) < n {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "not all namespaces monitored in 10 minutes"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let all_monitored = started.elapsed();
    eprintln!(
        "agent answered after {answered:?}, all {n} namespaces listed after {all_monitored:?}"
    );
    // A sample of namespaces against their ss.
    for ns in names.iter().step_by((n / 10).max(1)) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let ours = agent.in_netns(ns).try_counts();
            let truth = support::Netns::ss_counts_of(ns);
            if ours == Some(truth) {
                break;
            }
            assert!(Instant::now() < deadline, "{ns}: {ours:?} vs ss {truth:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Idle: what the agent costs with everything in place.
    std::thread::sleep(Duration::from_secs(3));
    let pid = agent.pid();
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(20));
    let cpu_share = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    let rss_mib = memory_kb(pid, "VmRSS") as f64 / 1024.0;
    let count_ms = median(
        (0..15)
            .map(|_| timed(|| assert!(agent.try_counts().is_some())))
            .collect(),
    );
    let by_netns_ms = median(
        (0..15)
            .map(|_| timed(|| assert!(listed(&agent) == n)))
            .collect(),
    );
    let ss_loop_ms = median(
        (0..3)
            .map(|_| {
                timed(|| {
                    let script = format!(
                        "for ns in $(ip netns list | grep -o '^{tag}n[0-9]*'); do ip netns exec $ns ss -tan >/dev/null; done"
                    );
                    assert!(Command::new("sh").args(["-c", &script]).status().unwrap().success());
                })
            })
            .collect(),
    );
    drop(agent);
    drop(keep);
    drop(spaces);
    drop(tables);
    Pass {
        conns,
        answered_s: answered.as_secs_f64(),
        all_monitored_s: all_monitored.as_secs_f64(),
        rss_mib,
        cpu_share,
        count_ms,
        by_netns_ms,
        ss_loop_ms,
    }
}
