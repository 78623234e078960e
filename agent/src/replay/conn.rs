//! One connection's record for the connection log, in the terms of Zeek's
//! conn.log: who originated it, packets and bytes each way, the history
//! letters and the `conn_state` summary; and what tcpstate adds, the last
//! state each endpoint held.

use tcpstate_common::{Segment, Side, TcpState, machine};

/// An endpoint as Zeek's TCP analyzer sees it (its `TCP_*` endpoint
/// states), from which `conn_state` is derived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Seen {
    #[default]
    Inactive,
    SynSent,
    SynAckSent,
    /// Sent something without a handshake seen (picked up midstream).
    Partial,
    Established,
    /// Sent a FIN.
    Closed,
    /// Sent an RST.
    Reset,
}

/// One direction: what its endpoint sent.
#[derive(Clone, Copy, Debug, Default)]
pub struct Dir {
    pub pkts: u64,
    pub ip_bytes: u64,
    /// The sequence number of its first data byte, once known.
    start: Option<u32>,
    /// One past the highest data byte seen.
    end: u32,
    /// History letters seen (bit per letter of [`LETTERS`]).
    letters: u16,
    pub seen: Seen,
    /// The last state it held before it closed (or at the end).
    pub last: TcpState,
}

impl Dir {
    /// Payload bytes by sequence numbers (retransmissions count once), as
    /// Zeek's `orig_bytes`/`resp_bytes` do.
    pub fn bytes(&self) -> u64 {
        self.start
            .map_or(0, |s| u64::from(self.end.wrapping_sub(s)))
    }
}

/// History letters in Zeek's order of meaning; uppercase for the
/// originator. Each is written once, when first seen.
const LETTERS: [u8; 8] = *b"shadfrtq";

/// One connection (one life of a flow entry's tuple).
#[derive(Clone, Debug)]
pub struct Conn {
    pub start_ns: u64,
    pub last_ns: u64,
    /// The originator's side of the flow key.
    pub orig: Side,
    /// The first segment seen was the responder's (a SYN-ACK): Zeek's `^`.
    pub flipped: bool,
    /// By flow-key side.
    pub dirs: [Dir; 2],
    pub history: String,
}

impl Conn {
    /// A connection whose first seen segment `seg` came from `sender`.
    pub fn new(now_ns: u64, sender: Side, seg: &Segment) -> Conn {
        let syn = seg.flags & machine::SYN != 0;
        let ack = seg.flags & machine::ACK != 0;
        // A SYN-ACK first: the receiver began it.
        let flipped = syn && ack;
        let orig = if flipped { sender.other() } else { sender };
        Conn {
            start_ns: now_ns,
            last_ns: now_ns,
            orig,
            flipped,
            dirs: [Dir::default(); 2],
            history: if flipped { "^".into() } else { String::new() },
        }
    }

    /// Notes a segment `sender` sent, `ip_len` bytes of IP.
    pub fn note(&mut self, now_ns: u64, sender: Side, seg: &Segment, ip_len: u32) {
        self.last_ns = self.last_ns.max(now_ns);
        let upper = sender == self.orig;
        let other = self.dirs[sender.other().index()].seen;
        let d = &mut self.dirs[sender.index()];
        d.pkts += 1;
        d.ip_bytes += u64::from(ip_len);
        let f = seg.flags;
        let (syn, ack, fin, rst) = (
            f & machine::SYN != 0,
            f & machine::ACK != 0,
            f & machine::FIN != 0,
            f & machine::RST != 0,
        );
        // Sequence space: the first data byte follows the SYN.
        let first = if syn {
            seg.seq.wrapping_add(1)
        } else {
            seg.seq
        };
        let end = first.wrapping_add(seg.len);
        let mut retransmit = false;
        match d.start {
            None => {
                d.start = Some(first);
                d.end = end;
            }
            // Only data moves the end: a FIN's or a later ACK's sequence
            // number is one past the data.
            Some(_) if seg.len > 0 => {
                if machine_seq_gt(end, d.end) {
                    d.end = end;
                } else {
                    retransmit = true;
                }
            }
            Some(_) => {}
        }
        let mut mark = |c: u8| {
            let bit = LETTERS.iter().position(|l| *l == c).unwrap_or(0);
            if d.letters & (1 << bit) == 0 {
                d.letters |= 1 << bit;
                self.history
                    .push(if upper { c.to_ascii_uppercase() } else { c } as char);
            }
        };
        if syn && (fin || rst) {
            mark(b'q');
        }
        if syn && ack {
            mark(b'h');
        } else if syn {
            mark(b's');
        }
        if ack && !syn && !fin && !rst && seg.len == 0 {
            mark(b'a');
        }
        if seg.len > 0 {
            mark(b'd');
        }
        if fin {
            mark(b'f');
        }
        if rst {
            mark(b'r');
        }
        if retransmit {
            mark(b't');
        }
        d.seen = next_seen(d.seen, other, syn, ack, fin, rst);
        // The handshake's last ACK establishes the responder too.
        if d.seen == Seen::Established {
            let o = &mut self.dirs[sender.other().index()];
            if o.seen == Seen::SynAckSent {
                o.seen = Seen::Established;
            }
        }
    }

    /// Zeek's `conn_state`, from the endpoints as its analyzer tracks them.
    pub fn conn_state(&self) -> &'static str {
        let o = &self.dirs[self.orig.index()];
        let r = &self.dirs[self.orig.other().index()];
        let (os, rs) = (o.seen, r.seen);
        let o_inactive = matches!(os, Seen::Inactive | Seen::Partial);
        let r_inactive = matches!(rs, Seen::Inactive | Seen::Partial);
        if rs == Seen::Reset {
            if matches!(os, Seen::SynSent | Seen::SynAckSent)
                || (os == Seen::Reset && o.bytes() == 0 && r.bytes() == 0)
            {
                return "REJ";
            }
            return if o_inactive { "RSTRH" } else { "RSTR" };
        }
        if os == Seen::Reset {
            if r_inactive {
                return if self.history.trim_start_matches('^').starts_with('S')
                    && !self.history.contains(['H', 'A', 'F', 'h', 'a', 'f'])
                {
                    "RSTOS0"
                } else {
                    "OTH"
                };
            }
            return "RSTO";
        }
        match (os, rs) {
            (Seen::Closed, Seen::Closed) => "SF",
            (Seen::Closed, _) => {
                if r_inactive {
                    "SH"
                } else {
                    "S2"
                }
            }
            (_, Seen::Closed) => {
                if o_inactive {
                    "SHR"
                } else {
                    "S3"
                }
            }
            (Seen::SynSent, Seen::Inactive) => "S0",
            (Seen::Established, Seen::Established) => "S1",
            _ => "OTH",
        }
    }
}

fn machine_seq_gt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// An endpoint's next Zeek state after it sent a segment (`other`: its
/// peer's state).
fn next_seen(s: Seen, other: Seen, syn: bool, ack: bool, fin: bool, rst: bool) -> Seen {
    if rst {
        return Seen::Reset;
    }
    // An RST from a connecting endpoint answered an ACK that was not for its
    // SYN (a TIME_WAIT's, a stale socket's): Linux stays SYN_SENT and sends
    // the SYN again, which goes on with the same connection.
    if s == Seen::Reset && syn && !ack && matches!(other, Seen::Partial | Seen::SynAckSent) {
        return Seen::SynSent;
    }
    if s == Seen::Reset {
        return s;
    }
    let mut s = s;
    if syn && !ack {
        if s == Seen::Inactive {
            s = Seen::SynSent;
        }
    } else if syn {
        if matches!(s, Seen::Inactive | Seen::SynSent) {
            s = Seen::SynAckSent;
        }
    } else if s == Seen::Inactive {
        s = Seen::Partial;
    } else if s == Seen::SynSent
        && ack
        && matches!(other, Seen::SynAckSent | Seen::Established | Seen::Closed)
    {
        s = Seen::Established;
    }
    if fin {
        s = Seen::Closed;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(flags: u8, seq: u32, len: u32) -> Segment {
        Segment {
            flags,
            seq,
            ack: 0,
            len,
            meta: 0,
        }
    }

    const S: u8 = machine::SYN;
    const A: u8 = machine::ACK;
    const F: u8 = machine::FIN;
    const R: u8 = machine::RST;

    fn run(segs: &[(Side, u8, u32, u32)]) -> Conn {
        let mut c = Conn::new(0, segs[0].0, &seg(segs[0].1, 0, 0));
        for (i, (side, flags, seq, len)) in segs.iter().enumerate() {
            c.note(i as u64, *side, &seg(*flags, *seq, *len), 40 + len);
        }
        c
    }

    #[test]
    fn a_normal_close_is_sf_with_the_bytes_each_way() {
        let c = run(&[
            (Side::A, S, 100, 0),
            (Side::B, S | A, 500, 0),
            (Side::A, A, 101, 0),
            (Side::A, A, 101, 10),
            (Side::A, A, 101, 10),
            (Side::B, A, 501, 3),
            (Side::A, F | A, 111, 0),
            (Side::B, F | A, 504, 0),
            (Side::A, A, 112, 0),
        ]);
        assert_eq!(c.conn_state(), "SF");
        assert_eq!(c.history, "ShADTdFf");
        assert_eq!((c.dirs[0].bytes(), c.dirs[1].bytes()), (10, 3));
        assert_eq!((c.dirs[0].pkts, c.dirs[1].pkts), (6, 3));
    }

    #[test]
    fn the_outcomes_of_a_handshake() {
        let refused = run(&[(Side::A, S, 1, 0), (Side::B, R | A, 0, 0)]);
        assert_eq!(
            (refused.conn_state(), refused.history.as_str()),
            ("REJ", "Sr")
        );
        let unanswered = run(&[(Side::A, S, 1, 0), (Side::A, S, 1, 0)]);
        assert_eq!(unanswered.conn_state(), "S0");
        let open = run(&[
            (Side::A, S, 1, 0),
            (Side::B, S | A, 9, 0),
            (Side::A, A, 2, 0),
        ]);
        assert_eq!(open.conn_state(), "S1");
        let reset = run(&[
            (Side::A, S, 1, 0),
            (Side::B, S | A, 9, 0),
            (Side::A, A, 2, 0),
            (Side::B, R, 10, 0),
        ]);
        assert_eq!(reset.conn_state(), "RSTR");
        let aborted = run(&[
            (Side::B, S, 1, 0),
            (Side::A, S | A, 9, 0),
            (Side::B, A, 2, 0),
            (Side::B, R, 2, 0),
        ]);
        assert_eq!((aborted.conn_state(), aborted.orig), ("RSTO", Side::B));
        let midstream = run(&[(Side::A, A, 5, 10)]);
        assert_eq!(midstream.conn_state(), "OTH");
        // A SYN met by a TIME_WAIT's ACK: the client's RST, its SYN again,
        // then an ordinary connection and close.
        let challenged = run(&[
            (Side::A, S, 1, 0),
            (Side::B, A, 77, 0),
            (Side::A, R, 77, 0),
            (Side::A, S, 1, 0),
            (Side::B, S | A, 9, 0),
            (Side::A, A, 2, 0),
            (Side::A, F | A, 2, 0),
            (Side::B, F | A, 10, 0),
            (Side::A, A, 3, 0),
        ]);
        assert_eq!(
            (challenged.conn_state(), challenged.history.as_str()),
            ("SF", "SaRhAFf")
        );
        // A SYN after an RST that answered nothing: still reset.
        let gave_up = run(&[(Side::A, S, 1, 0), (Side::A, R, 2, 0), (Side::A, S, 1, 0)]);
        assert_eq!(gave_up.conn_state(), "RSTOS0");
    }
}
