//! What replay writes: the connection log in the layout of Zeek's conn.log
//! (so zeek-cut and Zeek's tooling read it), and the timeline of counts.

use std::io::Write;

use tcpstate_common::TcpState;

use super::{conn::Conn, engine::Key, local::address, time};
use crate::snapshot::StateCounts;

/// conn.log's fields that tcpstate fills, in Zeek's order, then its own
/// two: the last state each endpoint held (what `conn_state` summarises).
const FIELDS: [(&str, &str); 19] = [
    ("ts", "time"),
    ("uid", "string"),
    ("id.orig_h", "addr"),
    ("id.orig_p", "port"),
    ("id.resp_h", "addr"),
    ("id.resp_p", "port"),
    ("proto", "enum"),
    ("duration", "interval"),
    ("orig_bytes", "count"),
    ("resp_bytes", "count"),
    ("conn_state", "string"),
    ("missed_bytes", "count"),
    ("history", "string"),
    ("orig_pkts", "count"),
    ("orig_ip_bytes", "count"),
    ("resp_pkts", "count"),
    ("resp_ip_bytes", "count"),
    ("orig_tcp_state", "string"),
    ("resp_tcp_state", "string"),
];

/// Zeek's `#open`/`#close` stamp: local time in Zeek, UTC here.
fn stamp(ns: u64) -> String {
    let t = time::rfc3339(ns);
    t[..19].replace(['T', ':'], "-")
}

/// Writes the log's header.
pub fn conn_header(out: &mut impl Write, now_ns: u64) -> std::io::Result<()> {
    writeln!(out, "#separator \\x09")?;
    writeln!(out, "#set_separator\t,")?;
    writeln!(out, "#empty_field\t(empty)")?;
    writeln!(out, "#unset_field\t-")?;
    writeln!(out, "#path\tconn")?;
    writeln!(out, "#open\t{}", stamp(now_ns))?;
    let names: Vec<&str> = FIELDS.iter().map(|f| f.0).collect();
    let types: Vec<&str> = FIELDS.iter().map(|f| f.1).collect();
    writeln!(out, "#fields\t{}", names.join("\t"))?;
    writeln!(out, "#types\t{}", types.join("\t"))
}

pub fn conn_close(out: &mut impl Write, now_ns: u64) -> std::io::Result<()> {
    writeln!(out, "#close\t{}", stamp(now_ns))
}

/// A connection's uid: Zeek's form ("C" and base62), unique in the log and
/// the same for the same capture.
pub fn uid(n: u64, start_ns: u64) -> String {
    const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    // splitmix64: spreads sequential numbers over the whole space.
    let mut z = n.wrapping_add(start_ns).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let mut s = String::from("C");
    for _ in 0..17 {
        s.push(ALPHABET[(z % 62) as usize] as char);
        z /= 62;
        if z == 0 {
            z = n.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
        }
    }
    s
}

/// One connection's line.
pub fn conn_row(out: &mut impl Write, n: u64, key: &Key, c: &Conn) -> std::io::Result<()> {
    let (o, r) = (c.orig, c.orig.other());
    let (od, rd) = (&c.dirs[o.index()], &c.dirs[r.index()]);
    let port = |side| key.end(side).2;
    // Zeek leaves duration and bytes unset for a connection of one moment.
    let span = c.last_ns.saturating_sub(c.start_ns);
    let (duration, ob, rb) = if span > 0 {
        (
            time::seconds(span),
            od.bytes().to_string(),
            rd.bytes().to_string(),
        )
    } else {
        ("-".into(), "-".into(), "-".into())
    };
    let state = |s: TcpState| {
        if s == TcpState::None { "-" } else { s.name() }
    };
    writeln!(
        out,
        "{}\t{}\t{}\t{}\t{}\t{}\ttcp\t{duration}\t{ob}\t{rb}\t{}\t0\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
        time::epoch(c.start_ns),
        uid(n, c.start_ns),
        address(key, o),
        port(o),
        address(key, r),
        port(r),
        c.conn_state(),
        if c.history.is_empty() {
            "-"
        } else {
            &c.history
        },
        od.pkts,
        od.ip_bytes,
        rd.pkts,
        rd.ip_bytes,
        state(od.last),
        state(rd.last),
    )
}

/// How the timeline is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeline {
    Json,
    Csv,
}

impl Timeline {
    pub fn header(self, out: &mut impl Write) -> std::io::Result<()> {
        if self == Timeline::Csv {
            let names: Vec<&str> = TcpState::REPORTED.iter().map(|s| s.name()).collect();
            writeln!(out, "time,offset_s,{}", names.join(","))?;
        }
        Ok(())
    }

    /// The counts at `ns`, `start_ns` being the capture's first frame.
    pub fn row(
        self,
        out: &mut impl Write,
        ns: u64,
        start_ns: u64,
        c: &StateCounts,
    ) -> std::io::Result<()> {
        let offset = time::seconds(ns.saturating_sub(start_ns));
        match self {
            Timeline::Json => {
                let v = serde_json::json!({
                    "time": time::rfc3339(ns),
                    "ts": time::epoch(ns).parse::<f64>().unwrap_or_default(),
                    "offset_s": offset.parse::<f64>().unwrap_or_default(),
                    "states": c.json(),
                });
                writeln!(out, "{v}")
            }
            Timeline::Csv => {
                let n: Vec<String> = c.0.iter().map(u64::to_string).collect();
                writeln!(out, "{},{offset},{}", time::rfc3339(ns), n.join(","))
            }
        }
    }
}
