//! `tcpstate run`: the agent's main loop. It owns the [`Host`] (the probe
//! and a tracker per monitored namespace), runs its maintenance on blocking
//! threads, and answers the control socket and the metrics endpoint.

use std::{
    io::IsTerminal,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tcpstate_common::{Ask, TcpState};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::UnixListener,
    signal::unix::{SignalKind, signal},
    sync::Notify,
};

use crate::{
    error::Error,
    kernel::links::LinkWatch,
    serve::{control, tick},
    snapshot::Snapshot,
    tracking::{
        host::{self, Host, Scope},
        pacing::Pacer,
        timers::FILING_HORIZON,
    },
};

/// The walk of the flow maps and the socket-table check each wait at least
/// this many times the CPU time their last run cost (at a million
/// connections a walk costs most of a second, a check seconds): at most a
/// tenth of a CPU each.
const PACING: u32 = 9;

/// The starter's pause between steps while namespaces wait, and its look
/// at the queue otherwise (a tick queues what it found).
const STARTER_PAUSE: Duration = Duration::from_millis(10);
const STARTER_IDLE: Duration = Duration::from_millis(200);
/// The longest gap between walks: the walk files the timers due within
/// [`FILING_HORIZON`], so it must come round well inside it. A timer shorter
/// than the gap (a tcp_fin_timeout of a few seconds) may then fire up to a gap
/// late, and only when walks are slow (hundreds of thousands of flows).
const MAX_WALK_GAP: Duration = Duration::from_secs(5);
const _: () = assert!(2 * MAX_WALK_GAP.as_secs() <= FILING_HORIZON.as_secs());

/// The agent's configuration and how the daemon around it runs.
#[derive(Clone, Debug)]
pub struct Config {
    pub agent: host::Config,
    pub socket: PathBuf,
    /// Print the counts once a second (on a terminal).
    pub print: bool,
    /// How often to reconcile with the socket table (`None`: never).
    pub reconcile_every: Option<Duration>,
    /// Where to serve OpenMetrics (`None`: no endpoint).
    pub metrics: Option<std::net::SocketAddr>,
    /// With every namespace: the Docker daemon asked for container names.
    pub docker_socket: PathBuf,
    /// With every namespace: podman's API service asked for container names.
    pub podman_socket: PathBuf,
    /// With every namespace: the CRI runtimes asked for pod names.
    pub cri_sockets: Vec<PathBuf>,
    /// The group whose members may use the control socket (else root only).
    pub socket_group: Option<String>,
    /// TLS and basic auth for the metrics endpoint (exporter-toolkit's
    /// web-config.yml).
    pub web_config: Option<PathBuf>,
}

/// Runs the agent until SIGINT, SIGTERM or SIGHUP.
///
/// `stop` ends it too (the live view's `q` when the view runs in-process).
pub async fn run(
    cfg: Config,
    stop: Option<tokio::sync::oneshot::Receiver<()>>,
) -> anyhow::Result<()> {
    // A bad web config is said before anything is loaded or attached.
    let web = Arc::new(match &cfg.web_config {
        Some(p) => crate::serve::metrics::web_config::WebConfig::load(p)?,
        None => Default::default(),
    });
    let socket_path = control::claim(&cfg.socket)?;
    let mut agent = Host::start(&cfg.agent)?;
    let what = match &cfg.agent.scope {
        Scope::All => format!("every network namespace ({} now)", agent.trackers().count()),
        Scope::One(Some(n)) => format!("network namespace {n:?}"),
        Scope::One(None) => "the current network namespace".to_owned(),
    };
    tracing::info!(
        "monitoring {} in {what}; answering on {}",
        agent.probe().attached().join(", "),
        socket_path.display()
    );
    let listener = UnixListener::bind(&socket_path)
        .map_err(|e| Error::io(format!("listening on {}", socket_path.display()), e))?;
    let _cleanup = RemoveOnDrop(socket_path.clone());
    control::restrict(&socket_path, cfg.socket_group.as_deref())?;
    let metrics = match cfg.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::io(format!("serving metrics on {addr}"), e))?,
        ),
        None => None,
    };
    let _probe_log = agent.probe_mut().take_logger().and_then(|logger| {
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
    let asks = agent.probe_mut().take_asks();
    let notices = agent.probe_mut().take_notices();
    // One namespace: its link events wake the agent at once. With every
    // namespace, each tick looks at every namespace's interfaces.
    let links = match cfg.agent.scope {
        Scope::One(_) => agent.first().and_then(|t| {
            t.link_watch()
                .map_err(|e| tracing::warn!("{e}: interfaces added later will not be followed"))
                .ok()
        }),
        Scope::All => None,
    };
    let reader = Arc::new(agent.reader()?);
    agent.drop_privileges()?;
    tracing::debug!(
        "capabilities dropped (effective now: {:?})",
        crate::kernel::privileges::effective()
    );
    let agent = Arc::new(Mutex::new(agent));
    // The metrics task lives as long as this function (aborted on return).
    let _metrics = metrics.map(|listener| {
        tracing::info!(
            "metrics at {}://{}/metrics{}",
            if web.tls.is_some() { "https" } else { "http" },
            listener.local_addr().map_or("?".into(), |a| a.to_string()),
            if web.auth.is_some() {
                " (basic auth)"
            } else {
                ""
            }
        );
        AbortOnDrop(tokio::spawn(crate::serve::metrics::serve(
            listener,
            Arc::clone(&reader),
            Arc::clone(&web),
        )))
    });
    // The control socket is served by its own task: answers never wait for
    // the maintenance below (which runs on blocking threads).
    let _control = {
        let (agent, reader) = (Arc::clone(&agent), Arc::clone(&reader));
        let recent = control::Recent::default();
        AbortOnDrop(tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let (agent, reader) = (Arc::clone(&agent), Arc::clone(&reader));
                        let recent = recent.clone();
                        tokio::spawn(async move {
                            if let Err(e) = control::answer(stream, agent, reader, recent).await {
                                tracing::debug!("control client: {e}");
                            }
                        });
                    }
                    Err(e) => tracing::warn!("control socket: {e}"),
                }
            }
        }))
    };
    // A question is due within milliseconds: filing one wakes the timers.
    let asked = Arc::new(Notify::new());
    let _questions = asks.map(|ring| questions(ring, Arc::clone(&agent), Arc::clone(&asked)));
    // Notices of timed states: the same records, filed the same way.
    let _notices = notices.map(|ring| questions(ring, Arc::clone(&agent), Arc::clone(&asked)));
    let _links = links.map(|watch| follow(watch, Arc::clone(&agent)));
    let all = cfg.agent.scope == Scope::All;
    let _starter = all.then(|| AbortOnDrop(tokio::spawn(starter(Arc::clone(&agent)))));
    // Container names from Docker and pod names from the CRI runtimes,
    // where they run (each tried again while it does not answer).
    let names = agent.lock().expect("agent lock").names.clone();
    let mut _namers = Vec::new();
    if all {
        use crate::names::docker::{Engine, follow};
        let engines = [
            (&cfg.docker_socket, Engine::Docker),
            (&cfg.podman_socket, Engine::Podman),
        ];
        for (socket, engine) in engines {
            let watcher = follow(socket.clone(), names.clone(), engine);
            _namers.push(AbortOnDrop(tokio::spawn(watcher)));
        }
        for socket in &cfg.cri_sockets {
            let cri = crate::names::cri::follow(socket.clone(), names.clone());
            _namers.push(AbortOnDrop(tokio::spawn(cri)));
        }
    }
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
    // The once-a-second maintenance runs as its own task: a tick that waits
    // (a netlink dump behind the kernel's rtnl lock while another namespace
    // is torn down) must not hold the timers back.
    let _maintenance = AbortOnDrop(tokio::spawn(maintain(
        Arc::clone(&agent),
        Arc::clone(&reader),
        cfg.reconcile_every,
        cfg.print && std::io::stdout().is_terminal(),
    )));
    // Timers fire when the kernel's do (their batch draining as the
    // kernel's does), and what a walk or the probe filed meanwhile is
    // looked at within TIMER_LOOK.
    let mut next_fire = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = sighup.recv() => break,
            _ = &mut stop => break,
            _ = asked.notified() => next_fire = tokio::time::Instant::now(),
            _ = tokio::time::sleep_until(next_fire) => {
                let agent = Arc::clone(&agent);
                let fired = tokio::task::spawn_blocking(move || {
                    agent.lock().expect("agent lock").fire_timers()
                });
                let next = match fired.await {
                    Ok(Ok(next)) => next,
                    Ok(Err(e)) => {
                        tracing::warn!("timers: {e}");
                        None
                    }
                    Err(_) => None,
                };
                next_fire = next_timer(next);
            }
        }
    }
    tracing::info!("detaching");
    drop(agent);
    Ok(())
}

/// Reads the probe's questions as they come and files them with the agent.
fn questions(
    ring: RingBuf<MapData>,
    agent: Arc<Mutex<Host>>,
    asked: Arc<Notify>,
) -> Option<AbortOnDrop<()>> {
    // SAFETY: the ring owns its descriptor, which stays open and the same
    // until the ring (moved into the AsyncFd) drops.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| tracing::warn!("reading the probe's questions: {e}"))
        .ok()?;
    Some(AbortOnDrop(tokio::spawn(async move {
        while let Ok(mut ready) = ring.readable_mut().await {
            let mut got = Vec::new();
            while let Some(item) = ready.get_inner_mut().next() {
                if item.len() >= std::mem::size_of::<Ask>() {
                    // SAFETY: the probe writes whole `Ask` records; read
                    // unaligned from the ring's bytes.
                    got.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Ask>()) });
                }
            }
            ready.clear_ready();
            if !got.is_empty() {
                agent.lock().expect("agent lock").questions(got);
                asked.notify_one();
            }
        }
    })))
}

/// Follows the namespace's link and address events.
fn follow(watch: LinkWatch, agent: Arc<Mutex<Host>>) -> Option<AbortOnDrop<()>> {
    // SAFETY: the watch owns its socket, which stays open and the same until
    // the watch (moved into the AsyncFd) drops.
    let mut watch = unsafe { AsyncFd::register_with_interest(watch, Interest::READABLE) }
        .map_err(|e| tracing::warn!("following interfaces: {e}"))
        .ok()?;
    Some(AbortOnDrop(tokio::spawn(async move {
        while let Ok(mut ready) = watch.readable_mut().await {
            let drained = ready.get_inner_mut().drain();
            ready.clear_ready();
            match drained {
                Ok((events, overrun)) if !events.is_empty() || overrun => {
                    let agent = Arc::clone(&agent);
                    let _ = tokio::task::spawn_blocking(move || tick::follow_links(&agent)).await;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("{e}"),
            }
        }
    })))
}

/// With every namespace: starts the namespaces each tick's look queued, in
/// short steps of the host's lock with a pause between them, so that the
/// timers, the ticks and the control socket's `--verify` get the lock in
/// between. Starts are as fast as the kernel attaches links.
async fn starter(agent: Arc<Mutex<Host>>) {
    loop {
        let agent = Arc::clone(&agent);
        let more = tokio::task::spawn_blocking(move || tick::start_step(&agent))
            .await
            .unwrap_or(false);
        let pause = if more { STARTER_PAUSE } else { STARTER_IDLE };
        tokio::time::sleep(pause).await;
    }
}

/// Once a second: the namespace's addresses and sysctls, the walk of the
/// flow maps and the socket-table check when their pacers allow, and the
/// counts printed when asked.
async fn maintain(
    agent: Arc<Mutex<Host>>,
    reader: Arc<crate::serve::reader::Reader>,
    reconcile_every: Option<Duration>,
    print: bool,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut walks = Pacer::new(Duration::from_secs(1), PACING, Some(MAX_WALK_GAP));
    let mut checks = reconcile_every.map(|every| {
        let mut p = Pacer::new(every, PACING, None);
        // The first check one period after the start (seeding just read the table).
        p.ran(std::time::Instant::now(), Duration::ZERO);
        p
    });
    let mut stood_aside = 0u32;
    loop {
        tick.tick().await;
        let (agent, publish_to) = (Arc::clone(&agent), Arc::clone(&reader));
        let now = std::time::Instant::now();
        // The walk and the check hold the agent's lock for tens of
        // milliseconds: not while a timer (a TIME_WAIT batch draining with
        // the kernel's) is about to fire. They run at the next tick, or the
        // one after: where timers are always due, they never wait longer.
        let timer_soon = agent
            .lock()
            .expect("agent lock")
            .next_timer_ns()
            .is_some_and(|at| at < crate::tracking::timers::monotonic_ns() + TIMER_CLEARANCE_NS);
        let aside = timer_soon && stood_aside < 2;
        stood_aside = if aside { stood_aside + 1 } else { 0 };
        let walk_due = walks.due(now) && !aside;
        // A round of checks is spread over its period (the round only
        // starts when the last one is over).
        let round_due = checks
            .as_ref()
            .filter(|p| p.due(now) && !aside)
            .and(reconcile_every)
            .map(|every| every.as_secs().clamp(1, u32::MAX as u64) as u32);
        let ran = tokio::task::spawn_blocking(move || {
            tick::tick(&agent, &publish_to, walk_due, round_due)
        });
        let ran = ran.await;
        if now.elapsed() > Duration::from_millis(500) {
            tracing::debug!("maintenance took {:?}", now.elapsed());
        }
        if let Ok(ran) = ran {
            if let Some(took) = ran.walked {
                walks.ran(now, took);
            }
            if let (Some((started, took)), Some(p)) = (ran.checked, checks.as_mut()) {
                p.ran(started, took);
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

/// How far ahead of a due timer the walk and the check stand aside.
const TIMER_CLEARANCE_NS: u64 = 300_000_000;

/// The longest the timer task sleeps: a walk files new deadlines, the probe
/// puts questions, without waking it.
const TIMER_LOOK: Duration = Duration::from_millis(50);

/// When the timer task wakes next: at the next deadline (CLOCK_MONOTONIC
/// ns), at most [`TIMER_LOOK`] from now.
fn next_timer(next_ns: Option<u64>) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let wait = next_ns.map_or(TIMER_LOOK, |at| {
        Duration::from_nanos(at.saturating_sub(crate::tracking::timers::monotonic_ns()))
    });
    now + wait.min(TIMER_LOOK)
}
