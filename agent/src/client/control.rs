//! The agent's control socket: a unix socket that answers one JSON
//! [`Snapshot`] per connection. A filesystem socket works whatever network
//! namespace the agent monitors, and its permissions guard it.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use crate::{
    error::{Error, Result},
    snapshot::{
        PortFilter, Snapshot, StateCounts,
        conns::{Conn, ConnFilter, Listener, NetnsRows},
    },
};

pub const DEFAULT_SOCKET: &str = "/run/tcpstate/tcpstate.sock";
/// The counts and the probe's events.
pub const REQUEST: &str = "snapshot\n";
/// The same, plus the socket table's own counts read for this answer.
pub const VERIFY: &str = "verify\n";
/// `count FILTER-JSON`: the counts of the connections a [`PortFilter`] selects.
pub const COUNT: &str = "count ";
/// `conns FILTER-JSON`: the connections a [`ConnFilter`] selects.
pub const CONNS: &str = "conns ";
/// `listeners NETNS-JSON`: the listeners of every namespace (`null`) or one.
pub const LISTENERS: &str = "listeners ";

/// Asks the agent at `path` for a snapshot.
pub fn query(path: &Path) -> Result<Snapshot> {
    ask(path, REQUEST)
}

/// Asks the agent at `path` for a snapshot with the socket table's counts.
pub fn verify(path: &Path) -> Result<Snapshot> {
    ask(path, VERIFY)
}

/// Asks the agent at `path` for the counts of the connections `filter` selects.
pub fn count(path: &Path, filter: &PortFilter) -> Result<StateCounts> {
    let request = format!(
        "{COUNT}{}\n",
        serde_json::to_string(filter).expect("a filter serializes")
    );
    ask(path, &request)
}

/// Asks the agent at `path` for the connections `filter` selects.
pub fn conns(path: &Path, filter: &ConnFilter) -> Result<Vec<NetnsRows<Conn>>> {
    let request = format!(
        "{CONNS}{}\n",
        serde_json::to_string(filter).expect("a filter serializes")
    );
    ask(path, &request)
}

/// Asks the agent at `path` for the listeners of namespace `netns` (its
/// inode), or of every one.
pub fn listeners(path: &Path, netns: Option<u64>) -> Result<Vec<NetnsRows<Listener>>> {
    let request = format!(
        "{LISTENERS}{}\n",
        serde_json::to_string(&netns).expect("an inode serializes")
    );
    ask(path, &request)
}

/// Connects to the agent at `path`, telling "none runs" from "not yours
/// to ask" (a socket only root, or `--socket-group`'s members, may use).
pub fn connect(path: &Path) -> Result<UnixStream> {
    UnixStream::connect(path).map_err(|e| match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => Error::NoAccess(path.to_owned()),
        _ => Error::NoAgent(path.to_owned()),
    })
}

fn ask<T: serde::de::DeserializeOwned>(path: &Path, request: &str) -> Result<T> {
    let mut stream = connect(path)?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok();
    stream
        .write_all(request.as_bytes())
        .map_err(|e| Error::io("asking the agent", e))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| Error::io("reading the agent's answer", e))?;
    serde_json::from_str(&line)
        .map_err(|e| Error::io("decoding the agent's answer", std::io::Error::other(e)))
}
