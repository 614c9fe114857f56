//! Socket activation: taking the fds a service manager passed us.
//!
//! Protocol (sd_listen_fds(3)): the manager leaves the listening sockets
//! open at fds 3, 4, … and sets `LISTEN_PID` (which process they are for),
//! `LISTEN_FDS` (how many) and optionally `LISTEN_FDNAMES` (`:`-separated
//! names, from `FileDescriptorName=`). The fds arrive without close-on-exec.
//!
//! Invariants: the fds are taken at most once per process (a second call
//! finds nothing), only when `LISTEN_PID` is this process, each becomes an
//! `OwnedFd` with CLOEXEC set before it is returned, and the variables are
//! removed so no child inherits them. This is the one place that turns a
//! raw fd number into an `OwnedFd`, which is why it lives in `sys`.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// First fd a service manager passes.
pub const LISTEN_FDS_START: RawFd = 3;

static TAKEN: AtomicBool = AtomicBool::new(false);

/// One passed fd and its name, if the manager named it.
#[derive(Debug)]
pub struct ListenFd {
    pub fd: OwnedFd,
    pub name: Option<String>,
}

/// Why the passed fds could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number")]
    BadCount(String),
    #[error("fd {0} named in LISTEN_FDS is not open")]
    NotOpen(RawFd),
    #[error("cannot set close-on-exec on fd {fd}: {source}")]
    Fcntl { fd: RawFd, source: io::Error },
}

/// Takes the fds passed to this process, or an empty list when none were
/// (no `LISTEN_PID`, or it names another process). Removes the variables.
pub fn take_listen_fds() -> Result<Vec<ListenFd>, ActivationError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let for_us = pid.and_then(|p| p.trim().parse::<u32>().ok()) == Some(std::process::id());
    let Some(count) = count.filter(|_| for_us) else { return Ok(Vec::new()) };
    let n: RawFd = count.trim().parse().map_err(|_| ActivationError::BadCount(count.clone()))?;
    if !(0..=1024).contains(&n) {
        return Err(ActivationError::BadCount(count));
    }
    // Ordering: this flag guards against a second taker in this process;
    // it pairs with nothing else, so the swap alone must be atomic.
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Ok(Vec::new());
    }
    let names: Vec<Option<String>> = match names {
        Some(s) => s.split(':').map(|n| Some(n.to_owned())).collect(),
        None => Vec::new(),
    };
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n {
        let raw = LISTEN_FDS_START + i;
        if !is_open(raw) {
            return Err(ActivationError::NotOpen(raw));
        }
        // SAFETY: the service manager passed fds 3..3+n to this process
        // (LISTEN_PID matched), `is_open` just saw `raw` open, and the
        // TAKEN flag makes this the only place that ever takes ownership.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let flags =
            rustix::io::fcntl_getfd(&fd).map_err(|e| ActivationError::Fcntl { fd: raw, source: e.into() })?;
        rustix::io::fcntl_setfd(&fd, flags | rustix::io::FdFlags::CLOEXEC)
            .map_err(|e| ActivationError::Fcntl { fd: raw, source: e.into() })?;
        out.push(ListenFd { fd, name: names.get(i as usize).cloned().flatten() });
    }
    Ok(out)
}

/// Whether `raw` is an open fd, asked of the raw number: no `BorrowedFd`
/// is made for an fd that may not be open (`borrow_raw` requires it to be).
fn is_open(raw: RawFd) -> bool {
    // SAFETY: F_GETFD reads the fd's flags and touches no memory; on a
    // number that is not an open fd it fails with EBADF.
    unsafe { libc::fcntl(raw, libc::F_GETFD) >= 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fds meant for another process are left alone, and the variables
    /// are gone either way. (The positive path, which takes fd 3, is tested
    /// end to end with systemd-socket-activate in the broker's tests.)
    #[test]
    fn another_process_fds_are_not_taken() {
        std::env::set_var("LISTEN_PID", "1");
        std::env::set_var("LISTEN_FDS", "1");
        std::env::set_var("LISTEN_FDNAMES", "bus");
        assert!(take_listen_fds().unwrap().is_empty());
        for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            assert!(std::env::var_os(v).is_none(), "{v} left set");
        }
        assert!(!TAKEN.load(Ordering::Acquire));
    }

    #[test]
    fn closed_fds_are_seen_closed_without_borrowing_them() {
        let fd = crate::sys::memfd::create("t", 0).unwrap();
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        assert!(is_open(raw));
        drop(fd);
        assert!(!is_open(-1));
        assert!(!is_open(i32::MAX));
    }
}
