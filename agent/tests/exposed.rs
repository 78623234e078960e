//! The agent as something exposed on a node: its metrics endpoint under
//! thousands of slow and idle clients still answers a real scrape at once
//! and lets go of them within seconds; over TLS with basic auth it answers
//! only the right password (curl, and a real Prometheus scraping it), and
//! refuses plain HTTP; its control socket is root's unless a group is
//! named, and its expensive answers are made once a second. Needs root:
//! `cargo xtask test` runs it.

mod support;

use std::{
    io::{ErrorKind, Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use support::{Agent, VethPair, http::free_port, prometheus::Prometheus, require_root};
use tcpstate_common::TcpState;

/// The slow clients: as many as the landed agent was tried with.
const SLOW: usize = 6_000;

/// One scrape of /metrics: (how long it took, status line, body).
fn scrape(addr: &str) -> (Duration, String, String) {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connecting for a scrape");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        t.elapsed(),
        head.lines().next().unwrap_or("").to_owned(),
        body.to_owned(),
    )
}

fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Whether the server closed `s` (EOF or reset) rather than still holding it.
fn closed_by_server(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 64];
    // EOF, a reset, or bytes (an error answer before closing): let go.
    !matches!(s.read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock)
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn slow_and_idle_clients_neither_block_a_scrape_nor_keep_their_descriptors() {
    require_root();
    let limit = libc::rlimit {
        rlim_cur: 20_000,
        rlim_max: 20_000,
    };
    // SAFETY: a plain struct for the call; raising our own descriptor limit.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    let net = VethPair::new();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start(&net.left, &["--metrics", &addr]);
    let (_, status, _) = scrape(&addr);
    assert!(status.contains("200"), "{status}");
    let before = descriptors(agent.pid());
    // Half a request each (no blank line ends the headers), and some that
    // send nothing at all.
    let mut slow: Vec<TcpStream> = (0..SLOW)
        .map(|i| {
            let mut s = TcpStream::connect(&addr).expect("a slow client connects");
            if i % 4 != 0 {
                let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
            }
            s
        })
        .collect();
    // While they hang on: a scrape answers at once, with the counts.
    let truth = net.left.ss_counts();
    let (took, status, body) = scrape(&addr);
    assert!(status.contains("200"), "{status}");
    assert!(
        took < Duration::from_secs(1),
        "a scrape took {took:?} beside {SLOW} slow clients"
    );
    let established = body
        .lines()
        .find(|l| l.starts_with("tcpstate_connections{state=\"established\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok());
    assert_eq!(
        established,
        Some(truth.get(tcpstate_common::TcpState::Established)),
        "{body}"
    );
    let held = descriptors(agent.pid());
    assert!(
        held <= before + 512 + 16,
        "{held} descriptors with {SLOW} slow clients (before: {before}): no cap"
    );
    // Within the header timeout and a little: every slow client let go.
    let deadline = Instant::now() + Duration::from_secs(9);
    let mut open = slow.len();
    while Instant::now() < deadline {
        slow.retain_mut(|s| !closed_by_server(s));
        open = slow.len();
        if open == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        open, 0,
        "{open} of {SLOW} slow clients still held after 9 s"
    );
    let after = descriptors(agent.pid());
    assert!(
        after <= before + 4,
        "{after} descriptors after (before: {before})"
    );
    drop(slow);
    let (_, status, _) = scrape(&addr);
    assert!(status.contains("200"), "after: {status}");
}

/// A group made for the test, removed on drop.
struct TempGroup(String);

impl TempGroup {
    fn new() -> TempGroup {
        let name = support::unique("tsg");
        support::sh(&["groupadd", &name]);
        TempGroup(name)
    }

    fn gid(&self) -> u32 {
        nix::unistd::Group::from_name(&self.0)
            .unwrap()
            .expect("the group exists")
            .gid
            .as_raw()
    }
}

impl Drop for TempGroup {
    fn drop(&mut self) {
        let _ = std::process::Command::new("groupdel").arg(&self.0).status();
    }
}

/// `tcpstate count --socket S` as user nobody, with `groups` as its groups.
fn count_as_nobody(socket: &std::path::Path, groups: &[u32]) -> std::process::Output {
    let groups = if groups.is_empty() {
        "--clear-groups".to_owned()
    } else {
        format!(
            "--groups={}",
            groups
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", &groups])
        .arg(env!("CARGO_BIN_EXE_tcpstate"))
        .args(["count", "--socket"])
        .arg(socket)
        .output()
        .expect("setpriv")
}

/// The `uptime_ms` of the agent's answer to one raw request line.
fn asked(socket: &std::path::Path, request: &str) -> u64 {
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).expect("a JSON answer");
    v["uptime_ms"].as_u64().expect("uptime_ms")
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn the_control_socket_is_roots_unless_a_group_is_named() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_root();
    let net = VethPair::new();
    let agent = Agent::start(&net.left, &[]);
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the socket is root's alone: {mode:o}");
    let out = count_as_nobody(&agent.socket, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody counted: {err}");
    assert!(err.contains("permission denied"), "{err}");
    assert!(!err.contains("no tcpstate agent is running"), "{err}");
    // The same question in a loop: the socket table is read at most once a
    // second (the answers carry the moment they were made).
    let t = Instant::now();
    let mut made = std::collections::BTreeSet::new();
    while t.elapsed() < Duration::from_millis(2500) {
        made.insert(asked(&agent.socket, "verify\n"));
    }
    assert!(
        made.len() <= 4,
        "{} socket-table reads in 2.5 s",
        made.len()
    );
    drop(agent);
    // A group's members may ask.
    let group = TempGroup::new();
    let agent = Agent::start(&net.left, &["--socket-group", &group.0]);
    let meta = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), group.gid());
    let out = count_as_nobody(&agent.socket, &[group.gid()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    let truth = net.left.ss_counts();
    let est = shown
        .lines()
        .find(|l| l.starts_with("ESTABLISHED"))
        .and_then(|l| l.split_whitespace().last()?.parse::<u64>().ok());
    assert_eq!(
        est,
        Some(truth.get(tcpstate_common::TcpState::Established)),
        "{shown}"
    );
    // Not a member: still refused, and told why.
    let out = count_as_nobody(&agent.socket, &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("permission denied"));
}

/// A folder with a CA and a server certificate for 127.0.0.1 signed by it,
/// made by openssl (and the password's hash by htpasswd): nothing of it from
/// the agent's own code. Removed on drop.
struct Pki(PathBuf);

impl Pki {
    fn make() -> Pki {
        let dir = std::env::temp_dir().join(support::unique("tcpstate-pki-"));
        std::fs::create_dir_all(&dir).unwrap();
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "1",
            "-subj",
            "/CN=tcpstate test CA",
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ]);
        std::fs::write(
            dir.join("san.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
        ]);
        Pki(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// htpasswd's bcrypt of `password` (apache2-utils: what exporter-toolkit's
/// documentation tells users to make their hashes with).
fn bcrypt_of(password: &str) -> String {
    let out = Command::new("htpasswd")
        .args(["-nbBC", "10", "alice", password])
        .output()
        .expect("htpasswd (apt-get install apache2-utils)");
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let hash = line
        .split_once(':')
        .map(|(_, h)| h.to_owned())
        .unwrap_or_default();
    assert!(
        hash.starts_with("$2y$"),
        "no bcrypt from htpasswd: {line:?}"
    );
    hash
}

/// curl's status code for `url` with `args`.
fn curl(url: &str, ca: &Path, args: &[&str]) -> (String, String) {
    let out = Command::new("curl")
        .args([
            "-s",
            "--max-time",
            "5",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(ca)
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_owned(), body.to_owned())
}

fn established_in(body: &str) -> Option<u64> {
    body.lines()
        .find(|l| l.starts_with("tcpstate_connections{state=\"established\"}"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn metrics_over_tls_with_basic_auth_answer_only_the_right_password() {
    require_root();
    let pki = Pki::make();
    let web = pki.path("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\nbasic_auth_users:\n  alice: '{}'\n",
            bcrypt_of("s3cret")
        ),
    )
    .unwrap();
    let net = VethPair::new();
    let _held = net.left.listen(&format!("{}:7", net.left_v4));
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let agent = Agent::start(
        &net.left,
        &[
            "--metrics",
            &addr,
            "--web-config-file",
            web.to_str().unwrap(),
        ],
    );
    let url = format!("https://{addr}/metrics");
    let ca = pki.path("ca.crt");
    let (code, body) = curl(&url, &ca, &["-u", "alice:s3cret"]);
    assert_eq!(code, "200", "{body}");
    assert_eq!(
        established_in(&body),
        Some(net.left.ss_counts().get(TcpState::Established)),
        "{body}"
    );
    for wrong in [&["-u", "alice:wrong"][..], &["-u", "bob:s3cret"], &[]] {
        let (code, _) = curl(&url, &ca, wrong);
        assert_eq!(code, "401", "{wrong:?}");
    }
    // Plain HTTP to the TLS port: refused, with the reason.
    let (code, body) = curl(
        &format!("http://{addr}/metrics"),
        &ca,
        &["-u", "alice:s3cret"],
    );
    assert_eq!(code, "400", "{body}");
    assert!(body.contains("HTTPS"), "{body}");
    // A real Prometheus over TLS with basic auth gets the counts.
    let prom = Prometheus::start_with(
        &addr,
        "    scheme: https\n    tls_config:\n      ca_file: ca.crt\n    basic_auth:\n      username: alice\n      password: s3cret\n",
        &[("ca.crt", &std::fs::read(&ca).unwrap())],
    );
    let want = net.left.ss_counts().get(TcpState::Listen) as f64;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = None;
    while Instant::now() < deadline && got != Some(want) {
        got = prom.query("tcpstate_connections{job=\"tcpstate\",state=\"listen\"}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(got, Some(want), "Prometheus over TLS and basic auth vs ss");
    assert_eq!(prom.query("up{job=\"tcpstate\"}"), Some(1.0));
    // One with the wrong password is refused: its target is down.
    let bad = Prometheus::start_with(
        &addr,
        "    scheme: https\n    tls_config:\n      ca_file: ca.crt\n    basic_auth:\n      username: alice\n      password: nope\n",
        &[("ca.crt", &std::fs::read(&ca).unwrap())],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut up = None;
    while Instant::now() < deadline && up != Some(0.0) {
        up = bad.query("up{job=\"tcpstate\"}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(up, Some(0.0), "a wrong password scraped");
    drop(agent);
}

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn a_bad_web_config_is_one_clear_line_before_anything_is_attached() {
    require_root();
    let dir = std::env::temp_dir().join(support::unique("tcpstate-webbad-"));
    std::fs::create_dir_all(&dir).unwrap();
    let web = dir.join("web.yml");
    std::fs::write(
        &web,
        "tls_server_config:\n  cert_file: missing.crt\n  key_file: missing.key\n",
    )
    .unwrap();
    let net = VethPair::new();
    let out = support::tcpstate()
        .args([
            "run",
            "--netns",
            &net.left.name,
            "--metrics",
            &free_port().to_string(),
            "--web-config-file",
        ])
        .arg(&web)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("web.yml") && err.contains("missing.crt"),
        "{err}"
    );
    assert!(
        !err.contains("monitoring"),
        "attached before reading it: {err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
