//! The pure TCP endpoint state machine.
//!
//! A flow entry holds the state of both endpoints. [`step`] moves the
//! sender's and the receiver's states the way the Linux stack does on sending
//! and on receiving a segment, so the local endpoints' states match what `ss`
//! shows once the stack has processed it. Which endpoints are local comes
//! with the segment ([`Locality`]); only local endpoints are counted.
//!
//! What a segment proves differs by direction. A segment a local endpoint
//! sends proves what its kernel already did (a SYN-ACK leaves only from a
//! request socket, a FIN only after close or shutdown). A segment a local
//! endpoint receives is only a forecast: the kernel may still drop it (a
//! firewall, a full queue, a bad checksum). So:
//! - A SYN never makes a local receiver SYN_RECV: the kernel keeps a request
//!   only when it answers with a SYN-ACK, and that SYN-ACK does it. A SYN-ACK
//!   that leaves without a socket is a SYN cookie: nothing is kept.
//! - A SYN-ACK makes a local receiver ESTABLISHED only out of SYN_SENT.
//! - Where the kernel reports its own transitions ([`Segment::KERNEL_EVENTS`],
//!   the live agent's tracepoint), the ACK that completes a passive open
//!   does not: the kernel may hold the request when its accept queue is full.
//!
//! Other rules worth knowing:
//! - Retransmitted SYN, SYN-ACK and FIN never move a state twice: every rule
//!   fires only from the state that precedes it.
//! - A SYN (or SYN-ACK) on a tuple whose connection is over starts a fresh
//!   one: both endpoints' fields are reset. A local TIME_WAIT survives a
//!   SYN until the kernel answers it (a SYN-ACK: a new connection; an ACK:
//!   the TIME_WAIT socket stays, and the client's RST that answers the ACK
//!   ends it).
//! - An endpoint in SYN_SENT stays there when it sends an RST: Linux sends
//!   one from SYN_SENT only to answer an ACK that does not acknowledge its
//!   SYN, and sends its SYN again later.
//! - An RST from a remote sender ends the connection only when its sequence
//!   number lies between the receiver's last ACK and the sender's highest
//!   sequence sent (Linux accepts exactly `rcv_nxt`, which lies in that range);
//!   a blind or stale RST is ignored and counted. The local stack's own RSTs
//!   are trusted.
//! - The FIN is the last thing an endpoint sends: once it is seen
//!   ([`Word::FIN`]), its `snd_nxt` stays one past it, and "the FIN is
//!   acknowledged" is "an ACK covers `snd_nxt`".

use crate::{
    flow::{EndSeq, Side, Word},
    state::TcpState,
};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// Which endpoints of a segment are on the monitored host: those whose
/// address is one of the namespace's own. The probe decides it from the
/// addresses, not from where the segment was seen, so traffic the host only
/// forwards (a bridge, a router) counts nowhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Locality {
    pub sender: bool,
    pub receiver: bool,
}

/// The parts of a TCP segment the state machine reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Segment {
    pub flags: u8,
    /// How the segment was seen ([`Segment::EGRESS`], ...).
    pub meta: u8,
    pub seq: u32,
    pub ack: u32,
    /// Payload bytes (not counting SYN/FIN).
    pub len: u32,
}

impl Segment {
    /// Seen leaving the host (TC egress).
    pub const EGRESS: u8 = 1;
    /// Seen leaving without a socket attached: a SYN-ACK like that is a SYN
    /// cookie, for which the kernel keeps nothing.
    pub const NO_SOCKET: u8 = 2;
    /// The kernel reports its own state changes of full sockets (the live
    /// agent's tracepoint): a local passive open becomes ESTABLISHED by that
    /// report, not by the ACK, which the kernel may drop.
    pub const KERNEL_EVENTS: u8 = 4;
    /// A pass for the receiving socket only: both sockets are this host's
    /// and a local NAT gives each its own tuple, so each has its own entry,
    /// and the sender's is moved by its own pass. A local sender's endpoint
    /// in the receiver's entry stays as it is (it is not that socket).
    pub const FOR_RECEIVER: u8 = 8;
    /// A connection passing through the host (`run --observe`): both
    /// endpoints are tracked, as a middlebox sees them, and no kernel
    /// reports anything of them (the machine itself reads no such flag;
    /// the probe's slow path does).
    pub const OBSERVED: u8 = 16;

    #[inline(always)]
    const fn has(&self, f: u8) -> bool {
        self.flags & f != 0
    }
    #[inline(always)]
    const fn meta(&self, m: u8) -> bool {
        self.meta & m != 0
    }
    /// One past the last sequence number the segment occupies.
    #[inline(always)]
    const fn end(&self) -> u32 {
        let mut end = self.seq.wrapping_add(self.len);
        if self.has(SYN) {
            end = end.wrapping_add(1);
        }
        if self.has(FIN) {
            end = end.wrapping_add(1);
        }
        end
    }
    /// Only a SYN (with or without ACK) and without RST/FIN may open a flow.
    #[inline(always)]
    pub const fn may_open(&self) -> bool {
        self.has(SYN) && !self.has(RST) && !self.has(FIN)
    }

    /// A connection attempt (SYN, no ACK): usually a flow not seen before.
    #[inline(always)]
    pub const fn opens_a_flow(&self) -> bool {
        self.may_open() && !self.has(ACK)
    }

    /// Only a segment without SYN, FIN and RST can take the fast path
    /// ([`is_steady`]).
    #[inline(always)]
    pub const fn may_be_steady(&self) -> bool {
        self.flags & (SYN | FIN | RST) == 0
    }

    /// A SYN-ACK that left without a socket: a SYN cookie.
    #[inline(always)]
    pub const fn is_syn_cookie(&self) -> bool {
        self.has(SYN) && self.has(ACK) && self.meta(Self::EGRESS) && self.meta(Self::NO_SOCKET)
    }
}

/// What [`step`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// The new state word (equal to the old one when nothing changed).
    pub word: Word,
    /// The sender's new sequence facts.
    pub sender: EndSeq,
    /// The connection was (re)started on this entry. `word` records no fact of
    /// the receiver any more, so its stored [`EndSeq`] is ignored until it
    /// sends again: nothing needs clearing.
    pub reset_receiver: bool,
    /// A new connection started on the entry's tuple: the old one (if any)
    /// is over.
    pub restarted: bool,
    /// A timer the kernel re-arms (TIME_WAIT on a retransmitted FIN) restarts.
    pub touch: bool,
    /// An RST was ignored as blind or stale.
    pub rst_ignored: bool,
}

/// `a` is at or after `b` in sequence space.
#[inline(always)]
pub(crate) const fn seq_ge(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) >= 0
}

/// Beyond the per-state gauges: what a change of the word means for the
/// event counters.
impl Segment {
    /// A SYN-ACK (no RST).
    #[inline(always)]
    pub const fn is_syn_ack(&self) -> bool {
        self.has(SYN) && self.has(ACK) && !self.has(RST)
    }

    /// A connection attempt (SYN without ACK) to an endpoint of this host.
    #[inline(always)]
    pub const fn is_syn_to_local(&self, word: Word, sender: Side) -> bool {
        self.has(SYN) && !self.has(ACK) && word.is_local(sender.other())
    }
}

/// Local endpoints that left SYN_SENT or SYN_RECV for closed between `old`
/// and `new`: a refused, reset or timed-out handshake (the kernel's
/// AttemptFails).
#[inline(always)]
pub const fn handshakes_failed(old: Word, new: Word) -> u32 {
    closed_from(old, new, TcpState::SynSent, TcpState::SynRecv)
}

/// Local endpoints that left ESTABLISHED or CLOSE_WAIT for closed between
/// `old` and `new`: reset, or given up by the kernel (its EstabResets).
#[inline(always)]
pub const fn resets(old: Word, new: Word) -> u32 {
    closed_from(old, new, TcpState::Established, TcpState::CloseWait)
}

#[inline(always)]
const fn closed_from(old: Word, new: Word, a: TcpState, b: TcpState) -> u32 {
    let mut n = 0;
    let sides = [Side::A, Side::B];
    let mut i = 0;
    while i < 2 {
        let side = sides[i];
        let was = old.counted(side) as u8;
        let now = new.counted(side) as u8;
        if (was == a as u8 || was == b as u8) && now == TcpState::None as u8 {
            n += 1;
        }
        i += 1;
    }
    n
}

/// Applies one segment sent by `sender` to the entry: its state word and the
/// sequence facts of the sender and of the receiver.
#[inline(always)]
pub fn step(
    word: Word,
    sender_facts: &EndSeq,
    receiver_facts: &EndSeq,
    sender: Side,
    local: Locality,
    seg: &Segment,
) -> Step {
    let receiver = sender.other();
    let mut out = Step {
        word,
        sender: *sender_facts,
        reset_receiver: false,
        restarted: false,
        touch: false,
        rst_ignored: false,
    };
    if word.is_reaping() {
        return out;
    }
    let mut w = word;
    let mut fresh = false;
    if w.is_dead() {
        if !seg.may_open() {
            return out;
        }
        w = Word::EMPTY;
        fresh = true;
    }
    w = w.with_locality(sender, local);
    let sender_local = w.is_local(sender);
    let receiver_local = w.is_local(receiver);
    let mut ss = w.state(sender);
    let mut rs = w.state(receiver);

    // A new connection on a tuple whose previous one is over (port reuse).
    // Each endpoint that starts it remembers nothing of the old one, except:
    // - a local TIME_WAIT receiver is the kernel's to end: it answers the
    //   SYN with a SYN-ACK (and is gone) or keeps the TIME_WAIT socket and
    //   answers with the old connection's ACK;
    // - a SYN-ACK that answers the receiver's new SYN keeps what that SYN did;
    // - a SYN sent again by an endpoint already in SYN_SENT (after the RST
    //   that answered such an ACK) is the same connection.
    let over = |s: TcpState| matches!(s, TcpState::TimeWait | TcpState::Close);
    let to_local_time_wait = receiver_local && rs == TcpState::TimeWait && !seg.has(ACK);
    let mut fresh_receiver = fresh;
    if seg.may_open() && (over(ss) || over(rs)) {
        let answers_syn = rs == TcpState::SynSent && seg.has(ACK);
        let again = ss == TcpState::SynSent && !seg.has(ACK);
        if !again {
            ss = TcpState::None;
            fresh = true;
            out.restarted = !answers_syn;
        }
        if !to_local_time_wait && !answers_syn {
            rs = TcpState::None;
            fresh_receiver = true;
        }
    }
    let sender_before = ss;
    out.reset_receiver = fresh_receiver;
    out.restarted |= word.is_dead() && fresh;
    let prev = if fresh {
        Facts::UNKNOWN
    } else {
        Facts::of(sender_facts, w, sender)
    };
    let rf = if fresh_receiver {
        Facts::UNKNOWN
    } else {
        Facts::of(receiver_facts, w, receiver)
    };
    let mut sf = prev;

    // The sender's own facts. After its FIN an endpoint sends nothing new,
    // so `snd_nxt` stays one past the FIN.
    let end = seg.end();
    if seg.has(SYN) || !prev.seen() || (!prev.fin() && seq_ge(end, prev.snd_nxt)) {
        sf.snd_nxt = end;
        sf.known |= Word::SEEN;
    }
    if seg.has(ACK) {
        sf.ack = seg.ack;
        sf.known |= Word::ACKED;
    }

    if seg.has(RST) {
        if sender_local || rst_acceptable(seg, rs, &rf, &prev) {
            // Linux sends an RST from SYN_SENT only to answer an ACK that
            // does not acknowledge its SYN (a TIME_WAIT's or a stale
            // socket's), and stays SYN_SENT.
            if ss != TcpState::SynSent {
                ss = TcpState::Close;
            }
            if rs != TcpState::Listen && rs != TcpState::None {
                rs = TcpState::Close;
            }
        } else {
            out.rst_ignored = true;
            return out;
        }
    } else if seg.has(SYN) && !seg.has(ACK) {
        // Bare SYN: an active open (or a simultaneous one). A local receiver
        // moves when its kernel answers (see the module's notes).
        if matches!(
            ss,
            TcpState::None | TcpState::SynRecv | TcpState::Close | TcpState::TimeWait
        ) {
            ss = TcpState::SynSent;
        }
        if !receiver_local && matches!(rs, TcpState::None | TcpState::SynSent) {
            rs = TcpState::SynRecv;
        }
    } else if seg.has(SYN) {
        // SYN-ACK: the passive side answers (unless with a cookie, which
        // keeps nothing); the active side is established.
        let kept = !(sender_local && seg.is_syn_cookie());
        if kept && matches!(ss, TcpState::None | TcpState::SynSent | TcpState::SynRecv) {
            ss = TcpState::SynRecv;
        }
        let acks_syn = !rf.seen() || seg.ack == rf.snd_nxt;
        let by_kernel = receiver_local && seg.meta(Segment::KERNEL_EVENTS);
        if (rs == TcpState::None && !receiver_local)
            || (rs == TcpState::SynSent && acks_syn)
            || (rs == TcpState::SynRecv && acks_syn && !by_kernel)
        {
            rs = TcpState::Established;
        }
    } else {
        if seg.has(ACK) {
            if ss == TcpState::SynSent {
                ss = TcpState::Established;
            }
            // A receiver whose own segments were never seen (a connection
            // seeded from the socket table) gets the benefit of the doubt.
            // A FIN is acknowledged only once it was seen and the ACK covers it.
            let acks_all = !rf.seen() || seq_ge(seg.ack, rf.snd_nxt);
            let acks_fin = !rf.seen() || (rf.fin() && seq_ge(seg.ack, rf.snd_nxt));
            let by_kernel = receiver_local && seg.meta(Segment::KERNEL_EVENTS);
            rs = match rs {
                TcpState::SynRecv if acks_all && !by_kernel => TcpState::Established,
                TcpState::FinWait1 if acks_fin => TcpState::FinWait2,
                TcpState::Closing if acks_fin => TcpState::TimeWait,
                TcpState::LastAck if acks_fin => TcpState::Close,
                other => other,
            };
        }
        if seg.has(FIN) {
            let first = !prev.fin();
            if first {
                // Exactly one past this FIN, whatever was seen before.
                sf.snd_nxt = end;
                sf.known |= Word::SEEN | Word::FIN;
            }
            match ss {
                TcpState::Established | TcpState::SynRecv => ss = TcpState::FinWait1,
                TcpState::CloseWait if first => {
                    // A FIN that does not acknowledge the peer's FIN was sent
                    // before the peer's FIN arrived: the FINs crossed
                    // (simultaneous close), and the sender is CLOSING.
                    let acks_peer_fin = !seg.has(ACK) || !rf.seen() || seq_ge(seg.ack, rf.snd_nxt);
                    ss = if acks_peer_fin {
                        TcpState::LastAck
                    } else {
                        TcpState::Closing
                    };
                }
                // Already moved by the kernel's own report (close() came
                // before the FIN left), or a retransmission.
                _ => {}
            }
            rs = match rs {
                TcpState::Established | TcpState::SynRecv => TcpState::CloseWait,
                TcpState::FinWait1 => TcpState::Closing,
                TcpState::FinWait2 => TcpState::TimeWait,
                TcpState::TimeWait => {
                    out.touch = true;
                    TcpState::TimeWait
                }
                other => other,
            };
        }
    }

    if sender_local && seg.meta(Segment::FOR_RECEIVER) {
        ss = sender_before;
    }
    out.sender = sf.stored();
    out.word = w
        .with_state(sender, ss)
        .with_state(receiver, rs)
        .with_facts(sender, sf.known)
        .with_facts(receiver, rf.known)
        .settle();
    out
}

/// One endpoint's sequence facts as the rules read them: the stored
/// [`EndSeq`] with what the word says is known.
#[derive(Clone, Copy)]
struct Facts {
    snd_nxt: u32,
    ack: u32,
    /// [`Word::SEEN`] | [`Word::ACKED`] | [`Word::FIN`]
    known: u32,
}

impl Facts {
    const UNKNOWN: Facts = Facts {
        snd_nxt: 0,
        ack: 0,
        known: 0,
    };

    #[inline(always)]
    const fn of(e: &EndSeq, word: Word, side: Side) -> Facts {
        Facts {
            snd_nxt: e.snd_nxt,
            ack: e.ack,
            known: word.facts(side),
        }
    }

    #[inline(always)]
    const fn seen(&self) -> bool {
        self.known & Word::SEEN != 0
    }

    #[inline(always)]
    const fn acked(&self) -> bool {
        self.known & Word::ACKED != 0
    }

    #[inline(always)]
    const fn fin(&self) -> bool {
        self.known & Word::FIN != 0
    }

    #[inline(always)]
    const fn stored(self) -> EndSeq {
        EndSeq {
            snd_nxt: self.snd_nxt,
            ack: self.ack,
        }
    }
}

/// The common case, decided without [`step`]: a segment without SYN, FIN or
/// RST on a flow whose endpoints are both ESTABLISHED and whose facts are all
/// known. Such a segment changes no state (the entry's local marks were set
/// when it was created), only the sender's sequence facts ([`steady_facts`]);
/// `step` would return the same word (a host test checks that for every such
/// case).
#[inline(always)]
pub const fn is_steady(word: Word, seg: &Segment) -> bool {
    const BOTH_ESTABLISHED: u32 =
        (TcpState::Established as u32) | ((TcpState::Established as u32) << 4);
    // One mask for all of it: both states, every fact known, no FIN seen,
    // neither dead nor reaping (the local and asked bits do not matter).
    const MASK: u32 = 0xff | Word::ALL_FACTS | Word::FINS | Word::DEAD | Word::REAPING;
    const WANT: u32 = BOTH_ESTABLISHED | Word::ALL_FACTS;
    seg.flags & (SYN | FIN | RST) == 0 && word.0 & MASK == WANT
}

/// The sender's facts after a steady segment (the same update `step` makes).
#[inline(always)]
pub const fn steady_facts(prev: EndSeq, seg: &Segment) -> EndSeq {
    let mut out = prev;
    let end = seg.end();
    if seq_ge(end, prev.snd_nxt) {
        out.snd_nxt = end;
    }
    if seg.flags & ACK != 0 {
        out.ack = seg.ack;
    }
    out
}

/// A steady segment that resends what its sender had already sent (a
/// retransmission, a keepalive or zero-window probe: all begin before
/// `snd_nxt`). A local sender doing that may be about to be given up by its
/// kernel, which sends nothing when it does.
#[inline(always)]
pub const fn resends(prev: &EndSeq, seg: &Segment) -> bool {
    !seq_ge(seg.seq, prev.snd_nxt)
}

/// Is an RST from a remote sender plausible for the receiver's connection?
#[inline(always)]
fn rst_acceptable(seg: &Segment, rs: TcpState, rf: &Facts, sf: &Facts) -> bool {
    if rs == TcpState::SynSent {
        // Refusing our SYN: it must acknowledge exactly our SYN.
        return seg.flags & ACK != 0 && (!rf.seen() || seg.ack == rf.snd_nxt);
    }
    if !rf.acked() {
        return true;
    }
    let from = rf.ack;
    let to = if sf.seen() && seq_ge(sf.snd_nxt, from) {
        sf.snd_nxt
    } else {
        from
    };
    seq_ge(seg.seq, from) && seq_ge(to, seg.seq)
}

/// The agent's expiry: the kernel's timer ended `side`'s socket (TIME_WAIT,
/// FIN_WAIT2, or a handshake that gave up).
#[inline(always)]
pub const fn expire(word: Word, side: Side) -> Word {
    word.with_state(side, TcpState::Close).settle()
}

/// The state the peer of a local socket is most likely in: what the local
/// state implies about the segments already exchanged (for entries made from
/// the socket table or from the kernel's reports, whose peer sent nothing
/// the probe saw).
#[inline(always)]
pub const fn peer_state(local: TcpState) -> TcpState {
    match local {
        TcpState::Established => TcpState::Established,
        TcpState::SynSent => TcpState::SynRecv,
        TcpState::SynRecv => TcpState::SynSent,
        TcpState::FinWait1 | TcpState::FinWait2 => TcpState::CloseWait,
        TcpState::CloseWait | TcpState::LastAck => TcpState::FinWait2,
        TcpState::Closing => TcpState::Closing,
        _ => TcpState::Close,
    }
}

mod icmp;
mod kernel;

pub use icmp::{IcmpEffect, icmp_error};
pub use kernel::{Handover, KernelChange, kernel_change, kernel_report};

#[cfg(test)]
mod tests;
