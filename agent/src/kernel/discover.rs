//! Finding every network namespace of the host: those a process is in
//! (`/proc/PID/ns/net`, the agent's own excluded) and those a file holds
//! (bind mounts of nsfs: `ip netns` under /run/netns, Docker's under
//! /var/run/docker/netns, CNI's, systemd's), as `/proc/self/mountinfo`
//! lists them. A namespace that neither holds any more is gone: the agent's
//! own threads and sockets in it are all that keep it, and it lets go.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// A namespace found, and how to enter it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    pub inode: u64,
    /// Its `ip netns` name (a bind mount under /run/netns).
    pub name: Option<String>,
    /// The lowest-numbered process in it, and that process's comm.
    pub pid: Option<u32>,
    pub comm: Option<String>,
    /// Files that enter it: its bind mounts, `/proc/PID/ns/net`.
    pub paths: Vec<PathBuf>,
    /// Every process in it (a runtime names a container by its first
    /// process, not always the lowest-numbered).
    pub pids: Vec<u32>,
}

/// Folders whose bind mounts carry `ip netns` names.
const NAMED: [&str; 2] = ["/run/netns", "/var/run/netns"];

/// Every namespace the host's processes and mounts hold now, by inode.
/// `own_pid`: the agent's, left out (its threads are not what holds a
/// namespace).
pub fn discover(own_pid: u32) -> BTreeMap<u64, Found> {
    let mut out: BTreeMap<u64, Found> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") {
        for (inode, at) in nsfs_mounts(&text) {
            let f = out.entry(inode).or_default();
            f.inode = inode;
            if f.name.is_none() {
                f.name = ip_netns_name(&at);
            }
            f.paths.push(at);
        }
    }
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|p| *p != own_pid)
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let link = Path::new("/proc").join(pid.to_string()).join("ns/net");
        let Some(inode) = std::fs::read_link(&link)
            .ok()
            .and_then(|t| net_inode(t.to_str()?))
        else {
            continue;
        };
        let f = out.entry(inode).or_default();
        f.inode = inode;
        f.pids.push(pid);
        if f.pid.is_none() {
            f.pid = Some(pid);
            f.comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .ok()
                .map(|c| c.trim_end().to_owned());
            f.paths.push(link);
        }
    }
    out
}

/// `net:[4026531840]` → 4026531840.
pub fn net_inode(text: &str) -> Option<u64> {
    text.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// The nsfs mounts of network namespaces in a mountinfo text: (inode, mount point).
pub fn nsfs_mounts(mountinfo: &str) -> Vec<(u64, PathBuf)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "nsfs" {
                return None;
            }
            let mut f = left.split_whitespace();
            let root = f.nth(3)?;
            let at = f.next()?;
            Some((net_inode(root)?, PathBuf::from(unescape(at))))
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\\' {
            let code: String = (0..3).filter_map(|_| it.next()).collect();
            if let Ok(n) = u8::from_str_radix(&code, 8) {
                out.push(n as char);
                continue;
            }
            out.push('\\');
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}

fn ip_netns_name(at: &Path) -> Option<String> {
    let dir = at.parent()?;
    NAMED
        .iter()
        .any(|n| dir == Path::new(n))
        .then(|| at.file_name()?.to_str().map(str::to_owned))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_of_network_namespaces_are_found() {
        let text = "\
36 25 0:4 net:[4026532281] /run/netns/blue rw shared:5 - nsfs nsfs rw
37 25 0:4 mnt:[4026532282] /run/mnt rw - nsfs nsfs rw
38 25 0:4 net:[4026532300] /var/run/docker/netns/1a2b\\040c rw - nsfs nsfs rw
24 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
";
        let got = nsfs_mounts(text);
        assert_eq!(
            got,
            vec![
                (4026532281, PathBuf::from("/run/netns/blue")),
                (4026532300, PathBuf::from("/var/run/docker/netns/1a2b c")),
            ]
        );
        assert_eq!(
            ip_netns_name(Path::new("/run/netns/blue")).as_deref(),
            Some("blue")
        );
        assert_eq!(ip_netns_name(Path::new("/var/run/docker/netns/x")), None);
        assert_eq!(net_inode("net:[12]"), Some(12));
        assert_eq!(net_inode("mnt:[12]"), None);
    }
}
