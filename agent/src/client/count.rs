//! `tcpstate count`: the eleven counts of the whole host (the sum over the
//! agent's namespaces), of one namespace (`--netns SEL`), or one row per
//! namespace (`--by-netns`); lines, or JSON.

use std::{path::Path, process::ExitCode};

use crate::{
    client::control,
    error::{Error, Result},
    snapshot::{NetnsCounts, PortFilter, Selector, Snapshot, StateCounts},
};

/// What `count` prints.
pub struct Ask {
    pub json: bool,
    pub filter: PortFilter,
    /// `--netns SEL`.
    pub netns: Option<String>,
    pub by_netns: bool,
}

pub fn run(socket: &Path, ask: &Ask) -> Result<ExitCode> {
    let snap = control::query(socket)?;
    if ask.by_netns {
        print_by_netns(&snap, ask.json);
        return Ok(ExitCode::SUCCESS);
    }
    let chosen = match &ask.netns {
        Some(sel) => Some(select(&snap, sel)?),
        None => None,
    };
    let counts = if ask.filter.port.is_some() {
        let mut filter = ask.filter;
        filter.netns = chosen.map(|ns| ns.netns);
        control::count(socket, &filter)?
    } else {
        match chosen {
            Some(ns) => ns.states,
            None => snap.state_counts().ok_or_else(|| {
                Error::io(
                    "reading the agent's answer",
                    std::io::Error::other("it has no state counts"),
                )
            })?,
        }
    };
    print_counts(&counts, ask.json);
    Ok(ExitCode::SUCCESS)
}

/// The namespace `sel` names among those the agent monitors.
pub fn select<'a>(snap: &'a Snapshot, sel: &str) -> Result<&'a NetnsCounts> {
    let s = Selector::parse(sel);
    snap.namespaces
        .iter()
        .find(|ns| ns.selected_by(&s))
        .ok_or_else(|| Error::UnknownNetns(sel.to_owned()))
}

fn print_counts(c: &StateCounts, json: bool) {
    if json {
        println!("{}", c.json());
    } else {
        print!("{}", c.lines());
    }
}

/// One row per namespace: inode, name (`-` when none), the eleven counts;
/// or a JSON array of `{"netns", "name", "pid", "states"}`.
pub fn print_by_netns(snap: &Snapshot, json: bool) {
    if json {
        let rows: Vec<serde_json::Value> = snap.namespaces.iter().map(netns_json).collect();
        println!("{}", serde_json::Value::Array(rows));
        return;
    }
    print!("{}", by_netns_table(&snap.namespaces));
}

/// One namespace as `count --by-netns --json` and `watch --json` print it.
pub fn netns_json(ns: &NetnsCounts) -> serde_json::Value {
    serde_json::json!({
        "netns": ns.netns,
        "name": ns.name,
        "pid": ns.pid,
        "states": ns.states.json(),
    })
}

/// The text table `count --by-netns` prints.
pub fn by_netns_table(namespaces: &[NetnsCounts]) -> String {
    let mut out = format!("{:<12} {:<16}", "NETNS", "NAME");
    for s in tcpstate_common::TcpState::REPORTED {
        out += &format!(" {:>11}", s.name());
    }
    out.push('\n');
    for ns in namespaces {
        out += &format!("{:<12} {:<16}", ns.netns, ns.name.as_deref().unwrap_or("-"));
        for n in ns.states.0 {
            out += &format!(" {n:>11}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(inode: u64, name: Option<&str>, est: u64) -> NetnsCounts {
        let mut states = StateCounts::default();
        states.set(tcpstate_common::TcpState::Established, est);
        NetnsCounts {
            netns: inode,
            name: name.map(str::to_owned),
            pid: None,
            comm: None,
            states,
            refused: 0,
            drift: Default::default(),
            slot: 0,
        }
    }

    #[test]
    fn the_table_has_a_row_per_namespace_and_the_eleven_columns() {
        let t = by_netns_table(&[ns(4026531840, None, 3), ns(4026532281, Some("blue"), 1)]);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0][..3], ["NETNS", "NAME", "LISTEN"]);
        assert_eq!(lines[0].len(), 13);
        assert_eq!(lines[1][..2], ["4026531840", "-"]);
        assert_eq!(lines[2][..2], ["4026532281", "blue"]);
        assert_eq!(lines[2][5], "1", "ESTABLISHED is the fourth count");
    }

    #[test]
    fn namespaces_are_selected_by_name_inode_or_pid() {
        let mut snap = crate::snapshot::tests::empty();
        snap.namespaces = vec![ns(10, None, 0), ns(11, Some("blue"), 0)];
        assert_eq!(select(&snap, "blue").unwrap().netns, 11);
        assert_eq!(select(&snap, "10").unwrap().netns, 10);
        assert_eq!(select(&snap, "net:[11]").unwrap().netns, 11);
        assert!(matches!(select(&snap, "red"), Err(Error::UnknownNetns(_))));
        // This process's own namespace is not among them.
        assert!(select(&snap, &format!("pid:{}", std::process::id())).is_err());
    }
}
