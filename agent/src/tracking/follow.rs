//! `--all-namespaces`: following the host's namespaces as they come and go.
//! Once a tick the host looks (`kernel::discover`): a namespace seen for the
//! first time is queued, and gets a tracker (its interfaces attached, its
//! table seeded) from the daemon's starter, one short step at a time; a
//! namespace that no process or mount holds any more is dropped, and with
//! its tracker go the agent's thread, sockets and links in it, so the
//! kernel can free it. Interfaces that appear inside a namespace later are
//! attached by the same look.

use std::collections::HashMap;

use crate::{
    kernel::{
        discover::{Found, discover},
        netns::NetNs,
        privileges,
    },
    names::{self, Names},
    tracking::{
        host::{Host, Identity},
        tracker::Tracker,
    },
};

/// What one look changed.
#[derive(Debug, Default)]
pub struct Followed {
    pub dropped: Vec<String>,
    /// New namespaces found, queued for [`Host::start_waiting`].
    pub waiting: usize,
}

/// How many namespaces sharing the host's socket table make the agent say
/// so (see [`Host::hint_shared_tables`]).
const SHARED_HINT: usize = 64;

/// Namespaces found by the last look and not started yet, the agent's own
/// first.
pub type Waiting = Vec<(u64, Found)>;

impl Host {
    /// Looks for the host's namespaces (with every namespace; a no-op
    /// otherwise): drops those gone, keeps the others' names current, and
    /// queues the new ones for [`Host::start_waiting`]. Each look replaces
    /// the queue, so a namespace gone before its start is never tried.
    pub fn look_for_namespaces(&mut self) -> Followed {
        let mut out = Followed::default();
        let Some(keeper) = &self.keeper else {
            return out;
        };
        let own = std::process::id();
        let found = match keeper.run(|| Ok(discover(own))) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("looking for network namespaces: {e}");
                return out;
            }
        };
        let gone: Vec<u32> = self
            .trackers
            .iter()
            .filter(|(_, t)| !found.contains_key(&t.identity.inode))
            .map(|(s, _)| *s)
            .collect();
        for slot in gone {
            if let Some(t) = self.trackers.remove(&slot) {
                out.dropped.push(t.identity.to_string());
                // The tracker's thread and sockets go first, then the links.
                drop(t);
            }
            if let Err(e) = self.probe.forget_netns(slot) {
                tracing::warn!("forgetting namespace slot {slot}: {e}");
            }
        }
        let own = self.own_inode;
        let pid_netns: HashMap<u32, u64> = found
            .values()
            .flat_map(|f| f.pids.iter().map(|p| (*p, f.inode)))
            .collect();
        self.owners = self.names.by_inode(|pid| pid_netns.get(&pid).copied());
        for t in self.trackers.values_mut() {
            if let Some(f) = found.get(&t.identity.inode) {
                // A name given or a process gone since: keep it current.
                t.identity.name = f.name.clone().or(t.identity.name.take());
                if f.pid.is_some() && f.pid != t.identity.pid {
                    (t.identity.pid, t.identity.comm) = (f.pid, f.comm.clone());
                    t.identity.cgroup = f.pid.map(names::cgroup_of).unwrap_or_default();
                }
                t.identity.owner =
                    Names::owner(&self.owners, t.identity.inode, own, &t.identity.cgroup);
            }
        }
        let tracked: Vec<u64> = self.trackers.values().map(|t| t.identity.inode).collect();
        let mut new: Waiting = found
            .into_iter()
            .filter(|(inode, _)| !tracked.contains(inode))
            .collect();
        new.sort_by_key(|(inode, _)| Some(*inode) != own);
        out.waiting = new.len();
        self.waiting = new;
        out
    }

    /// Starts trackers for the queued namespaces until `budget` is spent,
    /// and returns the ones started. Starting one takes tens of
    /// milliseconds, nearly all of it the kernel attaching its links (each
    /// takes the rtnl lock and waits for an RCU grace period, so starts
    /// cannot overlap): callers take the host's lock for one short step at
    /// a time, so timers and ticks are never held back long.
    pub fn start_waiting(&mut self, budget: std::time::Duration) -> Vec<String> {
        let began = std::time::Instant::now();
        let mut started_now = Vec::new();
        let Some(keeper) = &self.keeper else {
            return started_now;
        };
        let (probe, trackers, cfg, clock) =
            (&mut self.probe, &mut self.trackers, &self.cfg, self.clock);
        let (owners, own_inode) = (&self.owners, self.own_inode);
        let mut queue = std::mem::take(&mut self.waiting).into_iter();
        for (inode, f) in queue.by_ref() {
            let cgroup = f.pid.map(names::cgroup_of).unwrap_or_default();
            let identity = Identity {
                inode,
                name: f.name.clone(),
                pid: f.pid,
                comm: f.comm.clone(),
                owner: Names::owner(owners, inode, own_inode, &cgroup),
                cgroup,
            };
            let label = identity.to_string();
            // On the keeper thread: it holds what entering and loading take,
            // and the namespace's thread starts from it with the same.
            let started = keeper.run(|| {
                let ns = NetNs::entered_by(&f.paths, f.name.clone())?;
                if ns.inode() != inode {
                    // The process left, or the pid was reused, between the
                    // look and the open: the next look finds it anew.
                    return Ok(None);
                }
                Tracker::start(
                    probe,
                    clock,
                    ns,
                    identity,
                    cfg.interfaces.clone(),
                    false,
                    cfg.top_k,
                )
                .map(Some)
            });
            match started {
                Ok(Some(t)) => {
                    // Its thread started from the keeper's: it keeps no more
                    // than attaching to its new interfaces takes.
                    if let Err(e) = t.netns().run(|| privileges::keep_only(&privileges::ATTACH)) {
                        tracing::warn!("{label}: {e}");
                    }
                    started_now.push(label);
                    trackers.insert(t.slot(), t);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("{label}: not monitored: {e}"),
            }
            if began.elapsed() > budget {
                break;
            }
        }
        self.waiting = queue.collect();
        self.hint_shared_tables();
        started_now
    }

    /// Says once when many namespaces share the host's socket table: each
    /// check of one (a sock_diag dump, the only per-namespace view the
    /// kernel gives; a BPF `iter/tcp` is filtered the same way) walks the
    /// whole host's table, so checks cost namespaces × table size.
    fn hint_shared_tables(&mut self) {
        let shared: Vec<i64> = self
            .trackers
            .values()
            .filter_map(|t| t.table_buckets)
            .filter(|b| *b < 0)
            .collect();
        if self.shared_hinted || shared.len() < SHARED_HINT {
            return;
        }
        self.shared_hinted = true;
        tracing::info!(
            "{} namespaces share the host's TCP socket table ({} buckets): each socket-table check of one walks all of it; `sysctl net.ipv4.tcp_child_ehash_entries=N` gives namespaces made after it a table of their own",
            shared.len(),
            -shared[0]
        );
    }

    /// How many namespaces wait for [`Host::start_waiting`].
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Looks at the interfaces of the namespaces in `slots` (all: `None`):
    /// attaches to new ones, detaches from those gone.
    pub fn follow_interfaces(&mut self, slots: Option<&[u32]>) {
        let probe = &mut self.probe;
        for (slot, t) in self.trackers.iter_mut() {
            if slots.is_some_and(|s| !s.contains(slot)) {
                continue;
            }
            match t.follow_interfaces(probe) {
                Ok(changes) => {
                    for name in &changes.attached {
                        tracing::info!("{}: attached to {name}, which appeared", t.identity);
                    }
                    for name in &changes.detached {
                        tracing::info!("{}: detached from {name}, which went", t.identity);
                    }
                    for e in &changes.failed {
                        tracing::warn!("{}: {e}", t.identity);
                    }
                }
                Err(e) => tracing::warn!("{}: following interfaces failed: {e}", t.identity),
            }
        }
    }
}
