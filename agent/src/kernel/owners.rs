//! Who holds a socket: the processes with a descriptor on its inode, found
//! as `ss -p` finds them (`/proc/PID/fd/N` links to `socket:[INODE]`).
//! Reads every process's descriptors, so only ever on demand.

use std::collections::{HashMap, HashSet};

use crate::snapshot::conns::Owner;

/// The owners of each of `inodes`, read from `proc` (normally `/proc`).
/// Processes that end while they are read, or whose descriptors this
/// process may not read, are passed over.
pub fn of_inodes(proc: &std::path::Path, inodes: &HashSet<u32>) -> HashMap<u32, Vec<Owner>> {
    let mut found: HashMap<u32, Vec<Owner>> = HashMap::new();
    if inodes.is_empty() {
        return found;
    }
    let Ok(dir) = std::fs::read_dir(proc) else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let mut comm = None;
        for fd in fds.flatten() {
            let Some(inode) = std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| socket_inode(l.to_str()?))
            else {
                continue;
            };
            if !inodes.contains(&inode) {
                continue;
            }
            let Some(n) = fd.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let comm = comm
                .get_or_insert_with(|| {
                    std::fs::read_to_string(entry.path().join("comm"))
                        .map(|c| c.trim_end().to_owned())
                        .unwrap_or_default()
                })
                .clone();
            found
                .entry(inode)
                .or_default()
                .push(Owner { pid, comm, fd: n });
        }
    }
    for owners in found.values_mut() {
        owners.sort();
    }
    found
}

/// `socket:[12345]` → 12345.
fn socket_inode(link: &str) -> Option<u32> {
    link.strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_links_name_their_inode() {
        assert_eq!(socket_inode("socket:[4026]"), Some(4026));
        assert_eq!(socket_inode("pipe:[4026]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
    }

    #[test]
    fn this_process_owns_the_socket_it_opened() {
        use std::os::unix::fs::MetadataExt;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&l);
        let inode = std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino() as u32;
        let found = of_inodes(std::path::Path::new("/proc"), &HashSet::from([inode]));
        let me = std::process::id();
        let owners = &found[&inode];
        assert!(
            owners.iter().any(|o| o.pid == me && o.fd == fd as u32),
            "{owners:?}"
        );
    }
}
