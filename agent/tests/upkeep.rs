//! The agent's own upkeep against what it must not disturb. With idle
//! connections to walk and to check against the socket table every second,
//! a steady trickle of orphaned FIN_WAIT2 sockets (the kernel ends each after
//! 1 s, `tcp_fin_timeout`) must still leave the counts within 100 ms of
//! their moment, and the counts stay equal to `ss`, sampled throughout.
//! Timers filed only by the walk were acted on up to seconds late: the
//! probe's notices file each as it arises. (At scale, a check holding the
//! agent's lock still delays them: `cargo xtask bench`'s readers table.)
//! Needs root: `cargo xtask test` runs these.

mod support;

use std::{
    net::{SocketAddr, TcpStream},
    thread::sleep,
    time::{Duration, Instant},
};

use support::{Agent, VethPair, require_root, sampler::Sampler, sockaddr};

/// Idle connections held open: enough for the walks and checks to take
/// time, few enough that a check holds the agent's lock well under 100 ms
/// on a loaded machine (12,000 took 75 ms here: the readers bench measures
/// larger tables).
const IDLE: usize = 2_000;

#[test]
#[ignore = "needs root: run with `cargo xtask test`"]
fn timers_fire_on_time_while_the_agent_walks_and_checks() {
    require_root();
    let net = VethPair::new();
    net.left.sysctl("net.ipv4.tcp_fin_timeout=1");
    net.left.sysctl("net.core.somaxconn=65535");
    let agent = Agent::start(&net.left, &["--reconcile-interval", "1"]);
    let idle_at: SocketAddr = sockaddr(&net.left_v4, 9100).parse().unwrap();
    let orphans_at: SocketAddr = sockaddr(&net.left_v4, 9101).parse().unwrap();
    let (_idle_l, orphans_l) = (
        net.left.listen_backlog(idle_at, 65535),
        net.left.listen_backlog(orphans_at, 1024),
    );
    // The idle connections' server ends wait in the accept queue: no
    // descriptor here.
    let idle: Vec<TcpStream> = net.right.run(|| {
        (0..IDLE)
            .map(|_| TcpStream::connect(idle_at).expect("connect"))
            .collect()
    });
    agent.assert_matches_ss_within(&net.left, "idle connections", Duration::from_secs(10));
    let before = agent.snapshot().upkeep;
    let (held, samples) = Sampler::during(&agent, &net.left, || {
        // Each server end closes at once, its client never does: an orphan
        // in FIN_WAIT2 for a second, 25 of them a second, for 8 s.
        let mut held = Vec::new();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(8) {
            let c = net.right.connect(orphans_at);
            drop(orphans_l.accept().expect("accept").0);
            held.push(c);
            sleep(Duration::from_millis(40));
        }
        sleep(Duration::from_millis(1500));
        held
    });
    let up = agent.snapshot().upkeep;
    let late = &up.timer_lateness;
    eprintln!(
        "{IDLE} idle: {} walks ({:.1} ms the last), {} checks ({:.1} ms the last); {} timers, the latest {:.1} ms late; agent {:.2} s CPU, {} MiB",
        up.walks.runs - before.walks.runs,
        up.walks.last_seconds * 1e3,
        up.checks.runs - before.checks.runs,
        up.checks.last_seconds * 1e3,
        late.count(),
        late.max_seconds * 1e3,
        up.cpu_seconds,
        up.resident_bytes >> 20,
    );
    assert!(
        up.walks.runs - before.walks.runs >= 2 && up.checks.runs - before.checks.runs >= 2,
        "the walks and checks ran meanwhile"
    );
    assert!(late.count() >= 100, "only {} timers fired", late.count());
    assert_eq!(
        late.later_than(0.1),
        0,
        "timers fired more than 100 ms late (the latest {:.3} s): {late:?}",
        late.max_seconds
    );
    samples.assert_exact("orphans ending while the agent walks and checks");
    drop((held, idle));
}
