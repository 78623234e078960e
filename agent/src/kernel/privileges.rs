//! Dropping privileges once the probe is loaded and attached.
//!
//! Loading and attaching need CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON (and
//! CAP_SYS_ADMIN to enter another namespace). Everything after works on file
//! descriptors the agent already holds (maps, the command program, the
//! sock_diag socket) or on files any root-owned process may read, except
//! attaching the loaded programs to an interface that appears later. So the
//! namespace's own thread keeps only what that takes ([`ATTACH`]), and every
//! other thread drops every capability: a bug in the control socket, the
//! metrics server or the view cannot be turned into loading programs.
//! Capabilities belong to threads: each long-lived thread drops its own
//! (threads started later inherit the empty set).

use caps::{CapSet, Capability};

use crate::error::{Error, Result};

/// Drops every capability of the calling thread, the bounding set included
/// (nothing it runs later can regain them).
pub fn drop_all() -> Result<()> {
    let fail = |what: &str, e: caps::errors::CapsError| {
        Error::io(
            format!("dropping capabilities ({what})"),
            std::io::Error::other(e.to_string()),
        )
    };
    caps::clear(None, CapSet::Ambient).map_err(|e| fail("ambient", e))?;
    // Shrinking the bounding set needs CAP_SETPCAP, so it goes first.
    if caps::has_cap(None, CapSet::Effective, caps::Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::read(None, CapSet::Bounding).map_err(|e| fail("bounding", e))? {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| fail("bounding", e))?;
        }
    }
    caps::clear(None, CapSet::Inheritable).map_err(|e| fail("inheritable", e))?;
    caps::clear(None, CapSet::Effective).map_err(|e| fail("effective", e))?;
    caps::clear(None, CapSet::Permitted).map_err(|e| fail("permitted", e))?;
    Ok(())
}

/// What attaching an already loaded program to an interface needs: a BPF
/// link on a network device (tcx or XDP).
pub const ATTACH: [Capability; 2] = [Capability::CAP_NET_ADMIN, Capability::CAP_BPF];

/// What following every namespace of the host takes for the agent's whole
/// life (`run --all-namespaces`), kept by one thread only (the host
/// namespace's): entering a namespace that appears (CAP_SYS_ADMIN), finding
/// it through other users' processes (CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH),
/// loading its entry programs and attaching them (CAP_BPF, CAP_PERFMON,
/// CAP_NET_ADMIN).
pub const FOLLOW_ALL: [Capability; 6] = [
    Capability::CAP_NET_ADMIN,
    Capability::CAP_BPF,
    Capability::CAP_PERFMON,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_DAC_READ_SEARCH,
];

/// What reading other processes' /proc/PID/fd takes (the owners of
/// sockets, as `ss -p` finds them): kept by one thread only, which does
/// nothing else.
pub const READ_FDS: [Capability; 2] = [Capability::CAP_SYS_PTRACE, Capability::CAP_DAC_READ_SEARCH];

/// Drops every capability of the calling thread but `keep` (the bounding set
/// too: nothing it runs later can regain the others).
pub fn keep_only(keep: &[Capability]) -> Result<()> {
    let fail = |what: &str, e: caps::errors::CapsError| {
        Error::io(
            format!("dropping capabilities ({what})"),
            std::io::Error::other(e.to_string()),
        )
    };
    let keep: caps::CapsHashSet = keep.iter().copied().collect();
    caps::clear(None, CapSet::Ambient).map_err(|e| fail("ambient", e))?;
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::read(None, CapSet::Bounding).map_err(|e| fail("bounding", e))? {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap).map_err(|e| fail("bounding", e))?;
            }
        }
    }
    caps::clear(None, CapSet::Inheritable).map_err(|e| fail("inheritable", e))?;
    let had = caps::read(None, CapSet::Permitted).map_err(|e| fail("permitted", e))?;
    let kept: caps::CapsHashSet = had.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &kept).map_err(|e| fail("effective", e))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(|e| fail("permitted", e))?;
    Ok(())
}

/// The calling thread's effective capabilities.
pub fn effective() -> Vec<String> {
    let mut names: Vec<String> = caps::read(None, CapSet::Effective)
        .map(|s| s.into_iter().map(|c| c.to_string()).collect())
        .unwrap_or_default();
    names.sort();
    names
}
