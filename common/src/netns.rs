//! Namespaces in the probe: every monitored network namespace has a slot, a
//! small number the agent gives it. The slot is part of every flow key, of
//! every local address and of where the namespace's counters are, so one
//! set of maps serves every namespace of the host and the same tuple in two
//! namespaces is two connections.
//!
//! A packet learns its slot from the interface it is seen on: each
//! namespace's interfaces run a small entry program of their own (the
//! agent writes it with the slot as a constant) that stores the slot in
//! the per-CPU scratch and tail-calls the shared program. A kernel report
//! learns it from its socket's namespace inode ([`NETNS_SLOTS`] map).

/// Slots the probe has room for by default (the agent sets the real
/// number at load: 1 for one namespace, `--max-netns` for all).
pub const DEFAULT_MAX_NETNS: u32 = 1024;

/// Byte offset in the per-CPU scratch where the entry program writes the
/// slot (the probe's `Packet::netns`).
pub const SCRATCH_NETNS_OFFSET: i16 = 0;

/// Index of the attached programs in the entry jump tables (`ENTRY_TC`,
/// `ENTRY_XDP`).
pub mod entry {
    /// TC egress (`ENTRY_TC`).
    pub const TC_EGRESS: u32 = 0;
    /// TC ingress (`ENTRY_TC`).
    pub const TC_INGRESS: u32 = 1;
    /// XDP (`ENTRY_XDP`).
    pub const XDP: u32 = 0;
}

/// A namespace's own IPv4 address, as the probe's `LOCAL4` map keys it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LocalKey4 {
    pub netns: u32,
    /// Network order, as on the wire.
    pub addr: u32,
}

/// A namespace's own IPv6 address (`LOCAL6`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct LocalKey6 {
    pub netns: u32,
    pub addr: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<LocalKey4>() == 8);
const _: () = assert!(core::mem::size_of::<LocalKey6>() == 20);

#[cfg(feature = "user")]
mod user {
    // SAFETY: plain `#[repr(C)]` integers without padding (sizes asserted).
    unsafe impl aya::Pod for super::LocalKey4 {}
    unsafe impl aya::Pod for super::LocalKey6 {}
}
