//! shmbus-proto: every contract between two shmbus processes.
//!
//! Layers, bottom up: [`sys`] (one module per syscall family; the only
//! place `unsafe` may live), then [`limits`], [`address`] and [`subject`]
//! (pure rules), then [`frame`] (the wire codec, pure, never panics on
//! input). The broker and the client build on these and forbid `unsafe`.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod address;
pub mod frame;
pub mod limits;
pub mod link;
pub mod ring;
pub mod subject;
pub mod sync;
pub mod sys;
pub mod text;

pub use address::Address;
