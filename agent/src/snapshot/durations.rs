//! The probe's durations table (`tcpstate_common::durations`) as a
//! snapshot carries it: one histogram per name (`connect`, `handshake`,
//! and each state a local endpoint can spend time in and leave), summed
//! over namespaces like the counts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tcpstate_common::{
    Durations, TcpState,
    durations::{self, CONNECT, HANDSHAKE},
};

/// The rows a snapshot names, and where each is in the probe's table: the
/// two handshakes, then the states in `count`'s order (not LISTEN: the
/// probe does not time it; not CLOSE: never counted).
pub fn rows() -> impl Iterator<Item = (String, usize)> {
    let states = TcpState::REPORTED
        .into_iter()
        .filter(|s| !matches!(s, TcpState::Listen | TcpState::Close))
        .map(|s| (s.name().to_ascii_lowercase(), s as usize));
    [
        ("connect".to_owned(), CONNECT),
        ("handshake".to_owned(), HANDSHAKE),
    ]
    .into_iter()
    .chain(states)
}

/// One histogram: observations per bucket (not cumulative; bucket `b`
/// holds durations up to [`durations::upper_bound_seconds`]`(b)`) and
/// their sum in the probe's units (2^16 ns).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    pub buckets: Vec<u64>,
    pub sum_units: u64,
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    pub fn sum_seconds(&self) -> f64 {
        durations::units_seconds(self.sum_units)
    }

    /// The mean duration, in seconds.
    pub fn mean_seconds(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum_seconds() / n as f64)
    }

    /// The `q` quantile, interpolated within its bucket as Prometheus's
    /// `histogram_quantile` does (the last bucket, unbounded, gives its
    /// lower bound).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * n as f64;
        let mut below = 0u64;
        for (b, &c) in self.buckets.iter().enumerate() {
            if c > 0 && (below + c) as f64 >= rank {
                let lower = if b == 0 {
                    0.0
                } else {
                    durations::upper_bound_seconds(b - 1)
                };
                let upper = durations::upper_bound_seconds(b);
                if upper.is_infinite() {
                    return Some(lower);
                }
                let within = (rank - below as f64) / c as f64;
                return Some(lower + (upper - lower) * within);
            }
            below += c;
        }
        None
    }

    fn add(&mut self, o: &Histogram) {
        self.buckets
            .resize(self.buckets.len().max(o.buckets.len()), 0);
        for (a, b) in self.buckets.iter_mut().zip(&o.buckets) {
            *a += b;
        }
        self.sum_units += o.sum_units;
    }
}

/// The histograms by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings(pub BTreeMap<String, Histogram>);

impl Timings {
    /// A namespace's table, as the probe keeps it.
    pub fn of(t: &Durations) -> Timings {
        Timings(
            rows()
                .map(|(name, i)| {
                    let row = &t.rows[i];
                    let h = Histogram {
                        buckets: row.buckets.to_vec(),
                        sum_units: row.sum,
                    };
                    (name, h)
                })
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&Histogram> {
        self.0.get(name)
    }

    /// Adds another namespace's.
    pub fn add(&mut self, o: &Timings) {
        for (k, h) in &o.0 {
            self.0.entry(k.clone()).or_default().add(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use tcpstate_common::durations::BUCKETS;

    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket_as_prometheus_does() {
        let mut h = Histogram {
            buckets: vec![0; BUCKETS],
            sum_units: 0,
        };
        // 100 observations in bucket 14 (0.537 s to 1.074 s).
        h.buckets[14] = 100;
        let lower = durations::upper_bound_seconds(13);
        let upper = durations::upper_bound_seconds(14);
        let p50 = h.quantile(0.5).unwrap();
        assert!((p50 - (lower + upper) / 2.0).abs() < 1e-9, "{p50}");
        assert!((h.quantile(1.0).unwrap() - upper).abs() < 1e-9);
        // One fast one below: p01 lies in bucket 0.
        h.buckets[0] = 1;
        assert!(h.quantile(0.001).unwrap() <= durations::upper_bound_seconds(0));
        assert_eq!(Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn a_table_names_its_rows_and_sums() {
        let mut t = Durations::default();
        t.rows[HANDSHAKE].buckets[3] = 2;
        t.rows[HANDSHAKE].sum = 10;
        t.rows[TcpState::TimeWait as usize].buckets[20] = 1;
        let one = Timings::of(&t);
        assert_eq!(one.get("handshake").unwrap().count(), 2);
        assert_eq!(one.get("time_wait").unwrap().count(), 1);
        assert_eq!(one.get("connect").unwrap().count(), 0);
        assert!(one.get("listen").is_none());
        let mut two = one.clone();
        two.add(&one);
        assert_eq!(two.get("handshake").unwrap().sum_units, 20);
        assert_eq!(two.0.len(), 11);
    }
}
