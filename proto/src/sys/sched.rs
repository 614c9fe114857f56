//! The scheduler calls the spinning sides of the shared-memory transport
//! make: which CPU we run on (the vDSO's `getcpu`, no system call on
//! x86-64), and giving the CPU away (`sched_yield`).

/// The CPU this thread runs on now (it may move right after).
pub fn current_cpu() -> u32 {
    rustix::thread::sched_getcpu() as u32
}

/// Gives the CPU to whoever else is runnable on it, if anyone.
pub fn yield_cpu() {
    std::thread::yield_now();
}
