//! Where the probe's kernel-report program finds what it reads of a socket:
//! field offsets in the running kernel's `struct sock` and `struct net`,
//! which differ between kernel builds. The agent reads them from the
//! kernel's BTF at start and sets them before loading the probe.

/// Byte offsets. All zero (the default) leaves the program doing nothing.
/// Which namespaces count is the probe's `NETNS_SLOTS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockLayout {
    /// `sock_common.skc_family` (u16).
    pub family: u32,
    /// `inet_sock.inet_sport`: the local port, network order (u16). Not
    /// `skc_num`, which the kernel zeroes when it unhashes a closing socket,
    /// before it reports the close.
    pub sport: u32,
    /// `sock_common.skc_dport`: the remote port, network order (u16).
    pub dport: u32,
    /// `sock_common.skc_rcv_saddr` (IPv4, network order).
    pub rcv_saddr: u32,
    /// `sock_common.skc_daddr` (IPv4, network order).
    pub daddr: u32,
    /// `sock_common.skc_v6_rcv_saddr` (16 bytes).
    pub v6_rcv_saddr: u32,
    /// `sock_common.skc_v6_daddr` (16 bytes).
    pub v6_daddr: u32,
    /// `sock_common.skc_net`: a `struct net *`.
    pub net: u32,
    /// `sock.sk_protocol` (u16).
    pub protocol: u32,
    /// `net.ns.inum` (u32): the namespace's inode number.
    pub net_inum: u32,
    /// `sock_common.skc_flags` (`sk_flags`, unsigned long): bit [`SOCK_DONE`]
    /// says a FIN arrived.
    pub flags: u32,
    /// `net.ipv4.tcp_death_row.tw_refcount` (u32): one more than the
    /// namespace's TIME_WAIT sockets. At a close from FIN_WAIT2 or CLOSING
    /// it tells whether the kernel had room for a timewait socket.
    pub tw_count: u32,
    /// `net.ipv4.tcp_death_row.sysctl_max_tw_buckets` (i32).
    pub tw_max: u32,
    /// Non-zero when the offsets above are set.
    pub enabled: u32,
}

const _: () = assert!(core::mem::size_of::<SockLayout>() == 56);

/// `enum sock_flags`: SOCK_DEAD is bit 0, SOCK_DONE bit 1 (stable since
/// 2.6; set when the peer's FIN is received).
pub const SOCK_DONE: u32 = 1;

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, fourteen u32, no padding.
unsafe impl aya::Pod for SockLayout {}
