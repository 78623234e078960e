//! A host with containers, made of plain namespaces: a bridge in the test's
//! own (host) namespace holding the bridge address, and "container"
//! namespaces whose eth0 is one end of a veth pair with the other end on
//! the bridge, as docker0 and cni0 do it. Everything is removed on drop.

use std::{
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use tcpstate::snapshot::StateCounts;

use super::{Agent, Netns, sh, table, tcpstate, unique};

/// A bridge in the host namespace with 10.N.0.1/24 and fdNN::1/64.
pub struct Bridge {
    pub name: String,
    /// The second octet of its subnet.
    pub net: u32,
    pub v4: String,
    pub v6: String,
}

impl Bridge {
    pub fn new() -> Bridge {
        let name = unique("tsbr");
        let net = std::process::id() % 200 + 20;
        sh(&["ip", "link", "add", &name, "type", "bridge"]);
        let b = Bridge {
            v4: format!("10.{net}.0.1"),
            v6: format!("fd{net:02x}::1"),
            name,
            net,
        };
        sh(&["ip", "addr", "add", &format!("{}/24", b.v4), "dev", &b.name]);
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{}/64", b.v6),
            "dev",
            &b.name,
            "nodad",
        ]);
        sh(&["ip", "link", "set", &b.name, "up"]);
        b
    }

    /// A container namespace with eth0 at 10.N.0.HOST/24 and fdNN::HOST/64.
    pub fn container(&self, host: u32) -> Container {
        let ns = Netns::new("tsc");
        let veth = unique("tsv");
        sh(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ]);
        sh(&["ip", "link", "set", &veth, "master", &self.name]);
        sh(&["ip", "link", "set", &veth, "up"]);
        let v4 = format!("10.{}.0.{host}", self.net);
        let v6 = format!("fd{:02x}::{host:x}", self.net);
        sh(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{v4}/24"),
            "dev",
            "eth0",
        ]);
        sh(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        sh(&["ip", "-n", &ns.name, "link", "set", "eth0", "up"]);
        Container { ns, veth, v4, v6 }
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// A namespace plugged into a [`Bridge`].
pub struct Container {
    pub ns: Netns,
    /// The host-side end of its veth.
    pub veth: String,
    pub v4: String,
    pub v6: String,
}

/// The inode of a namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`).
pub fn inode_of(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .ino()
}

/// Whether an interface of this name exists in the test's namespace.
pub fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// What of process `pid` refers to network namespace `inode`: its threads'
/// namespaces and its descriptors (`net:[INODE]` links).
pub fn refs_to(pid: u32, inode: u64) -> Vec<String> {
    let want = format!("net:[{inode}]");
    let mut out = Vec::new();
    for dir in ["task", "fd"] {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/{dir}")) else {
            continue;
        };
        for e in entries.flatten() {
            let link = if dir == "task" {
                e.path().join("ns/net")
            } else {
                e.path()
            };
            if std::fs::read_link(&link).is_ok_and(|t| t.to_string_lossy() == want) {
                out.push(link.display().to_string());
            }
        }
    }
    out
}

/// `ss -tanH` in the calling process's own namespace, counted per state.
pub fn host_ss() -> tcpstate::snapshot::StateCounts {
    super::sampler::ss_here()
}

/// Waits (at most `limit`) until `ours()` equals `truth()`; panics showing both.
pub fn settle(
    what: &str,
    limit: Duration,
    ours: impl Fn() -> Option<StateCounts>,
    truth: impl Fn() -> StateCounts,
) -> StateCounts {
    let deadline = Instant::now() + limit;
    loop {
        let (o, t) = (ours(), truth());
        if o == Some(t) {
            return t;
        }
        if Instant::now() > deadline {
            // How much longer it took, if it came at all: slow and never
            // are different failures.
            let late = (0..100).find_map(|i| {
                sleep(Duration::from_millis(100));
                (ours() == Some(truth())).then(|| limit + Duration::from_millis(100 * (i + 1)))
            });
            let missing = if o.is_none() {
                " (tcpstate had no counts for it: not monitored yet)"
            } else {
                ""
            };
            panic!(
                "{what}: tcpstate and ss differ after {limit:?}{missing}; equal after {}\n{}",
                late.map_or("more than 10 s more".to_owned(), |d| format!("{d:?}")),
                table(&o.unwrap_or_default(), &t)
            );
        }
        sleep(Duration::from_millis(100));
    }
}

/// `count --by-netns --json`, as a script reads it.
pub fn by_netns(agent: &Agent) -> Vec<serde_json::Value> {
    let out = tcpstate()
        .args(["count", "--by-netns", "--json", "--socket"])
        .arg(&agent.socket)
        .output()
        .expect("count --by-netns");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .expect("JSON")
        .as_array()
        .expect("an array")
        .clone()
}

/// A process that holds a namespace of its own (`unshare -n`), listening
/// and connected to itself on loopback; killed on drop.
pub struct Unshared(std::process::Child);

impl Unshared {
    pub fn start() -> Unshared {
        let script = "import socket,time\n\
l=socket.socket(); l.bind(('127.0.0.1',7100)); l.listen()\n\
c=socket.create_connection(('127.0.0.1',7100)); s,_=l.accept()\n\
print('ready',flush=True); time.sleep(600)\n";
        let mut child = Command::new("unshare")
            .args([
                "-n",
                "sh",
                "-c",
                "ip link set lo up && exec python3 -c \"$0\"",
            ])
            .arg(script)
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare");
        wait_ready(&mut child);
        Unshared(child)
    }
    pub fn pid(&self) -> u32 {
        // `sh` execs python: the pid is the python process's.
        self.0.id()
    }
}

impl Drop for Unshared {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn nsenter_ss(pid: u32) -> StateCounts {
    let out = Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "ss", "-tanH"])
        .output()
        .expect("nsenter ss");
    assert!(out.status.success(), "nsenter ss failed");
    super::ss_counted(&out.stdout)
}

/// Waits for a child started with a piped stdout to print `ready`.
pub fn wait_ready(child: &mut std::process::Child) {
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().expect("piped stdout")),
        &mut line,
    )
    .expect("reading the child's first line");
    assert_eq!(line.trim(), "ready");
}

/// Waits until the kernel's rtnl lock is free again: a veth pair made and
/// deleted in the host namespace takes under 100 ms three times in a row
/// (at most 60 s). Namespaces deleted by earlier tests are torn down
/// afterwards by the kernel, holding that lock in steps for seconds (a
/// hundred of them, or one with thousands of sockets); every attach the
/// agent makes needs it too. A test that times how quickly the agent
/// follows a new namespace starts after that, so that it times the agent
/// and not the kernel's backlog. Returns how long it waited.
pub fn wait_for_quiet_rtnl() -> Duration {
    let start = Instant::now();
    let name = unique("tsq");
    let mut quick = 0;
    while quick < 3 && start.elapsed() < Duration::from_secs(60) {
        let t = Instant::now();
        // (This kernel has no dummy links.)
        sh(&["ip", "link", "add", &name, "type", "veth"]);
        sh(&["ip", "link", "del", &name]);
        quick = if t.elapsed() < Duration::from_millis(100) {
            quick + 1
        } else {
            0
        };
    }
    start.elapsed()
}
