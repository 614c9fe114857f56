//! The shape of one half of a shared-memory link (see the module essay).
//!
//! A half is one memfd: a header page, then `capacity` bytes of ring data.
//! `#[repr(C)]`, offsets fixed, every shared word an atomic, so another
//! process writing any word at any moment is sound. The magic, version and
//! capacity are written once by the broker before the fd leaves it; after
//! that both sides use the capacity *they* agreed in the handshake, never
//! the one in memory.
//!
//! Records in the data area, at positions that are multiples of 8:
//! `[kind: u32 | len: u32]` as one little-endian u64 word (`len` in the low
//! half), then `len` bytes padded to 8. A record never wraps around the
//! end: when one would not fit before it, a `Pad` record fills the rest of
//! the area and the record starts again at offset 0.

use crate::sync::{AtomicU32, AtomicU64};

/// "shmblnk1".
pub const MAGIC: u64 = u64::from_le_bytes(*b"shmblnk1");
pub const VERSION: u32 = 1;
/// What the broker writes over the magic of its own half when it closes
/// the connection: a client's sender sees it at its next send (one load,
/// no system call) and fails as a send on a socket the broker closed does,
/// instead of writing into a ring nobody will read. (A broker that dies
/// without closing leaves the magic alone; the client's hang-up check
/// covers that.)
pub const CLOSED: u64 = u64::from_le_bytes(*b"shmbclsd");

/// Where the ring data starts in a half.
pub const DATA_OFFSET: usize = 4096;
/// Smallest, default and largest ring capacity (bytes of data per
/// direction). A power of two, so positions wrap with a mask; at least
/// twice the largest frame, so any frame fits after a `Pad`.
pub const MIN_CAPACITY: u32 = 256 * 1024;
pub const DEFAULT_CAPACITY: u32 = 256 * 1024;
pub const MAX_CAPACITY: u32 = 16 * 1024 * 1024;
/// Bytes of the record header word.
pub const RECORD_HEADER: usize = 8;

/// One cache line of a shared word.
#[repr(C, align(64))]
#[derive(Default)]
pub struct Line<T> {
    pub v: T,
}

/// The header page of one half. Every field is written by the half's
/// owner only (the broker for the identity words, before it is shared).
#[repr(C)]
#[derive(Default)]
pub struct HalfHeader {
    pub magic: Line<AtomicU64>,
    pub version: Line<AtomicU32>,
    pub capacity: Line<AtomicU32>,
    /// End of what the owner has written into this half's data area
    /// (a byte position that only grows; the offset is `tail % capacity`).
    pub tail: Line<AtomicU64>,
    /// How far the owner has read the *other* half's data area.
    pub head: Line<AtomicU64>,
    /// Odd: the owner, having found the other half's ring empty, is going
    /// to sleep; ring it once for this value. Even: awake.
    pub consumer_sleep: Line<AtomicU32>,
    /// Odd: the owner is waiting for room in its own data area; ring it
    /// once the other side has read it down to half. Even: not waiting.
    pub producer_wait: Line<AtomicU32>,
    /// Bumped by the owner each time it rings the other side for room: the
    /// futex word a blocked client sender sleeps on (broker half only).
    pub room: Line<AtomicU32>,
    /// Where the owner runs, as a scheduling hint for the other side and
    /// nothing else (see [`crate::link::protocol::Presence`]): 0 not said;
    /// else `(cpu + 1) << 1`, with bit 0 set while the owner waits for the
    /// other half's ring with nothing else to do (client half only).
    pub presence: Line<AtomicU32>,
}

/// Total bytes of one half for `capacity` bytes of data.
pub fn half_len(capacity: u32) -> usize {
    DATA_OFFSET + capacity as usize
}

/// Whether `capacity` is one the protocol allows.
pub fn valid_capacity(capacity: u32) -> bool {
    capacity.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity)
}

/// Record kinds.
pub const KIND_FRAME: u32 = 1;
pub const KIND_MARKER: u32 = 2;
pub const KIND_PAD: u32 = 3;

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn header_fits_the_header_page_and_fields_sit_on_their_own_lines() {
        assert!(std::mem::size_of::<HalfHeader>() <= DATA_OFFSET);
        assert_eq!(std::mem::size_of::<HalfHeader>(), 9 * 64);
        assert_eq!(std::mem::offset_of!(HalfHeader, tail), 3 * 64);
        assert_eq!(std::mem::offset_of!(HalfHeader, room), 7 * 64);
    }

    #[test]
    fn capacities() {
        assert!(valid_capacity(DEFAULT_CAPACITY));
        assert!(!valid_capacity(MIN_CAPACITY - 1));
        assert!(!valid_capacity(MAX_CAPACITY * 2));
        assert!(!valid_capacity(300 * 1024));
        assert!(MIN_CAPACITY as usize >= 2 * (crate::limits::MAX_PACKET + RECORD_HEADER));
    }
}
