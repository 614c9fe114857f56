//! The broker process: one thread around one `mio::Poll`.
//!
//! Layering: this module owns every socket, the signal pipes, the timers
//! and the clock; every decision is the bus core's ([`crate::bus`]), which
//! does no I/O. The loop hands the core what arrived and applies the
//! effects it returns: send what a peer's queue holds, close a peer.

pub mod config;
pub mod event_loop;
pub mod link;
pub mod policy_file;
pub mod signals;
pub mod systemd;

pub use config::Config;
pub use event_loop::run;
