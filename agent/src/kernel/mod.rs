//! The kernel side: the probe's programs and maps, the interfaces they hang
//! on, the socket table (sock_diag), namespaces and their settings, and the
//! privileges all of this needs.

pub mod batch;
pub mod clock;
pub mod netns;
pub mod privileges;
pub mod probe;
pub mod sockdiag;
