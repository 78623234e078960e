//! The agent's errors: each one says what went wrong and what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this tcpstate binary was built without its eBPF probe; build it with `cargo xtask build` (the binary lands in target/release/tcpstate)"
    )]
    ProbeMissing,
    #[error(
        "no network namespace named {0:?} (`ip netns list` shows the names; `ip netns add` makes one)"
    )]
    NoSuchNetns(String),
    #[error("no interface named {iface:?} in {netns} (`ip link` lists them)")]
    NoSuchInterface { iface: String, netns: String },
    #[error("no interface is up in {0}; bring one up or name it with --iface")]
    NoInterfaces(String),
    #[error(
        "the probe has room for {max} network namespaces and all are in use; raise --max-netns"
    )]
    TooManyNamespaces { max: u32 },
    #[error(
        "no monitored network namespace {0:?} (`tcpstate count --by-netns` lists them; give an `ip netns` name, an inode number or pid:PID)"
    )]
    UnknownNetns(String),
    #[error(
        "permission denied while {action}: run as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (and CAP_SYS_ADMIN for --netns)"
    )]
    NotPermitted { action: String },
    #[error(
        "the kernel's verifier rejected the probe program {program}: {error}\n--- end of the verifier log ---\n{log}"
    )]
    Verifier {
        program: String,
        error: String,
        log: String,
    },
    #[error("cannot attach {program} to {iface}: {error}{hint}")]
    Attach {
        program: String,
        iface: String,
        error: String,
        hint: &'static str,
    },
    #[error("no tcpstate agent is running (nothing answers at {0}); start one with `tcpstate run`")]
    NoAgent(PathBuf),
    #[error(
        "permission denied at {0}: the agent answers only root there, and the members of the group `run --socket-group GROUP` named; run as root or join that group"
    )]
    NoAccess(PathBuf),
    #[error("web config {0}: {1}")]
    WebConfig(PathBuf, String),
    #[error("eBPF: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    /// A capture `tcpstate replay` cannot read (further).
    #[error("{file}: {what}")]
    Capture { file: String, what: String },
    /// An argument that makes no sense, said with what would.
    #[error("{0}")]
    Usage(String),
    /// `count --observed` of an agent started without `--observe`.
    #[error(
        "the agent does not count connections passing through: start it with `tcpstate run --observe`"
    )]
    NotObserving,
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// True when an aya error comes from EPERM/EACCES.
pub fn is_permission_error(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
        {
            return true;
        }
        cur = e.source();
    }
    false
}
