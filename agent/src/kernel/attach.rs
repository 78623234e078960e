//! Attaching the packet programs to interfaces and detaching them again,
//! one interface at a time (interfaces come and go while the agent runs).
//!
//! Every attachment is a BPF link owned by this process (tcx, or an XDP
//! link): it goes when the process exits, however it exits, and a link whose
//! interface is deleted goes defunct without harm. Nothing is pinned.

use std::collections::BTreeMap;

use aya::programs::{
    LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    tc::{SchedClassifierLinkId, TcAttachOptions},
    xdp::XdpLinkId,
};

use crate::{
    error::{Error, Result, is_permission_error},
    kernel::probe::{Ingress, Probe, TC_IN_PROGRAM, TC_PROGRAM, XDP_PROGRAM, program},
};

/// ifindex of loopback in every namespace. Only the egress hook there: every
/// loopback segment passes it exactly once, and still carries its socket,
/// which local NAT needs (a REDIRECT to a proxy on 127.0.0.1 gives the two
/// ends of one connection different tuples).
pub const LOOPBACK_IFINDEX: u32 = 1;

/// The links that hang the probe on one interface.
pub struct Attachment {
    pub name: String,
    ingress: Option<IngressLink>,
    egress: Option<SchedClassifierLinkId>,
}

enum IngressLink {
    Tc(SchedClassifierLinkId),
    Xdp(XdpLinkId),
}

/// The interfaces the probe hangs on, by ifindex.
#[derive(Default)]
pub struct Attachments(BTreeMap<u32, Attachment>);

impl Attachments {
    pub fn names(&self) -> Vec<String> {
        self.0.values().map(|a| a.name.clone()).collect()
    }

    pub fn has(&self, ifindex: u32) -> bool {
        self.0.contains_key(&ifindex)
    }

    pub fn ifindexes(&self) -> Vec<u32> {
        self.0.keys().copied().collect()
    }
}

impl Probe {
    /// Attaches to interface `iface` (`ifindex`) in the calling thread's
    /// namespace: the ingress hook for what arrives, TC egress for what
    /// leaves. On loopback the egress hook alone sees every segment exactly
    /// once (see [`LOOPBACK_IFINDEX`]).
    pub fn attach(&mut self, iface: &str, ifindex: u32, ingress: Ingress) -> Result<()> {
        let loopback = ifindex == LOOPBACK_IFINDEX;
        let xdp_mode = match ingress {
            Ingress::Tc => None,
            Ingress::XdpGeneric => Some(XdpMode::Skb),
            Ingress::XdpNative => Some(XdpMode::Driver),
        };
        let ingress = match xdp_mode {
            _ if loopback => None,
            Some(mode) => {
                let xdp: &mut Xdp = program(&mut self.ebpf, XDP_PROGRAM)?.try_into()?;
                Some(IngressLink::Xdp(
                    xdp.attach(iface, mode)
                        .map_err(|e| attach_error(XDP_PROGRAM, iface, e))?,
                ))
            }
            None => {
                let tc: &mut SchedClassifier =
                    program(&mut self.ebpf, TC_IN_PROGRAM)?.try_into()?;
                Some(IngressLink::Tc(
                    tc.attach_with_options(
                        iface,
                        TcAttachType::Ingress,
                        TcAttachOptions::TcxOrder(LinkOrder::first()),
                    )
                    .map_err(|e| attach_error(TC_IN_PROGRAM, iface, e))?,
                ))
            }
        };
        let tc: &mut SchedClassifier = program(&mut self.ebpf, TC_PROGRAM)?.try_into()?;
        // First in the chain, so the monitor sees every packet before any
        // other program may redirect or drop it.
        let attached = tc.attach_with_options(
            iface,
            TcAttachType::Egress,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        );
        let egress = match attached {
            Ok(id) => Some(id),
            Err(e) => {
                // Leave nothing half attached.
                let half = Attachment {
                    name: iface.to_owned(),
                    ingress,
                    egress: None,
                };
                let _ = self.detach_links(half);
                return Err(attach_error(TC_PROGRAM, iface, e));
            }
        };
        self.attached.0.insert(
            ifindex,
            Attachment {
                name: iface.to_owned(),
                ingress,
                egress,
            },
        );
        Ok(())
    }

    /// Detaches from interface `ifindex` (gone, or renamed into another
    /// namespace). Links of an interface that no longer exists detach
    /// without error.
    pub fn detach(&mut self, ifindex: u32) -> Result<Option<String>> {
        let Some(a) = self.attached.0.remove(&ifindex) else {
            return Ok(None);
        };
        let name = a.name.clone();
        self.detach_links(a)?;
        Ok(Some(name))
    }

    fn detach_links(&mut self, a: Attachment) -> Result<()> {
        match a.ingress {
            Some(IngressLink::Xdp(id)) => {
                let xdp: &mut Xdp = program(&mut self.ebpf, XDP_PROGRAM)?.try_into()?;
                xdp.detach(id)?;
            }
            Some(IngressLink::Tc(id)) => {
                let tc: &mut SchedClassifier =
                    program(&mut self.ebpf, TC_IN_PROGRAM)?.try_into()?;
                tc.detach(id)?;
            }
            None => {}
        }
        if let Some(id) = a.egress {
            let tc: &mut SchedClassifier = program(&mut self.ebpf, TC_PROGRAM)?.try_into()?;
            tc.detach(id)?;
        }
        Ok(())
    }

    /// The interfaces the probe is attached to, by name.
    pub fn attached(&self) -> Vec<String> {
        self.attached.names()
    }

    pub fn attachments(&self) -> &Attachments {
        &self.attached
    }
}

pub(crate) fn attach_error(program: &str, iface: &str, e: ProgramError) -> Error {
    if is_permission_error(&e) {
        return Error::NotPermitted {
            action: format!("attaching {program} to {iface}"),
        };
    }
    let text = e.to_string();
    let hint = if program == XDP_PROGRAM && (text.contains("busy") || text.contains("exists")) {
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
