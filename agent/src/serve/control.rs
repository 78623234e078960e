//! The server side of the control socket: one request line, one JSON
//! answer per connection (the protocol is in `client::control`).

use std::{
    collections::HashMap,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::{
    client::control::{CONNS, COUNT, LISTENERS, REQUEST, VERIFY},
    error::{Error, Result},
    serve::reader::Reader,
    snapshot::{PortFilter, conns::ConnFilter},
    tracking::host::Host,
};

/// Prepares `path` for a new listener: refuses if another agent answers
/// there, removes a stale socket file, creates the parent folder.
pub fn claim(path: &Path) -> Result<PathBuf> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(Error::io(
                format!(
                    "another tcpstate agent already answers at {}",
                    path.display()
                ),
                std::io::Error::from(std::io::ErrorKind::AddrInUse),
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("removing the stale socket {}", path.display()), e))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    Ok(path.to_owned())
}

/// Makes the socket at `path` root's only (mode 0600), or root's and
/// `group`'s (0660): the counts of every namespace are not every local
/// user's to read, and the expensive requests not theirs to make.
pub fn restrict(path: &Path, group: Option<&str>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = match group {
        None => 0o600,
        Some(name) => {
            let g = nix::unistd::Group::from_name(name)
                .map_err(|e| Error::io(format!("looking up group {name}"), e.into()))?
                .ok_or_else(|| {
                    Error::io(
                        format!("--socket-group {name}"),
                        std::io::Error::other("no such group"),
                    )
                })?;
            nix::unistd::chown(path, None, Some(g.gid)).map_err(|e| {
                Error::io(
                    format!("giving {} to group {name}", path.display()),
                    e.into(),
                )
            })?;
            0o660
        }
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("setting the mode of {}", path.display()), e))
}

/// How long an expensive answer (a socket-table check, a walk of the flow
/// maps) is given again to whoever asks the same: a local user asking in a
/// loop makes the agent do the work at most once a second.
pub const EXPENSIVE_EVERY: Duration = Duration::from_secs(1);

/// An answer, and when it was made.
type Made = (Instant, Vec<u8>);

/// The expensive answers of the last [`EXPENSIVE_EVERY`], by request line.
#[derive(Clone, Default)]
pub struct Recent(Arc<tokio::sync::Mutex<HashMap<String, Made>>>);

/// Answers one client.
pub async fn answer(
    stream: tokio::net::UnixStream,
    agent: Arc<Mutex<Host>>,
    reader: Arc<Reader>,
    recent: Recent,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(read).read_line(&mut line),
    )
    .await??;
    if line.as_str() == REQUEST {
        let mut out = serde_json::to_vec(&reader.snapshot()?)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        return Ok(());
    }
    // One expensive answer at a time (the lock is held while it is made),
    // and the same question within a second gets the same answer.
    let mut recent = recent.0.lock().await;
    recent.retain(|_, (at, _)| at.elapsed() < EXPENSIVE_EVERY);
    if let Some((_, out)) = recent.get(&line) {
        write.write_all(out).await?;
        return Ok(());
    }
    let mut out = match line.as_str() {
        // These read the flow map or the socket table: off the runtime thread.
        VERIFY => {
            let snap =
                tokio::task::spawn_blocking(move || agent.lock().expect("agent lock").verify())
                    .await??;
            serde_json::to_vec(&snap)?
        }
        _ => expensive(&line, agent).await?,
    };
    out.push(b'\n');
    recent.insert(line, (Instant::now(), out.clone()));
    drop(recent);
    write.write_all(&out).await?;
    Ok(())
}

/// The answers that walk the flow maps or read the socket table, made off
/// the runtime thread: `count FILTER`, `conns FILTER`, `listeners NETNS`.
async fn expensive(line: &str, agent: Arc<Mutex<Host>>) -> anyhow::Result<Vec<u8>> {
    let (verb, arg) = [COUNT, CONNS, LISTENERS]
        .into_iter()
        .find_map(|v| line.strip_prefix(v).map(|a| (v, a.to_owned())))
        .ok_or_else(|| anyhow::anyhow!("unknown request {line:?}"))?;
    let out = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<u8>> {
        let host = || agent.lock().expect("agent lock");
        Ok(match verb {
            COUNT => {
                let filter: PortFilter = serde_json::from_str(&arg)?;
                serde_json::to_vec(&host().count_filtered(&filter)?)?
            }
            CONNS => {
                let filter: ConnFilter = serde_json::from_str(&arg)?;
                // Owners are read after the lock is given back.
                let found = host().conns(&filter)?;
                serde_json::to_vec(&found.finish()?)?
            }
            _ => {
                let netns: Option<u64> = serde_json::from_str(&arg)?;
                serde_json::to_vec(&host().listeners(netns)?)?
            }
        })
    })
    .await??;
    Ok(out)
}
