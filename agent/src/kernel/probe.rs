//! Loading the eBPF probe, attaching it to interfaces, and reading its maps.
//!
//! Programs are attached through BPF links owned by this process, so they are
//! detached when it exits, however it exits; nothing is pinned.

use std::{
    collections::HashSet,
    hash::Hash,
    net::{IpAddr, Ipv6Addr},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray},
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp,
        XdpMode, tc::TcAttachOptions,
    },
};
use tcpstate_common::{Command, Counters, CpuSlot, FlowEntry, FlowKey4, FlowKey6, command::op};

use crate::error::{Error, Result, is_permission_error};

/// The probe object built by `cargo xtask build`, embedded at compile time.
static PROBE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcpstate-probe.o"));

const XDP_PROGRAM: &str = "tcpstate_xdp";
const TC_PROGRAM: &str = "tcpstate_tc";
const TC_IN_PROGRAM: &str = "tcpstate_tc_in";
const COMMAND_PROGRAM: &str = "tcpstate_command";

/// ifindex of loopback in every namespace (only the ingress hook there: it
/// sees each loopback segment exactly once).
pub const LOOPBACK_IFINDEX: u32 = 1;

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
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            max_flows: 262_144,
            ingress: Ingress::Tc,
        }
    }
}

pub struct Probe {
    ebpf: Ebpf,
    attached: Vec<String>,
    logger: Option<ProbeLogger>,
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
    /// Loads the probe into the kernel (nothing is attached yet).
    pub fn load(opts: &ProbeOptions) -> Result<Probe> {
        if PROBE_OBJECT.is_empty() {
            return Err(Error::ProbeMissing);
        }
        let level = probe_log_level();
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("FLOWS4", opts.max_flows)
            .map_max_entries("FLOWS6", opts.max_flows)
            .override_global(aya_log::LEVEL, &level, false)
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
        for name in [XDP_PROGRAM, COMMAND_PROGRAM] {
            let prog: &mut Xdp = program(&mut ebpf, name)?.try_into()?;
            prog.load().map_err(|e| load_error(name, e))?;
        }
        for name in [TC_PROGRAM, TC_IN_PROGRAM] {
            let tc: &mut SchedClassifier = program(&mut ebpf, name)?.try_into()?;
            tc.load().map_err(|e| load_error(name, e))?;
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
            attached: Vec::new(),
            logger,
        })
    }

    /// The per-CPU counters map (for a [`crate::serve::reader::Reader`]).
    pub fn counters_map(&self) -> &MapData {
        match self.ebpf.map("PER_CPU") {
            Some(aya::maps::Map::PerCpuArray(m)) => m,
            _ => unreachable!("the probe defines PER_CPU as a per-CPU array"),
        }
    }

    /// The reader of the probe's log records (once).
    pub fn take_logger(&mut self) -> Option<ProbeLogger> {
        self.logger.take()
    }

    /// Attaches to `iface` in the calling thread's namespace: XDP for what
    /// arrives, TC egress for what leaves. On loopback XDP alone sees every
    /// segment exactly once, so no TC program is attached there.
    pub fn attach(&mut self, iface: &str, ingress: Ingress, loopback: bool) -> Result<()> {
        let xdp_mode = match ingress {
            Ingress::Tc => None,
            Ingress::XdpGeneric => Some(XdpMode::Skb),
            // Loopback has no driver XDP.
            Ingress::XdpNative if loopback => Some(XdpMode::Skb),
            Ingress::XdpNative => Some(XdpMode::Driver),
        };
        match xdp_mode {
            Some(mode) => {
                let xdp: &mut Xdp = program(&mut self.ebpf, XDP_PROGRAM)?.try_into()?;
                xdp.attach(iface, mode)
                    .map_err(|e| attach_error(XDP_PROGRAM, iface, e))?;
            }
            None => {
                let tc: &mut SchedClassifier =
                    program(&mut self.ebpf, TC_IN_PROGRAM)?.try_into()?;
                tc.attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(|e| attach_error(TC_IN_PROGRAM, iface, e))?;
            }
        }
        if !loopback {
            let tc: &mut SchedClassifier = program(&mut self.ebpf, TC_PROGRAM)?.try_into()?;
            // First in the chain, so the monitor sees every packet before any
            // other program may redirect or drop it.
            tc.attach_with_options(
                iface,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(|e| attach_error(TC_PROGRAM, iface, e))?;
        }
        self.attached.push(iface.to_owned());
        Ok(())
    }

    pub fn attached(&self) -> &[String] {
        &self.attached
    }

    /// The counters summed over CPUs.
    pub fn counters(&self) -> Result<Counters> {
        let map = self.ebpf.map("PER_CPU").expect("the probe defines PER_CPU");
        sum_counters(&PerCpuArray::try_from(map)?)
    }

    /// Makes `addrs` the set of addresses the probe treats as local (the
    /// namespace's own): adds the new ones, removes the ones that are gone.
    pub fn set_local_addresses(&mut self, addrs: &[IpAddr]) -> Result<()> {
        let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = addrs.iter().partition(|a| a.is_ipv4());
        let v4: HashSet<u32> = v4
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(u32::from_ne_bytes(a.octets())),
                _ => None,
            })
            .collect();
        let v6: HashSet<[u32; 4]> = v6
            .iter()
            .filter_map(|a| match a {
                IpAddr::V6(a) => Some(ipv6_words(a)),
                _ => None,
            })
            .collect();
        sync_set(
            self.ebpf
                .map_mut("LOCAL4")
                .expect("the probe defines LOCAL4"),
            &v4,
        )?;
        sync_set(
            self.ebpf
                .map_mut("LOCAL6")
                .expect("the probe defines LOCAL6"),
            &v6,
        )?;
        Ok(())
    }

    /// The IPv4 flow map.
    pub fn flows4(&self) -> Result<HashMap<&MapData, FlowKey4, FlowEntry>> {
        Ok(HashMap::try_from(
            self.ebpf.map("FLOWS4").expect("the probe defines FLOWS4"),
        )?)
    }

    /// The IPv6 flow map.
    pub fn flows6(&self) -> Result<HashMap<&MapData, FlowKey6, FlowEntry>> {
        Ok(HashMap::try_from(
            self.ebpf.map("FLOWS6").expect("the probe defines FLOWS6"),
        )?)
    }

    /// Every flow entry of both families (a walk of the maps: O(flows), read
    /// in batches).
    pub fn flow_entries(&self) -> Result<Vec<(FlowRef, FlowEntry)>> {
        let map = |name: &str| match self.ebpf.map(name) {
            Some(aya::maps::Map::HashMap(m)) => m,
            _ => unreachable!("the probe defines {name} as a hash map"),
        };
        let mut out: Vec<(FlowRef, FlowEntry)> =
            crate::kernel::batch::read_all::<FlowKey4, FlowEntry>(map("FLOWS4"))?
                .into_iter()
                .map(|(k, e)| (FlowRef::V4(k), e))
                .collect();
        out.extend(
            crate::kernel::batch::read_all::<FlowKey6, FlowEntry>(map("FLOWS6"))?
                .into_iter()
                .map(|(k, e)| (FlowRef::V6(k), e)),
        );
        Ok(out)
    }

    /// Capacity of each flow map (one per address family).
    pub fn max_flows(&self) -> Result<u32> {
        match self.ebpf.map("FLOWS4").expect("the probe defines FLOWS4") {
            aya::maps::Map::HashMap(m) => Ok(m.info()?.max_entries()),
            _ => unreachable!("FLOWS4 is a hash map"),
        }
    }

    /// The kernel memory a map of the probe takes, as the kernel accounts it
    /// (`memlock` in the map's fdinfo: preallocated elements included).
    pub fn map_memory(&self, name: &str) -> Result<u64> {
        use std::os::fd::{AsFd, AsRawFd};
        let fd = match self.ebpf.map(name) {
            Some(aya::maps::Map::HashMap(m)) => m.fd().as_fd().as_raw_fd(),
            Some(aya::maps::Map::PerCpuArray(m)) => m.fd().as_fd().as_raw_fd(),
            _ => {
                return Err(Error::io(
                    format!("reading map {name}"),
                    std::io::Error::other("no such hash or per-CPU map"),
                ));
            }
        };
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
            .map_err(|e| Error::io(format!("reading the fdinfo of {name}"), e))?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                Error::io(
                    format!("reading the fdinfo of {name}"),
                    std::io::Error::other("no memlock line"),
                )
            })
    }

    /// Runs a [`Command`] in the kernel; returns its outcome code
    /// (`tcpstate_common::command::outcome`).
    pub fn command(&self, cmd: &Command) -> Result<u32> {
        self.test_run(COMMAND_PROGRAM, cmd.as_bytes())
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

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    Ok(ebpf
        .program_mut(name)
        .unwrap_or_else(|| panic!("the probe defines {name}")))
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

fn attach_error(program: &str, iface: &str, e: ProgramError) -> Error {
    if is_permission_error(&e) {
        return Error::NotPermitted {
            action: format!("attaching {program} to {iface}"),
        };
    }
    let text = e.to_string();
    let hint = if program == XDP_PROGRAM && (text.contains("busy") || text.contains("exists")) {
        " (another XDP program is attached there: `ip link show` names it; detach it or leave this interface out)"
    } else if program == XDP_PROGRAM {
        " (try --ingress tc or --ingress xdp, which every interface supports)"
    } else {
        ""
    };
    Error::Attach {
        program: program.into(),
        iface: iface.into(),
        error: text,
        hint,
    }
}

/// The counters of every CPU's slot, summed, with the derived counts filled in.
pub fn sum_counters<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, CpuSlot>,
) -> Result<Counters> {
    let mut total = Counters::default();
    for cpu in array.get(&0, 0)?.iter() {
        total.accumulate(&cpu.counters);
    }
    total.derive();
    Ok(total)
}

/// A flow map key of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowRef {
    V4(FlowKey4),
    V6(FlowKey6),
}

impl FlowRef {
    /// The command that swaps this flow's word from `expect` to `new`.
    pub fn command(&self, expect: u32, new: u32) -> Command {
        let mut cmd = Command {
            op: op::SWAP,
            expect,
            new,
            ..Command::default()
        };
        match self {
            FlowRef::V4(k) => {
                cmd.family = 4;
                cmd.key4 = *k;
            }
            FlowRef::V6(k) => {
                cmd.family = 6;
                cmd.key6 = *k;
            }
        }
        cmd
    }
}

/// An IPv6 address as the probe stores it: four words in wire order.
pub fn ipv6_words(a: &Ipv6Addr) -> [u32; 4] {
    let b = a.octets();
    std::array::from_fn(|i| u32::from_ne_bytes(b[4 * i..4 * i + 4].try_into().unwrap()))
}

/// Makes the keys of a set-like hash map equal `want`.
fn sync_set<K: aya::Pod + Eq + Hash>(map: &mut aya::maps::Map, want: &HashSet<K>) -> Result<()> {
    let mut set: HashMap<&mut MapData, K, u8> = HashMap::try_from(map)?;
    let have: HashSet<K> = set.keys().filter_map(|k| k.ok()).collect();
    for gone in have.difference(want) {
        let _ = set.remove(gone);
    }
    for new in want.difference(&have) {
        set.insert(new, 1, 0)?;
    }
    Ok(())
}
