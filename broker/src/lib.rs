//! shmbus-broker: the `shmbusd` broker and the `shmbusctl` tool.
//!
//! Layers, bottom up: `shmbus-proto` (wire and syscalls) → [`bus`] (bus
//! semantics with no I/O: router, queues, policy) → [`daemon`] (the
//! process: sockets, the poll loop, signals). `shmbusctl` sits beside the
//! daemon and talks to it through the `shmbus` client library, like any
//! other client.

#![forbid(unsafe_code)]

pub mod bus;
pub mod daemon;
