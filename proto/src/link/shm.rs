//! Real link mappings: both halves of a connection's shared-memory
//! transport, each side mapping its own half read-write and the other's
//! read-only.
//!
//! The broker creates both memfds ([`create`]), sealed against shrinking
//! and growing (and against new seals) before anyone maps them, so no
//! mapping can fault past the end. It writes each half's identity words,
//! then hands the client a read-write fd to the client half and a
//! read-only fd (a fresh read-only open of the memfd) to the broker half:
//! the client can neither write nor remap writable what the broker
//! writes, and the broker maps the client's half read-only, so neither can
//! change the other's words even by mistake.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use crate::link::layout::{half_len, valid_capacity, HalfHeader, CLOSED, DATA_OFFSET, MAGIC, VERSION};
use crate::ring::shm::{sealed_memfd, Region, RingMapError};
use crate::sync::{AtomicU64, Ordering};
use crate::sys::memfd;

/// One side's view of a link: its own half writable, the other's read-only.
#[derive(Debug)]
pub struct LinkMap {
    mine: Region,
    peer: Region,
    capacity: u32,
}

impl LinkMap {
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Our half's header (we are its only writer).
    pub fn mine(&self) -> &HalfHeader {
        // SAFETY: HalfHeader is all atomics (and padding), 64-aligned, and
        // fits in the page at offset 0 of the mapping (layout tests).
        unsafe { self.mine.at(0) }
    }

    /// The other side's half's header (read-only mapping; hostile words).
    pub fn peer(&self) -> &HalfHeader {
        // SAFETY: as for `mine`.
        unsafe { self.peer.at(0) }
    }

    /// Marks our half closed ([`CLOSED`]): the broker, as it closes the
    /// connection.
    pub fn mark_closed(&self) {
        // Release: pairs with the peer's Acquire load in `peer_closed`.
        self.mine().magic.v.store(CLOSED, Ordering::Release);
    }

    /// Whether the peer marked its half closed.
    pub fn peer_closed(&self) -> bool {
        // Acquire: pairs with the Release store in `mark_closed`.
        self.peer().magic.v.load(Ordering::Acquire) == CLOSED
    }

    /// Our ring's data, which we write.
    pub fn my_data(&self) -> &[AtomicU64] {
        self.mine.words(DATA_OFFSET, self.capacity as usize / 8)
    }

    /// The other side's ring's data, which we read (copying out).
    pub fn peer_data(&self) -> &[AtomicU64] {
        self.peer.words(DATA_OFFSET, self.capacity as usize / 8)
    }
}

/// What the broker keeps and what it sends the client in `Attached`.
#[derive(Debug)]
pub struct NewLink {
    /// The broker's side.
    pub map: LinkMap,
    /// Read-write fd to the client half.
    pub client_half: OwnedFd,
    /// Read-only fd to the broker half.
    pub broker_half_ro: OwnedFd,
}

fn stamp(h: &HalfHeader, capacity: u32) {
    // Relaxed, then the magic with Release: nobody else holds these fds
    // yet, and handing them over (SCM_RIGHTS) orders everything before it.
    h.version.v.store(VERSION, Ordering::Relaxed);
    h.capacity.v.store(capacity, Ordering::Relaxed);
    h.magic.v.store(MAGIC, Ordering::Release);
}

/// Creates both halves of a link of `capacity` bytes per direction.
/// Broker side.
pub fn create(capacity: u32) -> Result<NewLink, RingMapError> {
    if !valid_capacity(capacity) {
        return Err(RingMapError::Geometry("link capacity must be a power of two, 256 KiB to 16 MiB"));
    }
    let len = half_len(capacity);
    let client_half = sealed_memfd("shmbus-link-client", len)?;
    let broker_half = sealed_memfd("shmbus-link-broker", len)?;
    {
        // The client half's identity, through a mapping that goes at once.
        let w = Region::map(client_half.as_fd(), len, true)?;
        // SAFETY: as in `LinkMap::mine`.
        stamp(unsafe { w.at(0) }, capacity);
    }
    let mine = Region::map(broker_half.as_fd(), len, true)?;
    // SAFETY: as in `LinkMap::mine`.
    stamp(unsafe { mine.at(0) }, capacity);
    let peer = Region::map(client_half.as_fd(), len, false)?;
    let broker_half_ro = memfd::reopen_read_only(broker_half.as_fd())?;
    Ok(NewLink { map: LinkMap { mine, peer, capacity }, client_half, broker_half_ro })
}

/// Maps the halves `Attached` carried, with the capacity it announced.
/// Client side. Checks seals, sizes and identity words.
pub fn attach(
    capacity: u32,
    client_half: BorrowedFd<'_>,
    broker_half: BorrowedFd<'_>,
) -> Result<LinkMap, RingMapError> {
    if !valid_capacity(capacity) {
        return Err(RingMapError::Geometry("link capacity must be a power of two, 256 KiB to 16 MiB"));
    }
    let len = half_len(capacity);
    let mine = Region::map(client_half, len, true)?;
    let peer = Region::map(broker_half, len, false)?;
    let map = LinkMap { mine, peer, capacity };
    for h in [map.mine(), map.peer()] {
        // Acquire: pairs with the Release store in `stamp`.
        if h.magic.v.load(Ordering::Acquire) != MAGIC
            || h.version.v.load(Ordering::Relaxed) != VERSION
            || h.capacity.v.load(Ordering::Relaxed) != capacity
        {
            return Err(RingMapError::Geometry("the link's memory does not carry the announced identity"));
        }
    }
    Ok(map)
}

/// Bytes of shared memory one link takes (both halves).
pub fn link_bytes(capacity: u32) -> u64 {
    2 * half_len(capacity) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::layout::DEFAULT_CAPACITY;
    use crate::link::protocol::{Consumer, Producer, RecordKind};

    #[test]
    fn both_sides_see_each_other_and_only_write_their_own_half() {
        let link = create(DEFAULT_CAPACITY).unwrap();
        let client = attach(DEFAULT_CAPACITY, link.client_half.as_fd(), link.broker_half_ro.as_fd()).unwrap();
        let broker = &link.map;
        // Client → broker.
        let mut p = Producer::new(DEFAULT_CAPACITY);
        assert!(p.try_push(client.peer(), client.my_data(), RecordKind::Frame, &[b"hello"]).unwrap());
        p.publish(client.mine());
        let mut c = Consumer::new(DEFAULT_CAPACITY);
        let mut out = Vec::new();
        assert_eq!(c.next(broker.peer(), broker.peer_data(), &mut out).unwrap(), Some(RecordKind::Frame));
        assert_eq!(out, b"hello");
        c.commit(broker.mine());
        // SAFETY-free check that the broker half is read-only to the client:
        // the fd the client got cannot be mapped writable.
        let rw = Region::map(link.broker_half_ro.as_fd(), half_len(DEFAULT_CAPACITY), true);
        assert!(rw.is_err());
        // Nor reopened writable by another uid (`memfd::reopen_read_only`):
        // the half is mode 0400, the broker's.
        assert_eq!(rustix::fs::fstat(&link.broker_half_ro).unwrap().st_mode & 0o7777, 0o400);
    }

    #[test]
    fn the_broker_closing_its_half_is_seen_by_the_client() {
        let link = create(DEFAULT_CAPACITY).unwrap();
        let client = attach(DEFAULT_CAPACITY, link.client_half.as_fd(), link.broker_half_ro.as_fd()).unwrap();
        assert!(!client.peer_closed());
        link.map.mark_closed();
        assert!(client.peer_closed());
    }

    #[test]
    fn a_wrong_capacity_or_identity_is_refused() {
        let link = create(DEFAULT_CAPACITY).unwrap();
        assert!(attach(DEFAULT_CAPACITY * 2, link.client_half.as_fd(), link.broker_half_ro.as_fd()).is_err());
        assert!(attach(DEFAULT_CAPACITY, link.broker_half_ro.as_fd(), link.client_half.as_fd()).is_err());
        assert!(create(1000).is_err());
    }

    #[test]
    fn a_client_can_sleep_on_the_read_only_room_word() {
        let link = create(DEFAULT_CAPACITY).unwrap();
        let client = attach(DEFAULT_CAPACITY, link.client_half.as_fd(), link.broker_half_ro.as_fd()).unwrap();
        let room = &client.peer().room.v;
        // The word differs: returns at once, without an error.
        crate::sys::futex::wait(room, 1, Some(std::time::Duration::from_millis(1))).unwrap();
        // Equal: sleeps until the timeout.
        crate::sys::futex::wait(room, 0, Some(std::time::Duration::from_millis(1))).unwrap();
    }
}
