//! The kernel's timers, applied to flow entries. A local endpoint in
//! TIME_WAIT leaves the socket table when Linux's fixed 60 s timer fires,
//! without a packet: the agent computes that moment (the kernel's timer
//! wheel included) and closes the endpoint then. The other timed states
//! end by conditions only the kernel knows (whether a FIN_WAIT2 socket is
//! still held by its application, a request's SYN-ACK retries, a connect's
//! retries): at their deadline the agent asks the kernel about that one
//! socket ([`Why`], `answers.rs`) and acts on the answer.
//!
//! The walk of the flow maps (once a second) files what falls due in the
//! next seconds ([`Timers`]); a short tick acts on what is due, through the
//! probe's command program (same compare-and-swap and counter update as
//! the data path), and deletes entries that no longer hold a local socket.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use tcpstate_common::{FlowEntry, Side, TcpState, Word, command::outcome, machine::expire};

use crate::{
    error::Result,
    kernel::{
        clock::KernelClock, maps::FlowRef, nsinfo::sysctl_u64, probe::Probe, sockdiag::SockDiag,
    },
    snapshot::upkeep::Lateness,
    tracking::answers::{self, Answer},
};

/// How long each timed state lasts in the monitored namespace, as its
/// sysctls say now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP_TIMEWAIT_LEN: fixed at 60 s in Linux.
    pub time_wait: Duration,
    /// net.ipv4.tcp_fin_timeout (orphaned FIN_WAIT2 sockets).
    pub fin_wait2: Duration,
    /// Until a connect gives up (net.ipv4.tcp_syn_retries and
    /// tcp_syn_linear_timeouts).
    pub syn_sent: Duration,
    /// Until a request gives up (net.ipv4.tcp_synack_retries).
    pub syn_recv: Duration,
    /// How long a dead entry stays before it is deleted.
    pub dead_grace: Duration,
    /// The kernel's timer wheel, for TIME_WAIT and FIN_WAIT2 (None: exact).
    pub clock: Option<KernelClock>,
    /// The kernel reports its full sockets' state changes to the probe:
    /// a connect's end needs no timer of the agent's.
    pub kernel_reports: bool,
    /// Connections passing through (`run --observe`): no socket here to ask,
    /// so every timed state ends when its time is up, as in `replay`.
    pub observed: bool,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            time_wait: Duration::from_secs(60),
            fin_wait2: Duration::from_secs(60),
            syn_sent: syn_sent_span(6, 4),
            syn_recv: retries_span(5),
            dead_grace: Duration::from_secs(1),
            clock: None,
            kernel_reports: false,
            observed: false,
        }
    }
}

/// Time from the first transmission until the retransmission timer gives up
/// after `retries` retries, with the initial RTO of 1 s doubling each time
/// (a request's SYN-ACKs: 1 + 2 + ... + 2^retries).
pub fn retries_span(retries: u64) -> Duration {
    Duration::from_secs((1u64 << (retries.min(30) + 1)) - 1)
}

/// When a connect gives up (tcp_retransmit_timer and tcp_write_timeout):
/// the first `linear` retransmissions keep the 1 s RTO, later ones double
/// it; it gives up at the timer that finds `retries + linear` retransmissions
/// done, or the time model of `retries` doublings passed, whichever first.
pub fn syn_sent_span(retries: u64, linear: u64) -> Duration {
    let (retries, linear) = (retries.min(30), linear.min(255));
    let model = (1u64 << (retries + 1)) - 1;
    let (mut at, mut rto, mut done) = (0u64, 1u64, 0u64);
    loop {
        at += rto;
        if done >= retries + linear || at >= model {
            return Duration::from_secs(at);
        }
        done += 1;
        if done > linear {
            rto = (rto * 2).min(120);
        }
    }
}

impl Timeouts {
    /// Reads the sysctls of the calling thread's network namespace; the
    /// timer wheel's clock is measured once and kept (`clock`).
    pub fn from_sysctls(clock: Option<KernelClock>, kernel_reports: bool) -> Timeouts {
        let d = Timeouts::default();
        let linear = sysctl_u64("net/ipv4/tcp_syn_linear_timeouts").unwrap_or(0);
        Timeouts {
            fin_wait2: sysctl_u64("net/ipv4/tcp_fin_timeout")
                .map_or(d.fin_wait2, Duration::from_secs),
            syn_sent: sysctl_u64("net/ipv4/tcp_syn_retries")
                .map_or(d.syn_sent, |r| syn_sent_span(r, linear)),
            syn_recv: sysctl_u64("net/ipv4/tcp_synack_retries").map_or(d.syn_recv, retries_span),
            clock,
            kernel_reports,
            ..d
        }
    }

    /// For connections passing through: these durations, no kernel to ask.
    pub fn observed(self) -> Timeouts {
        Timeouts {
            observed: true,
            ..self
        }
    }

    pub fn for_state(&self, s: TcpState) -> Option<Duration> {
        match s {
            TcpState::TimeWait => Some(self.time_wait),
            TcpState::FinWait2 => Some(self.fin_wait2),
            TcpState::SynSent => Some(self.syn_sent),
            TcpState::SynRecv => Some(self.syn_recv),
            _ => None,
        }
    }

    /// When the kernel's timer for a local endpoint that entered `s` at
    /// `since_ns` would fire.
    pub fn ends_at(&self, s: TcpState, since_ns: u64) -> Option<u64> {
        let limit = self.for_state(s)?;
        Some(self.wheel(s, since_ns, limit))
    }

    /// A timer of `limit` armed at `since_ns`: TIME_WAIT and FIN_WAIT2
    /// (time-wait sockets) are wheel timers, rounded up to their bucket.
    pub fn wheel(&self, s: TcpState, since_ns: u64, limit: Duration) -> u64 {
        match (s, self.clock) {
            (TcpState::TimeWait | TcpState::FinWait2, Some(clock)) => {
                clock.fire_ns(since_ns, limit)
            }
            _ => since_ns.saturating_add(limit.as_nanos() as u64),
        }
    }
}

/// Why the kernel is asked about a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Why {
    /// Its FIN_WAIT2 timer would be due: is it held (no timer), an orphan
    /// on a time-wait timer, or gone?
    FinWait2,
    /// A request socket's SYN-ACK timer fires: kept, completed or dropped?
    Request,
    /// A connect's retries would be over.
    Connect,
    /// The kernel reported a close where a TIME_WAIT socket may take over.
    Closed,
    /// The kernel gave up on some connection (retransmissions, user
    /// timeout): is this one still open?
    TimedOut,
}

/// What is due for an entry at some moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Close the local endpoints whose timers are due, or reap a dead entry.
    Fire,
    /// Ask the kernel about `side`'s socket.
    Ask(Side, Why),
}

/// What a lookup said about an endpoint's next deadline, kept while the
/// entry's word stays what it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Told {
    pub word: Word,
    pub at_ns: u64,
    pub action: Action,
}

/// When an entry first needs something, and what: the earliest of its local
/// endpoints' deadlines (`told` holds what the kernel said of them), or the
/// end of a dead entry's grace. `None` for an entry nothing is due for.
pub fn plan(
    word: Word,
    changed_ns: u64,
    t: &Timeouts,
    told: impl Fn(Side) -> Option<Told>,
) -> Option<(u64, Action)> {
    if word.is_reaping() {
        return None;
    }
    if word.is_dead() {
        let at = changed_ns.saturating_add(t.dead_grace.as_nanos() as u64);
        return Some((at, Action::Fire));
    }
    [Side::A, Side::B]
        .into_iter()
        .filter(|s| word.is_local(*s))
        .filter_map(|side| match told(side) {
            Some(k) if k.word == word => Some((k.at_ns, k.action)),
            _ => default_plan(word, side, changed_ns, t),
        })
        .min_by_key(|(at, _)| *at)
}

/// When a request still in SYN_RECV is first looked up, after its SYN-ACK.
/// Most complete within a round trip, and the kernel's report of the
/// completion moves the entry; the look is for the rare completion whose
/// report never reaches the probe. Seen here: the SYN-ACKs of a burst sent
/// from a softirq that ran on top of an unrelated task, their children
/// established and no report of it (none skipped by the kernel's count
/// either), in about one run in ten of the small-backlog test. Waiting for
/// the kernel's own request timer (TCP_TIMEOUT_INIT, 1 s) left such a
/// SYN_RECV standing a little over a second. From the answer on, the
/// request's own timer says when to look again.
const FIRST_REQUEST_LOOK: Duration = Duration::from_millis(250);

fn default_plan(word: Word, side: Side, changed_ns: u64, t: &Timeouts) -> Option<(u64, Action)> {
    let state = word.state(side);
    if t.observed {
        return Some((t.ends_at(state, changed_ns)?, Action::Fire));
    }
    let ask = |why| Action::Ask(side, why);
    match state {
        TcpState::TimeWait => Some((t.ends_at(state, changed_ns)?, Action::Fire)),
        TcpState::FinWait2 => Some((t.ends_at(state, changed_ns)?, ask(Why::FinWait2))),
        TcpState::SynRecv => {
            let at = changed_ns.saturating_add(FIRST_REQUEST_LOOK.as_nanos() as u64);
            Some((at, ask(Why::Request)))
        }
        // With the kernel's reports a connect's end is reported.
        TcpState::SynSent if !t.kernel_reports => {
            Some((t.ends_at(state, changed_ns)?, ask(Why::Connect)))
        }
        _ => None,
    }
}

/// The word after firing the timers of an entry that changed at
/// `changed_ns`, at `now_ns`: the TIME_WAIT endpoints due close, a dead
/// entry past its grace is reaped. `None` to leave it.
pub fn fire(
    word: Word,
    changed_ns: u64,
    now_ns: u64,
    t: &Timeouts,
    told: &TellBook,
) -> Option<Word> {
    if word.is_reaping() {
        return None;
    }
    if word.is_dead() {
        let at = changed_ns.saturating_add(t.dead_grace.as_nanos() as u64);
        return (now_ns >= at).then(|| word.reaping());
    }
    let mut new = word;
    for side in [Side::A, Side::B] {
        if !word.is_local(side) {
            continue;
        }
        let due = match told.get(side) {
            Some(k) if k.word == word && k.action == Action::Fire => Some(k.at_ns),
            _ if word.state(side) == TcpState::TimeWait || t.observed => {
                t.ends_at(word.state(side), changed_ns)
            }
            _ => None,
        };
        if due.is_some_and(|at| now_ns >= at) {
            new = expire(new, side);
        }
    }
    (new != word).then_some(new)
}

/// What the kernel said about one flow's endpoints.
#[derive(Clone, Copy, Debug, Default)]
pub struct TellBook([Option<Told>; 2]);

impl TellBook {
    pub fn get(&self, side: Side) -> Option<Told> {
        self.0[side.index()]
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct SweepStats {
    pub expired: u64,
    pub reaped: u64,
    /// Sockets looked up in the kernel's table.
    pub asked: u64,
    /// Endpoints set from the answers.
    pub answered: u64,
}

impl SweepStats {
    fn add(&mut self, o: SweepStats) {
        self.expired += o.expired;
        self.reaped += o.reaped;
        self.asked += o.asked;
        self.answered += o.answered;
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let ts =
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// One filed item: the flow, its word and `changed` stamp when filed, and
/// what to do.
#[derive(Clone, Copy, Debug)]
struct Due {
    flow: FlowRef,
    word: Word,
    changed_ns: u64,
    action: Action,
}

/// The kernel's timers and the questions for it, kept to within a fraction
/// of a second: a walk of the flow maps files every entry with something due
/// soon; a short tick acts on what is due. An entry that changed since the
/// walk is left alone (its swap finds a different word) and filed again by
/// the next walk. What lookups told is kept per endpoint ([`Told`]) until
/// the entry's word changes; questions the probe put wait in their own
/// queue, which walks do not clear.
#[derive(Default)]
pub struct Timers {
    due: BTreeMap<u64, Vec<Due>>,
    told: HashMap<FlowRef, TellBook>,
    questions: BTreeMap<u64, Vec<(FlowRef, Side, Why)>>,
    /// Flows the probe said entered a timed state since the last fire:
    /// their timers are filed then, not at the next walk.
    noticed: Vec<FlowRef>,
    /// How late each timer and question was acted on (a dead entry's
    /// reaping, which changes no count, left out).
    pub late: Lateness,
}

/// How far ahead a walk files timers: ten walk periods when walks are quick,
/// twice the longest gap between walks when they are slow (see the agent's
/// pacing), so a walk delayed by a busy machine never leaves a due timer
/// unfiled.
pub const FILING_HORIZON: Duration = Duration::from_secs(10);
const FILING_HORIZON_NS: u64 = FILING_HORIZON.as_nanos() as u64;

impl Timers {
    /// Files the timers of `entries` (read from the flow maps just before)
    /// and acts on what is due.
    pub fn file(
        &mut self,
        entries: &[(FlowRef, FlowEntry)],
        probe: &Probe,
        diag: Option<&mut SockDiag>,
        t: &Timeouts,
    ) -> Result<SweepStats> {
        self.due.clear();
        // Only what falls due in the next seconds is filed: later deadlines
        // are filed by a later walk, so a million half-open connections do
        // not mean a million timers held in memory.
        let now = monotonic_ns();
        let mut told = HashMap::with_capacity(self.told.len());
        for &(flow, entry) in entries {
            let book = self.told.get(&flow).copied().unwrap_or_default();
            // What the kernel told stays while the word it was told for does.
            if book.0.iter().flatten().any(|k| k.word == Word(entry.word)) {
                told.insert(flow, book);
            }
            self.file_one(flow, &entry, book, t, now);
        }
        self.told = told;
        self.fire(probe, diag, t)
    }

    /// The probe's notice: an endpoint of `flow` entered a timed state.
    pub fn notice(&mut self, flow: FlowRef) {
        self.noticed.push(flow);
    }

    /// Files the timers of the flows noticed (what the walk does for
    /// every entry, for these).
    fn file_noticed(&mut self, probe: &Probe, t: &Timeouts) -> Result<()> {
        for flow in std::mem::take(&mut self.noticed) {
            let Some(entry) = probe.flow_entry(&flow)? else {
                continue;
            };
            let book = self.told.get(&flow).copied().unwrap_or_default();
            // The clock after the read: a stamp newer than `now` would read
            // as one from the clock's far past.
            self.file_one(flow, &entry, book, t, monotonic_ns());
        }
        Ok(())
    }

    /// Files what is first due for `flow` (its entry read before `now`),
    /// if that falls within the filing horizon.
    fn file_one(
        &mut self,
        flow: FlowRef,
        entry: &FlowEntry,
        book: TellBook,
        t: &Timeouts,
        now: u64,
    ) {
        let word = Word(entry.word);
        let changed_ns = entry.changed_ns(now);
        if let Some((at, action)) = plan(word, changed_ns, t, |s| book.get(s))
            && at <= now.saturating_add(FILING_HORIZON_NS)
        {
            self.due.entry(at).or_default().push(Due {
                flow,
                word,
                changed_ns,
                action,
            });
        }
    }

    /// A question the probe put (`Closed`), to ask at `at_ns`.
    pub fn question(&mut self, flow: FlowRef, side: Side, why: Why, at_ns: u64) {
        self.questions
            .entry(at_ns)
            .or_default()
            .push((flow, side, why));
    }

    /// Forgets what lookups said of FIN_WAIT2 sockets held by their
    /// applications: `tcp_fin_timeout` changed, and their next look is
    /// due by the new value.
    pub fn forget_held(&mut self) {
        for book in self.told.values_mut() {
            for k in book.0.iter_mut() {
                if matches!(
                    k,
                    Some(Told {
                        action: Action::Ask(_, Why::FinWait2),
                        ..
                    })
                ) {
                    *k = None;
                }
            }
        }
    }

    /// When the next filed timer or question is due (CLOCK_MONOTONIC ns).
    pub fn next_ns(&self) -> Option<u64> {
        if !self.noticed.is_empty() {
            return Some(0);
        }
        let due = self.due.keys().next().copied();
        let asked = self.questions.keys().next().copied();
        due.into_iter().chain(asked).min()
    }

    /// Acts on every filed timer and question whose moment has come.
    /// `diag`: the namespace's socket table (`None` for connections passing
    /// through, which have nothing to ask).
    pub fn fire(
        &mut self,
        probe: &Probe,
        mut diag: Option<&mut SockDiag>,
        t: &Timeouts,
    ) -> Result<SweepStats> {
        self.file_noticed(probe, t)?;
        let now = monotonic_ns();
        let mut stats = SweepStats::default();
        let later = self.questions.split_off(&now.saturating_add(1));
        let asked = std::mem::replace(&mut self.questions, later);
        for (at, (flow, side, why)) in flat(asked) {
            self.late.record(now.saturating_sub(at));
            stats.add(self.ask(probe, diag.as_deref_mut(), t, flow, side, why)?);
        }
        let later = self.due.split_off(&now.saturating_add(1));
        let due = std::mem::replace(&mut self.due, later);
        for (at, d) in flat(due) {
            // A dead entry's reaping changes no count: not a lateness.
            if !d.word.is_dead() {
                self.late.record(now.saturating_sub(at));
            }
            if now.saturating_sub(at) > 100_000_000 && !d.word.is_dead() {
                tracing::debug!(
                    "late by {} ms: {:?} {:?} of {:?} (changed {} ms before its moment)",
                    now.saturating_sub(at) / 1_000_000,
                    d.action,
                    d.word,
                    d.flow,
                    at.saturating_sub(d.changed_ns) / 1_000_000
                );
            }
            stats.add(match d.action {
                Action::Fire => self.fire_one(probe, t, d, now)?,
                Action::Ask(side, why) => {
                    self.ask(probe, diag.as_deref_mut(), t, d.flow, side, why)?
                }
            });
        }
        Ok(stats)
    }

    fn fire_one(&mut self, probe: &Probe, t: &Timeouts, d: Due, now: u64) -> Result<SweepStats> {
        let mut stats = SweepStats::default();
        let book = self.told.get(&d.flow).copied().unwrap_or_default();
        let Some(new) = fire(d.word, d.changed_ns, now, t, &book) else {
            return Ok(stats);
        };
        // CHANGED: a packet moved the entry first; the next walk files it again.
        if probe.command(&d.flow.command(d.word.0, new.0))? == outcome::DONE {
            if new.is_reaping() {
                stats.reaped += 1;
                self.told.remove(&d.flow);
            } else {
                stats.expired += 1;
                // A dead entry is deleted after its grace: file that too.
                if new.is_dead() {
                    let at = now.saturating_add(t.dead_grace.as_nanos() as u64);
                    self.due.entry(at).or_default().push(Due {
                        word: new,
                        changed_ns: now,
                        ..d
                    });
                }
            }
        }
        Ok(stats)
    }

    /// Looks `side`'s socket of `flow` up and acts on the answer. The
    /// entry's word is read now, not taken from when the timer was filed:
    /// segments since then may have changed its sequence facts without
    /// changing a state, and a swap from the filed word would fail and
    /// leave what the kernel said unapplied.
    fn ask(
        &mut self,
        probe: &Probe,
        diag: Option<&mut SockDiag>,
        t: &Timeouts,
        flow: FlowRef,
        side: Side,
        why: Why,
    ) -> Result<SweepStats> {
        let mut stats = SweepStats {
            asked: 1,
            ..SweepStats::default()
        };
        let Some(diag) = diag else {
            return Ok(SweepStats::default());
        };
        let Some(entry) = probe.flow_entry(&flow)? else {
            return Ok(SweepStats::default());
        };
        let word = Word(entry.word);
        if !answers::still_asked(word, side, why) {
            return Ok(SweepStats::default());
        }
        let (local, lport) = flow.endpoint(side);
        let (remote, rport) = flow.endpoint(side.other());
        let info = diag.lookup(local, lport, remote, rport)?;
        let now = monotonic_ns();
        match answers::decide(word, side, why, info.as_ref(), now, t) {
            Answer::Set {
                word: new,
                changed_ns,
            } => {
                let mut cmd = flow.command(word.0, new.0);
                cmd.changed_ns = changed_ns;
                if probe.command(&cmd)? == outcome::DONE {
                    stats.answered += 1;
                }
            }
            Answer::Later(at_ns, action) => {
                let book = self.told.entry(flow).or_default();
                book.0[side.index()] = Some(Told {
                    word,
                    at_ns,
                    action,
                });
                if at_ns <= now.saturating_add(FILING_HORIZON_NS) {
                    self.due.entry(at_ns).or_default().push(Due {
                        flow,
                        word,
                        changed_ns: now,
                        action,
                    });
                }
            }
            Answer::Nothing => {}
        }
        Ok(stats)
    }
}

/// A timer queue's items with their moments.
fn flat<T>(q: BTreeMap<u64, Vec<T>>) -> impl Iterator<Item = (u64, T)> {
    q.into_iter()
        .flat_map(|(at, items)| items.into_iter().map(move |i| (at, i)))
}

/// One full pass: act on everything due now.
pub fn sweep(probe: &Probe, diag: &mut SockDiag, t: &Timeouts) -> Result<SweepStats> {
    let entries = probe.flow_entries()?;
    Timers::default().file(&entries, probe, Some(diag), t)
}

mod given;
#[cfg(test)]
mod tests;
