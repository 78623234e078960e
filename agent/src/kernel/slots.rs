//! The monitored namespaces as the probe knows them: each has a slot (part
//! of its flow keys, local addresses and counters' place), its inode in the
//! probe's `NETNS_SLOTS` map (for the kernel's reports), and its entry
//! programs (`entry.rs`). A slot is given when a namespace is first seen and
//! taken back when it goes; its counters and entries are cleared before it
//! is given again.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, OwnedFd},
};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues};
use tcpstate_common::{
    Counters, CpuSlot, FlowEntry, FlowKey4, FlowKey6,
    nat::{NatTarget4, NatTarget6},
    netns::{LocalKey4, LocalKey6, entry as index},
    services::{ListenKey, ServiceKey, ServiceStats},
};

use crate::{
    error::{Error, Result},
    kernel::{
        entry::{self, Hook},
        probe::{Ingress, Probe, TC_IN_PROGRAM, TC_PROGRAM, XDP_PROGRAM},
    },
};

/// One namespace's place in the probe (or an observer's: no inode, no
/// entry programs).
pub struct Slot {
    pub inode: u64,
    /// Entry programs: TC egress, TC ingress, XDP (when the ingress hook is).
    pub(crate) programs: [Option<OwnedFd>; 3],
}

pub struct Slots {
    max: u32,
    by_slot: BTreeMap<u32, Slot>,
}

impl Slots {
    pub fn new(max: u32) -> Slots {
        Slots {
            max,
            by_slot: BTreeMap::new(),
        }
    }

    pub fn get(&self, slot: u32) -> Option<&Slot> {
        self.by_slot.get(&slot)
    }

    /// Slots in use.
    pub fn slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.by_slot.keys().copied()
    }

    pub fn of_inode(&self, inode: u64) -> Option<u32> {
        self.by_slot
            .iter()
            .find(|(_, s)| s.inode != 0 && s.inode == inode)
            .map(|(k, _)| *k)
    }

    fn free(&self) -> Option<u32> {
        (0..self.max).find(|s| !self.by_slot.contains_key(s))
    }
}

impl Hook {
    fn index(self) -> usize {
        match self {
            Hook::TcEgress => 0,
            Hook::TcIngress => 1,
            Hook::Xdp => 2,
        }
    }
}

impl Probe {
    /// Gives namespace `inode` a slot: clean counters, its entry programs,
    /// and its reports counted from now on. Returns the slot.
    pub fn register_netns(&mut self, inode: u64) -> Result<u32> {
        if let Some(slot) = self.namespaces.of_inode(inode) {
            return Ok(slot);
        }
        let slot = self.namespaces.free().ok_or(Error::TooManyNamespaces {
            max: self.namespaces.max,
        })?;
        self.clear_slot(slot)?;
        let mut hooks = vec![Hook::TcEgress, Hook::TcIngress];
        if self.ingress != Ingress::Tc {
            hooks.push(Hook::Xdp);
        }
        let mut programs: [Option<OwnedFd>; 3] = [None, None, None];
        for hook in hooks {
            let (table, at) = match hook {
                Hook::TcEgress => ("ENTRY_TC", index::TC_EGRESS),
                Hook::TcIngress => ("ENTRY_TC", index::TC_INGRESS),
                Hook::Xdp => ("ENTRY_XDP", index::XDP),
            };
            let scratch = self.map_data("SCRATCH").fd().as_fd();
            let table = self.map_data(table).fd().as_fd();
            let prog = entry::load(slot, scratch, table, at, hook)
                .map_err(|e| Error::io(format!("loading the entry program for slot {slot}"), e))?;
            programs[hook.index()] = Some(prog);
        }
        let mut slots: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(self.ebpf.map_mut("NETNS_SLOTS").expect("NETNS_SLOTS"))?;
        slots.insert(inode as u32, slot, 0)?;
        self.namespaces
            .by_slot
            .insert(slot, Slot { inode, programs });
        Ok(slot)
    }

    /// Gives the connections passing through namespace slot `of` a slot of
    /// their own (the probe was loaded with `observe`): clean counters, no
    /// entry programs (the namespace's own interfaces see the packets), no
    /// inode (the kernel reports nothing of them). Returns the slot.
    pub fn register_observer(&mut self, of: u32) -> Result<u32> {
        let slot = self.namespaces.free().ok_or(Error::TooManyNamespaces {
            max: self.namespaces.max,
        })?;
        self.clear_slot(slot)?;
        self.namespaces.by_slot.insert(
            slot,
            Slot {
                inode: 0,
                programs: [None, None, None],
            },
        );
        let mut observer: Array<&mut MapData, u32> =
            Array::try_from(self.ebpf.map_mut("OBSERVER").expect("OBSERVER"))?;
        observer.set(of, slot + 1, 0)?;
        Ok(slot)
    }

    /// The namespace in `slot` went: detaches from its interfaces, stops
    /// counting its reports, and deletes what the probe held of it.
    pub fn forget_netns(&mut self, slot: u32) -> Result<()> {
        for ifindex in self.attached.ifindexes_in(slot) {
            let _ = self.detach(slot, ifindex);
        }
        if let Some(s) = self.namespaces.by_slot.remove(&slot) {
            let mut slots: HashMap<&mut MapData, u32, u32> =
                HashMap::try_from(self.ebpf.map_mut("NETNS_SLOTS").expect("NETNS_SLOTS"))?;
            let _ = slots.remove(&(s.inode as u32));
        }
        self.clear_slot(slot)
    }

    /// The entry program of `slot` at `hook`.
    pub(crate) fn entry_program(
        &self,
        slot: u32,
        hook: Hook,
    ) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.namespaces.get(slot)?.programs[hook.index()]
            .as_ref()
            .map(|p| p.as_fd())
    }

    /// Runs `slot`'s entry program at `hook` on `frame` `repeat` times with
    /// BPF_PROG_TEST_RUN (benchmarks: the price of knowing the namespace);
    /// the kernel's mean duration per run in nanoseconds.
    pub fn time_entry(&self, slot: u32, hook: Hook, frame: &[u8], repeat: u32) -> Result<f64> {
        let prog = self.entry_program(slot, hook).ok_or_else(|| {
            Error::io(
                "timing an entry program",
                std::io::Error::other(format!("slot {slot} has none at {hook:?}")),
            )
        })?;
        let (_, took) = entry::test_run(prog, frame, repeat)
            .map_err(|e| Error::io("BPF_PROG_TEST_RUN of an entry program", e))?;
        Ok(took as f64)
    }

    /// Runs `slot`'s entry program at `hook` on one frame with
    /// BPF_PROG_TEST_RUN, as if the frame were seen on one of its
    /// interfaces (`replay --kernel --observe`); returns the verdict.
    pub fn run_entry(&self, slot: u32, hook: Hook, frame: &[u8]) -> Result<u32> {
        let prog = self.entry_program(slot, hook).ok_or_else(|| {
            Error::io(
                "running an entry program",
                std::io::Error::other(format!("slot {slot} has none at {hook:?}")),
            )
        })?;
        let (verdict, _) = entry::test_run(prog, frame, 1)
            .map_err(|e| Error::io("BPF_PROG_TEST_RUN of an entry program", e))?;
        Ok(verdict)
    }

    /// Deletes every entry of `slot` (flows, local addresses, translations)
    /// and zeroes its counters. Nothing writes them any more: the slot's
    /// entry programs are detached and its inode unregistered.
    fn clear_slot(&mut self, slot: u32) -> Result<()> {
        remove_where::<FlowKey4, FlowEntry>(self, "FLOWS4", |k| k.netns == slot)?;
        remove_where::<FlowKey6, FlowEntry>(self, "FLOWS6", |k| k.netns == slot)?;
        remove_where::<FlowKey4, NatTarget4>(self, "NAT4", |k| k.netns == slot)?;
        remove_where::<FlowKey6, NatTarget6>(self, "NAT6", |k| k.netns == slot)?;
        remove_where::<LocalKey4, u8>(self, "LOCAL4", |k| k.netns == slot)?;
        remove_where::<LocalKey6, u8>(self, "LOCAL6", |k| k.netns == slot)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| Error::io("counting CPUs", e))?;
        let mut counts: PerCpuArray<&mut MapData, Counters> =
            PerCpuArray::try_from(self.ebpf.map_mut("COUNTS").expect("COUNTS"))?;
        for kind in [CpuSlot::DATA_PATH, CpuSlot::PROCESS] {
            let zero = PerCpuValues::try_from(vec![Counters::default(); cpus])
                .map_err(|e| Error::io("zeroing counters", e))?;
            counts.set(CpuSlot::index(slot, kind), zero, 0)?;
        }
        let mut flows: Array<&mut MapData, u32> =
            Array::try_from(self.ebpf.map_mut("NETNS_FLOWS").expect("NETNS_FLOWS"))?;
        flows.set(slot, 0, 0)?;
        let mut durations: Array<&mut MapData, tcpstate_common::Durations> =
            Array::try_from(self.ebpf.map_mut("DURATIONS").expect("DURATIONS"))?;
        durations.set(slot, tcpstate_common::Durations::default(), 0)?;
        remove_where::<ServiceKey, ServiceStats>(self, "SERVICES", |k| k.netns == slot)?;
        remove_where::<ListenKey, u8>(self, "LISTENING", |k| k.netns == slot)?;
        self.set_port_range(slot, 0)?;
        let mut observer: Array<&mut MapData, u32> =
            Array::try_from(self.ebpf.map_mut("OBSERVER").expect("OBSERVER"))?;
        observer.set(slot, 0, 0)?;
        Ok(())
    }
}

/// Fills the entry tables with the shared packet programs. They stay in
/// the probe's maps (the namespaces' entry programs refer to them by
/// descriptor), which keep their programs while the probe is loaded.
pub(crate) fn fill_entry_tables(ebpf: &mut aya::Ebpf) -> Result<()> {
    use tcpstate_common::netns::entry;
    let tables: [(&str, &[(u32, &str)]); 2] = [
        (
            "ENTRY_TC",
            &[
                (entry::TC_EGRESS, TC_PROGRAM),
                (entry::TC_INGRESS, TC_IN_PROGRAM),
            ],
        ),
        ("ENTRY_XDP", &[(entry::XDP, XDP_PROGRAM)]),
    ];
    for (table, progs) in tables {
        for (index, name) in progs {
            let fd = ebpf
                .program(name)
                .unwrap_or_else(|| panic!("the probe defines {name}"))
                .fd()?
                .try_clone()
                .map_err(|e| Error::io("duplicating a program descriptor", e))?;
            let mut jumps = aya::maps::ProgramArray::try_from(
                ebpf.map_mut(table)
                    .unwrap_or_else(|| panic!("the probe defines {table}")),
            )?;
            jumps.set(*index, &fd, 0)?;
        }
    }
    Ok(())
}

fn remove_where<K: aya::Pod, V: aya::Pod>(
    probe: &mut Probe,
    name: &str,
    pick: impl Fn(&K) -> bool,
) -> Result<()> {
    let mut map: HashMap<&mut MapData, K, V> = HashMap::try_from(
        probe
            .ebpf
            .map_mut(name)
            .unwrap_or_else(|| panic!("the probe defines {name}")),
    )?;
    let keys: Vec<K> = map
        .keys()
        .filter_map(|k| k.ok())
        .filter(|k| pick(k))
        .collect();
    for k in keys {
        let _ = map.remove(&k);
    }
    Ok(())
}
