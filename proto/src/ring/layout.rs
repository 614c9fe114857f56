//! The shared-memory layout of a ring channel. Every struct here is
//! `#[repr(C)]`, holds offsets (never pointers), and starts with a magic
//! and version word. Every field is an atomic, because another process
//! may write it at any time; values read from here are untrusted input.

use crate::sync::{AtomicU32, AtomicU64};

/// "SHMBRING" in ASCII, little-endian.
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"SHMBRING");
/// "SHMBSIGN".
pub const SIGNAL_MAGIC: u64 = u64::from_le_bytes(*b"SHMBSIGN");
/// "SHMBCURS".
pub const CURSOR_MAGIC: u64 = u64::from_le_bytes(*b"SHMBCURS");
pub const LAYOUT_VERSION: u32 = 2;

/// Bytes before the first slot (the header, padded to a page).
pub const HEADER_LEN: usize = 4096;
/// Bytes of a slot's own header, before its data.
pub const SLOT_HEADER_LEN: usize = 16;
/// Size of the signal and cursor memfds.
pub const PAGE_LEN: usize = 4096;

/// Page 0 of the ring memfd. Written by the broker (geometry, at creation;
/// `members`; `closed`, when the publisher dies) and the publisher (`head`,
/// `closed`); readers map it read-only, so nothing here can be changed by
/// a reader.
#[repr(C, align(64))]
pub struct RingHeader {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    /// 0 = overwrite, 1 = block.
    pub overflow: AtomicU32,
    pub slot_size: AtomicU32,
    pub slot_count: AtomicU32,
    /// Bumped by the broker each time a reader joins or leaves; the
    /// publisher compares it with the last change it applied, so it looks
    /// at its socket for news only when there is some (see
    /// `protocol::join`). Here, not in the signal page, because a reader
    /// must not be able to make the publisher look on every message.
    pub members: AtomicU32,
    _pad0: [u8; 36],
    /// Messages published so far: the sequence number of the next one.
    /// On its own cache line: the one word every reader polls.
    pub head: AtomicU64,
    /// Non-zero once the publisher closed or died.
    pub closed: AtomicU32,
    _pad1: [u8; 52],
}

/// One slot's header; `slot_size` data bytes follow it.
///
/// `seq` is a seqlock word for message `n`: `2n + 1` while it is being
/// written, `2n + 2` once it is complete.
#[repr(C)]
pub struct SlotHeader {
    pub seq: AtomicU64,
    pub len: AtomicU32,
    _pad: u32,
}

/// The signal page: shared read-write by the publisher and every reader,
/// because sleeping and waking need writes from both sides. Nothing in it
/// can make a reader accept bad data or the publisher look at its socket;
/// a scribbler can only cause spurious or late wake-ups (and `FUTEX_WAKE`
/// calls, as a sleeping reader legitimately does), which every waiter
/// bounds with a timeout.
#[repr(C, align(64))]
pub struct Signal {
    pub magic: AtomicU64,
    /// Futex word readers sleep on; the publisher bumps it to wake them.
    pub wake: AtomicU32,
    /// Readers asleep (or about to be) on `wake`.
    pub waiters: AtomicU32,
    /// Messages readers found overwritten or torn, all readers together.
    pub overruns: AtomicU64,
    _pad0: [u8; 40],
    /// Futex word a blocked publisher sleeps on; readers bump it.
    pub progress: AtomicU32,
    /// Non-zero while the publisher waits for a reader (block mode).
    pub publisher_waiting: AtomicU32,
    _pad1: [u8; 56],
}

/// One reader's cursor page: `next` written by that reader (the publisher
/// maps the page read-only), `ended` by the broker.
#[repr(C, align(64))]
pub struct Cursor {
    pub magic: AtomicU64,
    /// The sequence number the reader will read next.
    pub next: AtomicU64,
    _pad0: [u8; 48],
    /// 0 while the channel is open; set once by the broker when it ends
    /// the channel, and looked at by the reader on every read:
    /// [`ENDED_CLOSED`] or [`ENDED_REVOKED`]. Here, not in the ring
    /// header, because the publisher writes the header and could put a
    /// `closed` word back to 0 and go on reaching readers after the broker
    /// ended it; the publisher cannot write this page. (The reader can:
    /// it would only fool itself.) On its own cache line: the reader's
    /// look costs nothing while it is 0.
    pub ended: AtomicU32,
    _pad1: u32,
    /// With [`ENDED_CLOSED`]: the ring's `head` when the broker closed it
    /// (stored before `ended`, which orders it).
    pub end_at: AtomicU64,
    _pad2: [u8; 48],
}

/// [`Cursor::ended`]: the broker closed the channel because its publisher
/// left or died. The reader reads the messages before [`Cursor::end_at`],
/// then ends; and takes at most `slot_count + 1` more reads (messages or
/// missed runs) from when it first saw this, since `end_at` is the head a
/// publisher wrote: all an honest publisher can have left in the ring,
/// and all one that left but still holds its mapping can add.
pub const ENDED_CLOSED: u32 = 1;
/// [`Cursor::ended`]: the broker revoked the channel (a reloaded policy
/// took away the publisher's or the reader's right): the reader ends at
/// once, and its client's `Revoked` notice says why.
pub const ENDED_REVOKED: u32 = 2;

impl RingHeader {
    #[cfg(loom)]
    pub fn new_for_model(slot_size: u32, slot_count: u32, overflow: u32) -> RingHeader {
        RingHeader {
            magic: AtomicU64::new(RING_MAGIC),
            version: AtomicU32::new(LAYOUT_VERSION),
            overflow: AtomicU32::new(overflow),
            slot_size: AtomicU32::new(slot_size),
            slot_count: AtomicU32::new(slot_count),
            members: AtomicU32::new(0),
            _pad0: [0; 36],
            head: AtomicU64::new(0),
            closed: AtomicU32::new(0),
            _pad1: [0; 52],
        }
    }
}

impl SlotHeader {
    #[cfg(loom)]
    pub fn new_for_model() -> SlotHeader {
        SlotHeader { seq: AtomicU64::new(0), len: AtomicU32::new(0), _pad: 0 }
    }
}

impl Signal {
    #[cfg(loom)]
    pub fn new_for_model() -> Signal {
        Signal {
            magic: AtomicU64::new(SIGNAL_MAGIC),
            wake: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
            overruns: AtomicU64::new(0),
            _pad0: [0; 40],
            progress: AtomicU32::new(0),
            publisher_waiting: AtomicU32::new(0),
            _pad1: [0; 56],
        }
    }
}

impl Cursor {
    #[cfg(loom)]
    pub fn new_for_model() -> Cursor {
        Cursor {
            magic: AtomicU64::new(CURSOR_MAGIC),
            next: AtomicU64::new(0),
            _pad0: [0; 48],
            ended: AtomicU32::new(0),
            _pad1: 0,
            end_at: AtomicU64::new(0),
            _pad2: [0; 48],
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn layout_is_what_the_offsets_say() {
        assert_eq!(std::mem::size_of::<RingHeader>(), 128);
        assert_eq!(std::mem::offset_of!(RingHeader, head), 64);
        assert!(std::mem::offset_of!(RingHeader, members) < 64);
        assert_eq!(std::mem::size_of::<SlotHeader>(), SLOT_HEADER_LEN);
        assert_eq!(std::mem::size_of::<Signal>(), 128);
        assert_eq!(std::mem::offset_of!(Signal, progress), 64);
        assert_eq!(std::mem::size_of::<Cursor>(), 128);
        assert_eq!(std::mem::offset_of!(Cursor, ended), 64);
        assert_eq!(std::mem::offset_of!(Cursor, end_at), 72);
        assert!(std::mem::size_of::<RingHeader>() <= HEADER_LEN);
    }
}
