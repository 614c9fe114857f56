//! shmbus-proto: every contract between two shmbus processes.
//!
//! Layers, bottom up: [`sys`] (one module per syscall family), then
//! [`limits`], [`address`] and [`subject`] (pure rules), then [`frame`]
//! (the wire codec, pure, never panics on input), and the shared-memory
//! layouts and protocols of ring channels ([`ring`]) and of the
//! per-connection link ([`link`]). `unsafe` lives only in `sys` and in the
//! two modules that map shared memory, `ring::shm` and `link::shm`, each
//! block with a `// SAFETY:` line. The broker and the client build on
//! these and forbid `unsafe`.

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
