//! `tcpstate conns`: the connections themselves, as `ss -tan` lists them,
//! with how long each has been in its state and, asked for, its owner; and
//! `tcpstate listeners`: one row per listening address and port.

use std::{fmt::Write, path::Path};

use crate::{
    client::{control, count::select},
    error::Result,
    snapshot::{
        conns::{Conn, ConnFilter, Listener, NetnsRows, Owner},
        durations::Histogram,
    },
};

/// Asks for `filter`'s connections (`netns`: an `ip netns` name, inode,
/// pid:PID or container, as `count --netns`) and prints them.
pub fn run(socket: &Path, mut filter: ConnFilter, netns: Option<&str>, json: bool) -> Result<()> {
    let snap = control::query(socket)?;
    if let Some(sel) = netns {
        filter.netns = Some(select(&snap, sel)?.netns);
    }
    let mut answer = control::conns(socket, &filter)?;
    for ns in &mut answer {
        sort(&mut ns.rows);
    }
    if json {
        println!("{}", conns_json(&answer));
    } else {
        print!("{}", conns_table(&answer, snap.all_namespaces));
    }
    Ok(())
}

/// Listeners first (by address), then the oldest in their state first: the
/// CLOSE_WAIT someone is looking for is at the top.
fn sort(rows: &mut [Conn]) {
    rows.sort_by(|a, b| match (a.age_s, b.age_s) {
        (None, None) => (a.local.port(), a.local.ip()).cmp(&(b.local.port(), b.local.ip())),
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        (Some(x), Some(y)) => y.total_cmp(&x),
    });
}

/// One JSON array of connections, each with its namespace's inode.
pub fn conns_json(answer: &[NetnsRows<Conn>]) -> serde_json::Value {
    let rows = answer.iter().flat_map(|ns| {
        ns.rows.iter().map(move |c| {
            let mut v = serde_json::to_value(c).expect("a connection serializes");
            v["netns"] = ns.netns.into();
            v
        })
    });
    serde_json::Value::Array(rows.collect())
}

/// `STATE LOCAL PEER AGE PROCESS` columns (with every namespace: `NETNS`
/// first), the owners as `ss -p` prints them.
pub fn conns_table(answer: &[NetnsRows<Conn>], by_netns: bool) -> String {
    let w = width(
        answer
            .iter()
            .flat_map(|ns| ns.rows.iter())
            .flat_map(|c| [c.local.to_string().len(), peer(c).len()]),
    );
    let mut out = netns_column(by_netns);
    out += &format!(
        "{:<12} {:<w$} {:<w$} {:>9} PROCESS\n",
        "STATE", "LOCAL", "PEER", "AGE"
    );
    for ns in answer {
        for c in &ns.rows {
            if by_netns {
                let _ = write!(out, "{:<12} ", ns.netns);
            }
            let line = format!(
                "{:<12} {:<w$} {:<w$} {:>9} {}",
                c.state.name(),
                c.local,
                peer(c),
                age(c),
                users(&c.owners)
            );
            out += line.trim_end();
            out.push('\n');
        }
    }
    out
}

/// An address column as wide as its widest, at least `255.255.255.255:65535`.
fn width(lens: impl Iterator<Item = usize>) -> usize {
    lens.max().unwrap_or(0).max(21)
}

/// The `NETNS` column's header, when every namespace is listed.
fn netns_column(by_netns: bool) -> String {
    if by_netns {
        format!("{:<12} ", "NETNS")
    } else {
        String::new()
    }
}

/// A listener's peer as ss prints it: `0.0.0.0:*`, `[::]:*`.
fn peer(c: &Conn) -> String {
    if c.peer.port() == 0 {
        match c.peer {
            std::net::SocketAddr::V4(a) => format!("{}:*", a.ip()),
            std::net::SocketAddr::V6(a) => format!("[{}]:*", a.ip()),
        }
    } else {
        c.peer.to_string()
    }
}

/// `850ms`, `12.3s`, `4m05s`, `3h12m`, `2d04h`; `>=` when the state began
/// before the agent watched; `-` for a listener.
pub fn age(c: &Conn) -> String {
    let Some(s) = c.age_s else {
        return "-".to_owned();
    };
    let at_least = if c.age_at_least { ">=" } else { "" };
    let whole = s as u64;
    let text = match whole {
        0 => format!("{}ms", (s * 1000.0) as u64),
        1..60 => format!("{s:.1}s"),
        60..3600 => format!("{}m{:02}s", whole / 60, whole % 60),
        3600..86400 => format!("{}h{:02}m", whole / 3600, whole % 3600 / 60),
        _ => format!("{}d{:02}h", whole / 86400, whole % 86400 / 3600),
    };
    format!("{at_least}{text}")
}

/// `users:(("nginx",pid=812,fd=6),...)`, as `ss -p`; empty when none.
pub fn users(owners: &[Owner]) -> String {
    if owners.is_empty() {
        return String::new();
    }
    let each: Vec<String> = owners
        .iter()
        .map(|o| format!("(\"{}\",pid={},fd={})", o.comm, o.pid, o.fd))
        .collect();
    format!("users:({})", each.join(","))
}

/// Asks for the listeners and prints them.
pub fn listeners(socket: &Path, netns: Option<&str>, json: bool) -> Result<()> {
    let snap = control::query(socket)?;
    let inode = match netns {
        Some(sel) => Some(select(&snap, sel)?.netns),
        None => None,
    };
    let answer = control::listeners(socket, inode)?;
    if json {
        println!("{}", listeners_json(&answer));
    } else {
        print!("{}", listeners_table(&answer, snap.all_namespaces));
    }
    Ok(())
}

/// One JSON array of namespaces, each with its listeners and counters.
pub fn listeners_json(answer: &[NetnsRows<Listener>]) -> serde_json::Value {
    let rows = answer.iter().map(|ns| {
        let listeners: Vec<serde_json::Value> = ns
            .rows
            .iter()
            .map(|l| {
                let mut v = serde_json::to_value(l).expect("a listener serializes");
                v["full"] = l.full().into();
                v
            })
            .collect();
        serde_json::json!({
            "netns": ns.netns,
            "name": ns.name,
            "listen_overflows": ns.listen_overflows,
            "listen_drops": ns.listen_drops,
            "handshakes": ns.handshakes.as_ref().map(handshakes_json),
            "listeners": listeners,
        })
    });
    serde_json::Value::Array(rows.collect())
}

/// `LOCAL SOCKETS QUEUE BACKLOG SYN_RECV CONNS` rows (`FULL` after a full
/// queue), then each namespace's ListenOverflows and ListenDrops.
pub fn listeners_table(answer: &[NetnsRows<Listener>], by_netns: bool) -> String {
    let w = width(
        answer
            .iter()
            .flat_map(|ns| ns.rows.iter().map(|l| l.local.to_string().len())),
    );
    let mut out = netns_column(by_netns);
    out += &format!(
        "{:<w$} {:>7} {:>7} {:>7} {:>8} {:>7} {:>10} {:>9} {:>9}\n",
        "LOCAL",
        "SOCKETS",
        "QUEUE",
        "BACKLOG",
        "SYN_RECV",
        "CONNS",
        "UNANSWERED",
        "HS_P50",
        "HS_P99"
    );
    let ms = |s: Option<f64>| s.map_or("-".to_owned(), |s| format!("{:.1}ms", s * 1e3));
    for ns in answer {
        for l in &ns.rows {
            if by_netns {
                let _ = write!(out, "{:<12} ", ns.netns);
            }
            let _ = writeln!(
                out,
                "{:<w$} {:>7} {:>7} {:>7} {:>8} {:>7} {:>10} {:>9} {:>9}{}",
                l.local,
                l.sockets,
                l.queue,
                l.backlog,
                l.syn_recv,
                l.connections,
                l.unanswered,
                ms(l.handshake_p50_s),
                ms(l.handshake_p99_s),
                if l.full() { " FULL" } else { "" }
            );
        }
    }
    for ns in answer {
        let n = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
        let _ = writeln!(
            out,
            "netns {}: ListenOverflows {} ListenDrops {} (since the namespace was made)",
            ns.netns,
            n(ns.listen_overflows),
            n(ns.listen_drops)
        );
        if let Some(h) = ns.handshakes.as_ref().filter(|h| h.count() > 0) {
            let ms = |s: Option<f64>| s.map_or("?".to_owned(), |s| format!("{:.3} ms", s * 1e3));
            let _ = writeln!(
                out,
                "netns {}: handshakes {} p50 {} p99 {} mean {} (first SYN-ACK to completion, since the agent started)",
                ns.netns,
                h.count(),
                ms(h.quantile(0.5)),
                ms(h.quantile(0.99)),
                ms(h.mean_seconds()),
            );
        }
    }
    out
}

/// A namespace's handshakes: how many, p50/p99 (interpolated within the
/// buckets) and the mean, in seconds.
fn handshakes_json(h: &Histogram) -> serde_json::Value {
    serde_json::json!({
        "count": h.count(),
        "p50_seconds": h.quantile(0.5),
        "p99_seconds": h.quantile(0.99),
        "mean_seconds": h.mean_seconds(),
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tcpstate_common::TcpState;

    use super::*;

    fn conn(state: TcpState, age: Option<f64>, at_least: bool) -> Conn {
        Conn {
            state,
            local: SocketAddr::from(([10, 0, 0, 1], 8080)),
            peer: SocketAddr::from(([10, 0, 0, 2], 50000)),
            age_s: age,
            age_at_least: at_least,
            owners: vec![],
        }
    }

    #[test]
    fn ages_read_as_people_say_them() {
        let a = |s, least| age(&conn(TcpState::CloseWait, Some(s), least));
        assert_eq!(a(0.25, false), "250ms");
        assert_eq!(a(12.34, false), "12.3s");
        assert_eq!(a(245.0, false), "4m05s");
        assert_eq!(a(3.0 * 3600.0 + 720.0, true), ">=3h12m");
        assert_eq!(a(2.0 * 86400.0 + 4.0 * 3600.0, false), "2d04h");
        assert_eq!(age(&conn(TcpState::Listen, None, false)), "-");
    }

    #[test]
    fn owners_are_printed_as_ss_prints_them() {
        let o = |pid, comm: &str, fd| Owner {
            pid,
            comm: comm.into(),
            fd,
        };
        assert_eq!(
            users(&[o(812, "nginx", 6), o(813, "nginx", 6)]),
            r#"users:(("nginx",pid=812,fd=6),("nginx",pid=813,fd=6))"#
        );
        assert_eq!(users(&[]), "");
    }

    #[test]
    fn the_oldest_come_first_after_the_listeners() {
        let mut rows = vec![
            conn(TcpState::Established, Some(1.0), false),
            conn(TcpState::CloseWait, Some(90.0), false),
            conn(TcpState::Listen, None, false),
        ];
        sort(&mut rows);
        let states: Vec<TcpState> = rows.iter().map(|c| c.state).collect();
        assert_eq!(
            states,
            [TcpState::Listen, TcpState::CloseWait, TcpState::Established]
        );
        let ns = NetnsRows {
            netns: 7,
            name: None,
            rows,
            listen_overflows: None,
            listen_drops: None,
            handshakes: None,
        };
        let t = conns_table(std::slice::from_ref(&ns), false);
        let second: Vec<&str> = t.lines().nth(2).unwrap().split_whitespace().collect();
        assert_eq!(
            second,
            ["CLOSE_WAIT", "10.0.0.1:8080", "10.0.0.2:50000", "1m30s"]
        );
        assert_eq!(conns_json(&[ns])[0]["netns"], 7);
    }
}
