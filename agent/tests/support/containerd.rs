//! A private containerd with its CRI plugin, for the tests: its own root,
//! state and socket under a temporary folder, a CNI configuration that
//! gives each pod a point-to-point veth (no bridge, no firewall rule),
//! and a sandbox ("pause") image imported from a root filesystem holding
//! busybox-static, since no registry is reachable. Pods are made through
//! the CRI, as the kubelet makes them. Dropping it removes every pod (their
//! network namespaces with them) and stops what it started.

use std::{
    collections::HashMap,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_cri::v1::{
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StopPodSandboxRequest, runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::Channel;

use super::unique;

/// The sandbox image, as the CRI plugin is told to use it.
const PAUSE: &str = "tcpstate-test-pause:1";

/// Folders containerd 1.6 makes outside its configured root whatever it
/// is told (the shims' sockets, the CNI library's cache), removed on drop
/// when the test made them and they are empty.
const OUTSIDE: [&str; 4] = [
    "/run/containerd/s",
    "/run/containerd",
    "/var/lib/cni/results",
    "/var/lib/cni",
];

pub struct Containerd {
    child: Option<Child>,
    root: PathBuf,
    /// Which of [`OUTSIDE`] were not there before.
    made: Vec<&'static str>,
    /// The pods' cgroup parent, under every hierarchy.
    cgroup: String,
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
    pods: Vec<String>,
}

/// A pod's sandbox, as the CRI reported it.
pub struct Sandbox {
    pub id: String,
    /// The sandbox process (its namespace: /proc/PID/ns/net).
    pub pid: u32,
}

impl Sandbox {
    /// Runs `f` on a thread inside the pod's network namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        super::run_in(&format!("/proc/{}/ns/net", self.pid), f)
    }
}

fn config(root: &Path) -> String {
    let out = Command::new("containerd")
        .args(["config", "default"])
        .output()
        .expect("containerd (apt-get install containerd)");
    assert!(out.status.success(), "containerd config default");
    let at = |p: &str| root.join(p).display().to_string();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let key = l.trim_start().split(" = ").next().unwrap_or("");
            let set = |v: String| format!("{} = \"{v}\"", l.split(" = ").next().unwrap());
            match key {
                "root" if !l.starts_with(' ') => set(at("root")),
                "state" if !l.starts_with(' ') => set(at("state")),
                "address" if l.contains("containerd.sock") => set(at("containerd.sock")),
                "sandbox_image" => set(PAUSE.into()),
                "bin_dir" => set("/usr/lib/cni".into()),
                // A sandbox's -998 needs CAP_SYS_RESOURCE, which is not in
                // this VM's bounding set even for root: capped at ours.
                "restrict_oom_score_adj" => format!("{} = true", l.split(" = ").next().unwrap()),
                "conf_dir" => set(at("net.d")),
                // runc's state beside the rest, not in the host's
                // /run/containerd/runc.
                "Root" => set(at("runc")),
                _ => l.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

impl Containerd {
    pub fn start() -> Containerd {
        let made = OUTSIDE
            .into_iter()
            .filter(|p| !Path::new(p).exists())
            .collect();
        let root = std::env::temp_dir().join(unique("tsctd"));
        std::fs::create_dir_all(root.join("net.d")).unwrap();
        // containerd wants an eth0 with an address: `ptp` gives each pod a
        // veth to the host with an address from a private range (no bridge,
        // no masquerade, no firewall rule; removed with the pod), and the
        // addresses are kept under the test's folder.
        let cni = format!(
            r#"{{"cniVersion":"0.4.0","name":"tcpstate-ptp","plugins":[{{"type":"ptp","ipMasq":false,"ipam":{{"type":"host-local","subnet":"10.254.77.0/24","dataDir":"{}"}}}},{{"type":"loopback"}}]}}"#,
            root.join("cni").display()
        );
        std::fs::write(root.join("net.d/10-tcpstate.conflist"), cni).unwrap();
        std::fs::write(root.join("config.toml"), config(&root)).unwrap();
        let log = File::create(root.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(root.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let socket = root.join("containerd.sock");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start within 30 s: {}",
                std::fs::read_to_string(root.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let client = rt.block_on(connect(&socket));
        let mut c = Containerd {
            child: Some(child),
            cgroup: format!("/{}", root.file_name().unwrap().to_string_lossy()),
            root,
            made,
            rt,
            client,
            pods: Vec::new(),
        };
        c.import_pause();
        c
    }

    /// The last lines containerd logged, for a failure's message.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.root.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// The CRI socket (what `run --cri-socket` takes).
    pub fn socket(&self) -> PathBuf {
        self.root.join("containerd.sock")
    }

    /// The sandbox image as `docker save` lays it out (a layer tar, its
    /// config naming the layer's digest, a manifest), which `ctr images
    /// import` reads; its process sleeps, as pause does.
    fn import_pause(&mut self) {
        let dir = self.root.join("image");
        let rootfs = dir.join("rootfs/bin");
        std::fs::create_dir_all(&rootfs).unwrap();
        std::fs::copy("/usr/bin/busybox", rootfs.join("busybox")).expect("busybox-static");
        std::os::unix::fs::symlink("busybox", rootfs.join("sleep")).unwrap();
        let out = dir.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let layer = out.join("layer.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(dir.join("rootfs"))
            .arg("-cf")
            .arg(&layer)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success(), "tar of the image's root");
        let digest = |p: &Path| {
            let o = Command::new("sha256sum").arg(p).output().unwrap();
            String::from_utf8_lossy(&o.stdout)[..64].to_owned()
        };
        let l = digest(&layer);
        let cfg = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/bin/sleep","2147483647"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{l}"]}}}}"#
        );
        std::fs::write(out.join("config.json"), &cfg).unwrap();
        let c = digest(&out.join("config.json"));
        std::fs::rename(out.join("config.json"), out.join(format!("{c}.json"))).unwrap();
        std::fs::write(
            out.join("manifest.json"),
            format!(r#"[{{"Config":"{c}.json","RepoTags":["{PAUSE}"],"Layers":["layer.tar"]}}]"#),
        )
        .unwrap();
        let archive = dir.join("pause.tar");
        let st = Command::new("tar")
            .arg("-C")
            .arg(&out)
            .arg("-cf")
            .arg(&archive)
            .arg(".")
            .status()
            .unwrap();
        assert!(st.success(), "tar of the image");
        let o = Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&archive)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "ctr images import: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Runs a pod sandbox as the kubelet would for pod `namespace/name`
    /// (`attempt` counts its sandboxes: a recreated one is the next), in a
    /// network namespace of its own or, with `host_network`, the node's.
    pub fn run_pod(
        &mut self,
        namespace: &str,
        name: &str,
        uid: &str,
        attempt: u32,
        host_network: bool,
    ) -> Sandbox {
        let network = if host_network {
            NamespaceMode::Node
        } else {
            NamespaceMode::Pod
        };
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: uid.into(),
                namespace: namespace.into(),
                attempt,
            }),
            // The node's own with hostNetwork (no UTS namespace of its own).
            hostname: if host_network {
                String::new()
            } else {
                name.into()
            },
            log_directory: self.root.join("logs").display().to_string(),
            labels: HashMap::from([("tcpstate-test".into(), "1".into())]),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup.clone(),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: network.into(),
                        pid: NamespaceMode::Container.into(),
                        ipc: NamespaceMode::Pod.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self
            .rt
            .block_on(self.client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            }))
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", self.log_tail()))
            .into_inner()
            .pod_sandbox_id;
        self.pods.push(id.clone());
        let info = self
            .rt
            .block_on(self.client.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.clone(),
                verbose: true,
            }))
            .expect("PodSandboxStatus")
            .into_inner()
            .info;
        let v: serde_json::Value = serde_json::from_str(&info["info"]).expect("verbose info");
        let pid = v["pid"].as_u64().expect("the sandbox's pid") as u32;
        Sandbox { id, pid }
    }

    /// Stops and removes a pod's sandbox, as the kubelet does when the pod
    /// is deleted (or before it makes the next sandbox).
    pub fn remove_pod(&mut self, id: &str) {
        if let Err(e) = self.stop_and_remove(id) {
            panic!("removing pod {id}: {e}");
        }
        self.pods.retain(|p| p != id);
    }

    fn stop_and_remove(&mut self, id: &str) -> Result<(), tonic::Status> {
        let client = &mut self.client;
        let pod_sandbox_id = id.to_owned();
        self.rt.block_on(async {
            client
                .stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: pod_sandbox_id.clone(),
                })
                .await?;
            client
                .remove_pod_sandbox(RemovePodSandboxRequest { pod_sandbox_id })
                .await?;
            Ok(())
        })
    }
}

async fn connect(socket: &Path) -> RuntimeServiceClient<Channel> {
    let channel = tcpstate::names::cri::connect(socket)
        .await
        .expect("connect to containerd's CRI");
    RuntimeServiceClient::new(channel)
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in std::mem::take(&mut self.pods) {
            let _ = self.stop_and_remove(&id);
        }
        if let Some(c) = self.child.take() {
            super::stop_daemon(c, Duration::from_secs(20));
        }
        // Shims of sandboxes that would not stop.
        super::remove_daemon_root(&self.root, &self.root);
        for dir in &self.made {
            let _ = std::fs::remove_dir(dir);
        }
        // cgroup v2's one hierarchy, then v1's each.
        let _ = std::fs::remove_dir(format!("/sys/fs/cgroup{}", self.cgroup));
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                let _ = std::fs::remove_dir(format!("{}{}", h.path().display(), self.cgroup));
            }
        }
    }
}
