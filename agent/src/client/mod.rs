//! The programs that ask a running agent over its control socket:
//! `count`, `conns`, `listeners`, `watch` and the live view (`top`).

pub mod conns;
pub mod control;
pub mod count;
pub mod live;
pub mod view;
pub mod watch;
