//! `tcpstate top` against a `run -A` agent, driven in tmux as a user runs
//! it: the namespaces panel lists each namespace with its connections as
//! `ss -tan` inside it counts them; `top --netns NAME` and the `n` key focus
//! one, whose eleven counts then follow its ss; `a` shows the whole host.
//! Needs root: `cargo xtask test` runs it.

mod support;

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use support::{
    Agent, Netns,
    hosts::settle,
    require_root,
    tmux::{Tmux, row_count},
};
use tcpstate::snapshot::StateCounts;
use tcpstate_common::TcpState;

/// A listener on loopback in `ns` and `n` connections to it (both ends).
fn connections(ns: &Netns, n: usize) -> (TcpListener, Vec<(TcpStream, TcpStream)>) {
    let l = ns.listen("127.0.0.1:0");
    let to: SocketAddr = l.local_addr().unwrap();
    let conns = (0..n)
        .map(|_| (ns.connect(to), l.accept().unwrap().0))
        .collect();
    (l, conns)
}

/// Connections in `c` (LISTEN is not one), as the view's TOTAL counts them.
fn total(c: &StateCounts) -> u64 {
    TcpState::REPORTED
        .iter()
        .filter(|s| **s != TcpState::Listen)
        .map(|s| c.get(*s))
        .sum()
}

/// The TOTAL on the namespaces panel's row of `name` (`*`: it listens).
fn listed_total(screen: &str, name: &str) -> Option<u64> {
    screen.lines().find_map(|line| {
        let cells: Vec<&str> = line
            .split(|c: char| c == '│' || c.is_whitespace())
            .filter(|c| !c.is_empty())
            .collect();
        let at = cells.iter().position(|c| c.trim_end_matches('*') == name)?;
        cells.get(at + 1)?.parse().ok()
    })
}

/// The title line names what the states panel counts.
fn title(screen: &str) -> &str {
    screen.lines().next().unwrap_or("")
}

/// Samples the screen until `ok` holds for it, for at most `secs`.
fn until(tmux: &Tmux, secs: u64, ok: impl Fn(&str) -> bool) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let s = tmux.screen();
        if ok(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(s);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Every one of the eleven rows of the states panel equals `truth`.
fn states_are(screen: &str, truth: &StateCounts) -> bool {
    TcpState::REPORTED
        .iter()
        .all(|s| row_count(screen, *s) == Some(truth.get(*s)))
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn top_lists_and_focuses_namespaces_as_ss_counts_them() {
    require_root();
    let a = Netns::new("tpa");
    let b = Netns::new("tpb");
    let (_la, mut in_a) = connections(&a, 3);
    let (_lb, _in_b) = connections(&b, 1);
    let agent = Agent::start_all(&[]);
    for ns in [&a, &b] {
        let view = agent.in_netns(&ns.name);
        settle(
            &ns.name,
            Duration::from_secs(5),
            || view.try_counts(),
            || ns.ss_counts(),
        );
    }
    let cmd = format!(
        "{} top --netns {} --socket {}",
        env!("CARGO_BIN_EXE_tcpstate"),
        a.name,
        agent.socket.display()
    );
    // Wide and tall enough for the names and a few namespaces beside ours.
    let tmux = Tmux::sized(&cmd, 160, 48);
    let focused = format!("netns {}", a.name);
    let shown = until(&tmux, 10, |s| {
        title(s).contains(&focused)
            && states_are(s, &a.ss_counts())
            && listed_total(s, &a.name) == Some(total(&a.ss_counts()))
            && listed_total(s, &b.name) == Some(total(&b.ss_counts()))
    });
    if let Err(s) = shown {
        panic!(
            "top --netns {} never showed its and {}'s ss counts:\na: {:?}\nb: {:?}\n{s}",
            a.name,
            b.name,
            a.ss_counts(),
            b.ss_counts()
        );
    }
    // The focused namespace follows its ss: two of its connections close.
    in_a.truncate(1);
    let followed = until(&tmux, 10, |s| states_are(s, &a.ss_counts()));
    assert!(followed.is_ok(), "{:?}\n{}", a.ss_counts(), tmux.screen());
    // `a`: the whole host, every namespace, no longer one.
    tmux.keys("a");
    let all = until(&tmux, 5, |s| {
        let t = title(s);
        t.contains("namespaces |") && !t.contains(&focused)
    });
    assert!(
        all.is_ok(),
        "a did not show every namespace:\n{}",
        tmux.screen()
    );
    // `n` steps through the namespaces, most connections first: b comes.
    let want = format!("netns {}", b.name);
    let mut at_b = None;
    for _ in 0..64 {
        tmux.keys("n");
        if let Ok(s) = until(&tmux, 1, |s| title(s).contains(&want)) {
            at_b = Some(s);
            break;
        }
    }
    assert!(
        at_b.is_some(),
        "n never focused {}:\n{}",
        b.name,
        tmux.screen()
    );
    let b_shown = until(&tmux, 5, |s| states_are(s, &b.ss_counts()));
    assert!(b_shown.is_ok(), "{:?}\n{}", b.ss_counts(), tmux.screen());
    tmux.keys("q");
}
