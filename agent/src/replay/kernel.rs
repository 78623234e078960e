//! `replay --kernel`: the frames through the loaded probe instead of the
//! host's engine, with BPF_PROG_TEST_RUN (the XDP program, as if each frame
//! arrived on a monitored interface; nothing is attached). The probe's own
//! counters give the counts. Needs root and BPF, as `run` does.
//!
//! It shows that the probe and the host engine are one: [`compare`] runs
//! both on every frame and notes where their counts part.
//!
//! With `--observe` the probe is loaded as `run --observe` loads it: a
//! namespace with no addresses of its own (loopback's aside), whose entry
//! program each frame goes through, and its observer, where every
//! connection between other addresses is counted with both endpoints.
//!
//! The kernel's timers are the live agent's work, driven by the kernel's
//! clock, not the capture's: here no timed state expires (TIME_WAIT and the
//! rest stay as the segments left them).

use std::{net::IpAddr, time::Duration};

use pcap_parser::Linktype;

use super::{
    Options,
    capture::{Capture, Frame},
    local::Locals,
};
use crate::{
    error::{Error, Result},
    kernel::{
        entry::Hook,
        probe::{Ingress, Probe, ProbeOptions},
    },
    snapshot::{StateCounts, live_counts},
    tracking::timers::Timeouts,
};

/// The probe, loaded for test runs.
pub struct Kernel {
    probe: Probe,
    /// With `--observe`: the observer's slot (the namespace's is 0).
    observer: Option<u32>,
    /// Frames the probe could not be given (a link type without an IP
    /// layer, a test run that failed).
    pub refused: u64,
}

/// The most of a frame the probe is given: all of its headers (a test
/// run's packet must fit a page; payload is not read, the lengths come
/// from the IP header).
const HEADERS: usize = 1024;

impl Kernel {
    /// Loads the probe with `locals` as the host's addresses (single
    /// addresses), or as an observer.
    pub fn load(locals: &Locals, max_flows: u32) -> Result<Kernel> {
        let observe = matches!(locals, Locals::Observe);
        let mut probe = Probe::load(
            &ProbeOptions {
                max_flows,
                // The XDP entry program, so that both modes run the XDP path.
                ingress: Ingress::XdpGeneric,
                max_netns: 2,
                observe,
                ..ProbeOptions::default()
            },
            None,
        )?;
        if !observe {
            probe.set_local_addresses(0, &addresses(locals)?)?;
            return Ok(Kernel {
                probe,
                observer: None,
                refused: 0,
            });
        }
        // A namespace of no inode: the capture's, which the kernel's
        // reports never name.
        let host = probe.register_netns(0)?;
        let observer = Some(probe.register_observer(host)?);
        Ok(Kernel {
            probe,
            observer,
            refused: 0,
        })
    }

    /// Runs one frame through the probe's XDP program.
    pub fn frame(&mut self, link: Linktype, data: &[u8]) {
        let mut buf;
        let eth: &[u8] = if link == Linktype::ETHERNET {
            data
        } else if let Some((proto, off)) = super::link::network_start(link, data) {
            buf = vec![0u8; 12];
            buf.extend(proto.to_be_bytes());
            buf.extend(&data[off..]);
            &buf
        } else {
            self.refused += 1;
            return;
        };
        let eth = &eth[..eth.len().min(HEADERS)];
        let ran = match self.observer {
            // Through the namespace's entry program: it names the slot
            // the observer's is found from.
            Some(_) => self.probe.run_entry(0, Hook::Xdp, eth),
            None => self.probe.run_xdp(eth),
        };
        if eth.len() < 14 || ran.is_err() {
            self.refused += 1;
        }
    }

    /// The probe's counts now (LISTEN: none, as the host engine). An
    /// observer's are its own and loopback's (always local, so counted in
    /// the namespace's slot, with both endpoints as an observer counts
    /// them).
    pub fn counts(&self) -> Result<StateCounts> {
        let own = live_counts(&self.probe.counters(0)?, 0);
        Ok(match self.observer {
            Some(slot) => own.plus(&live_counts(&self.probe.counters(slot)?, 0)),
            None => own,
        })
    }
}

/// The addresses `--kernel` can give the probe: single addresses (the
/// probe's table of local addresses holds addresses, not prefixes); none
/// for an observer.
pub fn addresses(locals: &Locals) -> Result<Vec<IpAddr>> {
    match locals {
        Locals::Observe => Ok(Vec::new()),
        Locals::Host(prefixes) => prefixes
            .iter()
            .map(|p| {
                p.single().ok_or_else(|| {
                    Error::Usage(format!(
                        "replay --kernel takes single addresses with --local, not {p}"
                    ))
                })
            })
            .collect(),
    }
}

/// Replays `cap` through the probe; the counts at the end.
pub fn replay(mut cap: Capture, o: &Options) -> Result<(u64, StateCounts, u64, Option<String>)> {
    let mut k = Kernel::load(&o.locals, 262_144)?;
    let mut frames = 0;
    let read = cap.for_each(|f: &Frame| {
        frames += 1;
        k.frame(f.link, f.data);
    });
    Ok((
        frames,
        k.counts()?,
        k.refused,
        read.err().map(|e| e.to_string()),
    ))
}

/// Where the two engines' counts parted: the frame's number (from 1) and
/// both counts after it.
#[derive(Debug)]
pub struct Parted {
    pub frame: u64,
    pub host: StateCounts,
    pub kernel: StateCounts,
}

/// Runs every frame of `cap` through both engines (the host's without
/// timers, as the kernel engine has none), comparing the counts after each.
pub fn compare(mut cap: Capture, locals: &Locals) -> Result<(u64, Vec<Parted>)> {
    let mut k = Kernel::load(locals, 262_144)?;
    let never = Duration::from_secs(u64::MAX / 4_000_000_000);
    let timeouts = Timeouts {
        time_wait: never,
        fin_wait2: never,
        syn_sent: never,
        syn_recv: never,
        dead_grace: never,
        ..Timeouts::default()
    };
    let mut host = super::Replay::new(
        &Options {
            input: String::new(),
            locals: locals.clone(),
            timeouts,
            at: None,
            every: None,
            conns: None,
        },
        None,
        None,
    );
    let (mut frames, mut parted, mut failed) = (0, Vec::new(), None);
    let read = cap.for_each(|f: &Frame| {
        frames += 1;
        k.frame(f.link, f.data);
        if let Err(e) = host.frame(f) {
            failed.get_or_insert(e);
        }
        match k.counts() {
            Ok(kernel) => {
                let h = host.engine.counts();
                if h != kernel && parted.len() < 20 {
                    parted.push(Parted {
                        frame: frames,
                        host: h,
                        kernel,
                    });
                }
            }
            Err(e) => {
                failed.get_or_insert(e);
            }
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    read?;
    Ok((frames, parted))
}
