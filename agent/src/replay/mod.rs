//! `tcpstate replay`: a capture through the probe's parser and state
//! machine, on the host: no root, no BPF. Frames are read in file order
//! ([`capture`]), their link layer stripped ([`link`]), parsed by the
//! parser the probe runs (`tcpstate_common::parse`) and applied to a flow
//! table with the probe's rules ([`engine`]) on the capture's clock. The
//! outputs: the counts at the end or `--at` a moment, a timeline
//! (`--every`), and a connection log in Zeek's conn.log layout
//! ([`output`]).

pub mod capture;
pub mod cli;
pub mod conn;
pub mod engine;
pub mod kernel;
pub mod link;
pub mod local;
pub mod output;
pub mod time;

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufWriter, Write},
    path::PathBuf,
    time::Duration,
};

use serde::Serialize;
use tcpstate_common::{
    Segment,
    machine::IcmpEffect,
    parse::{Headers, ParseError, Parsed},
};

use self::{
    capture::{Capture, Frame},
    engine::{Engine, Key, Stats},
    link::{Link, parse_frame},
    local::Locals,
    output::Timeline,
    time::Moment,
};
use crate::{
    error::{Error, Result},
    snapshot::StateCounts,
    tracking::timers::Timeouts,
};

/// Most timeline rows one gap between frames may write.
const MAX_ROWS_PER_GAP: u64 = 1_000_000;

/// What `tcpstate replay` was asked.
pub struct Options {
    /// A path, or `-` for standard input.
    pub input: String,
    pub locals: Locals,
    pub timeouts: Timeouts,
    pub at: Option<Moment>,
    pub every: Option<(Duration, Timeline)>,
    /// Where the connection log goes (`-`: standard output).
    pub conns: Option<String>,
}

/// Frames the replay did not apply, by why.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Skipped {
    pub not_tcp: u64,
    pub fragments: u64,
    /// Frames the snap length cut before the end of their TCP header.
    pub cut_short: u64,
    /// Frames whose headers are wrong (or end early without a snap length
    /// to blame).
    pub malformed: u64,
    pub ipv6_ext_too_deep: u64,
    /// Frames of link types replay does not read, by link type.
    pub link_types: BTreeMap<i32, u64>,
    /// pcapng records of an interface never described.
    pub unknown_interface: u64,
    /// Jumps of the clock across more than a million timeline rows (a
    /// corrupt timestamp): the rows were not written.
    pub timeline_gaps: u64,
}

/// What a replay came to.
#[derive(Debug, Serialize)]
pub struct Summary {
    pub frames: u64,
    pub first_ns: u64,
    pub last_ns: u64,
    pub counts: StateCounts,
    /// The counts at `--at`, if it fell inside the capture.
    pub at: Option<(u64, StateCounts)>,
    pub skipped: Skipped,
    pub stats: Stats,
    /// Why the capture could not be read to its end (what came before it
    /// was replayed).
    pub error: Option<String>,
}

/// Where the parser writes a frame's headers.
#[derive(Default)]
struct Hdr {
    family: u32,
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    seg: Segment,
    effect: Option<IcmpEffect>,
    ip_len: u32,
}

impl Headers for Hdr {
    fn v4(&mut self, src: u32, dst: u32) {
        self.family = 4;
        self.src = [src, 0, 0, 0];
        self.dst = [dst, 0, 0, 0];
    }
    fn v6(&mut self, src: [u32; 4], dst: [u32; 4]) {
        self.family = 6;
        self.src = src;
        self.dst = dst;
    }
    fn tcp(&mut self, sport: u16, dport: u16, seg: Segment) {
        self.sport = sport;
        self.dport = dport;
        self.seg = seg;
    }
    fn icmp(&mut self, effect: IcmpEffect) {
        self.effect = Some(effect);
    }
    fn ip_len(&mut self, len: u32) {
        self.ip_len = len;
    }
}

/// A replay under way: the engine and what it writes as the clock moves.
pub struct Replay {
    pub engine: Engine,
    pub skipped: Skipped,
    frames: u64,
    first_ns: Option<u64>,
    at: Option<Moment>,
    at_counts: Option<(u64, StateCounts)>,
    every: Option<(u64, Timeline, u64)>,
    timeline: Option<Box<dyn Write>>,
    conn_log: Option<Box<dyn Write>>,
    /// Connections written to the log so far.
    logged: u64,
    /// Jumps of the clock the timeline skipped rows across.
    timeline_gaps: u64,
}

impl Replay {
    pub fn new(
        o: &Options,
        timeline: Option<Box<dyn Write>>,
        conn_log: Option<Box<dyn Write>>,
    ) -> Replay {
        Replay {
            engine: Engine::new(o.locals.clone(), o.timeouts.clone(), o.conns.is_some()),
            skipped: Skipped::default(),
            frames: 0,
            first_ns: None,
            at: o.at,
            at_counts: None,
            every: o.every.map(|(d, t)| (d.as_nanos().max(1) as u64, t, 0)),
            timeline,
            conn_log,
            logged: 0,
            timeline_gaps: 0,
        }
    }

    /// One frame: the clock moves to it (what falls due fires first), then
    /// it is applied.
    pub fn frame(&mut self, f: &Frame) -> Result<()> {
        self.frames += 1;
        let ts = f.ts_ns.max(self.engine.now_ns);
        let start = *self.first_ns.get_or_insert(ts);
        if self.engine.now_ns == 0 {
            self.engine.now_ns = ts;
        }
        self.move_to(ts, start)?;
        let mut h = Hdr::default();
        match parse_frame(f.link, f.data, &mut h) {
            Link::Unsupported => *self.skipped.link_types.entry(f.link.0).or_default() += 1,
            Link::Parsed(Ok(Parsed::Tcp)) => {
                let (key, sender) = Key::new(h.family, &h.src, h.sport, &h.dst, h.dport);
                self.engine.segment(key, sender, &h.seg, h.ip_len);
            }
            Link::Parsed(Ok(Parsed::IcmpError)) => {
                let (key, sender) = Key::new(h.family, &h.src, h.sport, &h.dst, h.dport);
                if let Some(effect) = h.effect {
                    self.engine.icmp(key, sender, effect, h.seg.seq);
                }
            }
            Link::Parsed(Ok(Parsed::NotTcp)) => self.skipped.not_tcp += 1,
            Link::Parsed(Ok(Parsed::Fragment)) => self.skipped.fragments += 1,
            Link::Parsed(Err(ParseError::Ipv6ExtTooDeep)) => self.skipped.ipv6_ext_too_deep += 1,
            Link::Parsed(Err(ParseError::Malformed)) => {
                if (f.data.len() as u64) < u64::from(f.orig_len) {
                    self.skipped.cut_short += 1;
                } else {
                    self.skipped.malformed += 1;
                }
            }
        }
        self.log_ended()
    }

    /// Writes the connections that ended to the log.
    fn log_ended(&mut self) -> Result<()> {
        if self.engine.ended.is_empty() {
            return Ok(());
        }
        let Some(out) = &mut self.conn_log else {
            self.engine.ended.clear();
            return Ok(());
        };
        for (key, c) in self.engine.ended.drain(..) {
            self.logged += 1;
            output::conn_row(out, self.logged, &key, &c)
                .map_err(|e| Error::io("writing the connection log", e))?;
        }
        Ok(())
    }

    /// Moves the clock to `ts`, writing the timeline's rows and taking the
    /// `--at` counts on the way, each at its own moment.
    fn move_to(&mut self, ts: u64, start: u64) -> Result<()> {
        if let Some((step, kind, next)) = &mut self.every {
            if *next == 0 {
                *next = start.saturating_add(*step);
            }
            // A jump past more rows than a timeline should hold (a corrupt
            // timestamp): the rows in between are skipped.
            if ts.saturating_sub(*next) / *step > MAX_ROWS_PER_GAP {
                self.timeline_gaps += 1;
                *next = ts - (ts - *next) % *step;
            }
            while *next <= ts {
                self.engine.advance(*next);
                if let Some(out) = &mut self.timeline {
                    kind.row(out, *next, start, &self.engine.counts())
                        .map_err(|e| Error::io("writing the timeline", e))?;
                }
                *next = match next.checked_add(*step) {
                    Some(n) => n,
                    None => break,
                };
            }
        }
        if let Some(at) = self.at.map(|m| m.resolve(start))
            && self.at_counts.is_none()
            && at <= ts
        {
            self.engine.advance(at);
            self.at_counts = Some((at, self.engine.counts()));
        }
        self.engine.advance(ts);
        Ok(())
    }

    /// The end of the capture: a last timeline row at the last frame.
    pub fn finish(mut self) -> Result<Summary> {
        let last = self.engine.now_ns;
        let first = self.first_ns.unwrap_or(0);
        if let (Some((_, kind, _)), Some(out)) = (&self.every, &mut self.timeline) {
            kind.row(out, last, first, &self.engine.counts())
                .and_then(|()| out.flush())
                .map_err(|e| Error::io("writing the timeline", e))?;
        }
        self.skipped.timeline_gaps = self.timeline_gaps;
        let counts = self.engine.counts();
        // A moment after the last frame: the capture may have gone on with
        // nothing to record; the timers run on to it.
        if let Some(at) = self.at.map(|m| m.resolve(first))
            && self.at_counts.is_none()
            && at >= last
            && self.frames > 0
        {
            self.engine.advance(at);
            self.at_counts = Some((at, self.engine.counts()));
        }
        self.engine.finish();
        self.log_ended()?;
        if let Some(out) = &mut self.conn_log {
            output::conn_close(out, wall_ns())
                .and_then(|()| out.flush())
                .map_err(|e| Error::io("writing the connection log", e))?;
        }
        Ok(Summary {
            frames: self.frames,
            first_ns: first,
            last_ns: last,
            counts,
            at: self.at_counts,
            skipped: self.skipped,
            stats: self.engine.stats,
            error: None,
        })
    }
}

/// Opens the input: a file, or standard input for `-`.
pub fn open(input: &str) -> Result<Capture> {
    if input == "-" {
        return Capture::open(std::io::stdin(), "standard input");
    }
    let file = File::open(input).map_err(|e| Error::io(format!("opening {input}"), e))?;
    Capture::open(file, input)
}

/// Now, for the log's `#open` and `#close` lines.
fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Where an output goes: a file, or standard output for `-`.
fn writer(path: &str) -> Result<Box<dyn Write>> {
    if path == "-" {
        return Ok(Box::new(BufWriter::new(std::io::stdout())));
    }
    let f =
        File::create(PathBuf::from(path)).map_err(|e| Error::io(format!("creating {path}"), e))?;
    Ok(Box::new(BufWriter::new(f)))
}

/// Runs a replay as the command line asked. A capture that cannot be read
/// to its end still gives what was read before ([`Summary::error`]).
pub fn run(o: &Options) -> Result<Summary> {
    let cap = open(&o.input)?;
    replay(cap, o)
}

/// Replays a capture already opened (from any reader: a file, standard
/// input, bytes in memory).
pub fn replay(mut cap: Capture, o: &Options) -> Result<Summary> {
    let timeline = match o.every {
        Some((_, kind)) => {
            let mut out = writer("-")?;
            kind.header(&mut out)
                .map_err(|e| Error::io("writing the timeline", e))?;
            Some(out)
        }
        None => None,
    };
    let conn_log = match &o.conns {
        Some(path) => {
            let mut out = writer(path)?;
            output::conn_header(&mut out, wall_ns())
                .map_err(|e| Error::io("writing the connection log", e))?;
            Some(out)
        }
        None => None,
    };
    let mut replay = Replay::new(o, timeline, conn_log);
    let mut failed = None;
    let read = cap.for_each(|f| {
        if failed.is_none()
            && let Err(e) = replay.frame(f)
        {
            failed = Some(e);
        }
    });
    replay.skipped.unknown_interface = cap.unknown_interface;
    if let Some(e) = failed {
        return Err(e);
    }
    let mut summary = replay.finish()?;
    summary.error = read.err().map(|e| e.to_string());
    Ok(summary)
}
