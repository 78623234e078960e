//! One monitored namespace: the probe attached there, its socket table, the
//! kernel's timers and signals, and what reconciliation has learnt. The
//! daemon (`serve::daemon`) drives it; the reader answers counts without it.

use std::{sync::Arc, time::Duration};

use netlink_packet_sock_diag::inet::StateFlags;
use tcpstate_common::{Ask, Event, FlowEntry, Side, TcpState};

use crate::{
    error::{Error, Result},
    kernel::{
        btf::{Btf, sock_layout},
        clock::KernelClock,
        links::{self, LinkWatch},
        maps::FlowRef,
        netns::NetNs,
        nsinfo, privileges,
        probe::{Probe, ProbeOptions},
        sockdiag::SockDiag,
    },
    snapshot::{PortFilter, Snapshot, StateCounts, by_state, live_counts},
    tracking::{
        breakdown::{Breakdown, local_ends},
        interfaces::{Changes, Interfaces},
        reconcile::Reconciler,
        seed,
        signals::KernelSignal,
        timers::{SweepStats, Timeouts, Timers, Why},
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
    interfaces: Interfaces,
    timeouts: Timeouts,
    expired: u64,
    /// Sockets looked up in the kernel's table, and endpoints set from the
    /// answers.
    asked: [u64; 2],
    reconciler: Reconciler,
    timers: Timers,
    /// Each [`KernelSignal`]'s counter at the last look.
    signals: [Option<u64>; 2],
    /// Growth of TCPTimeWaitOverflow since the agent started.
    tw_overflow_seen: u64,
    /// Socket-table checks owed after such growth.
    checks_due: u8,
    /// The probe's map_full and ask_lost counts at the last look.
    map_full_seen: u64,
    ask_lost_seen: u64,
    reports_missed_seen: u64,
    /// Kernel reports the kernel skipped (its count for the program).
    reports_missed: u64,
    /// Connections by port and by peer, as of the last walk.
    breakdown: Breakdown,
    /// Entries in the IPv4 and IPv6 flow maps at the last walk.
    flows_in_map: [u64; 2],
    top_k: usize,
    started: std::time::Instant,
}

/// How long after the kernel reported a close in FIN_WAIT2 or CLOSING the
/// agent asks whether a TIME_WAIT socket took over. The kernel hashes the
/// successor before it reports the close (the probe asks only when it could
/// not tell: the namespace at `tcp_max_tw_buckets`, a FIN the segments
/// showed but the socket may have dropped, or a kernel whose layout it does
/// not know); this leaves the close, and a FIN handled on another CPU at
/// the same moment, time to finish.
const CLOSE_QUESTION_DELAY: Duration = Duration::from_millis(5);

impl Agent {
    /// Loads the probe and attaches it in the configured namespace.
    pub fn start(cfg: &Config) -> Result<Agent> {
        let ns = match &cfg.netns {
            Some(name) => NetNs::named(name)?,
            None => NetNs::current()?,
        };
        let ns_label = ns.to_string();
        let inode = ns.inode();
        let interfaces = Interfaces::new(cfg.interfaces.clone(), cfg.probe.ingress);
        let (probe, diag, timeouts) = ns.run(|| {
            let present = links::interfaces()?;
            if let Some(iface) = interfaces.missing(&present).pop() {
                return Err(Error::NoSuchInterface {
                    iface,
                    netns: ns_label.clone(),
                });
            }
            if present.is_empty() {
                return Err(Error::NoInterfaces(ns_label.clone()));
            }
            // The kernel's reports need its BTF; without it, packets alone.
            let layout = Btf::kernel()
                .and_then(|btf| sock_layout(&btf, inode as u32))
                .map_err(|e| tracing::warn!("{e}: the kernel's socket reports are not used"))
                .ok();
            let mut probe = Probe::load(&cfg.probe, layout)?;
            // Before attaching: the first segments already need to know
            // which endpoints are local.
            probe.set_local_addresses(&nsinfo::local_addresses()?)?;
            interfaces.attach_all(&mut probe, &present)?;
            let mut diag = SockDiag::open()?;
            let clock = KernelClock::from_clocks(|| probe.clocks().ok()).or_else(KernelClock::read);
            let timeouts = Timeouts::from_sysctls(clock, probe.kernel_reports());
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
        Ok(Agent {
            netns: cfg.netns.clone(),
            ns: Arc::new(ns),
            probe,
            diag,
            interfaces,
            timeouts,
            expired: 0,
            asked: [0; 2],
            reconciler: Reconciler::default(),
            timers: Timers::default(),
            signals: [None; 2],
            tw_overflow_seen: 0,
            checks_due: 0,
            map_full_seen: 0,
            ask_lost_seen: 0,
            reports_missed_seen: 0,
            reports_missed: 0,
            breakdown: Breakdown::default(),
            flows_in_map: [0; 2],
            top_k: cfg.top_k,
            started: std::time::Instant::now(),
        })
    }

    /// Looks at the namespace's interfaces again (link events came):
    /// attaches to new ones, detaches from those gone.
    pub fn follow_interfaces(&mut self) -> Result<Changes> {
        let ns = Arc::clone(&self.ns);
        let (interfaces, probe) = (&self.interfaces, &mut self.probe);
        ns.run(|| {
            let present = links::interfaces()?;
            Ok(interfaces.sync(probe, &present))
        })
    }

    /// A socket subscribed to the namespace's link and address events.
    pub fn link_watch(&self) -> Result<LinkWatch> {
        self.ns.run(LinkWatch::open)
    }

    /// The sysctls as read now: a changed `tcp_fin_timeout` applies to the
    /// FIN_WAIT2 sockets the kernel turns into time-wait ones from now on,
    /// and to when held ones are looked at next.
    pub fn set_timeouts(&mut self, t: Timeouts) {
        if t.fin_wait2 != self.timeouts.fin_wait2 {
            tracing::info!(
                "net.ipv4.tcp_fin_timeout is now {:?} (was {:?})",
                t.fin_wait2,
                self.timeouts.fin_wait2
            );
            self.timers.forget_held();
        }
        self.timeouts = t;
    }

    /// Timeouts as the namespace's sysctls say now (read without the lock).
    pub fn timeouts_now(ns: &NetNs, like: &Timeouts) -> Result<Timeouts> {
        let (clock, reports) = (like.clock, like.kernel_reports);
        ns.run(move || Ok(Timeouts::from_sysctls(clock, reports)))
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }

    /// Questions from the probe: ask about these sockets shortly.
    pub fn questions(&mut self, asks: impl IntoIterator<Item = Ask>) {
        for q in asks {
            let flow = if q.family == 6 {
                FlowRef::V6(q.key6)
            } else {
                FlowRef::V4(q.key4)
            };
            let side = if q.side == 0 { Side::A } else { Side::B };
            let at = q.at_ns + CLOSE_QUESTION_DELAY.as_nanos() as u64;
            self.timers.question(flow, side, Why::Closed, at);
        }
    }

    /// A reader of the counts that never waits for this agent's lock.
    pub fn reader(&mut self) -> Result<crate::serve::reader::Reader> {
        let diag = self.ns.run(SockDiag::open)?;
        let first = self.snapshot()?;
        crate::serve::reader::Reader::new(self.probe.counters_map(), diag, first, self.started)
    }

    /// Drops every capability, on this thread and (but what attaching to a
    /// new interface takes) on the namespace thread: from here on the agent
    /// only uses descriptors it already holds.
    pub fn drop_privileges(&self) -> Result<()> {
        self.ns.run(|| privileges::keep_only(&privileges::ATTACH))?;
        privileges::drop_all()
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

    /// Since the last call: new connections the full flow map refused,
    /// questions lost to a full ring, and kernel reports the kernel skipped.
    /// A lost question or report makes a socket-table check owed: it was
    /// about a change the packets cannot tell.
    pub fn losses_since_last(&mut self) -> Result<[u64; 3]> {
        let events = self.probe.counters()?.events;
        let full = events[Event::MapFull as usize];
        let lost = events[Event::AskLost as usize];
        let missed = self.probe.kernel_reports_missed()?;
        let grew = [
            full.saturating_sub(self.map_full_seen),
            lost.saturating_sub(self.ask_lost_seen),
            missed.saturating_sub(self.reports_missed_seen),
        ];
        (self.map_full_seen, self.ask_lost_seen) = (full, lost);
        self.reports_missed_seen = missed;
        self.reports_missed = missed;
        if grew[1] > 0 || grew[2] > 0 {
            self.checks_due = self.checks_due.max(2);
        }
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
            self.probe.attached(),
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
        snap.asked = self.asked;
        snap.kernel_reports = self.probe.kernel_reports();
        snap.connect_reports = self.probe.connect_reports();
        snap.kernel_reports_missed = self.reports_missed;
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
        // Translations first: each one read now already has its connection's
        // entry (made in the same moment), so an entry the walk does not find
        // is really gone.
        let translations = self.probe.translations()?;
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
            .filter(|(f, _)| matches!(f, crate::kernel::maps::FlowRef::V4(_)))
            .count() as u64;
        self.flows_in_map = [v4, entries.len() as u64 - v4];
        let stats = self
            .timers
            .file(&entries, &self.probe, &mut self.diag, &self.timeouts)?;
        self.count(stats);
        self.forget_translations(translations, &entries)
    }

    /// Local NAT: translations whose connection the flow maps no longer
    /// hold (or hold dead) are forgotten.
    fn forget_translations(
        &mut self,
        translations: Vec<(FlowRef, FlowRef)>,
        entries: &[(FlowRef, FlowEntry)],
    ) -> Result<()> {
        if translations.is_empty() {
            return Ok(());
        }
        let live: std::collections::HashSet<FlowRef> = entries
            .iter()
            .filter(|(_, e)| !tcpstate_common::Word(e.word).is_dead())
            .map(|(f, _)| *f)
            .collect();
        for (wire, socket) in translations {
            if !live.contains(&socket) {
                self.probe.forget_translation(&wire)?;
            }
        }
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

    /// Fires the timers filed by the last walk that are due now, and asks
    /// the questions whose moment has come.
    /// Acts on the timers and questions that are due; returns when the next
    /// one is (CLOCK_MONOTONIC ns).
    pub fn fire_timers(&mut self) -> Result<Option<u64>> {
        let stats = self
            .timers
            .fire(&self.probe, &mut self.diag, &self.timeouts)?;
        self.count(stats);
        Ok(self.timers.next_ns())
    }

    /// When the next timer is due (CLOCK_MONOTONIC ns), if any is filed.
    pub fn next_timer_ns(&self) -> Option<u64> {
        self.timers.next_ns()
    }

    fn count(&mut self, stats: SweepStats) {
        self.expired += stats.expired;
        self.asked[0] += stats.asked;
        self.asked[1] += stats.answered;
    }

    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    pub fn probe_mut(&mut self) -> &mut Probe {
        &mut self.probe
    }
}
