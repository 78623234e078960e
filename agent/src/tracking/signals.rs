//! Kernel decisions that leave no packet of their own, read from the
//! namespace's SNMP counters.

use crate::kernel::nsinfo;

/// Kernel decisions that leave no packet of their own: the probe sees a
/// close or a SYN like any other, the socket table differs.
#[derive(Clone, Copy, Debug)]
pub enum KernelSignal {
    /// `net.ipv4.tcp_max_tw_buckets` reached: closed without TIME_WAIT.
    TimeWaitOverflow = 0,
    /// SYNs answered with a cookie or dropped (a full listen queue, a
    /// flood): no half-open socket, where the probe took one.
    SynNotKept = 1,
    /// Connections the kernel gave up on (retransmissions, TCP_USER_TIMEOUT,
    /// keepalive): it reports each close, and a keepalive's sends an RST,
    /// but should a report not take effect, nothing else would show it.
    AbortOnTimeout = 2,
}

impl KernelSignal {
    pub const ALL: [KernelSignal; 3] = [
        KernelSignal::TimeWaitOverflow,
        KernelSignal::SynNotKept,
        KernelSignal::AbortOnTimeout,
    ];

    /// Whether its growth calls for a check of the whole socket table (else
    /// for a look at the connections it may be about, `Why::TimedOut`:
    /// timeouts are common on a busy host, and a whole check costs seconds
    /// at a million connections).
    pub fn checks_table(self) -> bool {
        !matches!(self, KernelSignal::AbortOnTimeout)
    }

    /// Its TcpExt counters (summed).
    fn counters(self) -> &'static [&'static str] {
        match self {
            KernelSignal::TimeWaitOverflow => &["TCPTimeWaitOverflow"],
            KernelSignal::SynNotKept => &["SyncookiesSent", "ListenDrops"],
            KernelSignal::AbortOnTimeout => &["TCPAbortOnTimeout"],
        }
    }

    pub fn meaning(self) -> &'static str {
        match self {
            KernelSignal::TimeWaitOverflow => {
                "connections closed without TIME_WAIT (net.ipv4.tcp_max_tw_buckets reached)"
            }
            KernelSignal::SynNotKept => {
                "SYNs answered with cookies or dropped (a listener's queue is full)"
            }
            KernelSignal::AbortOnTimeout => "connections the kernel gave up on",
        }
    }

    /// Every signal's value in the calling thread's namespace (None: unreadable).
    pub fn read_all() -> [Option<u64>; 3] {
        KernelSignal::ALL.map(|s| {
            s.counters()
                .iter()
                .map(|c| nsinfo::snmp_counter("TcpExt", c))
                .sum()
        })
    }
}
