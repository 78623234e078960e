//! The tcpstate agent: loads and attaches the probe, keeps the counts
//! exact (kernel timers, listening sockets), and answers `tcpstate count`.

pub mod agent;
pub mod control;
pub mod error;
pub mod expiry;
pub mod kernel_clock;
pub mod netns;
pub mod probe;
pub mod reconcile;
pub mod seed;
pub mod snapshot;
pub mod sockdiag;
