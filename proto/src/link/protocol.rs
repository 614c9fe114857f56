//! The link protocol: one producer, one consumer, a byte ring of records.
//!
//! Written on plain references to the shared atomics so the same functions
//! run on a real mapping and, under `--cfg loom`, on a heap model where
//! loom explores every interleaving (`link::model`). Callers add only the
//! doorbells (a socket packet, a futex wake) and the sleeping.
//!
//! Producer, for a record of `n` bytes (`rec = 8 + n` rounded up to 8):
//! 1. if `tail + pad + rec - head_seen > capacity`, load the consumer's
//!    `head` (Acquire: pairs with the consumer's Release store of `head`,
//!    so its reads of the bytes it gave back happened before we overwrite
//!    them); still no room: report full;
//! 2. write the record's words (Relaxed), and a `Pad` first if it would
//!    not fit before the end;
//! 3. [`Producer::publish`]: `tail` (Release: pairs with the consumer's
//!    Acquire load of `tail`, so the words are visible before the position
//!    that covers them);
//! 4. [`Producer::must_ring`]: a SeqCst fence, then load the consumer's
//!    `consumer_sleep`: pairs with the fence in [`Consumer::prepare_sleep`]
//!    (store flag, fence, load `tail`), the store-buffering pattern: either
//!    we see the raised flag and ring, or the consumer sees our `tail` and
//!    does not sleep. Rung once per raise (the flag's value), so a sleeper
//!    costs one doorbell however many records follow.
//!
//! Consumer:
//! 1. `tail` (Acquire), checked: it never moves back and is never more
//!    than `capacity` ahead of `head`;
//! 2. the record header word at `head % capacity`, checked against *our*
//!    capacity and the largest record: a length or kind that cannot be is
//!    [`LinkError::Corrupt`], never a read out of bounds;
//! 3. the record's words copied out (Relaxed atomic loads: the producer is
//!    another process, and a hostile one may be writing them right now, so
//!    they are never borrowed as `&[u8]`): a frame's up to the reader's
//!    bound ([`Consumer::truncate_frames`]), a marker's never (it has no
//!    content; a length it claims costs the reader nothing);
//! 4. [`Consumer::commit`]: `head` (Release, pairs with step 1 above);
//! 5. [`Consumer::must_ring_room`]: a SeqCst fence, then the producer's
//!    `producer_wait`: pairs with the fence in [`Producer::prepare_wait`]
//!    (store flag, fence, load `head`). Rung once per raise, and only when
//!    the ring is down to half, so a blocked producer wakes to room for
//!    many records, not one.
//!
//! A hostile peer can only make these functions return errors: every index
//! is reduced by our own capacity and every length bounded by it.

use crate::link::layout::{HalfHeader, KIND_FRAME, KIND_MARKER, KIND_PAD, RECORD_HEADER};
use crate::sync::{fence, AtomicU64, Ordering};

/// Where a half's owner runs, as it last said: a hint by which the other
/// side decides whether to give up its CPU while it spins (on a machine
/// with fewer CPUs than busy processes, a peer that shares our CPU can run
/// only when we yield; one on another CPU needs nothing from us). Never
/// trusted for anything else: a peer that lies only changes when the
/// other side yields, which it bounds on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Not said (a peer that does not tell, or has not yet).
    Unknown,
    /// Waiting for the other half's ring, with nothing else to do: it
    /// needs the CPU only once records come.
    Waiting { cpu: u32 },
    /// Running its own code, last seen on `cpu`.
    Running { cpu: u32 },
}

impl Presence {
    fn word(self) -> u32 {
        match self {
            Presence::Unknown => 0,
            Presence::Waiting { cpu } => (cpu.wrapping_add(1) << 1) | 1,
            Presence::Running { cpu } => cpu.wrapping_add(1) << 1,
        }
    }

    fn from_word(w: u32) -> Presence {
        let cpu = (w >> 1).wrapping_sub(1);
        match (w >> 1, w & 1) {
            (0, _) => Presence::Unknown,
            (_, 1) => Presence::Waiting { cpu },
            _ => Presence::Running { cpu },
        }
    }

    /// Says where we run, in our own half.
    pub fn announce(self, mine: &HalfHeader) {
        // Relaxed: a hint, ordered with nothing; a stale value costs the
        // other side one yield too many or too few.
        mine.presence.v.store(self.word(), Ordering::Relaxed);
    }

    /// What the peer last said (any word reads as some presence).
    pub fn of(peer: &HalfHeader) -> Presence {
        // Relaxed: as in `announce`.
        Presence::from_word(peer.presence.v.load(Ordering::Relaxed))
    }
}

/// What a peer did that the protocol does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("a {len}-byte frame is larger than the link carries ({max} bytes)")]
    TooLarge { len: usize, max: usize },
    #[error("the peer corrupted the shared-memory link: {0}")]
    Corrupt(&'static str),
}

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    /// A frame, exactly as a socket packet would carry it.
    Frame,
    /// The next frame travels on the socket (it carries fds); this keeps
    /// its place in the order.
    Marker,
}

fn record_len(len: usize) -> u64 {
    (RECORD_HEADER + len.next_multiple_of(8)) as u64
}

/// Largest frame a ring of `capacity` bytes carries: half of it, so that a
/// record always fits after a `Pad`.
pub fn max_frame(capacity: u64) -> usize {
    (capacity / 2) as usize - RECORD_HEADER
}

fn header_word(kind: u32, len: u32) -> u64 {
    (u64::from(kind) << 32) | u64::from(len)
}

/// Writes the concatenation of `parts` into `words` (Relaxed stores, one
/// per 8 bytes, the last padded with zeros). A word that straddles two
/// parts is gathered a byte at a time (at most 7), not through `memcpy`
/// and `memset` calls, which for a few bytes cost more than the copy.
fn write_words(words: &[AtomicU64], parts: &[&[u8]]) {
    let mut at = 0;
    // Bytes gathered for the next word, low byte first, and how many.
    let mut acc = 0u64;
    let mut fill = 0;
    for part in parts {
        let mut bytes: &[u8] = part;
        if fill > 0 {
            while fill < 8 {
                let Some((&b, rest)) = bytes.split_first() else { break };
                acc |= u64::from(b) << (8 * fill);
                fill += 1;
                bytes = rest;
            }
            if fill < 8 {
                // The part ended inside the word.
                continue;
            }
            // Relaxed: published by the Release store of `tail`.
            words[at].store(acc, Ordering::Relaxed);
            at += 1;
            (acc, fill) = (0, 0);
        }
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            // Relaxed: as above.
            words[at].store(u64::from_le_bytes(c.try_into().expect("8 bytes")), Ordering::Relaxed);
            at += 1;
        }
        for &b in chunks.remainder() {
            acc |= u64::from(b) << (8 * fill);
            fill += 1;
        }
    }
    if fill > 0 {
        // Relaxed: as above.
        words[at].store(acc, Ordering::Relaxed);
    }
}

/// Appends `len` bytes read from `words` (Relaxed loads) to `out`.
fn read_words(words: &[AtomicU64], len: usize, out: &mut Vec<u8>) {
    out.reserve(len);
    let (full, rest) = (len / 8, len % 8);
    for w in &words[..full] {
        // Relaxed: ordered by the Acquire load of `tail`.
        out.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
    }
    if rest > 0 {
        // Relaxed: as above.
        out.extend_from_slice(&words[full].load(Ordering::Relaxed).to_le_bytes()[..rest]);
    }
}

/// The writing side of one ring. Its positions are private; shared memory
/// only ever receives them.
#[derive(Debug)]
pub struct Producer {
    capacity: u64,
    /// `capacity - 1`: an offset is `position & mask` (the division by a
    /// capacity not known at compile time, and the instructions waiting on
    /// it, were about 7% of `try_push`'s samples).
    mask: u64,
    tail: u64,
    published: u64,
    head_seen: u64,
    /// The consumer's `consumer_sleep` value last rung for.
    rung: u32,
    /// Our `producer_wait` value.
    wait: u32,
}

impl Producer {
    /// A producer for a ring of `capacity` bytes, a power of two (as every
    /// mapping checks with `valid_capacity`).
    pub fn new(capacity: u32) -> Producer {
        assert!(capacity.is_power_of_two(), "a link ring's capacity is a power of two");
        let capacity = u64::from(capacity);
        Producer { capacity, mask: capacity - 1, tail: 0, published: 0, head_seen: 0, rung: 0, wait: 0 }
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Largest frame this ring carries.
    pub fn max_frame(&self) -> usize {
        max_frame(self.capacity)
    }

    /// Bytes a record of `len` takes, with the `Pad` it may need first.
    fn need(&self, len: usize) -> u64 {
        let rec = record_len(len);
        let off = self.tail & self.mask;
        if off + rec > self.capacity {
            self.capacity - off + rec
        } else {
            rec
        }
    }

    /// Loads the consumer's `head`, checked.
    fn refresh(&mut self, peer: &HalfHeader) -> Result<(), LinkError> {
        // Acquire: pairs with the consumer's Release store in `commit`.
        let h = peer.head.v.load(Ordering::Acquire);
        if h < self.head_seen || h > self.tail {
            return Err(LinkError::Corrupt("the reader's position moved back or past the end"));
        }
        self.head_seen = h;
        Ok(())
    }

    /// Whether a record of `len` bytes fits now (loads the consumer's
    /// position only when the last one seen leaves too little room).
    pub fn has_room(&mut self, peer: &HalfHeader, len: usize) -> Result<bool, LinkError> {
        let need = self.need(len);
        if self.tail + need - self.head_seen <= self.capacity {
            return Ok(true);
        }
        self.refresh(peer)?;
        Ok(self.tail + need - self.head_seen <= self.capacity)
    }

    /// Writes one record of the concatenated `parts`; not yet visible to
    /// the consumer (see [`Producer::publish`]). `Ok(false)`: no room.
    pub fn try_push(
        &mut self,
        peer: &HalfHeader,
        data: &[AtomicU64],
        kind: RecordKind,
        parts: &[&[u8]],
    ) -> Result<bool, LinkError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.max_frame() {
            return Err(LinkError::TooLarge { len, max: self.max_frame() });
        }
        if !self.has_room(peer, len)? {
            return Ok(false);
        }
        let mut off = (self.tail & self.mask) as usize;
        let rec = record_len(len);
        if off as u64 + rec > self.capacity {
            let pad = self.capacity as usize - off;
            // Relaxed: published by the Release store of `tail`.
            data[off / 8].store(header_word(KIND_PAD, (pad - RECORD_HEADER) as u32), Ordering::Relaxed);
            self.tail += pad as u64;
            off = 0;
        }
        let k = match kind {
            RecordKind::Frame => KIND_FRAME,
            RecordKind::Marker => KIND_MARKER,
        };
        // Relaxed: as above.
        data[off / 8].store(header_word(k, len as u32), Ordering::Relaxed);
        let words = &data[off / 8 + 1..off / 8 + rec as usize / 8];
        write_words(words, parts);
        self.tail += rec;
        Ok(true)
    }

    /// Whether records were written since the last [`Producer::publish`].
    pub fn unpublished(&self) -> bool {
        self.published != self.tail
    }

    /// Whether the consumer has yet to read something we published (a
    /// hint: `head` is loaded Relaxed and not checked; a lie shows at the
    /// next `has_room`).
    pub fn unread(&self, peer: &HalfHeader) -> bool {
        // Relaxed: only a hint for scheduling, see `Presence`.
        peer.head.v.load(Ordering::Relaxed) != self.published
    }

    /// Makes every record written so far visible to the consumer.
    pub fn publish(&mut self, mine: &HalfHeader) {
        if self.published != self.tail {
            // Release: pairs with the consumer's Acquire load of `tail`.
            mine.tail.v.store(self.tail, Ordering::Release);
            self.published = self.tail;
        }
    }

    /// After [`Producer::publish`]: whether the consumer is asleep and must
    /// be rung (once per time it fell asleep).
    pub fn must_ring(&mut self, peer: &HalfHeader) -> bool {
        // SeqCst: pairs with the fence in `Consumer::prepare_sleep`.
        fence(Ordering::SeqCst);
        // Relaxed: ordered by the fence.
        let s = peer.consumer_sleep.v.load(Ordering::Relaxed);
        if s & 1 == 1 && s != self.rung {
            self.rung = s;
            return true;
        }
        false
    }

    /// Before sleeping for room for a record of `len`: raises our
    /// `producer_wait` and looks again. `Ok(true)`: still full, sleep (the
    /// consumer rings once it has read the ring down to half); `Ok(false)`:
    /// room now, the flag is lowered again.
    pub fn prepare_wait(
        &mut self,
        mine: &HalfHeader,
        peer: &HalfHeader,
        len: usize,
    ) -> Result<bool, LinkError> {
        if self.wait & 1 == 0 {
            self.wait = self.wait.wrapping_add(1);
            // Relaxed: ordered by the fence below.
            mine.producer_wait.v.store(self.wait, Ordering::Relaxed);
        }
        // SeqCst: pairs with the fence in `Consumer::must_ring_room`.
        fence(Ordering::SeqCst);
        self.refresh(peer)?;
        if self.tail + self.need(len) - self.head_seen <= self.capacity {
            self.end_wait(mine);
            return Ok(false);
        }
        Ok(true)
    }

    /// Lowers our `producer_wait` flag (no-op if it is down).
    pub fn end_wait(&mut self, mine: &HalfHeader) {
        if self.wait & 1 == 1 {
            self.wait = self.wait.wrapping_add(1);
            // Relaxed: only tells the consumer it need not ring.
            mine.producer_wait.v.store(self.wait, Ordering::Relaxed);
        }
    }
}

/// The reading side of one ring.
#[derive(Debug)]
pub struct Consumer {
    capacity: u64,
    /// `capacity - 1`, as the producer's.
    mask: u64,
    head: u64,
    committed: u64,
    tail_seen: u64,
    /// Our `consumer_sleep` value.
    sleep: u32,
    /// The producer's `producer_wait` value last rung for.
    rung: u32,
    /// `committed` at the last [`Consumer::must_ring_room`] that looked.
    room_seen: u64,
    /// Most bytes of a frame copied out ([`Consumer::truncate_frames`]).
    copy_max: usize,
}

impl Consumer {
    /// A consumer for a ring of `capacity` bytes, a power of two.
    pub fn new(capacity: u32) -> Consumer {
        assert!(capacity.is_power_of_two(), "a link ring's capacity is a power of two");
        Consumer {
            capacity: u64::from(capacity),
            mask: u64::from(capacity) - 1,
            head: 0,
            committed: 0,
            tail_seen: 0,
            sleep: 0,
            rung: 0,
            room_seen: 0,
            copy_max: usize::MAX,
        }
    }

    /// Copies at most `max` bytes of each frame out (its first ones) and
    /// skips the rest, as a socket receive truncates a packet larger than
    /// its buffer: a reader that refuses frames over some size finds out
    /// from `out` holding more than it takes, without copying a hostile
    /// producer's half a ring. (A marker's content is never copied: it
    /// has none, and any there is ignored.)
    pub fn truncate_frames(&mut self, max: usize) {
        self.copy_max = max;
    }

    /// Loads the producer's `tail`, checked.
    fn refresh(&mut self, peer: &HalfHeader) -> Result<(), LinkError> {
        // Acquire: pairs with the producer's Release store in `publish`.
        let t = peer.tail.v.load(Ordering::Acquire);
        if t < self.tail_seen || t - self.head > self.capacity {
            return Err(LinkError::Corrupt(
                "the writer's position moved back or past the reader by more than the ring",
            ));
        }
        self.tail_seen = t;
        Ok(())
    }

    /// Whether a record is waiting (loads the producer's position if the
    /// last one seen is used up).
    pub fn is_empty(&mut self, peer: &HalfHeader) -> Result<bool, LinkError> {
        if self.head == self.tail_seen {
            self.refresh(peer)?;
        }
        Ok(self.head == self.tail_seen)
    }

    /// The next record, its bytes appended to `out` (a frame's, up to
    /// [`Consumer::truncate_frames`]; a marker's, none). `Ok(None)`: the ring
    /// is empty. Not given back to the producer until [`Consumer::commit`].
    pub fn next(
        &mut self,
        peer: &HalfHeader,
        data: &[AtomicU64],
        out: &mut Vec<u8>,
    ) -> Result<Option<RecordKind>, LinkError> {
        loop {
            if self.is_empty(peer)? {
                return Ok(None);
            }
            let off = (self.head & self.mask) as usize;
            // Relaxed: ordered by the Acquire load of `tail`.
            let w = data[off / 8].load(Ordering::Relaxed);
            let (kind, len) = ((w >> 32) as u32, w as u32 as usize);
            let end = self.capacity as usize - off;
            let kind = match kind {
                KIND_PAD => {
                    if len + RECORD_HEADER != end || self.head + end as u64 > self.tail_seen {
                        return Err(LinkError::Corrupt("a pad record that does not end the ring"));
                    }
                    self.head += end as u64;
                    continue;
                }
                KIND_FRAME => RecordKind::Frame,
                KIND_MARKER => RecordKind::Marker,
                _ => return Err(LinkError::Corrupt("a record of an unknown kind")),
            };
            let rec = record_len(len);
            if len > max_frame(self.capacity) || rec as usize > end || self.head + rec > self.tail_seen {
                return Err(LinkError::Corrupt("a record longer than the ring or than what was written"));
            }
            let copy = match kind {
                RecordKind::Frame => len.min(self.copy_max),
                RecordKind::Marker => 0,
            };
            read_words(&data[off / 8 + 1..off / 8 + rec as usize / 8], copy, out);
            self.head += rec;
            return Ok(Some(kind));
        }
    }

    /// Gives every record read so far back to the producer.
    pub fn commit(&mut self, mine: &HalfHeader) {
        if self.committed != self.head {
            // Release: pairs with the producer's Acquire load of `head`.
            mine.head.v.store(self.head, Ordering::Release);
            self.committed = self.head;
        }
    }

    /// After [`Consumer::commit`]: whether the producer waits for room and
    /// must be rung (once per wait, when the ring is down to half).
    ///
    /// Only a commit that gave room back looks: a producer that raised its
    /// flag since we last looked re-checked `head` after (the fences below
    /// and in `prepare_wait`) and saw all the room there is; if it still
    /// waits, records remain for us to read, and the commit after them
    /// looks. Without this, a hostile producer raising a fresh flag value
    /// at every moment would buy a wake-up (a system call) per look.
    pub fn must_ring_room(&mut self, peer: &HalfHeader) -> bool {
        if self.committed == self.room_seen {
            return false;
        }
        self.room_seen = self.committed;
        // SeqCst: pairs with the fence in `Producer::prepare_wait`.
        fence(Ordering::SeqCst);
        // Relaxed: ordered by the fence.
        let s = peer.producer_wait.v.load(Ordering::Relaxed);
        if s & 1 == 0 || s == self.rung {
            return false;
        }
        // How full the ring is now: the `tail` we saw last may be long
        // stale (it is loaded only when we catch up with it), and a
        // producer woken to a ring that is still nearly full would wait
        // again at once. Relaxed: only a measure; a value that moved back
        // is as good as the last one seen (`next` reports the lie).
        let tail = peer.tail.v.load(Ordering::Relaxed).max(self.tail_seen);
        if tail.saturating_sub(self.committed) <= self.capacity / 2 {
            self.rung = s;
            return true;
        }
        false
    }

    /// Before sleeping: raises our `consumer_sleep` and looks again.
    /// `Ok(true)`: still empty, sleep (the producer rings once); `Ok(false)`:
    /// something came, the flag is lowered again.
    pub fn prepare_sleep(&mut self, mine: &HalfHeader, peer: &HalfHeader) -> Result<bool, LinkError> {
        if self.sleep & 1 == 0 {
            self.sleep = self.sleep.wrapping_add(1);
            // Relaxed: ordered by the fence below.
            mine.consumer_sleep.v.store(self.sleep, Ordering::Relaxed);
        }
        // SeqCst: pairs with the fence in `Producer::must_ring`.
        fence(Ordering::SeqCst);
        self.refresh(peer)?;
        if self.head != self.tail_seen {
            self.wake(mine);
            return Ok(false);
        }
        Ok(true)
    }

    /// Whether our `consumer_sleep` flag is raised.
    pub fn sleeping(&self) -> bool {
        self.sleep & 1 == 1
    }

    /// Lowers our `consumer_sleep` flag (no-op if it is down).
    pub fn wake(&mut self, mine: &HalfHeader) {
        if self.sleep & 1 == 1 {
            self.sleep = self.sleep.wrapping_add(1);
            // Relaxed: only tells the producer it need not ring.
            mine.consumer_sleep.v.store(self.sleep, Ordering::Relaxed);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const CAP: u32 = 256;

    fn ring() -> (HalfHeader, HalfHeader, Vec<AtomicU64>) {
        (HalfHeader::default(), HalfHeader::default(), (0..CAP / 8).map(|_| AtomicU64::new(0)).collect())
    }

    proptest::proptest! {
        /// However a record's bytes are cut into parts, the words hold
        /// their concatenation, padded with zeros to the word.
        #[test]
        fn words_hold_the_parts_concatenated_and_zero_padded(
            parts in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20), 0..5),
        ) {
            let all: Vec<u8> = parts.concat();
            let words: Vec<AtomicU64> = (0..13).map(|_| AtomicU64::new(u64::MAX)).collect();
            let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            write_words(&words, &refs);
            let mut out = Vec::new();
            read_words(&words, all.len().next_multiple_of(8), &mut out);
            proptest::prop_assert_eq!(&out[..all.len()], &all[..]);
            proptest::prop_assert!(out[all.len()..].iter().all(|&b| b == 0));
            // Nothing written past the record.
            let used = all.len().div_ceil(8);
            proptest::prop_assert!(words[used..].iter().all(|w| w.load(Ordering::Relaxed) == u64::MAX));
        }
    }

    #[test]
    fn records_round_trip_across_the_end_in_order() {
        let (p_half, c_half, data) = ring();
        let (mut p, mut c) = (Producer::new(CAP), Consumer::new(CAP));
        let mut out = Vec::new();
        for i in 0..200u32 {
            let body = vec![i as u8; (i % 37) as usize];
            let head = i.to_le_bytes();
            assert!(p.try_push(&c_half, &data, RecordKind::Frame, &[&head, &body]).unwrap());
            p.publish(&p_half);
            out.clear();
            assert_eq!(c.next(&p_half, &data, &mut out).unwrap(), Some(RecordKind::Frame));
            assert_eq!(&out[..4], &head);
            assert_eq!(&out[4..], &body[..]);
            c.commit(&c_half);
            assert_eq!(c.next(&p_half, &data, &mut out).unwrap(), None);
        }
    }

    #[test]
    fn a_full_ring_says_so_and_frees_room_as_read() {
        let (p_half, c_half, data) = ring();
        let (mut p, mut c) = (Producer::new(CAP), Consumer::new(CAP));
        let mut n = 0;
        while p.try_push(&c_half, &data, RecordKind::Marker, &[&[1u8; 20]]).unwrap() {
            n += 1;
        }
        assert_eq!(n, CAP as usize / 32);
        p.publish(&p_half);
        // Waiting for room: the flag goes up, and the consumer rings once,
        // when it has read down to half.
        assert!(p.prepare_wait(&p_half, &c_half, 20).unwrap());
        let mut out = Vec::new();
        let mut rings = 0;
        for _ in 0..n {
            assert_eq!(c.next(&p_half, &data, &mut out).unwrap(), Some(RecordKind::Marker));
            c.commit(&c_half);
            rings += usize::from(c.must_ring_room(&p_half));
        }
        assert_eq!(rings, 1);
        assert!(!p.prepare_wait(&p_half, &c_half, 20).unwrap());
        assert!(p.try_push(&c_half, &data, RecordKind::Frame, &[b"x"]).unwrap());
    }

    #[test]
    fn room_is_rung_for_by_how_full_the_ring_is_now_not_when_last_looked() {
        let (p_half, c_half, data) = ring();
        let (mut p, mut c) = (Producer::new(CAP), Consumer::new(CAP));
        let mut out = Vec::new();
        let fill = |p: &mut Producer| {
            while p.try_push(&c_half, &data, RecordKind::Frame, &[&[1u8; 20]]).unwrap() {}
            p.publish(&p_half);
        };
        fill(&mut p);
        while c.next(&p_half, &data, &mut out).unwrap().is_some() {}
        c.commit(&c_half);
        // The reader is caught up with the tail it saw; the writer fills
        // the ring again behind its back and waits for room.
        fill(&mut p);
        assert!(p.prepare_wait(&p_half, &c_half, 20).unwrap());
        assert!(!c.must_ring_room(&p_half), "the ring is full: waking the writer now wakes it for nothing");
        for _ in 0..4 {
            assert!(c.next(&p_half, &data, &mut out).unwrap().is_some());
        }
        c.commit(&c_half);
        assert!(c.must_ring_room(&p_half), "read down to half");
    }

    #[test]
    fn a_sleeper_is_rung_once_per_sleep() {
        let (p_half, c_half, data) = ring();
        let (mut p, mut c) = (Producer::new(CAP), Consumer::new(CAP));
        assert!(c.prepare_sleep(&c_half, &p_half).unwrap());
        let mut rings = 0;
        for _ in 0..3 {
            assert!(p.try_push(&c_half, &data, RecordKind::Frame, &[b"ab"]).unwrap());
            p.publish(&p_half);
            rings += usize::from(p.must_ring(&c_half));
        }
        assert_eq!(rings, 1);
        c.wake(&c_half);
        assert!(!c.prepare_sleep(&c_half, &p_half).unwrap(), "records wait: no sleep");
        assert!(!p.must_ring(&c_half));
    }

    #[test]
    fn lies_are_errors_not_reads_out_of_bounds() {
        let (p_half, c_half, data) = ring();
        let mut c = Consumer::new(CAP);
        let mut out = Vec::new();
        // A tail more than the ring ahead.
        p_half.tail.v.store(u64::from(CAP) + 8, Ordering::Relaxed);
        assert!(c.next(&p_half, &data, &mut out).is_err());
        // Lengths and kinds that cannot be.
        for w in [
            header_word(KIND_FRAME, u32::MAX),
            header_word(9, 1),
            header_word(KIND_PAD, 3),
            header_word(KIND_FRAME, 64),
        ] {
            let mut c = Consumer::new(CAP);
            data[0].store(w, Ordering::Relaxed);
            p_half.tail.v.store(16, Ordering::Relaxed);
            assert!(c.next(&p_half, &data, &mut out).is_err(), "{w:#x}");
        }
        // A tail that moves back.
        let mut c = Consumer::new(CAP);
        data[0].store(header_word(KIND_FRAME, 1), Ordering::Relaxed);
        p_half.tail.v.store(16, Ordering::Relaxed);
        assert!(c.next(&p_half, &data, &mut out).unwrap().is_some());
        p_half.tail.v.store(8, Ordering::Relaxed);
        assert!(c.next(&p_half, &data, &mut out).is_err());
        // A reader position that runs ahead of what was written.
        let mut p = Producer::new(CAP);
        c_half.head.v.store(1 << 40, Ordering::Relaxed);
        assert!(p.prepare_wait(&p_half, &c_half, 8).is_err());
    }

    proptest::proptest! {
        /// Whatever a hostile producer writes (words and positions), the
        /// consumer returns records within what it copied or an error, and
        /// never panics or reads out of bounds.
        #[test]
        fn a_hostile_ring_never_makes_the_consumer_panic(
            words in proptest::collection::vec(proptest::prelude::any::<u64>(), (CAP / 8) as usize),
            tails in proptest::collection::vec(0u64..4 * u64::from(CAP), 1..8),
        ) {
            let (p_half, c_half, data) = ring();
            for (w, v) in data.iter().zip(&words) {
                w.store(*v, Ordering::Relaxed);
            }
            let mut c = Consumer::new(CAP);
            let mut out = Vec::new();
            for t in tails {
                p_half.tail.v.store(t, Ordering::Relaxed);
                for _ in 0..64 {
                    out.clear();
                    match c.next(&p_half, &data, &mut out) {
                        Ok(Some(_)) => proptest::prop_assert!(out.len() <= max_frame(u64::from(CAP))),
                        Ok(None) | Err(_) => break,
                    }
                }
                c.commit(&c_half);
            }
        }
    }

    /// A reader pays only for what it takes: a marker's claimed content is
    /// skipped, a frame past the reader's bound is copied up to one byte
    /// more than it takes (so it knows), and the records after both come
    /// whole.
    #[test]
    fn marker_content_is_skipped_and_frames_are_copied_up_to_the_bound() {
        let (p_half, c_half, data) = ring();
        let (mut p, mut c) = (Producer::new(CAP), Consumer::new(CAP));
        c.truncate_frames(17);
        let mut out = Vec::new();
        assert!(p.try_push(&c_half, &data, RecordKind::Marker, &[&[9u8; 40]]).unwrap());
        assert!(p.try_push(&c_half, &data, RecordKind::Frame, &[&[1u8; 60]]).unwrap());
        assert!(p.try_push(&c_half, &data, RecordKind::Frame, &[&[2u8; 16]]).unwrap());
        p.publish(&p_half);
        assert_eq!(c.next(&p_half, &data, &mut out).unwrap(), Some(RecordKind::Marker));
        assert!(out.is_empty(), "a marker's content is not copied");
        assert_eq!(c.next(&p_half, &data, &mut out).unwrap(), Some(RecordKind::Frame));
        assert_eq!(out, [1u8; 17], "a long frame: its first bytes, up to the bound");
        out.clear();
        assert_eq!(c.next(&p_half, &data, &mut out).unwrap(), Some(RecordKind::Frame));
        assert_eq!(out, [2u8; 16]);
        assert_eq!(c.next(&p_half, &data, &mut out).unwrap(), None);
    }

    #[test]
    fn too_large_is_refused() {
        let (_, c_half, data) = ring();
        let mut p = Producer::new(CAP);
        let big = vec![0u8; max_frame(u64::from(CAP)) + 1];
        assert!(matches!(
            p.try_push(&c_half, &data, RecordKind::Frame, &[&big]),
            Err(LinkError::TooLarge { .. })
        ));
    }
}
