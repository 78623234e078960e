//! Which endpoints of a capture are "this host's": the addresses given with
//! `--local` (then the counts are what `ss` on that host showed), or, as an
//! observer (`--observe`), every endpoint: both ends of each connection
//! are followed, the way a middlebox sees them.

use std::net::IpAddr;

use tcpstate_common::{Locality, Side};

use super::engine::Key;
use crate::error::{Error, Result};

/// An address and prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    /// `ADDR` or `ADDR/LEN`.
    pub fn parse(s: &str) -> Result<Prefix> {
        let bad = || Error::Usage(format!("--local {s:?}: give an address, or ADDRESS/PREFIX"));
        let (a, l) = s.split_once('/').map_or((s, None), |(a, l)| (a, Some(l)));
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match l {
            Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(Prefix { addr, len })
    }

    /// The address, when the prefix is one address.
    pub fn single(&self) -> Option<IpAddr> {
        let max = if self.addr.is_ipv4() { 32 } else { 128 };
        (self.len == max).then_some(self.addr)
    }

    fn contains(&self, a: IpAddr) -> bool {
        match (self.addr, a) {
            (IpAddr::V4(p), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(p) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(p), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(p) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// Which endpoints count.
#[derive(Clone, Debug)]
pub enum Locals {
    Observe,
    /// These prefixes, and loopback (the capturing host's own, as the
    /// probe takes all of 127.0.0.0/8).
    Host(Vec<Prefix>),
}

impl Locals {
    pub fn of(&self, key: &Key, sender: Side) -> Locality {
        match self {
            Locals::Observe => Locality {
                sender: true,
                receiver: true,
            },
            Locals::Host(p) => Locality {
                sender: is_local(p, key, sender),
                receiver: is_local(p, key, sender.other()),
            },
        }
    }
}

fn is_local(prefixes: &[Prefix], key: &Key, side: Side) -> bool {
    let a = address(key, side);
    a.is_loopback() || prefixes.iter().any(|p| p.contains(a))
}

/// The address of `side` of `key`.
pub fn address(key: &Key, side: Side) -> IpAddr {
    let (family, words, _) = key.end(side);
    if family == 4 {
        IpAddr::from(words[0].to_ne_bytes())
    } else {
        let mut b = [0u8; 16];
        for (i, w) in words.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_their_addresses_only() {
        let p = Prefix::parse("10.1.0.0/16").unwrap();
        assert!(p.contains("10.1.200.3".parse().unwrap()));
        assert!(!p.contains("10.2.0.1".parse().unwrap()));
        assert!(!p.contains("::1".parse().unwrap()));
        let one = Prefix::parse("fd00::1").unwrap();
        assert!(one.contains("fd00::1".parse().unwrap()));
        assert!(!one.contains("fd00::2".parse().unwrap()));
        assert!(
            Prefix::parse("0.0.0.0/0")
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
        assert!(Prefix::parse("10.0.0.1/33").is_err());
        assert!(Prefix::parse("nonsense").is_err());
    }
}
