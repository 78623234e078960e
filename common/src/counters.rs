//! The probe's per-CPU counters: the per-state gauge of local endpoints and
//! the event counts (packets, parse failures, map full, ...).

use crate::state::STATE_SLOTS;

/// Unusual and ordinary events the probe counts. Every one is exported.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Frames received: seen by the ingress program (TC ingress, or XDP).
    PacketsIn = 0,
    /// Frames sent by the host: seen by the TC egress program.
    PacketsOut = 1,
    /// TCP segments parsed (derived by [`Counters::derive`]: packets minus the
    /// frames counted as something else).
    TcpSegments = 2,
    /// Frames that carry no TCP (other ethertypes or IP protocols).
    NotTcp = 3,
    /// IP fragments other than the first (no TCP header to read).
    Fragments = 4,
    /// Frames too short or malformed to parse (truncated, bad IHL or data offset).
    ParseErrors = 5,
    /// A new flow could not be stored because the flow map is full.
    MapFull = 6,
    /// Flows created (including an entry reused by a new connection on its
    /// tuple: a dead one, or one in TIME_WAIT).
    FlowsOpened = 7,
    /// Flows that ended: no local socket left, or replaced by a new
    /// connection on the same tuple.
    FlowsClosed = 8,
    /// RSTs ignored as blind or stale.
    RstIgnored = 9,
    /// Updates abandoned after repeated compare-and-swap conflicts.
    CasConflicts = 10,
    /// Segments of a flow the agent was deleting at that moment.
    ReapSkipped = 11,
    /// IPv6 packets whose extension-header chain is longer than the probe follows.
    Ipv6ExtTooDeep = 12,
    /// Local endpoints that left ESTABLISHED or CLOSE_WAIT for closed: reset,
    /// or given up by their kernel (what the kernel counts as EstabResets).
    Resets = 13,
    /// Connection attempts (SYN without ACK, retransmissions included) to an
    /// endpoint of this host.
    SynsReceived = 14,
    /// Local endpoints that left SYN_SENT or SYN_RECV for closed: refused,
    /// reset or timed out before the handshake completed.
    HandshakesFailed = 15,
    /// ICMP errors that quote a segment of a tracked connection.
    IcmpErrors = 16,
    /// Local endpoints an ICMP error ended (a refused or unreachable connect,
    /// a dropped request), as the kernel does on receiving it.
    IcmpEnded = 17,
    /// Local endpoints set from the kernel's own report of a state change
    /// (a change no segment showed, or showed yet).
    KernelReports = 18,
    /// Sockets the agent was asked to look up (a close where a TIME_WAIT
    /// socket may take over).
    Asked = 19,
    /// Questions lost because the agent's ring buffer was full (a socket-
    /// table check covers them).
    AskLost = 20,
    /// SYN-ACKs sent with a SYN cookie: the kernel keeps no socket for them.
    SynCookies = 21,
    /// Segments the probe could not hand to its slow path (its program
    /// missing): they changed nothing.
    SlowPathMissing = 22,
    /// New connections not tracked because their namespace holds its share
    /// of the flow maps (`--max-flows-per-netns`): what a flood in one
    /// namespace costs it, and not the others.
    NetnsShareFull = 23,
    /// Local endpoints closed after both FINs (or their FIN_WAIT2 timer):
    /// an orderly close (Zeek's SF). See [`crate::outcome`].
    ClosedNormal = 24,
    /// Local connects answered with an RST (Zeek's REJ).
    ClosedRefused = 25,
    /// Local endpoints whose handshake never completed: no answer within
    /// the kernel's retries, an ICMP error, or given up (Zeek's S0).
    ClosedHandshakeTimeout = 26,
    /// Local endpoints this host reset or aborted (an RST it sent, retries
    /// exhausted).
    ClosedResetLocal = 27,
    /// Local endpoints the peer reset.
    ClosedResetRemote = 28,
    /// Additions to the service table lost because it was full (the
    /// namespace's totals still have them).
    ServicesFull = 29,
    /// Notices of timed states lost because their ring buffer was full (the
    /// agent's next walk files those timers).
    NoticesLost = 30,
}

pub const EVENT_SLOTS: usize = 32;

impl Event {
    pub const ALL: [Event; 31] = [
        Event::PacketsIn,
        Event::PacketsOut,
        Event::TcpSegments,
        Event::NotTcp,
        Event::Fragments,
        Event::ParseErrors,
        Event::MapFull,
        Event::FlowsOpened,
        Event::FlowsClosed,
        Event::RstIgnored,
        Event::CasConflicts,
        Event::ReapSkipped,
        Event::Ipv6ExtTooDeep,
        Event::Resets,
        Event::SynsReceived,
        Event::HandshakesFailed,
        Event::IcmpErrors,
        Event::IcmpEnded,
        Event::KernelReports,
        Event::Asked,
        Event::AskLost,
        Event::SynCookies,
        Event::SlowPathMissing,
        Event::NetnsShareFull,
        Event::ClosedNormal,
        Event::ClosedRefused,
        Event::ClosedHandshakeTimeout,
        Event::ClosedResetLocal,
        Event::ClosedResetRemote,
        Event::ServicesFull,
        Event::NoticesLost,
    ];

    /// The outcomes of closed local endpoints, and their metric labels.
    pub const OUTCOMES: [(Event, &'static str); 5] = [
        (Event::ClosedNormal, "normal"),
        (Event::ClosedRefused, "refused"),
        (Event::ClosedHandshakeTimeout, "handshake_timeout"),
        (Event::ClosedResetLocal, "reset_local"),
        (Event::ClosedResetRemote, "reset_remote"),
    ];

    /// snake_case name used in JSON and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Event::PacketsIn => "packets_in",
            Event::PacketsOut => "packets_out",
            Event::TcpSegments => "tcp_segments",
            Event::NotTcp => "not_tcp",
            Event::Fragments => "fragments",
            Event::ParseErrors => "parse_errors",
            Event::MapFull => "map_full",
            Event::FlowsOpened => "flows_opened",
            Event::FlowsClosed => "flows_closed",
            Event::RstIgnored => "rst_ignored",
            Event::CasConflicts => "cas_conflicts",
            Event::ReapSkipped => "reap_skipped",
            Event::Ipv6ExtTooDeep => "ipv6_ext_too_deep",
            Event::Resets => "resets",
            Event::SynsReceived => "syns_received",
            Event::HandshakesFailed => "handshakes_failed",
            Event::IcmpErrors => "icmp_errors",
            Event::IcmpEnded => "icmp_ended",
            Event::KernelReports => "kernel_reports",
            Event::Asked => "asked",
            Event::AskLost => "ask_lost",
            Event::SynCookies => "syn_cookies",
            Event::SlowPathMissing => "slow_path_missing",
            Event::NetnsShareFull => "netns_share_full",
            Event::ClosedNormal => "closed_normal",
            Event::ClosedRefused => "closed_refused",
            Event::ClosedHandshakeTimeout => "closed_handshake_timeout",
            Event::ClosedResetLocal => "closed_reset_local",
            Event::ClosedResetRemote => "closed_reset_remote",
            Event::ServicesFull => "services_full",
            Event::NoticesLost => "timer_notices_lost",
        }
    }
}

/// One CPU's counters (a single-slot per-CPU array). The per-state values are
/// signed: an endpoint may enter a state on one CPU and leave it on another,
/// so only the sum over CPUs is meaningful.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counters {
    pub states: [i64; STATE_SLOTS],
    pub events: [u64; EVENT_SLOTS],
}

const _: () = assert!(core::mem::size_of::<Counters>() == 384);

impl Default for Counters {
    fn default() -> Self {
        Counters {
            states: [0; STATE_SLOTS],
            events: [0; EVENT_SLOTS],
        }
    }
}

impl Counters {
    /// Fills in the counts the probe leaves to userspace (summed over CPUs first).
    pub fn derive(&mut self) {
        let e = &self.events;
        let seen = e[Event::PacketsIn as usize].wrapping_add(e[Event::PacketsOut as usize]);
        let other = [
            Event::NotTcp,
            Event::Fragments,
            Event::ParseErrors,
            Event::Ipv6ExtTooDeep,
        ]
        .iter()
        .fold(0u64, |n, k| n.wrapping_add(e[*k as usize]));
        self.events[Event::TcpSegments as usize] = seen.wrapping_sub(other);
    }

    /// Adds another CPU's counters into this one.
    pub fn accumulate(&mut self, other: &Counters) {
        for (a, b) in self.states.iter_mut().zip(other.states.iter()) {
            *a += *b;
        }
        for (a, b) in self.events.iter_mut().zip(other.events.iter()) {
            *a = a.wrapping_add(*b);
        }
    }
}

/// Where a namespace's counters are in the probe's per-CPU `COUNTS` array:
/// two slots per namespace slot and CPU, [`CpuSlot::DATA_PATH`] for the
/// packet programs (which never interrupt one another on a CPU) and
/// [`CpuSlot::PROCESS`] for the programs that run in process context (the
/// agent's commands, the kernel's reports), which a packet may interrupt:
/// those add atomically.
pub struct CpuSlot;

impl CpuSlot {
    pub const DATA_PATH: u32 = 0;
    pub const PROCESS: u32 = 1;
    /// Slots per namespace.
    pub const PER_NETNS: u32 = 2;

    /// The index of namespace slot `netns`'s counters of `kind`.
    #[inline(always)]
    pub const fn index(netns: u32, kind: u32) -> u32 {
        netns * Self::PER_NETNS + kind
    }
}

/// The per-CPU scratch space for the segment being parsed (kept off the
/// 512-byte BPF stack); meaningless to userspace.
pub type Scratch = [u32; 48];

#[cfg(feature = "user")]
// SAFETY: `#[repr(C)]`, no padding (sizes asserted above).
unsafe impl aya::Pod for Counters {}
