//! Real ring mappings: the ring memfd, the signal page, cursor pages.
//!
//! A ring is mapped read-write by the broker (to set it up and to mark it
//! closed) and by its publisher; read-only by readers, from a read-only
//! file description, so a reader can neither write it nor remap it
//! writable. Every memfd here is sealed against shrinking and growing
//! before anyone maps it, so no mapping can fault past the end.
//!
//! The views hand out `&RingHeader`, `&SlotHeader`, `&Signal`, `&Cursor`,
//! and slot data as `&[AtomicU64]`: made only of atomics, so sharing them
//! with other processes, which may write them at any moment, is sound.
//! Slot data is never lent out as `&[u8]` to a reader: readers copy it out
//! word by word (`protocol::copy_out`). Only the publisher writes data,
//! through `&mut RingMap`, so its own `&[u8]` views (`slot_data`) cannot
//! change while they live. Storing through a view of a read-only mapping
//! faults; the client API never does.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::SealFlags;
use rustix::mm::{MapFlags, ProtFlags};

use crate::ring::layout::*;
use crate::ring::protocol::{self, Geometry, RingView, RingWriteView};
use crate::sync::{AtomicU64, Ordering};
use crate::sys::memfd;

/// Why a ring or page cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RingMapError {
    #[error("bad ring geometry: {0}")]
    Geometry(&'static str),
    #[error("the memfd is {actual} bytes, {expected} expected")]
    Size { expected: u64, actual: u64 },
    #[error("the memfd is not sealed against resizing")]
    NotSealed,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Most bytes one slot may carry.
pub const MAX_SLOT_SIZE: u32 = 16 << 20;
/// Most slots one ring may have.
pub const MAX_SLOT_COUNT: u32 = 1 << 20;
/// Most bytes one ring memfd may take.
pub const MAX_RING_BYTES: usize = 1 << 30;

impl Geometry {
    /// Bytes from one slot to the next: header and data, cache-line aligned.
    pub fn stride(&self) -> usize {
        (SLOT_HEADER_LEN + self.slot_size as usize).next_multiple_of(64)
    }

    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.slot_count as usize * self.stride()
    }

    pub fn validate(&self) -> Result<(), RingMapError> {
        if self.slot_size == 0 || self.slot_size > MAX_SLOT_SIZE {
            return Err(RingMapError::Geometry("slot size must be 1 byte to 16 MiB"));
        }
        if self.slot_count < 2 || self.slot_count > MAX_SLOT_COUNT {
            return Err(RingMapError::Geometry("slot count must be 2 to 2^20"));
        }
        if (self.slot_count as usize).saturating_mul(self.stride()) > MAX_RING_BYTES - HEADER_LEN {
            return Err(RingMapError::Geometry("ring larger than 1 GiB"));
        }
        Ok(())
    }
}

/// A mapping, unmapped on drop.
#[derive(Debug)]
pub(crate) struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is shared memory accessed only through atomics (and,
// for ring data, through the seqlock protocol); it is not tied to a thread.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    pub(crate) fn map(fd: BorrowedFd<'_>, len: usize, writable: bool) -> Result<Region, RingMapError> {
        // Seals first, then the size: once sealed the size cannot change,
        // while an unsealed memfd could shrink right after a size check.
        let seals = rustix::fs::fcntl_get_seals(fd).map_err(|_| RingMapError::NotSealed)?;
        if !seals.contains(SealFlags::SHRINK | SealFlags::GROW) {
            return Err(RingMapError::NotSealed);
        }
        let actual = rustix::fs::fstat(fd).map_err(io::Error::from)?.st_size as u64;
        if actual != len as u64 {
            return Err(RingMapError::Size { expected: len as u64, actual });
        }
        let prot = if writable { ProtFlags::READ | ProtFlags::WRITE } else { ProtFlags::READ };
        // SAFETY: a fresh mapping at a kernel-chosen address aliases no Rust
        // object; the memfd is exactly `len` bytes and sealed against
        // shrinking, so every byte stays backed for the mapping's life.
        // Other processes may write it: all access goes through atomics.
        let ptr = unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, prot, MapFlags::SHARED, fd, 0) }
            .map_err(io::Error::from)?;
        Ok(Region { ptr: NonNull::new(ptr.cast()).expect("mmap never returns null on success"), len })
    }

    /// `&T` at `offset`.
    ///
    /// # Safety
    /// `T` must be made of atomics (valid for any bit pattern, shareable),
    /// `offset + size_of::<T>() <= len`, and `offset` aligned for `T`.
    pub(crate) unsafe fn at<T>(&self, offset: usize) -> &T {
        debug_assert!(offset + std::mem::size_of::<T>() <= self.len);
        debug_assert!((self.ptr.as_ptr() as usize + offset).is_multiple_of(std::mem::align_of::<T>()));
        // SAFETY: per the caller's promise.
        unsafe { &*self.ptr.as_ptr().add(offset).cast::<T>() }
    }
}

impl Region {
    /// `count` atomic words from `offset`, or a panic if they do not lie
    /// inside the mapping or `offset` is not 8-aligned.
    pub(crate) fn words(&self, offset: usize, count: usize) -> &[AtomicU64] {
        assert!(offset.is_multiple_of(8) && offset.checked_add(count * 8).is_some_and(|end| end <= self.len));
        // SAFETY: offset .. offset + 8 * count lies inside the mapping
        // (checked above) and is 8-aligned (page-aligned base, offset a
        // multiple of 8). AtomicU64 has u64's size and alignment, is valid
        // for every bit pattern, and may be changed through shared
        // references, so a shared slice of them over memory another
        // process writes is sound; a store through a read-only mapping
        // would fault, and callers store only into their own half.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(offset).cast::<AtomicU64>(), count) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: mapped by Region::map with this length; no reference into
        // it outlives self (every view borrows self).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A ring mapping: read-write for the publisher and broker, read-only for
/// readers.
#[derive(Debug)]
pub struct RingMap {
    region: Region,
    signal: Region,
    geometry: Geometry,
    writable: bool,
}

impl RingMap {
    /// Maps a ring memfd and its signal page with the geometry the broker
    /// announced (never the one in shared memory).
    pub fn map(
        ring: BorrowedFd<'_>,
        signal: BorrowedFd<'_>,
        g: Geometry,
        writable: bool,
    ) -> Result<Self, RingMapError> {
        g.validate()?;
        let region = Region::map(ring, g.total_len(), writable)?;
        let signal = Region::map(signal, PAGE_LEN, true)?;
        Ok(RingMap { region, signal, geometry: g, writable })
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn slot_offset(&self, index: usize) -> usize {
        // The protocol only asks for index < slot_count; make sure anyway,
        // since a bug here would be an out-of-bounds read.
        assert!(index < self.geometry.slot_count as usize, "slot index out of range");
        HEADER_LEN + index * self.geometry.stride()
    }

    /// Marks the ring closed and wakes every reader. Publisher and broker.
    pub fn close(&self) {
        if self.writable {
            // Release: pairs with the reader's Acquire load of `closed`.
            self.header().closed.store(1, Ordering::Release);
        }
        // Release: pairs with a sleeping reader's Acquire load of `wake`.
        self.signal().wake.fetch_add(1, Ordering::Release);
        let _ = crate::sys::futex::wake_all(&self.signal().wake);
    }

    /// Whether the ring was closed.
    pub fn is_closed(&self) -> bool {
        // Acquire: pairs with the Release store in `close`.
        self.header().closed.load(Ordering::Acquire) != 0
    }

    /// Writes a value into the ring header. For tests that play a hostile
    /// publisher; `false` on a read-only mapping.
    #[doc(hidden)]
    pub fn scribble(&mut self, head: u64, slot: usize, seq: u64, len: u32, byte: u8) -> bool {
        if !self.writable {
            return false;
        }
        // Release everywhere: a hostile writer's stores, for readers'
        // Acquire loads to find; what they pair with is the point of the test.
        self.header().head.store(head, Ordering::Release);
        let index = slot % self.geometry.slot_count as usize;
        let s = self.slot(index);
        s.seq.store(seq, Ordering::Release);
        s.len.store(len, Ordering::Release);
        let data = vec![byte; self.geometry.slot_size as usize];
        self.write_data(index, &data);
        true
    }
}

impl RingView for RingMap {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn header(&self) -> &RingHeader {
        // SAFETY: RingHeader is all atomics, 64-aligned, and fits in the
        // page-aligned HEADER_LEN bytes at offset 0.
        unsafe { self.region.at(0) }
    }

    fn signal(&self) -> &Signal {
        // SAFETY: Signal is all atomics and fits in the page at offset 0.
        unsafe { self.signal.at(0) }
    }

    fn slot(&self, index: usize) -> &SlotHeader {
        let off = self.slot_offset(index);
        // SAFETY: SlotHeader is atomics (and padding), 8-aligned (strides
        // are multiples of 64 from a page-aligned base), and the slot lies
        // inside the mapping (checked in slot_offset).
        unsafe { self.region.at(off) }
    }

    fn slot_words(&self, index: usize) -> &[AtomicU64] {
        let off = self.slot_offset(index) + SLOT_HEADER_LEN;
        let words = (self.geometry.slot_size as usize).div_ceil(8);
        debug_assert!(SLOT_HEADER_LEN + words * 8 <= self.geometry.stride());
        // SAFETY: off .. off + 8 * words lies inside the mapping (the slot
        // is inside, checked in slot_offset, and its stride is header plus
        // slot_size rounded up to 64, so the last word's padding is too),
        // and is 8-aligned (page-aligned base, strides multiple of 64, a
        // 16-byte slot header). AtomicU64 has u64's size and alignment, is
        // valid for every bit pattern, and may be changed through shared
        // references, so a shared slice of them over memory another process
        // writes is sound; this crate only ever loads through it (a store
        // would fault on a reader's read-only mapping).
        unsafe { std::slice::from_raw_parts(self.region.ptr.as_ptr().add(off).cast::<AtomicU64>(), words) }
    }
}

impl RingWriteView for RingMap {
    fn write_data(&mut self, index: usize, bytes: &[u8]) {
        assert!(self.writable, "write through a read-only ring mapping");
        let len = bytes.len().min(self.geometry.slot_size as usize);
        let off = self.slot_offset(index) + SLOT_HEADER_LEN;
        // SAFETY: the mapping is writable and off..off+len lies inside it.
        // `&mut self`: no `&[u8]` this process got from `slot_data` is
        // alive. Readers (other mappings, other processes) only load these
        // bytes atomically, under the slot's seqlock, which begin_write has
        // marked as being written.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.region.ptr.as_ptr().add(off), len) }
    }
}

impl RingMap {
    /// The publisher's view of slot `index`'s data (what it wrote so far).
    pub fn slot_data(&self, index: usize) -> &[u8] {
        let off = self.slot_offset(index) + SLOT_HEADER_LEN;
        // SAFETY: the range lies inside the mapping. Only the publisher
        // writes ring data (the broker, the one other process with a
        // writable fd, never does), and it needs `&mut self` to do so
        // (write_data, slot_data_mut, scribble), so the bytes cannot change
        // while this borrow lives; readers only load.
        unsafe {
            std::slice::from_raw_parts(self.region.ptr.as_ptr().add(off), self.geometry.slot_size as usize)
        }
    }

    /// The publisher's in-place view of slot `index`'s data, to fill
    /// between `begin_write` and `commit`.
    pub fn slot_data_mut(&mut self, index: usize) -> &mut [u8] {
        assert!(self.writable, "write through a read-only ring mapping");
        let off = self.slot_offset(index) + SLOT_HEADER_LEN;
        // SAFETY: writable mapping, range inside it; `&mut self` makes this
        // the only view from this process, and readers only read the slot
        // under its seqlock, which begin_write has marked as being written.
        unsafe {
            std::slice::from_raw_parts_mut(
                self.region.ptr.as_ptr().add(off),
                self.geometry.slot_size as usize,
            )
        }
    }
}

/// A cursor page mapping.
#[derive(Debug)]
pub struct CursorMap {
    region: Region,
}

impl CursorMap {
    pub fn map(fd: BorrowedFd<'_>, writable: bool) -> Result<CursorMap, RingMapError> {
        Ok(CursorMap { region: Region::map(fd, PAGE_LEN, writable)? })
    }

    pub fn cursor(&self) -> &Cursor {
        // SAFETY: Cursor is all atomics and fits in the page at offset 0.
        unsafe { self.region.at(0) }
    }

    /// Broker side: ends the channel for this reader, `how` being
    /// [`ENDED_CLOSED`] (readers read up to `end_at`, the ring's head now)
    /// or [`ENDED_REVOKED`]. Wake the reader after (`RingMap::close`).
    pub fn end(&self, how: u32, end_at: u64) {
        // Relaxed: published by the Release store of `ended` below.
        self.cursor().end_at.store(end_at, Ordering::Relaxed);
        // Release: pairs with the reader's Acquire load in `ended`; and
        // the wake-up that follows (`RingMap::close`, a Release RMW on
        // `wake`) comes after it, so a reader woken sees it.
        self.cursor().ended.store(how, Ordering::Release);
    }

    /// Reader side: how the broker ended the channel (0 while it is open),
    /// and where it ended it (with [`ENDED_CLOSED`]).
    pub fn ended(&self) -> (u32, u64) {
        // Acquire: pairs with the Release in `end`.
        let how = self.cursor().ended.load(Ordering::Acquire);
        if how == 0 {
            return (0, 0);
        }
        // Relaxed: ordered by the Acquire load above.
        (how, self.cursor().end_at.load(Ordering::Relaxed))
    }
}

pub(crate) fn sealed_memfd(name: &str, len: usize) -> io::Result<OwnedFd> {
    let fd = memfd::create(name, len as u64)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// A new ring: its memfd and signal page, initialised. Broker side.
pub fn create_ring(g: Geometry, block: bool) -> Result<(OwnedFd, OwnedFd, RingMap), RingMapError> {
    g.validate()?;
    let ring = sealed_memfd("shmbus-ring", g.total_len())?;
    let signal = sealed_memfd("shmbus-ring-signal", PAGE_LEN)?;
    let map = RingMap::map(ring.as_fd(), signal.as_fd(), g, true)?;
    let h = map.header();
    // Relaxed, then the magic with Release: nobody else holds these fds
    // yet, and handing them over (SCM_RIGHTS) orders everything before it.
    // Readers take the geometry from the broker's frame, never from here.
    h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
    h.overflow.store(u32::from(block), Ordering::Relaxed);
    h.slot_size.store(g.slot_size, Ordering::Relaxed);
    h.slot_count.store(g.slot_count, Ordering::Relaxed);
    h.magic.store(RING_MAGIC, Ordering::Release);
    map.signal().magic.store(SIGNAL_MAGIC, Ordering::Release);
    Ok((ring, signal, map))
}

/// A reader joins the ring `ring` (the broker's mapping): its cursor page,
/// set where it starts, and a read-only fd to that page for the publisher.
/// Returns the membership generation to send the publisher with the
/// cursor fd, the reader's fd, the publisher's, and the broker's own
/// mapping (to end the channel for the reader: [`CursorMap::end`]).
/// Everything that can fail is done before the publisher is told
/// (`protocol::join`), so it is never told of a reader that never comes.
pub fn join_reader(ring: &RingMap) -> Result<(u32, OwnedFd, OwnedFd, CursorMap), RingMapError> {
    let fd = sealed_memfd("shmbus-ring-cursor", PAGE_LEN)?;
    let map = CursorMap::map(fd.as_fd(), true)?;
    let ro = memfd::reopen_read_only(fd.as_fd())?;
    let (generation, next) = protocol::join(ring);
    // Release: pairs with the reader's Acquire load when it joins (the fd
    // handover orders it anyway).
    map.cursor().next.store(next, Ordering::Release);
    map.cursor().magic.store(CURSOR_MAGIC, Ordering::Release);
    Ok((generation, fd, ro, map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::protocol::*;

    const G: Geometry = Geometry { slot_size: 64, slot_count: 4 };

    fn read_all(map: &RingMap, st: &mut ReaderState) -> (Vec<(u64, Vec<u8>)>, u64, usize) {
        let (mut got, mut missed, mut corrupt) = (Vec::new(), 0, 0);
        for _ in 0..100 {
            match try_read(map, st, &mut [0; 64], |b| b.to_vec()) {
                ReadOutcome::Message { seq, value } => got.push((seq, value)),
                ReadOutcome::Missed(k) => missed += k,
                ReadOutcome::Corrupt(_) => corrupt += 1,
                ReadOutcome::Empty => break,
            }
        }
        (got, missed, corrupt)
    }

    #[test]
    fn publish_read_and_overrun() {
        let (ring, signal, mut w) = create_ring(G, false).unwrap();
        let ro = memfd::reopen_read_only(ring.as_fd()).unwrap();
        let r = RingMap::map(ro.as_fd(), signal.as_fd(), G, false).unwrap();
        let mut ws = WriterState::default();
        let mut rs = ReaderState::default();
        publish(&mut w, &mut ws, b"one");
        publish(&mut w, &mut ws, b"two");
        let (got, missed, _) = read_all(&r, &mut rs);
        assert_eq!(got, vec![(0, b"one".to_vec()), (1, b"two".to_vec())]);
        assert_eq!(missed, 0);
        for i in 0..10u8 {
            publish(&mut w, &mut ws, &[i]);
        }
        let (got, missed, _) = read_all(&r, &mut rs);
        assert_eq!(missed, 6);
        assert_eq!(got.iter().map(|g| g.0).collect::<Vec<_>>(), vec![8, 9, 10, 11]);
        assert!(!r.is_closed());
        w.close();
        assert!(r.is_closed());
    }

    #[test]
    fn readers_cannot_map_writable() {
        let (ring, signal, _w) = create_ring(G, false).unwrap();
        let ro = memfd::reopen_read_only(ring.as_fd()).unwrap();
        assert!(RingMap::map(ro.as_fd(), signal.as_fd(), G, true).is_err());
        assert!(RingMap::map(ro.as_fd(), signal.as_fd(), G, false).is_ok());
    }

    #[test]
    fn wrong_geometry_or_unsealed_memfd_is_refused() {
        let (ring, signal, _w) = create_ring(G, false).unwrap();
        let other = Geometry { slot_size: 64, slot_count: 8 };
        assert!(matches!(
            RingMap::map(ring.as_fd(), signal.as_fd(), other, false),
            Err(RingMapError::Size { .. })
        ));
        let loose = memfd::create("x", G.total_len() as u64).unwrap();
        assert!(matches!(
            RingMap::map(loose.as_fd(), signal.as_fd(), G, false),
            Err(RingMapError::NotSealed)
        ));
        assert!(Geometry { slot_size: 0, slot_count: 4 }.validate().is_err());
        assert!(Geometry { slot_size: 8, slot_count: 1 }.validate().is_err());
    }

    /// A hostile publisher writes garbage everywhere it can: the reader
    /// reports misses and corruption, never panics, never reads outside.
    #[test]
    fn garbage_from_a_hostile_publisher_is_reported_not_trusted() {
        let (ring, signal, mut w) = create_ring(G, false).unwrap();
        let ro = memfd::reopen_read_only(ring.as_fd()).unwrap();
        let r = RingMap::map(ro.as_fd(), signal.as_fd(), G, false).unwrap();
        let mut rs = ReaderState::default();
        let mut seed = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut outcomes = [0usize; 4];
        for round in 0..10_000 {
            let head = match round % 4 {
                0 => next(),
                1 => rs.next.wrapping_add(1),
                2 => rs.next.wrapping_add(next() % 8),
                _ => u64::MAX - next() % 4,
            };
            let seq = match round % 3 {
                0 => rs.next.wrapping_mul(2).wrapping_add(2),
                1 => next(),
                _ => rs.next.wrapping_mul(2).wrapping_add(1),
            };
            let len = if round % 2 == 0 { next() as u32 } else { (next() % 65) as u32 };
            w.scribble(head, (next() % 4) as usize, seq, len, next() as u8);
            match try_read(&r, &mut rs, &mut [0; 64], |b| {
                assert!(b.len() <= 64, "read past the slot");
                b.len()
            }) {
                ReadOutcome::Empty => outcomes[0] += 1,
                ReadOutcome::Message { .. } => outcomes[1] += 1,
                ReadOutcome::Missed(_) => outcomes[2] += 1,
                ReadOutcome::Corrupt(_) => outcomes[3] += 1,
            }
        }
        assert!(outcomes[3] > 0 && outcomes[2] > 0, "{outcomes:?}");
    }

    /// Seals are checked before the size: a sender could shrink an
    /// unsealed memfd between a size check and the mapping.
    #[test]
    fn seals_are_checked_before_the_size() {
        let loose = memfd::create("x", 100).unwrap();
        let (_ring, signal, _w) = create_ring(G, false).unwrap();
        assert!(matches!(
            RingMap::map(loose.as_fd(), signal.as_fd(), G, false),
            Err(RingMapError::NotSealed)
        ));
    }

    /// A write begun and given up (a dropped loan) in overwrite mode: the
    /// message that slot held is lost, and a reader must count it missed,
    /// never accept the half-written bytes as that message.
    #[test]
    fn an_abandoned_write_reads_as_missed() {
        let (ring, signal, mut w) = create_ring(G, false).unwrap();
        let ro = memfd::reopen_read_only(ring.as_fd()).unwrap();
        let r = RingMap::map(ro.as_fd(), signal.as_fd(), G, false).unwrap();
        let (mut ws, mut rs) = (WriterState::default(), ReaderState::default());
        for i in 0..4u8 {
            publish(&mut w, &mut ws, &[i; 64]);
        }
        // Message 4 goes to slot 0, over message 0, which nobody read yet.
        let index = begin_write(&w, &ws);
        w.slot_data_mut(index)[..32].fill(0xee);
        abandon_write(&w, &ws, index);
        let (got, missed, corrupt) = read_all(&r, &mut rs);
        assert_eq!((missed, corrupt), (1, 0), "{got:?}");
        assert_eq!(got, (1..4u8).map(|i| (u64::from(i), vec![i; 64])).collect::<Vec<_>>());
        // The next publish fills the slot properly.
        publish(&mut w, &mut ws, b"four");
        assert_eq!(read_all(&r, &mut rs).0, vec![(4, b"four".to_vec())]);
    }
}
