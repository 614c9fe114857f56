//! The scheduler calls the spinning sides of the shared-memory transport
//! make: which CPU we run on (no system call: glibc reads it from the
//! thread's rseq area, or calls the vDSO's `getcpu`), and giving the CPU
//! away (`sched_yield`).
//!
//! Why glibc's `sched_getcpu` and not rustix's: rustix finds the vDSO by
//! parsing the ELF image the auxiliary vector points to, and under
//! valgrind that image is not mapped, so every program linking shmbus
//! crashed at its first send when run under valgrind (rustix issue 1559).
//! glibc asks its own dynamic linker, which valgrind serves.

/// The CPU this thread runs on now (it may move right after). A failure
/// (which only a bad pointer could cause, and there is none) reads as
/// CPU 0: the answer is a scheduling hint and nothing else.
pub fn current_cpu() -> u32 {
    // SAFETY: `sched_getcpu` takes no arguments and touches no memory of
    // ours; it returns a CPU number or -1.
    let cpu = unsafe { libc::sched_getcpu() };
    u32::try_from(cpu).unwrap_or(0)
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
