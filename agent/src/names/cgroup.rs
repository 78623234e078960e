//! What a process's cgroup path says about who runs it, when no runtime's
//! API answers: the kubelet puts every pod under a cgroup named for its UID
//! and every container under one named for its id, and Docker, containerd,
//! CRI-O and podman name their containers' cgroups the same way under both
//! cgroup drivers (cgroupfs: `/kubepods/burstable/pod<UID>/<ID>`,
//! `/docker/<ID>`; systemd: `kubepods-burstable-pod<UID_>.slice/
//! cri-containerd-<ID>.scope`, `docker-<ID>.scope`, `libpod-<ID>.scope`).

/// What one cgroup path names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FromCgroup {
    /// The pod's UID (dashes, as the Kubernetes API spells it).
    pub pod_uid: Option<String>,
    /// The container's id (64 hex digits) and the runtime its cgroup names.
    pub container: Option<(String, &'static str)>,
}

impl FromCgroup {
    pub fn is_empty(&self) -> bool {
        self.pod_uid.is_none() && self.container.is_none()
    }
}

/// Reads `/proc/PID/cgroup` (cgroup v1 lines `N:controllers:/path`, v2
/// `0::/path`): the first line that names anything.
pub fn of_text(text: &str) -> FromCgroup {
    text.lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .map(of_path)
        .find(|f| !f.is_empty())
        .unwrap_or_default()
}

/// One cgroup path.
pub fn of_path(path: &str) -> FromCgroup {
    let mut out = FromCgroup::default();
    for part in path.split('/') {
        if let Some(uid) = pod_uid(part) {
            out.pod_uid = Some(uid);
        } else if let Some(c) = container(part) {
            out.container = Some(c);
        }
    }
    out
}

/// `pod<UID>` (cgroupfs) or `kubepods-<qos>-pod<UID_>.slice` (systemd,
/// dashes written as underscores).
fn pod_uid(part: &str) -> Option<String> {
    // The last `pod`: `kubepods-...` has one before it; a UID has none.
    let at = part.rfind("pod")?;
    let rest = part[at + 3..].trim_end_matches(".slice");
    let uid = rest.replace('_', "-");
    let ok = uid.len() == 36
        && uid.chars().enumerate().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        });
    // `pod` must start the part or follow a dash (not inside a word).
    let starts = at == 0 || part.as_bytes()[at - 1] == b'-';
    (ok && starts).then_some(uid)
}

/// A container's cgroup: its 64-hex-digit id, bare (cgroupfs) or in a
/// runtime's scope (systemd).
fn container(part: &str) -> Option<(String, &'static str)> {
    const SCOPES: [(&str, &str); 5] = [
        ("docker-", "docker"),
        ("cri-containerd-", "containerd"),
        ("crio-", "cri-o"),
        ("libpod-", "podman"),
        ("containerd-", "containerd"),
    ];
    let (id, runtime) = match SCOPES.iter().find(|(p, _)| part.starts_with(p)) {
        Some((prefix, runtime)) => (part[prefix.len()..].trim_end_matches(".scope"), *runtime),
        None => (part, ""),
    };
    (id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| (id.to_owned(), runtime))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e1c0b9a8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f";
    const UID: &str = "5d3a1f2e-7c4b-4e9a-8f6d-1b2c3d4e5f60";

    #[test]
    fn kubelet_cgroupfs_paths_give_the_pod_and_the_container() {
        let f = of_text(&format!(
            "12:pids:/kubepods/burstable/pod{UID}/{ID}\n11:memory:/kubepods/burstable/pod{UID}/{ID}\n"
        ));
        assert_eq!(f.pod_uid.as_deref(), Some(UID));
        assert_eq!(f.container, Some((ID.to_owned(), "")));
    }

    #[test]
    fn kubelet_systemd_paths_give_the_pod_with_dashes() {
        let uid_ = UID.replace('-', "_");
        let f = of_text(&format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/cri-containerd-{ID}.scope\n"
        ));
        assert_eq!(f.pod_uid.as_deref(), Some(UID));
        assert_eq!(f.container, Some((ID.to_owned(), "containerd")));
        // A guaranteed pod has no QoS level in its path.
        let g = of_path(&format!(
            "/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope"
        ));
        assert_eq!(g.pod_uid.as_deref(), Some(UID));
        assert_eq!(g.container, Some((ID.to_owned(), "cri-o")));
    }

    #[test]
    fn docker_and_podman_containers_outside_kubernetes() {
        let f = of_text(&format!("4:cpu,cpuacct:/docker/{ID}\n"));
        assert_eq!(
            f,
            FromCgroup {
                pod_uid: None,
                container: Some((ID.to_owned(), ""))
            }
        );
        let s = of_path(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(s.container, Some((ID.to_owned(), "docker")));
        let p = of_path(&format!("/machine.slice/libpod-{ID}.scope/container"));
        assert_eq!(p.container, Some((ID.to_owned(), "podman")));
    }

    #[test]
    fn ordinary_processes_name_nothing() {
        for text in [
            "0::/init.scope\n",
            "0::/user.slice/user-0.slice/session-3.scope\n",
            "12:pids:/\n",
            "0::/system.slice/podman.service\n",
            "0::/system.slice/ipod-sync.service\n",
        ] {
            assert!(of_text(text).is_empty(), "{text}");
        }
    }
}
