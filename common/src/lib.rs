//! Types shared by the tcpstate probe (eBPF) and agent (userspace), and the
//! pure TCP endpoint state machine that both run.
//!
//! Everything that crosses the kernel boundary is `#[repr(C)]`, `Copy`, has no
//! implicit padding, and has its size checked by a `const` assertion.
#![cfg_attr(not(test), no_std)]

pub mod ask;
pub mod command;
pub mod counters;
pub mod durations;
pub mod flow;
pub mod layout;
pub mod machine;
pub mod nat;
pub mod netns;
pub mod outcome;
pub mod parse;
pub mod services;
pub mod state;

pub use ask::Ask;
pub use command::Command;
pub use counters::{Counters, CpuSlot, Event, Scratch};
pub use durations::Durations;
pub use flow::{EndSeq, FlowEntry, FlowKey4, FlowKey6, Side, Word};
pub use layout::SockLayout;
pub use machine::{Locality, Segment, Step};
pub use state::TcpState;
