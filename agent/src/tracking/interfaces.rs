//! Which interfaces the probe hangs on: without `--iface`, every interface
//! of the namespace, also those that appear later (a container's veth, a
//! bridge, a tunnel, a hot-plugged NIC); with it, the ones named, also when
//! they come back (a re-created veth has a new ifindex). An interface that
//! goes is detached.

use crate::{
    error::{Error, Result},
    kernel::probe::Probe,
};

pub struct Interfaces {
    /// Interfaces named with `--iface`; empty: all of them.
    wanted: Vec<String>,
    /// Leave out the ports of a bridge or bond (`run -A`, where a host has
    /// a veth end per container on its bridge: each link costs the kernel's
    /// rtnl lock and an RCU grace period, milliseconds, and what a port
    /// carries for this namespace's sockets crosses the bridge too).
    skip_ports: bool,
    /// The namespace's slot in the probe.
    slot: u32,
}

/// What one look at the namespace's interfaces changed.
#[derive(Debug, Default)]
pub struct Changes {
    pub attached: Vec<String>,
    pub detached: Vec<String>,
    pub failed: Vec<Error>,
}

impl Interfaces {
    pub fn new(wanted: Vec<String>, slot: u32, skip_ports: bool) -> Interfaces {
        Interfaces {
            wanted,
            slot,
            skip_ports,
        }
    }

    /// What to attach to of `present` (on the namespace's thread).
    pub fn wanted_of(&self, present: Vec<(u32, String)>) -> Vec<(u32, String)> {
        if !self.skip_ports || !self.wanted.is_empty() {
            return present;
        }
        match crate::kernel::links::controlled() {
            Ok(ports) => present
                .into_iter()
                .filter(|(i, _)| !ports.contains(i))
                .collect(),
            Err(e) => {
                tracing::debug!("{e}: bridge ports not told apart");
                present
            }
        }
    }

    fn wants(&self, name: &str) -> bool {
        self.wanted.is_empty() || self.wanted.iter().any(|w| w == name)
    }

    /// The named interfaces that are missing from `present` (at start, an
    /// error: a typo should not wait silently).
    pub fn missing(&self, present: &[(u32, String)]) -> Vec<String> {
        self.wanted
            .iter()
            .filter(|w| !present.iter().any(|(_, n)| n == *w))
            .cloned()
            .collect()
    }

    /// Attaches to every wanted interface of `present` (ifindex, name) that
    /// has no attachment yet and detaches from those no longer present. Runs
    /// on the namespace's thread.
    pub fn sync(&self, probe: &mut Probe, present: &[(u32, String)]) -> Changes {
        let mut out = Changes::default();
        for ifindex in probe.attachments().ifindexes_in(self.slot) {
            if !present.iter().any(|(i, _)| *i == ifindex) {
                match probe.detach(self.slot, ifindex) {
                    Ok(Some(name)) => out.detached.push(name),
                    Ok(None) => {}
                    Err(e) => out.failed.push(e),
                }
            }
        }
        for (ifindex, name) in present {
            if self.wants(name) && !probe.attachments().has(self.slot, *ifindex) {
                match probe.attach(self.slot, name, *ifindex) {
                    Ok(()) => out.attached.push(name.clone()),
                    // An interface gone again before the attach: nothing to do.
                    Err(_) if !crate::kernel::nsinfo::interface_exists(name) => {}
                    Err(e) => out.failed.push(e),
                }
            }
        }
        out
    }

    /// At start: everything wanted attached, or the first error.
    pub fn attach_all(&self, probe: &mut Probe, present: &[(u32, String)]) -> Result<Vec<String>> {
        let mut changes = self.sync(probe, present);
        match changes.failed.pop() {
            Some(e) => Err(e),
            None => Ok(changes.attached),
        }
    }
}
