//! The server side of the control socket: one request line, one JSON
//! answer per connection (the protocol is in `client::control`).

use std::{
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::{
    client::control::{COUNT, REQUEST, VERIFY},
    error::{Error, Result},
    serve::reader::Reader,
    snapshot::PortFilter,
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

/// Answers one client.
pub async fn answer(
    stream: tokio::net::UnixStream,
    agent: Arc<Mutex<Host>>,
    reader: Arc<Reader>,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(read).read_line(&mut line),
    )
    .await??;
    let mut out = match line.as_str() {
        REQUEST => serde_json::to_vec(&reader.snapshot()?)?,
        // These read the flow map or the socket table: off the runtime thread.
        VERIFY => {
            let snap =
                tokio::task::spawn_blocking(move || agent.lock().expect("agent lock").verify())
                    .await??;
            serde_json::to_vec(&snap)?
        }
        _ => match line.strip_prefix(COUNT) {
            Some(filter) => {
                let filter: PortFilter = serde_json::from_str(filter)?;
                let counts = tokio::task::spawn_blocking(move || {
                    agent.lock().expect("agent lock").count_filtered(&filter)
                })
                .await??;
                serde_json::to_vec(&counts)?
            }
            None => anyhow::bail!("unknown request {line:?}"),
        },
    };
    out.push(b'\n');
    write.write_all(&out).await?;
    Ok(())
}
