//! Thin, safe wrappers over the syscalls shmbus needs, one module per
//! family. Everything handed out is an `OwnedFd` or `BorrowedFd`, created
//! with close-on-exec (and non-blocking where the caller asks) in the same
//! call that makes it. This is one of the few places `unsafe` may live.

pub mod activation;
#[cfg(not(loom))]
pub mod futex;
pub mod memfd;
pub mod mmap;
pub mod sched;
pub mod socket;
