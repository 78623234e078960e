//! Reading a whole hash map with BPF_MAP_LOOKUP_BATCH: a few syscalls per
//! thousands of entries instead of two per entry (get-next-key, lookup), so
//! the agent's once-a-second walk stays well under a second at a million
//! flows. aya 0.14 has no batch operations, so this is the raw syscall.

use std::os::fd::{AsFd, AsRawFd};

use aya::{Pod, maps::MapData};

use crate::error::{Error, Result};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call.
const CHUNK: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, value) of the hash map `map`. Entries that change during the
/// read may be seen in either state; an entry deleted and re-added may be
/// missed, as with any walk of a live map.
pub fn read_all<K: Pod + Default, V: Pod + Default>(map: &MapData) -> Result<Vec<(K, V)>> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut keys = vec![K::default(); CHUNK];
    let mut values = vec![V::default(); CHUNK];
    let mut out = Vec::new();
    // The hash map's batch position is a bucket index (u32).
    let (mut token_in, mut token_out) = (0u32, 0u32);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                (&raw const token_in) as u64
            },
            out_batch: (&raw mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: the attribute points at buffers of CHUNK keys and values
        // and at two u32 batch tokens, all alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let errno = std::io::Error::last_os_error();
        let n = attr.count as usize;
        if rc == 0 || errno.raw_os_error() == Some(libc::ENOENT) {
            out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        }
        if rc != 0 {
            match errno.raw_os_error() {
                // The end of the map.
                Some(libc::ENOENT) => return Ok(out),
                e => {
                    return Err(Error::io(
                        format!("reading a flow map in batches (errno {e:?})"),
                        errno,
                    ));
                }
            }
        }
        token_in = token_out;
        first = false;
    }
}
