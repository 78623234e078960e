//! Which namespace the live view shows: all of them (the host's total), or
//! one (`top --netns SEL`, or `n` to step through them, most connections
//! first; `a` for all again). A focused snapshot carries that namespace's
//! eleven counts in place of the total, so the states panel, its history
//! and the title follow it; ports and peers stay the agent's.

use crate::snapshot::{NetnsCounts, Selector, Snapshot};

/// How a namespace is named on screen: its `ip netns` name, else its pod
/// (`NAMESPACE/NAME`) or container, else its inode and a process in it.
pub fn label(ns: &NetnsCounts) -> String {
    if ns.name.is_none()
        && let Some(o) = ns.owner().display()
    {
        return o;
    }
    match (&ns.name, ns.pid) {
        (Some(n), _) => n.clone(),
        (None, Some(pid)) => format!(
            "{} (pid {pid} {})",
            ns.netns,
            ns.comm.as_deref().unwrap_or("?")
        ),
        (None, None) => ns.netns.to_string(),
    }
}

/// Connections of a namespace (LISTEN is not one).
pub fn connections(ns: &NetnsCounts) -> u64 {
    ns.states.0.iter().sum::<u64>() - ns.states.get(tcpstate_common::TcpState::Listen)
}

/// The namespaces, most connections first.
pub fn ranked(snap: &Snapshot) -> Vec<&NetnsCounts> {
    let mut v: Vec<&NetnsCounts> = snap.namespaces.iter().collect();
    v.sort_by(|a, b| {
        connections(b)
            .cmp(&connections(a))
            .then(a.netns.cmp(&b.netns))
    });
    v
}

/// The namespaces as rows, most connections first.
pub fn rows(s: &Snapshot) -> Vec<crate::snapshot::Keyed> {
    ranked(s)
        .into_iter()
        .map(|ns| crate::snapshot::Keyed {
            key: label(ns),
            total: connections(ns),
            states: ns.states,
        })
        .collect()
}

/// `snap` as the view shows it with `focus` (an inode): that namespace's
/// counts; and a line to show when it is not (or no longer) there.
pub fn apply(mut snap: Snapshot, focus: Option<u64>) -> (Snapshot, Option<String>) {
    let Some(inode) = focus else {
        return (snap, None);
    };
    let Some(ns) = snap.namespaces.iter().find(|n| n.netns == inode).cloned() else {
        return (snap, Some(format!("namespace {inode} is gone (a: all)")));
    };
    snap.states = ns.states.json();
    snap.netns = Some(format!("netns {}", label(&ns)));
    let a = &mut snap.attention;
    a.queues.retain(|q| q.netns == inode);
    a.oldest.retain(|o| o.netns == inode);
    a.pressure.retain(|p| p.netns == inode);
    (snap, None)
}

/// The inode `sel` names among `snap`'s namespaces.
pub fn resolve(snap: &Snapshot, sel: &str) -> Option<u64> {
    let s = Selector::parse(sel);
    snap.namespaces
        .iter()
        .find(|n| n.selected_by(&s))
        .map(|n| n.netns)
}

/// The namespace after `now` in [`ranked`] order (the first when none).
pub fn next(snap: &Snapshot, now: Option<u64>) -> Option<u64> {
    let r = ranked(snap);
    let at = now.and_then(|i| r.iter().position(|n| n.netns == i));
    let pick = match at {
        Some(i) => r.get(i + 1).or(r.first()),
        None => r.first(),
    };
    pick.map(|n| n.netns)
}

#[cfg(test)]
mod tests {
    use tcpstate_common::TcpState;

    use super::*;
    use crate::snapshot::StateCounts;

    fn ns(inode: u64, est: u64) -> NetnsCounts {
        let mut states = StateCounts::default();
        states.set(TcpState::Established, est);
        states.set(TcpState::Listen, 5);
        NetnsCounts {
            netns: inode,
            name: (inode == 2).then(|| "blue".into()),
            pid: Some(40),
            comm: Some("nginx".into()),
            states,
            refused: 0,
            drift: Default::default(),
            slot: 0,
            container: None,
            pod: None,
        }
    }

    #[test]
    fn focus_shows_one_namespace_and_steps_by_connections() {
        let mut snap = crate::snapshot::tests::empty();
        snap.namespaces = vec![ns(1, 3), ns(2, 9), ns(3, 1)];
        assert_eq!(next(&snap, None), Some(2));
        assert_eq!(next(&snap, Some(2)), Some(1));
        assert_eq!(next(&snap, Some(3)), Some(2), "after the last, the first");
        let (f, problem) = apply(snap.clone(), Some(2));
        assert_eq!(problem, None);
        assert_eq!(f.state_counts().unwrap().get(TcpState::Established), 9);
        assert_eq!(f.netns.as_deref(), Some("netns blue"));
        assert!(apply(snap.clone(), Some(7)).1.is_some());
        assert_eq!(resolve(&snap, "blue"), Some(2));
        assert_eq!(label(&snap.namespaces[0]), "1 (pid 40 nginx)");
    }
}
