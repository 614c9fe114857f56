//! The scheduler calls the spinning sides of the shared-memory transport
//! make: which CPU we run on (no system call: glibc reads it from the
//! thread's rseq area, or calls the vDSO's `getcpu`), giving the CPU
//! away (`sched_yield`), and the coarse clock a sender looks at on every
//! send (the vDSO's `CLOCK_MONOTONIC_COARSE`: a few loads, where the
//! precise clock's reads took 13% of a streaming publisher's time).
//!
//! Why glibc's `sched_getcpu` and `clock_gettime`, and not rustix's:
//! rustix finds the vDSO by parsing the ELF image the auxiliary vector
//! points to, and under valgrind that image is not mapped, so every
//! program linking shmbus crashed at its first send when run under
//! valgrind (rustix issue 1559). glibc asks its own dynamic linker, which
//! valgrind serves.

/// The CPU this thread runs on now (it may move right after). A failure
/// (which only a bad pointer could cause, and there is none) reads as
/// CPU 0: the answer is a scheduling hint and nothing else.
pub fn current_cpu() -> u32 {
    // SAFETY: `sched_getcpu` takes no arguments and touches no memory of
    // ours; it returns a CPU number or -1.
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu).unwrap_or(0)
}

/// The monotonic clock as of the last timer tick (it lags the precise
/// clock by at most one tick, 1–10 ms, and never goes back): for
/// intervals well above a tick, read often. A failure, which Linux
/// (since 2.6.32) does not have, reads as zero: a caller timing by it
/// would then see no time pass.
pub fn coarse_now() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable `timespec` for the whole call, the
    // only memory `clock_gettime` touches.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    match (r, u64::try_from(ts.tv_sec), u32::try_from(ts.tv_nsec)) {
        (0, Ok(s), Ok(ns)) if ns < 1_000_000_000 => std::time::Duration::new(s, ns),
        _ => std::time::Duration::ZERO,
    }
}

/// Gives the CPU to whoever else is runnable on it, if anyone.
pub fn yield_cpu() {
    std::thread::yield_now();
}

/// Gives the calling thread a working directory, root and umask of its
/// own (`unshare(CLONE_FS)`): a `chdir` or `umask` in it from then on
/// leaves the rest of the process alone, and ends with the thread.
pub fn own_working_directory() -> std::io::Result<()> {
    // SAFETY: `FS` unshares only the working directory, root and umask;
    // the fd table (the hazard `unshare_unsafe` warns of, with `FILES`)
    // stays shared.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::FS) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn the_coarse_clock_moves_on_with_the_precise_one_within_a_tick() {
        // Each coarse read is bracketed by precise ones (the same clock,
        // CLOCK_MONOTONIC): a coarse read lies between its first bracket
        // less a tick and its second, whatever preempts the thread between.
        let tick = Duration::from_millis(10);
        let bracketed = || {
            let before = Instant::now();
            let c = coarse_now();
            (before, c, Instant::now())
        };
        let (a0, c0, b0) = bracketed();
        assert!(c0 > Duration::ZERO, "the clock failed");
        std::thread::sleep(Duration::from_millis(30));
        let (a1, c1, b1) = bracketed();
        let coarse = c1 - c0;
        assert!(coarse <= (b1 - a0) + tick, "{coarse:?} against at most {:?}", b1 - a0);
        assert!(coarse + tick >= a1.saturating_duration_since(b0), "{coarse:?} against {:?}", a1 - b0);
        assert!(coarse > Duration::ZERO, "the coarse clock did not move in 30 ms");
    }
}
