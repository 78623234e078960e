//! Loading the eBPF probe and running its command program. Attaching is in
//! `attach.rs`, the maps in `maps.rs`.
//!
//! Programs hang on BPF links owned by this process, so they are detached
//! when it exits, however it exits; nothing is pinned.

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, ProgramArray, RingBuf},
    programs::{
        FEntry, ProgramError, RawTracePoint, SchedClassifier, TestRun, TestRunOptions, Xdp,
    },
};
use tcpstate_common::{Command, SockLayout};

use crate::{
    error::{Error, Result, is_permission_error},
    kernel::attach::Attachments,
};

/// The probe object built by `cargo xtask build`, embedded at compile time.
static PROBE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpstate-probe.o"));

pub(crate) const XDP_PROGRAM: &str = "tcpstate_xdp";
pub(crate) const TC_PROGRAM: &str = "tcpstate_tc";
pub(crate) const TC_IN_PROGRAM: &str = "tcpstate_tc_in";
const COMMAND_PROGRAM: &str = "tcpstate_command";
/// The slow path's programs, tail-called by the attached ones, and their
/// jump tables (one per program type: a tail call stays within its type).
const SLOW_PROGRAMS: [(&str, &str); 2] = [
    ("tcpstate_slow_xdp", "SLOW_XDP"),
    ("tcpstate_slow_tc", "SLOW_TC"),
];
const KERNEL_PROGRAM: &str = "tcpstate_kernel";
/// The tracepoint the kernel reports socket state changes on.
const STATE_TRACEPOINT: &str = "inet_sock_set_state";
/// At `tcp_connect()`: a connecting socket with its tuple complete.
const CONNECT_PROGRAM: &str = "tcpstate_connect";
const CONNECT_FUNCTION: &str = "tcp_connect";

/// The hook that sees what arrives on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ingress {
    /// TC ingress (tcx): the skb as the stack gets it, no copy. The default:
    /// on interfaces without native XDP it costs least (BENCHMARKS.md).
    Tc,
    /// XDP in generic (skb) mode: works everywhere, but copies every
    /// segmented or cloned skb into a linear buffer first.
    XdpGeneric,
    /// XDP in the driver (native): before any skb exists, for NICs whose
    /// driver supports it.
    XdpNative,
}

#[derive(Clone, Debug)]
pub struct ProbeOptions {
    /// Capacity of each flow map (connections tracked at once per family).
    pub max_flows: u32,
    /// The ingress hook on interfaces other than loopback.
    pub ingress: Ingress,
    /// Namespaces the probe has room for (1 for one namespace).
    pub max_netns: u32,
    /// Entries one namespace may hold in the flow maps (0: no limit).
    pub flows_per_netns: u32,
    /// Track connections that only pass through, under an observer slot
    /// of their own (`Probe::register_observer`).
    pub observe: bool,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            max_flows: 262_144,
            ingress: Ingress::Tc,
            max_netns: 1,
            flows_per_netns: 0,
            observe: false,
        }
    }
}

pub struct Probe {
    pub(crate) ebpf: Ebpf,
    /// The slow path's jump table (the probe's entries hold the programs
    /// while it is open).
    _slow: Vec<ProgramArray<MapData>>,
    /// The monitored namespaces' slots and entry programs.
    pub(crate) namespaces: crate::kernel::slots::Slots,
    pub(crate) ingress: Ingress,
    pub(crate) attached: Attachments,
    logger: Option<ProbeLogger>,
    /// The kernel reports its sockets' state changes to the probe.
    kernel_reports: bool,
    /// ...and its connects at `tcp_connect()`.
    connect_reports: bool,
}

/// The probe's aya-log records, forwarded to the agent's log.
pub type ProbeLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The most detailed level the agent's log shows for the probe's records,
/// in aya-log's numbering (error 1 ... trace 5): the probe skips the rest
/// without writing them.
fn probe_log_level() -> u8 {
    use tracing::Level;
    [
        (Level::TRACE, 5),
        (Level::DEBUG, 4),
        (Level::INFO, 3),
        (Level::WARN, 2),
        (Level::ERROR, 1),
    ]
    .into_iter()
    .find(|(level, _)| match *level {
        Level::TRACE => tracing::enabled!(target: "tcpstate_probe", Level::TRACE),
        Level::DEBUG => tracing::enabled!(target: "tcpstate_probe", Level::DEBUG),
        Level::INFO => tracing::enabled!(target: "tcpstate_probe", Level::INFO),
        Level::WARN => tracing::enabled!(target: "tcpstate_probe", Level::WARN),
        _ => tracing::enabled!(target: "tcpstate_probe", Level::ERROR),
    })
    .map_or(0, |(_, n)| n)
}

impl Probe {
    /// Loads the probe into the kernel (no interface is attached yet).
    ///
    /// With `layout` (where the kernel keeps what a report reads, and the
    /// monitored namespace), the kernel-report program is attached to the
    /// kernel's socket state changes, and the packet rules leave to it what
    /// it reports ([`tcpstate_common::Segment::KERNEL_EVENTS`]). Where it
    /// cannot be attached, the probe is loaded again without it, and says so.
    pub fn load(opts: &ProbeOptions, layout: Option<SockLayout>) -> Result<Probe> {
        if let Some(layout) = layout {
            match Probe::load_with(opts, Some(layout)) {
                Ok(p) => return Ok(p),
                Err(Error::NotPermitted { action }) => return Err(Error::NotPermitted { action }),
                Err(e) => tracing::warn!(
                    "the kernel's reports of socket state changes are not available ({e}); counting from packets alone"
                ),
            }
        }
        Probe::load_with(opts, None)
    }

    fn load_with(opts: &ProbeOptions, layout: Option<SockLayout>) -> Result<Probe> {
        if PROBE_OBJECT.is_empty() {
            return Err(Error::ProbeMissing);
        }
        let level = probe_log_level();
        let kernel_events = u8::from(layout.is_some()) * tcpstate_common::Segment::KERNEL_EVENTS;
        let layout = layout.unwrap_or_default();
        let max_netns = opts.max_netns.max(1);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("FLOWS4", opts.max_flows)
            .map_max_entries("FLOWS6", opts.max_flows)
            .map_max_entries("COUNTS", max_netns * tcpstate_common::CpuSlot::PER_NETNS)
            .map_max_entries("NETNS_FLOWS", max_netns)
            .map_max_entries("DURATIONS", max_netns)
            .map_max_entries("NETNS_PORTS", max_netns)
            .map_max_entries("NETNS_SLOTS", max_netns)
            .map_max_entries("OBSERVER", max_netns)
            .override_global("FLOWS_PER_NETNS", &opts.flows_per_netns, true)
            .override_global("OBSERVE", &u8::from(opts.observe), true)
            .override_global(aya_log::LEVEL, &level, false)
            .override_global("KERNEL_EVENTS", &kernel_events, true)
            .override_global("SOCK_LAYOUT", &layout, true)
            .load(PROBE_OBJECT)
            .map_err(|e| {
                if is_permission_error(&e) {
                    Error::NotPermitted {
                        action: "loading the eBPF probe".into(),
                    }
                } else {
                    Error::Ebpf(e)
                }
            })?;
        for name in [XDP_PROGRAM, COMMAND_PROGRAM, SLOW_PROGRAMS[0].0] {
            let prog: &mut Xdp = program(&mut ebpf, name)?.try_into()?;
            prog.load().map_err(|e| load_error(name, e))?;
        }
        for name in [TC_PROGRAM, TC_IN_PROGRAM, SLOW_PROGRAMS[1].0] {
            let tc: &mut SchedClassifier = program(&mut ebpf, name)?.try_into()?;
            tc.load().map_err(|e| load_error(name, e))?;
        }
        let mut slow = Vec::new();
        for (name, table) in SLOW_PROGRAMS {
            let mut jumps = ProgramArray::try_from(
                ebpf.take_map(table)
                    .unwrap_or_else(|| panic!("the probe defines {table}")),
            )?;
            let fd = ebpf
                .program(name)
                .unwrap_or_else(|| panic!("the probe defines {name}"))
                .fd()?;
            jumps.set(0, fd, 0)?;
            slow.push(jumps);
        }
        crate::kernel::slots::fill_entry_tables(&mut ebpf)?;
        let mut connect_reports = false;
        if kernel_events != 0 {
            let tp: &mut RawTracePoint = program(&mut ebpf, KERNEL_PROGRAM)?.try_into()?;
            tp.load().map_err(|e| load_error(KERNEL_PROGRAM, e))?;
            tp.attach(STATE_TRACEPOINT)
                .map_err(|e| trace_error(KERNEL_PROGRAM, STATE_TRACEPOINT, e))?;
            // Optional: some kernels refuse fentry programs (no BPF
            // trampolines, or a security policy). Without it, a connect whose
            // SYN never leaves (the host's own firewall drops it) is not
            // seen at all: no segment, and its state report lacks its port.
            match attach_connect(&mut ebpf) {
                Ok(()) => connect_reports = true,
                Err(e) => tracing::info!(
                    "{e}: connects whose SYN this host's own firewall drops are not counted"
                ),
            }
        }
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("the probe's log records cannot be read: {e}");
                None
            }
        };
        Ok(Probe {
            ebpf,
            _slow: slow,
            namespaces: crate::kernel::slots::Slots::new(max_netns),
            ingress: opts.ingress,
            attached: Attachments::default(),
            logger,
            kernel_reports: kernel_events != 0,
            connect_reports,
        })
    }

    /// Instructions the verifier processed for each loaded program (its
    /// cost at load, and a measure of how many paths it walks).
    pub fn verifier_counts(&self) -> Vec<(String, u32)> {
        let mut out: Vec<(String, u32)> = self
            .ebpf
            .programs()
            .filter_map(|(name, p)| {
                let n = p.info().ok()?.verified_instruction_count()?;
                Some((name.to_owned(), n))
            })
            .collect();
        out.sort();
        out
    }

    /// Whether the kernel reports its sockets' state changes to the probe.
    pub fn kernel_reports(&self) -> bool {
        self.kernel_reports
    }

    /// Reports the kernel's tracepoint skipped: it runs the program at most
    /// once at a time on a CPU, and skips (and counts) a report that comes
    /// while the program runs there (a packet's report interrupting an
    /// application's). Each is a change that only a socket-table check can
    /// catch.
    pub fn kernel_reports_missed(&self) -> Result<u64> {
        use std::os::fd::{AsFd, AsRawFd};
        if !self.kernel_reports {
            return Ok(0);
        }
        let prog = self
            .ebpf
            .program(KERNEL_PROGRAM)
            .unwrap_or_else(|| panic!("the probe defines {KERNEL_PROGRAM}"));
        let fd = prog.fd()?.as_fd().as_raw_fd();
        // SAFETY: a plain C struct of integers: all zeros is a valid value.
        let mut info: aya_obj::generated::bpf_prog_info = unsafe { std::mem::zeroed() };
        // The `info` member of `union bpf_attr`.
        #[repr(C)]
        struct InfoAttr {
            bpf_fd: u32,
            info_len: u32,
            info: u64,
        }
        let mut attr = InfoAttr {
            bpf_fd: fd as u32,
            info_len: std::mem::size_of_val(&info) as u32,
            info: (&raw mut info) as u64,
        };
        const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
        // SAFETY: the attribute points at a `bpf_prog_info` of the size given,
        // alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                &raw mut attr,
                std::mem::size_of::<InfoAttr>(),
            )
        };
        if rc != 0 {
            return Err(Error::io(
                "reading the kernel-report program's statistics",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(info.recursion_misses)
    }

    /// Whether the kernel reports connects at `tcp_connect()` (where fentry
    /// programs are allowed).
    pub fn connect_reports(&self) -> bool {
        self.connect_reports
    }

    /// The ring buffer of the probe's questions (once).
    pub fn take_asks(&mut self) -> Option<RingBuf<MapData>> {
        RingBuf::try_from(self.ebpf.take_map("ASKS")?).ok()
    }

    /// The ring buffer of the probe's notices of timed states (once).
    pub fn take_notices(&mut self) -> Option<RingBuf<MapData>> {
        RingBuf::try_from(self.ebpf.take_map("NOTICES")?).ok()
    }

    /// The per-CPU counters map (for a [`crate::serve::reader::Reader`]).
    pub fn counters_map(&self) -> &MapData {
        match self.ebpf.map("COUNTS") {
            Some(aya::maps::Map::PerCpuArray(m)) => m,
            _ => unreachable!("the probe defines COUNTS as a per-CPU array"),
        }
    }

    /// A map the probe defines, by name.
    pub(crate) fn map_data(&self, name: &str) -> &MapData {
        match self.ebpf.map(name) {
            Some(
                aya::maps::Map::PerCpuArray(m)
                | aya::maps::Map::Array(m)
                | aya::maps::Map::HashMap(m)
                | aya::maps::Map::ProgramArray(m),
            ) => m,
            _ => unreachable!("the probe defines {name}"),
        }
    }

    /// The reader of the probe's log records (once).
    pub fn take_logger(&mut self) -> Option<ProbeLogger> {
        self.logger.take()
    }

    /// Runs a [`Command`] in the kernel; returns its outcome code
    /// (`tcpstate_common::command::outcome`).
    pub fn command(&self, cmd: &Command) -> Result<u32> {
        self.test_run(COMMAND_PROGRAM, cmd.as_bytes())
    }

    /// The kernel's jiffies and CLOCK_MONOTONIC nanoseconds, read by the
    /// probe at one moment ([`op::CLOCK`](tcpstate_common::command::op::CLOCK)).
    pub fn clocks(&self) -> Result<(u64, u64)> {
        let cmd = Command {
            op: tcpstate_common::command::op::CLOCK,
            ..Command::default()
        };
        let mut out = [0u8; std::mem::size_of::<Command>()];
        let opts = TestRunOptions {
            data_in: Some(cmd.as_bytes()),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        };
        self.test_run_with(COMMAND_PROGRAM, opts)?;
        // SAFETY: `out` holds a whole `#[repr(C)]` Command, as written back.
        let back: Command = unsafe { std::ptr::read_unaligned(out.as_ptr().cast()) };
        Ok((back.jiffies(), back.changed_ns))
    }

    /// Runs the XDP program on one frame with BPF_PROG_TEST_RUN (packet tests
    /// and benchmarks); returns its verdict.
    pub fn run_xdp(&self, frame: &[u8]) -> Result<u32> {
        self.test_run(XDP_PROGRAM, frame)
    }

    /// Runs the TC program on one frame with BPF_PROG_TEST_RUN.
    pub fn run_tc(&self, frame: &[u8]) -> Result<i32> {
        Ok(self.test_run(TC_PROGRAM, frame)? as i32)
    }

    /// Runs `program` on `frame` `repeat` times; returns the kernel's mean
    /// duration per run in nanoseconds.
    pub fn time_program(&self, program: &str, frame: &[u8], repeat: u32) -> Result<f64> {
        let opts = TestRunOptions {
            data_in: Some(frame),
            repeat,
            ..TestRunOptions::new()
        };
        let res = self.test_run_with(program, opts)?;
        Ok(res.duration.as_nanos() as f64)
    }

    fn test_run(&self, name: &str, data: &[u8]) -> Result<u32> {
        let opts = TestRunOptions {
            data_in: Some(data),
            ..TestRunOptions::new()
        };
        Ok(self.test_run_with(name, opts)?.return_value)
    }

    fn test_run_with(
        &self,
        name: &str,
        opts: TestRunOptions<'_>,
    ) -> Result<aya::programs::TestRunResult> {
        let prog = self
            .ebpf
            .program(name)
            .unwrap_or_else(|| panic!("the probe defines {name}"));
        let res = match prog {
            aya::programs::Program::Xdp(p) => p.test_run(opts)?,
            aya::programs::Program::SchedClassifier(p) => p.test_run(opts)?,
            _ => unreachable!("{name} is an XDP or TC program"),
        };
        Ok(res)
    }
}

pub(crate) fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut aya::programs::Program> {
    Ok(ebpf
        .program_mut(name)
        .unwrap_or_else(|| panic!("the probe defines {name}")))
}

/// The program at `tcp_connect()` (see `probe-ebpf/src/kernel.rs`).
fn attach_connect(ebpf: &mut Ebpf) -> Result<()> {
    let btf = aya::Btf::from_sys_fs().map_err(|e| {
        Error::io(
            "reading the kernel's BTF",
            std::io::Error::other(e.to_string()),
        )
    })?;
    let connect: &mut FEntry = program(ebpf, CONNECT_PROGRAM)?.try_into()?;
    connect.load(CONNECT_FUNCTION, &btf).map_err(|e| {
        let why = match e {
            ProgramError::LoadError { io_error, .. } => io_error,
            other => std::io::Error::other(other.to_string()),
        };
        Error::io(
            format!("the kernel refuses a hook at {CONNECT_FUNCTION}() (fentry)"),
            why,
        )
    })?;
    connect
        .attach()
        .map_err(|e| trace_error(CONNECT_PROGRAM, CONNECT_FUNCTION, e))?;
    Ok(())
}

fn trace_error(program: &str, at: &str, e: ProgramError) -> Error {
    if is_permission_error(&e) {
        Error::NotPermitted {
            action: format!("attaching {program} to {at}"),
        }
    } else {
        Error::Program(e)
    }
}

fn load_error(program: &str, e: ProgramError) -> Error {
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            if matches!(
                io_error.raw_os_error(),
                Some(libc::EPERM) | Some(libc::EACCES)
            ) && verifier_log.to_string().is_empty()
            {
                return Error::NotPermitted {
                    action: format!("loading {program}"),
                };
            }
            let log = verifier_log.to_string();
            // Without CAP_PERFMON the verifier refuses pointer arithmetic
            // ("... prohibited for !root"): a missing privilege, not a bug.
            if log.contains("for !root") {
                return Error::NotPermitted {
                    action: format!("loading {program} (its verifier checks need CAP_PERFMON)"),
                };
            }
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            Error::Verifier {
                program: program.into(),
                error: io_error.to_string(),
                log: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            }
        }
        other if is_permission_error(&other) => Error::NotPermitted {
            action: format!("loading {program}"),
        },
        other => Error::Program(other),
    }
}
