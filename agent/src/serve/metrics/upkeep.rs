//! The agent's own cost as metrics: what an SRE checks before leaving a
//! monitor running on their busiest host, and what shows a timer fired
//! late (a count that differed from `ss` meanwhile).

use std::sync::Mutex;

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric, counter::Counter, gauge::Gauge},
    registry::Registry,
};

use super::render::counter;
use crate::snapshot::{
    Snapshot,
    upkeep::{LATENESS_BOUNDS, Lateness},
};

/// The lateness buckets, counted by the agent's timers.
#[derive(Debug, Default)]
struct Late(Mutex<Lateness>);

impl TypedMetric for Late {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Late {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let l = self.0.lock().expect("lateness lock");
        let bounds = LATENESS_BOUNDS.iter().copied().chain([f64::MAX]);
        let buckets: Vec<(f64, u64)> = bounds.zip(l.buckets).collect();
        encoder.encode_histogram::<NoLabelSet>(l.sum_seconds, l.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

fn seconds_counter(r: &mut Registry, name: &str, help: &str, value: f64) {
    let c: Counter<f64, std::sync::atomic::AtomicU64> = Counter::default();
    c.inc_by(value);
    r.register(name, help, c);
}

fn seconds_gauge(r: &mut Registry, name: &str, help: &str, value: f64) {
    let g: Gauge<f64, std::sync::atomic::AtomicU64> = Gauge::default();
    g.set(value);
    r.register(name, help, g);
}

pub(super) fn register(r: &mut Registry, snap: &Snapshot) {
    let u = &snap.upkeep;
    seconds_counter(
        r,
        "agent_cpu_seconds",
        "CPU time (user and system) the agent process has used",
        u.cpu_seconds,
    );
    let g: Gauge = Gauge::default();
    g.set(u.resident_bytes as i64);
    r.register(
        "agent_resident_memory_bytes",
        "The agent process's resident memory",
        g,
    );
    for (job, what, runs) in [
        (
            "walk",
            "walks of the flow maps (timers, breakdowns)",
            &u.walks,
        ),
        (
            "table_check",
            "socket-table checks (one per namespace)",
            &u.checks,
        ),
    ] {
        counter(
            r,
            &format!("{job}s"),
            &format!("The agent's {what}"),
            runs.runs,
        );
        seconds_counter(
            r,
            &format!("{job}_cpu_seconds"),
            &format!("CPU time the agent's {what} cost"),
            runs.cpu_seconds,
        );
        seconds_gauge(
            r,
            &format!("{job}_last_seconds"),
            &format!("Wall time the last of the agent's {what} took"),
            runs.last_seconds,
        );
    }
    let late = Late::default();
    *late.0.lock().expect("lateness lock") = u.timer_lateness.clone();
    r.register(
        "timer_lateness_seconds",
        "How late the agent acted on its timers and questions (the kernel's TIME_WAIT, FIN_WAIT2 and handshake timers): meanwhile the counts differed from the socket table",
        late,
    );
    seconds_gauge(
        r,
        "timer_lateness_max_seconds",
        "The latest any timer or question was acted on since the agent started",
        u.timer_lateness.max_seconds,
    );
}
