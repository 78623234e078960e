//! Drawing the live view: pure, from a [`Live`] to a ratatui frame, so it is
//! tested with ratatui's `TestBackend`.
//!
//! Laid out for 80x24 at least: a title line, the eleven states with their
//! counts and a sparkline each, the rates, the top local ports and remote
//! peers side by side, and a probe health line.

use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline, Table},
};
use tcpstate_common::TcpState;

use crate::{
    client::live::Live,
    snapshot::{Keyed, Snapshot},
};

/// What the view says besides the agent's numbers.
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// Set while the agent cannot be reached.
    pub problem: Option<String>,
    /// The agent's log file, when the agent runs in this process.
    pub log: Option<String>,
    /// Seconds between snapshots (the time one history sample covers).
    pub interval_s: f64,
    /// What needs attention, worst first ([`super::attention::lines`]).
    pub attention: Vec<String>,
}

/// The states a port or peer row shows, with their column titles.
const ROW_STATES: [(TcpState, &str); 4] = [
    (TcpState::Established, "ESTAB"),
    (TcpState::TimeWait, "TW"),
    (TcpState::CloseWait, "CW"),
    (TcpState::SynRecv, "SYN_R"),
];

pub fn draw(frame: &mut Frame, live: &Live, status: &Status) {
    let observed = live.last.as_ref().and_then(|s| s.observed.as_ref());
    let [title, states, rates, through, tops, health] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(12),
        Constraint::Length(1),
        Constraint::Length(u16::from(observed.is_some())),
        Constraint::Min(4),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(Paragraph::new(title_line(live, status)), title);
    draw_states(frame, states, live, status);
    frame.render_widget(Paragraph::new(rates_line(live)), rates);
    if let Some(o) = observed {
        frame.render_widget(Paragraph::new(observed_line(o)), through);
    }
    // What needs attention takes up to four lines from the tables, and
    // only when there is something.
    let tops = if status.attention.is_empty() {
        tops
    } else {
        let n = status.attention.len().min(4) as u16 + 2;
        let [warn, rest] =
            Layout::vertical([Constraint::Length(n), Constraint::Min(4)]).areas(tops);
        super::attention::draw(frame, warn, &status.attention);
        rest
    };
    let [ports, peers] =
        Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(tops);
    let snap = live.last.as_ref();
    draw_top(
        frame,
        ports,
        (" Top services (* listening, →out) ", "SERVICE", 7),
        snap.map_or(&[][..], |s| &s.ports),
    );
    // With every namespace watched, the namespaces take the peers' place.
    match snap.filter(|s| s.all_namespaces) {
        Some(s) => draw_top(
            frame,
            peers,
            (" Top namespaces (n: focus, a: all) ", "NETNS", 10),
            &super::focus::rows(s),
        ),
        None => draw_top(
            frame,
            peers,
            (" Top remote peers ", "PEER", 15),
            snap.map_or(&[][..], |s| &s.peers),
        ),
    }
    frame.render_widget(Paragraph::new(health_line(live)), health);
}

fn bold() -> Style {
    Style::default().add_modifier(Modifier::BOLD)
}

fn title_line(live: &Live, status: &Status) -> Line<'static> {
    let mut spans = vec![Span::styled("tcpstate", bold())];
    if let Some(s) = &live.last {
        // With every namespace, the unfocused counts are the whole host's.
        let scope = match (&s.netns, s.all_namespaces) {
            (Some(ns), _) => ns.clone(),
            (None, true) => format!("all {} namespaces", s.namespaces.len()),
            (None, false) => "host namespace".to_owned(),
        };
        spans.push(Span::raw(format!(
            " | {scope} | {} | up {}",
            if s.interfaces.is_empty() {
                "no interfaces".to_owned()
            } else {
                s.interfaces.join(",")
            },
            duration(s.uptime_ms / 1000)
        )));
    }
    match &status.problem {
        Some(p) => {
            let log = status
                .log
                .as_ref()
                .map_or(String::new(), |l| format!(" (log: {l})"));
            spans.push(Span::styled(
                format!(" | {p}{log}"),
                Style::default().fg(Color::Red),
            ))
        }
        None => spans.push(Span::raw(" | q quits")),
    }
    Line::from(spans)
}

/// The whole history in `width` columns: each column the peak of an equal
/// run of samples, counted from the newest, so a spike never disappears.
pub fn fit(history: &[u64], width: usize) -> Vec<u64> {
    if width == 0 {
        return Vec::new();
    }
    let per_column = history.len().div_ceil(width).max(1);
    let mut columns: Vec<u64> = history
        .rchunks(per_column)
        .map(|run| run.iter().copied().max().unwrap_or(0))
        .collect();
    columns.reverse();
    columns
}

fn draw_states(frame: &mut Frame, area: Rect, live: &Live, status: &Status) {
    let counts = live.last.as_ref().and_then(Snapshot::state_counts);
    let rows = Layout::vertical([Constraint::Length(1); 12]).split(area);
    let columns = |row: Rect| {
        Layout::horizontal([
            Constraint::Length(21),
            Constraint::Length(2),
            Constraint::Min(0),
        ])
        .areas::<3>(row)
    };
    let [text, _, spark] = columns(rows[0]);
    frame.render_widget(
        Paragraph::new(Line::styled(
            format!("{:<12}{:>9}", "STATE", "COUNT"),
            bold(),
        )),
        text,
    );
    let samples = live.history(TcpState::Listen).len();
    let span = duration((samples as f64 * status.interval_s.max(0.0)).round() as u64);
    frame.render_widget(
        Paragraph::new(Line::styled(
            format!("last {span} (each row to its own peak)"),
            bold(),
        )),
        spark,
    );
    for (i, state) in TcpState::REPORTED.iter().enumerate() {
        let [text, _, spark] = columns(rows[i + 1]);
        let n = counts.map(|c| c.get(*state));
        let count = n.map_or("-".to_owned(), |n| n.to_string());
        let style = if n.unwrap_or(0) > 0 {
            Style::default()
        } else {
            Style::default().fg(Color::DarkGray)
        };
        frame.render_widget(
            Paragraph::new(Line::styled(
                format!("{:<12}{count:>9}", state.name()),
                style,
            )),
            text,
        );
        let shown = fit(&live.history(*state), spark.width as usize);
        frame.render_widget(
            Sparkline::default()
                .data(&shown)
                .max(shown.iter().copied().max().unwrap_or(0).max(1))
                .style(Style::default().fg(Color::Cyan)),
            spark,
        );
    }
}

fn rates_line(live: &Live) -> Line<'static> {
    let Some(r) = live.rates else {
        return Line::from("per second: (after the next refresh)");
    };
    Line::from(vec![
        Span::styled("per second: ", bold()),
        Span::raw(format!(
            "opens {}  closes {}  resets {}  SYNs {}  failed handshakes {}",
            rate(r.opens),
            rate(r.closes),
            rate(r.resets),
            rate(r.syns),
            rate(r.failed_handshakes)
        )),
    ])
}

/// A table of top rows: the key, the total, and as many of [`ROW_STATES`]
/// as fit beside a key of `min_key` characters.
fn draw_top(
    frame: &mut Frame,
    area: Rect,
    (title, key, min_key): (&str, &str, u16),
    rows: &[Keyed],
) {
    const TOTAL: u16 = 6;
    const STATE: u16 = 5;
    let inner = area.width.saturating_sub(2);
    // Columns are one space apart.
    let room = inner.saturating_sub(min_key + 1 + TOTAL);
    let states = &ROW_STATES[..((room / (STATE + 1)) as usize).min(ROW_STATES.len())];
    let key_width = inner.saturating_sub((TOTAL + 1) + (STATE + 1) * states.len() as u16);
    let header = Row::new(
        [key, "TOTAL"]
            .into_iter()
            .chain(states.iter().map(|(_, t)| *t))
            .map(|h| Cell::from(h.to_owned())),
    )
    .style(bold());
    let body = rows.iter().map(|r| {
        Row::new(
            [elide(&key_of(r), key_width as usize), r.total.to_string()]
                .into_iter()
                .chain(states.iter().map(|(s, _)| r.states.get(*s).to_string()))
                .map(Cell::from),
        )
    });
    let widths = [Constraint::Fill(1), Constraint::Length(TOTAL)]
        .into_iter()
        .chain(states.iter().map(|_| Constraint::Length(STATE)));
    let table = Table::new(body, widths).header(header).block(
        Block::default()
            .borders(Borders::ALL)
            .title(title.to_owned()),
    );
    frame.render_widget(table, area);
}

/// The row's key, with `*` when something listens there.
fn key_of(r: &Keyed) -> String {
    if r.states.get(TcpState::Listen) > 0 {
        format!("{}*", r.key)
    } else {
        r.key.clone()
    }
}

/// With `run --observe`: the endpoints of connections passing through,
/// by state (the states with none left out), apart from the counts above.
fn observed_line(o: &crate::snapshot::observed::Observed) -> Line<'static> {
    let c = o.state_counts();
    let states: Vec<String> = TcpState::REPORTED
        .iter()
        .filter(|s| c.get(**s) > 0)
        .map(|s| format!("{} {}", s.name(), c.get(*s)))
        .collect();
    let states = if states.is_empty() {
        "none".to_owned()
    } else {
        states.join("  ")
    };
    Line::from(vec![
        Span::styled("passing through: ", bold()),
        Span::raw(states),
    ])
}

fn health_line(live: &Live) -> Line<'static> {
    let Some(s) = &live.last else {
        return Line::from("probe: waiting for the agent");
    };
    let ev = |n: &str| s.events.get(n).and_then(|v| v.as_u64()).unwrap_or(0);
    let drift: i64 = s
        .drift
        .values()
        .filter_map(|v| v.as_i64())
        .map(i64::abs)
        .sum();
    let cap = u64::from(s.flow_map_capacity).max(1);
    let fill = s.flows_in_map.iter().copied().max().unwrap_or(0) as f64 * 100.0 / cap as f64;
    let packets = live.rates.map_or("-".to_owned(), |r| rate(r.packets));
    let bad = ev("parse_errors") + ev("ipv6_ext_too_deep");
    let warn = |v: u64| {
        if v > 0 {
            Style::default().fg(Color::Yellow)
        } else {
            Style::default()
        }
    };
    Line::from(vec![
        Span::styled("probe: ", bold()),
        Span::raw(format!("{packets} pkt/s  ")),
        Span::styled(format!("parse errors {bad}  "), warn(bad)),
        Span::raw(format!(
            "map {}+{} ({fill:.1}%)  ",
            s.flows_in_map[0], s.flows_in_map[1]
        )),
        Span::styled(
            format!("map full {}  ", ev("map_full")),
            warn(ev("map_full")),
        ),
        Span::styled(format!("drift {drift}"), warn(drift as u64)),
    ])
}

/// A rate with one decimal below 100, with k/M suffixes above.
pub fn rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

pub(super) fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `s` cut to `width` characters, the cut marked with `…`.
fn elide(s: &str, width: usize) -> String {
    if s.chars().count() <= width || width == 0 {
        return s.to_owned();
    }
    let keep: String = s.chars().take(width.saturating_sub(1)).collect();
    format!("{keep}…")
}

#[cfg(test)]
mod tests {
    use ratatui::{Terminal, backend::TestBackend};
    use tcpstate_common::{Counters, Event};

    use super::*;
    use crate::snapshot::StateCounts;

    fn snapshot(uptime_ms: u64, established: u64, opened: u64) -> Snapshot {
        let mut c = Counters::default();
        c.events[Event::FlowsOpened as usize] = opened;
        c.events[Event::PacketsIn as usize] = opened * 3;
        let mut states = StateCounts::default();
        states.set(TcpState::Listen, 2);
        states.set(TcpState::Established, established);
        states.set(TcpState::TimeWait, 118);
        let mut s = Snapshot::new(
            Some("web".into()),
            vec!["veth0".into(), "lo".into()],
            states,
            &c,
            262_144,
            0,
        );
        s.uptime_ms = uptime_ms;
        s.flows_in_map = [160, 2];
        let row = |key: &str, est: u64, tw: u64| {
            let mut st = StateCounts::default();
            st.set(TcpState::Established, est);
            st.set(TcpState::TimeWait, tw);
            Keyed {
                key: key.into(),
                total: est + tw,
                states: st,
            }
        };
        s.ports = vec![
            row("443", 30, 100),
            row("→5432", 11, 18),
            row("other", 0, 0),
        ];
        s.ports[0].states.set(TcpState::Listen, 1);
        s.peers = vec![
            row("10.0.0.7", 25, 60),
            row("2001:db8:aaaa:bbbb:cccc:dddd:eeee:ffff", 16, 58),
        ];
        s
    }

    fn screen(live: &Live, status: &Status, w: u16, h: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| draw(f, live, status)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..h)
            .map(|y| (0..w).map(|x| buf[(x, y)].symbol().to_owned()).collect())
            .collect()
    }

    fn live() -> Live {
        let mut live = Live::new(600);
        for (i, est) in [10, 20, 41].into_iter().enumerate() {
            live.update(snapshot(1000 * (i as u64 + 1), est, 100 * (i as u64 + 1)));
        }
        live
    }

    /// The whole 80x24 screen, as a person reads it.
    #[test]
    fn at_80x24_everything_fits() {
        let status = Status {
            interval_s: 1.0,
            ..Status::default()
        };
        let lines = screen(&live(), &status, 80, 24);
        let expected = [
            "tcpstate | web | veth0,lo | up 3s | q quits",
            "STATE           COUNT  last 3s (each row to its own peak)",
            "LISTEN              2  ███",
            "SYN_SENT            0",
            "SYN_RECV            0",
            "ESTABLISHED        41  ▁▃█",
            "FIN_WAIT1           0",
            "FIN_WAIT2           0",
            "CLOSE_WAIT          0",
            "CLOSING             0",
            "LAST_ACK            0",
            "TIME_WAIT         118  ███",
            "CLOSE               0",
            "per second: opens 100  closes 0.0  resets 0.0  SYNs 0.0  failed handshakes 0.0",
        ];
        for (i, want) in expected.iter().enumerate() {
            assert_eq!(
                lines[i].trim_end(),
                *want,
                "line {i}:\n{}",
                lines.join("\n")
            );
        }
        let boxes = [
            "┌ Top services (* listening, →out) ────┐┌ Top remote peers ────────────────────┐",
            "│SERVICE TOTAL  ESTAB TW    CW    SYN_R││PEER                TOTAL  ESTAB TW   │",
            "│443*    130    30    100   0     0    ││10.0.0.7            85     25    60   │",
            "│→5432   29     11    18    0     0    ││2001:db8:aaaa:bbbb… 74     16    58   │",
            "│other   0      0     0     0     0    ││                                      │",
        ];
        for (i, want) in boxes.iter().enumerate() {
            assert_eq!(
                lines[14 + i],
                *want,
                "line {}:\n{}",
                14 + i,
                lines.join("\n")
            );
        }
        assert!(lines[22].starts_with("└───"));
        assert_eq!(
            lines[23].trim_end(),
            "probe: 300 pkt/s  parse errors 0  map 160+2 (0.1%)  map full 0  drift 0"
        );
    }

    /// With `run --observe`, one line under the rates says what passes
    /// through; the tables keep their rows.
    #[test]
    fn connections_passing_through_get_a_line_of_their_own() {
        let mut live = live();
        let mut c = Counters::default();
        c.states[TcpState::Established as usize] = 6;
        c.states[TcpState::TimeWait as usize] = 1;
        c.states[TcpState::Close as usize] = 1;
        let mut last = live.last.clone().unwrap();
        last.observed = Some(crate::snapshot::observed::Observed::new(3, &c, 0, [4, 0]));
        live.last = Some(last);
        let status = Status {
            interval_s: 1.0,
            ..Status::default()
        };
        let lines = screen(&live, &status, 80, 24);
        assert_eq!(
            lines[14].trim_end(),
            "passing through: ESTABLISHED 6  TIME_WAIT 1  CLOSE 1",
            "{}",
            lines.join("\n")
        );
        assert!(
            lines[15].starts_with("┌ Top services"),
            "{}",
            lines.join("\n")
        );
        assert!(lines[18].starts_with("│→5432"), "{}", lines.join("\n"));
        assert!(lines[23].starts_with("probe: "));
    }

    #[test]
    fn what_needs_attention_sits_above_the_tables_and_leaves_them_room() {
        let status = Status {
            interval_s: 1.0,
            attention: vec!["accept queue 0.0.0.0:443 129/128 FULL  SYN_RECV 2".into()],
            ..Status::default()
        };
        let lines = screen(&live(), &status, 80, 24);
        assert!(
            lines[14].starts_with("┌ Needs attention"),
            "{}",
            lines.join("\n")
        );
        assert_eq!(
            lines[15].trim_end(),
            "│accept queue 0.0.0.0:443 129/128 FULL  SYN_RECV 2                             │"
        );
        assert!(lines[16].starts_with("└"));
        assert!(
            lines[17].starts_with("┌ Top services"),
            "{}",
            lines.join("\n")
        );
        assert!(
            lines[19].starts_with("│443*    130"),
            "{}",
            lines.join("\n")
        );
        // Nothing to say: no box.
        let quiet = screen(&live(), &Status::default(), 80, 24);
        assert!(!quiet.join("\n").contains("Needs attention"));
    }

    #[test]
    fn with_every_namespace_the_namespaces_take_the_peers_place() {
        let mut snap = snapshot(1000, 41, 100);
        snap.all_namespaces = true;
        snap.netns = None;
        let ns = |inode: u64, name: Option<&str>, est: u64| {
            let mut states = StateCounts::default();
            states.set(TcpState::Established, est);
            crate::snapshot::NetnsCounts {
                netns: inode,
                name: name.map(str::to_owned),
                pid: Some(7),
                comm: Some("sleep".into()),
                states,
                refused: 0,
                drift: Default::default(),
                slot: 0,
                container: None,
                pod: None,
            }
        };
        snap.namespaces = vec![ns(4026531840, None, 2), ns(4026532281, Some("blue"), 39)];
        let mut live = Live::new(600);
        live.update(snap);
        let lines = screen(&live, &Status::default(), 80, 24);
        let text = lines.join("\n");
        assert!(text.contains("Top namespaces"), "{text}");
        assert!(
            lines[0].starts_with("tcpstate | all 2 namespaces |"),
            "the total is the host's, every namespace: {}",
            lines[0]
        );
        assert!(!text.contains("Top remote peers"), "{text}");
        let blue = lines
            .iter()
            .position(|l| l.contains("blue"))
            .expect("blue listed");
        let host = lines
            .iter()
            .position(|l| l.contains("4026531840"))
            .expect("host listed");
        assert!(blue < host, "most connections first:\n{text}");
        assert!(lines[blue].contains("39"), "{}", lines[blue]);
    }

    #[test]
    fn before_the_agent_answers_the_view_says_so() {
        let status = Status {
            problem: Some("starting the agent...".into()),
            ..Status::default()
        };
        let lines = screen(&Live::new(10), &status, 80, 24);
        assert_eq!(lines[0].trim_end(), "tcpstate | starting the agent...");
        assert_eq!(lines[5].trim_end(), "ESTABLISHED         -");
        assert_eq!(lines[13].trim_end(), "per second: (after the next refresh)");
        assert_eq!(lines[23].trim_end(), "probe: waiting for the agent");
    }

    #[test]
    fn the_whole_history_fits_the_width_keeping_every_peak() {
        assert_eq!(fit(&[1, 2, 3], 10), [1, 2, 3]);
        // Six samples in four columns: runs of two from the newest.
        assert_eq!(fit(&[9, 1, 2, 7, 3, 4], 4), [9, 7, 4]);
        assert_eq!(fit(&[5; 600], 57).len(), 55);
        assert!(fit(&[1, 2], 0).is_empty());
    }

    #[test]
    fn rates_read_well_at_every_magnitude() {
        assert_eq!(rate(0.0), "0.0");
        assert_eq!(rate(12.34), "12.3");
        assert_eq!(rate(512.0), "512");
        assert_eq!(rate(45_600.0), "45.6k");
        assert_eq!(rate(2_500_000.0), "2.5M");
    }
}
