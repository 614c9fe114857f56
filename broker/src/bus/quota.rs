//! Per-uid accounting of everything a peer can make the broker hold.
//!
//! Model (dbus-broker's per-user accounting): every resource the broker
//! holds on a peer's behalf is charged to one uid — the uid that caused it —
//! and bounded per uid, across all of that uid's connections, so opening
//! more connections never escapes a limit. The resources:
//!
//! | resource | charged to | held while |
//! |---|---|---|
//! | connections | the peer | the connection is open |
//! | queued bytes, queued fds | the receiver | a frame waits in its queue |
//! | unacknowledged fds | the receiver | sent, not yet acknowledged (`FdAck`) and seen read |
//! | subscriptions, router bytes | the subscriber | the subscription exists |
//! | channels, ring bytes | the publisher | the channel is open |
//! | channel readers, ring bytes (cursor page) | the reader | it is joined |
//! | memfd payload bytes and fds | the receiver | a delivery of it waits in its queue |
//! | names | the owner or asker | it owns or waits for the name |
//! | pending requests | the caller | its request waits for an answer |
//!
//! A [`Charge`] is the proof of one holding: it releases its amounts when
//! dropped, so the accounting cannot drift from what is actually held.
//! Counters that move with a queue (bytes, fds) are adjusted in place
//! through [`Usage::add`]/[`Usage::sub`] by their owner, which must undo its
//! additions when it is dropped. Every refusal names the limit and the
//! flag that sets it. No I/O; single-threaded (the broker's loop).

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;

/// Something a uid is charged for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum Resource {
    Connections,
    QueuedBytes,
    QueuedFds,
    UnackedFds,
    Subscriptions,
    RouterBytes,
    Channels,
    ChannelReaders,
    RingBytes,
    MemfdBytes,
    MemfdFds,
    Names,
    PendingRequests,
}

const RESOURCES: usize = 13;

impl Resource {
    pub const ALL: [Resource; RESOURCES] = [
        Resource::Connections,
        Resource::QueuedBytes,
        Resource::QueuedFds,
        Resource::UnackedFds,
        Resource::Subscriptions,
        Resource::RouterBytes,
        Resource::Channels,
        Resource::ChannelReaders,
        Resource::RingBytes,
        Resource::MemfdBytes,
        Resource::MemfdFds,
        Resource::Names,
        Resource::PendingRequests,
    ];

    /// The `shmbusd` flag that sets this limit.
    pub fn flag(self) -> &'static str {
        match self {
            Resource::Connections => "--max-connections-per-uid",
            Resource::QueuedBytes => "--uid-queue-bytes",
            Resource::QueuedFds => "--uid-queue-fds",
            Resource::UnackedFds => "--uid-unacked-fds",
            Resource::Subscriptions => "--uid-subscriptions",
            Resource::RouterBytes => "--uid-router-bytes",
            Resource::Channels => "--uid-channels",
            Resource::ChannelReaders => "--uid-channel-readers",
            Resource::RingBytes => "--uid-ring-bytes",
            Resource::MemfdBytes => "--memfd-quota-bytes",
            Resource::MemfdFds => "--memfd-quota-fds",
            Resource::Names => "--uid-names",
            Resource::PendingRequests => "--uid-pending-requests",
        }
    }

    /// What is counted, for messages.
    pub fn what(self) -> &'static str {
        match self {
            Resource::Connections => "connections",
            Resource::QueuedBytes => "bytes queued for its connections",
            Resource::QueuedFds => "fds queued for its connections",
            Resource::UnackedFds => "fds sent and not yet acknowledged",
            Resource::Subscriptions => "subscriptions",
            Resource::RouterBytes => "bytes of router memory",
            Resource::Channels => "ring channels",
            Resource::ChannelReaders => "channel reader handles",
            Resource::RingBytes => "bytes of ring memory",
            Resource::MemfdBytes => "bytes of memfd payloads queued for its connections",
            Resource::MemfdFds => "memfd payloads queued for its connections",
            Resource::Names => "names owned or queued for",
            Resource::PendingRequests => "requests waiting for an answer",
        }
    }
}

/// One limit per resource, per uid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidLimits([u64; RESOURCES]);

impl UidLimits {
    pub fn get(&self, r: Resource) -> u64 {
        self.0[r as usize]
    }

    pub fn set(&mut self, r: Resource, v: u64) {
        self.0[r as usize] = v;
    }

    pub fn with(mut self, r: Resource, v: u64) -> UidLimits {
        self.set(r, v);
        self
    }
}

impl Default for UidLimits {
    fn default() -> UidLimits {
        use shmbus_proto::limits as l;
        let mut v = [0; RESOURCES];
        v[Resource::Connections as usize] = u64::from(l::DEFAULT_MAX_CONNECTIONS_PER_UID);
        v[Resource::QueuedBytes as usize] = l::DEFAULT_UID_QUEUE_BYTES;
        v[Resource::QueuedFds as usize] = l::DEFAULT_UID_QUEUE_FDS;
        v[Resource::UnackedFds as usize] = l::DEFAULT_UID_UNACKED_FDS;
        v[Resource::Subscriptions as usize] = l::DEFAULT_UID_SUBSCRIPTIONS;
        v[Resource::RouterBytes as usize] = l::DEFAULT_UID_ROUTER_BYTES;
        v[Resource::Channels as usize] = l::DEFAULT_UID_CHANNELS;
        v[Resource::ChannelReaders as usize] = l::DEFAULT_UID_CHANNEL_READERS;
        v[Resource::RingBytes as usize] = l::DEFAULT_UID_RING_BYTES;
        v[Resource::MemfdBytes as usize] = l::DEFAULT_MEMFD_QUOTA_BYTES;
        v[Resource::MemfdFds as usize] = u64::from(l::DEFAULT_MEMFD_QUOTA_FDS);
        v[Resource::Names as usize] = l::DEFAULT_UID_NAMES;
        v[Resource::PendingRequests as usize] = l::DEFAULT_UID_PENDING_REQUESTS;
        UidLimits(v)
    }
}

/// Why an operation was refused: the uid, the resource and the numbers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("uid {uid} holds {held} {what}; {asked} more would pass its limit of {limit} (raise it with {flag})", what = .resource.what(), flag = .resource.flag())]
pub struct QuotaError {
    pub uid: u32,
    pub resource: Resource,
    pub held: u64,
    pub asked: u64,
    pub limit: u64,
}

/// What one uid holds now, and its limits.
#[derive(Debug)]
pub struct Usage {
    uid: u32,
    limits: UidLimits,
    held: [Cell<u64>; RESOURCES],
}

impl Usage {
    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn held(&self, r: Resource) -> u64 {
        self.held[r as usize].get()
    }

    pub fn limit(&self, r: Resource) -> u64 {
        self.limits.get(r)
    }

    /// Room left under the limit for `r`.
    pub fn room(&self, r: Resource) -> u64 {
        self.limit(r).saturating_sub(self.held(r))
    }

    /// Whether `amount` more of `r` fits.
    pub fn fits(&self, r: Resource, amount: u64) -> bool {
        amount <= self.room(r)
    }

    /// Checks that `amount` more fits, or says why not.
    pub fn check(&self, r: Resource, amount: u64) -> Result<(), QuotaError> {
        if self.fits(r, amount) {
            return Ok(());
        }
        Err(QuotaError {
            uid: self.uid,
            resource: r,
            held: self.held(r),
            asked: amount,
            limit: self.limit(r),
        })
    }

    /// Adds without checking; the owner of the addition must `sub` it.
    pub fn add(&self, r: Resource, amount: u64) {
        let c = &self.held[r as usize];
        c.set(c.get().saturating_add(amount));
    }

    pub fn sub(&self, r: Resource, amount: u64) {
        let c = &self.held[r as usize];
        debug_assert!(c.get() >= amount, "{r:?} released more than held");
        c.set(c.get().saturating_sub(amount));
    }
}

/// One holding's share of its uid's usage, released on drop.
#[derive(Debug)]
pub struct Charge {
    usage: Rc<Usage>,
    amounts: Vec<(Resource, u64)>,
}

impl Charge {
    pub fn uid(&self) -> u32 {
        self.usage.uid
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        for &(r, a) in &self.amounts {
            self.usage.sub(r, a);
        }
    }
}

/// The usage table, one entry per uid that holds anything.
#[derive(Debug)]
pub struct Accounts {
    limits: UidLimits,
    by_uid: HashMap<u32, Rc<Usage>>,
}

impl Accounts {
    pub fn new(limits: UidLimits) -> Accounts {
        Accounts { limits, by_uid: HashMap::new() }
    }

    pub fn limits(&self) -> &UidLimits {
        &self.limits
    }

    /// The usage record of `uid`, created on first use. Holders keep the
    /// `Rc`; a record nobody holds is forgotten by [`Accounts::sweep`].
    pub fn usage(&mut self, uid: u32) -> Rc<Usage> {
        let limits = self.limits;
        self.by_uid
            .entry(uid)
            .or_insert_with(|| Rc::new(Usage { uid, limits, held: Default::default() }))
            .clone()
    }

    /// Charges every amount to `uid` at once, or none of them.
    pub fn charge(&mut self, uid: u32, amounts: &[(Resource, u64)]) -> Result<Charge, QuotaError> {
        let usage = self.usage(uid);
        charge_usage(&usage, amounts)
    }

    /// What `uid` holds of `r`.
    pub fn held(&self, uid: u32, r: Resource) -> u64 {
        self.by_uid.get(&uid).map_or(0, |u| u.held(r))
    }

    /// Forgets uids that hold nothing, so the table tracks live usage only.
    pub fn sweep(&mut self) {
        self.by_uid.retain(|_, u| Rc::strong_count(u) > 1);
    }

    pub fn uids(&self) -> usize {
        self.by_uid.len()
    }
}

/// Charges every amount against `usage` at once, or none of them.
pub fn charge_usage(usage: &Rc<Usage>, amounts: &[(Resource, u64)]) -> Result<Charge, QuotaError> {
    for &(r, a) in amounts {
        usage.check(r, a)?;
    }
    for &(r, a) in amounts {
        usage.add(r, a);
    }
    Ok(Charge { usage: usage.clone(), amounts: amounts.to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> UidLimits {
        UidLimits::default().with(Resource::MemfdBytes, 100).with(Resource::MemfdFds, 3)
    }

    #[test]
    fn charges_add_up_per_uid_and_release_on_drop() {
        let mut q = Accounts::new(limits());
        let payload = |n| [(Resource::MemfdBytes, n), (Resource::MemfdFds, 1)];
        let a = q.charge(1, &payload(60)).unwrap();
        let b = q.charge(1, &payload(40)).unwrap();
        let e = q.charge(1, &payload(1)).unwrap_err();
        assert_eq!((e.resource, e.held, e.limit), (Resource::MemfdBytes, 100, 100));
        assert!(e.to_string().contains("--memfd-quota-bytes"), "{e}");
        // Another uid has its own budget.
        let c = q.charge(2, &payload(100)).unwrap();
        assert_eq!(q.held(1, Resource::MemfdBytes), 100);
        drop(a);
        assert_eq!((q.held(1, Resource::MemfdBytes), q.held(1, Resource::MemfdFds)), (40, 1));
        let d = q.charge(1, &payload(10)).unwrap();
        let f = q.charge(1, &payload(10)).unwrap();
        let e = q.charge(1, &payload(0)).unwrap_err();
        assert_eq!(e.resource, Resource::MemfdFds);
        drop((b, c, d, f));
        assert_eq!(q.held(1, Resource::MemfdBytes), 0);
        assert_eq!(q.held(2, Resource::MemfdFds), 0);
        q.sweep();
        assert_eq!(q.uids(), 0);
    }

    #[test]
    fn a_refused_charge_takes_nothing() {
        let mut q = Accounts::new(limits());
        let _held = q.charge(1, &[(Resource::MemfdFds, 3)]).unwrap();
        assert!(q.charge(1, &[(Resource::MemfdBytes, 5), (Resource::MemfdFds, 1)]).is_err());
        assert_eq!(q.held(1, Resource::MemfdBytes), 0);
    }

    #[test]
    fn connections_are_counted_per_uid() {
        let mut q = Accounts::new(UidLimits::default().with(Resource::Connections, 2));
        let one = [(Resource::Connections, 1)];
        let a = q.charge(5, &one).unwrap();
        let _b = q.charge(5, &one).unwrap();
        let e = q.charge(5, &one).unwrap_err();
        assert!(e.to_string().contains("limit of 2") && e.to_string().contains("--max-connections-per-uid"));
        let _c = q.charge(6, &one).unwrap();
        drop(a);
        q.charge(5, &one).unwrap();
    }

    #[test]
    fn in_place_counters_saturate() {
        let mut q = Accounts::new(UidLimits::default());
        let u = q.usage(3);
        u.add(Resource::QueuedBytes, u64::MAX);
        u.add(Resource::QueuedBytes, 5);
        assert_eq!(u.held(Resource::QueuedBytes), u64::MAX);
        assert!(!u.fits(Resource::QueuedBytes, 1));
        u.sub(Resource::QueuedBytes, u64::MAX);
        assert_eq!(u.room(Resource::QueuedBytes), UidLimits::default().get(Resource::QueuedBytes));
    }
}
