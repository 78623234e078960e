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
}

impl KernelSignal {
    pub const ALL: [KernelSignal; 2] = [KernelSignal::TimeWaitOverflow, KernelSignal::SynNotKept];

    /// Its TcpExt counters (summed).
    fn counters(self) -> &'static [&'static str] {
        match self {
            KernelSignal::TimeWaitOverflow => &["TCPTimeWaitOverflow"],
            KernelSignal::SynNotKept => &["SyncookiesSent", "ListenDrops"],
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
        }
    }

    /// Every signal's value in the calling thread's namespace (None: unreadable).
    pub fn read_all() -> [Option<u64>; 2] {
        KernelSignal::ALL.map(|s| {
            s.counters()
                .iter()
                .map(|c| nsinfo::snmp_counter("TcpExt", c))
                .sum()
        })
    }
}
