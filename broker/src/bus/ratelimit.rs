//! A bounded rate for log lines a peer can cause.
//!
//! Model: a fixed window. At most `burst` lines pass per `window`; the
//! rest are counted, and the next line that passes says how many were
//! left out, so a flood of refusals costs a few lines and a counter, never
//! a disk. The clock is whatever `now` the caller saw last (the bus reads
//! no clock). No I/O.

use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    window: Duration,
    window_start: Option<Instant>,
    used: u32,
    /// Left out since the last line that passed.
    pending: u64,
    total: u64,
    last_seen: Option<Instant>,
}

impl RateLimit {
    pub fn new(burst: u32, window: Duration) -> RateLimit {
        RateLimit { burst, window, window_start: None, used: 0, pending: 0, total: 0, last_seen: None }
    }

    /// Records the current time.
    pub fn see(&mut self, now: Instant) {
        self.last_seen = Some(self.last_seen.map_or(now, |t| t.max(now)));
    }

    pub fn last_seen(&self) -> Option<Instant> {
        self.last_seen
    }

    /// Whether a line may be written now; if so, how many were left out
    /// before it.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        self.see(now);
        let start = *self.window_start.get_or_insert(now);
        if now.saturating_duration_since(start) >= self.window {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            return Some(std::mem::take(&mut self.pending));
        }
        self.pending = self.pending.saturating_add(1);
        self.total = self.total.saturating_add(1);
        None
    }

    /// Lines left out elsewhere (and counted there), to be reported with
    /// the next line that passes here.
    pub fn carry(&mut self, lines: u64) {
        self.pending = self.pending.saturating_add(lines);
    }

    /// Lines left out since start.
    pub fn suppressed_total(&self) -> u64 {
        self.total
    }

    /// Whether its window is over at `now`, with nothing left to say: it
    /// may be forgotten (a new one would behave the same).
    pub fn idle_since(&self, now: Instant) -> bool {
        self.pending == 0
            && self.window_start.is_none_or(|start| now.saturating_duration_since(start) >= self.window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_costs_a_burst_and_a_count() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(3, Duration::from_secs(10));
        let passed = (0..100).filter(|_| r.allow(t0).is_some()).count();
        assert_eq!(passed, 3);
        assert_eq!(r.suppressed_total(), 97);
        // The next window: the first line reports what was left out.
        assert_eq!(r.allow(t0 + Duration::from_secs(11)), Some(97));
        assert_eq!(r.allow(t0 + Duration::from_secs(11)), Some(0));
    }
}
