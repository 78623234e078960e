//! One monitored namespace kept exact: its slot in the host's one probe,
//! its interfaces, its socket table, the kernel's timers and signals as its
//! sysctls and SNMP counters say, and what reconciliation has learnt. The
//! host (`host.rs`) holds one per namespace and the probe they share; its
//! methods get the probe from there.

use std::{sync::Arc, time::Duration};

use netlink_packet_sock_diag::inet::StateFlags;
use tcpstate_common::{Ask, Event, FlowEntry, Side, TcpState};

use crate::snapshot::{
    attention::{Dropping, Failing},
    durations::Timings,
    services::{Service, ServiceRow},
};

mod conns;
mod walk;

use crate::{
    error::{Error, Result},
    kernel::{
        clock::KernelClock,
        links::{self, LinkWatch},
        maps::FlowRef,
        netns::NetNs,
        nsinfo,
        probe::Probe,
        sockdiag::{SockDiag, SockInfo},
    },
    snapshot::{Snapshot, StateCounts, by_state, live_counts},
    tracking::{
        breakdown::Breakdown,
        host::Identity,
        interfaces::{Changes, Interfaces},
        reconcile::Reconciler,
        seed,
        signals::KernelSignal,
        timers::{SweepStats, Timeouts, Timers, Why},
    },
};

pub struct Tracker {
    /// The namespace's slot in the probe.
    slot: u32,
    pub(crate) identity: Identity,
    ns: Arc<NetNs>,
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
    signals: [Option<u64>; 3],
    /// The kernel gave up on connections since the last walk: the next one
    /// asks about those that may be them ([`Why::TimedOut`]).
    timed_out: bool,
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
    /// What needs attention, as of the last walk.
    attention: crate::snapshot::attention::Attention,
    /// Its services, as of the last look at the probe's table.
    pub(crate) services: crate::tracking::services::ServiceBook,
    /// LISTEN sockets in the socket table at the last walk, and whether the
    /// probe's count (moved by the kernel's reports) differed from it then.
    listening: u64,
    listen_off: Option<i64>,
    /// The listeners at the last look at the table.
    listeners: Vec<SockInfo>,
    /// `net.ipv4.ip_local_port_range` as last read (inclusive).
    pub(crate) ephemeral: (u16, u16),
    /// CLOCK_MONOTONIC when the socket table was seeded: a state stamped
    /// before it began before the agent watched.
    seeded_ns: u64,
    /// Entries in the IPv4 and IPv6 flow maps at the last walk.
    flows_in_map: [u64; 2],
    top_k: usize,
    started: std::time::Instant,
    /// The local addresses last set in the probe (sorted), if known.
    local_addrs: Option<Vec<std::net::IpAddr>>,
    /// See [`nsinfo::socket_table_buckets`].
    pub table_buckets: Option<i64>,
}

/// How long after the kernel reported a close in FIN_WAIT2 or CLOSING the
/// agent asks whether a TIME_WAIT socket took over. The kernel hashes the
/// successor before it reports the close (the probe asks only when it could
/// not tell: the namespace at `tcp_max_tw_buckets`, a FIN the segments
/// showed but the socket may have dropped, or a kernel whose layout it does
/// not know); this leaves the close, and a FIN handled on another CPU at
/// the same moment, time to finish.
const CLOSE_QUESTION_DELAY: Duration = Duration::from_millis(5);

impl Tracker {
    /// Starts tracking namespace `ns`: gives it a slot in `probe`, attaches
    /// to its interfaces (`wanted`; empty: all), and seeds what its socket
    /// table has. `strict`: an interface missing or none up is an error (the
    /// namespace the user named); else the namespace waits for interfaces.
    /// `clock`: the kernel's jiffies paired with CLOCK_MONOTONIC (one for
    /// the host: pairing them takes a fifth of a second).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        probe: &mut Probe,
        clock: Option<KernelClock>,
        ns: NetNs,
        identity: Identity,
        wanted: Vec<String>,
        strict: bool,
        top_k: usize,
    ) -> Result<Tracker> {
        let ns_label = ns.to_string();
        let slot = probe.register_netns(ns.inode())?;
        // Every namespace at once: bridge and bond ports left out.
        let interfaces = Interfaces::new(wanted, slot, !strict);
        let started = ns.run(|| {
            let present = interfaces.wanted_of(links::interfaces()?);
            if strict {
                if let Some(iface) = interfaces.missing(&present).pop() {
                    return Err(Error::NoSuchInterface {
                        iface,
                        netns: ns_label.clone(),
                    });
                }
                if present.is_empty() {
                    return Err(Error::NoInterfaces(ns_label.clone()));
                }
            }
            // Before attaching: the first segments already need to know
            // which endpoints are local.
            let addrs = address_set(&nsinfo::local_addresses()?);
            probe.set_local_addresses(slot, &addrs)?;
            interfaces.attach_all(probe, &present)?;
            let mut diag = SockDiag::open()?;
            let timeouts = Timeouts::from_sysctls(clock, probe.kernel_reports());
            // After attaching: from here on packets are seen, so every
            // connection is either seeded now or tracked from its packets.
            let seeded = seed::seed(probe, slot, &mut diag, &timeouts)?;
            let seeded_ns = crate::tracking::timers::monotonic_ns();
            let ephemeral = nsinfo::local_port_range().unwrap_or((0, 0));
            // The kernel's reports move LISTEN from now on; the table says
            // where it starts.
            let listening = diag.listening()?;
            seed::seed_listening(probe, slot, listening)?;
            let buckets = nsinfo::socket_table_buckets();
            tracing::info!(
                "{ns_label}: seeded {} existing connections from the socket table ({} already tracked, {} refused: map full), {listening} listening",
                seeded.seeded,
                seeded.already,
                seeded.map_full
            );
            Ok((diag, timeouts, listening, buckets, addrs, (seeded_ns, ephemeral)))
        });
        let (diag, timeouts, listening, table_buckets, addrs, (seeded_ns, ephemeral)) =
            match started {
                Ok(s) => s,
                Err(e) => {
                    let _ = probe.forget_netns(slot);
                    return Err(e);
                }
            };
        Ok(Tracker {
            slot,
            identity,
            ns: Arc::new(ns),
            diag,
            interfaces,
            timeouts,
            expired: 0,
            asked: [0; 2],
            reconciler: Reconciler::default(),
            timers: Timers::default(),
            signals: [None; 3],
            timed_out: false,
            tw_overflow_seen: 0,
            checks_due: 0,
            map_full_seen: 0,
            ask_lost_seen: 0,
            reports_missed_seen: 0,
            reports_missed: 0,
            breakdown: Breakdown::default(),
            attention: Default::default(),
            services: Default::default(),
            listening,
            listen_off: None,
            listeners: Vec::new(),
            ephemeral,
            seeded_ns,
            flows_in_map: [0; 2],
            top_k,
            started: std::time::Instant::now(),
            local_addrs: Some(addrs),
            table_buckets,
        })
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// How long it has been tracked.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }

    /// Looks at the namespace's interfaces again (link events came, or a
    /// look found it changed): attaches to new ones, detaches from those gone.
    pub fn follow_interfaces(&mut self, probe: &mut Probe) -> Result<Changes> {
        let ns = Arc::clone(&self.ns);
        let interfaces = &self.interfaces;
        ns.run(|| {
            let present = interfaces.wanted_of(links::interfaces()?);
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
                "{}: net.ipv4.tcp_fin_timeout is now {:?} (was {:?})",
                self.identity,
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

    /// A question from the probe: ask about this socket shortly. Or a
    /// notice: one of the flow's endpoints entered a timed state; its timer
    /// is filed at the next fire.
    pub fn question(&mut self, q: &Ask) {
        let flow = FlowRef::of_ask(q);
        if q.is_timed() {
            self.timers.notice(flow);
            return;
        }
        let side = if q.side == 0 { Side::A } else { Side::B };
        let at = q.at_ns + CLOSE_QUESTION_DELAY.as_nanos() as u64;
        self.timers.question(flow, side, Why::Closed, at);
    }

    /// A sock_diag socket of the namespace (for a reader).
    pub fn open_diag(&self) -> Result<SockDiag> {
        self.ns.run(SockDiag::open)
    }

    /// Takes a reading of the [`KernelSignal`]s. When one that
    /// [checks the table](KernelSignal::checks_table) grows, the socket
    /// table is checked at once and twice more after it stops (the
    /// two-strike rule needs two checks of a settled table), whether or not
    /// periodic reconciliation is on; when the kernel gave up on
    /// connections, the next walk asks about the likely ones. Returns each
    /// signal's growth.
    pub fn note_signals(&mut self, now: [Option<u64>; 3]) -> [u64; 3] {
        let mut grew = [0; 3];
        for (i, (last, now)) in self.signals.iter_mut().zip(now).enumerate() {
            if let Some(now) = now {
                grew[i] = last.map_or(0, |before| now.saturating_sub(before));
                *last = Some(now);
            }
        }
        let table = KernelSignal::ALL
            .iter()
            .zip(grew)
            .any(|(s, g)| g > 0 && s.checks_table());
        if table {
            self.checks_due = 3;
        }
        if grew[KernelSignal::AbortOnTimeout as usize] > 0 {
            self.timed_out = true;
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

    /// Sets this namespace's local addresses in the probe, when they
    /// changed since the last time (syncing them reads the whole address
    /// maps, every namespace's entries: hundreds of namespaces doing so
    /// each tick was a third of the agent's idle CPU).
    pub fn set_local_addresses(
        &mut self,
        probe: &mut Probe,
        addrs: &[std::net::IpAddr],
    ) -> Result<()> {
        let addrs = address_set(addrs);
        if self.local_addrs.as_ref() == Some(&addrs) {
            return Ok(());
        }
        // Unknown until set: a failed sync is tried again next time.
        self.local_addrs = None;
        probe.set_local_addresses(self.slot, &addrs)?;
        self.local_addrs = Some(addrs);
        Ok(())
    }

    /// Since the last call: new connections the full flow map (or the
    /// namespace's share of it) refused, questions lost to a full ring, and
    /// kernel reports the kernel skipped. A lost question or report makes a
    /// socket-table check owed: it was about a change the packets cannot tell.
    pub fn losses_since_last(&mut self, probe: &Probe, reports_missed: u64) -> Result<[u64; 3]> {
        let events = probe.counters(self.slot)?.events;
        let full = events[Event::MapFull as usize] + events[Event::NetnsShareFull as usize];
        let lost = events[Event::AskLost as usize];
        let missed = reports_missed;
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
    /// socket table (`listening`: read now; `None`: the probe's count, which
    /// the kernel's reports move).
    pub fn snapshot(&mut self, probe: &Probe, listening: Option<u64>) -> Result<Snapshot> {
        let counters = probe.counters(self.slot)?;
        let states = match listening {
            Some(n) => live_counts(&counters, n),
            None => StateCounts::from_slots(&counters.states),
        };
        let mut snap = Snapshot::new(
            self.identity.name.clone(),
            probe.attachments().names_in(self.slot),
            states,
            &counters,
            probe.max_flows()?,
            self.expired,
        );
        snap.drift = by_state(&self.reconciler.drift);
        snap.corrections = by_state(&self.reconciler.corrections);
        snap.time_wait_overflow = self.tw_overflow_seen;
        snap.ports = self.breakdown.top_ports(self.top_k);
        snap.peers = self.breakdown.top_peers(self.top_k);
        snap.attention = self.attention.clone();
        snap.attention.failing = failing(&self.services, self.top_k);
        snap.attention.dropping = dropping(&self.services, self.top_k);
        snap.services = top_services(&self.services.rows, self.top_k);
        snap.flows_in_map = self.flows_in_map;
        snap.asked = self.asked;
        snap.kernel_reports = probe.kernel_reports();
        snap.connect_reports = probe.connect_reports();
        snap.kernel_reports_missed = self.reports_missed;
        snap.uptime_ms = self.started.elapsed().as_millis() as u64;
        snap.durations = Timings::of(&probe.durations(self.slot)?);
        Ok(snap)
    }

    /// LISTEN as the socket table had it at the last look.
    pub fn listening_seen(&self) -> u64 {
        self.listening
    }

    /// LISTEN as the socket table has it now.
    pub fn listening_now(&mut self) -> Result<u64> {
        self.diag.listening()
    }

    /// Compares with the socket table and fixes confirmed mismatches;
    /// `entries`: this namespace's flow entries, read just before.
    pub fn reconcile(
        &mut self,
        probe: &Probe,
        entries: Vec<(FlowRef, FlowEntry)>,
    ) -> Result<usize> {
        self.reconciler
            .check(probe, self.slot, &mut self.diag, entries)
    }

    /// A snapshot with the socket table's own counts beside ours.
    pub fn verify(&mut self, probe: &Probe, listening: Option<u64>) -> Result<Snapshot> {
        let mut snap = self.snapshot(probe, listening)?;
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
        for (f, e) in probe.flow_entries()? {
            if f.netns() != self.slot {
                continue;
            }
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

    /// Acts on the timers and questions that are due; returns when the next
    /// one is (CLOCK_MONOTONIC ns).
    /// How late its timers fired.
    pub fn lateness(&self) -> &crate::snapshot::upkeep::Lateness {
        &self.timers.late
    }

    pub fn fire_timers(&mut self, probe: &Probe) -> Result<Option<u64>> {
        let stats = self
            .timers
            .fire(probe, Some(&mut self.diag), &self.timeouts)?;
        self.count(stats);
        if self
            .reconciler
            .confirm_at()
            .is_some_and(|at| at <= crate::tracking::timers::monotonic_ns())
        {
            match self.reconciler.confirm(probe, self.slot, &mut self.diag)? {
                0 => {}
                n => tracing::info!(
                    "{}: reconciled {n} flows with the socket table",
                    self.identity
                ),
            }
        }
        // The timer task wakes for a confirmation too (not counted as a
        // timer: a check due at a tick need not stand aside for it).
        Ok(
            match (self.timers.next_ns(), self.reconciler.confirm_at()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        )
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
}

/// Addresses as the tracker keeps them: sorted, each once, so that two
/// reads of the same set compare equal.
fn address_set(addrs: &[std::net::IpAddr]) -> Vec<std::net::IpAddr> {
    let mut v = addrs.to_vec();
    v.sort();
    v.dedup();
    v
}

/// The `top_k` upstreams whose connects failed lately, most first.
fn failing(book: &crate::tracking::services::ServiceBook, top_k: usize) -> Vec<Failing> {
    book.failing
        .iter()
        .take(top_k)
        .map(|(row, recent)| Failing {
            netns: row.netns,
            service: row.service.to_string(),
            recent: *recent,
            refused: row.closed.refused,
            handshake_timeout: row.closed.handshake_timeout,
            connect_p99_s: row.times.quantile(0.99),
        })
        .collect()
}

/// The `top_k` listening ports that left the most SYNs unanswered lately.
fn dropping(book: &crate::tracking::services::ServiceBook, top_k: usize) -> Vec<Dropping> {
    book.dropping
        .iter()
        .filter_map(|(row, recent)| match row.service {
            Service::Local(port) => Some(Dropping {
                netns: row.netns,
                port,
                recent: *recent,
                unanswered: row.unanswered,
            }),
            Service::Remote(_) => None,
        })
        .take(top_k)
        .collect()
}

/// The `top_k` services of each kind with the most activity (what a
/// snapshot carries of them: the table may hold thousands).
pub fn top_services(rows: &[ServiceRow], top_k: usize) -> Vec<ServiceRow> {
    let mut out = Vec::new();
    for local in [true, false] {
        let mut mine: Vec<&ServiceRow> = rows
            .iter()
            .filter(|r| matches!(r.service, Service::Local(_)) == local)
            .collect();
        mine.sort_by(|a, b| {
            b.activity()
                .cmp(&a.activity())
                .then(a.service.cmp(&b.service))
        });
        out.extend(mine.into_iter().take(top_k).cloned());
    }
    out
}
