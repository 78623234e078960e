//! Questions answered on demand over every monitored namespace: the
//! connections one by one and their owners (`conns`), the listeners
//! (`listeners`). Each is one walk of the flow maps and one read of each
//! namespace's socket table, made when a client asks (and given again for
//! a second: `serve::control`).

use std::{collections::HashSet, sync::Arc};

use crate::{
    error::Result,
    kernel::{netns::NetNs, owners},
    snapshot::{
        conns::{Conn, ConnFilter, Listener, NetnsRows},
        durations::Timings,
        services::Service,
    },
    tracking::{
        host::{Host, by_slot},
        timers::monotonic_ns,
    },
};

impl Host {
    /// The connections `filter` selects, per namespace; their owners, when
    /// it asks for them, are read by [`Found::finish`], after the host's
    /// lock is given back (a read of every process's descriptors must not
    /// hold up the kernel's timers).
    pub fn conns(&mut self, filter: &ConnFilter) -> Result<Found> {
        let mut by_slot = by_slot(self.probe.flow_entries()?);
        let now = monotonic_ns();
        let mut found = Vec::new();
        for (slot, t) in self.trackers.iter_mut() {
            let mine = by_slot.remove(slot).unwrap_or_default();
            if filter.netns.is_some_and(|i| i != t.identity.inode) {
                continue;
            }
            let rows = t.conns(&mine, filter, now)?;
            found.push(NetnsRows {
                netns: t.identity.inode,
                name: t.identity.name.clone(),
                rows,
                listen_overflows: None,
                listen_drops: None,
                handshakes: None,
            });
        }
        Ok(Found {
            found,
            reader: filter.process.then(|| self.fd_reader.clone()),
        })
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
            let mut rows = t.listeners(&mine)?;
            let timings = Timings::of(&self.probe.durations(*slot)?);
            rows.handshakes = timings.get("handshake").cloned();
            for l in rows.rows.iter_mut() {
                let port = Service::Local(l.local.port());
                if let Some(s) = t.services.rows.iter().find(|s| s.service == port) {
                    l.unanswered = s.unanswered;
                    l.handshake_p50_s = s.times.quantile(0.5);
                    l.handshake_p99_s = s.times.quantile(0.99);
                }
            }
            out.push(rows);
        }
        Ok(out)
    }
}

/// Connections found under the host's lock, each with its socket's inode.
pub struct Found {
    found: Vec<NetnsRows<(Conn, u32)>>,
    /// The descriptor reader, when owners were asked for.
    reader: Option<Arc<NetNs>>,
}

impl Found {
    /// The answer, with each socket's owners when they were asked for.
    pub fn finish(self) -> Result<Vec<NetnsRows<Conn>>> {
        let owners = match &self.reader {
            Some(reader) => {
                let inodes: HashSet<u32> = self
                    .found
                    .iter()
                    .flat_map(|ns| ns.rows.iter().map(|(_, i)| *i))
                    .filter(|i| *i != 0)
                    .collect();
                reader.run(move || Ok(owners::of_inodes(std::path::Path::new("/proc"), &inodes)))?
            }
            None => Default::default(),
        };
        Ok(self
            .found
            .into_iter()
            .map(|ns| NetnsRows {
                netns: ns.netns,
                name: ns.name,
                rows: ns
                    .rows
                    .into_iter()
                    .map(|(mut c, inode)| {
                        c.owners = owners.get(&inode).cloned().unwrap_or_default();
                        c
                    })
                    .collect(),
                listen_overflows: None,
                listen_drops: None,
                handshakes: None,
            })
            .collect())
    }
}
