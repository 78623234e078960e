//! Questions answered on demand over every monitored namespace: the
//! connections one by one and their owners (`conns`), the listeners
//! (`listeners`). Each is one walk of the flow maps and one read of each
//! namespace's socket table, made when a client asks (and given again for
//! a second: `serve::control`).

use std::collections::HashSet;

use crate::{
    error::Result,
    kernel::owners,
    snapshot::conns::{Conn, ConnFilter, Listener, NetnsRows},
    tracking::{
        host::{Host, by_slot},
        timers::monotonic_ns,
    },
};

impl Host {
    /// The connections `filter` selects, per namespace, with their owners
    /// when it asks for them.
    pub fn conns(&mut self, filter: &ConnFilter) -> Result<Vec<NetnsRows<Conn>>> {
        let mut by_slot = by_slot(self.probe.flow_entries()?);
        let now = monotonic_ns();
        let mut found = Vec::new();
        for (slot, t) in self.trackers.iter_mut() {
            let mine = by_slot.remove(slot).unwrap_or_default();
            if filter.netns.is_some_and(|i| i != t.identity.inode) {
                continue;
            }
            let rows = t.conns(&mine, filter, now)?;
            found.push((t.identity.inode, t.identity.name.clone(), rows));
        }
        let owners = if filter.process {
            let inodes: HashSet<u32> = found
                .iter()
                .flat_map(|(_, _, rows)| rows.iter().map(|(_, i)| *i))
                .filter(|i| *i != 0)
                .collect();
            self.fd_reader
                .run(move || Ok(owners::of_inodes(std::path::Path::new("/proc"), &inodes)))?
        } else {
            Default::default()
        };
        Ok(found
            .into_iter()
            .map(|(netns, name, rows)| NetnsRows {
                netns,
                name,
                rows: rows
                    .into_iter()
                    .map(|(mut c, inode)| {
                        c.owners = owners.get(&inode).cloned().unwrap_or_default();
                        c
                    })
                    .collect(),
                listen_overflows: None,
                listen_drops: None,
            })
            .collect())
    }

    /// Every namespace's listeners (or only the one with inode `netns`).
    pub fn listeners(&mut self, netns: Option<u64>) -> Result<Vec<NetnsRows<Listener>>> {
        let mut by_slot = by_slot(self.probe.flow_entries()?);
        let mut out = Vec::new();
        for (slot, t) in self.trackers.iter_mut() {
            let mine = by_slot.remove(slot).unwrap_or_default();
            if netns.is_some_and(|i| i != t.identity.inode) {
                continue;
            }
            out.push(t.listeners(&mine)?);
        }
        Ok(out)
    }
}
