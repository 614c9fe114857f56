//! Futex wait and wake on a word in shared memory.
//!
//! Shared (not `FUTEX_PRIVATE_FLAG`) futexes, because the word lives in a
//! memfd mapped by several processes: the kernel keys the wait queue by the
//! backing page, not by this process's address space.

use std::io;
use std::time::Duration;

use rustix::thread::futex;

use crate::sync::AtomicU32;

/// Sleeps while `*word == expected`, up to `timeout` (`None`: forever).
/// Returns on a wake, a timeout, a signal, or at once if the word already
/// differs; the caller re-checks its condition in every case.
pub fn wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> io::Result<()> {
    let ts = timeout.map(|d| rustix::time::Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(d.subsec_nanos()),
    });
    match futex::wait(word, futex::Flags::empty(), expected, ts.as_ref()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR | rustix::io::Errno::TIMEDOUT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Wakes every waiter on `word`.
pub fn wake_all(word: &AtomicU32) -> io::Result<usize> {
    Ok(futex::wake(word, futex::Flags::empty(), i32::MAX as u32)?)
}
