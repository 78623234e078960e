//! The tcpstate agent: loads and attaches the probe, keeps the counts
//! exact (kernel timers, listening sockets, what the kernel decides without
//! a segment), and answers `tcpstate count`.
//!
//! Its rooms:
//! - [`kernel`]: everything that talks to the kernel: the probe's programs
//!   and maps, interfaces, sock_diag, namespaces, BTF, privileges;
//! - [`tracking`]: keeping one namespace's counts exact: seeding, the
//!   kernel's timers, asking the kernel about single sockets, reconciliation;
//! - [`serve`]: the running agent's answers: control socket, metrics;
//! - [`client`]: the programs that ask a running agent: count, watch, top;
//! - [`replay`]: a capture through the probe's parser and state machine, on
//!   the host.

pub mod client;
pub mod error;
pub mod kernel;
pub mod names;
pub mod replay;
pub mod serve;
pub mod snapshot;
pub mod tracking;
