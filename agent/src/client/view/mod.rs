//! `tcpstate top`: a full-screen live view of the running agent. A client of
//! the control socket like `count` and `watch`: it asks for a snapshot every
//! interval, keeps the history in a [`Live`], and draws it with
//! [`render::draw`]. `q`, Esc or Ctrl-C quit and restore the terminal; with
//! every namespace watched, `n` focuses the next namespace and `a` all
//! ([`focus`]).

pub mod attention;
pub mod focus;
pub mod render;

use std::{
    io::IsTerminal,
    path::Path,
    sync::mpsc::{Receiver, TryRecvError},
    time::{Duration, Instant},
};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use render::Status;

use crate::{
    client::{control, live::Live},
    error::{Error, Result},
};

/// Sparkline history: ten minutes at one refresh a second.
const HISTORY: usize = 600;

/// The view of the agent answering at `socket`, until the user quits;
/// `netns`: the namespace to focus at first (`top --netns SEL`).
pub fn run(
    socket: &Path,
    interval: Duration,
    log: Option<&Path>,
    netns: Option<&str>,
) -> Result<()> {
    if !std::io::stdout().is_terminal() {
        return Err(Error::io(
            "starting the live view",
            std::io::Error::other("stdout is not a terminal (tcpstate watch prints lines)"),
        ));
    }
    // Fail before taking the screen when no agent answers.
    let first = control::query(socket)?;
    let focus = match netns {
        Some(sel) => {
            Some(focus::resolve(&first, sel).ok_or_else(|| Error::UnknownNetns(sel.to_owned()))?)
        }
        None => None,
    };
    let mut view = View {
        live: Live::new(HISTORY),
        focus,
    };
    view.take(first);
    show(socket, interval, log, &mut view, None)
}

/// What is on screen: the history of what is focused, and the focus.
struct View {
    live: Live,
    /// The namespace shown (its inode); `None`: all of them.
    focus: Option<u64>,
}

impl View {
    /// A new snapshot, as the focus shows it; the problem to show, if any.
    fn take(&mut self, snap: crate::snapshot::Snapshot) -> Option<String> {
        let (s, problem) = focus::apply(snap, self.focus);
        self.live.update(s);
        problem
    }

    /// Shows `focus` from now on: a history of its own.
    fn refocus(&mut self, focus: Option<u64>) {
        if focus != self.focus {
            self.focus = focus;
            self.live = Live::new(HISTORY);
        }
    }
}

/// The view of an agent starting in this process (`run --top`): waits for its
/// socket, and ends when `agent_done` is dropped (the agent stopped).
pub fn run_in_process(
    socket: &Path,
    interval: Duration,
    log: Option<&Path>,
    agent_done: Receiver<()>,
) -> Result<()> {
    let mut view = View {
        live: Live::new(HISTORY),
        focus: None,
    };
    show(socket, interval, log, &mut view, Some(agent_done))
}

fn show(
    socket: &Path,
    interval: Duration,
    log: Option<&Path>,
    view: &mut View,
    agent_done: Option<Receiver<()>>,
) -> Result<()> {
    let mut terminal = ratatui::init();
    // The agent's last answer, unfocused (a key refocuses it at once).
    let mut latest: Option<crate::snapshot::Snapshot> = None;
    let mut status = Status {
        problem: None,
        log: log.map(|l| l.display().to_string()),
        interval_s: interval.as_secs_f64(),
        attention: Vec::new(),
    };
    let mut owner = attention::Owner::default();
    let mut next = Instant::now()
        + if view.live.last.is_some() {
            interval
        } else {
            Duration::ZERO
        };
    let result = loop {
        if agent_done
            .as_ref()
            .is_some_and(|rx| matches!(rx.try_recv(), Err(TryRecvError::Disconnected)))
        {
            break Ok(());
        }
        if Instant::now() >= next {
            next += interval;
            if next < Instant::now() {
                next = Instant::now() + interval;
            }
            match control::query(socket) {
                Ok(s) => {
                    latest = Some(s.clone());
                    status.problem = view.take(s);
                    if let Some(shown) = &view.live.last {
                        owner.refresh(socket, &shown.attention);
                        status.attention = attention::lines(shown, &owner);
                    }
                }
                Err(Error::NoAgent(_)) if view.live.last.is_none() => {
                    status.problem = Some("starting the agent...".into());
                }
                Err(e) => status.problem = Some(format!("{e}")),
            }
        }
        if let Err(e) = terminal.draw(|f| render::draw(f, &view.live, &status)) {
            break Err(Error::io("drawing the view", e));
        }
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        match event::poll(wait) {
            Ok(true) => match event::read() {
                Ok(Event::Key(k)) if k.kind == KeyEventKind::Press => {
                    let ctrl_c =
                        k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL);
                    if ctrl_c || matches!(k.code, KeyCode::Char('q') | KeyCode::Esc) {
                        break Ok(());
                    }
                    let focus = match (k.code, &latest) {
                        (KeyCode::Char('n'), Some(s)) => Some(focus::next(s, view.focus)),
                        (KeyCode::Char('a'), _) => Some(None),
                        _ => None,
                    };
                    if let (Some(f), Some(s)) = (focus, latest.clone()) {
                        view.refocus(f);
                        status.problem = view.take(s);
                        if let Some(shown) = &view.live.last {
                            status.attention = attention::lines(shown, &owner);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => break Err(Error::io("reading the keyboard", e)),
            },
            Ok(false) => {}
            Err(e) => break Err(Error::io("reading the keyboard", e)),
        }
    };
    ratatui::restore();
    result
}
