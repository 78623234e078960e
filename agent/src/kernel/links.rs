//! Following the namespace's interfaces and addresses as they come and go
//! (rtnetlink link and address events), so that a veth, a bridge, a tunnel
//! or a NIC added after start is attached within moments, one that goes is
//! detached, and a new address is local before its first connection.
//!
//! netlink-packet-route parses the messages (the rtnetlink crate itself
//! needs a newer netlink-sys than the sock_diag code uses); the socket is a
//! plain netlink-sys one, read without blocking when it is readable.

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};

use crate::error::{Error, Result};

impl std::os::fd::AsRawFd for LinkWatch {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

/// What changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// An interface appeared or changed (added, renamed, moved in).
    Link { index: u32, name: String },
    /// An interface went (deleted, or moved to another namespace).
    Gone { index: u32 },
    /// An address was added or removed somewhere.
    Addresses,
}

/// A socket subscribed to the calling thread's namespace's link and
/// address events.
pub struct LinkWatch {
    socket: Socket,
    buf: Vec<u8>,
}

impl LinkWatch {
    pub fn open() -> Result<LinkWatch> {
        let fail = |what: &str, e| Error::io(format!("following interfaces ({what})"), e);
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| fail("socket", e))?;
        socket.bind_auto().map_err(|e| fail("bind", e))?;
        for group in [
            libc::RTNLGRP_LINK,
            libc::RTNLGRP_IPV4_IFADDR,
            libc::RTNLGRP_IPV6_IFADDR,
        ] {
            socket
                .add_membership(group)
                .map_err(|e| fail("membership", e))?;
        }
        socket
            .set_non_blocking(true)
            .map_err(|e| fail("non-blocking", e))?;
        Ok(LinkWatch {
            socket,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Every event waiting now (none when nothing is pending). Messages too
    /// many for the socket's buffer are lost (ENOBUFS): then everything is
    /// to be looked at again, which [`LinkEvent::Addresses`] and a fresh
    /// list of interfaces do.
    pub fn drain(&mut self) -> Result<(Vec<LinkEvent>, bool)> {
        let mut out = Vec::new();
        let mut overrun = false;
        loop {
            let n = match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    overrun = true;
                    continue;
                }
                Err(e) => return Err(Error::io("reading link events", e)),
            };
            out.extend(parse(&self.buf[..n]));
        }
        Ok((out, overrun))
    }
}

/// The events in one datagram of rtnetlink messages.
pub fn parse(mut data: &[u8]) -> Vec<LinkEvent> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(data) else {
            break;
        };
        let len = (msg.header.length as usize).min(data.len());
        if len == 0 {
            break;
        }
        data = &data[len.next_multiple_of(4).min(data.len())..];
        if let NetlinkPayload::InnerMessage(m) = msg.payload {
            match m {
                RouteNetlinkMessage::NewLink(l) => out.push(LinkEvent::Link {
                    index: l.header.index,
                    name: link_name(&l),
                }),
                RouteNetlinkMessage::DelLink(l) => out.push(LinkEvent::Gone {
                    index: l.header.index,
                }),
                RouteNetlinkMessage::NewAddress(_) | RouteNetlinkMessage::DelAddress(_) => {
                    out.push(LinkEvent::Addresses)
                }
                _ => {}
            }
        }
    }
    out
}

fn link_name(l: &LinkMessage) -> String {
    l.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n.clone()),
            _ => None,
        })
        .unwrap_or_default()
}

/// The interfaces of the calling thread's namespace that have a controller
/// (a bridge's ports, a bond's members: `IFLA_MASTER`), by ifindex, from
/// one rtnetlink dump. What such a port carries for this namespace's own
/// sockets also crosses its controller, where the probe sees it; what only
/// passes from port to port is no socket's here.
pub fn controlled() -> Result<std::collections::BTreeSet<u32>> {
    use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader};
    let fail = |what: &str, e| Error::io(format!("listing interfaces ({what})"), e);
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(|e| fail("socket", e))?;
    socket.bind_auto().map_err(|e| fail("bind", e))?;
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .map_err(|e| fail("connect", e))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut req = NetlinkMessage::new(
        header,
        NetlinkPayload::from(RouteNetlinkMessage::GetLink(LinkMessage::default())),
    );
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    socket.send(&buf, 0).map_err(|e| fail("send", e))?;
    let mut out = std::collections::BTreeSet::new();
    let mut rx = vec![0u8; 64 * 1024];
    loop {
        let n = socket
            .recv(&mut &mut rx[..], 0)
            .map_err(|e| fail("recv", e))?;
        let mut data = &rx[..n];
        while !data.is_empty() {
            let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(data) else {
                return Ok(out);
            };
            let len = (msg.header.length as usize).min(data.len());
            if len == 0 {
                return Ok(out);
            }
            data = &data[len.next_multiple_of(4).min(data.len())..];
            match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                    let has = l
                        .attributes
                        .iter()
                        .any(|a| matches!(a, LinkAttribute::Controller(c) if *c != 0));
                    if has {
                        out.insert(l.header.index);
                    }
                }
                NetlinkPayload::Done(_) | NetlinkPayload::Error(_) => return Ok(out),
                _ => {}
            }
        }
    }
}

/// Every interface of the calling thread's namespace: (ifindex, name).
pub fn interfaces() -> Result<Vec<(u32, String)>> {
    let list =
        nix::net::if_::if_nameindex().map_err(|e| Error::io("listing interfaces", e.into()))?;
    Ok(list
        .iter()
        .map(|i| (i.index(), i.name().to_string_lossy().into_owned()))
        .collect())
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::NetlinkHeader;
    use netlink_packet_route::link::LinkHeader;

    use super::*;

    fn message(m: RouteNetlinkMessage) -> Vec<u8> {
        let mut msg = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(m));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    #[test]
    fn link_and_address_messages_become_events() {
        let mut link = LinkMessage::default();
        link.header = LinkHeader {
            index: 7,
            ..LinkHeader::default()
        };
        link.attributes.push(LinkAttribute::IfName("veth9".into()));
        let mut data = message(RouteNetlinkMessage::NewLink(link.clone()));
        data.extend(message(RouteNetlinkMessage::DelLink(link)));
        data.extend(message(RouteNetlinkMessage::NewAddress(Default::default())));
        assert_eq!(
            parse(&data),
            [
                LinkEvent::Link {
                    index: 7,
                    name: "veth9".into()
                },
                LinkEvent::Gone { index: 7 },
                LinkEvent::Addresses,
            ]
        );
        assert!(parse(b"garbage").is_empty());
    }
}
