//! The probe's durations as Prometheus histograms: the buckets are counted
//! in the kernel already, so they are encoded as they are (prometheus-client's
//! own `Histogram` only counts observations it is given one by one).

use std::sync::Mutex;

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric, family::Family},
    registry::Registry,
};
use tcpstate_common::durations::upper_bound_seconds;

use super::render::{Labels, label};
use crate::snapshot::{Snapshot, durations::Histogram};

/// A histogram whose buckets were counted elsewhere.
#[derive(Debug, Default)]
struct Counted(Mutex<Histogram>);

impl Counted {
    fn set(&self, h: &Histogram) {
        *self.0.lock().expect("histogram lock") = h.clone();
    }
}

impl TypedMetric for Counted {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Counted {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let h = self.0.lock().expect("histogram lock");
        let buckets: Vec<(f64, u64)> = h
            .buckets
            .iter()
            .enumerate()
            .map(|(b, n)| (upper_bound_seconds(b), *n))
            .collect();
        encoder.encode_histogram::<NoLabelSet>(h.sum_seconds(), h.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

pub(super) fn histogram_family(
    r: &mut Registry,
    name: &str,
    help: &str,
    rows: &[(Labels, &Histogram)],
) {
    let f: Family<Labels, Counted> = Family::default();
    for (labels, h) in rows {
        f.get_or_create(labels).set(h);
    }
    r.register(name, help, f);
}

pub(super) fn register(r: &mut Registry, snap: &Snapshot) {
    let t = &snap.durations;
    let empty = Histogram::default();
    let one = |name: &str| t.get(name).unwrap_or(&empty);
    histogram_family(
        r,
        "connect_duration_seconds",
        "Connects this host made that completed: from the first SYN out to the SYN-ACK in, retransmissions included",
        &[(Labels::new(), one("connect"))],
    );
    histogram_family(
        r,
        "handshake_duration_seconds",
        "Handshakes this host answered that completed: from its first SYN-ACK out to the kernel's completing the connection",
        &[(Labels::new(), one("handshake"))],
    );
    let states: Vec<(Labels, &Histogram)> =
        t.0.iter()
            .filter(|(name, _)| *name != "connect" && *name != "handshake")
            .map(|(name, h)| (label(&[("state", name)]), h))
            .collect();
    histogram_family(
        r,
        "state_duration_seconds",
        "Time local endpoints spent in a state, observed when they left it",
        &states,
    );
}
