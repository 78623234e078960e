//! The live interfaces as users meet them: the metrics endpoint (checked by
//! promtool and scraped by a real Prometheus server), `watch --json`,
//! `count --port`, and `top` driven in tmux. Every number is compared with
//! `ss -tan` of the monitored namespace.
//!
//! Needs root and the probe: `cargo xtask test` runs them.

mod support;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    thread::sleep,
    time::{Duration, Instant},
};

use support::{
    Agent, Netns, VethPair,
    http::{free_port, http_get},
    prometheus::Prometheus,
    require_root, sockaddr, tcpstate, thread_caps,
    tmux::{Tmux, row_count},
};
use tcpstate::snapshot::StateCounts;
use tcpstate_common::TcpState;

/// `tcpstate_connections{state="..."}` values of a scrape.
fn scraped_states(body: &str) -> StateCounts {
    let mut c = StateCounts::default();
    for s in TcpState::REPORTED {
        let prefix = format!(
            "tcpstate_connections{{state=\"{}\"}} ",
            s.name().to_ascii_lowercase()
        );
        let line = body
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("{prefix} missing:\n{body}"));
        c.set(s, line[prefix.len()..].trim().parse().unwrap());
    }
    c
}

/// Connections in several states on two server ports of `mon`: held open
/// until dropped.
struct Traffic {
    _held: Vec<TcpStream>,
    _listeners: Vec<TcpListener>,
}

fn traffic(net: &VethPair) -> Traffic {
    let (mon, peer) = (&net.left, &net.right);
    let web = mon.listen(&sockaddr(&net.left_v4, 8443));
    let api = mon.listen(&sockaddr(&net.left_v4, 8080));
    let mut held = Vec::new();
    for (listener, n) in [(&web, 6), (&api, 3)] {
        for _ in 0..n {
            held.push(peer.connect(listener.local_addr().unwrap()));
            held.push(listener.accept().unwrap().0);
        }
    }
    // Two connections the monitored side closes: TIME_WAIT on port 8443.
    for _ in 0..2 {
        let c = peer.connect(web.local_addr().unwrap());
        let (s, _) = web.accept().unwrap();
        drop(s);
        sleep(Duration::from_millis(50));
        drop(c);
    }
    // One the peer closes and the monitored side holds: CLOSE_WAIT on 8080.
    let c = peer.connect(api.local_addr().unwrap());
    held.push(api.accept().unwrap().0);
    drop(c);
    // One outgoing connection from the monitored side to the peer's 9000.
    let out = peer.listen(&sockaddr(&net.right_v4, 9000));
    held.push(mon.connect(out.local_addr().unwrap()));
    held.push(out.accept().unwrap().0);
    sleep(Duration::from_millis(300));
    Traffic {
        _held: held,
        _listeners: vec![web, api, out],
    }
}

/// Polls until `f` returns Some, at most `secs`.
fn within<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn metrics_equal_ss_and_pass_promtool() {
    require_root();
    let net = VethPair::new();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start(&net.left, &["--metrics", &port.to_string(), "--top-k", "2"]);
    let _traffic = traffic(&net);
    // Everything equal to ss at one moment: the states, and per port the
    // top 2 (8443, 8080, each equal to ss filtered on that local port).
    let differs = |body: &str| -> Option<String> {
        let truth = net.left.ss_counts();
        if scraped_states(body) != truth {
            return Some(support::table(&scraped_states(body), &truth));
        }
        for p in [8443u16, 8080] {
            let by_port = net.left.ss_counts_where(&["sport", "=", &format!(":{p}")]);
            for s in TcpState::REPORTED {
                let line = format!(
                    "tcpstate_port_connections{{port=\"{p}\",side=\"local\",state=\"{}\"}} {}",
                    s.name().to_ascii_lowercase(),
                    by_port.get(s)
                );
                if !body.lines().any(|l| l == line) {
                    return Some(format!("{line} missing"));
                }
            }
        }
        None
    };
    let matched = within(5, || {
        let (status, body) = http_get(&addr, "/metrics", None);
        assert_eq!(status, "HTTP/1.1 200 OK");
        differs(&body).is_none().then_some(body)
    });
    let body = matched.unwrap_or_else(|| {
        let (_, body) = http_get(&addr, "/metrics", None);
        panic!(
            "metrics differ from ss: {}\n{body}",
            differs(&body).unwrap_or_default()
        )
    });
    let truth = net.left.ss_counts();
    assert!(body.contains("port=\"other\""), "{body}");
    // The outgoing connection to the peer's 9000 is the service `→9000`,
    // third: summed into other.
    assert!(
        !body.contains("tcpstate_port_connections{port=\"9000\""),
        "only the top 2 and other"
    );
    // Its port pressure: one port of this namespace's range toward it.
    assert!(
        body.lines()
            .any(|l| l.starts_with("tcpstate_port_pressure_ports{")
                && l.contains("port=\"9000\"")
                && l.ends_with(" 1")),
        "{body}"
    );
    // promtool lints the classic format served to clients that do not ask
    // for OpenMetrics.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A scraper that asks for OpenMetrics gets it.
    let (_, om) = http_get(&addr, "/metrics", Some("application/openmetrics-text"));
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert_eq!(scraped_states(&om), truth);
    // The names deploy/ uses (dashboard, alerts) are all served.
    let served: std::collections::HashSet<String> = om
        .lines()
        .filter(|l| l.starts_with("tcpstate_"))
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in [
        "deploy/grafana/tcpstate.json",
        "deploy/prometheus/alerts.yml",
    ] {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("tcpstate_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let before = rest[..at].chars().last();
            let after = rest[at + name.len()..].chars().next();
            rest = &rest[at + name.len()..];
            // Recording rules (level:tcpstate_x:operation) are Prometheus's
            // own series, not the agent's.
            if before != Some(':') && after != Some(':') {
                assert!(
                    served.contains(&name),
                    "{file} uses {name}, which the agent does not serve"
                );
            }
        }
    }
    let (status, _) = http_get(&addr, "/nothing", None);
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    drop(agent);
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn a_prometheus_server_scrapes_the_agent() {
    require_root();
    let net = VethPair::new();
    let port = free_port();
    let agent = Agent::start(&net.left, &["--metrics", &port.to_string()]);
    let _traffic = traffic(&net);
    let prom = Prometheus::start(&format!("127.0.0.1:{port}"));
    let truth = net.left.ss_counts();
    for state in [TcpState::Established, TcpState::TimeWait, TcpState::Listen] {
        let promql = format!(
            "tcpstate_connections{{job=\"tcpstate\",state=\"{}\"}}",
            state.name().to_ascii_lowercase()
        );
        let want = truth.get(state) as f64;
        let got = within(30, || prom.query(&promql).filter(|v| *v == want));
        assert_eq!(
            got,
            Some(want),
            "Prometheus's {promql} (last {:?}) vs ss",
            prom.query(&promql)
        );
    }
    assert_eq!(prom.query("up{job=\"tcpstate\"}"), Some(1.0));
    drop(agent);
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn watch_json_prints_a_line_per_interval_equal_to_ss() {
    require_root();
    let net = VethPair::new();
    let agent = Agent::start(&net.left, &[]);
    let _traffic = traffic(&net);
    agent.assert_matches_ss(&net.left, "before watching");
    let out = tcpstate()
        .args([
            "watch",
            "--json",
            "--interval",
            "0.5",
            "--count",
            "3",
            "--socket",
        ])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    let truth = net.left.ss_counts();
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(
            StateCounts::from_json(&l["states"]),
            Some(truth),
            "line {i}: {l}"
        );
        assert_eq!(
            l["rates"].is_null(),
            i == 0,
            "rates from the second line: {l}"
        );
        assert!(l["time"].as_f64().unwrap() > 1.7e9);
    }
    let top = &lines[2]["ports"][0];
    assert_eq!(top["key"], "8443", "{top}");
    let by_port = net.left.ss_counts_where(&["sport", "=", ":8443"]);
    let established = by_port.get(TcpState::Established);
    assert_eq!(top["states"]["ESTABLISHED"].as_u64(), Some(established));
    // A reader that goes away ends watch quietly.
    let mut child = tcpstate()
        .args(["watch", "--interval", "0.1", "--socket"])
        .arg(&agent.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    let status = within(5, || child.try_wait().unwrap()).expect("watch ends with its reader");
    assert!(status.success(), "{status}");
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn count_port_filters_equal_ss_filters() {
    require_root();
    let net = VethPair::new();
    let agent = Agent::start(&net.left, &[]);
    let _traffic = traffic(&net);
    agent.assert_matches_ss(&net.left, "all connections");
    let count = |args: &[&str]| -> StateCounts {
        let out = tcpstate()
            .args(["count", "--json", "--socket"])
            .arg(&agent.socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        StateCounts::from_json(&serde_json::from_slice(&out.stdout).unwrap()).unwrap()
    };
    let cases: [(&[&str], &[&str]); 4] = [
        (&["--port", "8443", "--local"], &["sport", "=", ":8443"]),
        (&["--port", "9000", "--remote"], &["dport", "=", ":9000"]),
        (
            &["--port", "8080"],
            &["(", "sport", "=", ":8080", "or", "dport", "=", ":8080", ")"],
        ),
        (&["--port", "9000", "--local"], &["sport", "=", ":9000"]),
    ];
    for (ours, theirs) in cases {
        let (got, want) = (count(ours), net.left.ss_counts_where(theirs));
        assert_eq!(
            got,
            want,
            "{ours:?} vs ss {theirs:?}\n{}",
            support::table(&got, &want)
        );
    }
    // The filters do select: port 8443 has the listener, 6 established, 2 TIME_WAIT.
    let web = count(&["--port", "8443", "--local"]);
    assert_eq!(
        (
            web.get(TcpState::Listen),
            web.get(TcpState::Established),
            web.get(TcpState::TimeWait)
        ),
        (1, 6, 2)
    );
    // Text form: the eleven lines.
    let out = tcpstate()
        .args(["count", "--port", "8080", "--socket"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 11);
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn top_in_a_terminal_shows_what_ss_shows_and_q_quits() {
    require_root();
    let net = VethPair::new();
    let agent = Agent::start(&net.left, &[]);
    let traffic = traffic(&net);
    let truth = agent.assert_matches_ss(&net.left, "before the view");
    let cmd = format!(
        "{} top --socket {}",
        env!("CARGO_BIN_EXE_tcpstate"),
        agent.socket.display()
    );
    let tmux = Tmux::new(&cmd);
    let shown = within(10, || {
        let s = tmux.screen();
        let counts = TcpState::REPORTED
            .iter()
            .all(|st| row_count(&s, *st) == Some(truth.get(*st)));
        // The port table fills on the agent's next walk (a second).
        (counts && s.lines().any(|l| l.contains("│8443*"))).then_some(s)
    });
    let screen =
        shown.unwrap_or_else(|| panic!("the view never showed ss's counts:\n{}", tmux.screen()));
    assert!(screen.contains("Top services"), "{screen}");
    assert!(screen.contains("per second:"), "{screen}");
    // The view follows: close everything, the counts move within seconds.
    drop(traffic);
    let moved = within(10, || {
        let s = tmux.screen();
        (row_count(&s, TcpState::Established)
            == Some(net.left.ss_counts().get(TcpState::Established)))
        .then_some(())
    });
    assert!(moved.is_some(), "{}", tmux.screen());
    tmux.keys("q");
    assert!(
        within(5, || (!tmux.alive()).then_some(())).is_some(),
        "q did not quit"
    );
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn run_with_top_opens_the_view_and_q_stops_the_agent() {
    require_root();
    let ns = Netns::new("tv");
    let _listener = ns.listen("127.0.0.1:7301");
    let socket = std::env::temp_dir().join(format!("{}.sock", support::unique("tcpstate-top-")));
    let cmd = format!(
        "{} run --top --netns {} --socket {}",
        env!("CARGO_BIN_EXE_tcpstate"),
        ns.name,
        socket.display()
    );
    let tmux = Tmux::new(&cmd);
    let shown = within(15, || {
        let s = tmux.screen();
        (row_count(&s, TcpState::Listen) == Some(1)).then_some(s)
    });
    assert!(shown.is_some(), "{}", tmux.screen());
    tmux.keys("q");
    assert!(
        within(10, || (!tmux.alive()).then_some(())).is_some(),
        "q did not quit"
    );
    assert!(
        within(5, || (!socket.exists()).then_some(())).is_some(),
        "the agent stopped and removed its socket"
    );
    let _ = std::fs::remove_file(socket.with_extension("log"));
}

/// CAP_NET_ADMIN (12) and CAP_BPF (39): what attaching the loaded programs
/// to an interface that appears later takes.
const ATTACH_CAPS: &str = "0000008000001000";

/// CAP_DAC_READ_SEARCH (2) and CAP_SYS_PTRACE (19): what reading other
/// processes' /proc/PID/fd takes (`conns --process`).
const READ_FDS_CAPS: &str = "0000000000080004";

/// The namespace's thread keeps only what attaching takes, the owners'
/// reader only what reading descriptors takes; every other thread holds
/// nothing.
fn assert_caps(pid: u32, when: &str) -> usize {
    let caps = thread_caps(pid);
    for (task, name, eff) in &caps {
        let want = match name.as_str() {
            "tcpstate-netns" => ATTACH_CAPS,
            "tcpstate-owners" => READ_FDS_CAPS,
            _ => "0000000000000000",
        };
        assert_eq!(eff, want, "{task} ({name}) {when}");
    }
    assert_eq!(
        caps.iter()
            .filter(|(_, n, _)| n == "tcpstate-netns")
            .count(),
        1,
        "one namespace thread: {caps:?}"
    );
    caps.len()
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn after_attaching_the_agent_holds_only_what_attaching_needs_and_still_counts() {
    require_root();
    let net = VethPair::new();
    let port = free_port();
    let agent = Agent::start(
        &net.left,
        &["--metrics", &port.to_string(), "--reconcile-interval", "1"],
    );
    // Every thread, the namespace thread and the metrics server's included.
    let threads = assert_caps(agent.pid(), "once attached");
    assert!(threads >= 2, "the main and the namespace thread");
    // Without them: packets, timers (TIME_WAIT of the traffic), address
    // refresh, reconciliation and scrapes all still work.
    let traffic = traffic(&net);
    agent.assert_matches_ss(&net.left, "without capabilities");
    let (status, _) = http_get(&format!("127.0.0.1:{port}"), "/metrics", None);
    assert_eq!(status, "HTTP/1.1 200 OK");
    drop(traffic);
    agent.assert_matches_ss(&net.left, "after closing, without capabilities");
    assert_caps(agent.pid(), "(threads started later included)");
}

#[test]
#[ignore = "needs promtool: run through `cargo xtask test`"]
fn deploy_rules_and_their_tests_pass_promtool() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&root)
            .output()
            .expect("promtool");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
