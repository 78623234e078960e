//! The tcpstate agent: loads and attaches the probe, keeps the counts
//! exact (kernel timers, listening sockets), and answers `tcpstate count`.

pub mod agent;
pub mod batch;
pub mod breakdown;
pub mod control;
pub mod error;
pub mod expiry;
pub mod kernel_clock;
pub mod live;
pub mod metrics;
pub mod netns;
pub mod pacing;
pub mod privileges;
pub mod probe;
pub mod reader;
pub mod reconcile;
pub mod seed;
pub mod snapshot;
pub mod sockdiag;
pub mod view;
pub mod watch;
