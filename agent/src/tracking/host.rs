//! The host: the one probe (programs, maps, attachments) and one tracker
//! per monitored namespace. With `run --all-namespaces` it follows every
//! namespace of the host (`follow.rs`); else the one the user named, or
//! the agent's own. The daemon drives it under one lock.

use std::{collections::BTreeMap, fmt, sync::Arc};

use tcpstate_common::{Ask, Event};

use crate::{
    error::Result,
    kernel::{
        btf::{Btf, sock_layout},
        clock::KernelClock,
        maps::FlowRef,
        netns::NetNs,
        privileges,
        probe::{Probe, ProbeOptions},
        sockdiag::SockDiag,
    },
    snapshot::{NetnsCounts, PortFilter, Snapshot, StateCounts},
    tracking::{observer::Observer, timers::Timeouts, tracker::Tracker},
};

/// Flow entries grouped by their namespace slot.
pub fn by_slot(
    entries: Vec<(FlowRef, tcpstate_common::FlowEntry)>,
) -> BTreeMap<u32, Vec<(FlowRef, tcpstate_common::FlowEntry)>> {
    let mut out: BTreeMap<u32, Vec<_>> = BTreeMap::new();
    for (f, e) in entries {
        out.entry(f.netns()).or_default().push((f, e));
    }
    out
}

/// Which namespaces the agent watches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// One: the named `ip netns` namespace, or the agent's own.
    One(Option<String>),
    /// Every namespace of the host, as they come and go.
    All,
}

/// What to monitor and how.
#[derive(Clone, Debug)]
pub struct Config {
    pub scope: Scope,
    /// Interfaces to monitor; empty means every interface that is up.
    pub interfaces: Vec<String>,
    pub probe: ProbeOptions,
    /// Ports and peers listed by name in snapshots and metrics; the rest is
    /// summed as "other".
    pub top_k: usize,
    /// With `probe.observe`: how long the observed timed states last.
    pub observed_timeouts: Timeouts,
}

/// How a namespace is named to the user: its inode (as `lsns -t net` and
/// `readlink /proc/PID/ns/net` show it), its `ip netns` name, a process in
/// it, and its container and pod where they exist (`names`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub inode: u64,
    pub name: Option<String>,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub owner: crate::names::Owner,
    /// What the cgroup of `pid` said (read again when `pid` changes).
    pub cgroup: crate::names::cgroup::FromCgroup,
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.name.is_none()
            && let Some(o) = self.owner.display()
        {
            return write!(f, "netns {} ({o})", self.inode);
        }
        match (&self.name, self.pid) {
            (Some(n), _) => write!(f, "netns {n} ({})", self.inode),
            (None, Some(pid)) => write!(
                f,
                "netns {} (pid {pid} {})",
                self.inode,
                self.comm.as_deref().unwrap_or("?")
            ),
            (None, None) => write!(f, "netns {}", self.inode),
        }
    }
}

/// How long starting trackers may take before the agent first answers, and
/// in each step of the daemon's starter after (the host's lock is held
/// meanwhile).
pub const START_BUDGET: std::time::Duration = std::time::Duration::from_millis(500);
pub const STEP_BUDGET: std::time::Duration = std::time::Duration::from_millis(40);

/// See [`Host::due`].
pub const YOUNG: std::time::Duration = std::time::Duration::from_secs(10);
pub const PER_TICK: usize = 32;

pub struct Host {
    pub(crate) probe: Probe,
    pub(crate) trackers: BTreeMap<u32, Tracker>,
    /// With `--observe`: the connections passing through, in a slot of
    /// their own.
    pub(crate) observer: Option<Observer>,
    pub(crate) cfg: Config,
    /// With [`Scope::All`]: a thread in the agent's own namespace that keeps
    /// what following new namespaces takes ([`privileges::FOLLOW_ALL`]);
    /// every namespace is found and entered from it.
    pub(crate) keeper: Option<NetNs>,
    /// The thread that reads other processes' descriptors (`conns --process`).
    pub(crate) fd_reader: Arc<NetNs>,
    /// Kernel reports skipped, at the last look (one count for the host).
    reports_missed: u64,
    /// The kernel's jiffies paired with CLOCK_MONOTONIC, for every tracker.
    pub(crate) clock: Option<KernelClock>,
    /// Where the round of [`Host::due`] goes on from, and what it gave last.
    cursor: u32,
    last_due: Vec<u32>,
    started: std::time::Instant,
    /// See [`Host::look_for_namespaces`].
    pub(crate) waiting: crate::tracking::follow::Waiting,
    /// The socket-table checks under way (see `serve::tick`).
    pub(crate) round: crate::tracking::pacing::Round,
    /// The walks and checks made so far, and what they cost.
    pub(crate) upkeep: crate::snapshot::upkeep::Upkeep,
    /// Whether the agent said that many namespaces share one socket table.
    pub(crate) shared_hinted: bool,
    /// What the container runtimes say (their watchers write it).
    pub names: crate::names::Names,
    /// The runtimes' containers by namespace inode, at the last look.
    pub(crate) owners: std::collections::HashMap<u64, crate::names::Owner>,
    /// The agent's own namespace's inode (no container owns it).
    pub(crate) own_inode: Option<u64>,
}

impl Host {
    /// Loads the probe and starts tracking the configured namespaces.
    pub fn start(cfg: &Config) -> Result<Host> {
        // The kernel's reports need its BTF; without it, packets alone.
        let layout = Btf::kernel()
            .and_then(|btf| sock_layout(&btf))
            .map_err(|e| tracing::warn!("{e}: the kernel's socket reports are not used"))
            .ok();
        let mut opts = cfg.probe.clone();
        if let Scope::One(_) = cfg.scope {
            // The namespace, and what passes through it.
            opts.max_netns = 1 + u32::from(opts.observe);
        } else if opts.observe {
            return Err(crate::error::Error::Usage(
                "--observe follows one namespace's forwarded traffic: name it with --netns (or leave it out for the agent's own), not --all-namespaces".into(),
            ));
        }
        let probe = Probe::load(&opts, layout)?;
        let clock = KernelClock::from_clocks(|| probe.clocks().ok()).or_else(KernelClock::read);
        let mut host = Host {
            clock,
            cursor: 0,
            last_due: Vec::new(),
            probe,
            trackers: BTreeMap::new(),
            observer: None,
            cfg: cfg.clone(),
            keeper: None,
            fd_reader: Arc::new(NetNs::owner_reader()?),
            reports_missed: 0,
            started: std::time::Instant::now(),
            waiting: Vec::new(),
            round: Default::default(),
            upkeep: Default::default(),
            shared_hinted: false,
            names: Default::default(),
            owners: Default::default(),
            own_inode: None,
        };
        match &cfg.scope {
            Scope::One(name) => {
                let ns = match name {
                    Some(n) => NetNs::named(n)?,
                    None => NetNs::current()?,
                };
                let identity = Identity {
                    inode: ns.inode(),
                    name: name.clone(),
                    ..Identity::default()
                };
                let t = Tracker::start(
                    &mut host.probe,
                    host.clock,
                    ns,
                    identity,
                    cfg.interfaces.clone(),
                    true,
                    cfg.top_k,
                )?;
                if opts.observe {
                    host.observer = Some(Observer::start(
                        &mut host.probe,
                        t.slot(),
                        cfg.observed_timeouts.clone(),
                    )?);
                }
                host.trackers.insert(t.slot(), t);
            }
            Scope::All => {
                host.keeper = Some(NetNs::keeper()?);
                host.own_inode = crate::kernel::discover::net_inode(
                    &std::fs::read_link("/proc/self/ns/net")
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                );
                // The rest (hundreds of namespaces take seconds) is
                // followed by the ticks, with the agent already answering.
                host.look_for_namespaces();
                let started = host.start_waiting(START_BUDGET);
                if host.waiting() > 0 {
                    tracing::info!(
                        "{} namespaces monitored, {} to follow",
                        started.len(),
                        host.waiting()
                    );
                }
            }
        }
        Ok(host)
    }

    pub fn probe(&self) -> &Probe {
        &self.probe
    }

    pub fn probe_mut(&mut self) -> &mut Probe {
        &mut self.probe
    }

    pub fn scope(&self) -> &Scope {
        &self.cfg.scope
    }

    pub fn trackers(&self) -> impl Iterator<Item = &Tracker> {
        self.trackers.values()
    }

    /// The one tracker of single-namespace mode (the first, in any mode).
    pub fn first(&mut self) -> Option<&mut Tracker> {
        self.trackers.values_mut().next()
    }

    /// LISTEN is the probe's count (moved by the kernel's reports) rather
    /// than a dump of each namespace's table per read: with every namespace,
    /// where the kernel reports.
    pub fn listen_counted(&self) -> bool {
        self.cfg.scope == Scope::All && self.probe.kernel_reports()
    }

    /// A reader of the counts that never waits for the host's lock.
    pub fn reader(&mut self) -> Result<crate::serve::reader::Reader> {
        // One namespace: LISTEN from its table at every read, as ever.
        let diag: Option<SockDiag> = match self.cfg.scope {
            Scope::One(_) => match self.first() {
                Some(t) => Some(t.open_diag()?),
                None => None,
            },
            Scope::All => None,
        };
        let first = self.snapshot()?;
        crate::serve::reader::Reader::new(self.probe.counters_map(), diag, first, self.started)
    }

    /// Drops every capability on this thread and on each namespace's
    /// thread but what attaching to a new interface takes; with every
    /// namespace, the keeper thread keeps what following them takes, and
    /// the descriptor reader what reading /proc/PID/fd takes.
    pub fn drop_privileges(&self) -> Result<()> {
        for t in self.trackers.values() {
            t.netns()
                .run(|| privileges::keep_only(&privileges::ATTACH))?;
        }
        if let Some(k) = &self.keeper {
            k.run(|| privileges::keep_only(&privileges::FOLLOW_ALL))?;
        }
        self.fd_reader
            .run(|| privileges::keep_only(&privileges::READ_FDS))?;
        privileges::drop_all()
    }

    /// Questions from the probe, each for its namespace's tracker.
    pub fn questions(&mut self, asks: impl IntoIterator<Item = Ask>) {
        for q in asks {
            let slot = if q.family == 6 {
                q.key6.netns
            } else {
                q.key4.netns
            };
            if let Some(t) = self.trackers.get_mut(&slot) {
                t.question(&q);
            } else if let Some(o) = self.observer.as_mut().filter(|o| o.slot() == slot) {
                o.notice(&q);
            }
        }
    }

    /// Acts on every namespace's due timers; returns when the next is due.
    pub fn fire_timers(&mut self) -> Result<Option<u64>> {
        let mut next: Option<u64> = None;
        for t in self.trackers.values_mut() {
            match t.fire_timers(&self.probe) {
                Ok(Some(at)) => next = Some(next.map_or(at, |n| n.min(at))),
                Ok(None) => {}
                Err(e) => tracing::warn!("{}: timers: {e}", t.identity),
            }
        }
        if let Some(o) = &mut self.observer {
            match o.fire_timers(&self.probe) {
                Ok(Some(at)) => next = Some(next.map_or(at, |n| n.min(at))),
                Ok(None) => {}
                Err(e) => tracing::warn!("observed connections: timers: {e}"),
            }
        }
        Ok(next)
    }

    pub fn next_timer_ns(&self) -> Option<u64> {
        self.trackers
            .values()
            .filter_map(|t| t.next_timer_ns())
            .chain(self.observer.as_ref().and_then(|o| o.next_timer_ns()))
            .min()
    }

    /// Once a second: one walk of the flow maps, each namespace given its
    /// own entries (the keys carry the slot).
    pub fn sweep(&mut self) -> Result<()> {
        // Translations first: each one read now already has its connection's
        // entry (made in the same moment), so an entry the walk does not find
        // is really gone.
        let translations = self.probe.translations()?;
        let mut by_slot = by_slot(self.probe.flow_entries()?);
        let mut nat: BTreeMap<u32, Vec<(FlowRef, FlowRef)>> = BTreeMap::new();
        for (w, s) in translations {
            nat.entry(w.netns()).or_default().push((w, s));
        }
        let counted = self.listen_counted();
        // With every namespace, only those due this tick have their
        // listeners read (each read is a dump of the host's whole table).
        let all = self.cfg.scope == Scope::All;
        for (slot, t) in self.trackers.iter_mut() {
            let mine = by_slot.remove(slot).unwrap_or_default();
            let tr = nat.remove(slot).unwrap_or_default();
            let look = !all || self.last_due.contains(slot);
            if let Err(e) = t.sweep(&mut self.probe, &mine, tr, counted, look) {
                tracing::warn!("{}: walk: {e}", t.identity);
            }
        }
        if let Some(o) = &mut self.observer {
            let mine = by_slot.remove(&o.slot()).unwrap_or_default();
            if let Err(e) = o.sweep(&self.probe, &mine) {
                tracing::warn!("observed connections: walk: {e}");
            }
        }
        Ok(())
    }

    /// Since the last look, per namespace: refusals, lost questions, and
    /// (for the host) kernel reports skipped.
    pub fn losses_since_last(&mut self) -> Vec<(String, Result<[u64; 3]>)> {
        let missed = self
            .probe
            .kernel_reports_missed()
            .unwrap_or(self.reports_missed);
        self.reports_missed = missed;
        let probe = &self.probe;
        self.trackers
            .values_mut()
            .map(|t| (t.identity.to_string(), t.losses_since_last(probe, missed)))
            .collect()
    }

    /// One read of the probe's service table, each namespace given its
    /// rows.
    fn look_at_services(&mut self) -> Result<()> {
        let mut by_slot: BTreeMap<u32, Vec<_>> = BTreeMap::new();
        for (k, v) in self.probe.services()? {
            by_slot.entry(k.netns).or_default().push((k, v));
        }
        for (slot, t) in self.trackers.iter_mut() {
            let inode = t.identity.inode;
            t.services
                .look(inode, by_slot.remove(slot).unwrap_or_default());
        }
        Ok(())
    }

    /// The host's snapshot: every namespace's, and their sum.
    pub fn snapshot(&mut self) -> Result<Snapshot> {
        self.look_at_services()?;
        let counted = self.listen_counted();
        let all = self.cfg.scope == Scope::All;
        let mut parts = Vec::new();
        for t in self.trackers.values_mut() {
            let listening = if counted {
                None
            } else if all {
                // No dump per namespace per tick: the last look's.
                Some(t.listening_seen())
            } else {
                Some(t.listening_now()?)
            };
            parts.push((
                t.identity.clone(),
                t.slot(),
                t.snapshot(&self.probe, listening)?,
            ));
        }
        Ok(self.combine(parts))
    }

    /// One snapshot of many: counts, events and breakdowns summed, and the
    /// namespaces listed.
    fn combine(&self, parts: Vec<(Identity, u32, Snapshot)>) -> Snapshot {
        let namespaces = parts
            .iter()
            .map(|(id, slot, snap)| NetnsCounts::of(id, *slot, snap))
            .collect();
        let snaps: Vec<Snapshot> = parts.into_iter().map(|(_, _, s)| s).collect();
        let total = Snapshot::sum(&snaps);
        let attention = crate::snapshot::attention::Attention::merge(
            snaps.iter().map(|s| &s.attention),
            self.cfg.top_k,
        );
        let mut total = total.unwrap_or_else(|| {
            Snapshot::new(
                None,
                Vec::new(),
                StateCounts::default(),
                &tcpstate_common::Counters::default(),
                self.probe.max_flows().unwrap_or(0),
                0,
            )
        });
        if self.cfg.scope == Scope::All {
            total.netns = None;
            total.all_namespaces = true;
        }
        total.attention = attention;
        total.services = crate::tracking::tracker::top_services(&total.services, self.cfg.top_k);
        total.namespaces = namespaces;
        total.uptime_ms = self.started.elapsed().as_millis() as u64;
        total.upkeep = self.upkeep.clone();
        total.upkeep.of_process();
        for late in self
            .trackers
            .values()
            .map(|t| t.lateness())
            .chain(self.observer.as_ref().map(|o| o.lateness()))
        {
            total.upkeep.timer_lateness.add(late);
        }
        total.observed = self.observer.as_ref().and_then(|o| {
            o.snapshot(&self.probe)
                .map_err(|e| tracing::warn!("observed connections: {e}"))
                .ok()
        });
        total
    }

    /// A snapshot with each socket table's own counts beside ours.
    pub fn verify(&mut self) -> Result<Snapshot> {
        let counted = self.listen_counted();
        let mut parts = Vec::new();
        for t in self.trackers.values_mut() {
            let listening = if counted {
                None
            } else {
                Some(t.listening_now()?)
            };
            parts.push((
                t.identity.clone(),
                t.slot(),
                t.verify(&self.probe, listening)?,
            ));
        }
        Ok(self.combine(parts))
    }

    /// The counts of the connections `filter` selects, over every namespace.
    pub fn count_filtered(&mut self, filter: &PortFilter) -> Result<StateCounts> {
        let mut sum = StateCounts::default();
        for t in self.trackers.values_mut() {
            if filter.netns.is_some_and(|i| i != t.identity.inode) {
                continue;
            }
            let c = t.count_filtered(&self.probe, filter)?;
            for (a, b) in sum.0.iter_mut().zip(c.0) {
                *a += b;
            }
        }
        Ok(sum)
    }

    /// Refusals of one namespace (map full and its share used up).
    pub fn refusals(&self, slot: u32) -> u64 {
        self.probe.counters(slot).map_or(0, |c| {
            c.events[Event::MapFull as usize] + c.events[Event::NetnsShareFull as usize]
        })
    }

    /// The namespaces whose files (addresses, sysctls, SNMP counters) and
    /// interfaces this tick looks at, with their handles for reads outside
    /// the lock: every namespace tracked for less than [`YOUNG`] (a CNI
    /// moves eth0 in and gives it addresses just after making the
    /// namespace), and [`PER_TICK`] of the others in turn. One namespace
    /// costs a few milliseconds of such reads: with hundreds, all of them
    /// every second would be the agent's whole CPU.
    pub fn due(&mut self) -> Vec<(u32, Arc<NetNs>, crate::tracking::timers::Timeouts)> {
        let young: Vec<u32> = self
            .trackers
            .iter()
            .filter(|(_, t)| t.age() < YOUNG)
            .map(|(s, _)| *s)
            .collect();
        let old: Vec<u32> = self
            .trackers
            .keys()
            .copied()
            .filter(|s| !young.contains(s))
            .collect();
        let mut pick = young;
        if old.len() <= PER_TICK {
            pick.extend(&old);
        } else {
            let from = old.iter().position(|s| *s >= self.cursor).unwrap_or(0);
            pick.extend(old.iter().cycle().skip(from).take(PER_TICK));
            self.cursor = old[(from + PER_TICK) % old.len()];
        }
        self.last_due = pick.clone();
        pick.iter()
            .filter_map(|s| {
                let t = self.trackers.get(s)?;
                Some((*s, t.netns(), t.timeouts().clone()))
            })
            .collect()
    }
}
