//! Continuous comparison with `ss`: while a scenario runs, a thread reads the
//! agent's counts and `ss -tanH` of the namespace every 100 ms and records
//! how long they stayed apart. A state that flaps between two reads cannot
//! hide: a difference must be gone within a second.
//!
//! Each sample brackets one `ss` read with two reads of the agent (a few
//! milliseconds apart): the sample is equal when, for every state, ss's count
//! lies between the agent's two. While connections open and close, ss reads
//! a table that changes under it; the bracket accepts what either moment of
//! the agent could have shown, and nothing outside it.
//!
//! Under thousands of connections a second that is not enough: ss's walk of
//! a large table takes long enough for thousands of sockets to change under
//! it, so its total is no moment's count and may lie outside any bracket. A
//! scenario that drives its traffic through a [`Gate`] lets the sampler
//! pause it: every [`QUIET_EVERY`]th sample is taken once the traffic has
//! stopped for [`QUIET`], when ss's table stands still, and must be equal.
//!
//! A difference that lasts [`DIFF_AFTER`] is named socket by socket (what
//! `ss` lists and `conns` does not, and the other way round, with what the
//! agent had counted of missed reports, questions and corrections): a
//! failure that happens once in a while then says what it was made of.

use std::{
    fs::File,
    os::fd::AsFd,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use tcpstate::snapshot::StateCounts;
use tcpstate_common::TcpState;

use super::{Agent, Netns, table};

/// How long a difference lasts before the sampler names the sockets in it.
pub const DIFF_AFTER: Duration = Duration::from_millis(500);

/// How often a sample is taken.
pub const PERIOD: Duration = Duration::from_millis(100);
/// The longest a difference may last.
pub const LIMIT: Duration = Duration::from_secs(1);

/// How long a gated scenario's traffic has stood still before a quiet
/// sample (segments between two namespaces of one host take microseconds).
pub const QUIET: Duration = Duration::from_millis(20);
/// Every how many samples one is quiet.
pub const QUIET_EVERY: usize = 5;

/// A scenario's traffic, in units the sampler can hold back: each unit (a
/// connection opened and closed) runs through [`Gate::pass`].
#[derive(Default)]
pub struct Gate {
    paused: AtomicBool,
    active: AtomicUsize,
}

impl Gate {
    /// Runs one unit of traffic, once the sampler is not holding the gate.
    pub fn pass<T>(&self, unit: impl FnOnce() -> T) -> T {
        loop {
            while self.paused.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.active.fetch_add(1, Ordering::SeqCst);
            if !self.paused.load(Ordering::SeqCst) {
                break;
            }
            self.active.fetch_sub(1, Ordering::SeqCst);
        }
        let out = unit();
        self.active.fetch_sub(1, Ordering::SeqCst);
        out
    }

    /// Stops new units and waits for the running ones to end (at most 5 s:
    /// a unit stuck longer is the scenario's problem, and the sample says
    /// so). Returns whether the traffic stopped.
    fn hold(&self) -> bool {
        self.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.active.load(Ordering::SeqCst) > 0 {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    fn release(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

/// One sample: when (since the start), the agent before, ss, the agent after.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Duration,
    pub before: StateCounts,
    pub ss: StateCounts,
    pub after: StateCounts,
}

impl Sample {
    /// ss's count lies between the agent's two reads, for every state.
    pub fn equal(&self) -> bool {
        TcpState::REPORTED.iter().all(|s| self.outside(*s) == 0)
    }

    /// How far ss's count of `state` lies outside the agent's two reads.
    pub fn outside(&self, state: TcpState) -> u64 {
        let (a, b) = (self.before.get(state), self.after.get(state));
        let ss = self.ss.get(state);
        ss.saturating_sub(a.max(b)).max(a.min(b).saturating_sub(ss))
    }
}

/// What a sampler saw.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    pub taken: usize,
    pub equal: usize,
    /// The longest stretch from the first unequal sample to the next equal
    /// one (or to the end).
    pub longest: Duration,
    /// The first sample of that stretch, and the last unequal one in it.
    pub worst: Option<(Sample, Sample)>,
    /// Per state, the farthest ss's count lay outside the agent's bracket
    /// in any sample (while thousands of connections a second change, ss's
    /// walk of the table is itself no snapshot: this says by how much).
    pub widest: StateCounts,
    /// With a [`Gate`]: the samples taken while the traffic stood still.
    pub quiet: Option<Box<Samples>>,
    /// The connections themselves, once a difference had lasted
    /// [`DIFF_AFTER`]: which sockets ss and the agent disagreed on.
    pub diff: Option<String>,
}

impl Samples {
    /// Share of samples that were equal.
    pub fn share_equal(&self) -> f64 {
        if self.taken == 0 {
            return 0.0;
        }
        self.equal as f64 / self.taken as f64
    }

    /// Writes this run into target/accuracy/exact/ for `cargo xtask
    /// accuracy`'s report (scenario, family, reconciliation on or off).
    pub fn record(&self, scenario: &str, family: &str, reconcile: bool) {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/accuracy/exact");
        let _ = std::fs::create_dir_all(&dir);
        let slug: String = scenario
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let name = format!(
            "{slug}-{family}-{}.json",
            if reconcile { "on" } else { "off" }
        );
        let row = serde_json::json!({
            "scenario": scenario,
            "family": family,
            "reconcile": reconcile,
            "samples": self.taken,
            "equal_share": self.share_equal(),
            "longest_s": self.longest.as_secs_f64(),
            "widest": self.widest_text(),
        });
        let _ = std::fs::write(dir.join(name), row.to_string());
    }

    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} samples, {:.1} % equal, longest difference {:?}",
            self.taken,
            100.0 * self.share_equal(),
            self.longest
        );
        if self.widest != StateCounts::default() {
            s += &format!(", widest per state {}", self.widest_text());
        }
        if let Some((first, last)) = &self.worst {
            s += &format!(
                "\nit began at {:?}: tcpstate (before, after) vs ss\n{}\nand at {:?} it was\n{}",
                first.at,
                bracket_table(first),
                last.at,
                bracket_table(last)
            );
        }
        if let Some(diff) = &self.diff {
            s += &format!("\nthe sockets in a difference:\n{diff}");
        }
        s
    }

    /// The states ss's count ever lay outside the bracket, and by how much
    /// at most: "TIME_WAIT 3, ESTABLISHED 1".
    pub fn widest_text(&self) -> String {
        let parts: Vec<String> = TcpState::REPORTED
            .iter()
            .filter(|s| self.widest.get(**s) > 0)
            .map(|s| format!("{} {}", s.name(), self.widest.get(*s)))
            .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    }

    /// No difference from ss lasted longer than [`LIMIT`], and enough
    /// samples were taken to say so.
    #[track_caller]
    pub fn assert_exact(&self, what: &str) {
        assert!(self.taken >= 5, "{what}: too few samples ({})", self.taken);
        assert!(
            self.longest <= LIMIT,
            "{what}: tcpstate differed from ss for {:?} (limit {LIMIT:?}): {}",
            self.longest,
            self.describe()
        );
        eprintln!("{what}: {}", self.describe());
    }
}

impl Samples {
    /// Every quiet sample was equal: with the traffic stopped for [`QUIET`],
    /// nothing excuses a difference.
    #[track_caller]
    pub fn assert_quiet_exact(&self, what: &str) {
        let quiet = self.quiet.as_deref().expect("a gated sampler");
        assert!(
            quiet.taken >= 5,
            "{what}: too few quiet samples ({})",
            quiet.taken
        );
        assert!(
            quiet.equal == quiet.taken,
            "{what}: {} of {} quiet samples differed from ss: {}",
            quiet.taken - quiet.equal,
            quiet.taken,
            quiet.describe()
        );
        eprintln!("{what}, quiet: {}", quiet.describe());
    }
}

fn bracket_table(s: &Sample) -> String {
    let mut out = table(&s.before, &s.ss);
    if s.after != s.before {
        out += &format!("(after: {:?})\n", s.after.0);
    }
    out
}

/// Samples the agent against ss until [`Sampler::finish`].
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Samples>>,
}

impl Sampler {
    /// Starts sampling `agent` against `ss` of `ns`.
    pub fn start(agent: &Agent, ns: &Netns) -> Sampler {
        Sampler::start_with(agent, ns, None)
    }

    /// Starts sampling, holding `gate`'s traffic for every quiet sample.
    pub fn start_gated(agent: &Agent, ns: &Netns, gate: Arc<Gate>) -> Sampler {
        Sampler::start_with(agent, ns, Some(gate))
    }

    fn start_with(agent: &Agent, ns: &Netns, gate: Option<Arc<Gate>>) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let socket = agent.socket.clone();
        let select = agent.select.clone();
        let netns = File::open(format!("/run/netns/{}", ns.name)).expect("namespace file");
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            // `ss` started from this thread runs in the namespace, without
            // the mount-namespace work of `ip netns exec` (milliseconds).
            setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
            run(&socket, select.as_deref(), &flag, gate.as_deref())
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops and returns what was seen.
    pub fn finish(mut self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("sampler thread")
    }

    /// Samples while `f` runs.
    pub fn during<T>(agent: &Agent, ns: &Netns, f: impl FnOnce() -> T) -> (T, Samples) {
        let s = Sampler::start(agent, ns);
        let out = f();
        (out, s.finish())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The agent's counts: of the namespace `select` names (an agent watching
/// every namespace), or all of them.
fn agent_counts(socket: &std::path::Path, select: Option<&str>) -> Option<StateCounts> {
    let snap = tcpstate::client::control::query(socket).ok()?;
    match select {
        Some(sel) => Some(tcpstate::client::count::select(&snap, sel).ok()?.states),
        None => snap.state_counts(),
    }
}

/// `ss -tanH` of the calling thread's namespace, per state.
pub fn ss_here() -> StateCounts {
    let out = Command::new("ss").arg("-tanH").output().expect("ss");
    assert!(out.status.success(), "ss failed");
    super::ss_counted(&out.stdout)
}

/// Samples of one kind, and the stretch of unequal ones still open.
#[derive(Default)]
struct Tally {
    out: Samples,
    since: Option<Sample>,
    last_unequal: Option<Sample>,
}

impl Tally {
    fn add(&mut self, s: Sample) {
        let out = &mut self.out;
        out.taken += 1;
        for state in TcpState::REPORTED {
            let far = s.outside(state).max(out.widest.get(state));
            out.widest.set(state, far);
        }
        if s.equal() {
            out.equal += 1;
            if let Some(first) = self.since.take() {
                close_run(out, first, self.last_unequal.take(), s.at);
            }
        } else {
            if self.since.is_none() {
                self.since = Some(s.clone());
            }
            self.last_unequal = Some(s);
        }
    }

    /// How long the open stretch of unequal samples has lasted.
    fn open_for(&self) -> Option<Duration> {
        let first = self.since.as_ref()?;
        Some(self.last_unequal.as_ref()?.at.saturating_sub(first.at))
    }

    fn end(mut self, at: Duration) -> Samples {
        if let Some(first) = self.since.take() {
            close_run(&mut self.out, first, self.last_unequal.take(), at);
        }
        self.out
    }
}

fn run(
    socket: &std::path::Path,
    select: Option<&str>,
    stop: &AtomicBool,
    gate: Option<&Gate>,
) -> Samples {
    let start = Instant::now();
    let mut all = Tally::default();
    let mut quiet = Tally::default();
    for n in 1.. {
        let tick = Instant::now();
        let stopping = stop.load(Ordering::Relaxed);
        // A quiet sample: the traffic held, and stood still for QUIET.
        let held = match gate {
            Some(g) if n % QUIET_EVERY == 0 && !stopping => {
                let stopped = g.hold();
                std::thread::sleep(QUIET);
                Some((g, stopped))
            }
            _ => None,
        };
        let read = (
            agent_counts(socket, select),
            ss_here(),
            agent_counts(socket, select),
        );
        if let Some((g, _)) = held {
            g.release();
        }
        if let (Some(before), ss, Some(after)) = read {
            let s = Sample {
                at: start.elapsed(),
                before,
                ss,
                after,
            };
            match held {
                Some((_, true)) => quiet.add(s),
                // Traffic that would not stop: a quiet sample that is not
                // equal, whatever it read.
                Some((_, false)) => {
                    eprintln!("sampler: the traffic did not stop within 5 s");
                    quiet.out.taken += 1;
                }
                None => {
                    all.add(s);
                    if all.out.diff.is_none() && all.open_for() >= Some(DIFF_AFTER) {
                        all.out.diff = Some(conn_diff(socket, select));
                    }
                }
            }
        }
        if stopping {
            break;
        }
        std::thread::sleep(PERIOD.saturating_sub(tick.elapsed()));
    }
    let mut out = all.end(start.elapsed());
    if gate.is_some() {
        out.quiet = Some(Box::new(quiet.end(start.elapsed())));
    }
    out
}

fn close_run(out: &mut Samples, first: Sample, last: Option<Sample>, end: Duration) {
    let run = end.saturating_sub(first.at);
    if run > out.longest || out.worst.is_none() {
        out.longest = out.longest.max(run);
        let last = last.unwrap_or_else(|| first.clone());
        out.worst = Some((first, last));
    }
}

/// The sockets `ss -tanH` lists and the agent's `conns` does not, and the
/// other way round (a few of each): which connections a difference is made of.
fn conn_diff(socket: &std::path::Path, select: Option<&str>) -> String {
    use std::collections::BTreeSet;
    let out = Command::new("ss").arg("-tanH").output().expect("ss");
    let ss: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let state = TcpState::parse(f.first()?)?;
            (state != TcpState::Listen).then(|| format!("{} {} {}", state.name(), f[3], f[4]))
        })
        .collect();
    let snap = tcpstate::client::control::query(socket).ok();
    let netns = select.and_then(|sel| {
        Some(
            tcpstate::client::count::select(snap.as_ref()?, sel)
                .ok()?
                .netns,
        )
    });
    let filter = tcpstate::snapshot::conns::ConnFilter {
        netns,
        ..Default::default()
    };
    let ours: BTreeSet<String> = match tcpstate::client::control::conns(socket, &filter) {
        Ok(answer) => answer
            .iter()
            .flat_map(|ns| ns.rows.iter())
            .filter(|c| c.state != TcpState::Listen)
            .map(|c| format!("{} {} {}", c.state.name(), c.local, c.peer))
            .collect(),
        Err(e) => return format!("conns failed: {e}"),
    };
    let mut text = String::new();
    for (what, only) in [
        ("only ss", ss.difference(&ours).collect::<Vec<_>>()),
        ("only tcpstate", ours.difference(&ss).collect()),
    ] {
        text += &format!("{what} ({}):\n", only.len());
        for line in only.iter().take(12) {
            text += &format!("  {line}\n");
        }
    }
    // What the agent saw meanwhile: reports the kernel skipped, questions,
    // expiries, corrections and the probe's unusual events.
    if let Some(s) = snap {
        let events: Vec<String> = s
            .events
            .iter()
            .filter(|(_, v)| v.as_u64() != Some(0))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        text += &format!(
            "agent: reports missed {}, asked {:?}, expired {}, corrections {:?}\nevents: {}\n",
            s.kernel_reports_missed,
            s.asked,
            s.expired,
            s.corrections,
            events.join(" ")
        );
    }
    text
}
