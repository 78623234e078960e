//! What the calling thread's network namespace has: interfaces, addresses,
//! sysctls, SNMP counters. Called on the namespace's kept thread
//! ([`crate::kernel::netns::NetNs::run`]).

use crate::error::{Error, Result};

/// Names of the interfaces that are up in the calling thread's namespace.
pub fn interfaces_up() -> Result<Vec<String>> {
    let addrs =
        nix::ifaddrs::getifaddrs().map_err(|e| Error::io("listing interfaces", e.into()))?;
    let mut names: Vec<String> = addrs
        .filter(|a| a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP))
        .map(|a| a.interface_name)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Does an interface of that name exist in the calling thread's namespace?
pub fn interface_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Reads a sysctl of the calling thread's namespace, e.g. `net/ipv4/tcp_fin_timeout`.
pub fn sysctl_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `net.ipv4.ip_local_port_range` of the calling thread's namespace: the
/// ports connect() picks from (inclusive).
pub fn local_port_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|n| n.parse::<u16>().ok());
    Some((it.next()??, it.next()??))
}

/// The buckets of the calling thread's namespace's TCP socket table
/// (`net.ipv4.tcp_ehash_entries`, Linux 6.1+): negative when the namespace
/// shares the initial namespace's table (the default), in which case every
/// sock_diag dump in it walks the whole host's table.
pub fn socket_table_buckets() -> Option<i64> {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_ehash_entries")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// One of the kernel's TCP counters of the calling thread's namespace from
/// `/proc/net/netstat`, e.g. `TcpExt` `TCPTimeWaitOverflow`.
pub fn snmp_counter(group: &str, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat").ok()?;
    let prefix = format!("{group}:");
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if names.starts_with(&prefix) {
            let at = names.split_whitespace().position(|n| n == name)?;
            return values.split_whitespace().nth(at)?.parse().ok();
        }
    }
    None
}

/// The addresses of the calling thread's namespace, on every interface.
pub fn local_addresses() -> Result<Vec<std::net::IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| Error::io("listing addresses", e.into()))?;
    let mut out: Vec<std::net::IpAddr> = addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(std::net::IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}
