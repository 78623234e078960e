//! Reading a capture file, pcap or pcapng (pcap-parser: both formats from
//! one streaming reader, so standard input works; pcapng's per-interface
//! timestamp resolution and offset honoured), into frames with their
//! timestamp and link type.
//!
//! What cannot be read is said once, with where: a bad magic, a truncated
//! last record, a corrupt block. Frames are never dropped silently: what
//! the replay skips is counted ([`super::Skipped`]).

use std::io::Read;

use pcap_parser::{
    Block, Linktype, PcapBlockOwned, PcapError, create_reader,
    pcapng::InterfaceDescriptionBlock,
    traits::{PcapNGPacketBlock, PcapReaderIterator},
};

use crate::error::{Error, Result};

/// The reader's buffer; it grows for a larger record (up to [`MAX_RECORD`]).
const BUFFER: usize = 64 << 10;
/// The largest record accepted: four times tcpdump's largest snap length
/// (262,144), room for any frame a capture holds; a larger length is a
/// corrupt record.
const MAX_RECORD: usize = 1 << 20;

/// One captured frame.
pub struct Frame<'a> {
    /// Capture time, nanoseconds since the epoch.
    pub ts_ns: u64,
    pub link: Linktype,
    pub data: &'a [u8],
    /// The frame's length on the wire (more than `data` when the capture's
    /// snap length cut it).
    pub orig_len: u32,
}

/// An interface of a pcapng section: its link type and clock.
#[derive(Clone, Copy)]
struct Interface {
    link: Linktype,
    /// Timestamp units per second.
    resolution: u64,
    offset_s: i64,
}

impl Interface {
    fn of(idb: &InterfaceDescriptionBlock) -> Interface {
        Interface {
            link: idb.linktype,
            // An invalid resolution (beyond 2^63 or 10^19): read as microseconds.
            resolution: idb.ts_resolution().unwrap_or(1_000_000),
            offset_s: idb.ts_offset(),
        }
    }

    /// Epoch nanoseconds (saturating: a corrupt stamp or offset must not
    /// overflow).
    fn ns(&self, high: u32, low: u32) -> u64 {
        let units = (u64::from(high) << 32) | u64::from(low);
        let secs = i128::from(units / self.resolution) + i128::from(self.offset_s);
        let frac =
            u128::from(units % self.resolution) * 1_000_000_000 / u128::from(self.resolution);
        (secs * 1_000_000_000 + frac as i128).clamp(0, i128::from(u64::MAX)) as u64
    }
}

/// A capture being read, frame by frame.
pub struct Capture {
    reader: Box<dyn PcapReaderIterator + Send>,
    name: String,
    /// Legacy pcap: the file's link type and whether its fractions are
    /// nanoseconds.
    legacy: Option<(Linktype, bool)>,
    /// pcapng: the current section's interfaces, by id.
    interfaces: Vec<Interface>,
    /// Blocks read, for error messages.
    pub records: u64,
    /// Records of an interface the section never described.
    pub unknown_interface: u64,
    /// How far into the input the last good record ended.
    consumed: usize,
    /// The last refill brought nothing new.
    stalled: bool,
    /// The reader's buffer size now.
    capacity: usize,
}

impl Capture {
    /// Opens a capture on `input`; `name` is how errors name it.
    pub fn open(input: impl Read + Send + 'static, name: &str) -> Result<Capture> {
        let reader = create_reader(BUFFER, input).map_err(|e| {
            let what = match e {
                PcapError::Eof => "it is empty".to_owned(),
                PcapError::HeaderNotRecognized | PcapError::NomError(..) => {
                    "not a pcap or pcapng capture (its first bytes are no known magic number)"
                        .to_owned()
                }
                PcapError::Incomplete(_) | PcapError::UnexpectedEof => {
                    "it ends inside its file header".to_owned()
                }
                other => format!("cannot be read: {other:?}"),
            };
            capture_error(name, what)
        })?;
        Ok(Capture {
            reader,
            name: name.to_owned(),
            legacy: None,
            interfaces: Vec::new(),
            records: 0,
            unknown_interface: 0,
            consumed: 0,
            stalled: false,
            capacity: BUFFER,
        })
    }

    /// Calls `f` on each frame, in file order; an error ends the reading
    /// (what was read before it stays applied).
    pub fn for_each(&mut self, mut f: impl FnMut(&Frame)) -> Result<()> {
        loop {
            match self.reader.next() {
                Ok((len, block)) => {
                    self.records += 1;
                    self.stalled = false;
                    self.consumed += len;
                    if let Some(frame) = frame_of(
                        &block,
                        &mut self.legacy,
                        &mut self.interfaces,
                        &mut self.unknown_interface,
                    ) {
                        f(&frame);
                    }
                    self.reader.consume(len);
                }
                Err(PcapError::Eof) => return Ok(()),
                Err(PcapError::Incomplete(_)) => self.refill()?,
                Err(PcapError::BufferTooSmall) => {
                    self.capacity *= 2;
                    if self.capacity > MAX_RECORD || !self.reader.grow(self.capacity) {
                        return Err(
                            self.error(format!("a record larger than {} MiB", MAX_RECORD >> 20))
                        );
                    }
                }
                Err(PcapError::UnexpectedEof) => {
                    return Err(self.error("it ends in the middle of a record (truncated)".into()));
                }
                Err(e) => {
                    let what = format!("a corrupt record ({})", describe(&e));
                    return Err(self.error(what));
                }
            }
        }
    }

    fn refill(&mut self) -> Result<()> {
        if self.stalled {
            return Err(self.error("it ends in the middle of a record (truncated)".into()));
        }
        self.stalled = true;
        self.reader
            .refill()
            .map_err(|e| capture_error(&self.name, format!("reading it failed: {}", describe(&e))))
    }

    fn error(&self, what: String) -> Error {
        capture_error(
            &self.name,
            format!(
                "{what}, after {} records ({} bytes); what came before was replayed",
                self.records, self.consumed
            ),
        )
    }
}

fn capture_error(name: &str, what: String) -> Error {
    Error::Capture {
        file: name.to_owned(),
        what,
    }
}

fn describe<I>(e: &PcapError<I>) -> String {
    match e {
        PcapError::NomError(_, kind) => format!("{kind:?}"),
        PcapError::OwnedNomError(_, kind) => format!("{kind:?}"),
        PcapError::ReadError => "read error".into(),
        PcapError::HeaderNotRecognized => "unknown block".into(),
        _ => "unexpected end".into(),
    }
}

/// The frame a block holds, if it holds one; section and interface blocks
/// update the reader's state.
fn frame_of<'a>(
    block: &'a PcapBlockOwned<'a>,
    legacy: &mut Option<(Linktype, bool)>,
    interfaces: &mut Vec<Interface>,
    unknown_interface: &mut u64,
) -> Option<Frame<'a>> {
    match block {
        PcapBlockOwned::LegacyHeader(h) => {
            *legacy = Some((h.network, h.is_nanosecond_precision()));
            None
        }
        PcapBlockOwned::Legacy(b) => {
            let (link, nanos) = (*legacy)?;
            let frac = if nanos {
                u64::from(b.ts_usec)
            } else {
                u64::from(b.ts_usec) * 1000
            };
            Some(Frame {
                ts_ns: u64::from(b.ts_sec) * 1_000_000_000 + frac,
                link,
                data: b.data,
                orig_len: b.origlen,
            })
        }
        PcapBlockOwned::NG(Block::SectionHeader(_)) => {
            interfaces.clear();
            None
        }
        PcapBlockOwned::NG(Block::InterfaceDescription(idb)) => {
            interfaces.push(Interface::of(idb));
            None
        }
        PcapBlockOwned::NG(Block::EnhancedPacket(epb)) => {
            let Some(iface) = interfaces.get(epb.if_id as usize) else {
                *unknown_interface += 1;
                return None;
            };
            Some(Frame {
                ts_ns: iface.ns(epb.ts_high, epb.ts_low),
                link: iface.link,
                data: epb.packet_data(),
                orig_len: epb.origlen,
            })
        }
        PcapBlockOwned::NG(Block::SimplePacket(spb)) => {
            // No timestamp: it shares the previous frame's moment (callers
            // keep time monotonic); interface 0 by definition.
            let Some(iface) = interfaces.first() else {
                *unknown_interface += 1;
                return None;
            };
            Some(Frame {
                ts_ns: 0,
                link: iface.link,
                data: spb.packet_data(),
                orig_len: spb.origlen,
            })
        }
        PcapBlockOwned::NG(_) => None,
    }
}
