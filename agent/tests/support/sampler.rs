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

use std::{
    fs::File,
    os::fd::AsFd,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use tcpstate::snapshot::StateCounts;
use tcpstate_common::TcpState;

use super::{Agent, Netns, table};

/// How often a sample is taken.
pub const PERIOD: Duration = Duration::from_millis(100);
/// The longest a difference may last.
pub const LIMIT: Duration = Duration::from_secs(1);

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
        TcpState::REPORTED.iter().all(|s| {
            let (a, b) = (self.before.get(*s), self.after.get(*s));
            (a.min(b)..=a.max(b)).contains(&self.ss.get(*s))
        })
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
}

impl Samples {
    /// Share of samples that were equal.
    pub fn share_equal(&self) -> f64 {
        if self.taken == 0 {
            return 0.0;
        }
        self.equal as f64 / self.taken as f64
    }

    pub fn describe(&self) -> String {
        let mut s = format!(
            "{} samples, {:.1} % equal, longest difference {:?}",
            self.taken,
            100.0 * self.share_equal(),
            self.longest
        );
        if let Some((first, last)) = &self.worst {
            s += &format!(
                "\nit began at {:?}: tcpstate (before, after) vs ss\n{}\nand at {:?} it was\n{}",
                first.at,
                bracket_table(first),
                last.at,
                bracket_table(last)
            );
        }
        s
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
        let stop = Arc::new(AtomicBool::new(false));
        let socket = agent.socket.clone();
        let netns = File::open(format!("/run/netns/{}", ns.name)).expect("namespace file");
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            // `ss` started from this thread runs in the namespace, without
            // the mount-namespace work of `ip netns exec` (milliseconds).
            setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
            run(&socket, &flag)
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

fn agent_counts(socket: &std::path::Path) -> Option<StateCounts> {
    tcpstate::client::control::query(socket)
        .ok()?
        .state_counts()
}

/// `ss -tanH` of the calling thread's namespace, per state.
pub fn ss_here() -> StateCounts {
    let out = Command::new("ss").arg("-tanH").output().expect("ss");
    assert!(out.status.success(), "ss failed");
    let mut counts = StateCounts::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let state =
            TcpState::parse(name).unwrap_or_else(|| panic!("ss printed an unknown state {name:?}"));
        counts.set(state, counts.get(state) + 1);
    }
    counts
}

fn run(socket: &std::path::Path, stop: &AtomicBool) -> Samples {
    let start = Instant::now();
    let mut out = Samples::default();
    let mut since: Option<Sample> = None;
    let mut last_unequal: Option<Sample> = None;
    loop {
        let tick = Instant::now();
        let stopping = stop.load(Ordering::Relaxed);
        if let (Some(before), ss, Some(after)) =
            (agent_counts(socket), ss_here(), agent_counts(socket))
        {
            let s = Sample {
                at: start.elapsed(),
                before,
                ss,
                after,
            };
            out.taken += 1;
            if s.equal() {
                out.equal += 1;
                if let Some(first) = since.take() {
                    close_run(&mut out, first, last_unequal.take(), s.at);
                }
            } else {
                if since.is_none() {
                    since = Some(s.clone());
                }
                last_unequal = Some(s);
            }
        }
        if stopping {
            break;
        }
        std::thread::sleep(PERIOD.saturating_sub(tick.elapsed()));
    }
    if let Some(first) = since.take() {
        close_run(&mut out, first, last_unequal.take(), start.elapsed());
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
