//! `tcpstate watch`: one snapshot of the running agent per interval, as a
//! JSON line for pipelines or as a `STATE=N ...` line with rates.

use std::{io::Write, path::Path, time::Duration};

use serde::Serialize;
use tcpstate_common::TcpState;

use crate::{
    client::{
        control,
        live::{Live, Rates},
    },
    error::{Error, Result},
    snapshot::{Keyed, Snapshot, StateCounts},
};

/// One line of `watch --json`.
#[derive(Serialize)]
pub struct Line<'a> {
    /// Seconds since the Unix epoch when the snapshot was read.
    pub time: f64,
    pub netns: Option<&'a str>,
    pub states: StateCounts,
    /// Per second since the previous line (`null` on the first).
    pub rates: Option<Rates>,
    pub ports: &'a [Keyed],
    pub peers: &'a [Keyed],
    /// The worst listeners, oldest CLOSE_WAIT/FIN_WAIT2, port pressure and
    /// failing upstreams.
    pub attention: &'a crate::snapshot::attention::Attention,
    pub events: &'a serde_json::Map<String, serde_json::Value>,
    pub drift: &'a serde_json::Map<String, serde_json::Value>,
    /// Time in each state, connects and handshakes (histograms).
    pub durations: &'a crate::snapshot::durations::Timings,
    /// The most active services: outcomes, handshake times, unanswered SYNs.
    pub services: &'a [crate::snapshot::services::ServiceRow],
    /// Each namespace's counts, as `count --by-netns --json` prints them.
    pub namespaces: Vec<serde_json::Value>,
    /// With `run --observe`: the connections passing through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub observed: Option<&'a crate::snapshot::observed::Observed>,
}

impl<'a> Line<'a> {
    pub fn new(snap: &'a Snapshot, rates: Option<Rates>, time: f64) -> Option<Line<'a>> {
        Some(Line {
            time,
            netns: snap.netns.as_deref(),
            states: snap.state_counts()?,
            rates,
            ports: &snap.ports,
            peers: &snap.peers,
            attention: &snap.attention,
            events: &snap.events,
            drift: &snap.drift,
            durations: &snap.durations,
            services: &snap.services,
            namespaces: snap
                .namespaces
                .iter()
                .map(crate::client::count::netns_json)
                .collect(),
            observed: snap.observed.as_ref(),
        })
    }
}

/// The text form: the eleven counts, then the rates.
pub fn text_line(states: &StateCounts, rates: Option<&Rates>) -> String {
    let mut out: Vec<String> = TcpState::REPORTED
        .iter()
        .zip(states.0)
        .map(|(s, n)| format!("{}={n}", s.name()))
        .collect();
    if let Some(r) = rates {
        out.push(format!(
            "| opens/s={:.1} closes/s={:.1} resets/s={:.1} syns/s={:.1}",
            r.opens, r.closes, r.resets, r.syns
        ));
    }
    out.join(" ")
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Prints until interrupted (or `count` lines); a closed pipe ends it quietly.
pub fn run(socket: &Path, interval: Duration, json: bool, count: Option<u64>) -> Result<()> {
    let mut live = Live::new(2);
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    loop {
        let started = std::time::Instant::now();
        live.update(control::query(socket)?);
        let snap = live.last.as_ref().expect("just updated");
        let line = if json {
            Line::new(snap, live.rates, now())
                .map(|l| serde_json::to_string(&l).expect("a line serializes"))
        } else {
            snap.state_counts()
                .map(|c| text_line(&c, live.rates.as_ref()))
        };
        let Some(line) = line else {
            return Err(Error::io(
                "reading the agent's answer",
                std::io::Error::other("no state counts"),
            ));
        };
        let mut out = stdout.lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return Ok(()); // the reader went away (`| head`)
        }
        drop(out);
        printed += 1;
        if count.is_some_and(|c| printed >= c) {
            return Ok(());
        }
        std::thread::sleep(interval.saturating_sub(started.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lines_carry_all_eleven_states_then_the_rates() {
        let mut c = StateCounts::default();
        c.set(TcpState::Established, 4);
        let line = text_line(&c, None);
        assert!(line.starts_with("LISTEN=0 SYN_SENT=0 SYN_RECV=0 ESTABLISHED=4 "));
        assert!(line.ends_with("TIME_WAIT=0 CLOSE=0"));
        let r = Rates {
            opens: 2.0,
            ..Rates::default()
        };
        assert!(
            text_line(&c, Some(&r)).ends_with("| opens/s=2.0 closes/s=0.0 resets/s=0.0 syns/s=0.0")
        );
    }
}
