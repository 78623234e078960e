//! Container names from the Docker Engine API (Docker's, and podman's
//! service, which speaks the same API), through bollard (the
//! maintained async Docker client; it speaks the API over the daemon's Unix
//! socket with the hyper stack the agent already uses). The watcher
//! subscribes to the daemon's container events first and then lists the
//! running containers, so nothing that happens in between is missed; each
//! start, rename, die or destroy inspects the one container it is about.
//! Renames and restarts are followed that way: a restarted container is the
//! same container, found in its new namespace by its new first process.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use bollard::{
    API_DEFAULT_VERSION, Docker,
    query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder},
};
use futures_util::StreamExt;

use super::{Container, Names, Owner, Pod, Where};

/// Where the Docker daemon listens unless `--docker-socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// Where rootful podman's API service (`podman system service`, the
/// `podman.socket` unit) listens unless `--podman-socket` says otherwise.
/// It speaks Docker's API, so the same client and watcher serve it.
pub const PODMAN_SOCKET: &str = "/run/podman/podman.sock";

/// Which engine answers a socket: it names the containers' `runtime`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Docker,
    Podman,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }
}

/// How long the watcher waits before trying a daemon that did not answer.
const RETRY: Duration = Duration::from_secs(2);

/// Follows the daemon at `socket` for as long as the task lives, keeping
/// `names` current. A daemon that is not there (or goes away) is tried
/// again every [`RETRY`]; what it said meanwhile is forgotten.
pub async fn follow(socket: PathBuf, names: Names, engine: Engine) {
    let key = format!("{}:{}", engine.name(), socket.display());
    let mut said = None::<String>;
    loop {
        let why = match watch(&socket, &names, &key, engine).await {
            Ok(()) => "its event stream ended".to_owned(),
            Err(e) => e.to_string(),
        };
        names.forget(&key);
        // Said once per reason: a host without Docker is not an error.
        if said.as_deref() != Some(why.as_str()) {
            tracing::debug!("{} at {}: {why}", engine.name(), socket.display());
            said = Some(why);
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn watch(
    socket: &std::path::Path,
    names: &Names,
    key: &str,
    engine: Engine,
) -> Result<(), bollard::errors::Error> {
    let path = socket.to_string_lossy();
    let docker = Docker::connect_with_unix(&path, 10, API_DEFAULT_VERSION)?;
    // Only what changes a name or a namespace: health checks and `docker
    // exec` are container events too, every few seconds per container.
    let filters = HashMap::from([
        ("type", vec!["container"]),
        ("event", vec!["start", "die", "rename", "destroy"]),
    ]);
    let mut events = docker.events(Some(EventsOptionsBuilder::new().filters(&filters).build()));
    // Subscribed first, listed second: an event in between is applied to
    // the list, not lost.
    let mut known: HashMap<String, (Where, Owner)> = HashMap::new();
    let list = docker
        .list_containers(Some(ListContainersOptionsBuilder::new().build()))
        .await?;
    for id in list.into_iter().filter_map(|c| c.id) {
        if let Some(found) = inspect(&docker, &id, engine).await {
            known.insert(id, found);
        }
    }
    names.set(key, known.values().cloned().collect());
    tracing::info!("naming containers from {} at {path}", engine.name());
    while let Some(event) = events.next().await {
        // Only the container the event is about is looked at again: a
        // host with hundreds of containers asks once per event, not
        // hundreds of times.
        let Some(id) = event?.actor.and_then(|a| a.id) else {
            continue;
        };
        match inspect(&docker, &id, engine).await {
            Some(found) => known.insert(id, found),
            None => known.remove(&id),
        };
        names.set(key, known.values().cloned().collect());
    }
    Ok(())
}

/// A running container with a namespace of its own: where that namespace
/// is (the pid of its first process) and who it is. `None` for one that
/// stopped, is gone, or shares another's namespace.
async fn inspect(docker: &Docker, id: &str, engine: Engine) -> Option<(Where, Owner)> {
    let c = docker.inspect_container(id, None).await.ok()?;
    let mode = c
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.clone())
        .unwrap_or_default();
    // `host`: the host's namespace; `container:X`: X's, named by X.
    if mode == "host" || mode.starts_with("container:") {
        return None;
    }
    let state = c.state.as_ref()?;
    if state.running != Some(true) {
        return None;
    }
    let pid = state
        .pid
        .and_then(|p| u32::try_from(p).ok())
        .filter(|p| *p > 0)?;
    let labels = c.config.and_then(|c| c.labels).unwrap_or_default();
    let owner = Owner {
        container: Some(Container {
            runtime: engine.name().into(),
            id: c.id.unwrap_or_else(|| id.to_owned()),
            name: c.name.map(|n| n.trim_start_matches('/').to_owned()),
        }),
        pod: pod_of(&labels),
    };
    Some((Where::Pid(pid), owner))
}

/// The pod a container belongs to, from the labels the kubelet (through
/// cri-dockerd) puts on it.
fn pod_of(labels: &HashMap<String, String>) -> Option<Pod> {
    let get = |k: &str| labels.get(k).cloned();
    let pod = Pod {
        namespace: get("io.kubernetes.pod.namespace"),
        name: get("io.kubernetes.pod.name"),
        uid: get("io.kubernetes.pod.uid"),
    };
    (pod.name.is_some() || pod.uid.is_some()).then_some(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_labels_name_the_pod_and_others_none() {
        let labels: HashMap<String, String> = [
            ("io.kubernetes.pod.namespace", "shop"),
            ("io.kubernetes.pod.name", "cart-7d9f"),
            (
                "io.kubernetes.pod.uid",
                "5d3a1f2e-7c4b-4e9a-8f6d-1b2c3d4e5f60",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let p = pod_of(&labels).expect("a pod");
        assert_eq!(
            (p.namespace.as_deref(), p.name.as_deref()),
            (Some("shop"), Some("cart-7d9f"))
        );
        assert_eq!(pod_of(&HashMap::new()), None);
    }
}
