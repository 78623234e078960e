//! Keeping one namespace's counts exact: what the probe's packets cannot
//! show is added here (existing connections, the kernel's timers, sockets
//! the kernel changed without a segment), and the flow maps are held
//! against the socket table.

pub mod agent;
pub mod answers;
pub mod breakdown;
pub mod interfaces;
pub mod pacing;
pub mod reconcile;
pub mod seed;
pub mod signals;
pub mod timers;
