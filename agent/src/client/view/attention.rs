//! The live view's panel of what needs attention: accept queues that fill,
//! CLOSE_WAIT and FIN_WAIT2 held long (with the oldest CLOSE_WAIT's owner,
//! asked of the agent now and then), local ports running out toward one
//! upstream, listening ports whose SYNs go unanswered, upstreams whose
//! connects fail. Shown only when something is there; worst first.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use ratatui::{
    Frame,
    layout::Rect,
    style::{Color, Style},
    text::Line,
    widgets::{Block, Borders, Paragraph},
};
use tcpstate_common::TcpState;

use crate::{
    client::{conns, control},
    snapshot::{
        Snapshot,
        attention::{Attention, OLD_AFTER_S},
        conns::ConnFilter,
    },
    tracking::breakdown::REMOTE_MARK,
};

/// A queue this full is worth a line (the kernel drops above 100%).
const QUEUE_SHOWN: f64 = 0.5;
/// Port use this high is worth a line.
const PRESSURE_SHOWN: f64 = 0.5;
/// How often the owner of the oldest CLOSE_WAIT is asked for (a read of
/// every process's descriptors in the agent).
const OWNER_EVERY: Duration = Duration::from_secs(5);

/// The owner of the oldest old CLOSE_WAIT, as last asked.
#[derive(Default)]
pub struct Owner {
    asked: Option<Instant>,
    /// (netns, service, `users:(...)`).
    pub found: Option<(u64, String, String)>,
}

impl Owner {
    /// Asks the agent at `socket` again when an old CLOSE_WAIT is shown and
    /// the last answer is older than [`OWNER_EVERY`].
    pub fn refresh(&mut self, socket: &Path, a: &Attention) {
        let Some(o) = a
            .oldest
            .iter()
            .find(|o| o.state == TcpState::CloseWait && o.old > 0)
        else {
            self.found = None;
            return;
        };
        if self.asked.is_some_and(|t| t.elapsed() < OWNER_EVERY) {
            return;
        }
        self.asked = Some(Instant::now());
        let port = o.service.trim_start_matches(REMOTE_MARK).parse().ok();
        let filter = ConnFilter {
            states: vec![TcpState::CloseWait as u8],
            port,
            older_s: Some(OLD_AFTER_S),
            process: true,
            netns: Some(o.netns),
        };
        let oldest = control::conns(socket, &filter).ok().and_then(|answer| {
            answer
                .into_iter()
                .flat_map(|ns| ns.rows)
                .max_by(|a, b| a.age_s.unwrap_or(0.0).total_cmp(&b.age_s.unwrap_or(0.0)))
        });
        self.found = oldest.map(|c| (o.netns, o.service.clone(), conns::users(&c.owners)));
    }
}

/// The panel's lines, worst first.
pub fn lines(snap: &Snapshot, owner: &Owner) -> Vec<String> {
    let a = &snap.attention;
    let mut out = Vec::new();
    for q in &a.queues {
        let l = &q.listener;
        let fill = l.queue as f64 / l.backlog.max(1) as f64;
        if fill >= QUEUE_SHOWN || l.full() {
            out.push(format!(
                "accept queue {} {}/{}{}  SYN_RECV {}",
                l.local,
                l.queue,
                l.backlog,
                if l.full() { " FULL" } else { "" },
                l.syn_recv
            ));
        }
    }
    for o in a.oldest.iter().filter(|o| o.old > 0) {
        let mut line = format!(
            "{} at {}: {}, {} over {}s, oldest {}",
            o.state.name(),
            o.service,
            o.count,
            o.old,
            OLD_AFTER_S,
            super::render::duration(o.age_s as u64)
        );
        if let Some((ns, service, users)) = &owner.found
            && (*ns, service) == (o.netns, &o.service)
            && o.state == TcpState::CloseWait
            && !users.is_empty()
        {
            line += &format!(" {users}");
        }
        out.push(line);
    }
    for p in a.pressure.iter().filter(|p| p.ratio() >= PRESSURE_SHOWN) {
        out.push(format!(
            "local ports {} → {}: {} of {} ({:.0}%)",
            p.local,
            p.remote,
            p.ports,
            p.range,
            100.0 * p.ratio()
        ));
    }
    for d in &a.dropping {
        out.push(format!(
            "SYNs to port {} unanswered: {} lately ({} in all)",
            d.port, d.recent, d.unanswered
        ));
    }
    for f in &a.failing {
        let p99 = f
            .connect_p99_s
            .map_or(String::new(), |s| format!(", connect p99 {:.0}ms", s * 1e3));
        out.push(format!(
            "connects to {} failing: {} lately ({} refused, {} timed out in all{p99})",
            f.service.trim_start_matches(REMOTE_MARK),
            f.recent,
            f.refused,
            f.handshake_timeout
        ));
    }
    out
}

/// Draws `lines` in a box titled for what it is.
pub fn draw(frame: &mut Frame, area: Rect, lines: &[String]) {
    let text: Vec<Line> = lines.iter().map(|l| Line::from(l.clone())).collect();
    let block = Block::default()
        .borders(Borders::ALL)
        .border_style(Style::default().fg(Color::Yellow))
        .title(" Needs attention ");
    frame.render_widget(Paragraph::new(text).block(block), area);
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::snapshot::{
        attention::{Dropping, Failing, Oldest, Pressure, Queue},
        conns::Listener,
    };

    #[test]
    fn only_what_is_wrong_is_listed_worst_first() {
        let mut snap = crate::snapshot::tests::empty();
        let listener = |port, queue, backlog| Queue {
            netns: 1,
            listener: Listener {
                local: SocketAddr::from(([0, 0, 0, 0], port)),
                sockets: 1,
                queue,
                backlog,
                syn_recv: 2,
                connections: 0,
                unanswered: 0,
                handshake_p50_s: None,
                handshake_p99_s: None,
            },
        };
        snap.attention = Attention {
            queues: vec![listener(8080, 129, 128), listener(9090, 1, 128)],
            oldest: vec![
                Oldest {
                    netns: 1,
                    service: "8080".into(),
                    state: TcpState::CloseWait,
                    age_s: 302.0,
                    count: 12,
                    old: 3,
                },
                Oldest {
                    netns: 1,
                    service: "→443".into(),
                    state: TcpState::FinWait2,
                    age_s: 4.0,
                    count: 1,
                    old: 0,
                },
            ],
            pressure: vec![Pressure {
                netns: 1,
                local: "10.0.0.1".parse().unwrap(),
                remote: SocketAddr::from(([10, 0, 0, 9], 5432)),
                ports: 27000,
                range: 28232,
            }],
            dropping: vec![Dropping {
                netns: 1,
                port: 8080,
                recent: 12,
                unanswered: 30,
            }],
            failing: vec![Failing {
                netns: 1,
                service: "→10.0.0.9:5432".into(),
                recent: 3,
                refused: 5,
                handshake_timeout: 2,
                connect_p99_s: Some(1.02),
            }],
        };
        let owner = Owner {
            asked: None,
            found: Some((1, "8080".into(), r#"users:(("app",pid=7,fd=9))"#.into())),
        };
        assert_eq!(
            lines(&snap, &owner),
            [
                "accept queue 0.0.0.0:8080 129/128 FULL  SYN_RECV 2",
                r#"CLOSE_WAIT at 8080: 12, 3 over 60s, oldest 5m02s users:(("app",pid=7,fd=9))"#,
                "local ports 10.0.0.1 → 10.0.0.9:5432: 27000 of 28232 (96%)",
                "SYNs to port 8080 unanswered: 12 lately (30 in all)",
                "connects to 10.0.0.9:5432 failing: 3 lately (5 refused, 2 timed out in all, connect p99 1020ms)",
            ]
        );
        snap.attention = Attention::default();
        assert!(lines(&snap, &Owner::default()).is_empty());
    }
}
