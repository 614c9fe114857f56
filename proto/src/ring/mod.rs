//! Ring channels: a lock-free broadcast ring in shared memory, one
//! publisher and many readers, set up by the broker and then used with no
//! broker and, while everyone is busy, no system call.
//!
//! Three kinds of memfd make a channel (see [`layout`]):
//! - the ring: a header and `slot_count` slots of `slot_size` bytes; the
//!   publisher maps it read-write, readers read-only;
//! - the signal page: futex words for sleeping readers and a blocked
//!   publisher, read-write for all;
//! - one cursor page per reader: where it is, written by it alone, read by
//!   the publisher in block mode.
//!
//! [`protocol`] is the algorithm (seqlock per slot with copy-out reads,
//! head counter, cursors, reader joins, the no-lost-wake-up handshakes of
//! both sides); `shm` maps real memfds; `model` runs those same functions
//! under loom (`RUSTFLAGS="--cfg loom" cargo test -p shmbus-proto --lib
//! --release --target-dir target/loom ring::model`).

pub mod layout;
#[cfg(all(test, loom))]
mod model;
pub mod protocol;
#[cfg(not(loom))]
pub mod shm;

pub use protocol::{Geometry, ReadOutcome, ReaderState, WriterState};
