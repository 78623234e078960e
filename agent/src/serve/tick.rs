//! The daemon's once-a-second maintenance of the namespace, on a blocking
//! thread: addresses, sysctls and the kernel's SNMP signals are read first,
//! without the agent's lock (a netlink dump can wait on the kernel's rtnl
//! lock for seconds while another namespace is torn down; timers must not
//! wait with it), then the walk, losses, signals and the socket-table check
//! under it; last, a snapshot for the reader.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    kernel::nsinfo,
    serve::reader::Reader,
    tracking::{agent::Agent, pacing::cpu_cost, signals::KernelSignal},
};

/// What ran this tick, and what it cost (CPU time), for the pacers.
pub struct Ran {
    pub walked: Option<Duration>,
    pub checked: Option<Duration>,
}

pub fn tick(agent: &Mutex<Agent>, reader: &Reader, walk_due: bool, reconcile_due: bool) -> Ran {
    let (ns, like) = {
        let a = agent.lock().expect("agent lock");
        (a.netns(), a.timeouts().clone())
    };
    let addrs = ns.run(nsinfo::local_addresses);
    let signals = ns.run(|| Ok(KernelSignal::read_all()));
    let timeouts = Agent::timeouts_now(&ns, &like);
    let mut a = agent.lock().expect("agent lock");
    if let Err(e) = addrs.and_then(|addrs| a.set_local_addresses(&addrs)) {
        tracing::warn!("reading the namespace's addresses failed: {e}");
    }
    match timeouts {
        Ok(t) => a.set_timeouts(t),
        Err(e) => tracing::warn!("reading the namespace's TCP sysctls failed: {e}"),
    }
    let walked = walk_due.then(|| {
        let (swept, took) = cpu_cost(|| a.sweep());
        if let Err(e) = swept {
            tracing::warn!("timer sweep failed: {e}");
        }
        tracing::debug!("flow map walk cost {took:?} of CPU");
        took
    });
    match a.losses_since_last() {
        Ok([0, 0, 0]) => {}
        Err(e) => tracing::warn!("reading the probe's losses failed: {e}"),
        Ok([full, lost, missed]) => {
            if full > 0 {
                tracing::warn!(
                    "flow map full: {full} new connections not tracked in the last second (capacity {} per address family; raise --max-flows)",
                    a.probe().max_flows().unwrap_or(0)
                );
            }
            if lost > 0 {
                tracing::warn!(
                    "{lost} questions about sockets lost (the agent fell behind the probe): checking the socket table"
                );
            }
            if missed > 0 {
                tracing::info!(
                    "{missed} socket state reports skipped by the kernel (they came while the report program ran on that CPU): checking the socket table"
                );
            }
        }
    }
    match signals.map(|now| a.note_signals(now)) {
        Ok(grew) => {
            for (signal, n) in KernelSignal::ALL.iter().zip(grew) {
                if n > 0 {
                    tracing::info!("{n} {}: checking the socket table", signal.meaning());
                }
            }
        }
        Err(e) => tracing::warn!("reading the kernel's TCP counters failed: {e}"),
    }
    let checked = (a.take_check_due() || reconcile_due).then(|| {
        let (fixed, took) = cpu_cost(|| a.reconcile());
        match fixed {
            Ok(0) => {}
            Ok(n) => tracing::info!("reconciled {n} flows with the socket table"),
            Err(e) => tracing::warn!("reconciliation failed: {e}"),
        }
        tracing::debug!("socket-table check cost {took:?} of CPU");
        took
    });
    match a.snapshot() {
        Ok(s) => reader.publish(s),
        Err(e) => tracing::warn!("reading counts failed: {e}"),
    }
    Ran { walked, checked }
}

/// Link events came: looks at the interfaces again, and at the addresses.
pub fn follow_links(agent: &Arc<Mutex<Agent>>) {
    let mut a = agent.lock().expect("agent lock");
    match a.follow_interfaces() {
        Ok(changes) => {
            for name in &changes.attached {
                tracing::info!("attached to {name}, which appeared");
            }
            for name in &changes.detached {
                tracing::info!("detached from {name}, which went");
            }
            for e in &changes.failed {
                tracing::warn!("{e}");
            }
        }
        Err(e) => tracing::warn!("following interfaces failed: {e}"),
    }
    let ns = a.netns();
    match ns.run(nsinfo::local_addresses) {
        Ok(addrs) => {
            if let Err(e) = a.set_local_addresses(&addrs) {
                tracing::warn!("updating the local addresses failed: {e}");
            }
        }
        Err(e) => tracing::warn!("reading the namespace's addresses failed: {e}"),
    }
}
