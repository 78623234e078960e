//! `--all-namespaces`: following the host's namespaces as they come and go.
//! Once a tick the host looks (`kernel::discover`): a namespace seen for the
//! first time gets a tracker (its interfaces attached, its table seeded); a
//! namespace that no process or mount holds any more is dropped, and with
//! its tracker go the agent's thread, sockets and links in it, so the
//! kernel can free it. Interfaces that appear inside a namespace later are
//! attached by the same look.

use crate::{
    kernel::{discover::discover, netns::NetNs, privileges},
    tracking::{
        host::{Host, Identity},
        tracker::Tracker,
    },
};

/// What one look changed.
#[derive(Debug, Default)]
pub struct Followed {
    pub started: Vec<String>,
    pub dropped: Vec<String>,
    /// Namespaces found but left for the next look (the look's time spent).
    pub waiting: usize,
}

impl Host {
    /// Starts tracking the namespaces that appeared and drops those gone
    /// (with every namespace; a no-op otherwise). Starting one takes tens of
    /// milliseconds (its links each take the kernel's rtnl lock and an RCU
    /// grace period, its table is read): the look starts what `budget`
    /// allows, the agent's own namespace first, and leaves the rest to the
    /// next, so the host's lock is never held long (timers wait on it).
    pub fn follow_namespaces(&mut self, budget: std::time::Duration) -> Followed {
        let began = std::time::Instant::now();
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
        for t in self.trackers.values_mut() {
            if let Some(f) = found.get(&t.identity.inode) {
                // A name given or a process gone since: keep it current.
                t.identity.name = f.name.clone().or(t.identity.name.take());
                if f.pid.is_some() {
                    (t.identity.pid, t.identity.comm) = (f.pid, f.comm.clone());
                }
            }
        }
        let tracked: Vec<u64> = self.trackers.values().map(|t| t.identity.inode).collect();
        let own = crate::kernel::discover::net_inode(
            &std::fs::read_link("/proc/self/ns/net")
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        );
        let (probe, trackers, cfg, clock) =
            (&mut self.probe, &mut self.trackers, &self.cfg, self.clock);
        let mut new: Vec<_> = found
            .into_iter()
            .filter(|(inode, _)| !tracked.contains(inode))
            .collect();
        new.sort_by_key(|(inode, _)| Some(*inode) != own);
        let total = new.len();
        for (done, (inode, f)) in new.into_iter().enumerate() {
            if began.elapsed() > budget {
                out.waiting = total - done;
                break;
            }
            let identity = Identity {
                inode,
                name: f.name.clone(),
                pid: f.pid,
                comm: f.comm.clone(),
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
                    out.started.push(label);
                    trackers.insert(t.slot(), t);
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("{label}: not monitored: {e}"),
            }
        }
        out
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
