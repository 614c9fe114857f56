//! The broker process: one thread around one `mio::Poll`.
//!
//! Layering: this module owns every socket, the signal pipe and the clock;
//! the decisions it makes are delegated to [`crate::bus`] (routing, queues,
//! overflow, admission), which does no I/O.

pub mod channels;
pub mod config;
pub mod conn;
pub mod event_loop;
pub mod signals;
pub mod systemd;

pub use config::Config;
pub use event_loop::run;
