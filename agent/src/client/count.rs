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
    /// `--observed`: the connections passing through.
    pub observed: bool,
}

pub fn run(socket: &Path, ask: &Ask) -> Result<ExitCode> {
    let snap = control::query(socket)?;
    if ask.by_netns {
        print_by_netns(&snap, ask.json);
        return Ok(ExitCode::SUCCESS);
    }
    if ask.observed {
        let observed = snap.observed.as_ref().ok_or(Error::NotObserving)?;
        print_counts(&observed.state_counts(), ask.json);
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

/// One namespace as `count --by-netns --json` and `watch --json` print it:
/// `container` and `pod` are null where nothing names them.
pub fn netns_json(ns: &NetnsCounts) -> serde_json::Value {
    serde_json::json!({
        "netns": ns.netns,
        "name": ns.name,
        "pid": ns.pid,
        "container": ns.container.as_ref().map(|c| serde_json::json!({
            "runtime": (!c.runtime.is_empty()).then_some(&c.runtime),
            "id": c.id,
            "name": c.name,
        })),
        "pod": ns.pod.as_ref().map(|p| serde_json::json!({
            "namespace": p.namespace,
            "name": p.name,
            "uid": p.uid,
        })),
        "states": ns.states.json(),
    })
}

/// The text table `count --by-netns` prints: inode, `ip netns` name, the
/// eleven counts, and last who owns it (`pod/NAMESPACE/NAME`,
/// `docker/NAME`, `pid/PID/COMM`: one word), so that the columns before
/// stay where scripts expect them.
pub fn by_netns_table(namespaces: &[NetnsCounts]) -> String {
    let mut out = format!("{:<12} {:<16}", "NETNS", "NAME");
    for s in tcpstate_common::TcpState::REPORTED {
        out += &format!(" {:>11}", s.name());
    }
    out += " OWNER\n";
    for ns in namespaces {
        out += &format!("{:<12} {:<16}", ns.netns, ns.name.as_deref().unwrap_or("-"));
        for n in ns.states.0 {
            out += &format!(" {n:>11}");
        }
        out += &format!(" {}\n", owner_column(ns));
    }
    out
}

fn owner_column(ns: &NetnsCounts) -> String {
    let o = ns.owner();
    match (&o.pod, &o.container, o.display()) {
        (Some(p), _, Some(d)) if p.name.is_some() => format!("pod/{d}"),
        (_, Some(c), Some(d)) => {
            let rt = if c.runtime.is_empty() {
                "container"
            } else {
                c.runtime.as_str()
            };
            format!("{rt}/{d}")
        }
        _ => match ns.pid {
            Some(pid) => format!("pid/{pid}/{}", ns.comm.as_deref().unwrap_or("?")),
            None => "-".to_owned(),
        },
    }
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
            container: None,
            pod: None,
        }
    }

    #[test]
    fn the_table_has_a_row_per_namespace_and_the_eleven_columns() {
        let t = by_netns_table(&[ns(4026531840, None, 3), ns(4026532281, Some("blue"), 1)]);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0][..3], ["NETNS", "NAME", "LISTEN"]);
        assert_eq!(lines[0].len(), 14);
        assert_eq!(lines[0][13], "OWNER");
        assert_eq!(lines[1][..2], ["4026531840", "-"]);
        assert_eq!(lines[2][..2], ["4026532281", "blue"]);
        assert_eq!(lines[2][5], "1", "ESTABLISHED is the fourth count");
    }

    #[test]
    fn namespaces_are_selected_and_shown_by_container_and_pod() {
        let id = "3f4e1c0b9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
        let mut web = ns(20, None, 2);
        web.container = Some(crate::names::Container {
            runtime: "docker".into(),
            id: id.into(),
            name: Some("web".into()),
        });
        let mut cart = ns(21, None, 1);
        cart.pod = Some(crate::names::Pod {
            namespace: Some("shop".into()),
            name: Some("cart".into()),
            uid: None,
        });
        let mut bare = ns(22, None, 0);
        bare.pid = Some(4242);
        bare.comm = Some("sleep".into());
        let mut snap = crate::snapshot::tests::empty();
        snap.namespaces = vec![web, cart, bare];
        assert_eq!(select(&snap, "web").unwrap().netns, 20);
        assert_eq!(select(&snap, &id[..12]).unwrap().netns, 20);
        assert_eq!(select(&snap, id).unwrap().netns, 20);
        assert!(select(&snap, &id[..6]).is_err(), "too short to be an id");
        assert_eq!(select(&snap, "pod:shop/cart").unwrap().netns, 21);
        assert!(select(&snap, "pod:shop/web").is_err());
        let t = by_netns_table(&snap.namespaces);
        let owners: Vec<&str> = t
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().last().unwrap())
            .collect();
        assert_eq!(owners, ["docker/web", "pod/shop/cart", "pid/4242/sleep"]);
        let j = netns_json(&snap.namespaces[0]);
        assert_eq!(j["container"]["name"], "web");
        assert_eq!(j["container"]["runtime"], "docker");
        assert!(j["pod"].is_null());
        assert_eq!(netns_json(&snap.namespaces[1])["pod"]["namespace"], "shop");
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
