//! Two endpoints exchanging segments through [`step`], as the probe sees them.

use crate::{
    flow::{EndSeq, Side, Word},
    machine::*,
    state::TcpState::{self, *},
};

/// Two endpoints exchanging segments through [`step`]. `client` is side A.
pub struct Sim {
    pub word: Word,
    pub ends: [EndSeq; 2],
    /// Next sequence number each side will send.
    pub seq: [u32; 2],
    /// Next sequence number each side expects (what it acknowledges).
    pub rcv: [u32; 2],
    pub local: [bool; 2],
    pub rst_ignored: u32,
    pub touched: u32,
    /// Event tallies as the probe keeps them.
    pub syns_to_local: u32,
    pub resets: u32,
    pub handshakes_failed: u32,
    /// [`Segment::KERNEL_EVENTS`] or 0.
    pub mode: u8,
}

pub const C: Side = Side::A;
pub const INGRESS: Locality = Locality {
    sender: false,
    receiver: true,
};
pub const EGRESS: Locality = Locality {
    sender: true,
    receiver: false,
};
pub const S: Side = Side::B;

impl Sim {
    pub fn new(client_local: bool, server_local: bool) -> Sim {
        Sim {
            word: Word::EMPTY,
            ends: [EndSeq::default(); 2],
            seq: [1000, 5_000_000],
            rcv: [0, 0],
            local: [client_local, server_local],
            rst_ignored: 0,
            touched: 0,
            syns_to_local: 0,
            resets: 0,
            handshakes_failed: 0,
            mode: 0,
        }
    }

    pub fn locality(&self, from: Side) -> Locality {
        Locality {
            sender: self.local[from.index()],
            receiver: self.local[from.other().index()],
        }
    }

    /// Builds the segment `from` would send now with `flags` and `len` bytes.
    pub fn seg(&self, from: Side, flags: u8, len: u32) -> Segment {
        Segment {
            flags,
            meta: self.meta(from),
            seq: self.seq[from.index()],
            ack: if flags & ACK != 0 {
                self.rcv[from.index()]
            } else {
                0
            },
            len,
        }
    }

    /// How the probe sees `from`'s segments: leaving the host (TC egress,
    /// with its socket) when only the sender is local; on loopback (both
    /// local) and inbound, at ingress. Plus the rules' mode.
    pub fn meta(&self, from: Side) -> u8 {
        let egress = self.local[from.index()] && !self.local[from.other().index()];
        (if egress { Segment::EGRESS } else { 0 }) | self.mode
    }

    /// Sends a segment and advances the sender's sequence and receiver's rcv.
    pub fn send(&mut self, from: Side, flags: u8, len: u32) -> Segment {
        let seg = self.seg(from, flags, len);
        self.deliver(from, &seg);
        let end = seg.end();
        self.seq[from.index()] = end;
        self.rcv[from.other().index()] = end;
        seg
    }

    /// Applies a segment (new, retransmitted or forged) as the probe would.
    pub fn deliver(&mut self, from: Side, seg: &Segment) {
        let st = step(
            self.word,
            &self.ends[from.index()],
            &self.ends[from.other().index()],
            from,
            self.locality(from),
            seg,
        );
        self.syns_to_local += seg.is_syn_to_local(st.word, from) as u32;
        self.resets += resets(self.word, st.word);
        self.handshakes_failed += handshakes_failed(self.word, st.word);
        self.word = st.word;
        // Like the probe, never touches the receiver's stored facts: a
        // restart only clears what the word says is known of them.
        self.ends[from.index()] = st.sender;
        self.rst_ignored += st.rst_ignored as u32;
        self.touched += st.touch as u32;
    }

    pub fn states(&self) -> (TcpState, TcpState) {
        (self.word.state(C), self.word.state(S))
    }

    /// What a SYN leaves the server in: a local server has nothing until
    /// its kernel answers; a remote one is taken to have answered.
    pub fn after_syn(&self) -> TcpState {
        if self.local[S.index()] { None } else { SynRecv }
    }

    pub fn handshake(&mut self) {
        self.send(C, SYN, 0);
        assert_eq!(self.states(), (SynSent, self.after_syn()));
        self.send(S, SYN | ACK, 0);
        assert_eq!(self.states(), (Established, SynRecv));
        self.send(C, ACK, 0);
        assert_eq!(self.states(), (Established, Established));
    }

    /// A handshake, then a close the server begins: the server is left in
    /// TIME_WAIT.
    pub fn server_closes_first(&mut self) {
        self.handshake();
        self.send(S, FIN | ACK, 0);
        self.send(C, FIN | ACK, 0);
        self.send(S, ACK, 0);
        assert_eq!(self.states(), (Close, TimeWait));
    }
}

/// Every placement of the endpoints the probe can see.
pub const PLACEMENTS: [(bool, bool); 3] = [(true, false), (false, true), (true, true)];
