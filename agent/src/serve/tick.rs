//! The daemon's once-a-second maintenance, on a blocking thread: each
//! namespace's addresses, sysctls and SNMP signals are read first, without
//! the host's lock (a netlink dump can wait on the kernel's rtnl lock for
//! seconds while another namespace is torn down; timers must not wait with
//! it), then under it: the namespaces and interfaces followed, the walk,
//! losses, signals and the socket-table checks; last, a snapshot for the
//! reader.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{
    error::Result,
    kernel::nsinfo,
    serve::reader::Reader,
    tracking::{
        host::{Host, Scope},
        pacing::cpu_cost,
        signals::KernelSignal,
        timers::Timeouts,
        tracker::Tracker,
    },
};

/// What ran this tick, and what it cost (CPU time), for the pacers.
pub struct Ran {
    pub walked: Option<Duration>,
    /// A round of checks ended: when it started, and its CPU time.
    pub checked: Option<(std::time::Instant, Duration)>,
}

/// What one namespace's files said this tick.
struct Read {
    addrs: Result<Vec<IpAddr>>,
    signals: Result<[Option<u64>; 3]>,
    timeouts: Result<Timeouts>,
    /// `net.ipv4.ip_local_port_range` (what tells a client's port from a service's).
    ports: Option<(u16, u16)>,
}

/// One tick. `round_due`: a new round of socket-table checks may start, to
/// be spread over that many ticks.
pub fn tick(host: &Mutex<Host>, reader: &Reader, walk_due: bool, round_due: Option<u32>) -> Ran {
    let namespaces = host.lock().expect("host lock").due();
    let slots: Vec<u32> = namespaces.iter().map(|(s, _, _)| *s).collect();
    let read: BTreeMap<u32, Read> = namespaces
        .into_iter()
        .map(|(slot, ns, like)| {
            let r = Read {
                addrs: ns.run(nsinfo::local_addresses),
                signals: ns.run(|| Ok(KernelSignal::read_all())),
                timeouts: Tracker::timeouts_now(&ns, &like),
                ports: ns.run(|| Ok(nsinfo::local_port_range())).ok().flatten(),
            };
            (slot, r)
        })
        .collect();
    let mut h = host.lock().expect("host lock");
    if *h.scope() == Scope::All {
        let f = h.look_for_namespaces();
        for n in &f.dropped {
            tracing::info!("{n}: gone, no longer monitored");
        }
        if f.waiting > 0 {
            tracing::debug!("{} namespaces to start", f.waiting);
        }
        h.follow_interfaces(Some(&slots));
    }
    apply_reads(&mut h, read);
    let walked = walk_due.then(|| {
        let started = std::time::Instant::now();
        let (swept, took) = cpu_cost(|| h.sweep());
        if let Err(e) = swept {
            tracing::warn!("timer sweep failed: {e}");
        }
        tracing::debug!("flow map walk cost {took:?} of CPU");
        h.upkeep.walks.ran(took, started.elapsed());
        took
    });
    report_losses(&mut h);
    // Checks owed (a signal, a lost report) and this tick's share of the
    // round, with one read of the flow maps for all of them.
    if let Some(ticks) = round_due
        && !h.round.running()
    {
        let slots: Vec<u32> = h.trackers.keys().copied().collect();
        h.round.start(slots, ticks, std::time::Instant::now());
    }
    let mut owed = h.round.take();
    for t in h.trackers.values_mut() {
        if t.take_check_due() && !owed.contains(&t.slot()) {
            owed.push(t.slot());
        }
    }
    check(&mut h, owed);
    let checked = h.round.finished();
    match h.snapshot() {
        Ok(s) => reader.publish(s),
        Err(e) => tracing::warn!("reading counts failed: {e}"),
    }
    Ran { walked, checked }
}

/// The socket-table checks of `slots`, each against its entries of one
/// read of the flow maps; their cost goes to the round.
fn check(h: &mut Host, slots: Vec<u32>) {
    if slots.is_empty() {
        return;
    }
    let mut entries = match h.probe.flow_entries() {
        Ok(all) => crate::tracking::host::by_slot(all),
        Err(e) => {
            tracing::warn!("reading the flow maps for reconciliation failed: {e}");
            return;
        }
    };
    let Host {
        probe,
        trackers,
        round,
        upkeep,
        ..
    } = h;
    for slot in slots {
        let Some(t) = trackers.get_mut(&slot) else {
            continue;
        };
        let mine = entries.remove(&slot).unwrap_or_default();
        let started = std::time::Instant::now();
        let (fixed, took) = cpu_cost(|| t.reconcile(probe, mine));
        upkeep.checks.ran(took, started.elapsed());
        match fixed {
            Ok(0) => {}
            Ok(n) => tracing::info!("{}: reconciled {n} flows with the socket table", t.identity),
            Err(e) => tracing::warn!("{}: reconciliation failed: {e}", t.identity),
        }
        tracing::debug!("{}: socket-table check cost {took:?} of CPU", t.identity);
        round.add(took);
    }
}

/// Applies what each namespace's files said: addresses, sysctls, signals.
fn apply_reads(h: &mut Host, read: BTreeMap<u32, Read>) {
    let Host {
        probe, trackers, ..
    } = h;
    for (slot, r) in read {
        let Some(t) = trackers.get_mut(&slot) else {
            continue;
        };
        if let Err(e) = r
            .addrs
            .and_then(|addrs| t.set_local_addresses(probe, &addrs))
        {
            tracing::warn!("{}: reading the addresses failed: {e}", t.identity);
        }
        if let Some(range) = r.ports {
            t.ephemeral = range;
        }
        match r.timeouts {
            Ok(to) => t.set_timeouts(to),
            Err(e) => tracing::warn!("{}: reading the TCP sysctls failed: {e}", t.identity),
        }
        match r.signals.map(|now| t.note_signals(now)) {
            Ok(grew) => {
                for (signal, n) in KernelSignal::ALL.iter().zip(grew) {
                    if n > 0 {
                        let then = if signal.checks_table() {
                            "checking the socket table"
                        } else {
                            "asking the kernel about connections with unacknowledged data"
                        };
                        tracing::info!("{}: {n} {}: {then}", t.identity, signal.meaning());
                    }
                }
            }
            Err(e) => tracing::warn!("{}: reading the TCP counters failed: {e}", t.identity),
        }
    }
}

fn report_losses(h: &mut Host) {
    let capacity = h.probe.max_flows().unwrap_or(0);
    for (who, losses) in h.losses_since_last() {
        match losses {
            Ok([0, 0, 0]) => {}
            Err(e) => tracing::warn!("{who}: reading the probe's losses failed: {e}"),
            Ok([full, lost, missed]) => {
                if full > 0 {
                    tracing::warn!(
                        "{who}: {full} new connections not tracked in the last second: flow map full (capacity {capacity} per address family; raise --max-flows) or the namespace's share used up (--max-flows-per-netns)"
                    );
                }
                if lost > 0 {
                    tracing::warn!(
                        "{who}: {lost} questions about sockets lost (the agent fell behind the probe): checking the socket table"
                    );
                }
                if missed > 0 {
                    tracing::info!(
                        "{who}: {missed} socket state reports skipped by the kernel (they came while the report program ran on that CPU): checking the socket table"
                    );
                }
            }
        }
    }
}

/// Link events came (one namespace): looks at the interfaces again, and at
/// the addresses.
pub fn follow_links(host: &Arc<Mutex<Host>>) {
    let mut h = host.lock().expect("host lock");
    h.follow_interfaces(None);
    let Host {
        probe, trackers, ..
    } = &mut *h;
    for t in trackers.values_mut() {
        let ns = t.netns();
        match ns.run(nsinfo::local_addresses) {
            Ok(addrs) => {
                if let Err(e) = t.set_local_addresses(probe, &addrs) {
                    tracing::warn!("updating the local addresses failed: {e}");
                }
            }
            Err(e) => tracing::warn!("reading the namespace's addresses failed: {e}"),
        }
    }
}

/// Starts what the last look queued, one step of the host's lock at a time
/// (see [`Host::start_waiting`]). Returns whether more wait.
pub fn start_step(host: &Mutex<Host>) -> bool {
    let mut h = host.lock().expect("host lock");
    for n in h.start_waiting(crate::tracking::host::STEP_BUDGET) {
        tracing::info!("{n}: monitored");
    }
    h.waiting() > 0
}
