//! Reading and writing the probe's maps: the per-state counters (summed over
//! CPUs and slots), the flow maps, the namespace's local addresses.

use std::{
    collections::HashSet,
    hash::Hash,
    net::{IpAddr, Ipv6Addr},
};

use aya::maps::{HashMap, MapData, PerCpuArray};
use tcpstate_common::{
    Command, Counters, CpuSlot, Durations, FlowEntry, FlowKey4, FlowKey6,
    command::op,
    nat::{NatTarget4, NatTarget6},
    netns::{LocalKey4, LocalKey6},
    services::{ListenKey, ServiceKey, ServiceStats},
};

use crate::{
    error::{Error, Result},
    kernel::probe::Probe,
};

impl Probe {
    /// Namespace slot `slot`'s counters summed over CPUs.
    pub fn counters(&self, slot: u32) -> Result<Counters> {
        let map = self.ebpf.map("COUNTS").expect("the probe defines COUNTS");
        sum_counters(&PerCpuArray::try_from(map)?, slot)
    }

    /// Makes `addrs` the set of addresses the probe treats as local in
    /// namespace `slot` (the namespace's own): adds the new ones, removes
    /// the ones that are gone.
    pub fn set_local_addresses(&mut self, slot: u32, addrs: &[IpAddr]) -> Result<()> {
        let (v4, v6): (Vec<IpAddr>, Vec<IpAddr>) = addrs.iter().partition(|a| a.is_ipv4());
        let v4: HashSet<LocalKey4> = v4
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(LocalKey4 {
                    netns: slot,
                    addr: u32::from_ne_bytes(a.octets()),
                }),
                _ => None,
            })
            .collect();
        let v6: HashSet<LocalKey6> = v6
            .iter()
            .filter_map(|a| match a {
                IpAddr::V6(a) => Some(LocalKey6 {
                    netns: slot,
                    addr: ipv6_words(a),
                }),
                _ => None,
            })
            .collect();
        sync_set(
            self.ebpf
                .map_mut("LOCAL4")
                .expect("the probe defines LOCAL4"),
            &v4,
            |k| k.netns == slot,
        )?;
        sync_set(
            self.ebpf
                .map_mut("LOCAL6")
                .expect("the probe defines LOCAL6"),
            &v6,
            |k| k.netns == slot,
        )?;
        Ok(())
    }

    /// Namespace slot `slot`'s durations table.
    pub fn durations(&self, slot: u32) -> Result<Durations> {
        let map = self
            .ebpf
            .map("DURATIONS")
            .expect("the probe defines DURATIONS");
        Ok(aya::maps::Array::<_, Durations>::try_from(map)?.get(&slot, 0)?)
    }

    /// The service table, every namespace's (at most `MAX_SERVICES` rows).
    pub fn services(&self) -> Result<Vec<(ServiceKey, ServiceStats)>> {
        match self.ebpf.map("SERVICES") {
            Some(aya::maps::Map::HashMap(m)) => {
                crate::kernel::batch::read_all::<ServiceKey, ServiceStats>(m)
            }
            _ => unreachable!("the probe defines SERVICES as a hash map"),
        }
    }

    /// Namespace slot `slot`'s `ip_local_port_range` for the service table
    /// (`services::ephemeral`'s encoding).
    pub fn set_port_range(&mut self, slot: u32, range: u32) -> Result<()> {
        let mut ports: aya::maps::Array<&mut MapData, u32> = aya::maps::Array::try_from(
            self.ebpf
                .map_mut("NETNS_PORTS")
                .expect("the probe defines NETNS_PORTS"),
        )?;
        Ok(ports.set(slot, range, 0)?)
    }

    /// Namespace slot `slot`'s listening ports: `new` added, `gone` removed.
    pub fn set_listening(&mut self, slot: u32, new: &[u16], gone: &[u16]) -> Result<()> {
        let mut set: HashMap<&mut MapData, ListenKey, u8> = HashMap::try_from(
            self.ebpf
                .map_mut("LISTENING")
                .expect("the probe defines LISTENING"),
        )?;
        let key = |port| ListenKey {
            netns: slot,
            port,
            pad: 0,
        };
        for p in gone {
            match set.remove(&key(*p)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for p in new {
            set.insert(key(*p), 1, 0)?;
        }
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

    /// One flow's entry, if it has one.
    pub fn flow_entry(&self, flow: &FlowRef) -> Result<Option<FlowEntry>> {
        let got = match flow {
            FlowRef::V4(k) => self.flows4()?.get(k, 0),
            FlowRef::V6(k) => self.flows6()?.get(k, 0),
        };
        match got {
            Ok(e) => Ok(Some(e)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The local-NAT translations the probe keeps: (wire tuple, socket tuple).
    pub fn translations(&self) -> Result<Vec<(FlowRef, FlowRef)>> {
        let map = |name: &str| match self.ebpf.map(name) {
            Some(aya::maps::Map::HashMap(m)) => m,
            _ => unreachable!("the probe defines {name} as a hash map"),
        };
        let mut out: Vec<(FlowRef, FlowRef)> =
            crate::kernel::batch::read_all::<FlowKey4, NatTarget4>(map("NAT4"))?
                .into_iter()
                .map(|(w, t)| (FlowRef::V4(w), FlowRef::V4(t.key)))
                .collect();
        out.extend(
            crate::kernel::batch::read_all::<FlowKey6, NatTarget6>(map("NAT6"))?
                .into_iter()
                .map(|(w, t)| (FlowRef::V6(w), FlowRef::V6(t.key))),
        );
        Ok(out)
    }

    /// Keeps a translation as the probe's TC egress does when a socket's
    /// tuple differs from the wire's (for benchmarks and tests, whose
    /// BPF_PROG_TEST_RUN segments carry no socket).
    pub fn keep_translation4(&mut self, wire: FlowKey4, target: NatTarget4) -> Result<()> {
        let mut m: HashMap<&mut MapData, FlowKey4, NatTarget4> =
            HashMap::try_from(self.ebpf.map_mut("NAT4").expect("the probe defines NAT4"))?;
        m.insert(wire, target, 0)?;
        let mut seen: aya::maps::Array<&mut MapData, u32> = aya::maps::Array::try_from(
            self.ebpf
                .map_mut("NAT_SEEN")
                .expect("the probe defines NAT_SEEN"),
        )?;
        seen.set(0, 1, 0)?;
        Ok(())
    }

    /// Forgets the translation of wire tuple `wire`.
    pub fn forget_translation(&mut self, wire: &FlowRef) -> Result<()> {
        let res = match wire {
            FlowRef::V4(k) => {
                let mut m: HashMap<&mut MapData, FlowKey4, NatTarget4> =
                    HashMap::try_from(self.ebpf.map_mut("NAT4").expect("the probe defines NAT4"))?;
                m.remove(k)
            }
            FlowRef::V6(k) => {
                let mut m: HashMap<&mut MapData, FlowKey6, NatTarget6> =
                    HashMap::try_from(self.ebpf.map_mut("NAT6").expect("the probe defines NAT6"))?;
                m.remove(k)
            }
        };
        match res {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
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
}

/// Namespace `slot`'s counters of every CPU, summed, with the derived
/// counts filled in.
pub fn sum_counters<T: std::borrow::Borrow<MapData>>(
    array: &PerCpuArray<T, Counters>,
    slot: u32,
) -> Result<Counters> {
    let mut total = Counters::default();
    for kind in [CpuSlot::DATA_PATH, CpuSlot::PROCESS] {
        for cpu in array.get(&CpuSlot::index(slot, kind), 0)?.iter() {
            total.accumulate(cpu);
        }
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
    /// The flow a question or notice of the probe names.
    pub fn of_ask(q: &tcpstate_common::Ask) -> FlowRef {
        if q.family == 6 {
            FlowRef::V6(q.key6)
        } else {
            FlowRef::V4(q.key4)
        }
    }

    /// The namespace slot the flow is in.
    pub fn netns(&self) -> u32 {
        match self {
            FlowRef::V4(k) => k.netns,
            FlowRef::V6(k) => k.netns,
        }
    }

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

/// Makes the keys of a set-like hash map that `mine` picks equal `want`.
fn sync_set<K: aya::Pod + Eq + Hash>(
    map: &mut aya::maps::Map,
    want: &HashSet<K>,
    mine: impl Fn(&K) -> bool,
) -> Result<()> {
    let mut set: HashMap<&mut MapData, K, u8> = HashMap::try_from(map)?;
    let have: HashSet<K> = set
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| mine(k))
        .collect();
    for gone in have.difference(want) {
        let _ = set.remove(gone);
    }
    for new in want.difference(&have) {
        set.insert(new, 1, 0)?;
    }
    Ok(())
}
