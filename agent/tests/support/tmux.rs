//! A terminal for the live view: a tmux server on its own socket, read back
//! with capture-pane.

use std::process::{Command, Stdio};

use tcpstate_common::TcpState;

/// A tmux server on its own socket, killed on drop.
pub struct Tmux(String);

impl Tmux {
    /// `command` in an 80x24 terminal, the size the view is laid out for.
    pub fn new(command: &str) -> Tmux {
        Tmux::sized(command, 80, 24)
    }

    pub fn sized(command: &str, width: u16, height: u16) -> Tmux {
        let t = Tmux(super::unique("tcpstate-tmux-"));
        let (w, h) = (width.to_string(), height.to_string());
        let ok = Command::new("tmux")
            .args(["-L", &t.0, "new-session", "-d", "-x", &w, "-y", &h, command])
            .env("TERM", "xterm-256color")
            .status()
            .expect("tmux");
        assert!(ok.success());
        t
    }

    pub fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["-L", &self.0, "capture-pane", "-p"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn keys(&self, keys: &str) {
        Command::new("tmux")
            .args(["-L", &self.0, "send-keys", keys])
            .status()
            .unwrap();
    }

    pub fn alive(&self) -> bool {
        Command::new("tmux")
            .args(["-L", &self.0, "has-session"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.0, "kill-server"])
            .stderr(Stdio::null())
            .status();
    }
}

/// The count on a state's row of the view.
pub fn row_count(screen: &str, state: TcpState) -> Option<u64> {
    screen
        .lines()
        .find(|l| l.split_whitespace().next() == Some(state.name()))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
