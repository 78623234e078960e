//! Metrics of what the kernel decided without a segment the probe could
//! read, and of how the agent learnt it: the kernel's own reports, the
//! sockets it was asked about, ICMP errors, SYN cookies, and what was lost.

use prometheus_client::registry::Registry;

use super::render::{counter, event, gauge_family, label};
use crate::snapshot::Snapshot;

pub(super) fn register(r: &mut Registry, snap: &Snapshot) {
    gauge_family(
        r,
        "kernel_reports_enabled",
        "1 where the kernel reports its sockets' state changes to the probe (by kind: state changes, connects at tcp_connect()), 0 where it does not",
        &[
            (label(&[("kind", "state")]), i64::from(snap.kernel_reports)),
            (
                label(&[("kind", "connect")]),
                i64::from(snap.connect_reports),
            ),
        ],
    );
    counter(
        r,
        "kernel_reports",
        "Local endpoints set from the kernel's own report of a state change no segment showed (or showed yet)",
        event(snap, "kernel_reports"),
    );
    counter(
        r,
        "kernel_reports_missed",
        "State reports the kernel skipped (the report program was already running on that CPU); each sends the agent to the socket table",
        snap.kernel_reports_missed,
    );
    counter(
        r,
        "socket_lookups",
        "Sockets the agent looked up in the kernel's table because only the kernel could tell what became of them",
        snap.asked[0],
    );
    counter(
        r,
        "socket_lookup_changes",
        "Endpoints the agent set from those lookups",
        snap.asked[1],
    );
    counter(
        r,
        "questions_lost",
        "Questions about sockets lost because the agent fell behind the probe (a socket-table check covers them)",
        event(snap, "ask_lost"),
    );
    counter(
        r,
        "timer_notices_lost",
        "Notices of timed states lost because the agent fell behind the probe (its next walk files those timers)",
        event(snap, "timer_notices_lost"),
    );
    counter(
        r,
        "icmp_errors",
        "ICMP errors quoting a segment of a tracked connection",
        event(snap, "icmp_errors"),
    );
    counter(
        r,
        "icmp_ended",
        "Local endpoints an ICMP error ended as the kernel does (a dropped request, a refused connect)",
        event(snap, "icmp_ended"),
    );
    counter(
        r,
        "syn_cookies",
        "SYN-ACKs this host sent with a SYN cookie (no socket kept)",
        event(snap, "syn_cookies"),
    );
    counter(
        r,
        "slow_path_missing",
        "Segments the probe could not hand to its slow path (its program missing); 0 on a healthy host",
        event(snap, "slow_path_missing"),
    );
}
