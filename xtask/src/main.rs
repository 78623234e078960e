//! `cargo xtask`: set up the toolchain, build the probe and the agent, run,
//! test and benchmark.

mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tcpstate_common::TcpState;

#[derive(Parser)]
#[command(about = "tcpstate's build and test tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing: rust-src for nightly, a bpf-linker on nightly's LLVM, test packages.
    Setup,
    /// Build the probe and the agent (target/release/tcpstate).
    Build,
    /// Build, then run the agent on this host's interfaces with the live view
    /// (on a terminal; extra arguments go to `tcpstate run`).
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: unit tests, probe packet tests, namespace integration tests.
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Per-packet cost against reference programs, kernel memory per flow,
    /// bulk throughput against no probe and nf_conntrack, the time to read
    /// the counts against ss, netstat and a netlink dump (target/bench/*.json).
    Bench,
    /// rustfmt check and clippy -D warnings, on the host crates and on the probe.
    Lint,
    /// The long accuracy scenarios; prints and writes target/accuracy/report.md.
    Accuracy,
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    let root = workspace_root();
    match task {
        Task::Setup => setup::setup().map(|_| ()),
        Task::Build => {
            let probe = build_probe(&root)?;
            cargo(&root, &probe, &["build", "--release", "-p", "tcpstate"])?;
            println!("built {}", root.join("target/release/tcpstate").display());
            Ok(())
        }
        Task::Run { args } => {
            let probe = build_probe(&root)?;
            cargo(&root, &probe, &["build", "--release", "-p", "tcpstate"])?;
            let mut cmd = Command::new(root.join("target/release/tcpstate"));
            cmd.arg("run");
            let chose = args.iter().any(|a| a == "--quiet" || a == "--top");
            if !chose && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                cmd.arg("--top");
            }
            cmd.args(&args);
            status(&mut cmd)
        }
        Task::Test { filter } => {
            let probe = build_probe(&root)?;
            // default-members: the host crates (the probe crate only builds for BPF).
            let mut args = vec!["test"];
            if let Some(f) = &filter {
                args.push(f);
            }
            // Namespace tests attach programs and make interfaces: one at a time.
            args.extend(["--", "--include-ignored", "--test-threads=1"]);
            cargo(&root, &probe, &args)
        }
        Task::Lint => {
            let tools = setup::setup()?;
            setup::ensure_nightly_component("rustfmt")?;
            setup::ensure_nightly_component("clippy")?;
            // The project's rustfmt.toml uses options only nightly rustfmt has.
            status(
                Command::new("cargo")
                    .current_dir(&root)
                    .args(["+nightly", "fmt", "--all", "--check"])
                    .env_remove("RUSTUP_TOOLCHAIN"),
            )
            .context("formatting differs: run `cargo +nightly fmt --all`")?;
            status(Command::new("cargo").current_dir(&root).args([
                "clippy",
                "--all-targets",
                "--all-features",
                "--",
                "-D",
                "warnings",
            ]))?;
            let mut probe = probe_cargo(&root, &tools, "clippy");
            probe.args(["--", "-D", "warnings"]);
            status(&mut probe)
        }
        Task::Accuracy => {
            let probe = build_probe(&root)?;
            let dir = root.join("target/accuracy");
            let _ = std::fs::remove_dir_all(&dir);
            let run = cargo(
                &root,
                &probe,
                &[
                    "test",
                    "-p",
                    "tcpstate",
                    "--features",
                    "accuracy",
                    "--test",
                    "accuracy",
                    "--",
                    "--ignored",
                    "--test-threads=1",
                    "--nocapture",
                ],
            );
            // The report covers what ran, also when a scenario failed.
            let report = accuracy_report(&dir)?;
            print!("{report}");
            std::fs::write(dir.join("report.md"), &report)?;
            run
        }
        Task::Bench => {
            let probe = build_probe(&root)?;
            // One at a time, in this order: the readers bench ends by closing a
            // million connections, which the kernel tears down for a while
            // after, so it runs last.
            for bench in ["perpacket", "throughput", "readers"] {
                cargo(
                    &root,
                    &probe,
                    &["bench", "-p", "tcpstate", "--bench", bench],
                )?;
            }
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// A nightly cargo command (`build`, `clippy`) on the probe crate for the BPF target.
fn probe_cargo(root: &Path, tools: &setup::Tools, verb: &str) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args(["+nightly", verb, "--release", "-p", "tcpstate-probe"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(root.join("target/probe"))
        // cpu v3 gives BPF_CMPXCHG; --btf keeps type information for the
        // verifier's log and bpftool.
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            "-C target-cpu=v3 -C link-arg=--btf",
        )
        // Debug info for every crate, compiler_builtins included: the BTF
        // func_info must describe each subprogram (memset and friends too).
        .env("CARGO_PROFILE_RELEASE_DEBUG", "2")
        .env("PATH", tools.path_with_linker())
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS");
    cmd
}

/// Builds the probe crate for the BPF target; returns the object's path.
fn build_probe(root: &Path) -> Result<PathBuf> {
    let tools = setup::setup()?;
    status(&mut probe_cargo(root, &tools, "build")).context("building the probe")?;
    let obj = root.join("target/probe/bpfel-unknown-none/release/tcpstate-probe");
    if !obj.exists() {
        bail!("the probe build finished but {} is missing", obj.display());
    }
    Ok(obj)
}

/// Runs a host cargo command with the probe object embedded in the agent.
fn cargo(root: &Path, probe: &Path, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args(args)
        .env("TCPSTATE_PROBE_OBJ", probe);
    let refs = probe.with_file_name("tcpstate-bench-refs");
    if refs.exists() {
        cmd.env("TCPSTATE_BENCH_REFS_OBJ", refs);
    }
    status(&mut cmd)
}

fn status(cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{:?} failed ({st})", cmd.get_program());
    }
    Ok(())
}

/// A markdown table from target/accuracy/*.json: scenario x state,
/// tcpstate/ss, with the settle time.
fn accuracy_report(dir: &Path) -> Result<String> {
    let mut rows: Vec<serde_json::Value> = Vec::new();
    for entry in
        std::fs::read_dir(dir).with_context(|| format!("no results in {}", dir.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            rows.push(serde_json::from_str(&std::fs::read_to_string(&path)?)?);
        }
    }
    rows.sort_by_key(|r| r["scenario"].as_str().unwrap_or_default().to_owned());
    // The states in the order `tcpstate count` prints them.
    let states = TcpState::REPORTED.map(TcpState::name);
    let mut out = String::from("| scenario | settle (s) |");
    for s in states {
        out += &format!(" {s} |");
    }
    out += "\n|---|---|";
    out += &"---|".repeat(states.len());
    out += "\n";
    for r in &rows {
        out += &format!(
            "| {} | {} |",
            r["scenario"].as_str().unwrap_or("?"),
            r["settle_s"]
        );
        for s in states {
            let pair = &r["states"][s];
            let (a, b) = (&pair[0], &pair[1]);
            out += &if a == b {
                format!(" {a} |")
            } else {
                format!(" **{a} / {b}** |")
            };
        }
        out += "\n";
    }
    out += "\nCells are tcpstate's count; a bold cell is tcpstate / ss where they differ.\n\n";
    for r in &rows {
        out += &format!(
            "- {}: {}\n",
            r["scenario"].as_str().unwrap_or("?"),
            r["extra"]
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accuracy_report_marks_differences_and_keeps_state_order() {
        let dir = std::env::temp_dir().join(format!("tcpstate-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut states = serde_json::Map::new();
        for s in TcpState::REPORTED {
            states.insert(s.name().into(), serde_json::json!([0, 0]));
        }
        states.insert("TIME_WAIT".into(), serde_json::json!([5, 7]));
        let row =
            serde_json::json!({"scenario": "x", "settle_s": 0.5, "states": states, "extra": {}});
        std::fs::write(dir.join("x.json"), row.to_string()).unwrap();
        let report = accuracy_report(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let header = report.lines().next().unwrap();
        assert!(header.find("LISTEN").unwrap() < header.find("CLOSE |").unwrap());
        let line = report.lines().find(|l| l.starts_with("| x |")).unwrap();
        assert!(line.contains("**5 / 7**"), "{line}");
        assert_eq!(line.matches(" 0 |").count(), 10, "{line}");
    }
}
