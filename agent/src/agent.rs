//! The running agent: the probe attached in one namespace, the listening
//! sockets read from that namespace's socket table, the timer sweep, and the
//! control socket.

use std::{
    io::IsTerminal,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::programs::XdpMode;
use netlink_packet_sock_diag::inet::StateFlags;
use tcpstate_common::TcpState;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
    signal::unix::{SignalKind, signal},
};

use crate::{
    control,
    error::{Error, Result},
    expiry::{Timeouts, Timers},
    netns::{self, NetNs},
    probe::{Probe, ProbeOptions},
    reconcile::Reconciler,
    seed,
    snapshot::{Snapshot, StateCounts, by_state},
    sockdiag::SockDiag,
};

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
}

pub struct Agent {
    netns: Option<String>,
    ns: NetNs,
    probe: Probe,
    diag: SockDiag,
    timeouts: Timeouts,
    expired: u64,
    reconciler: Reconciler,
    timers: Timers,
    /// The kernel's TCPTimeWaitOverflow at the last look.
    tw_overflow: Option<u64>,
    /// Growth of TCPTimeWaitOverflow since the agent started.
    tw_overflow_seen: u64,
    /// Socket-table checks owed after such growth.
    checks_due: u8,
}

impl Agent {
    /// Loads the probe and attaches it in the configured namespace.
    pub fn start(cfg: &Config) -> Result<Agent> {
        let ns = match &cfg.netns {
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
                let mode = if loopback {
                    XdpMode::Skb
                } else {
                    cfg.probe.xdp_mode
                };
                probe.attach(iface, mode, loopback)?;
            }
            let mut diag = SockDiag::open()?;
            let timeouts = Timeouts::from_sysctls();
            // After attaching: from here on packets are seen, so every
            // connection is either seeded now or tracked from its packets.
            let seeded = seed::seed(&probe, &mut diag, &timeouts)?;
            log::info!(
                "seeded {} existing connections from the socket table ({} already tracked, {} refused: map full)",
                seeded.seeded,
                seeded.already,
                seeded.map_full
            );
            Ok((probe, diag, timeouts))
        })?;
        Ok(Agent {
            netns: cfg.netns.clone(),
            ns,
            probe,
            diag,
            timeouts,
            expired: 0,
            reconciler: Reconciler::default(),
            timers: Timers::default(),
            tw_overflow: None,
            tw_overflow_seen: 0,
            checks_due: 0,
        })
    }

    /// Watches the kernel's count of connections that closed without
    /// TIME_WAIT because `net.ipv4.tcp_max_tw_buckets` was reached. Their
    /// packets look like any other close, so the probe counts them in
    /// TIME_WAIT; when the count grows, two socket-table checks follow a
    /// second apart (a mismatch must hold for two), whether or not periodic
    /// reconciliation is on. Returns the growth.
    pub fn watch_tw_overflow(&mut self) -> Result<u64> {
        let now = self
            .ns
            .run(|| Ok(netns::snmp_counter("TcpExt", "TCPTimeWaitOverflow")))?;
        let Some(now) = now else { return Ok(0) };
        let grew = self
            .tw_overflow
            .map_or(0, |before| now.saturating_sub(before));
        self.tw_overflow = Some(now);
        if grew > 0 {
            self.tw_overflow_seen += grew;
            self.checks_due = 2;
        }
        Ok(grew)
    }

    /// Whether a socket-table check is owed now (and takes it).
    pub fn take_check_due(&mut self) -> bool {
        let due = self.checks_due > 0;
        self.checks_due = self.checks_due.saturating_sub(1);
        due
    }

    /// Follows the namespace's addresses (added or removed since the last call).
    pub fn refresh_addresses(&mut self) -> Result<()> {
        let addrs = self.ns.run(netns::local_addresses)?;
        self.probe.set_local_addresses(&addrs)
    }

    /// The counts now: states from the probe's counters, LISTEN from the
    /// socket table (listening sockets send no packets).
    pub fn snapshot(&mut self) -> Result<Snapshot> {
        let counters = self.probe.counters()?;
        let mut states = StateCounts::from_slots(&counters.states);
        let table = self.diag.count(StateFlags::LISTEN)?;
        states.set(TcpState::Listen, table[TcpState::Listen as usize]);
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

    /// Applies the kernel's timers to the flow map.
    pub fn sweep(&mut self) -> Result<()> {
        let stats = self.timers.walk(&self.probe, &self.timeouts)?;
        self.expired += stats.expired;
        Ok(())
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

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let socket_path = control::claim(&cfg.socket)?;
    let agent = Agent::start(&cfg)?;
    log::info!(
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
    let agent = Arc::new(Mutex::new(agent));

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    // A closed terminal stops the agent as cleanly as Ctrl-C does.
    let mut sighup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Timers fire within this of the kernel's.
    let mut timer_tick = tokio::time::interval(Duration::from_millis(50));
    let print = cfg.print && std::io::stdout().is_terminal();
    let mut last_reconcile = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => break,
            _ = timer_tick.tick() => {
                if let Err(e) = agent.lock().expect("agent lock").fire_timers() {
                    log::warn!("timers: {e}");
                }
            }
            _ = tick.tick() => {
                let mut a = agent.lock().expect("agent lock");
                if let Err(e) = a.refresh_addresses() {
                    log::warn!("reading the namespace's addresses failed: {e}");
                }
                if let Err(e) = a.sweep() {
                    log::warn!("timer sweep failed: {e}");
                }
                match a.watch_tw_overflow() {
                    Ok(0) => {}
                    Ok(n) => log::info!(
                        "{n} connections closed without TIME_WAIT (net.ipv4.tcp_max_tw_buckets reached): checking the socket table"
                    ),
                    Err(e) => log::warn!("reading TCPTimeWaitOverflow failed: {e}"),
                }
                let periodic = cfg
                    .reconcile_every
                    .is_some_and(|every| last_reconcile.elapsed() >= every);
                if a.take_check_due() || periodic {
                    last_reconcile = std::time::Instant::now();
                    match a.reconcile() {
                        Ok(0) => {}
                        Ok(n) => log::info!("reconciled {n} flows with the socket table"),
                        Err(e) => log::warn!("reconciliation failed: {e}"),
                    }
                }
                if print {
                    match a.snapshot() {
                        Ok(s) => print_line(&s),
                        Err(e) => log::warn!("reading counts failed: {e}"),
                    }
                }
            }
            conn = listener.accept() => {
                match conn {
                    Ok((stream, _)) => {
                        let agent = Arc::clone(&agent);
                        tokio::spawn(async move {
                            if let Err(e) = answer(stream, agent).await {
                                log::debug!("control client: {e}");
                            }
                        });
                    }
                    Err(e) => log::warn!("control socket: {e}"),
                }
            }
        }
    }
    log::info!("detaching");
    drop(agent);
    Ok(())
}

async fn answer(stream: tokio::net::UnixStream, agent: Arc<Mutex<Agent>>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(read).read_line(&mut line),
    )
    .await??;
    let snap = match line.as_str() {
        control::REQUEST => agent.lock().expect("agent lock").snapshot()?,
        control::VERIFY => agent.lock().expect("agent lock").verify()?,
        _ => anyhow::bail!("unknown request {line:?}"),
    };
    let mut out = serde_json::to_vec(&snap)?;
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

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
