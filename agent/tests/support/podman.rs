//! A private rootful podman API service for the tests (`podman system
//! service`, Docker's API on its own socket), with its own root, run root,
//! tmpdir and file events under a temporary folder, and the busybox image
//! imported from a root filesystem. Containers run with `--network none`:
//! a namespace of their own holding only a loopback, so nothing on the
//! host's network or firewall changes. Dropping it removes the containers
//! and stops the service.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::unique;

pub const IMAGE: &str = "tcpstate-test-busybox:1";

/// What podman makes outside its configured folders whatever it is told
/// (its blob-info cache), removed on drop when the test made it.
const OUTSIDE: [&str; 2] = ["/var/lib/containers/cache", "/var/lib/containers"];

pub struct Podman {
    child: Option<Child>,
    root: PathBuf,
    made: Vec<&'static str>,
}

impl Podman {
    pub fn start() -> Podman {
        let root = std::env::temp_dir().join(unique("tspod"));
        std::fs::create_dir_all(&root).unwrap();
        let made = OUTSIDE
            .into_iter()
            .filter(|p| !std::path::Path::new(p).exists())
            .collect();
        let mut p = Podman {
            child: None,
            root,
            made,
        };
        let log = std::fs::File::create(p.root.join("service.log")).unwrap();
        let url = format!("unix://{}", p.socket());
        let child = p
            .command()
            .args(["system", "service", "--time=0", &url])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("podman (apt-get install podman)");
        p.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::path::Path::new(&p.socket()).exists() {
            assert!(Instant::now() < deadline, "podman's service did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        p.import_image();
        p
    }

    /// `podman` with this instance's storage and state.
    fn command(&self) -> Command {
        let mut c = Command::new("podman");
        c.arg("--root")
            .arg(self.root.join("root"))
            .arg("--runroot")
            .arg(self.root.join("run"))
            .arg("--tmpdir")
            .arg(self.root.join("tmp"))
            .args(["--events-backend", "file", "--cgroup-manager", "cgroupfs"]);
        c
    }

    /// `podman ARGS`, which must succeed; its stdout, trimmed.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().expect("podman");
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn import_image(&self) {
        let mut import = self.command();
        import.args(["import", "-", IMAGE]);
        super::docker::import_busybox(&self.root, import);
    }

    /// Starts a container named `name` running `cmd` (sh -c); returns its
    /// id. Its limits are set below the test's own: podman's defaults are
    /// above them, and raising a limit needs CAP_SYS_RESOURCE, which root
    /// lacks on this project's VMs.
    pub fn run_named(&self, name: &str, cmd: &str) -> String {
        self.ok(&[
            "run",
            "-d",
            "--network",
            "none",
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
            "--name",
            name,
            IMAGE,
            "sh",
            "-c",
            cmd,
        ])
    }

    /// The API socket (what `run --podman-socket` takes).
    pub fn socket(&self) -> String {
        self.root.join("podman.sock").display().to_string()
    }

    /// The pid of a container's first process.
    pub fn pid(&self, id: &str) -> u32 {
        self.ok(&["inspect", "-f", "{{.State.Pid}}", id])
            .parse()
            .expect("a pid")
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.command().args(["rm", "-af", "-t", "0"]).output();
        let _ = self.command().args(["rmi", "-af"]).output();
        if let Some(c) = self.child.take() {
            super::stop_daemon(c, Duration::from_secs(10));
        }
        // conmon processes of containers that would not stop.
        super::remove_daemon_root(&self.root, &self.root);
        if self.made.contains(&OUTSIDE[0]) {
            let _ = std::fs::remove_dir_all(OUTSIDE[0]);
        }
        if self.made.contains(&OUTSIDE[1]) {
            let _ = std::fs::remove_dir(OUTSIDE[1]);
        }
    }
}
