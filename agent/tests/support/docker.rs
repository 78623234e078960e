//! A private Docker daemon for the tests: its own socket, data and exec
//! roots and bridge, started with `--iptables=false --ip-forward=false` so
//! it leaves the host's firewall and forwarding alone (the test checks
//! `iptables-save` before and after), and an image imported from a root
//! filesystem holding busybox-static (no registry is reachable). Dropping it
//! removes the containers and the image and stops what it started.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::{hosts::Bridge, unique};

pub const IMAGE: &str = "tcpstate-test-busybox:1";

pub struct Dockerd {
    child: Option<Child>,
    pub host: String,
    root: PathBuf,
    pub bridge: Bridge,
}

/// The host's firewall as `iptables-save` prints it (counters left out).
pub fn firewall() -> String {
    let out = Command::new("iptables-save").output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
            .collect::<Vec<_>>()
            .join("\n")
    })
    .unwrap_or_default()
}

/// Makes a root filesystem of busybox-static (sh, nc, sleep, cat) under
/// `dir` and pipes its tar into `import` (`docker import -`, `podman
/// import -`), which must succeed.
pub fn import_busybox(dir: &std::path::Path, mut import: Command) {
    let rootfs = dir.join("rootfs");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/usr/bin/busybox", bin.join("busybox")).expect("busybox-static");
    for tool in ["sh", "nc", "sleep", "cat"] {
        std::os::unix::fs::symlink("busybox", bin.join(tool)).unwrap();
    }
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let st = import
        .stdin(tar.stdout.take().unwrap())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(tar.wait().unwrap().success(), "tar of the image's root");
    assert!(st.success(), "{import:?}");
}

impl Dockerd {
    pub fn start() -> Dockerd {
        let name = unique("tsdock");
        let root = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&root).unwrap();
        let bridge = Bridge::new();
        let host = format!("unix://{}", root.join("docker.sock").display());
        let log = std::fs::File::create(root.join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .args(["--host", &host])
            .arg("--data-root")
            .arg(root.join("data"))
            .arg("--exec-root")
            .arg(root.join("exec"))
            .arg("--pidfile")
            .arg(root.join("dockerd.pid"))
            .args(["--bridge", &bridge.name])
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("dockerd (apt-get install docker.io)");
        let d = Dockerd {
            child: Some(child),
            host,
            root,
            bridge,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.docker(&["info"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer within 60 s: {}",
                std::fs::read_to_string(d.root.join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        d.import_image();
        d
    }

    /// `docker ARGS` against this daemon.
    pub fn docker(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker")
            .args(["--host", &self.host])
            .args(args)
            .output()
            .expect("docker")
    }

    /// `docker ARGS`, which must succeed; its stdout, trimmed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn import_image(&self) {
        let mut import = Command::new("docker");
        import.args(["--host", &self.host, "import", "-", IMAGE]);
        import_busybox(&self.root, import);
    }

    /// Starts a container running `cmd` (sh -c); returns its id.
    pub fn run(&self, cmd: &str) -> String {
        self.run_with(&[], cmd)
    }

    /// Starts a container named `name` running `cmd` (sh -c); returns its id.
    pub fn run_named(&self, name: &str, cmd: &str) -> String {
        self.run_with(&["--name", name], cmd)
    }

    fn run_with(&self, opts: &[&str], cmd: &str) -> String {
        let mut args = vec!["run", "-d", "--label", "tcpstate-test"];
        args.extend(opts);
        args.extend([IMAGE, "sh", "-c", cmd]);
        self.ok(&args)
    }

    /// The daemon's API socket (what `run --docker-socket` takes).
    pub fn socket(&self) -> String {
        self.host.trim_start_matches("unix://").to_owned()
    }

    /// The container's pid (its namespace: /proc/PID/ns/net) and address.
    pub fn inspect(&self, id: &str) -> (u32, String) {
        let out = self.ok(&[
            "inspect",
            "-f",
            "{{.State.Pid}} {{.NetworkSettings.IPAddress}}",
            id,
        ]);
        let (pid, ip) = out.split_once(' ').expect("pid and address");
        (pid.parse().unwrap(), ip.to_owned())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let ids = self.docker(&["ps", "-aq", "--filter", "label=tcpstate-test"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        let _ = self.docker(&["rmi", "-f", IMAGE]);
        if let Some(c) = self.child.take() {
            super::stop_daemon(c, Duration::from_secs(20));
        }
        // Its containerd, if it is still shutting down.
        super::remove_daemon_root(&self.root, &self.root.join("exec"));
    }
}
