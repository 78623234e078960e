//! Who a network namespace belongs to, in the names people look for: the
//! container runtime's container (id, name) and the Kubernetes pod
//! (namespace, name, UID). The runtimes' own APIs say it where their
//! sockets answer (`docker.rs`); otherwise the cgroup of a process in the
//! namespace does (`cgroup.rs`: the pod UID and the container id, no
//! names). The agent's own namespace never gets an owner: containers and
//! `hostNetwork` pods there share the host's connections, which are counted
//! once, as the host's.

pub mod cgroup;
pub mod cri;
pub mod docker;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
};

use serde::{Deserialize, Serialize};

/// A container, as its runtime names it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Container {
    /// `docker`, `containerd`, `cri-o`, `podman`, or empty when only a
    /// cgroup path named it without saying which.
    pub runtime: String,
    /// Its full id (64 hex digits).
    pub id: String,
    /// Its name (Docker's, without the leading slash), when an API said it.
    pub name: Option<String>,
}

/// A Kubernetes pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
}

/// Who a namespace belongs to, where anything says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub container: Option<Container>,
    pub pod: Option<Pod>,
}

impl Owner {
    pub fn is_empty(&self) -> bool {
        self.container.is_none() && self.pod.is_none()
    }

    /// The name a person looks for: `NAMESPACE/POD`, else the container's
    /// name, else its short id.
    pub fn display(&self) -> Option<String> {
        if let Some(Pod {
            namespace: Some(ns),
            name: Some(n),
            ..
        }) = &self.pod
        {
            return Some(format!("{ns}/{n}"));
        }
        let c = self.container.as_ref()?;
        Some(c.name.clone().unwrap_or_else(|| short_id(&c.id)))
    }

    /// What the runtime said, with what the cgroup said filling the gaps
    /// (a container started outside Kubernetes has no pod; a runtime that
    /// does not answer leaves only the cgroup).
    fn merged(runtime: Option<&Owner>, cg: &cgroup::FromCgroup) -> Owner {
        let mut out = runtime.cloned().unwrap_or_default();
        if out.container.is_none()
            && let Some((id, runtime)) = &cg.container
        {
            out.container = Some(Container {
                runtime: (*runtime).to_owned(),
                id: id.clone(),
                name: None,
            });
        }
        if let Some(uid) = &cg.pod_uid {
            let pod = out.pod.get_or_insert_with(Pod::default);
            pod.uid.get_or_insert_with(|| uid.clone());
        }
        out
    }
}

/// Docker's 12-digit short id.
pub fn short_id(id: &str) -> String {
    id.chars().take(12).collect()
}

/// How a runtime points at a container's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Where {
    /// The pid of a process in it (the host's look knows which namespace
    /// each process is in, so the watchers need not read /proc).
    Pid(u32),
    /// The namespace's inode itself, from a bind mount the runtime named
    /// (a CRI sandbox's netns path) when it gave no pid.
    Inode(u64),
}

/// What the runtimes' watchers last said: for each runtime (by the socket it
/// answers on), its running containers and where their namespaces are.
#[derive(Clone, Default)]
pub struct Names {
    by_runtime: Arc<Mutex<BTreeMap<String, HashMap<Where, Owner>>>>,
}

impl Names {
    /// A runtime's whole list of running containers, replacing its last.
    pub fn set(&self, runtime: &str, found: HashMap<Where, Owner>) {
        self.by_runtime
            .lock()
            .expect("names lock")
            .insert(runtime.to_owned(), found);
    }

    /// A runtime that stopped answering: what it said is no longer known.
    pub fn forget(&self, runtime: &str) {
        self.by_runtime.lock().expect("names lock").remove(runtime);
    }

    /// The owners of namespaces, by inode, for the runtimes' containers:
    /// `inode_of` says which namespace a pid is in. Where two runtimes
    /// name one namespace (a pod's sandbox seen through both Docker and
    /// cri-dockerd), the first in the runtimes' order wins.
    pub fn by_inode(&self, inode_of: impl Fn(u32) -> Option<u64>) -> HashMap<u64, Owner> {
        let all = self.by_runtime.lock().expect("names lock");
        let mut out = HashMap::new();
        for (at, owner) in all.values().flatten() {
            let inode = match *at {
                Where::Pid(pid) => inode_of(pid),
                Where::Inode(inode) => Some(inode),
            };
            if let Some(inode) = inode {
                out.entry(inode).or_insert_with(|| owner.clone());
            }
        }
        out
    }

    /// Who namespace `inode` belongs to: the runtimes' word (`runtimes`,
    /// from [`Names::by_inode`]) merged with its process's cgroup. Nobody
    /// owns `host`, the agent's own namespace.
    pub fn owner(
        runtimes: &HashMap<u64, Owner>,
        inode: u64,
        host: Option<u64>,
        cg: &cgroup::FromCgroup,
    ) -> Owner {
        if Some(inode) == host {
            return Owner::default();
        }
        Owner::merged(runtimes.get(&inode), cg)
    }
}

/// The cgroup of process `pid`, as [`cgroup::of_text`] reads it.
pub fn cgroup_of(pid: u32) -> cgroup::FromCgroup {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|t| cgroup::of_text(&t))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e1c0b9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";

    fn web() -> Owner {
        Owner {
            container: Some(Container {
                runtime: "docker".into(),
                id: ID.into(),
                name: Some("web".into()),
            }),
            pod: None,
        }
    }

    #[test]
    fn a_runtimes_containers_are_matched_to_namespaces_by_pid() {
        let names = Names::default();
        names.set("docker", HashMap::from([(Where::Pid(4242), web())]));
        let by = names.by_inode(|pid| (pid == 4242).then_some(4026532300));
        assert_eq!(by.get(&4026532300), Some(&web()));
        let cg = cgroup::FromCgroup::default();
        assert_eq!(Names::owner(&by, 4026532300, Some(4026531840), &cg), web());
        assert_eq!(web().display().as_deref(), Some("web"));
        names.forget("docker");
        assert!(names.by_inode(|_| Some(4026532300)).is_empty());
    }

    #[test]
    fn the_host_namespace_has_no_owner_even_when_a_container_shares_it() {
        let by = HashMap::from([(4026531840, web())]);
        let cg = cgroup::FromCgroup {
            pod_uid: Some("5d3a1f2e-7c4b-4e9a-8f6d-1b2c3d4e5f60".into()),
            container: None,
        };
        assert!(Names::owner(&by, 4026531840, Some(4026531840), &cg).is_empty());
    }

    #[test]
    fn the_cgroup_fills_what_no_runtime_said() {
        let cg = cgroup::FromCgroup {
            pod_uid: Some("5d3a1f2e-7c4b-4e9a-8f6d-1b2c3d4e5f60".into()),
            container: Some((ID.into(), "containerd")),
        };
        let o = Names::owner(&HashMap::new(), 4026532300, None, &cg);
        assert_eq!(
            o.container.as_ref().map(|c| c.runtime.as_str()),
            Some("containerd")
        );
        assert_eq!(
            o.pod.as_ref().and_then(|p| p.uid.as_deref()),
            Some("5d3a1f2e-7c4b-4e9a-8f6d-1b2c3d4e5f60")
        );
        // No pod name: the container's short id is what there is to show.
        assert_eq!(o.display().as_deref(), Some(&ID[..12]));
        // The runtime's word wins, the cgroup adds the pod UID.
        let by = HashMap::from([(4026532300, web())]);
        let o = Names::owner(&by, 4026532300, None, &cg);
        assert_eq!(o.container, web().container);
        assert!(o.pod.is_some());
    }
}
