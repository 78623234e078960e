//! With `run --observe`: the connections passing through, under names of
//! their own (`tcpstate_observed_*`), so that no sum over
//! `tcpstate_connections` counts them, and no dashboard of the host's own
//! sockets changes when observing is turned on.

use prometheus_client::registry::Registry;
use tcpstate_common::TcpState;

use super::render::{Labels, counter, gauge_family, label, state_label};
use crate::snapshot::Snapshot;

pub(super) fn register(r: &mut Registry, snap: &Snapshot) {
    let Some(o) = &snap.observed else {
        return;
    };
    let states = o.state_counts();
    let by_state: Vec<(Labels, i64)> = TcpState::REPORTED
        .iter()
        .map(|s| (label(&[("state", &state_label(*s))]), states.get(*s) as i64))
        .collect();
    gauge_family(
        r,
        "observed_connections",
        "Endpoints of connections passing through this host (run --observe), by state: both ends of each, as their two hosts' ss -tan together would count them; not in tcpstate_connections",
        &by_state,
    );
    let event = |name: &str| o.events.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
    counter(
        r,
        "observed_connections_opened",
        "Connections passing through that were opened (flows created)",
        event("flows_opened"),
    );
    counter(
        r,
        "observed_timer_expirations",
        "Endpoints of connections passing through closed on Linux's default timers (TIME_WAIT, FIN_WAIT2, SYN_SENT, SYN_RECV)",
        o.expired,
    );
    counter(
        r,
        "observed_map_full",
        "Connections passing through not tracked because the flow map was full",
        event("map_full") + event("netns_share_full"),
    );
    counter(
        r,
        "observed_rst_ignored",
        "RSTs of connections passing through ignored as blind or stale",
        event("rst_ignored"),
    );
    counter(
        r,
        "observed_cas_conflicts",
        "Updates of connections passing through abandoned after repeated compare-and-swap conflicts",
        event("cas_conflicts"),
    );
    gauge_family(
        r,
        "observed_flow_map_entries",
        "Entries of connections passing through in the flow map, by address family",
        &[
            (label(&[("family", "ipv4")]), o.flows_in_map[0] as i64),
            (label(&[("family", "ipv6")]), o.flows_in_map[1] as i64),
        ],
    );
}
