//! The running agent's answers: the control socket that `count`, `watch`
//! and `top` ask, and the Prometheus metrics; and the daemon loop that
//! runs the namespace's maintenance between them.

pub mod control;
pub mod daemon;
pub mod metrics;
pub mod reader;
pub mod tick;
