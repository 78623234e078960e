//! Attaching the packet programs to interfaces and detaching them again,
//! one interface at a time (interfaces and namespaces come and go while the
//! agent runs). What hangs on an interface is its namespace's entry
//! program (`entry.rs`), which names the namespace and goes on to the
//! shared program.
//!
//! Every attachment is a BPF link owned by this process (tcx, or an XDP
//! link): it goes when the process exits, however it exits, and a link whose
//! interface is deleted goes defunct without harm. Nothing is pinned.

use std::{collections::BTreeMap, os::fd::OwnedFd};

use crate::{
    error::{Error, Result},
    kernel::{
        entry::{self, Hook},
        probe::{Ingress, Probe, TC_IN_PROGRAM, TC_PROGRAM, XDP_PROGRAM},
    },
};

/// ifindex of loopback in every namespace. Only the egress hook there: every
/// loopback segment passes it exactly once, and still carries its socket,
/// which local NAT needs (a REDIRECT to a proxy on 127.0.0.1 gives the two
/// ends of one connection different tuples).
pub const LOOPBACK_IFINDEX: u32 = 1;

/// `XDP_FLAGS_SKB_MODE`, `XDP_FLAGS_DRV_MODE`.
const XDP_SKB: u32 = 1 << 1;
const XDP_DRV: u32 = 1 << 2;

/// The links that hang the probe on one interface (closing one detaches it).
pub struct Attachment {
    pub name: String,
    _ingress: Option<OwnedFd>,
    _egress: OwnedFd,
}

/// The interfaces the probe hangs on, by namespace slot and ifindex.
#[derive(Default)]
pub struct Attachments(BTreeMap<(u32, u32), Attachment>);

impl Attachments {
    pub fn names(&self) -> Vec<String> {
        self.0.values().map(|a| a.name.clone()).collect()
    }

    pub fn names_in(&self, slot: u32) -> Vec<String> {
        self.0
            .range((slot, 0)..=(slot, u32::MAX))
            .map(|(_, a)| a.name.clone())
            .collect()
    }

    pub fn has(&self, slot: u32, ifindex: u32) -> bool {
        self.0.contains_key(&(slot, ifindex))
    }

    pub fn ifindexes_in(&self, slot: u32) -> Vec<u32> {
        self.0
            .range((slot, 0)..=(slot, u32::MAX))
            .map(|((_, i), _)| *i)
            .collect()
    }
}

impl Probe {
    /// Attaches namespace `slot`'s entry programs to interface `iface`
    /// (`ifindex`) in the calling thread's namespace: the ingress hook for
    /// what arrives, TC egress for what leaves. On loopback the egress hook
    /// alone sees every segment exactly once (see [`LOOPBACK_IFINDEX`]).
    pub fn attach(&mut self, slot: u32, iface: &str, ifindex: u32) -> Result<()> {
        let loopback = ifindex == LOOPBACK_IFINDEX;
        let (hook, flags, name) = match self.ingress {
            Ingress::Tc => (Hook::TcIngress, 0, TC_IN_PROGRAM),
            Ingress::XdpGeneric => (Hook::Xdp, XDP_SKB, XDP_PROGRAM),
            Ingress::XdpNative => (Hook::Xdp, XDP_DRV, XDP_PROGRAM),
        };
        let prog = |hook| {
            self.entry_program(slot, hook).ok_or_else(|| {
                Error::io(
                    "attaching",
                    std::io::Error::other(format!("no namespace in slot {slot}")),
                )
            })
        };
        let ingress = if loopback {
            None
        } else {
            Some(
                entry::link(prog(hook)?, ifindex, hook, flags)
                    .map_err(|e| attach_error(name, iface, e))?,
            )
        };
        // First in the chain, so the monitor sees every packet before any
        // other program may redirect or drop it. A failure drops the
        // ingress link made above: nothing is left half attached.
        let egress = entry::link(prog(Hook::TcEgress)?, ifindex, Hook::TcEgress, 0)
            .map_err(|e| attach_error(TC_PROGRAM, iface, e))?;
        self.attached.0.insert(
            (slot, ifindex),
            Attachment {
                name: iface.to_owned(),
                _ingress: ingress,
                _egress: egress,
            },
        );
        Ok(())
    }

    /// Detaches from interface `ifindex` of `slot` (gone, or moved into
    /// another namespace). Links of an interface that no longer exists
    /// detach without error.
    pub fn detach(&mut self, slot: u32, ifindex: u32) -> Result<Option<String>> {
        Ok(self.attached.0.remove(&(slot, ifindex)).map(|a| a.name))
    }

    /// The interfaces the probe is attached to, by name.
    pub fn attached(&self) -> Vec<String> {
        self.attached.names()
    }

    pub fn attachments(&self) -> &Attachments {
        &self.attached
    }
}

pub(crate) fn attach_error(program: &str, iface: &str, e: std::io::Error) -> Error {
    if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
        return Error::NotPermitted {
            action: format!("attaching {program} to {iface}"),
        };
    }
    let text = e.to_string();
    let hint = if program == XDP_PROGRAM && e.raw_os_error() == Some(libc::EBUSY) {
        " (another XDP program is attached there: `ip link show` names it; detach it or leave this interface out)"
    } else if program == XDP_PROGRAM {
        " (try --ingress tc or --ingress xdp, which every interface supports)"
    } else {
        ""
    };
    Error::Attach {
        program: program.into(),
        iface: iface.into(),
        error: text,
        hint,
    }
}
