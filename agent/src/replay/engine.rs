//! The replay's flow table: the probe's rules on the host. Each segment
//! moves its flow entry through the shared state machine
//! (`tcpstate_common::machine`) exactly as the probe's slow path does
//! (`probe-ebpf/src/track.rs`): an entry is made only by a segment that
//! may open a connection and only if the machine leaves a live endpoint,
//! which endpoints are local is decided when it is made, an ICMP error ends
//! what the kernel would end. What the live agent's timer task does for the
//! kernel's timers is done by the capture's clock: TIME_WAIT, FIN_WAIT2 and
//! the handshakes expire at their Linux defaults (or `--timeouts`).
//!
//! Not modelled, because a capture does not show them: the kernel's own
//! reports (a socket closed without a segment, an accept queue that held a
//! handshake back), listening sockets, and whether an application still
//! holds a FIN_WAIT2 socket (it is taken as an orphan, as `tcp_fin_timeout`
//! treats them).

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashMap},
};

use tcpstate_common::{
    EndSeq, FlowKey4, FlowKey6, Locality, Segment, Side, TcpState, Word,
    machine::{IcmpEffect, expire, icmp_error, step},
    state::STATE_SLOTS,
};

use super::{conn::Conn, local::Locals};
use crate::{snapshot::StateCounts, tracking::timers::Timeouts};

/// A flow's tuple, in the probe's canonical order (namespace slot 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    V4(FlowKey4),
    V6(FlowKey6),
}

impl Key {
    /// The key of a segment from `src` to `dst` (wire-order address words;
    /// IPv4 in the first), and the sender's side.
    pub fn new(family: u32, src: &[u32; 4], sport: u16, dst: &[u32; 4], dport: u16) -> (Key, Side) {
        if family == 6 {
            let (k, s) = FlowKey6::new(0, *src, sport, *dst, dport);
            (Key::V6(k), s)
        } else {
            let (k, s) = FlowKey4::new(0, src[0], sport, dst[0], dport);
            (Key::V4(k), s)
        }
    }

    /// (address words, port) of `side`.
    pub fn end(&self, side: Side) -> (u32, [u32; 4], u16) {
        match (self, side) {
            (Key::V4(k), Side::A) => (4, [k.addr_a, 0, 0, 0], k.port_a),
            (Key::V4(k), Side::B) => (4, [k.addr_b, 0, 0, 0], k.port_b),
            (Key::V6(k), Side::A) => (6, k.addr_a, k.port_a),
            (Key::V6(k), Side::B) => (6, k.addr_b, k.port_b),
        }
    }
}

/// A deadline filed for an entry; `timer` is its number, which the entry
/// keeps until it files another.
#[derive(Clone, Copy, Debug)]
struct Due {
    at: u64,
    timer: u64,
    key: Key,
}

impl PartialEq for Due {
    fn eq(&self, o: &Due) -> bool {
        self.timer == o.timer
    }
}

impl Eq for Due {}

impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Due) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl Ord for Due {
    fn cmp(&self, o: &Due) -> std::cmp::Ordering {
        (self.at, self.timer).cmp(&(o.at, o.timer))
    }
}

/// A flow: its state word, as the probe keeps it, and its connection's
/// record.
pub struct Entry {
    pub word: Word,
    ends: [EndSeq; 2],
    /// When each endpoint entered its state (its timer runs from there),
    /// and when the entry died.
    since: [u64; 2],
    died_ns: u64,
    /// The timer filed for it (older ones in the heap are stale).
    timer: u64,
    pub conn: Conn,
}

/// What the replay saw that it did not apply, and the segments' fates.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Stats {
    pub segments: u64,
    /// Segments of no tracked connection (picked up midstream, or after
    /// the connection ended).
    pub untracked: u64,
    pub rst_ignored: u64,
    pub icmp_errors: u64,
    pub icmp_ended: u64,
    pub connections: u64,
    pub expired: u64,
}

/// The flow table and its clock.
pub struct Engine {
    flows: HashMap<Key, Entry, foldhash::fast::RandomState>,
    /// When entries next need looking at, the earliest first.
    timers: BinaryHeap<Reverse<Due>>,
    /// Timers filed so far (each one's number).
    filed: u64,
    counts: [i64; STATE_SLOTS],
    timeouts: Timeouts,
    locals: Locals,
    /// The capture's time, never going back.
    pub now_ns: u64,
    pub stats: Stats,
    /// Connections that ended, for the connection log.
    pub ended: Vec<(Key, Conn)>,
    /// Keep ended connections (only when a connection log is written).
    keep_ended: bool,
    /// The log's records of tuples with no flow entry (see `untracked`).
    loose: HashMap<Key, Conn, foldhash::fast::RandomState>,
}

impl Engine {
    pub fn new(locals: Locals, timeouts: Timeouts, keep_ended: bool) -> Engine {
        Engine {
            flows: HashMap::default(),
            timers: BinaryHeap::new(),
            filed: 0,
            counts: [0; STATE_SLOTS],
            timeouts,
            locals,
            now_ns: 0,
            stats: Stats::default(),
            ended: Vec::new(),
            keep_ended,
            loose: HashMap::default(),
        }
    }

    /// The eleven counts now (LISTEN: none, a capture shows no listener).
    pub fn counts(&self) -> StateCounts {
        let mut slots = [0i64; 16];
        slots.copy_from_slice(&self.counts);
        StateCounts::from_slots(&slots)
    }

    /// Moves the clock to `ts_ns` (never back), firing what falls due.
    pub fn advance(&mut self, ts_ns: u64) {
        if ts_ns > self.now_ns {
            self.fire_until(ts_ns);
            self.now_ns = ts_ns;
        }
    }

    /// Applies a segment (`ip_len`: its IP packet's length).
    pub fn segment(&mut self, key: Key, sender: Side, seg: &Segment, ip_len: u32) {
        self.stats.segments += 1;
        let now = self.now_ns;
        let Some(entry) = self.flows.get_mut(&key) else {
            self.open(key, sender, seg, ip_len);
            return;
        };
        let old = entry.word;
        let locality = if old.is_dead() {
            self.locals.of(&key, sender)
        } else {
            Locality {
                sender: old.is_local(sender),
                receiver: old.is_local(sender.other()),
            }
        };
        let st = step(
            old,
            &entry.ends[sender.index()],
            &entry.ends[sender.other().index()],
            sender,
            locality,
            seg,
        );
        if st.rst_ignored {
            self.stats.rst_ignored += 1;
        }
        // A new connection on the tuple: the old one's record ends.
        if st.restarted && st.word != old {
            let fresh = Conn::new(now, sender, seg);
            let done = std::mem::replace(&mut entry.conn, fresh);
            self.stats.connections += 1;
            if self.keep_ended {
                self.ended.push((key, done));
            }
        }
        entry.conn.note(now, sender, seg, ip_len);
        entry.ends[sender.index()] = st.sender;
        if st.touch {
            // A retransmitted FIN re-arms the receiver's TIME_WAIT.
            entry.since[sender.other().index()] = now;
        }
        if st.word == old {
            if st.touch {
                self.schedule(key);
            }
            return;
        }
        move_counts(&mut self.counts, old, st.word);
        note_states(entry, old, st.word, now);
        entry.word = st.word;
        self.schedule(key);
    }

    /// A segment of a tuple without an entry: the probe's rule for a new
    /// one (only a segment that may open a connection, only if an endpoint
    /// is left holding a socket).
    fn open(&mut self, key: Key, sender: Side, seg: &Segment, ip_len: u32) {
        let now = self.now_ns;
        if !seg.may_open() {
            self.untracked(key, sender, seg, ip_len);
            return;
        }
        let locality = self.locals.of(&key, sender);
        let none = EndSeq::default();
        let st = step(Word::EMPTY, &none, &none, sender, locality, seg);
        if st.word.is_dead() {
            // Nothing holds a socket (a SYN the receiver has not
            // answered, to an endpoint that is not watched).
            self.untracked(key, sender, seg, ip_len);
            return;
        }
        self.stats.connections += 1;
        // What was seen of it before it held a state is its start.
        let mut conn = self
            .loose
            .remove(&key)
            .unwrap_or_else(|| Conn::new(now, sender, seg));
        conn.note(now, sender, seg, ip_len);
        let mut entry = Entry {
            word: Word::EMPTY,
            ends: [none; 2],
            since: [now; 2],
            died_ns: 0,
            timer: 0,
            conn,
        };
        entry.ends[sender.index()] = st.sender;
        move_counts(&mut self.counts, Word::EMPTY, st.word);
        note_states(&mut entry, Word::EMPTY, st.word, now);
        entry.word = st.word;
        self.flows.insert(key, entry);
        self.schedule(key);
    }

    /// A segment of no tracked connection: counted, and for the log kept
    /// as a connection of its own (picked up midstream, or attempts nothing
    /// local answered), as Zeek logs them.
    fn untracked(&mut self, key: Key, sender: Side, seg: &Segment, ip_len: u32) {
        self.stats.untracked += 1;
        if self.keep_ended {
            let now = self.now_ns;
            self.loose
                .entry(key)
                .or_insert_with(|| Conn::new(now, sender, seg))
                .note(now, sender, seg, ip_len);
        }
    }

    /// Applies an ICMP error quoting a segment `sender` sent.
    pub fn icmp(&mut self, key: Key, sender: Side, effect: IcmpEffect, seq: u32) {
        let now = self.now_ns;
        let Some(entry) = self.flows.get_mut(&key) else {
            return;
        };
        self.stats.icmp_errors += 1;
        let old = entry.word;
        let new = icmp_error(old, &entry.ends[sender.index()], sender, effect, seq, false);
        if new != old {
            self.stats.icmp_ended += 1;
            move_counts(&mut self.counts, old, new);
            note_states(entry, old, new, now);
            entry.word = new;
            self.schedule(key);
        }
    }

    /// Files the entry's next deadline: a local endpoint's timer, or the
    /// end of a dead entry's grace.
    fn schedule(&mut self, key: Key) {
        let Some(e) = self.flows.get_mut(&key) else {
            return;
        };
        let Some(at) = deadline(e, &self.timeouts) else {
            return;
        };
        self.filed += 1;
        e.timer = self.filed;
        self.timers.push(Reverse(Due {
            at,
            timer: self.filed,
            key,
        }));
    }

    /// Fires every deadline up to `until`, in order, each at its own moment.
    fn fire_until(&mut self, until: u64) {
        while let Some(Reverse(Due { at, timer, key })) = self.timers.peek().copied() {
            if at > until {
                break;
            }
            self.timers.pop();
            let live = self.flows.get(&key).is_some_and(|e| e.timer == timer);
            if live {
                self.fire(key, at);
            }
        }
    }

    fn fire(&mut self, key: Key, at: u64) {
        let Some(e) = self.flows.get_mut(&key) else {
            return;
        };
        let old = e.word;
        if old.is_dead() {
            if let Some(done) = self.flows.remove(&key)
                && self.keep_ended
            {
                self.ended.push((key, done.conn));
            }
            return;
        }
        let mut new = old;
        for side in [Side::A, Side::B] {
            let s = old.counted(side);
            let due = self
                .timeouts
                .for_state(s)
                .is_some_and(|t| ends(e.since[side.index()], t) <= at);
            if due {
                new = expire(new, side);
                self.stats.expired += 1;
            }
        }
        if new != old {
            move_counts(&mut self.counts, old, new);
            note_states(e, old, new, at);
            e.word = new;
        }
        self.schedule(key);
    }

    /// Ends the capture: the connections still there, for the log.
    pub fn finish(&mut self) {
        if self.keep_ended {
            let mut rest: Vec<(Key, Conn)> = self.flows.drain().map(|(k, e)| (k, e.conn)).collect();
            rest.extend(self.loose.drain());
            rest.sort_by_key(|(_, c)| c.start_ns);
            self.ended.extend(rest);
        }
    }

    /// The flows still in the table (for tests and `--at` listings).
    pub fn flows(&self) -> impl Iterator<Item = (&Key, &Entry)> {
        self.flows.iter()
    }
}

/// When a timer of `limit` started at `since` fires (at the end of time
/// rather than overflow, for a corrupt timestamp).
fn ends(since: u64, limit: std::time::Duration) -> u64 {
    since.saturating_add(limit.as_nanos() as u64)
}

/// The entry's next deadline.
fn deadline(e: &Entry, t: &Timeouts) -> Option<u64> {
    if e.word.is_dead() {
        return Some(ends(e.died_ns, t.dead_grace));
    }
    [Side::A, Side::B]
        .into_iter()
        .filter_map(|side| {
            let limit = t.for_state(e.word.counted(side))?;
            Some(ends(e.since[side.index()], limit))
        })
        .min()
}

/// After the word changed from `old` to `new` at `now`: each endpoint's
/// timer starts from its own change; the record keeps the last state each
/// held.
fn note_states(e: &mut Entry, old: Word, new: Word, now: u64) {
    for side in [Side::A, Side::B] {
        let s = new.state(side);
        if s != old.state(side) || new.is_dead() != old.is_dead() {
            e.since[side.index()] = now;
        }
        if !matches!(s, TcpState::None | TcpState::Close) {
            e.conn.dirs[side.index()].last = s;
        }
    }
    if new.is_dead() && !old.is_dead() {
        e.died_ns = now;
    }
}

/// The per-state counts move by what the word counts before and after.
fn move_counts(counts: &mut [i64; STATE_SLOTS], old: Word, new: Word) {
    for side in [Side::A, Side::B] {
        let (o, n) = (old.counted(side), new.counted(side));
        if o != n {
            if o != TcpState::None {
                counts[o as usize] -= 1;
            }
            if n != TcpState::None {
                counts[n as usize] += 1;
            }
        }
    }
}
