//! The kernel's TCP socket table through netlink sock_diag (what `ss` reads):
//! dumps (listening sockets, which send nothing; seeding; reconciliation)
//! and exact lookups of one socket by its tuple (what the kernel decided
//! about it, asked when only the kernel can tell).

use std::{net::IpAddr, time::Duration};

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    constants::{AF_INET, AF_INET6, IPPROTO_TCP},
    inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_SOCK_DIAG};

use crate::error::{Error, Result};

/// A sock_diag socket, bound to the namespace of the thread that opened it.
pub struct SockDiag {
    socket: Socket,
    buf: Vec<u8>,
}

impl SockDiag {
    /// Opens a sock_diag socket in the calling thread's network namespace.
    pub fn open() -> Result<SockDiag> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG)
            .map_err(|e| Error::io("opening a sock_diag socket", e))?;
        socket
            .bind_auto()
            .map_err(|e| Error::io("binding a sock_diag socket", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| Error::io("connecting a sock_diag socket", e))?;
        Ok(SockDiag {
            socket,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Calls `f` for every TCP socket (IPv4 and IPv6) in one of `states`.
    pub fn for_each(&mut self, states: StateFlags, mut f: impl FnMut(&SockInfo)) -> Result<()> {
        for family in [AF_INET, AF_INET6] {
            self.dump(family, states.clone(), &mut f)?;
        }
        Ok(())
    }

    /// Counts TCP sockets per state (indexed by the kernel's state number).
    /// Listening sockets (packets never show them).
    pub fn listening(&mut self) -> Result<u64> {
        Ok(self.count(StateFlags::LISTEN)?[tcpstate_common::TcpState::Listen as usize])
    }

    pub fn count(&mut self, states: StateFlags) -> Result<[u64; 16]> {
        let mut counts = [0u64; 16];
        self.for_each(states, |h| counts[h.state as usize & 0xf] += 1)?;
        Ok(counts)
    }

    /// The socket whose local end is `local`:`local_port` and remote end
    /// `remote`:`remote_port`, or `None` when the kernel has none. One
    /// request, one answer: the kernel looks the tuple up in its hash of
    /// connections (TIME_WAIT and request sockets included).
    pub fn lookup(
        &mut self,
        local: IpAddr,
        local_port: u16,
        remote: IpAddr,
        remote_port: u16,
    ) -> Result<Option<SockInfo>> {
        let family = if local.is_ipv4() { AF_INET } else { AF_INET6 };
        let mut socket_id = if family == AF_INET {
            SocketId::new_v4()
        } else {
            SocketId::new_v6()
        };
        socket_id.source_address = local;
        socket_id.source_port = local_port;
        socket_id.destination_address = remote;
        socket_id.destination_port = remote_port;
        // INET_DIAG_NOCOOKIE: any socket with this tuple.
        socket_id.cookie = [0xff; 8];
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST;
        let request = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id,
        });
        self.send(header, request)?;
        let size = self
            .socket
            .recv(&mut &mut self.buf[..], 0)
            .map_err(|e| Error::io("reading sock_diag", e))?;
        let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&self.buf[..size])
            .map_err(|e| Error::io("decoding sock_diag", std::io::Error::other(e.to_string())))?;
        let len = (msg.header.length as usize).min(size);
        match msg.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(resp)) => {
                let info = SockInfo::new(&resp.header, &self.buf[..len]);
                // With no connection on the tuple the kernel answers with
                // a listener on the local port: that is no answer here.
                let same = info.remote_port == remote_port
                    && info.local_port == local_port
                    && unmapped(info.remote) == unmapped(remote);
                Ok(same.then_some(info))
            }
            NetlinkPayload::Error(e) if e.code.map(|c| c.get()) == Some(-libc::ENOENT) => Ok(None),
            NetlinkPayload::Error(e) => {
                let io = e.code.map_or_else(
                    || std::io::Error::other("unknown"),
                    |c| std::io::Error::from_raw_os_error(-c.get()),
                );
                Err(Error::io("sock_diag lookup", io))
            }
            _ => Ok(None),
        }
    }

    fn send(&mut self, header: NetlinkHeader, request: SockDiagMessage) -> Result<()> {
        let mut packet = NetlinkMessage::new(header, request.into());
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket
            .send(&out, 0)
            .map_err(|e| Error::io("sending a sock_diag request", e))?;
        Ok(())
    }

    fn dump(
        &mut self,
        family: u8,
        states: StateFlags,
        f: &mut impl FnMut(&SockInfo),
    ) -> Result<()> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let request = SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states,
            socket_id: if family == AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        });
        self.send(header, request)?;
        loop {
            let size = self
                .socket
                .recv(&mut &mut self.buf[..], 0)
                .map_err(|e| Error::io("reading sock_diag", e))?;
            let mut offset = 0;
            while offset < size {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&self.buf[offset..size])
                    .map_err(|e| {
                    Error::io("decoding sock_diag", std::io::Error::other(e.to_string()))
                })?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(resp)) => f(
                        &SockInfo::new(&resp.header, &self.buf[offset..offset + len]),
                    ),
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        let io = e.code.map_or_else(
                            || std::io::Error::other("unknown"),
                            |c| std::io::Error::from_raw_os_error(-c.get()),
                        );
                        return Err(Error::io("sock_diag dump", io));
                    }
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                offset += len;
            }
        }
    }
}

/// What the agent reads of one socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SockInfo {
    /// The kernel's state number (`TcpState` numbering).
    pub state: u8,
    pub local: IpAddr,
    pub local_port: u16,
    pub remote: IpAddr,
    pub remote_port: u16,
    /// For TIME_WAIT and orphaned FIN_WAIT2 sockets: time left on the timer.
    pub timewait_left: Option<Duration>,
    /// The socket's pending timer (`idiag_timer`: 0 none, 1 retransmit
    /// (also a request socket's SYN-ACK timer), 2 keepalive, 3 TIME_WAIT,
    /// 4 zero-window probe) and the time until it fires.
    pub timer: u8,
    pub expires: Duration,
    /// `idiag_rqueue`/`idiag_wqueue`, what `ss` shows as Recv-Q/Send-Q: for
    /// a listener the accept queue's length and its backlog.
    pub recv_queue: u32,
    pub send_queue: u32,
    /// The socket's inode (0 for TIME_WAIT and request sockets, which no
    /// process holds): how `ss -p` finds its owner in /proc/PID/fd.
    pub inode: u32,
}

/// An address with an IPv4-mapped IPv6 address as its IPv4 one.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Offsets in a sock_diag message: netlink header (16 bytes), then
/// `struct inet_diag_msg` with `idiag_timer` at 2 and `idiag_expires` at 52.
const TIMER_AT: usize = 16 + 2;
const EXPIRES_AT: usize = 16 + 52;
/// `idiag_timer` of a socket in the time-wait table.
const TIMER_TIMEWAIT: u8 = 3;

impl SockInfo {
    fn new(h: &InetResponseHeader, raw: &[u8]) -> SockInfo {
        // The crate drops the time left on TIME_WAIT timers; read it raw.
        let (timer, expires) = if raw.len() >= EXPIRES_AT + 4 {
            let ms = u32::from_ne_bytes(raw[EXPIRES_AT..EXPIRES_AT + 4].try_into().unwrap());
            (raw[TIMER_AT], Duration::from_millis(ms.into()))
        } else {
            (0, Duration::ZERO)
        };
        let timewait_left = (timer == TIMER_TIMEWAIT).then_some(expires);
        SockInfo {
            state: h.state,
            local: h.socket_id.source_address,
            local_port: h.socket_id.source_port,
            remote: h.socket_id.destination_address,
            remote_port: h.socket_id.destination_port,
            timewait_left,
            timer,
            expires,
            recv_queue: h.recv_queue,
            send_queue: h.send_queue,
            inode: h.inode,
        }
    }

    /// A socket of the TIME_WAIT table (a TIME_WAIT, or an orphaned
    /// FIN_WAIT2 the kernel already turned into one).
    pub fn is_timewait(&self) -> bool {
        self.timer == TIMER_TIMEWAIT
    }
}
