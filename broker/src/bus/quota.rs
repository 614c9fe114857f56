//! Per-uid accounting of shared payloads held by the broker.
//!
//! Model: a memfd payload is held by the broker from the moment it is
//! accepted until the last queue holding it has sent or dropped it. While
//! held, its size and its fd count against the uid that published it —
//! across all of that uid's connections, so opening more connections does
//! not escape the limit. A [`Charge`] is the proof of one held payload; it
//! releases its share when dropped, so the accounting cannot drift from
//! what is actually queued. No I/O; single-threaded (the broker's loop).

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Bytes of shared payloads one uid may have held by the broker.
    pub memfd_bytes: u64,
    /// Shared-payload fds one uid may have held by the broker.
    pub memfd_fds: u32,
}

#[derive(Debug, Default)]
struct Usage {
    bytes: Cell<u64>,
    fds: Cell<u32>,
}

/// Why a payload was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    #[error("uid {uid} already has {held} bytes of payloads in flight; {asked} more would pass the {limit}-byte quota")]
    Bytes { uid: u32, held: u64, asked: u64, limit: u64 },
    #[error("uid {uid} already has {held} payload fds in flight (quota {limit})")]
    Fds { uid: u32, held: u32, limit: u32 },
}

/// One held payload's share of its uid's usage; released on drop.
#[derive(Debug)]
pub struct Charge {
    usage: Rc<Usage>,
    bytes: u64,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.usage.bytes.set(self.usage.bytes.get() - self.bytes);
        self.usage.fds.set(self.usage.fds.get() - 1);
    }
}

#[derive(Debug)]
pub struct Quotas {
    limits: QuotaLimits,
    by_uid: HashMap<u32, Rc<Usage>>,
}

impl Quotas {
    pub fn new(limits: QuotaLimits) -> Quotas {
        Quotas { limits, by_uid: HashMap::new() }
    }

    /// Charges `bytes` and one fd to `uid`, or says why not.
    pub fn charge(&mut self, uid: u32, bytes: u64) -> Result<Charge, QuotaError> {
        // Forget uids with nothing held, so the table tracks live usage only.
        self.by_uid.retain(|_, u| Rc::strong_count(u) > 1);
        let usage = self.by_uid.entry(uid).or_default().clone();
        let (held, fds) = (usage.bytes.get(), usage.fds.get());
        if fds >= self.limits.memfd_fds {
            return Err(QuotaError::Fds { uid, held: fds, limit: self.limits.memfd_fds });
        }
        if held.saturating_add(bytes) > self.limits.memfd_bytes {
            return Err(QuotaError::Bytes { uid, held, asked: bytes, limit: self.limits.memfd_bytes });
        }
        usage.bytes.set(held + bytes);
        usage.fds.set(fds + 1);
        Ok(Charge { usage, bytes })
    }

    /// Bytes and fds `uid` has in flight.
    pub fn usage(&self, uid: u32) -> (u64, u32) {
        self.by_uid.get(&uid).map_or((0, 0), |u| (u.bytes.get(), u.fds.get()))
    }
}

/// Connections per uid: opening more connections must not escape the
/// per-uid limits, so the number of connections is itself bounded.
#[derive(Debug, Default)]
pub struct ConnectionCounts {
    limit: u32,
    by_uid: HashMap<u32, u32>,
}

impl ConnectionCounts {
    pub fn new(limit: u32) -> ConnectionCounts {
        ConnectionCounts { limit, by_uid: HashMap::new() }
    }

    /// Counts one more connection for `uid`, or says why not.
    pub fn open(&mut self, uid: u32) -> Result<(), String> {
        let n = self.by_uid.entry(uid).or_insert(0);
        if *n >= self.limit {
            return Err(format!("uid {uid} already has {n} connections (limit {})", self.limit));
        }
        *n += 1;
        Ok(())
    }

    pub fn close(&mut self, uid: u32) {
        if let Some(n) = self.by_uid.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                self.by_uid.remove(&uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn connections_are_counted_per_uid() {
        let mut c = super::ConnectionCounts::new(2);
        c.open(5).unwrap();
        c.open(5).unwrap();
        assert!(c.open(5).unwrap_err().contains("limit 2"));
        c.open(6).unwrap();
        c.close(5);
        c.open(5).unwrap();
    }

    use super::*;

    #[test]
    fn charges_add_up_per_uid_and_release_on_drop() {
        let mut q = Quotas::new(QuotaLimits { memfd_bytes: 100, memfd_fds: 3 });
        let a = q.charge(1, 60).unwrap();
        let b = q.charge(1, 40).unwrap();
        assert!(matches!(q.charge(1, 1), Err(QuotaError::Bytes { held: 100, .. })));
        // Another uid has its own budget.
        let c = q.charge(2, 100).unwrap();
        assert_eq!(q.usage(1), (100, 2));
        drop(a);
        assert_eq!(q.usage(1), (40, 1));
        let d = q.charge(1, 10).unwrap();
        let e = q.charge(1, 10).unwrap();
        assert!(matches!(q.charge(1, 0), Err(QuotaError::Fds { held: 3, .. })));
        drop((b, c, d, e));
        assert_eq!(q.usage(1), (0, 0));
        assert_eq!(q.usage(2), (0, 0));
    }
}
