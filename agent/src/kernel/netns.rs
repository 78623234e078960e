//! Network namespaces: the agent stays in the namespace it started in and does
//! its namespace-bound work (attaching, opening sock_diag, reading sysctls)
//! on a short-lived thread that joined the target namespace with setns(2).

use std::{fmt, fs::File, path::PathBuf};

use nix::sched::{CloneFlags, setns};

use crate::error::{Error, Result};

/// A network namespace: the agent's own, or one named by `ip netns add`.
pub struct NetNs {
    name: Option<String>,
    file: Option<File>,
    worker: Option<Worker>,
}

type Job = Box<dyn FnOnce() + Send>;

/// A thread that entered the namespace once and stays there, so that the
/// agent's periodic namespace-bound work needs no privilege after start.
struct Worker {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl NetNs {
    /// The namespace the agent runs in.
    pub fn current() -> NetNs {
        NetNs {
            name: None,
            file: None,
            worker: None,
        }
    }

    /// A namespace made by `ip netns add NAME` (bound at /run/netns/NAME).
    pub fn named(name: &str) -> Result<NetNs> {
        if name.is_empty() || name.contains('/') {
            return Err(Error::NoSuchNetns(name.into()));
        }
        let path = PathBuf::from("/run/netns").join(name);
        let file = File::open(&path).map_err(|_| Error::NoSuchNetns(name.into()))?;
        Ok(NetNs {
            name: Some(name.into()),
            file: Some(file),
            worker: None,
        })
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Runs `f` on a thread inside this namespace and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let Some(file) = &self.file else { return f() };
        std::thread::scope(|s| {
            s.spawn(|| {
                setns(file, CloneFlags::CLONE_NEWNET).map_err(|e| {
                    if e == nix::errno::Errno::EPERM {
                        Error::NotPermitted {
                            action: format!("entering {self}"),
                        }
                    } else {
                        Error::io(format!("entering {self}"), e.into())
                    }
                })?;
                f()
            })
            .join()
            .expect("namespace worker thread panicked")
        })
    }
}

impl NetNs {
    /// Starts the thread that stays in this namespace for [`NetNs::run_kept`]
    /// (nothing to start for the agent's own namespace).
    pub fn keep_a_thread_inside(&mut self) -> Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let file = file
            .try_clone()
            .map_err(|e| Error::io("duplicating the namespace handle", e))?;
        let label = self.to_string();
        let (jobs, inbox) = std::sync::mpsc::channel::<Job>();
        let (ready, entered) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("tcpstate-netns".into())
            .spawn(move || {
                let joined = setns(&file, CloneFlags::CLONE_NEWNET);
                let _ = ready.send(joined);
                if joined.is_ok() {
                    for job in inbox {
                        job();
                    }
                }
            })
            .map_err(|e| Error::io("starting the namespace thread", e))?;
        entered
            .recv()
            .expect("the namespace thread answers")
            .map_err(|e| Error::io(format!("entering {label}"), e.into()))?;
        self.worker = Some(Worker {
            jobs: Some(jobs),
            thread: Some(thread),
        });
        Ok(())
    }

    /// Runs `f` inside this namespace on the kept thread (or on a fresh one
    /// if none was kept).
    pub fn run_kept<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let Some(jobs) = self.worker.as_ref().and_then(|w| w.jobs.as_ref()) else {
            return self.run(f);
        };
        let (tx, rx) = std::sync::mpsc::channel();
        jobs.send(Box::new(move || {
            let _ = tx.send(f());
        }))
        .map_err(|_| Error::io("the namespace thread", std::io::Error::other("it stopped")))?;
        rx.recv()
            .map_err(|_| Error::io("the namespace thread", std::io::Error::other("it stopped")))?
    }
}

impl fmt::Display for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => write!(f, "network namespace {n:?}"),
            None => write!(f, "the current network namespace"),
        }
    }
}

/// Names of the interfaces that are up in the calling thread's namespace.
pub fn interfaces_up() -> Result<Vec<String>> {
    let addrs =
        nix::ifaddrs::getifaddrs().map_err(|e| Error::io("listing interfaces", e.into()))?;
    let mut names: Vec<String> = addrs
        .filter(|a| a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP))
        .map(|a| a.interface_name)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Does an interface of that name exist in the calling thread's namespace?
pub fn interface_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// Reads a sysctl of the calling thread's namespace, e.g. `net/ipv4/tcp_fin_timeout`.
pub fn sysctl_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/sys/{path}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// One of the kernel's TCP counters of the calling thread's namespace from
/// `/proc/net/netstat`, e.g. `TcpExt` `TCPTimeWaitOverflow`.
pub fn snmp_counter(group: &str, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/thread-self/net/netstat").ok()?;
    let prefix = format!("{group}:");
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if names.starts_with(&prefix) {
            let at = names.split_whitespace().position(|n| n == name)?;
            return values.split_whitespace().nth(at)?.parse().ok();
        }
    }
    None
}

/// The addresses of the calling thread's namespace, on every interface.
pub fn local_addresses() -> Result<Vec<std::net::IpAddr>> {
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| Error::io("listing addresses", e.into()))?;
    let mut out: Vec<std::net::IpAddr> = addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(std::net::IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}
