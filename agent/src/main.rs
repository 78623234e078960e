//! `tcpstate`: TCP connection states of a Linux host, counted in the kernel.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use tcpstate::{
    client::{conns, control, count, view, watch},
    error::Error,
    kernel::probe::{Ingress, ProbeOptions},
    serve::{
        daemon::{self, Config},
        metrics,
    },
    snapshot::{PortFilter, PortSide, Snapshot, conns::ConnFilter, verify_table},
    tracking::{
        host::{self, Scope},
        timers::Timeouts,
    },
};

#[derive(Parser)]
#[command(
    version,
    about = "TCP connection states of a Linux host, counted exactly in the kernel by an eBPF probe"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach the probe and run in the foreground (prints the counts once a second on a terminal).
    Run(Box<RunArgs>),
    /// Print the eleven state counts of the running agent, one `STATE N` line
    /// each (with `run -A`: summed over every namespace of the host).
    Count {
        /// One JSON object mapping the state names to counts.
        #[arg(long)]
        json: bool,
        /// Print the socket table's counts beside tcpstate's and the
        /// difference; exit with status 1 when they differ.
        #[arg(long, conflicts_with_all = ["json", "port", "netns", "by_netns"])]
        verify: bool,
        /// One namespace's counts: an `ip netns` name, an inode number
        /// (`lsns -t net`), or pid:PID of a process in it.
        #[arg(long, value_name = "SEL")]
        netns: Option<String>,
        /// One row per namespace: inode, name, the eleven counts (with
        /// --json: an array of {netns, name, pid, states}).
        #[arg(long, conflicts_with_all = ["netns", "port"])]
        by_netns: bool,
        /// The connections passing through (`run --observe`), both
        /// endpoints of each, instead of the host's own.
        #[arg(long, conflicts_with_all = ["verify", "netns", "by_netns", "port"])]
        observed: bool,
        /// Only connections with this port (either end; see --local, --remote), like `ss '( sport = :N or dport = :N )'`.
        #[arg(long, value_name = "N")]
        port: Option<u16>,
        /// --port is the local port (ss `sport`).
        #[arg(long, requires = "port", conflicts_with = "remote")]
        local: bool,
        /// --port is the remote port (ss `dport`).
        #[arg(long, requires = "port")]
        remote: bool,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Print one snapshot of the running agent per interval: counts, rates, top ports and peers.
    Watch {
        /// One JSON object per line (for pipelines); otherwise a `STATE=N ...` line with rates.
        #[arg(long)]
        json: bool,
        /// Seconds between snapshots.
        #[arg(long, default_value_t = 1.0, value_name = "S")]
        interval: f64,
        /// Stop after this many snapshots (default: until interrupted).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// The connections themselves, as `ss -tan` lists them, with how long
    /// each has been in its state (`>=`: since before the agent watched)
    /// and, with --process, who holds it; the oldest first.
    Conns {
        /// Only this state (repeatable): close-wait, time-wait, estab, ...
        #[arg(long = "state", value_name = "S", value_parser = parse_state)]
        states: Vec<tcpstate_common::TcpState>,
        /// Only connections with this port at either end.
        #[arg(long, value_name = "N")]
        port: Option<u16>,
        /// Only those in their state this long or longer: 30s, 5m, 1h, 1.5s.
        #[arg(long, value_name = "DUR", value_parser = parse_duration)]
        older: Option<Duration>,
        /// The processes holding each socket, as `ss -p` finds them.
        #[arg(long)]
        process: bool,
        /// One namespace (as `count --netns`).
        #[arg(long, value_name = "SEL")]
        netns: Option<String>,
        /// One JSON array of {state, local, peer, age_s, age_at_least, owners, netns}.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// One row per listening address and port: the accept queue and its
    /// backlog (`ss -ltn` Recv-Q/Send-Q), handshakes under way (SYN_RECV),
    /// connections; and the namespace's ListenOverflows and ListenDrops.
    Listeners {
        /// One namespace (as `count --netns`).
        #[arg(long, value_name = "SEL")]
        netns: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Replay a capture (pcap, pcapng) through the probe's parser and state
    /// machine, on the capture's clock: the counts at its end or at a
    /// moment, a timeline, a Zeek-style connection log. No root, no BPF.
    Replay(Box<tcpstate::replay::cli::ReplayArgs>),
    /// Full-screen live view of the running agent (q quits; with -A, n
    /// focuses the next namespace, a all of them).
    Top {
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Focus one namespace at first (as `count --netns`).
        #[arg(long, value_name = "SEL")]
        netns: Option<String>,
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0, value_name = "S")]
        interval: f64,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Interface to monitor (repeatable). Default: every interface that is up, loopback included.
    #[arg(long = "iface", value_name = "IF")]
    interfaces: Vec<String>,
    /// Monitor the network namespace `ip netns add NAME` made; the agent itself stays where it is.
    #[arg(long, value_name = "NAME", conflicts_with = "all_namespaces")]
    netns: Option<String>,
    /// Monitor every network namespace of the host (the agent's own, `ip
    /// netns`, containers', those only a process holds), as they come and go.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Also count the connections that only pass through (a router, a
    /// bridge, a mirror port's feed), both endpoints of each, apart from
    /// the host's own: `count --observed`, tcpstate_observed_* metrics.
    /// Their timers are Linux's defaults unless --observe-timeouts says.
    #[arg(long, conflicts_with = "all_namespaces")]
    observe: bool,
    /// How long the observed connections' timed states last, where the
    /// ends' sysctls differ from Linux's defaults:
    /// time-wait=60s,fin-wait2=60s,syn-sent=131s,syn-recv=63s (any of them).
    #[arg(long, value_name = "STATE=DUR,...", value_parser = Timeouts::parse, requires = "observe")]
    observe_timeouts: Option<Timeouts>,
    /// Namespaces the probe has room for with --all-namespaces.
    #[arg(long, default_value_t = 1024, value_name = "N")]
    max_netns: u32,
    /// Flow-map entries one namespace may hold with --all-namespaces, so a
    /// flood in one cannot refuse another's connections (0: no share; the
    /// default is a quarter of --max-flows).
    #[arg(long, value_name = "N")]
    max_flows_per_netns: Option<u32>,
    /// Control socket that `tcpstate count`, `watch` and `top` ask.
    #[arg(long, default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// With --all-namespaces: the Docker daemon's socket, asked for the
    /// names of containers (a daemon not there is tried again every 2 s).
    #[arg(long, default_value = tcpstate::names::docker::DEFAULT_SOCKET, value_name = "PATH")]
    docker_socket: PathBuf,
    /// With --all-namespaces: podman's API socket (`podman system service`,
    /// Docker's API), asked for the names of its containers.
    #[arg(long, default_value = tcpstate::names::docker::PODMAN_SOCKET, value_name = "PATH")]
    podman_socket: PathBuf,
    /// With --all-namespaces: a Kubernetes CRI runtime's socket (containerd,
    /// CRI-O), asked for the pods; repeat for several. By default
    /// containerd's and CRI-O's usual sockets (one not there is tried again
    /// every 5 s).
    #[arg(long = "cri-socket", value_name = "PATH", default_values = tcpstate::names::cri::DEFAULT_SOCKETS)]
    cri_sockets: Vec<PathBuf>,
    /// Let this group's members use the control socket (`count`, `watch`,
    /// `top`) without root; by default only root may.
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// TLS and basic auth for --metrics, in the format of the Prometheus
    /// exporter-toolkit's web-config.yml (tls_server_config,
    /// basic_auth_users with bcrypt hashes), as node_exporter reads it.
    #[arg(long, visible_alias = "web.config.file", value_name = "FILE")]
    web_config_file: Option<PathBuf>,
    /// Connections tracked at once per address family (flow map capacity); beyond it new flows are counted as map_full.
    #[arg(long, default_value_t = 262_144)]
    max_flows: u32,
    /// The hook that sees arriving packets: tc (TC ingress, no copy: the
    /// cheapest without native XDP), xdp (generic XDP: copies segmented
    /// skbs), xdp-native (driver XDP, for NICs that support it).
    #[arg(long, value_enum, default_value_t = Mode::Tc)]
    ingress: Mode,
    /// Do not print the counts every second.
    #[arg(long)]
    quiet: bool,
    /// Seconds between reconciliations with the socket table (0: never).
    /// Mismatches seen at two checks in a row are corrected. With very many
    /// connections checks come less often: each waits at least nine times the
    /// CPU time the last one cost.
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    reconcile_interval: u64,
    /// Serve OpenMetrics at http://ADDR/metrics: PORT or :PORT (on 127.0.0.1), or ADDRESS:PORT.
    #[arg(long, value_name = "ADDR", value_parser = metrics::parse_listen)]
    metrics: Option<std::net::SocketAddr>,
    /// Ports and peers named in snapshots and metrics (the rest is summed as "other").
    #[arg(long, default_value_t = 10, value_name = "K")]
    top_k: usize,
    /// Open the full-screen live view in this terminal; quitting it stops the agent.
    #[arg(long, conflicts_with = "quiet")]
    top: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// TC ingress (tcx).
    Tc,
    /// Generic (skb) XDP.
    Xdp,
    /// Driver (native) XDP.
    XdpNative,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run(args) => run(*args),
        Cmd::Count {
            json,
            verify,
            netns,
            by_netns,
            observed,
            port,
            local,
            remote,
            socket,
        } => {
            logging(None);
            let result = if verify {
                control::verify(&socket).map(|snap| print_verify(&snap))
            } else {
                let filter = PortFilter {
                    port,
                    side: match (local, remote) {
                        (true, _) => PortSide::Local,
                        (_, true) => PortSide::Remote,
                        _ => PortSide::Any,
                    },
                    netns: None,
                };
                let ask = count::Ask {
                    json,
                    filter,
                    netns,
                    by_netns,
                    observed,
                };
                count::run(&socket, &ask)
            };
            result.unwrap_or_else(|e| client_error(&e))
        }
        Cmd::Watch {
            json,
            interval,
            count,
            socket,
        } => {
            logging(None);
            finish(watch::run(&socket, seconds(interval), json, count))
        }
        Cmd::Conns {
            states,
            port,
            older,
            process,
            netns,
            json,
            socket,
        } => {
            logging(None);
            let filter = ConnFilter {
                states: states.iter().map(|s| *s as u8).collect(),
                port,
                older_s: older.map(|d| d.as_secs_f64()),
                process,
                netns: None,
            };
            finish(conns::run(&socket, filter, netns.as_deref(), json))
        }
        Cmd::Listeners {
            netns,
            json,
            socket,
        } => {
            logging(None);
            finish(conns::listeners(&socket, netns.as_deref(), json))
        }
        Cmd::Replay(args) => tcpstate::replay::cli::main(&args),
        Cmd::Top {
            socket,
            netns,
            interval,
        } => {
            logging(None);
            finish(view::run(
                &socket,
                seconds(interval),
                None,
                netns.as_deref(),
            ))
        }
    }
}

fn parse_state(s: &str) -> Result<tcpstate_common::TcpState, String> {
    tcpstate::snapshot::conns::parse_state(s).ok_or_else(|| {
        format!("no TCP state {s:?} (established, syn-sent, syn-recv, fin-wait-1, fin-wait-2, time-wait, close, close-wait, last-ack, listen, closing)")
    })
}

/// `30s`, `5m`, `1h`, `250ms`, or plain seconds (`1.5`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m, 1h"))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(format!("{s:?}: the unit is one of ms, s, m, h, d")),
    };
    if !(n * scale).is_finite() || n < 0.0 {
        return Err(format!("{s:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(n * scale))
}

fn seconds(s: f64) -> Duration {
    Duration::from_secs_f64(s.clamp(0.05, 3600.0))
}

/// Logs through `tracing` to stderr (or to `file`), at `RUST_LOG`'s level
/// (default info; the probe's own log records appear at debug).
fn logging(file: Option<&std::path::Path>) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match file.and_then(|f| std::fs::File::create(f).ok()) {
        Some(f) => builder
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(f))
            .init(),
        None => builder.with_writer(std::io::stderr).init(),
    }
}

/// A client's exit: success, or its error as one line.
fn finish(r: Result<(), Error>) -> ExitCode {
    r.map_or_else(|e| client_error(&e), |()| ExitCode::SUCCESS)
}

fn client_error(e: &Error) -> ExitCode {
    eprintln!("tcpstate: {e}");
    match e {
        Error::NoAgent(_) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

fn print_verify(snap: &Snapshot) -> ExitCode {
    let (Some(counts), Some(kernel)) = (snap.state_counts(), snap.kernel_counts()) else {
        eprintln!("tcpstate: the agent's answer lacks the counts to compare");
        return ExitCode::FAILURE;
    };
    let (table, same) = verify_table(&counts, &kernel);
    print!("{table}");
    // The probe's own invariant: counters equal what the entries hold (map
    // full, evictions and races included).
    let consistent = snap.entry_counts() == Some(counts);
    if consistent {
        println!("flow map: counters agree with its entries");
    } else {
        println!(
            "flow map: COUNTERS DIFFER FROM ITS ENTRIES: {:?}",
            snap.entries
        );
    }
    let refused = snap
        .events
        .get("map_full")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    if refused > 0 {
        println!(
            "flow map: {refused} new flows refused because the map ({} entries) was full",
            snap.flow_map_capacity
        );
    }
    if same && consistent {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run(args: RunArgs) -> ExitCode {
    let log_file = args.top.then(|| args.socket.with_extension("log"));
    if let Some(f) = &log_file
        && let Some(dir) = f.parent()
    {
        let _ = std::fs::create_dir_all(dir);
    }
    logging(log_file.as_deref());
    raise_descriptor_limit();
    let cfg = Config {
        agent: host::Config {
            scope: if args.all_namespaces {
                Scope::All
            } else {
                Scope::One(args.netns)
            },
            interfaces: args.interfaces,
            probe: ProbeOptions {
                max_flows: args.max_flows,
                ingress: match args.ingress {
                    Mode::Tc => Ingress::Tc,
                    Mode::Xdp => Ingress::XdpGeneric,
                    Mode::XdpNative => Ingress::XdpNative,
                },
                max_netns: args.max_netns,
                flows_per_netns: if args.all_namespaces {
                    args.max_flows_per_netns.unwrap_or(args.max_flows / 4)
                } else {
                    0
                },
                observe: args.observe,
            },
            top_k: args.top_k,
            observed_timeouts: args.observe_timeouts.clone().unwrap_or_default(),
        },
        socket: args.socket.clone(),
        print: !args.quiet && !args.top,
        reconcile_every: (args.reconcile_interval > 0)
            .then(|| Duration::from_secs(args.reconcile_interval)),
        metrics: args.metrics,
        docker_socket: args.docker_socket,
        podman_socket: args.podman_socket,
        cri_sockets: args.cri_sockets,
        socket_group: args.socket_group,
        web_config: args.web_config_file,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = if args.top {
        // The view runs on its own thread as a client of the control socket;
        // quitting it stops the agent, and the agent stopping ends the view.
        let (stop_agent, stopped) = tokio::sync::oneshot::channel();
        let (agent_done, done) = std::sync::mpsc::channel::<()>();
        let socket = args.socket.clone();
        let log = log_file.clone();
        let viewer = std::thread::spawn(move || {
            // The view needs no privilege: it is a client of the socket.
            let r = tcpstate::kernel::privileges::drop_all().and_then(|()| {
                view::run_in_process(&socket, Duration::from_secs(1), log.as_deref(), done)
            });
            let _ = stop_agent.send(());
            r
        });
        let r = rt.block_on(daemon::run(cfg, Some(stopped)));
        drop(agent_done);
        match viewer.join() {
            Ok(Err(e)) if r.is_ok() => Err(e.into()),
            _ => r,
        }
    } else {
        rt.block_on(daemon::run(cfg, None))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(f) = &log_file {
                eprintln!("tcpstate: {e:#} (log: {})", f.display());
            } else {
                eprintln!("tcpstate: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open descriptors to the hard one: every
/// monitored namespace holds a few (its links, entry programs, sock_diag
/// socket), and the metrics endpoint up to its connection cap, beyond the
/// 1,024 a service gets by default.
fn raise_descriptor_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!("raising the descriptor limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("reading the descriptor limit: {e}"),
    }
}
