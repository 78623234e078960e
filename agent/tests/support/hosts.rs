//! A host with containers, made of plain namespaces: a bridge in the test's
//! own (host) namespace holding the bridge address, and "container"
//! namespaces whose eth0 is one end of a veth pair with the other end on
//! the bridge, as docker0 and cni0 do it. Everything is removed on drop.

use std::process::Command;

use super::{Netns, sh, unique};

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
