//! Network namespaces: the agent stays in the namespace it started in and
//! does its namespace-bound work (attaching, sock_diag, sysctls, link
//! events) on one thread that entered the monitored namespace once and
//! stays there ([`NetNs::run`]). That thread keeps the one privilege
//! attaching to a new interface needs; every other thread drops them all.

use std::{fmt, fs::File, os::unix::fs::MetadataExt, path::PathBuf};

use nix::sched::{CloneFlags, setns};

use crate::error::{Error, Result};

/// A network namespace: the agent's own, or one named by `ip netns add`.
pub struct NetNs {
    name: Option<String>,
    label: String,
    /// The namespace's inode number (what `ip netns identify`, `ls -i` and
    /// the kernel's `ns.inum` say).
    inode: u64,
    worker: Worker,
}

type Job = Box<dyn FnOnce() + Send>;

/// The thread that stays in the namespace.
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
    pub fn current() -> Result<NetNs> {
        NetNs::start(None, None)
    }

    /// A thread of the agent's own namespace whose jobs are following the
    /// host's namespaces (`run -A`: it keeps what that takes), named
    /// `tcpstate-keeper` so that /proc tells it from the namespaces' threads.
    pub fn keeper() -> Result<NetNs> {
        NetNs::start_as("tcpstate-keeper", None, None)
    }

    /// A thread of the agent's own namespace whose jobs read other
    /// processes' descriptors (the owners of sockets: it keeps what that
    /// takes), named `tcpstate-owners`.
    pub fn owner_reader() -> Result<NetNs> {
        NetNs::start_as("tcpstate-owners", None, None)
    }

    /// A namespace made by `ip netns add NAME` (bound at /run/netns/NAME).
    pub fn named(name: &str) -> Result<NetNs> {
        if name.is_empty() || name.contains('/') {
            return Err(Error::NoSuchNetns(name.into()));
        }
        let path = PathBuf::from("/run/netns").join(name);
        let file = File::open(&path).map_err(|_| Error::NoSuchNetns(name.into()))?;
        NetNs::start(Some(name.to_owned()), Some(file))
    }

    /// The namespace a file enters (a bind mount, `/proc/PID/ns/net`):
    /// the first of `paths` that opens. `name`: its `ip netns` name.
    pub fn entered_by(paths: &[PathBuf], name: Option<String>) -> Result<NetNs> {
        let mut last = None;
        for p in paths {
            match File::open(p) {
                Ok(f) => return NetNs::start(name, Some(f)),
                Err(e) => last = Some(Error::io(format!("opening {}", p.display()), e)),
            }
        }
        Err(last.unwrap_or_else(|| Error::NoSuchNetns(name.unwrap_or_default())))
    }

    fn start(name: Option<String>, file: Option<File>) -> Result<NetNs> {
        NetNs::start_as("tcpstate-netns", name, file)
    }

    fn start_as(thread: &str, name: Option<String>, file: Option<File>) -> Result<NetNs> {
        let unnamed_other = name.is_none() && file.is_some();
        let label = display(name.as_deref());
        let (jobs, inbox) = std::sync::mpsc::channel::<Job>();
        let (ready, entered) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || {
                let joined = match &file {
                    Some(f) => setns(f, CloneFlags::CLONE_NEWNET),
                    None => Ok(()),
                };
                // The thread holds the namespace; the file is not needed.
                drop(file);
                let inode = joined
                    .map(|()| std::fs::metadata("/proc/thread-self/ns/net").map_or(0, |m| m.ino()));
                let ok = inode.is_ok();
                let _ = ready.send(inode);
                if ok {
                    for job in inbox {
                        job();
                    }
                }
            })
            .map_err(|e| Error::io("starting the namespace thread", e))?;
        let inode = entered
            .recv()
            .expect("the namespace thread answers")
            .map_err(|e| {
                if e == nix::errno::Errno::EPERM {
                    Error::NotPermitted {
                        action: format!("entering {label}"),
                    }
                } else {
                    Error::io(format!("entering {label}"), e.into())
                }
            })?;
        let label = if unnamed_other {
            format!("network namespace net:[{inode}]")
        } else {
            label
        };
        Ok(NetNs {
            name,
            label,
            inode,
            worker: Worker {
                jobs: Some(jobs),
                thread: Some(thread),
            },
        })
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Runs `f` on the namespace's thread and returns its result. `f` may
    /// borrow from the caller: this waits until `f` has run (or was dropped
    /// unrun, when the thread is gone).
    pub fn run<'a, T: Send + 'a>(&self, f: impl FnOnce() -> Result<T> + Send + 'a) -> Result<T> {
        let gone = || Error::io("the namespace thread", std::io::Error::other("it stopped"));
        let jobs = self.worker.jobs.as_ref().ok_or_else(gone)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let job: Box<dyn FnOnce() + Send + 'a> = Box::new(move || {
            let _ = tx.send(f());
        });
        // SAFETY: only the lifetime is widened. This function returns only
        // after `rx` says the job is done with: it sent its result, or its
        // sender was dropped (the job ran and panicked, or the thread
        // dropped it unrun). So whatever the job borrows outlives its use.
        let job: Job = unsafe { std::mem::transmute::<Box<dyn FnOnce() + Send + 'a>, Job>(job) };
        jobs.send(job).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }
}

fn display(name: Option<&str>) -> String {
    match name {
        Some(n) => format!("network namespace {n:?}"),
        None => "the current network namespace".to_owned(),
    }
}

impl fmt::Display for NetNs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}
