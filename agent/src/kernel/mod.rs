//! The kernel side: the probe's programs and maps, the interfaces they hang
//! on, the socket table (sock_diag), namespaces and their settings, and the
//! privileges all of this needs.

pub mod attach;
pub mod batch;
pub mod btf;
pub mod clock;
pub mod discover;
pub mod entry;
pub mod links;
pub mod maps;
pub mod netns;
pub mod nsinfo;
pub mod owners;
pub mod privileges;
pub mod probe;
pub mod slots;
pub mod sockdiag;
