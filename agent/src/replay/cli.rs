//! `tcpstate replay`'s command line, and what it prints.

use std::{process::ExitCode, time::Duration};

use clap::Args;

use super::{
    Options, Summary,
    local::{Locals, Prefix},
    output::Timeline,
    time::{self, Moment},
};
use crate::{
    error::{Error, Result},
    tracking::timers::Timeouts,
};

#[derive(Args)]
pub struct ReplayArgs {
    /// A pcap or pcapng capture (`-`: standard input), of link type
    /// Ethernet, Linux cooked (SLL, SLL2: `tcpdump -i any`), raw IP or BSD
    /// loopback.
    #[arg(value_name = "FILE")]
    pub file: String,
    /// The capturing host's addresses (repeatable; ADDR or ADDR/PREFIX):
    /// only its endpoints are counted, so the counts are what `ss -tan` on
    /// it showed (loopback is always its own).
    #[arg(long = "local", value_name = "ADDR[/PREFIX]")]
    pub locals: Vec<String>,
    /// Count both endpoints of every connection, as a middlebox sees them
    /// (the default without --local).
    #[arg(long, conflicts_with = "locals")]
    pub observe: bool,
    /// The counts at this moment of the capture instead of at its end:
    /// +DURATION after its first frame (+90s, +2.5), epoch seconds, or a
    /// UTC time (2026-12-07T12:03:05Z).
    #[arg(long, value_name = "TIME", value_parser = Moment::parse)]
    pub at: Option<Moment>,
    /// A timeline instead: the counts every DURATION (500ms, 10s, 1m) of
    /// capture time, one JSON object per line (or CSV with --csv), and at
    /// the last frame.
    #[arg(long, value_name = "DURATION", value_parser = parse_every, conflicts_with = "at")]
    pub every: Option<Duration>,
    /// The timeline as CSV: time, offset_s, then the eleven counts.
    #[arg(long, requires = "every")]
    pub csv: bool,
    /// The counts as one JSON object.
    #[arg(long, conflicts_with = "every")]
    pub json: bool,
    /// Write a connection log to FILE (`-`: standard output) in the layout
    /// of Zeek's conn.log, with orig_tcp_state and resp_tcp_state added.
    #[arg(long, value_name = "FILE")]
    pub conns: Option<String>,
    /// How long the timed states last, as Linux's defaults unless given:
    /// time-wait=60s,fin-wait2=60s,syn-sent=131s,syn-recv=63s (any of them).
    #[arg(long, value_name = "STATE=DUR,...", value_parser = Timeouts::parse)]
    pub timeouts: Option<Timeouts>,
    /// Run the frames through the eBPF probe itself (loaded, not attached:
    /// BPF_PROG_TEST_RUN) instead of the host's copy of its code; needs
    /// root, and single addresses with --local (or none: it observes, as
    /// `run --observe` does). The kernel's timers are not applied.
    #[arg(long, conflicts_with_all = ["at", "every", "conns"])]
    pub kernel: bool,
    /// No summary line on standard error.
    #[arg(long, short)]
    pub quiet: bool,
}

fn parse_every(s: &str) -> std::result::Result<Duration, String> {
    match time::duration(s) {
        Some(d) if d >= Duration::from_millis(1) => Ok(d),
        _ => Err(format!(
            "{s:?}: give a duration of 1ms or more (500ms, 10s, 1m)"
        )),
    }
}

impl ReplayArgs {
    fn options(&self) -> Result<Options> {
        let locals = if self.locals.is_empty() {
            Locals::Observe
        } else {
            Locals::Host(
                self.locals
                    .iter()
                    .map(|s| Prefix::parse(s))
                    .collect::<Result<_>>()?,
            )
        };
        let kind = if self.csv {
            Timeline::Csv
        } else {
            Timeline::Json
        };
        Ok(Options {
            input: self.file.clone(),
            locals,
            timeouts: self.timeouts.clone().unwrap_or_default(),
            at: self.at,
            every: self.every.map(|d| (d, kind)),
            conns: self.conns.clone(),
        })
    }
}

/// Runs `tcpstate replay`: 0 when the whole capture was read, 1 when it
/// could not be (what was read is still printed), 2 on bad arguments.
pub fn main(args: &ReplayArgs) -> ExitCode {
    if args.kernel {
        return kernel_main(args);
    }
    let result = args.options().and_then(|o| super::run(&o));
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tcpstate replay: {e}");
            return ExitCode::from(match e {
                Error::Usage(_) => 2,
                _ => 1,
            });
        }
    };
    let status = match print(args, &summary) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcpstate replay: {e}");
            ExitCode::FAILURE
        }
    };
    if !args.quiet {
        eprintln!("tcpstate replay: {}", describe(&args.file, &summary));
    }
    if let Some(e) = &summary.error {
        eprintln!("tcpstate replay: {e}");
        return ExitCode::FAILURE;
    }
    status
}

fn print(args: &ReplayArgs, s: &Summary) -> Result<()> {
    // The timeline, or a log on standard output, is the output then.
    if args.every.is_some() || args.conns.as_deref() == Some("-") {
        return Ok(());
    }
    let counts = match (args.at, s.at) {
        (None, _) => s.counts,
        (Some(_), Some((at, c))) => {
            if at > s.last_ns && !args.quiet {
                eprintln!(
                    "tcpstate replay: --at is {:.3} s after the last frame: the counts assume nothing happened since",
                    (at - s.last_ns) as f64 / 1e9
                );
            }
            c
        }
        (Some(m), None) => {
            return Err(Error::Usage(format!(
                "--at {}: the capture begins at {} (its last frame is at {})",
                time::rfc3339(m.resolve(s.first_ns)),
                time::rfc3339(s.first_ns),
                time::rfc3339(s.last_ns)
            )));
        }
    };
    if args.json {
        println!("{}", counts.json());
    } else {
        print!("{}", counts.lines());
    }
    Ok(())
}

/// The summary line: what was read, what was skipped and why.
fn describe(file: &str, s: &Summary) -> String {
    let span = s.last_ns.saturating_sub(s.first_ns) as f64 / 1e9;
    let mut line = format!(
        "{file}: {} frames, {} TCP segments, {} connections over {span:.3} s",
        s.frames, s.stats.segments, s.stats.connections
    );
    let k = &s.skipped;
    let mut skipped: Vec<String> = [
        (k.not_tcp, "not TCP"),
        (k.fragments, "IP fragments after the first"),
        (
            k.cut_short,
            "cut by the snap length before the TCP header's end",
        ),
        (k.malformed, "malformed"),
        (k.ipv6_ext_too_deep, "with over 6 IPv6 extension headers"),
        (k.unknown_interface, "of an undescribed pcapng interface"),
        (
            k.timeline_gaps,
            "jumps of the clock over a million timeline rows (rows not written)",
        ),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, why)| format!("{n} {why}"))
    .collect();
    for (link, n) in &k.link_types {
        skipped.push(format!("{n} of link type {link} (not read)"));
    }
    if !skipped.is_empty() {
        line.push_str("; skipped: ");
        line.push_str(&skipped.join(", "));
    }
    if s.stats.untracked > 0 {
        line.push_str(&format!(
            "; {} segments of no connection seen opening",
            s.stats.untracked
        ));
    }
    line
}

/// `replay --kernel`: the probe's counts at the end of the capture.
fn kernel_main(args: &ReplayArgs) -> ExitCode {
    let run = || -> Result<_> {
        let o = args.options()?;
        super::kernel::replay(super::open(&o.input)?, &o)
    };
    match run() {
        Ok((frames, counts, refused, error)) => {
            if args.json {
                println!("{}", counts.json());
            } else {
                print!("{}", counts.lines());
            }
            if !args.quiet {
                eprintln!(
                    "tcpstate replay: {}: {frames} frames through the probe ({refused} it could not be given); no timers applied",
                    args.file
                );
            }
            if let Some(e) = error {
                eprintln!("tcpstate replay: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tcpstate replay: {e}");
            ExitCode::from(if matches!(e, Error::Usage(_)) { 2 } else { 1 })
        }
    }
}
