//! shmbus-bridge: one shmbus broker and a NATS server, joined for chosen
//! subjects and services, both ways.
//!
//! Model: the bridge is an ordinary client of each side. It subscribes
//! locally to what it exports and publishes it on NATS; it subscribes on
//! NATS to what it imports and publishes it locally; it owns imported
//! service names locally and calls NATS for them; it answers NATS requests
//! for exported names by calling the local owner. Delivery is as each side
//! gives it, at most once: nothing is stored, and what cannot cross is
//! counted (by direction and reason) and reported, never retried.
//!
//! Layout: the pure rules live in modules that do no I/O and are unit
//! tested beside the code: [`config`] (the TOML file and its checks),
//! [`mapping`] (prefix, headers, origin text, error mapping), [`stats`]
//! (counters, decisions, the status report). [`bridge`] runs them on tokio
//! against the two connections.

#![forbid(unsafe_code)]

pub mod bridge;
pub mod config;
pub mod mapping;
pub mod stats;

pub use bridge::{gap_subject, hostname, run, status_name, StartError};
pub use config::{Config, ConfigError};
pub use mapping::code;
pub use stats::Status;
