//! Helpers for the tests that need root: namespaces and veth pairs that
//! remove themselves (also on panic), the agent binary as a user runs it, and
//! `ss` as the ground truth.
#![allow(dead_code)]

pub mod capture;
pub mod containerd;
pub mod crafted;
pub mod docker;
pub mod frames;
pub mod hosts;
pub mod http;
pub mod machine;
pub mod pcapw;
pub mod podman;
pub mod prometheus;
pub mod rng;
pub mod routed;
pub mod sampler;
pub mod tmux;

use std::{
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use tcpstate::snapshot::StateCounts;
use tcpstate_common::TcpState;

/// Runs `f` on a thread inside the network namespace of file `path`
/// (`/run/netns/NAME`, `/proc/PID/ns/net`): sockets it makes live there.
pub fn run_in<T: Send>(path: &str, f: impl FnOnce() -> T + Send) -> T {
    let file = File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(file.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("namespace thread panicked")
    })
}

/// Stops a daemon the test started: SIGTERM, up to `grace` to exit, then
/// SIGKILL.
pub fn stop_daemon(mut c: Child, grace: Duration) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + grace;
    while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.kill();
    let _ = c.wait();
}

/// Removes a daemon's private folder: what still runs from it (`pattern`
/// in its command line) killed, what is mounted under it unmounted.
pub fn remove_daemon_root(root: &std::path::Path, pattern: &std::path::Path) {
    let _ = Command::new("pkill")
        .args(["-f", &pattern.display().to_string()])
        .status();
    let _ = Command::new("umount")
        .args(["-R", "-l"])
        .arg(root)
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(root);
}

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test attaches eBPF programs and makes namespaces: run it as root through `cargo xtask test`"
    );
}

/// kB of `field` (VmRSS, VmHWM) in /proc/PID/status.
pub fn memory_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// A unique name for this test process and call.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace made with `ip netns add`, deleted on drop (with the
/// veths inside it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns { name };
        sh(&["ip", "-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a thread inside the namespace: sockets it makes live there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        run_in(&format!("/run/netns/{}", self.name), f)
    }

    pub fn listen(&self, addr: &str) -> TcpListener {
        let addr: SocketAddr = addr.parse().unwrap();
        self.run(|| TcpListener::bind(addr).expect("bind"))
    }

    /// A listener with an explicit backlog (std's is 128).
    pub fn listen_backlog(&self, addr: SocketAddr, backlog: i32) -> TcpListener {
        self.run(|| {
            let l = TcpListener::bind(addr).expect("bind");
            // SAFETY: a valid listening socket; listen(2) may be called again
            // to change the backlog.
            assert_eq!(
                unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), backlog) },
                0
            );
            l
        })
    }

    pub fn connect(&self, addr: SocketAddr) -> TcpStream {
        self.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect"))
    }

    /// A connection from a chosen address and port (SO_REUSEADDR, so the
    /// port may be taken again while the tuple's old connection lingers).
    pub fn connect_from(&self, from: SocketAddr, to: SocketAddr) -> TcpStream {
        use std::os::fd::AsRawFd;

        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
            sockopt::ReuseAddr,
        };
        self.run(|| {
            let family = if from.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            let fd = socket(family, SockType::Stream, SockFlag::empty(), None).expect("socket");
            setsockopt(&fd, ReuseAddr, &true).expect("SO_REUSEADDR");
            bind(fd.as_raw_fd(), &SockaddrStorage::from(from)).expect("bind");
            connect(fd.as_raw_fd(), &SockaddrStorage::from(to)).expect("connect");
            TcpStream::from(fd)
        })
    }

    /// Sets a sysctl of this namespace, e.g. `net.ipv4.ip_forward=1`.
    pub fn sysctl(&self, setting: &str) {
        sh(&["ip", "netns", "exec", &self.name, "sysctl", "-qw", setting]);
    }

    /// `ss -tanH` of this namespace, counted per state: the ground truth.
    /// One of the kernel's SNMP counters (`/proc/net/netstat`, `/proc/net/snmp`)
    /// in this namespace, e.g. `TcpExt` `TCPOFOQueue`.
    pub fn snmp(&self, group: &str, name: &str) -> u64 {
        self.run(|| {
            let mut found = None;
            for file in [
                "/proc/thread-self/net/netstat",
                "/proc/thread-self/net/snmp",
            ] {
                let text = std::fs::read_to_string(file).expect("reading the SNMP counters");
                let mut lines = text.lines();
                while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
                    let prefix = format!("{group}:");
                    if !names.starts_with(&prefix) {
                        continue;
                    }
                    let at = names.split_whitespace().position(|n| n == name);
                    found = at.and_then(|i| values.split_whitespace().nth(i)?.parse().ok());
                }
            }
            found.unwrap_or_else(|| panic!("no SNMP counter {group} {name}"))
        })
    }

    pub fn ss_counts(&self) -> StateCounts {
        self.ss_counts_where(&[])
    }

    /// `ss -tan` with a filter expression, e.g. `["sport", "=", ":443"]`.
    pub fn ss_counts_where(&self, filter: &[&str]) -> StateCounts {
        Netns::ss_of(&self.name, filter)
    }

    /// `ss -tan` counted per state in the namespace `ip netns` calls `name`.
    pub fn ss_counts_of(name: &str) -> StateCounts {
        Netns::ss_of(name, &[])
    }

    fn ss_of(name: &str, filter: &[&str]) -> StateCounts {
        let out = Command::new("ip")
            .args(["netns", "exec", name, "ss", "-tanH"])
            .args(filter)
            .output()
            .expect("ss");
        assert!(
            out.status.success(),
            "ss failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ss_counted(&out.stdout)
    }
}

/// What `ss -tanH` printed, counted per state (its first column).
pub fn ss_counted(stdout: &[u8]) -> StateCounts {
    let mut counts = StateCounts::default();
    for line in String::from_utf8_lossy(stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let state =
            TcpState::parse(name).unwrap_or_else(|| panic!("ss printed an unknown state {name:?}"));
        counts.set(state, counts.get(state) + 1);
    }
    counts
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Its sockets first: an orphan (a FIN_WAIT1 whose peer is gone)
        // would keep the namespace alive in the kernel for minutes after
        // `ip netns del`, retransmitting, and its storms of timers would
        // run under the next test.
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.name, "ss", "-K", "-t", "-a"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair with one end, `a_dev`, in `a` and the other, `b_dev`, in `b`.
pub fn veth_between(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) {
    sh(&[
        "ip", "link", "add", a_dev, "netns", &a.name, "type", "veth", "peer", "name", b_dev,
        "netns", &b.name,
    ]);
}

impl Netns {
    /// Gives `dev` (in this namespace) IPv4 `v4`/24 and IPv6 `v6`/64 (no
    /// duplicate detection: usable at once) and brings it up.
    pub fn address(&self, dev: &str, v4: &str, v6: &str) {
        let (v4, v6) = (format!("{v4}/24"), format!("{v6}/64"));
        let ns = self.name.as_str();
        sh(&["ip", "-n", ns, "addr", "add", &v4, "dev", dev]);
        sh(&["ip", "-n", ns, "addr", "add", &v6, "dev", dev, "nodad"]);
        sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
    }
}

/// Two namespaces joined by a veth pair, with IPv4 10.X.0.1/2 and IPv6 fdXX::1/2.
pub struct VethPair {
    pub left: Netns,
    pub right: Netns,
    pub left_v4: String,
    pub right_v4: String,
    pub left_v6: String,
    pub right_v6: String,
}

impl VethPair {
    pub fn new() -> VethPair {
        let left = Netns::new("tsl");
        let right = Netns::new("tsr");
        let net = std::process::id() % 200 + 20;
        let (l4, r4) = (format!("10.{net}.0.1"), format!("10.{net}.0.2"));
        let (l6, r6) = (format!("fd{net:02x}::1"), format!("fd{net:02x}::2"));
        veth_between(&left, "veth0", &right, "veth0");
        left.address("veth0", &l4, &l6);
        right.address("veth0", &r4, &r6);
        VethPair {
            left,
            right,
            left_v4: l4,
            right_v4: r4,
            left_v6: l6,
            right_v6: r6,
        }
    }
}

/// `tcpstate run --netns NAME` (or `run -A`), the binary a user runs;
/// stopped with SIGINT on drop.
pub struct Agent {
    child: Option<Child>,
    pub socket: PathBuf,
    /// Which namespace's counts this handle reads (`count --netns SEL`);
    /// `None`: the agent's total.
    pub select: Option<String>,
    /// This handle started the agent (a view made by [`Agent::in_netns`]
    /// did not, and stops nothing).
    owner: bool,
}

pub fn tcpstate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tcpstate"))
}

impl Agent {
    /// Starts the agent on `ns`. Reconciliation with the socket table is off
    /// unless `extra` sets it: the tests see what packets alone make of the
    /// counts.
    pub fn start(ns: &Netns, extra: &[&str]) -> Agent {
        Agent::launch(&["--netns", &ns.name], extra)
    }

    /// `tcpstate run -A`: every namespace of the host.
    pub fn start_all(extra: &[&str]) -> Agent {
        Agent::launch(&["--all-namespaces"], extra)
    }

    /// A handle on the same agent that reads namespace `sel`'s counts.
    pub fn in_netns(&self, sel: &str) -> Agent {
        Agent {
            child: None,
            socket: self.socket.clone(),
            select: Some(sel.to_owned()),
            owner: false,
        }
    }

    fn launch(scope: &[&str], extra: &[&str]) -> Agent {
        let mut extra = extra.to_vec();
        if !extra.contains(&"--reconcile-interval") {
            extra.extend(["--reconcile-interval", "0"]);
        }
        let socket = std::env::temp_dir().join(format!("{}.sock", unique("tcpstate-test-")));
        let child = tcpstate()
            .args(["run", "--quiet"])
            .args(scope)
            .arg("--socket")
            .arg(&socket)
            .args(extra)
            .stdout(Stdio::null())
            // TCPSTATE_TEST_LOG=debug shows the agent's own log.
            .env(
                "RUST_LOG",
                std::env::var("TCPSTATE_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .spawn()
            .expect("start tcpstate run");
        let mut agent = Agent {
            child: Some(child),
            socket,
            select: None,
            owner: true,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while agent.try_counts().is_none() {
            if let Some(st) = agent.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("tcpstate run exited early: {st}");
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not answer within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        agent
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `tcpstate count --json` as a user runs it.
    pub fn try_counts(&self) -> Option<StateCounts> {
        match &self.select {
            Some(sel) => self.count_json(&["--netns", sel]),
            None => self.count_json(&[]),
        }
    }

    /// `tcpstate count --json EXTRA...`; `None` when it fails.
    fn count_json(&self, extra: &[&str]) -> Option<StateCounts> {
        let out = tcpstate()
            .args(["count", "--json", "--socket"])
            .arg(&self.socket)
            .args(extra)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("count --json prints JSON");
        Some(StateCounts::from_json(&v).expect("count --json names the eleven states"))
    }

    pub fn counts(&self) -> StateCounts {
        self.try_counts().expect("the agent answers")
    }

    /// `tcpstate count --observed --json` as a user runs it: the
    /// connections passing through (`run --observe`).
    pub fn observed(&self) -> StateCounts {
        self.count_json(&["--observed"])
            .expect("count --observed answers (an agent run with --observe)")
    }

    /// The full snapshot (events included).
    pub fn snapshot(&self) -> tcpstate::snapshot::Snapshot {
        tcpstate::client::control::query(&self.socket).expect("snapshot")
    }

    /// Waits until the agent's counts equal `ss -tan` of `ns` (at most 5 s),
    /// and checks that they did with a message showing both.
    pub fn assert_matches_ss(&self, ns: &Netns, what: &str) -> StateCounts {
        self.assert_matches_ss_within(ns, what, Duration::from_secs(5))
    }

    /// The same, waiting at most `limit`.
    pub fn assert_matches_ss_within(&self, ns: &Netns, what: &str, limit: Duration) -> StateCounts {
        let deadline = Instant::now() + limit;
        loop {
            let (ours, truth) = (self.counts(), ns.ss_counts());
            if ours == truth {
                return truth;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: tcpstate and ss differ after {limit:?}\n{}",
                    table(&ours, &truth)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }

    /// Sends SIGINT and waits for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.stop_with(nix::sys::signal::Signal::SIGINT)
    }

    /// Sends `signal` and waits for the agent to exit (SIGKILL after 10 s).
    pub fn stop_with(&mut self, signal: nix::sys::signal::Signal) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, signal);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.owner {
            return;
        }
        if self.child.is_some() {
            self.stop();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

pub fn table(ours: &StateCounts, truth: &StateCounts) -> String {
    let mut s = format!("{:<12} {:>8} {:>8}\n", "state", "tcpstate", "ss");
    for st in TcpState::REPORTED {
        let mark = if ours.get(st) != truth.get(st) {
            "  <--"
        } else {
            ""
        };
        s += &format!(
            "{:<12} {:>8} {:>8}{mark}\n",
            st.name(),
            ours.get(st),
            truth.get(st)
        );
    }
    s
}

/// Closes with an RST (SO_LINGER 0).
pub fn abort(stream: TcpStream) {
    nix::sys::socket::setsockopt(
        &stream,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .expect("SO_LINGER");
    drop(stream);
}

/// `ip:port`, with brackets around an IPv6 address.
pub fn sockaddr(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Ids of the loaded programs named tcpstate_* (any agent's).
pub fn tcpstate_programs() -> Vec<u32> {
    aya::programs::loaded_programs()
        .filter_map(|p| p.ok())
        .filter(|p| p.name_as_str().is_some_and(|n| n.starts_with("tcpstate_")))
        .map(|p| p.id())
        .collect()
}

/// Links (XDP, tcx) that attach a tcpstate_* program anywhere.
pub fn tcpstate_links() -> usize {
    let ours = tcpstate_programs();
    aya::programs::loaded_links()
        .filter_map(|l| l.ok())
        .filter(|l| ours.contains(&l.program_id()))
        .count()
}

/// Runs `nft` in a namespace (the tests' way of losing packets: no netem here).
pub fn nft(ns: &Netns, rule: &str) {
    sh(&["ip", "netns", "exec", &ns.name, "nft", rule]);
}

/// Loads an nftables ruleset (`nft -f -`) in a namespace.
pub fn nft_script(ns: &Netns, rules: &str) {
    use std::io::Write;
    let mut nft = Command::new("ip")
        .args(["netns", "exec", &ns.name, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    nft.stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(nft.wait().unwrap().success(), "nft rules:\n{rules}");
}

/// A connect that does not wait for the handshake.
pub fn connect_nonblocking(ns: &Netns, to: SocketAddr) -> std::os::fd::OwnedFd {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, connect, socket};
    ns.run(|| {
        let family = if to.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK, None).expect("socket");
        match connect(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrStorage::from(to),
        ) {
            Err(nix::errno::Errno::EINPROGRESS) | Ok(()) => fd,
            Err(e) => panic!("connect: {e}"),
        }
    })
}

/// The effective capability sets of every thread of `pid`, as the kernel
/// reports them in /proc.
pub fn thread_caps(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .trim()
                .to_owned()
        };
        out.push((task.display().to_string(), field("Name:"), field("CapEff:")));
    }
    out
}
