//! Pod names from the Kubernetes Container Runtime Interface, the gRPC API
//! the kubelet itself drives containerd and CRI-O through, on their Unix
//! sockets. A pod's network namespace belongs to its sandbox, so the
//! watcher asks only about sandboxes: `ListPodSandbox` (ready ones, every
//! [`POLL`]) for which exist, and for each new one `PodSandboxStatus` with
//! `verbose`, whose runtime-specific info gives the sandbox process's pid
//! (containerd) or its network namespace's path (the OCI spec both
//! runtimes include). The sandbox's metadata are the pod's namespace, name
//! and UID as the kubelet set them: no API server is asked.
//!
//! The CRI has no event stream for sandboxes before v1.26's
//! `GetContainerEvents` (which containerd 1.6 lacks); listing the ready
//! sandboxes is one in-memory read in the runtime, so a poll each second
//! is what names a new pod within the 2 s a user waits.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    ListPodSandboxRequest, NamespaceMode, PodSandbox, PodSandboxFilter, PodSandboxState,
    PodSandboxStateValue, PodSandboxStatusRequest, VersionRequest,
    runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::{Channel, Endpoint, Uri};

use super::{Container, Names, Owner, Pod, Where};

/// The sockets tried unless `--cri-socket` names others: containerd's and
/// CRI-O's defaults (both under /run, which /var/run links to).
pub const DEFAULT_SOCKETS: [&str; 2] = ["/run/containerd/containerd.sock", "/run/crio/crio.sock"];

/// How often the ready sandboxes are listed.
pub const POLL: Duration = Duration::from_secs(1);

/// How long the watcher waits before trying a runtime that did not answer.
const RETRY: Duration = Duration::from_secs(5);

/// Any one call's limit: a runtime that hangs must not hold names back.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("cannot connect: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("{0}")]
    Call(#[from] tonic::Status),
}

/// Follows the CRI runtime at `socket` for as long as the task lives,
/// keeping `names` current. A socket nobody answers on (no such runtime on
/// this host, or containerd with its CRI plugin disabled, as Docker's own
/// containerd is) is tried again every [`RETRY`], and said once.
pub async fn follow(socket: PathBuf, names: Names) {
    let key = format!("cri:{}", socket.display());
    let mut said = None::<String>;
    loop {
        let why = match watch(&socket, &names, &key).await {
            Ok(()) => "it closed the connection".to_owned(),
            Err(e) => e.to_string(),
        };
        names.forget(&key);
        if said.as_deref() != Some(why.as_str()) {
            tracing::debug!("CRI at {}: {why}", socket.display());
            said = Some(why);
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// A channel to the CRI runtime at `socket` (a Unix socket; tonic speaks
/// HTTP/2 over it through this connector).
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = socket.to_path_buf();
    // The URI is a placeholder: every connection goes to the socket.
    Endpoint::from_static("http://cri.sock")
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

async fn watch(socket: &Path, names: &Names, key: &str) -> Result<(), Error> {
    let mut client = RuntimeServiceClient::new(connect(socket).await?);
    let version = client
        .version(VersionRequest {
            version: "v1".into(),
        })
        .await?
        .into_inner();
    let runtime = runtime_label(&version.runtime_name);
    tracing::info!(
        "naming pods from {} {} (CRI) at {}",
        version.runtime_name,
        version.runtime_version,
        socket.display()
    );
    // Each ready sandbox's namespace, asked once it is placed.
    let mut known: HashMap<String, Known> = HashMap::new();
    loop {
        let ready = ready_sandboxes(&mut client).await?;
        known.retain(|id, _| ready.iter().any(|s| &s.id == id));
        for sb in &ready {
            let tries = match known.get(&sb.id) {
                Some(Known::Unplaced(n)) if *n < PLACE_TRIES => n + 1,
                Some(_) => continue,
                None => 1,
            };
            let status = client
                .pod_sandbox_status(PodSandboxStatusRequest {
                    pod_sandbox_id: sb.id.clone(),
                    verbose: true,
                })
                .await;
            let found = match status {
                Ok(r) => {
                    let r = r.into_inner();
                    let own_netns = r
                        .status
                        .as_ref()
                        .and_then(|s| s.linux.as_ref())
                        .and_then(|l| l.namespaces.as_ref())
                        .and_then(|n| n.options.as_ref())
                        .is_none_or(|o| o.network() != NamespaceMode::Node);
                    match (own_netns, netns_of(&r.info)) {
                        (false, _) => Known::Node,
                        (true, Some(at)) => Known::Placed(at, owner_of(sb, runtime)),
                        (true, None) => {
                            if tries == PLACE_TRIES {
                                tracing::debug!(
                                    "CRI sandbox {}: no pid or netns path after {tries} looks; left unnamed",
                                    sb.id
                                );
                            }
                            Known::Unplaced(tries)
                        }
                    }
                }
                // Gone between the list and the look: the next list says.
                Err(s) if s.code() == tonic::Code::NotFound => continue,
                Err(s) => return Err(s.into()),
            };
            known.insert(sb.id.clone(), found);
        }
        let placed = known.values().filter_map(|k| match k {
            Known::Placed(at, owner) => Some((*at, owner.clone())),
            _ => None,
        });
        names.set(key, placed.collect());
        tokio::time::sleep(POLL).await;
    }
}

/// What a ready sandbox's status said.
enum Known {
    /// Its namespace, and whose it is.
    Placed(Where, Owner),
    /// It has none of its own (`hostNetwork`): nothing to name.
    Node,
    /// Neither a pid nor a netns path yet (caught while starting): asked
    /// again on the next polls, up to [`PLACE_TRIES`] looks.
    Unplaced(u8),
}

/// Looks at a sandbox that could not be placed before it is left unnamed.
const PLACE_TRIES: u8 = 10;

async fn ready_sandboxes(
    client: &mut RuntimeServiceClient<Channel>,
) -> Result<Vec<PodSandbox>, Error> {
    let filter = PodSandboxFilter {
        state: Some(PodSandboxStateValue {
            state: PodSandboxState::SandboxReady.into(),
        }),
        ..Default::default()
    };
    let list = client
        .list_pod_sandbox(ListPodSandboxRequest {
            filter: Some(filter),
        })
        .await?;
    Ok(list.into_inner().items)
}

/// The runtime as the container's `runtime` field spells it.
fn runtime_label(name: &str) -> &'static str {
    match name {
        "containerd" => "containerd",
        "cri-o" => "cri-o",
        _ => "cri",
    }
}

/// The pod a sandbox is, and the sandbox as its container (its id is what
/// `crictl pods` shows, and what `--netns` accepts).
fn owner_of(sb: &PodSandbox, runtime: &str) -> Owner {
    let meta = sb.metadata.clone().unwrap_or_default();
    let some = |s: String| (!s.is_empty()).then_some(s);
    Owner {
        container: Some(Container {
            runtime: runtime.to_owned(),
            id: sb.id.clone(),
            name: None,
        }),
        pod: Some(Pod {
            namespace: some(meta.namespace),
            name: some(meta.name),
            uid: some(meta.uid),
        }),
    }
}

/// Where a sandbox's network namespace is, from `PodSandboxStatus`'s
/// verbose info: its `info` entry is a JSON object whose `pid` is the
/// sandbox process (containerd), and whose `runtimeSpec` (the OCI spec)
/// lists the namespaces with the network one's path.
pub fn netns_of(info: &HashMap<String, String>) -> Option<Where> {
    let v: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    if let Some(pid) = v["pid"]
        .as_u64()
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0)
    {
        return Some(Where::Pid(pid));
    }
    let path = v["runtimeSpec"]["linux"]["namespaces"]
        .as_array()?
        .iter()
        .find(|n| n["type"] == "network")?["path"]
        .as_str()?;
    std::fs::metadata(path).ok().map(|m| Where::Inode(m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_is_preferred_and_the_spec_path_is_the_fallback() {
        let with_pid = HashMap::from([(
            "info".to_owned(),
            r#"{"pid":4242,"runtimeSpec":{"linux":{"namespaces":[{"type":"network","path":"/nonexistent"}]}}}"#.to_owned(),
        )]);
        assert_eq!(netns_of(&with_pid), Some(Where::Pid(4242)));
        // No pid: the path is stat'ed, here this process's own namespace.
        let by_path = HashMap::from([(
            "info".to_owned(),
            r#"{"runtimeSpec":{"linux":{"namespaces":[{"type":"pid"},{"type":"network","path":"/proc/self/ns/net"}]}}}"#.to_owned(),
        )]);
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert_eq!(netns_of(&by_path), Some(Where::Inode(own)));
        assert_eq!(netns_of(&HashMap::new()), None);
        let garbled = HashMap::from([("info".to_owned(), "not json".to_owned())]);
        assert_eq!(netns_of(&garbled), None);
    }
}
