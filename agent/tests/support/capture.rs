//! Recording a capture with tcpdump inside a test namespace, and replaying
//! it with the `tcpstate replay` a user runs.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread::sleep,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tcpstate::snapshot::StateCounts;

use super::{Netns, tcpstate};

/// tcpdump writing a pcap of `iface` in a namespace; stopped (and its
/// file complete) on [`Tcpdump::stop`] or drop.
pub struct Tcpdump {
    child: Option<Child>,
    pub path: PathBuf,
}

impl Tcpdump {
    /// Starts it and waits until it is capturing. `args` are more tcpdump
    /// options (a snap length, a filter).
    pub fn start(ns: &Netns, iface: &str, path: &Path, args: &[&str]) -> Tcpdump {
        let _ = std::fs::remove_file(path);
        let child = Command::new("ip")
            .args([
                "netns", "exec", &ns.name, "tcpdump", "-i", iface, "-U", "-w",
            ])
            .arg(path)
            // Each frame as it comes (not a ring block a second later),
            // so that stopping loses none.
            .args(["--time-stamp-precision", "nano", "--immediate-mode"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tcpdump (cargo xtask setup installs it)");
        let t = Tcpdump {
            child: Some(child),
            path: path.to_owned(),
        };
        let start = Instant::now();
        while std::fs::metadata(path).map_or(0, |m| m.len()) < 24 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "tcpdump did not start"
            );
            sleep(Duration::from_millis(20));
        }
        // It opens the file before its socket is bound: give it a moment.
        sleep(Duration::from_millis(300));
        t
    }

    /// Stops it (SIGINT: it writes what it holds and exits).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Let the last frames reach it first.
            sleep(Duration::from_millis(200));
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = c.wait();
        }
    }
}

impl Drop for Tcpdump {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("TCPSTATE_KEEP_CAPTURE").is_none() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Now, in epoch nanoseconds (the clock tcpdump stamps frames with).
pub fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// `tcpstate replay FILE ARGS... --json`'s counts; panics with its stderr
/// when it fails.
pub fn replay_counts(file: &Path, args: &[&str]) -> StateCounts {
    let out = tcpstate()
        .arg("replay")
        .arg(file)
        .args(args)
        .arg("--json")
        .output()
        .expect("tcpstate replay");
    assert!(
        out.status.success(),
        "tcpstate replay {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("replay's JSON");
    StateCounts::from_json(&v).expect("the eleven counts")
}

/// `tcpstate replay FILE ARGS...`: status, stdout, stderr.
pub fn replay(file: &str, args: &[&str]) -> (i32, String, String) {
    let out = tcpstate()
        .arg("replay")
        .arg(file)
        .args(args)
        .output()
        .expect("tcpstate replay");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A connection log's rows (`replay --conns`), each as its fields by name.
pub fn log_rows(out: &str) -> Vec<std::collections::HashMap<String, String>> {
    let fields: Vec<&str> = out
        .lines()
        .find_map(|l| l.strip_prefix("#fields\t"))
        .expect("a #fields line")
        .split('\t')
        .collect();
    out.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let values: Vec<&str> = l.split('\t').collect();
            assert_eq!(values.len(), fields.len(), "{l}");
            fields
                .iter()
                .zip(values)
                .map(|(f, v)| (f.to_string(), v.to_owned()))
                .collect()
        })
        .collect()
}
