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
            // The scenarios of exactness at every moment, sampled against ss:
            // they record themselves under target/accuracy/exact/.
            let exact = cargo(
                &root,
                &probe,
                &[
                    "test",
                    "-p",
                    "tcpstate",
                    "--test",
                    "exact",
                    "--",
                    "--ignored",
                    "--test-threads=1",
                ],
            );
            // The report covers what ran, also when a scenario failed.
            let report = accuracy_report(&dir)?;
            print!("{report}");
            std::fs::write(dir.join("report.md"), &report)?;
            run.and(exact)
        }
        Task::Bench => {
            let probe = build_probe(&root)?;
            setup::ensure_bench_packages();
            // One at a time, in this order: the readers bench ends by closing a
            // million connections, which the kernel tears down for a while
            // after, so it runs last.
            for bench in [
                "perpacket",
                "walk",
                "replay",
                "throughput",
                "namespaces",
                "readers",
            ] {
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

/// "n of m" quiet samples equal, or "—" for a scenario without them.
fn held(quiet: &serde_json::Value) -> String {
    match (quiet["equal"].as_u64(), quiet["samples"].as_u64()) {
        (Some(equal), Some(taken)) => format!("{equal} of {taken}"),
        _ => "—".to_owned(),
    }
}

/// Markdown tables from target/accuracy: the long scenarios (*.json):
/// scenario x state, tcpstate/ss, with the settle time and the longest
/// difference from ss while it ran; and the exactness scenarios (exact/),
/// with the share of samples equal to ss and the longest difference.
fn accuracy_report(dir: &Path) -> Result<String> {
    let read = |dir: &Path| -> Result<Vec<serde_json::Value>> {
        let mut rows = Vec::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(rows);
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                rows.push(serde_json::from_str(&std::fs::read_to_string(&path)?)?);
            }
        }
        Ok(rows)
    };
    let mut rows = read(dir)?;
    if rows.is_empty() && !dir.join("exact").exists() {
        bail!("no results in {}", dir.display());
    }
    rows.sort_by_key(|r| r["scenario"].as_str().unwrap_or_default().to_owned());
    // The states in the order `tcpstate count` prints them.
    let states = TcpState::REPORTED.map(TcpState::name);
    let mut out = String::from(
        "| scenario | settle (s) | longest difference (s) | equal to ss | widest difference | equal while held |",
    );
    for s in states {
        out += &format!(" {s} |");
    }
    out += "\n|---|---|---|---|---|---|";
    out += &"---|".repeat(states.len());
    out += "\n";
    for r in &rows {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} |",
            r["scenario"].as_str().unwrap_or("?"),
            r["settle_s"],
            r["longest_s"],
            share(r),
            r["widest"].as_str().unwrap_or("?"),
            held(&r["quiet"]),
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
    out += "\nCells are tcpstate's count at the end; a bold cell is tcpstate / ss where they differ. \
            The longest difference is the longest stretch of samples (every 100 ms, or as fast as \
            ss answers) in which ss's counts fell outside tcpstate's before and after it; the \
            widest difference is, per state, the farthest ss's count ever fell outside them. \
            Equal while held: of the samples taken with the scenario's traffic held still for \
            20 ms (every fifth, where the scenario lets the sampler hold it), how many were \
            equal.\n\n";
    for r in &rows {
        out += &format!(
            "- {}: {}\n",
            r["scenario"].as_str().unwrap_or("?"),
            r["extra"]
        );
    }
    let mut exact = read(&dir.join("exact"))?;
    if !exact.is_empty() {
        exact.sort_by_key(|r| {
            (
                r["scenario"].as_str().unwrap_or_default().to_owned(),
                r["family"].as_str().unwrap_or_default().to_owned(),
                r["reconcile"].as_bool(),
            )
        });
        out += "\n| exactness scenario | family | reconciliation | samples | equal to ss | longest difference (s) | widest difference |\n";
        out += "|---|---|---|---|---|---|---|\n";
        for r in &exact {
            let longest = r["longest_s"].as_f64().unwrap_or(f64::NAN);
            let mark = if longest > 1.0 { " **over 1 s**" } else { "" };
            out += &format!(
                "| {} | {} | {} | {} | {} | {:.2}{mark} | {} |\n",
                r["scenario"].as_str().unwrap_or("?"),
                r["family"].as_str().unwrap_or("?"),
                if r["reconcile"].as_bool() == Some(true) {
                    "every 2 s"
                } else {
                    "off"
                },
                r["samples"],
                share(r),
                longest,
                r["widest"].as_str().unwrap_or("?"),
            );
        }
    }
    Ok(out)
}

/// A row's share of samples equal to ss, as a percentage.
fn share(r: &serde_json::Value) -> String {
    match r["equal_share"].as_f64() {
        Some(v) => format!("{:.1} %", 100.0 * v),
        None => "?".to_owned(),
    }
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
        let row = serde_json::json!({"scenario": "x", "settle_s": 0.5, "longest_s": 0.3, "states": states, "extra": {},
            "quiet": {"samples": 12, "equal": 11}});
        std::fs::write(dir.join("x.json"), row.to_string()).unwrap();
        let report = accuracy_report(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let header = report.lines().next().unwrap();
        assert!(header.find("LISTEN").unwrap() < header.find("CLOSE |").unwrap());
        let line = report.lines().find(|l| l.starts_with("| x |")).unwrap();
        assert!(line.contains("**5 / 7**"), "{line}");
        assert!(line.contains("| 0.5 | 0.3 |"), "{line}");
        assert_eq!(line.matches(" 0 |").count(), 10, "{line}");
        assert!(line.contains("| 11 of 12 |"), "{line}");
    }
}
