//! Each monitored namespace's entry programs: a few instructions, written
//! here with the namespace's slot as a constant, that store the slot in the
//! per-CPU scratch and tail-call the probe's shared packet program
//! (`tcpstate_common::netns`). They are what hangs on the namespace's
//! interfaces, so a packet knows its namespace for the price of one tail
//! call, whatever the hook (at TC ingress the skb has no socket yet, and
//! `bpf_get_netns_cookie` would name the initial namespace).
//!
//! aya loads programs from an object file only, and shares maps between
//! loads only through pins; sixteen instructions per namespace are
//! simpler written and loaded with bpf(2) here, against the maps of the
//! one loaded probe. The links are made with bpf(2) too (tcx or XDP): a link
//! is detached when its descriptor closes.

use std::{
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type};
use tcpstate_common::netns::SCRATCH_NETNS_OFFSET;

/// What an entry program returns when its tail call fails (it never does
/// while the probe is loaded): "no verdict" at TC, pass at XDP.
const TC_ACT_UNSPEC: i32 = -1;
const XDP_PASS: i32 = 2;
/// `BPF_F_BEFORE`: a tcx link first in its chain.
const BPF_F_BEFORE: u32 = 1 << 3;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const FUNC_TAIL_CALL: i32 = 12;

/// The hook an entry program is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    TcEgress,
    TcIngress,
    Xdp,
}

impl Hook {
    fn is_xdp(self) -> bool {
        self == Hook::Xdp
    }
}

/// One BPF instruction, encoded as the kernel reads it.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst & 0xf);
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    u64::from_le_bytes(b)
}

/// `dst = map` (a 16-byte load of a map descriptor).
fn load_map(dst: u8, map_fd: i32) -> [u64; 2] {
    [
        insn(0x18, dst, BPF_PSEUDO_MAP_FD, 0, map_fd),
        insn(0, 0, 0, 0, 0),
    ]
}

/// The entry program's instructions: `scratch[0].netns = slot`, then
/// `tail_call(ctx, table, index)`.
pub fn instructions(slot: u32, scratch_fd: i32, table_fd: i32, index: u32, hook: Hook) -> Vec<u64> {
    let ret = if hook.is_xdp() {
        XDP_PASS
    } else {
        TC_ACT_UNSPEC
    };
    let mut p = vec![
        insn(0xbf, 6, 1, 0, 0),   // r6 = r1 (the context)
        insn(0x62, 10, 0, -4, 0), // *(u32 *)(r10 - 4) = 0
    ];
    p.extend(load_map(1, scratch_fd)); // r1 = SCRATCH
    p.extend([
        insn(0xbf, 2, 10, 0, 0),                             // r2 = r10
        insn(0x07, 2, 0, 0, -4),                             // r2 += -4
        insn(0x85, 0, 0, 0, FUNC_MAP_LOOKUP_ELEM),           // r0 = lookup(r1, r2)
        insn(0x15, 0, 0, 6, 0),                              // if r0 == 0 goto out
        insn(0x62, 0, 0, SCRATCH_NETNS_OFFSET, slot as i32), // *(u32 *)(r0 + off) = slot
        insn(0xbf, 1, 6, 0, 0),                              // r1 = r6
    ]);
    p.extend(load_map(2, table_fd)); // r2 = the entry table
    p.extend([
        insn(0xb7, 3, 0, 0, index as i32),   // r3 = index
        insn(0x85, 0, 0, 0, FUNC_TAIL_CALL), // tail_call(r1, r2, r3)
        insn(0xb7, 0, 0, 0, ret),            // out: r0 = ret
        insn(0x95, 0, 0, 0, 0),              // exit
    ]);
    p
}

fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: `attr` is a zero-initialised bpf_attr with the command's
    // members set; pointers in it point at buffers alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: the kernel just returned this new descriptor to us.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Loads an entry program for namespace slot `slot` at `hook`; `table` is
/// the jump table of the hook's program type, `index` the shared program's
/// place in it. On a refusal the verifier's log is in the error.
pub fn load(
    slot: u32,
    scratch: BorrowedFd<'_>,
    table: BorrowedFd<'_>,
    index: u32,
    hook: Hook,
) -> io::Result<OwnedFd> {
    let code = instructions(slot, scratch.as_raw_fd(), table.as_raw_fd(), index, hook);
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    // SAFETY: all zeros is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the plain-integer members of the prog-load variant.
    unsafe {
        let l = &mut attr.__bindgen_anon_3;
        l.prog_type = if hook.is_xdp() {
            bpf_prog_type::BPF_PROG_TYPE_XDP as u32
        } else {
            bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS as u32
        };
        // A tail call needs the same expected attach type as its target: the
        // probe's XDP programs are loaded for BPF_XDP (aya), its TC ones for none.
        if hook.is_xdp() {
            l.expected_attach_type = bpf_attach_type::BPF_XDP as u32;
        }
        l.insn_cnt = code.len() as u32;
        l.insns = code.as_ptr() as u64;
        l.license = license.as_ptr() as u64;
        l.log_level = 1;
        l.log_size = log.len() as u32;
        l.log_buf = log.as_mut_ptr() as u64;
        let name = b"tcpstate_entry\0";
        for (d, s) in l.prog_name.iter_mut().zip(name) {
            *d = *s as libc::c_char;
        }
    }
    match sys_bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(owned(fd)),
        Err(e) => {
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0').trim();
            if text.is_empty() {
                Err(e)
            } else {
                Err(io::Error::new(e.kind(), format!("{e}: {text}")))
            }
        }
    }
}

/// Hangs `prog` on interface `ifindex` of the calling thread's namespace:
/// a tcx link first in the chain for the TC hooks, an XDP link (`xdp_flags`:
/// XDP_FLAGS_SKB_MODE or XDP_FLAGS_DRV_MODE) for XDP.
pub fn link(prog: BorrowedFd<'_>, ifindex: u32, hook: Hook, xdp_flags: u32) -> io::Result<OwnedFd> {
    // SAFETY: all zeros is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the plain-integer members of the link-create variant.
    unsafe {
        let l = &mut attr.link_create;
        l.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
        l.__bindgen_anon_2.target_ifindex = ifindex;
        let (kind, flags) = match hook {
            Hook::TcEgress => (bpf_attach_type::BPF_TCX_EGRESS, BPF_F_BEFORE),
            Hook::TcIngress => (bpf_attach_type::BPF_TCX_INGRESS, BPF_F_BEFORE),
            Hook::Xdp => (bpf_attach_type::BPF_XDP, xdp_flags),
        };
        l.attach_type = kind as u32;
        l.flags = flags;
    }
    sys_bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).map(owned)
}

/// Runs `prog` on `data` `repeat` times with BPF_PROG_TEST_RUN: its return
/// value and the kernel's mean duration per run (ns).
pub fn test_run(prog: BorrowedFd<'_>, data: &[u8], repeat: u32) -> io::Result<(u32, u32)> {
    // SAFETY: all zeros is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: writing the plain-integer members of the test-run variant;
    // `data` outlives the call.
    unsafe {
        let t = &mut attr.test;
        t.prog_fd = prog.as_raw_fd() as u32;
        t.data_in = data.as_ptr() as u64;
        t.data_size_in = data.len() as u32;
        t.repeat = repeat;
    }
    sys_bpf(bpf_cmd::BPF_PROG_TEST_RUN, &mut attr)?;
    // SAFETY: the kernel filled in the test-run variant.
    let (ret, took) = unsafe { (attr.test.retval, attr.test.duration) };
    Ok((ret, took))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slot_and_the_index_are_constants_in_the_program() {
        let p = instructions(7, 3, 4, 1, Hook::TcIngress);
        assert_eq!(p.len(), 16);
        // The store of the slot, at the scratch offset the probe reads.
        let store = p[8].to_le_bytes();
        assert_eq!(store[0], 0x62);
        assert_eq!(i32::from_le_bytes(store[4..8].try_into().unwrap()), 7);
        // The map loads carry the descriptors, marked as map descriptors.
        assert_eq!(p[2].to_le_bytes()[1] >> 4, BPF_PSEUDO_MAP_FD);
        assert_eq!(
            i32::from_le_bytes(p[10].to_le_bytes()[4..8].try_into().unwrap()),
            4
        );
        // The failed lookup jumps to the return.
        let jump = p[7].to_le_bytes();
        assert_eq!(7 + 1 + i16::from_le_bytes([jump[2], jump[3]]) as usize, 14);
        assert_eq!(
            i32::from_le_bytes(p[12].to_le_bytes()[4..8].try_into().unwrap()),
            1
        );
        assert_eq!(
            i32::from_le_bytes(p[14].to_le_bytes()[4..8].try_into().unwrap()),
            -1
        );
    }
}
