//! One namespace's part of a snapshot (`run -A`), and how `--netns SEL`
//! names a namespace.

use serde::{Deserialize, Serialize};
use tcpstate_common::Event;

use super::{Snapshot, StateCounts};

/// One namespace's counts, and how to name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsCounts {
    /// Its inode number (`lsns -t net`, `readlink /proc/PID/ns/net`).
    pub netns: u64,
    /// Its `ip netns` name.
    pub name: Option<String>,
    /// One process in it, and that process's comm.
    pub pid: Option<u32>,
    #[serde(default)]
    pub comm: Option<String>,
    pub states: StateCounts,
    /// New connections not tracked: flow map full, or the namespace's share
    /// of it used up.
    #[serde(default)]
    pub refused: u64,
    /// At the last reconciliation: tcpstate's count minus the socket
    /// table's, per state.
    #[serde(default)]
    pub drift: serde_json::Map<String, serde_json::Value>,
    /// The probe's slot for it (internal; the reader's key).
    #[serde(default)]
    pub slot: u32,
    /// The container whose namespace it is, where a runtime or a cgroup says.
    #[serde(default)]
    pub container: Option<crate::names::Container>,
    /// The Kubernetes pod whose namespace it is.
    #[serde(default)]
    pub pod: Option<crate::names::Pod>,
}

impl NetnsCounts {
    pub fn of(id: &crate::tracking::host::Identity, slot: u32, snap: &Snapshot) -> NetnsCounts {
        let event = |e: Event| {
            snap.events
                .get(e.name())
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        };
        NetnsCounts {
            netns: id.inode,
            name: id.name.clone(),
            pid: id.pid,
            comm: id.comm.clone(),
            states: snap.state_counts().unwrap_or_default(),
            refused: event(Event::MapFull) + event(Event::NetnsShareFull),
            drift: snap.drift.clone(),
            slot,
            container: id.owner.container.clone(),
            pod: id.owner.pod.clone(),
        }
    }

    /// Who it belongs to, as one value.
    pub fn owner(&self) -> crate::names::Owner {
        crate::names::Owner {
            container: self.container.clone(),
            pod: self.pod.clone(),
        }
    }

    /// Whether `sel` names this namespace: its `ip netns` name, its inode
    /// number, `pid:PID` of a process in it (as the reader's `in_ns` says),
    /// its container's name or id (12 digits or more), or
    /// `pod:NAMESPACE/NAME`.
    pub fn selected_by(&self, sel: &Selector) -> bool {
        match sel {
            Selector::Inode(i) => self.netns == *i,
            Selector::Name(n) => {
                self.name.as_deref() == Some(n.as_str())
                    || self.container.as_ref().is_some_and(|c| {
                        c.name.as_deref() == Some(n.as_str())
                            || (n.len() >= 12 && c.id.starts_with(n.as_str()))
                    })
            }
            Selector::Pid(_, inode) => *inode == Some(self.netns),
            Selector::Pod(ns, name) => self.pod.as_ref().is_some_and(|p| {
                p.namespace.as_deref() == Some(ns.as_str()) && p.name.as_deref() == Some(name)
            }),
        }
    }
}

/// How `count --netns SEL` names a namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Selector {
    Name(String),
    Inode(u64),
    /// `pid:PID`, with the inode of that process's namespace where it was
    /// readable.
    Pid(u32, Option<u64>),
    /// `pod:NAMESPACE/NAME`.
    Pod(String, String),
}

impl Selector {
    pub fn parse(s: &str) -> Selector {
        if let Some((ns, name)) = s.strip_prefix("pod:").and_then(|p| p.split_once('/')) {
            return Selector::Pod(ns.to_owned(), name.to_owned());
        }
        if let Some(pid) = s.strip_prefix("pid:").and_then(|p| p.parse::<u32>().ok()) {
            let inode = std::fs::read_link(format!("/proc/{pid}/ns/net"))
                .ok()
                .and_then(|t| crate::kernel::discover::net_inode(t.to_str()?));
            return Selector::Pid(pid, inode);
        }
        if let Ok(i) = s
            .strip_prefix("net:[")
            .and_then(|r| r.strip_suffix(']'))
            .unwrap_or(s)
            .parse::<u64>()
        {
            return Selector::Inode(i);
        }
        Selector::Name(s.to_owned())
    }
}
