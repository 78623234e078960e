//! A SYN flood: a million SYNs from spoofed addresses, written raw into the
//! veth of the monitored namespace (with valid checksums, so the kernel takes
//! them as it would a real flood), while real connections stay open.
//!
//! A SYN keeps nothing until the kernel answers it, and the kernel answers
//! a flood with SYN cookies, which keep nothing either (their SYN-ACKs leave
//! without a socket): so the flood makes no phantom SYN_RECV, the flow map
//! holds only the request sockets the kernel really keeps, nothing is
//! refused, and the counts equal ss throughout, sampled every 100 ms; the
//! agent keeps answering, and the flood shows in the events (SYNs received,
//! SYN cookies sent, as many as the kernel's SyncookiesSent).
//!
//! `TCPSTATE_FLOOD_SYNS` changes the number of SYNs (default 1,000,000).
//! Needs root: `cargo xtask test` runs it.

mod support;

use std::{
    net::{Ipv4Addr, TcpStream},
    thread::sleep,
    time::{Duration, Instant},
};

use support::{
    Agent, VethPair,
    frames::{SYN, Tcp},
    require_root,
    sampler::Sampler,
    sockaddr,
};
use tcpstate_common::TcpState;

/// The ones' complement sum of `data` (16-bit words), folded.
fn fold(mut sum: u32, data: &[u8]) -> u32 {
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    sum
}

fn finish(mut sum: u32) -> [u8; 2] {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (!(sum as u16)).to_be_bytes()
}

/// A SYN from `src` to `dst:80` with valid IPv4 and TCP checksums, for the
/// interface whose MAC is `mac`.
fn syn(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, mac: [u8; 6], isn: u32) -> Vec<u8> {
    let mut f = Tcp::new(&src.to_string(), sport, &dst.to_string(), 80, SYN)
        .seq(isn, 0)
        .frame();
    f[..6].copy_from_slice(&mac);
    let ip = 14;
    let tcp = ip + 20;
    let ip_sum = finish(fold(0, &f[ip..tcp]));
    f[ip + 10..ip + 12].copy_from_slice(&ip_sum);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend([0, 6]);
    pseudo.extend(((f.len() - tcp) as u16).to_be_bytes());
    let tcp_sum = finish(fold(fold(0, &pseudo), &f[tcp..]));
    f[tcp + 16..tcp + 18].copy_from_slice(&tcp_sum);
    f
}

/// Writes `frames` into `ifname` of the calling thread's namespace with a
/// raw packet socket.
fn inject(ifname: &str, frames: impl Iterator<Item = Vec<u8>>) -> u64 {
    use std::os::fd::AsRawFd;
    let fd = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Packet,
        nix::sys::socket::SockType::Raw,
        nix::sys::socket::SockFlag::empty(),
        None,
    )
    .expect("a packet socket");
    let ifindex = nix::net::if_::if_nametoindex(ifname).expect("the interface") as i32;
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex;
    addr.sll_halen = 6;
    let mut sent = 0;
    for f in frames {
        // SAFETY: a valid buffer and address of the declared sizes.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                f.as_ptr().cast(),
                f.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n == f.len() as isize {
            sent += 1;
        }
    }
    sent
}

#[test]
#[ignore = "needs root and the probe: run through `cargo xtask test`"]
fn a_million_spoofed_syns_leave_real_connections_exact() {
    require_root();
    let syns: u32 = std::env::var("TCPSTATE_FLOOD_SYNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let net = VethPair::new();
    let (mon, peer) = (&net.left, &net.right);
    const CAPACITY: u64 = 65_536;
    // Periodic reconciliation off (the tests' default).
    let agent = Agent::start(mon, &["--max-flows", &CAPACITY.to_string()]);
    // Real connections, held through the flood.
    let web = mon.listen(&sockaddr(&net.left_v4, 80));
    let held: Vec<(TcpStream, TcpStream)> = (0..20)
        .map(|_| {
            (
                peer.connect(web.local_addr().unwrap()),
                web.accept().unwrap().0,
            )
        })
        .collect();
    agent.assert_matches_ss(mon, "before the flood");
    // Replies to the spoofed sources go back through the peer, which drops them.
    support::sh(&[
        "ip",
        "-n",
        &mon.name,
        "route",
        "add",
        "198.18.0.0/15",
        "via",
        &net.right_v4,
    ]);
    let mac_text = std::process::Command::new("ip")
        .args(["-n", &mon.name, "-br", "link", "show", "veth0"])
        .output()
        .unwrap();
    let mac_text = String::from_utf8_lossy(&mac_text.stdout).into_owned();
    let mac: Vec<u8> = mac_text
        .split_whitespace()
        .nth(2)
        .expect("ip -br link prints the MAC")
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let mac: [u8; 6] = mac.try_into().unwrap();
    let dst: Ipv4Addr = net.left_v4.parse().unwrap();
    let before = agent.snapshot();
    let ev = |s: &tcpstate::snapshot::Snapshot, n: &str| s.events[n].as_u64().unwrap();

    // The flood, from a thread in the peer namespace, while this thread
    // checks that the agent answers and the real connections stay exact.
    let sender = {
        let file = std::fs::File::open(format!("/run/netns/{}", peer.name)).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let started = Instant::now();
            let frames = (0..syns).map(|i| {
                let src = Ipv4Addr::from(0xc612_0000 + (i >> 2)); // 198.18.0.0/15
                syn(
                    src,
                    1024 + (i & 3) as u16 * 1000,
                    dst,
                    mac,
                    i.wrapping_mul(2_654_435_761),
                )
            });
            let sent = inject("veth0", frames);
            (sent, started.elapsed())
        })
    };
    let cookies_before = mon.snmp("TcpExt", "SyncookiesSent");
    let sampler = Sampler::start(&agent, mon);
    let mut slowest = Duration::ZERO;
    let mut checks = 0;
    while !sender.is_finished() {
        let t = Instant::now();
        agent.counts();
        slowest = slowest.max(t.elapsed());
        checks += 1;
        sleep(Duration::from_millis(200));
    }
    let (sent, took) = sender.join().unwrap();
    // The kernel's last answers leave, and its requests time out.
    sleep(Duration::from_secs(2));
    sampler.finish().assert_exact("during the flood");
    let during = agent.snapshot();
    assert!(
        sent >= u64::from(syns) * 99 / 100,
        "{sent} of {syns} SYNs written"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "count took {slowest:?} during the flood"
    );
    let received = ev(&during, "syns_received") - ev(&before, "syns_received");
    let refused = ev(&during, "map_full") - ev(&before, "map_full");
    let cookies = ev(&during, "syn_cookies") - ev(&before, "syn_cookies");
    let kernel_cookies = mon.snmp("TcpExt", "SyncookiesSent") - cookies_before;
    eprintln!(
        "{sent} SYNs in {took:?}; {checks} checks during it, slowest count {slowest:?}; \
         SYNs received {received}, SYN cookies {cookies} (kernel: {kernel_cookies}), refused (map full) {refused}"
    );
    // The kernel's receive queue may drop part of a burst before any hook:
    // what arrived is counted, and at least half of it did.
    assert!(
        received >= u64::from(syns) / 2,
        "the flood shows: {received} SYNs received"
    );
    assert_eq!(refused, 0, "a SYN keeps nothing until the kernel answers");
    assert!(kernel_cookies > 0, "the kernel answered with cookies");
    assert_eq!(cookies, kernel_cookies, "every cookie SYN-ACK seen leaving");
    // What the map held: the real connections and requests, never the flood.
    sleep(Duration::from_millis(1100));
    let filled = agent.snapshot().flows_in_map[0];
    eprintln!("flow map after the flood: {filled} of {CAPACITY}");
    assert!(filled < 1000, "{filled} flows: no phantom of the flood");
    let t = agent.assert_matches_ss(mon, "after the flood");
    assert_eq!(t.get(TcpState::Established), 20, "{t:?}");
    drop(held);
}
