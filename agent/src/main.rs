//! `tcpstate`: TCP connection states of a Linux host, counted in the kernel.

use std::{path::PathBuf, process::ExitCode};

use aya::programs::XdpMode;
use clap::{Parser, Subcommand, ValueEnum};
use tcpstate::{
    agent::{self, Config},
    control,
    error::Error,
    probe::ProbeOptions,
    snapshot::verify_table,
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
    Run {
        /// Interface to monitor (repeatable). Default: every interface that is up, loopback included.
        #[arg(long = "iface", value_name = "IF")]
        interfaces: Vec<String>,
        /// Monitor the network namespace `ip netns add NAME` made; the agent itself stays where it is.
        #[arg(long, value_name = "NAME")]
        netns: Option<String>,
        /// Control socket that `tcpstate count` asks.
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Connections tracked at once (flow map capacity); beyond it new flows are counted as map_full.
        #[arg(long, default_value_t = 262_144)]
        max_flows: u32,
        /// XDP attach mode on non-loopback interfaces.
        #[arg(long, value_enum, default_value_t = Mode::Skb)]
        xdp_mode: Mode,
        /// Do not print the counts every second.
        #[arg(long)]
        quiet: bool,
        /// Seconds between reconciliations with the socket table (0: never).
        /// Mismatches seen at two checks in a row are corrected.
        #[arg(long, default_value_t = 10, value_name = "SECS")]
        reconcile_interval: u64,
    },
    /// Print the eleven state counts of the running agent, one `STATE N` line each.
    Count {
        /// One JSON object mapping the state names to counts.
        #[arg(long)]
        json: bool,
        /// Print the socket table's counts beside tcpstate's and the
        /// difference; exit with status 1 when they differ.
        #[arg(long, conflicts_with = "json")]
        verify: bool,
        #[arg(long, default_value = control::DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// Generic XDP: works everywhere and keeps segmentation offloads.
    Skb,
    /// Driver (native) XDP.
    Native,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Cmd::Run {
            interfaces,
            netns,
            socket,
            max_flows,
            xdp_mode,
            quiet,
            reconcile_interval,
        } => {
            let cfg = Config {
                netns,
                interfaces,
                socket,
                probe: ProbeOptions {
                    max_flows,
                    xdp_mode: match xdp_mode {
                        Mode::Skb => XdpMode::Skb,
                        Mode::Native => XdpMode::Driver,
                    },
                },
                print: !quiet,
                reconcile_every: (reconcile_interval > 0)
                    .then(|| std::time::Duration::from_secs(reconcile_interval)),
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            match rt.block_on(agent::run(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tcpstate: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Count {
            json,
            verify,
            socket,
        } => match if verify {
            control::verify(&socket)
        } else {
            control::query(&socket)
        } {
            Ok(snap) => {
                let Some(counts) = snap.state_counts() else {
                    eprintln!("tcpstate: the agent's answer has no state counts");
                    return ExitCode::FAILURE;
                };
                if verify {
                    let Some(kernel) = snap.kernel_counts() else {
                        eprintln!("tcpstate: the agent's answer has no socket table counts");
                        return ExitCode::FAILURE;
                    };
                    let (table, same) = verify_table(&counts, &kernel);
                    print!("{table}");
                    // The probe's own invariant: counters equal what the
                    // entries hold (map full, evictions and races included).
                    let consistent = snap.entry_counts() == Some(counts);
                    if consistent {
                        println!("flow map: counters agree with its entries");
                    } else {
                        println!(
                            "flow map: COUNTERS DIFFER FROM ITS ENTRIES: {:?}",
                            snap.entries
                        );
                    }
                    let events =
                        |name: &str| snap.events.get(name).and_then(|v| v.as_u64()).unwrap_or(0);
                    if events("map_full") > 0 {
                        println!(
                            "flow map: {} new flows refused because the map ({} entries) was full",
                            events("map_full"),
                            snap.flow_map_capacity
                        );
                    }
                    return if same && consistent {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    };
                }
                if json {
                    println!("{}", counts.json());
                } else {
                    print!("{}", counts.lines());
                }
                ExitCode::SUCCESS
            }
            Err(e @ Error::NoAgent(_)) => {
                eprintln!("tcpstate: {e}");
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("tcpstate: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
