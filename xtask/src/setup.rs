//! `cargo xtask setup`: installs what the build and the tests need, only
//! where it is missing. Nothing of one machine is hard-coded: names come from
//! the installed nightly toolchain.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

/// Where the tools live once set up.
pub struct Tools {
    /// Folder holding the bpf-linker built against nightly's libLLVM.
    pub linker_bin: PathBuf,
}

impl Tools {
    /// PATH with the project's bpf-linker first.
    pub fn path_with_linker(&self) -> OsString {
        let mut paths = vec![self.linker_bin.clone()];
        if let Some(p) = std::env::var_os("PATH") {
            paths.extend(std::env::split_paths(&p));
        }
        std::env::join_paths(paths).expect("PATH entries without ':'")
    }
}

pub fn setup() -> Result<Tools> {
    let nightly = nightly_sysroot()?;
    ensure_rust_src()?;
    let linker_bin = ensure_bpf_linker(&nightly)?;
    ensure_packages()?;
    Ok(Tools { linker_bin })
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]).env_remove("RUSTUP_TOOLCHAIN"))
        .context("the probe needs a nightly Rust toolchain: install it with `rustup toolchain install nightly`")?;
    Ok(PathBuf::from(out.trim()))
}

fn ensure_rust_src() -> Result<()> {
    ensure_nightly_component("rust-src")
}

/// Adds a rustup component to the nightly toolchain unless it is there.
pub fn ensure_nightly_component(name: &str) -> Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list"]).args([
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.trim().starts_with(name)) {
        return Ok(());
    }
    eprintln!("xtask: adding {name} to the nightly toolchain");
    let st = Command::new("rustup")
        .args(["component", "add", name, "--toolchain", "nightly"])
        .status()?;
    if !st.success() {
        bail!("could not add {name}: run `rustup component add {name} --toolchain nightly`");
    }
    Ok(())
}

/// The libLLVM shared library that ships with nightly, e.g.
/// `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn nightly_libllvm(sysroot: &Path) -> Result<String> {
    let lib = sysroot.join("lib");
    let mut names: Vec<String> = std::fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| {
            n.starts_with("libLLVM.so.") || (n.starts_with("libLLVM-") && n.ends_with(".so"))
        })
        .collect();
    names.sort();
    names.pop().with_context(|| {
        format!(
            "the nightly toolchain has no libLLVM shared library in {}",
            lib.display()
        )
    })
}

fn llvm_major() -> Result<String> {
    let v = output(
        Command::new("rustc")
            .args(["+nightly", "-vV"])
            .env_remove("RUSTUP_TOOLCHAIN"),
    )?;
    v.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_owned)
        .context("rustc +nightly -vV names no LLVM version")
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("tcpstate")
}

/// A bpf-linker linked against nightly's own libLLVM, installed once per
/// libLLVM version under the cache folder (bpf-linker keeps an rpath to it).
fn ensure_bpf_linker(sysroot: &Path) -> Result<PathBuf> {
    let lib = nightly_libllvm(sysroot)?;
    let home = cache_dir().join("bpf-linker").join(&lib);
    let bin = home.join("bin");
    if bin.join("bpf-linker").exists() {
        return Ok(bin);
    }
    let major = llvm_major()?;
    let prefix = home.join("llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    let target = sysroot.join("lib").join(&lib);
    for link in ["libLLVM.so".to_owned(), lib.clone()] {
        let path = prefix_lib.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(&target, &path)
            .with_context(|| format!("linking {}", path.display()))?;
    }
    eprintln!("xtask: building bpf-linker against {lib} (LLVM {major}); about a minute, once");
    let st = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .arg("--root")
        .arg(&home)
        .env("LLVM_PREFIX", &prefix)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .status()?;
    if !st.success() || !bin.join("bpf-linker").exists() {
        bail!(
            "could not build bpf-linker against {lib}; bpf-linker 0.13 supports llvm-21 to llvm-23 (this nightly has LLVM {major})"
        );
    }
    Ok(bin)
}

/// Debian packages the tests drive: `ss` and `ip`, `nft` to lose packets on
/// purpose, `tmux` to drive the live view as a person would, `promtool` and a
/// Prometheus server to check and scrape the metrics, `iperf3` for the
/// throughput benchmark, tcpdump to record captures for replay, Docker for the containers test (installed, never
/// started as a service: the test runs a private daemon), openssl, curl,
/// setpriv, groupadd and htpasswd (bcrypt) for the exposed agent's tests;
/// podman for its Docker-compatible API service;
/// protoc, which the CRI client's build compiles the CRI's proto with, and
/// containerd with the CNI plugins for the CRI test's private runtime.
fn ensure_packages() -> Result<()> {
    let wanted = [
        ("protoc", "protobuf-compiler"),
        ("containerd", "containerd"),
        ("ctr", "containerd"),
        // A file, not a command: the CNI plugin the CRI test gives pods their veth with.
        ("/usr/lib/cni/ptp", "containernetworking-plugins"),
        ("ss", "iproute2"),
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("tmux", "tmux"),
        ("promtool", "prometheus"),
        ("prometheus", "prometheus"),
        ("iperf3", "iperf3"),
        // Recording the captures `tcpstate replay` is tested on.
        ("tcpdump", "tcpdump"),
        // A real container runtime under `run --all-namespaces`, and the
        // static busybox its test image is made of (no registry here).
        ("dockerd", "docker.io"),
        ("podman", "podman"),
        ("busybox", "busybox-static"),
        ("iptables-save", "iptables"),
        // The exposed agent: certificates, HTTPS with basic auth, a user
        // that is not root, a group made for the test.
        ("openssl", "openssl"),
        ("curl", "curl"),
        ("setpriv", "util-linux"),
        ("groupadd", "passwd"),
        ("htpasswd", "apache2-utils"),
    ];
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if !nix_is_root() {
        bail!(
            "the tests need the packages {}: install them with `sudo apt-get install {}`",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let _ = Command::new("apt-get").arg("update").status();
    let st = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !st.success() {
        bail!("apt-get could not install {}", missing.join(" "));
    }
    Ok(())
}

fn on_path(cmd: &str) -> bool {
    if cmd.starts_with('/') {
        return Path::new(cmd).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
        || Path::new("/usr/sbin").join(cmd).is_file()
        || Path::new("/sbin").join(cmd).is_file()
}

/// What only the benchmarks use: tshark, which the replay bench races
/// (`tshark -q -z conv,tcp`). Best effort: without it that bench times
/// replay alone and says so.
pub fn ensure_bench_packages() {
    if on_path("tshark") || !nix_is_root() {
        return;
    }
    eprintln!("xtask: installing tshark for the replay benchmark");
    let _ = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "tshark"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
