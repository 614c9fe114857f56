//! The atomics every shared-memory protocol in this crate uses, from one
//! place, so that under `--cfg loom` the loom model checker stands in for
//! them (see `ring::model`).

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
