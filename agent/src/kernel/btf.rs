//! The running kernel's type information (BTF, `/sys/kernel/btf/vmlinux`),
//! read for one purpose: where the fields the probe's kernel-report program
//! reads lie in `struct sock` and `struct net` on this kernel build.
//!
//! A reader of our own, of the few kinds needed to find a member's offset:
//! aya-obj parses BTF but keeps struct members private, and btf-rs (retis)
//! is LGPL, which this MIT/Apache project does not link statically.
//! The format is the kernel's `Documentation/bpf/btf.rst`.

use std::collections::HashMap;

use crate::error::{Error, Result};

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// One member of a struct or union: its name, type and bit offset.
#[derive(Clone, Debug)]
struct Member {
    name: String,
    ty: u32,
    bit_offset: u32,
}

#[derive(Clone, Debug)]
enum Type {
    /// A struct or union with its members.
    Composite {
        members: Vec<Member>,
    },
    /// typedef, const, volatile, restrict, type tag: look through to `ty`.
    Alias {
        ty: u32,
    },
    Other,
}

/// The types of a BTF blob, by id (id 0 is void).
pub struct Btf {
    types: Vec<Type>,
    structs: HashMap<String, u32>,
}

fn bad(what: &str) -> Error {
    Error::io(
        "reading the kernel's BTF (/sys/kernel/btf/vmlinux)",
        std::io::Error::other(what.to_owned()),
    )
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> Result<Btf> {
        let data = std::fs::read("/sys/kernel/btf/vmlinux").map_err(|e| {
            Error::io(
                "reading the kernel's BTF (/sys/kernel/btf/vmlinux; the kernel needs CONFIG_DEBUG_INFO_BTF)",
                e,
            )
        })?;
        Btf::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Btf> {
        let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
        let u32_at = |o: usize| {
            data.get(o..o + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        };
        if u16_at(0) != Some(MAGIC) {
            return Err(bad("no BTF magic (or not little-endian)"));
        }
        let hdr_len = u32_at(4).ok_or_else(|| bad("short header"))? as usize;
        let field = |i: usize| u32_at(8 + 4 * i).map(|v| v as usize);
        let (type_off, type_len, str_off, str_len) = match (field(0), field(1), field(2), field(3))
        {
            (Some(a), Some(b), Some(c), Some(d)) => (a, b, c, d),
            _ => return Err(bad("short header")),
        };
        let types_at = hdr_len + type_off;
        let strings_at = hdr_len + str_off;
        if data.len() < types_at + type_len || data.len() < strings_at + str_len {
            return Err(bad("sections past the end"));
        }
        let strings = &data[strings_at..strings_at + str_len];
        let name = |off: u32| -> String {
            let s = strings.get(off as usize..).unwrap_or_default();
            let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
            String::from_utf8_lossy(&s[..end]).into_owned()
        };
        let mut types = vec![Type::Other];
        let mut structs = HashMap::new();
        let mut at = types_at;
        let end = types_at + type_len;
        while at + 12 <= end {
            let name_off = u32_at(at).ok_or_else(|| bad("truncated type"))?;
            let info = u32_at(at + 4).ok_or_else(|| bad("truncated type"))?;
            let size_or_type = u32_at(at + 8).ok_or_else(|| bad("truncated type"))?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kflag = info >> 31 == 1;
            at += 12;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + 12 * i;
                        let (n, t, o) = match (u32_at(m), u32_at(m + 4), u32_at(m + 8)) {
                            (Some(n), Some(t), Some(o)) => (n, t, o),
                            _ => return Err(bad("truncated members")),
                        };
                        members.push(Member {
                            name: name(n),
                            ty: t,
                            bit_offset: if kflag { o & 0xff_ffff } else { o },
                        });
                    }
                    at += 12 * vlen;
                    if kind == KIND_STRUCT && name_off != 0 {
                        structs.entry(name(name_off)).or_insert(types.len() as u32);
                    }
                    Type::Composite { members }
                }
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias { ty: size_or_type }
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => {
                    at += 4;
                    Type::Other
                }
                KIND_ARRAY => {
                    at += 12;
                    Type::Other
                }
                KIND_ENUM | KIND_FUNC_PROTO => {
                    at += 8 * vlen;
                    Type::Other
                }
                KIND_DATASEC | KIND_ENUM64 => {
                    at += 12 * vlen;
                    Type::Other
                }
                KIND_PTR | KIND_FWD | KIND_FUNC | KIND_FLOAT => Type::Other,
                k => return Err(bad(&format!("unknown type kind {k}"))),
            };
            types.push(ty);
        }
        Ok(Btf { types, structs })
    }

    fn resolve(&self, mut id: u32) -> u32 {
        for _ in 0..32 {
            match self.types.get(id as usize) {
                Some(Type::Alias { ty }) => id = *ty,
                _ => break,
            }
        }
        id
    }

    /// The byte offset of `path` (members separated by dots, e.g.
    /// `__sk_common.skc_family`) in struct `name`. Members of anonymous
    /// structs and unions are found as if they were the outer struct's.
    pub fn offset(&self, name: &str, path: &str) -> Result<u32> {
        let id = *self
            .structs
            .get(name)
            .ok_or_else(|| bad(&format!("no struct {name}")))?;
        let mut ty = id;
        let mut bits = 0;
        for part in path.split('.') {
            let (member_ty, off) = self
                .find(ty, part)
                .ok_or_else(|| bad(&format!("no member {path} in struct {name}")))?;
            bits += off;
            ty = member_ty;
        }
        if bits % 8 != 0 {
            return Err(bad(&format!("{name}.{path} is a bit field")));
        }
        Ok(bits / 8)
    }

    /// A member `name` of composite `ty` (through anonymous members):
    /// its type and bit offset.
    fn find(&self, ty: u32, name: &str) -> Option<(u32, u32)> {
        let Type::Composite { members } = self.types.get(self.resolve(ty) as usize)? else {
            return None;
        };
        for m in members {
            if m.name == name {
                return Some((m.ty, m.bit_offset));
            }
            if m.name.is_empty()
                && let Some((t, off)) = self.find(m.ty, name)
            {
                return Some((t, m.bit_offset + off));
            }
        }
        None
    }
}

/// Where the probe's kernel-report program reads what it needs, on the
/// running kernel.
pub fn sock_layout(btf: &Btf) -> Result<tcpstate_common::SockLayout> {
    let common = |m: &str| btf.offset("sock", &format!("__sk_common.{m}"));
    Ok(tcpstate_common::SockLayout {
        family: common("skc_family")?,
        sport: btf.offset("inet_sock", "inet_sport")?,
        dport: common("skc_dport")?,
        rcv_saddr: common("skc_rcv_saddr")?,
        daddr: common("skc_daddr")?,
        v6_rcv_saddr: common("skc_v6_rcv_saddr")?,
        v6_daddr: common("skc_v6_daddr")?,
        net: common("skc_net")?,
        protocol: btf.offset("sock", "sk_protocol")?,
        net_inum: btf.offset("net", "ns.inum")?,
        flags: common("skc_flags")?,
        // Optional: without them a close from FIN_WAIT2 or CLOSING is a
        // question for the agent.
        tw_count: btf
            .offset("net", "ipv4.tcp_death_row.tw_refcount.refs.counter")
            .unwrap_or(0),
        tw_max: btf
            .offset("net", "ipv4.tcp_death_row.sysctl_max_tw_buckets")
            .unwrap_or(0),
        enabled: 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets that have not moved in `struct sock_common` for many kernel
    /// versions (the address and port pairs lead it); the rest must at
    /// least lie inside the structs.
    #[test]
    fn the_running_kernels_socket_layout_is_found() {
        let Ok(btf) = Btf::kernel() else {
            eprintln!("no /sys/kernel/btf/vmlinux here: nothing to check");
            return;
        };
        let l = sock_layout(&btf).expect("every field found");
        assert_eq!((l.daddr, l.rcv_saddr), (0, 4));
        assert_eq!(l.dport, 12);
        assert!(l.sport > l.protocol, "{l:?}");
        assert_eq!(l.family, 16);
        assert!(
            l.v6_daddr >= 16 && l.v6_rcv_saddr == l.v6_daddr + 16,
            "{l:?}"
        );
        assert!(l.protocol > l.net && l.net > l.family, "{l:?}");
        assert_eq!(l.enabled, 1);
        assert!(l.flags > l.net && l.flags.is_multiple_of(8), "{l:?}");
        // This kernel has the per-namespace TIME_WAIT death row.
        assert!(l.tw_count > l.net_inum && l.tw_max > l.tw_count, "{l:?}");
        assert!(btf.offset("sock", "no_such_member").is_err());
        assert!(btf.offset("no_such_struct", "x").is_err());
    }

    #[test]
    fn garbage_is_a_clear_error() {
        assert!(Btf::parse(b"not btf").is_err());
        assert!(Btf::parse(&[0x9f, 0xeb, 1, 0, 24, 0, 0, 0]).is_err());
    }
}
