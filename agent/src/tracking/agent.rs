//! One monitored namespace: the probe attached there, its socket table, the
//! kernel's timers and signals, and what reconciliation has learnt. The
//! daemon (`serve::daemon`) drives it; the reader answers counts without it.

use std::sync::Arc;

use netlink_packet_sock_diag::inet::StateFlags;
use tcpstate_common::TcpState;

use crate::{
    error::{Error, Result},
    kernel::{
        netns::{self, NetNs},
        probe::{Probe, ProbeOptions},
        sockdiag::SockDiag,
    },
    snapshot::{PortFilter, Snapshot, StateCounts, by_state, live_counts},
    tracking::{
        breakdown::{Breakdown, local_ends},
        reconcile::Reconciler,
        seed,
        signals::KernelSignal,
        timers::{Timeouts, Timers},
    },
};

/// What to monitor and how.
#[derive(Clone, Debug)]
pub struct Config {
    pub netns: Option<String>,
    /// Interfaces to monitor; empty means every interface that is up.
    pub interfaces: Vec<String>,
    pub probe: ProbeOptions,
    /// Ports and peers listed by name in snapshots and metrics; the rest is
    /// summed as "other".
    pub top_k: usize,
}

pub struct Agent {
    netns: Option<String>,
    ns: Arc<NetNs>,
    probe: Probe,
    diag: SockDiag,
    timeouts: Timeouts,
    expired: u64,
    reconciler: Reconciler,
    timers: Timers,
    /// The kernel's TCPTimeWaitOverflow at the last look.
    /// Each [`KernelSignal`]'s counter at the last look.
    signals: [Option<u64>; 2],
    /// Growth of TCPTimeWaitOverflow since the agent started.
    tw_overflow_seen: u64,
    /// Socket-table checks owed after such growth.
    checks_due: u8,
    /// The probe's map_full count at the last look.
    map_full_seen: u64,
    /// Connections by port and by peer, as of the last walk.
    breakdown: Breakdown,
    /// Entries in the IPv4 and IPv6 flow maps at the last walk.
    flows_in_map: [u64; 2],
    top_k: usize,
    started: std::time::Instant,
}

impl Agent {
    /// Loads the probe and attaches it in the configured namespace.
    pub fn start(cfg: &Config) -> Result<Agent> {
        let mut ns = match &cfg.netns {
            Some(name) => NetNs::named(name)?,
            None => NetNs::current(),
        };
        let ns_label = ns.to_string();
        let (probe, diag, timeouts) = ns.run(|| {
            let ifaces = if cfg.interfaces.is_empty() {
                let up = netns::interfaces_up()?;
                if up.is_empty() {
                    return Err(Error::NoInterfaces(ns_label.clone()));
                }
                up
            } else {
                for iface in &cfg.interfaces {
                    if !netns::interface_exists(iface) {
                        return Err(Error::NoSuchInterface {
                            iface: iface.clone(),
                            netns: ns_label.clone(),
                        });
                    }
                }
                cfg.interfaces.clone()
            };
            let mut probe = Probe::load(&cfg.probe)?;
            // Before attaching: the first segments already need to know
            // which endpoints are local.
            probe.set_local_addresses(&netns::local_addresses()?)?;
            for iface in &ifaces {
                let loopback = nix::net::if_::if_nametoindex(iface.as_str()).ok()
                    == Some(crate::kernel::probe::LOOPBACK_IFINDEX);
                probe.attach(iface, cfg.probe.ingress, loopback)?;
            }
            let mut diag = SockDiag::open()?;
            let timeouts = Timeouts::from_sysctls();
            // After attaching: from here on packets are seen, so every
            // connection is either seeded now or tracked from its packets.
            let seeded = seed::seed(&probe, &mut diag, &timeouts)?;
            tracing::info!(
                "seeded {} existing connections from the socket table ({} already tracked, {} refused: map full)",
                seeded.seeded,
                seeded.already,
                seeded.map_full
            );
            Ok((probe, diag, timeouts))
        })?;
        // The periodic work in the namespace runs on a thread that stays
        // there: it needs no privilege once they are dropped.
        ns.keep_a_thread_inside()?;
        Ok(Agent {
            netns: cfg.netns.clone(),
            ns: Arc::new(ns),
            probe,
            diag,
            timeouts,
            expired: 0,
            reconciler: Reconciler::default(),
            timers: Timers::default(),
            signals: [None; 2],
            tw_overflow_seen: 0,
            checks_due: 0,
            map_full_seen: 0,
            breakdown: Breakdown::default(),
            flows_in_map: [0; 2],
            top_k: cfg.top_k,
            started: std::time::Instant::now(),
        })
    }

    /// A reader of the counts that never waits for this agent's lock.
    pub fn reader(&mut self) -> Result<crate::serve::reader::Reader> {
        let diag = self.ns.run_kept(SockDiag::open)?;
        let first = self.snapshot()?;
        crate::serve::reader::Reader::new(self.probe.counters_map(), diag, first, self.started)
    }

    /// Drops every capability, on this thread and on the namespace thread:
    /// from here on the agent only uses descriptors it already holds.
    pub fn drop_privileges(&self) -> Result<()> {
        self.ns.run_kept(crate::kernel::privileges::drop_all)?;
        crate::kernel::privileges::drop_all()
    }

    /// Takes a reading of the [`KernelSignal`]s. When one grows, the
    /// socket table is checked at once and twice more after it stops (the
    /// two-strike rule needs two checks of a settled table), whether or not
    /// periodic reconciliation is on. Returns each signal's growth.
    pub fn note_signals(&mut self, now: [Option<u64>; 2]) -> [u64; 2] {
        let mut grew = [0; 2];
        for (i, (last, now)) in self.signals.iter_mut().zip(now).enumerate() {
            if let Some(now) = now {
                grew[i] = last.map_or(0, |before| now.saturating_sub(before));
                *last = Some(now);
            }
        }
        if grew.iter().any(|g| *g > 0) {
            self.checks_due = 3;
        }
        self.tw_overflow_seen += grew[KernelSignal::TimeWaitOverflow as usize];
        grew
    }

    /// The namespace handle, for reads that must not hold the agent's lock
    /// (a netlink dump can wait on the kernel's rtnl lock for seconds while
    /// another namespace is torn down; timers must not wait with it).
    pub fn netns(&self) -> Arc<NetNs> {
        Arc::clone(&self.ns)
    }

    /// Makes `addrs` the addresses the probe takes for local.
    pub fn set_local_addresses(&mut self, addrs: &[std::net::IpAddr]) -> Result<()> {
        self.probe.set_local_addresses(addrs)
    }

    /// New connections the full flow map refused since the last call.
    pub fn map_full_since_last(&mut self) -> Result<u64> {
        let now = self.probe.counters()?.events[tcpstate_common::Event::MapFull as usize];
        let grew = now.saturating_sub(self.map_full_seen);
        self.map_full_seen = now;
        Ok(grew)
    }

    /// Whether a socket-table check is owed now (and takes it).
    pub fn take_check_due(&mut self) -> bool {
        let due = self.checks_due > 0;
        self.checks_due = self.checks_due.saturating_sub(1);
        due
    }

    /// The counts now: states from the probe's counters, LISTEN from the
    /// socket table (listening sockets send no packets).
    pub fn snapshot(&mut self) -> Result<Snapshot> {
        let counters = self.probe.counters()?;
        let states = live_counts(&counters, self.diag.listening()?);
        let mut snap = Snapshot::new(
            self.netns.clone(),
            self.probe.attached().to_vec(),
            states,
            &counters,
            self.probe.max_flows()?,
            self.expired,
        );
        snap.drift = by_state(&self.reconciler.drift);
        snap.corrections = by_state(&self.reconciler.corrections);
        snap.time_wait_overflow = self.tw_overflow_seen;
        snap.ports = self.breakdown.top_ports(self.top_k);
        snap.peers = self.breakdown.top_peers(self.top_k);
        snap.flows_in_map = self.flows_in_map;
        snap.uptime_ms = self.started.elapsed().as_millis() as u64;
        Ok(snap)
    }

    /// Compares with the socket table and fixes confirmed mismatches.
    pub fn reconcile(&mut self) -> Result<usize> {
        self.reconciler.check(&self.probe, &mut self.diag)
    }

    /// A snapshot with the socket table's own counts beside ours.
    pub fn verify(&mut self) -> Result<Snapshot> {
        let mut snap = self.snapshot()?;
        let table = self.diag.count(StateFlags::all())?;
        let mut kernel = StateCounts::default();
        for s in TcpState::REPORTED {
            kernel.set(s, table[s as usize]);
        }
        snap.kernel = Some(kernel.json());
        // LISTEN is not in the flow map: the snapshot took it from the table.
        let mut entries = StateCounts::default();
        entries.set(
            TcpState::Listen,
            snap.state_counts().map_or(0, |c| c.get(TcpState::Listen)),
        );
        for (_, e) in self.probe.flow_entries()? {
            let w = tcpstate_common::Word(e.word);
            for side in [tcpstate_common::Side::A, tcpstate_common::Side::B] {
                let s = w.counted(side);
                if s != TcpState::None {
                    entries.set(s, entries.get(s) + 1);
                }
            }
        }
        snap.entries = Some(entries.json());
        Ok(snap)
    }

    /// Once a second: reads the flow maps once to apply the kernel's timers
    /// and to break the connections down by port and by peer.
    pub fn sweep(&mut self) -> Result<()> {
        let entries = self.probe.flow_entries()?;
        let mut b = Breakdown::default();
        for (flow, e) in &entries {
            for end in local_ends(flow, tcpstate_common::Word(e.word)) {
                b.add(&end);
            }
        }
        self.diag
            .for_each(StateFlags::LISTEN, |s| b.add_listener(s.local_port))?;
        self.breakdown = b;
        let v4 = entries
            .iter()
            .filter(|(f, _)| matches!(f, crate::kernel::probe::FlowRef::V4(_)))
            .count() as u64;
        self.flows_in_map = [v4, entries.len() as u64 - v4];
        let stats = self.timers.file(&entries, &self.probe, &self.timeouts)?;
        self.expired += stats.expired;
        Ok(())
    }

    /// The counts of the connections `filter` selects, read now from the
    /// flow maps (and LISTEN from the socket table): O(connections).
    pub fn count_filtered(&mut self, filter: &PortFilter) -> Result<StateCounts> {
        let mut c = StateCounts::default();
        for (flow, e) in self.probe.flow_entries()? {
            for end in local_ends(&flow, tcpstate_common::Word(e.word)) {
                if filter.matches(end.local_port, end.remote_port) {
                    c.set(end.state, c.get(end.state) + 1);
                }
            }
        }
        let mut listening = 0;
        self.diag.for_each(StateFlags::LISTEN, |s| {
            // A listener has no remote port: only a local or any-side filter picks it.
            if filter.matches(s.local_port, 0) && filter.port != Some(0) {
                listening += 1;
            }
        })?;
        c.set(TcpState::Listen, listening);
        Ok(c)
    }

    /// Fires the timers filed by the last walk that are due now.
    pub fn fire_timers(&mut self) -> Result<()> {
        let stats = self.timers.fire(&self.probe, &self.timeouts)?;
        self.expired += stats.expired;
        Ok(())
    }

    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    pub fn probe_mut(&mut self) -> &mut Probe {
        &mut self.probe
    }
}
