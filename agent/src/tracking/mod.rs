//! Keeping each namespace's counts exact: what the probe's packets cannot
//! show is added here (existing connections, the kernel's timers, sockets
//! the kernel changed without a segment), and the flow maps are held
//! against the socket table. One [`tracker::Tracker`] per namespace; the
//! [`host::Host`] holds them and the probe they share, and follows the
//! host's namespaces (`follow.rs`).

pub mod answers;
pub mod attention;
pub mod breakdown;
pub mod follow;
pub mod host;
pub mod inspect;
pub mod interfaces;
pub mod listeners;
pub mod observer;
pub mod pacing;
pub mod reconcile;
pub mod seed;
pub mod services;
pub mod signals;
pub mod timers;
pub mod tracker;
