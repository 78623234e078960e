//! The running agent: the probe attached in one namespace, the listening
//! sockets read from that namespace's socket table, the timer sweep, and the
//! control socket.

use std::{
    io::IsTerminal,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use netlink_packet_sock_diag::inet::StateFlags;
use tcpstate_common::TcpState;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    signal::unix::{SignalKind, signal},
};

use crate::{
    breakdown::{Breakdown, PortFilter, local_ends},
    control,
    error::{Error, Result},
    expiry::{FILING_HORIZON, Timeouts, Timers},
    netns::{self, NetNs},
    pacing::{Pacer, cpu_cost},
    probe::{Probe, ProbeOptions},
    reconcile::Reconciler,
    seed,
    snapshot::{Snapshot, StateCounts, by_state, live_counts},
    sockdiag::SockDiag,
};

/// The walk of the flow maps and the socket-table check each wait at least
/// this many times the CPU time their last run cost (at a million
/// connections a walk costs most of a second, a check seconds): at most a
/// tenth of a CPU each.
const PACING: u32 = 9;
/// The longest gap between walks: the walk files the timers due within
/// [`FILING_HORIZON`], so it must come round well inside it. A timer shorter
/// than the gap (a tcp_fin_timeout of a few seconds) may then fire up to a gap
/// late, and only when walks are slow (hundreds of thousands of flows).
const MAX_WALK_GAP: Duration = Duration::from_secs(5);
const _: () = assert!(2 * MAX_WALK_GAP.as_secs() <= FILING_HORIZON.as_secs());

#[derive(Clone, Debug)]
pub struct Config {
    pub netns: Option<String>,
    /// Interfaces to monitor; empty means every interface that is up.
    pub interfaces: Vec<String>,
    pub socket: PathBuf,
    pub probe: ProbeOptions,
    /// Print the counts once a second (on a terminal).
    pub print: bool,
    /// How often to reconcile with the socket table (`None`: never).
    pub reconcile_every: Option<Duration>,
    /// Ports and peers listed by name in snapshots and metrics; the rest is
    /// summed as "other".
    pub top_k: usize,
    /// Where to serve OpenMetrics (`None`: no endpoint).
    pub metrics: Option<std::net::SocketAddr>,
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
                    == Some(crate::probe::LOOPBACK_IFINDEX);
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
    pub fn reader(&mut self) -> Result<crate::reader::Reader> {
        let diag = self.ns.run_kept(SockDiag::open)?;
        let first = self.snapshot()?;
        crate::reader::Reader::new(self.probe.counters_map(), diag, first, self.started)
    }

    /// Drops every capability, on this thread and on the namespace thread:
    /// from here on the agent only uses descriptors it already holds.
    pub fn drop_privileges(&self) -> Result<()> {
        self.ns.run_kept(crate::privileges::drop_all)?;
        crate::privileges::drop_all()
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
            .filter(|(f, _)| matches!(f, crate::probe::FlowRef::V4(_)))
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
}

/// Runs the agent until SIGINT, SIGTERM or SIGHUP.
///
/// `stop` ends it too (the live view's `q` when the view runs in-process).
pub async fn run(
    cfg: Config,
    stop: Option<tokio::sync::oneshot::Receiver<()>>,
) -> anyhow::Result<()> {
    let socket_path = control::claim(&cfg.socket)?;
    let mut agent = Agent::start(&cfg)?;
    tracing::info!(
        "monitoring {} in {}; answering on {}",
        agent.probe.attached().join(", "),
        cfg.netns
            .as_deref()
            .map_or("the current network namespace".to_owned(), |n| format!(
                "network namespace {n:?}"
            )),
        socket_path.display()
    );
    let listener = UnixListener::bind(&socket_path)
        .map_err(|e| Error::io(format!("listening on {}", socket_path.display()), e))?;
    let _cleanup = RemoveOnDrop(socket_path.clone());
    let metrics = match cfg.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::io(format!("serving metrics on {addr}"), e))?,
        ),
        None => None,
    };
    let _probe_log = agent.probe.take_logger().and_then(|logger| {
        // The probe's records (map full, each command at debug) join the
        // agent's log as the ring buffer fills.
        // SAFETY: the logger owns its ring buffer's descriptor, which stays
        // open and the same until the logger (moved into the AsyncFd) drops.
        let mut ring = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        }
        .map_err(|e| tracing::warn!("reading the probe's log: {e}"))
        .ok()?;
        Some(AbortOnDrop(tokio::spawn(async move {
            while let Ok(mut ready) = ring.readable_mut().await {
                ready.get_inner_mut().flush();
                ready.clear_ready();
            }
        })))
    });
    let reader = Arc::new(agent.reader()?);
    agent.drop_privileges()?;
    tracing::debug!(
        "capabilities dropped (effective now: {:?})",
        crate::privileges::effective()
    );
    let agent = Arc::new(Mutex::new(agent));
    // The metrics task lives as long as this function (aborted on return).
    let _metrics = metrics.map(|listener| {
        tracing::info!(
            "metrics at http://{}/metrics",
            listener.local_addr().map_or("?".into(), |a| a.to_string())
        );
        AbortOnDrop(tokio::spawn(crate::metrics::serve(
            listener,
            Arc::clone(&reader),
        )))
    });
    // The control socket is served by its own task: answers never wait for
    // the maintenance below (which runs on blocking threads).
    let _control = {
        let (agent, reader) = (Arc::clone(&agent), Arc::clone(&reader));
        AbortOnDrop(tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let (agent, reader) = (Arc::clone(&agent), Arc::clone(&reader));
                        tokio::spawn(async move {
                            if let Err(e) = answer(stream, agent, reader).await {
                                tracing::debug!("control client: {e}");
                            }
                        });
                    }
                    Err(e) => tracing::warn!("control socket: {e}"),
                }
            }
        }))
    };
    let stop = async move {
        match stop {
            Some(rx) => {
                let _ = rx.await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::pin!(stop);

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // A closed terminal stops the agent as cleanly as Ctrl-C does.
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Timers fire within this of the kernel's.
    let mut timer_tick = tokio::time::interval(Duration::from_millis(50));
    let print = cfg.print && std::io::stdout().is_terminal();
    let mut walks = Pacer::new(Duration::from_secs(1), PACING, Some(MAX_WALK_GAP));
    let mut checks = cfg.reconcile_every.map(|every| {
        let mut p = Pacer::new(every, PACING, None);
        // The first check one period after the start (seeding just read the table).
        p.ran(std::time::Instant::now(), Duration::ZERO);
        p
    });
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => break,
            _ = &mut stop => break,
            _ = timer_tick.tick() => {
                let agent = Arc::clone(&agent);
                let fired = tokio::task::spawn_blocking(move || {
                    agent.lock().expect("agent lock").fire_timers()
                });
                if let Ok(Err(e)) = fired.await {
                    tracing::warn!("timers: {e}");
                }
            }
            _ = tick.tick() => {
                let (agent, publish_to) = (Arc::clone(&agent), Arc::clone(&reader));
                let now = std::time::Instant::now();
                let walk_due = walks.due(now);
                let reconcile_due = checks.as_ref().is_some_and(|p| p.due(now));
                let ran = tokio::task::spawn_blocking(move || {
                // Namespace reads first, without the lock.
                let ns = agent.lock().expect("agent lock").netns();
                let addrs = ns.run_kept(netns::local_addresses);
                let signals = ns.run_kept(|| Ok(KernelSignal::read_all()));
                let mut a = agent.lock().expect("agent lock");
                if let Err(e) = addrs.and_then(|addrs| a.set_local_addresses(&addrs)) {
                    tracing::warn!("reading the namespace's addresses failed: {e}");
                }
                let walked = walk_due.then(|| {
                    let (swept, took) = cpu_cost(|| a.sweep());
                    if let Err(e) = swept {
                        tracing::warn!("timer sweep failed: {e}");
                    }
                    tracing::debug!("flow map walk cost {took:?} of CPU");
                    took
                });
                match a.map_full_since_last() {
                    Ok(0) | Err(_) => {}
                    Ok(n) => tracing::warn!(
                        "flow map full: {n} new connections not tracked in the last second (capacity {} per address family; raise --max-flows)",
                        a.probe().max_flows().unwrap_or(0)
                    ),
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
                    Ok(s) => publish_to.publish(s),
                    Err(e) => tracing::warn!("reading counts failed: {e}"),
                }
                (walked, checked)
                });
                if let Ok((walked, checked)) = ran.await {
                    if let Some(took) = walked {
                        walks.ran(now, took);
                    }
                    if let (Some(took), Some(p)) = (checked, checks.as_mut()) {
                        p.ran(now, took);
                    }
                }
                if print {
                    match reader.snapshot() {
                        Ok(s) => print_line(&s),
                        Err(e) => tracing::warn!("reading counts failed: {e}"),
                    }
                }
            }
        }
    }
    tracing::info!("detaching");
    drop(agent);
    Ok(())
}

async fn answer(
    stream: tokio::net::UnixStream,
    agent: Arc<Mutex<Agent>>,
    reader: Arc<crate::reader::Reader>,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(read).read_line(&mut line),
    )
    .await??;
    let mut out = match line.as_str() {
        control::REQUEST => serde_json::to_vec(&reader.snapshot()?)?,
        // These read the flow map or the socket table: off the runtime thread.
        control::VERIFY => {
            let snap =
                tokio::task::spawn_blocking(move || agent.lock().expect("agent lock").verify())
                    .await??;
            serde_json::to_vec(&snap)?
        }
        _ => match line.strip_prefix(control::COUNT) {
            Some(filter) => {
                let filter: PortFilter = serde_json::from_str(filter)?;
                let counts = tokio::task::spawn_blocking(move || {
                    agent.lock().expect("agent lock").count_filtered(&filter)
                })
                .await??;
                serde_json::to_vec(&counts)?
            }
            None => anyhow::bail!("unknown request {line:?}"),
        },
    };
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}

fn print_line(s: &Snapshot) {
    let Some(counts) = s.state_counts() else {
        return;
    };
    let fields: Vec<String> = TcpState::REPORTED
        .iter()
        .zip(counts.0)
        .map(|(st, n)| format!("{}={n}", st.name()))
        .collect();
    println!("{}", fields.join(" "));
}

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

    fn meaning(self) -> &'static str {
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
                .map(|c| netns::snmp_counter("TcpExt", c))
                .sum()
        })
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
