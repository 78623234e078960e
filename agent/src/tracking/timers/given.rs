//! Timeouts given on the command line (`replay --timeouts`, `run
//! --observe-timeouts`): where no socket table can be read for them, the
//! user says how long the timed states last.

use super::Timeouts;
use crate::replay::time;

impl Timeouts {
    /// `time-wait=30s,syn-recv=10s`: the named states' durations; the rest
    /// keep Linux's defaults.
    pub fn parse(s: &str) -> std::result::Result<Timeouts, String> {
        let mut t = Timeouts::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?}: give STATE=DURATION"))?;
            let d = time::duration(value).ok_or_else(|| format!("{value:?} is not a duration"))?;
            let slot = match name.trim().to_ascii_lowercase().replace('_', "-").as_str() {
                "time-wait" => &mut t.time_wait,
                "fin-wait2" | "fin-wait-2" => &mut t.fin_wait2,
                "syn-sent" => &mut t.syn_sent,
                "syn-recv" => &mut t.syn_recv,
                other => {
                    return Err(format!(
                        "{other:?}: the timed states are time-wait, fin-wait2, syn-sent, syn-recv"
                    ));
                }
            };
            *slot = d;
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn named_states_change_and_the_rest_keep_linux_defaults() {
        let d = Timeouts::default();
        let t = Timeouts::parse("fin_wait2=3s,SYN-RECV=1.5").unwrap();
        assert_eq!(t.fin_wait2, Duration::from_secs(3));
        assert_eq!(t.syn_recv, Duration::from_millis(1500));
        assert_eq!((t.time_wait, t.syn_sent), (d.time_wait, d.syn_sent));
        assert_eq!(Timeouts::parse("").unwrap(), d);
        for bad in ["established=3s", "time-wait", "time-wait=soon"] {
            assert!(Timeouts::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
