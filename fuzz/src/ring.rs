//! The `ring_reader` harness: a ring channel reader over arbitrary
//! shared-memory contents and geometry.
//!
//! The ring is a real memfd, made the way the broker makes it
//! (`shm::create_ring`) or by hand (any size, any seals), and mapped as the
//! client maps it: the reader from a read-only fd with the geometry the
//! broker announced, which the input may make differ from the ring's or
//! make invalid; then the reader must refuse it cleanly (the right
//! `RingMapError`, never a panic). A reader that mapped joins through
//! `shm::join_reader`, as the broker adds one.
//!
//! Then the input plays the publisher, honest or hostile: it publishes
//! (`protocol::publish`, or a loan: `begin_write`, bytes, `commit` or
//! `abandon_write`), and scribbles anything over the header (head, the
//! geometry words, closed, members), the slots' sequence words and
//! lengths, their data words (the last one's padding too), the signal page,
//! and its own numbering. Between those it reads with the code that ships,
//! `protocol::try_read` over the reader's read-only `RingMap` (and
//! `prepare_sleep`/`end_sleep`, and `advance` in block mode, as
//! `ChannelSubscriber` does). A read may also be interleaved with one
//! publisher step, run from inside the read: the reader's `RingView` is
//! then the real one wrapped so that the step happens just before the
//! reader loads `head`, the slot's sequence word, or the slot's data (after
//! the first sequence check, before the copy and the re-check), which is a
//! publisher lapping or scribbling in the middle of a read.
//!
//! Checked after each read:
//! - nothing panics, and every length handed to the caller is at most the
//!   announced slot size; the closure runs once for a message, never
//!   otherwise;
//! - the reader's position moves forward only, by exactly what it reports
//!   (1 for a message or corruption, `k` for `Missed(k)`), and `Empty`
//!   means the head it loaded is not past it;
//! - an accepted message is exactly the bytes and length the slot holds as
//!   the copy was made, and the slot's sequence word says message `seq`;
//! - where the harness can tell (the slot was not scribbled before or
//!   during the read, numbering not forged, same geometry): the bytes are
//!   those of a message fully published in that slot, never a loan's
//!   partial bytes or a torn mix, and (head not forged) under the same
//!   sequence number;
//! - with an honest publisher only: no `Corrupt`, and at the end a drain
//!   delivers every message still in the ring, reaching the head.
//!
//! Each read ends: drains are bounded by the ring size (and checked to end
//! within `slot_count + 2` reads), and a budget of bytes written and copied
//! bounds each input's time with 16 MiB slots.
//!
//! Input layout (every read past the end yields zeros):
//!
//! ```text
//! mode: u8           bit 0: hand-made memfds (else shm::create_ring);
//!                    bit 1: the broker announces a geometry of its own;
//!                    bit 2: block mode (the reader publishes its cursor);
//!                    bit 3: the ring starts at a position (u64 >> 2)
//! geometry           the ring's: kind: u8 % 4; 0,1 small: size 1 + u8,
//!                    count 2 + u8 % 31; 2 edges: SIZES[u8], COUNTS[u8];
//!                    3 any: size u32, count u32
//! [geometry]         the announced one (bit 1)
//! [start: u64]       (bit 3)
//! [hand: u8, u8]     (bit 0) ring seals/fds/size (see `hand_rings`),
//!                    signal page size
//! then up to MAX_OPS times, tag: u8 % 17:
//!   0 publish     len: u16 (0xffff: full slot), fill: u8
//!   1 begin loan  len: u16, fill: u8 (bytes written into the loan)
//!   2 commit loan len: u16
//!   3 abandon loan
//!   4 head        value (see `position`)
//!   5 slot seq    slot, mode: u8 (see `seq_value`)
//!   6 slot len    slot, mode: u8 (see `len_value`)
//!   7 data word   slot, word: u16, value: u64
//!   8 fill data   slot, len: u16, byte: u8
//!   9 header word field: u8, value: u64
//!  10 signal word field: u8, value: u64
//!  11 renumber    value (the publisher's own next sequence number)
//!  12, 13 read
//!  14 read, interleaved: point: u8 % 3 (head, sequence, data), then a
//!     publisher step (tags 0..=11 with their fields)
//!  15 prepare to sleep, and wake up
//!  16 drain
//! slot: u8 % 4: 0 the reader's next, 1 the publisher's next, 2, 3 u16
//! ```
//!
//! Shared by the fuzz target and by `proto/tests/fuzz_regressions.rs`,
//! which includes this file by path: it uses only the proto crate and its
//! own dependencies.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::SealFlags;
use shmbus_proto::ring::layout::{RingHeader, Signal, SlotHeader, PAGE_LEN};
use shmbus_proto::ring::protocol::{self, RingView, RingWriteView};
use shmbus_proto::ring::shm::{self, CursorMap, RingMap, RingMapError, MAX_SLOT_COUNT, MAX_SLOT_SIZE};
use shmbus_proto::ring::{Geometry, ReadOutcome, ReaderState, WriterState};
use shmbus_proto::sync::{AtomicU64, Ordering};
use shmbus_proto::sys::{futex, memfd};

/// Operations per input.
pub const MAX_OPS: usize = 512;
/// Bytes written and copied per input before it stops (and again for the
/// final drain): 16 MiB slots must not make an input run for seconds.
const BUDGET: usize = 32 << 20;
/// Reads in one drain, at most.
const MAX_DRAIN: u64 = 4096;

/// Slot sizes at and around the limits and the 8-byte words.
const SIZES: [u32; 16] = [
    0,
    1,
    7,
    8,
    9,
    15,
    16,
    48,
    63,
    64,
    65,
    4096,
    MAX_SLOT_SIZE - 1,
    MAX_SLOT_SIZE,
    MAX_SLOT_SIZE + 1,
    u32::MAX,
];
/// Slot counts at and around the limits.
const COUNTS: [u32; 12] = [0, 1, 2, 3, 4, 5, 64, 1000, MAX_SLOT_COUNT, MAX_SLOT_COUNT + 1, 1 << 31, u32::MAX];
/// Sizes of hand-made memfds, from the expected one.
const DELTAS: [i64; 8] = [0, 0, 0, 1, -1, 64, -64, 4096];

/// Runs one input; panics on a bug.
pub fn run(data: &[u8]) {
    let mut inp = Input(data);
    let mode = inp.u8();
    let ring_geometry = geometry(&mut inp);
    let announced = if mode & 2 != 0 { geometry(&mut inp) } else { ring_geometry };
    let block = mode & 4 != 0;
    let start = if mode & 8 != 0 { inp.u64() >> 2 } else { 0 };
    let rings = if mode & 1 != 0 {
        hand_rings(&mut inp, announced)
    } else {
        broker_rings(ring_geometry, announced, block)
    };
    let Some(rings) = rings else { return };
    let Rings { fds: _fds, writer, inspect, reader, mismatch } = rings;

    // Where the publisher stands when the reader joins; the broker starts
    // the reader at the head.
    let ws = WriterState { next: start };
    writer.header().head.store(start, Ordering::Release);
    let Ok((_generation, cursor_fd, _cursor_ro, _broker_cursor)) = shm::join_reader(&writer) else { return };
    let Ok(cursor) = CursorMap::map(cursor_fd.as_fd(), true) else { return };
    let next = cursor.cursor().next.load(Ordering::Acquire);
    assert_eq!(next, start, "the broker starts a reader at the head");

    let buf = vec![0; reader.geometry().slot_size as usize];
    let world = World {
        writer,
        ws,
        loan: None,
        slots: HashMap::new(),
        hostile: false,
        hostile_head: false,
        renumbered: false,
        budget: BUDGET,
    };
    let mut h = Harness {
        world: RefCell::new(world),
        reader,
        inspect,
        cursor,
        rs: ReaderState { next },
        buf,
        mismatch,
        block,
    };

    for _ in 0..MAX_OPS {
        if inp.0.is_empty() || h.world.borrow().budget == 0 {
            break;
        }
        let tag = inp.u8() % 17;
        match tag {
            0..=11 => {
                let op = h.writer_op(tag, &mut inp);
                h.world.borrow_mut().apply(&op);
            }
            12 | 13 => {
                h.read(None);
            }
            14 => {
                let point = match inp.u8() % 3 {
                    0 => Point::Head,
                    1 => Point::Seq,
                    _ => Point::Data,
                };
                let tag = inp.u8() % 12;
                let op = h.writer_op(tag, &mut inp);
                h.read(Some((point, op)));
            }
            15 => h.sleep(),
            _ => {
                h.drain();
            }
        }
    }
    h.finish();
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }
}

fn geometry(inp: &mut Input<'_>) -> Geometry {
    match inp.u8() % 4 {
        0 | 1 => Geometry { slot_size: 1 + u32::from(inp.u8()), slot_count: 2 + u32::from(inp.u8() % 31) },
        2 => Geometry {
            slot_size: SIZES[usize::from(inp.u8()) % SIZES.len()],
            slot_count: COUNTS[usize::from(inp.u8()) % COUNTS.len()],
        },
        _ => Geometry { slot_size: inp.u32(), slot_count: inp.u32() },
    }
}

/// The seqlock word of a complete message `n` (as `protocol` writes it).
fn even(n: u64) -> u64 {
    n.wrapping_mul(2).wrapping_add(2)
}

/// The seqlock word of message `n` while it is being written.
fn odd(n: u64) -> u64 {
    n.wrapping_mul(2).wrapping_add(1)
}

/// The mappings of one ring.
struct Rings {
    fds: Vec<OwnedFd>,
    /// The publisher's (and broker's) read-write mapping, in the ring's
    /// geometry.
    writer: RingMap,
    /// A read-write mapping in the announced geometry, through which the
    /// harness only looks at what the reader should have seen.
    inspect: RingMap,
    /// The reader's: from a read-only fd, in the announced geometry.
    reader: RingMap,
    /// The announced geometry is not the ring's (but maps, being as long).
    mismatch: bool,
}

/// What a reader's `RingMap::map` should make of its fds.
#[derive(Debug)]
struct Facts {
    ring_sealed: bool,
    ring_len: u64,
    signal_sealed: bool,
    signal_len: u64,
    signal_writable: bool,
}

/// Checks `RingMap::map`'s answer for a reader told `g`: it maps exactly
/// when everything is right, and says why not otherwise.
fn check_map(got: &Result<RingMap, RingMapError>, g: Geometry, f: &Facts) {
    let want = if g.validate().is_err() {
        Err("geometry")
    } else if !f.ring_sealed {
        Err("not sealed")
    } else if f.ring_len != g.total_len() as u64 {
        Err("size")
    } else if !f.signal_sealed {
        Err("not sealed")
    } else if f.signal_len != PAGE_LEN as u64 {
        Err("size")
    } else if !f.signal_writable {
        Err("io")
    } else {
        Ok(())
    };
    let have = match got {
        Ok(_) => Ok(()),
        Err(RingMapError::Geometry(_)) => Err("geometry"),
        Err(RingMapError::NotSealed) => Err("not sealed"),
        Err(RingMapError::Size { .. }) => Err("size"),
        Err(RingMapError::Io(_)) => Err("io"),
    };
    assert_eq!(have, want, "a reader mapping {g:?} with {f:?}: {got:?}");
}

/// A sealed (against resizing) memfd of `len` bytes.
fn sealed_memfd(len: u64, seals: SealFlags) -> Option<OwnedFd> {
    let fd = memfd::create("fuzz-ring", len).ok()?;
    rustix::fs::fcntl_add_seals(&fd, seals).ok()?;
    Some(fd)
}

/// The ring as the broker makes it; the reader told `announced`.
fn broker_rings(g: Geometry, announced: Geometry, block: bool) -> Option<Rings> {
    let created = shm::create_ring(g, block);
    if g.validate().is_err() {
        assert!(matches!(created, Err(RingMapError::Geometry(_))), "create_ring took {g:?}: {created:?}");
        // A reader told a bad geometry refuses it before looking further.
        let fd = sealed_memfd(PAGE_LEN as u64, SealFlags::SHRINK | SealFlags::GROW)?;
        let got = RingMap::map(fd.as_fd(), fd.as_fd(), g, false);
        assert!(matches!(got, Err(RingMapError::Geometry(_))), "a reader took {g:?}: {got:?}");
        return None;
    }
    let (ring, signal, writer) = match created {
        Ok(c) => c,
        // Out of memory or fds: the machine's, not the code's.
        Err(RingMapError::Io(_)) => return None,
        Err(e) => panic!("create_ring refused a valid {g:?}: {e}"),
    };
    let ring_ro = memfd::reopen_read_only(ring.as_fd()).ok()?;
    // A reader's fd never maps the ring writable.
    assert!(RingMap::map(ring_ro.as_fd(), signal.as_fd(), g, true).is_err());
    let facts = Facts {
        ring_sealed: true,
        ring_len: g.total_len() as u64,
        signal_sealed: true,
        signal_len: PAGE_LEN as u64,
        signal_writable: true,
    };
    let got = RingMap::map(ring_ro.as_fd(), signal.as_fd(), announced, false);
    check_map(&got, announced, &facts);
    let reader = got.ok()?;
    assert!(!reader.is_writable());
    let inspect = RingMap::map(ring.as_fd(), signal.as_fd(), announced, true).expect("the ring maps");
    Some(Rings { fds: vec![ring, signal, ring_ro], writer, inspect, reader, mismatch: announced != g })
}

/// A ring made by hand for a reader told `g`. `hand`: bit 0 the ring
/// lacks `SHRINK`, bit 1 `GROW`; bit 2 the signal page lacks `GROW`; bit 3
/// the reader's signal fd is read-only; bit 4 the reader gets the ring's
/// read-write fd; bits 5..=7 the ring's size (`DELTAS`). Then a byte for
/// the signal page's size.
fn hand_rings(inp: &mut Input<'_>, g: Geometry) -> Option<Rings> {
    let (hand, signal_size) = (inp.u8(), inp.u8());
    let expected = if g.validate().is_ok() { g.total_len() as u64 } else { PAGE_LEN as u64 };
    let ring_len = expected.saturating_add_signed(DELTAS[usize::from(hand >> 5)]);
    let mut ring_seals = SealFlags::SEAL;
    if hand & 1 == 0 {
        ring_seals |= SealFlags::SHRINK;
    }
    if hand & 2 == 0 {
        ring_seals |= SealFlags::GROW;
    }
    let ring = sealed_memfd(ring_len, ring_seals)?;
    let signal_len = (PAGE_LEN as u64).saturating_add_signed(DELTAS[usize::from(signal_size % 8)]);
    let signal_seals = if hand & 4 == 0 { SealFlags::SHRINK | SealFlags::GROW } else { SealFlags::SHRINK };
    let signal = sealed_memfd(signal_len, signal_seals)?;
    let mut fds = Vec::new();
    let reader_ring: BorrowedFd<'_> = if hand & 16 != 0 {
        ring.as_fd()
    } else {
        fds.push(memfd::reopen_read_only(ring.as_fd()).ok()?);
        fds[0].as_fd()
    };
    let signal_ro;
    let reader_signal = if hand & 8 != 0 {
        signal_ro = memfd::reopen_read_only(signal.as_fd()).ok()?;
        signal_ro.as_fd()
    } else {
        signal.as_fd()
    };
    let facts = Facts {
        ring_sealed: hand & 3 == 0,
        ring_len,
        signal_sealed: hand & 4 == 0,
        signal_len,
        signal_writable: hand & 8 == 0,
    };
    let got = RingMap::map(reader_ring, reader_signal, g, false);
    check_map(&got, g, &facts);
    let reader = got.ok()?;
    let writer = RingMap::map(ring.as_fd(), signal.as_fd(), g, true).expect("the publisher maps the ring");
    let inspect = RingMap::map(ring.as_fd(), signal.as_fd(), g, true).expect("the ring maps");
    fds.extend([ring, signal]);
    Some(Rings { fds, writer, inspect, reader, mismatch: false })
}

/// What the harness knows a slot holds (in the publisher's geometry).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    /// Zeros, as the memfd was made.
    Initial,
    /// Marked as being written for message `n` (a loan, given up or not).
    Writing(u64),
    /// Message `seq`, completely published, with these bytes.
    Clean { seq: u64, bytes: Vec<u8> },
    /// Scribbled on since it was last published.
    Dirty,
}

/// One publisher step.
#[derive(Debug, Clone)]
enum Op {
    Publish { len: u32, fill: u8 },
    Begin { len: u32, fill: u8 },
    Commit { len: u32 },
    Abandon,
    Head(u64),
    Seq { slot: usize, value: u64 },
    Len { slot: usize, value: u32 },
    Word { slot: usize, word: usize, value: u64 },
    Fill { slot: usize, len: u32, byte: u8 },
    Header { field: u8, value: u64 },
    Signal { field: u8, value: u64 },
    Renumber(u64),
}

/// The publisher, and what the harness knows of the ring.
struct World {
    writer: RingMap,
    ws: WriterState,
    /// The slot of the loan being written.
    loan: Option<usize>,
    slots: HashMap<usize, Slot>,
    /// Ever written what no honest publisher writes (slot words, head,
    /// numbering).
    hostile: bool,
    /// Ever moved the head or the numbering: the reader may stand anywhere.
    hostile_head: bool,
    /// Ever renumbered: a sequence number may have been used twice.
    renumbered: bool,
    /// Bytes left to write and copy.
    budget: usize,
}

impl World {
    fn count(&self) -> u64 {
        u64::from(self.writer.geometry().slot_count)
    }

    fn slot(&self, index: usize) -> Slot {
        self.slots.get(&index).cloned().unwrap_or(Slot::Initial)
    }

    fn spend(&mut self, bytes: usize) {
        self.budget = self.budget.saturating_sub(64 + bytes);
    }

    fn dirty(&mut self, index: usize) {
        self.hostile = true;
        self.slots.insert(index, Slot::Dirty);
    }

    /// A loan is dropped unsent.
    fn abandon(&mut self) {
        if let Some(index) = self.loan.take() {
            protocol::abandon_write(&self.writer, &self.ws, index);
        }
    }

    fn begin(&mut self) -> usize {
        if let Some(index) = self.loan {
            return index;
        }
        let index = protocol::begin_write(&self.writer, &self.ws);
        self.slots.insert(index, Slot::Writing(self.ws.next));
        self.loan = Some(index);
        index
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Publish { len, fill } => {
                self.abandon();
                let n = self.ws.next;
                let bytes: Vec<u8> =
                    (0..len).map(|i| fill.wrapping_add(i as u8).wrapping_add(n as u8)).collect();
                let index = (n % self.count()) as usize;
                protocol::publish(&mut self.writer, &mut self.ws, &bytes);
                self.spend(bytes.len());
                self.slots.insert(index, Slot::Clean { seq: n, bytes });
            }
            Op::Begin { len, fill } => {
                let index = self.begin();
                self.writer.slot_data_mut(index)[..len as usize].fill(fill);
                self.spend(len as usize);
            }
            Op::Commit { len } => {
                let index = self.begin();
                self.loan = None;
                let n = self.ws.next;
                protocol::commit(&self.writer, &mut self.ws, index, len);
                let bytes = self.writer.slot_data(index)[..len as usize].to_vec();
                self.spend(bytes.len());
                self.slots.insert(index, Slot::Clean { seq: n, bytes });
            }
            Op::Abandon => self.abandon(),
            Op::Head(value) => {
                self.writer.header().head.store(value, Ordering::Release);
                self.hostile = true;
                self.hostile_head = true;
            }
            Op::Seq { slot, value } => {
                self.writer.slot(slot).seq.store(value, Ordering::Release);
                self.dirty(slot);
            }
            Op::Len { slot, value } => {
                self.writer.slot(slot).len.store(value, Ordering::Release);
                self.dirty(slot);
            }
            Op::Word { slot, word, value } => {
                self.writer.slot_words(slot)[word].store(value, Ordering::Release);
                self.dirty(slot);
            }
            Op::Fill { slot, len, byte } => {
                self.writer.write_data(slot, &vec![byte; len as usize]);
                self.spend(len as usize);
                self.dirty(slot);
            }
            // Words a reader must not look at: the ring's own idea of its
            // geometry (readers use the broker's), its magic and version,
            // the membership generation; `closed` only ends sleeps.
            Op::Header { field, value } => {
                let h = self.writer.header();
                let v32 = value as u32;
                match field % 7 {
                    0 => h.magic.store(value, Ordering::Release),
                    1 => h.version.store(v32, Ordering::Release),
                    2 => h.overflow.store(v32, Ordering::Release),
                    3 => h.slot_size.store(v32, Ordering::Release),
                    4 => h.slot_count.store(v32, Ordering::Release),
                    5 => h.members.store(v32, Ordering::Release),
                    _ => h.closed.store(v32, Ordering::Release),
                }
            }
            // Anyone (every reader) may write the signal page.
            Op::Signal { field, value } => {
                let s = self.writer.signal();
                let v32 = value as u32;
                match field % 6 {
                    0 => s.magic.store(value, Ordering::Release),
                    1 => s.wake.store(v32, Ordering::Release),
                    2 => s.waiters.store(v32, Ordering::Release),
                    3 => s.overruns.store(value, Ordering::Release),
                    4 => s.progress.store(v32, Ordering::Release),
                    _ => s.publisher_waiting.store(v32, Ordering::Release),
                }
            }
            Op::Renumber(next) => {
                self.abandon();
                self.ws.next = next;
                self.hostile = true;
                self.hostile_head = true;
                self.renumbered = true;
            }
        }
    }
}

/// Where, inside a read, an interleaved publisher step runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Point {
    /// Before the reader loads `head`.
    Head,
    /// Before it loads the slot's sequence word and length.
    Seq,
    /// After those, before it copies the data and re-checks the sequence.
    Data,
}

/// The reader's `RingView` (the real one, every answer its answer), which
/// runs one publisher step when the reader reaches `point`.
struct Interleaved<'a> {
    reader: &'a RingMap,
    inspect: &'a RingMap,
    world: &'a RefCell<World>,
    step: RefCell<Option<(Point, Op)>>,
    /// The slot's length when the step ran at `Point::Data`: the one the
    /// reader loaded.
    len_before: Cell<Option<u32>>,
}

impl Interleaved<'_> {
    fn at(&self, point: Point, index: Option<usize>) {
        let mut step = self.step.borrow_mut();
        if step.as_ref().is_some_and(|(p, _)| *p == point) {
            let (_, op) = step.take().expect("checked");
            if let Some(i) = index {
                self.len_before.set(Some(self.inspect.slot(i).len.load(Ordering::Relaxed)));
            }
            self.world.borrow_mut().apply(&op);
        }
    }
}

impl RingView for Interleaved<'_> {
    fn geometry(&self) -> Geometry {
        self.reader.geometry()
    }
    fn header(&self) -> &RingHeader {
        self.at(Point::Head, None);
        self.reader.header()
    }
    fn signal(&self) -> &Signal {
        self.reader.signal()
    }
    fn slot(&self, index: usize) -> &SlotHeader {
        self.at(Point::Seq, None);
        self.reader.slot(index)
    }
    fn slot_words(&self, index: usize) -> &[AtomicU64] {
        self.at(Point::Data, Some(index));
        self.reader.slot_words(index)
    }
}

struct Harness {
    world: RefCell<World>,
    reader: RingMap,
    inspect: RingMap,
    cursor: CursorMap,
    rs: ReaderState,
    buf: Vec<u8>,
    mismatch: bool,
    block: bool,
}

impl Harness {
    /// An honest publisher, so far: every check applies.
    fn honest(&self) -> bool {
        !self.world.borrow().hostile && !self.mismatch
    }

    /// Reads the fields of publisher step `tag`.
    fn writer_op(&self, tag: u8, inp: &mut Input<'_>) -> Op {
        let w = self.world.borrow();
        let g = w.writer.geometry();
        let (count, size) = (u64::from(g.slot_count), g.slot_size);
        let (r, next) = (self.rs.next, w.ws.next);
        let honest_len = |inp: &mut Input<'_>| match inp.u16() {
            u16::MAX => size,
            v => u32::from(v) % (size + 1),
        };
        let slot = |inp: &mut Input<'_>| {
            let at = match inp.u8() % 4 {
                0 => r,
                1 => next,
                _ => u64::from(inp.u16()),
            };
            (at % count) as usize
        };
        let position = |inp: &mut Input<'_>| {
            let m = inp.u8();
            let k = u64::from(inp.u8());
            match m % 8 {
                0 => r.wrapping_add(1 + k % 8),
                1 => r.wrapping_add(count).wrapping_add(k),
                2 => k | u64::from(inp.u32()) << 8 | u64::from(inp.u16()) << 40 | u64::from(inp.u8()) << 56,
                3 => u64::MAX - k % 4,
                4 => next.wrapping_add(k % 4),
                5 => r,
                6 => r.wrapping_sub(1 + k),
                _ => (1u64 << 63).wrapping_add(k).wrapping_sub(128),
            }
        };
        match tag {
            0 => Op::Publish { len: honest_len(inp), fill: inp.u8() },
            1 => Op::Begin { len: honest_len(inp), fill: inp.u8() },
            2 => Op::Commit { len: honest_len(inp) },
            3 => Op::Abandon,
            4 => Op::Head(position(inp)),
            5 => {
                let slot = slot(inp);
                let value = match inp.u8() % 8 {
                    0 => even(r),
                    1 => odd(r),
                    2 => even(r.wrapping_add(count.wrapping_mul(1 + u64::from(inp.u8() % 4)))),
                    3 => inp.u64(),
                    4 => even(r.wrapping_sub(1)),
                    5 => 0,
                    6 => u64::MAX,
                    _ => even(next),
                };
                Op::Seq { slot, value }
            }
            6 => {
                let slot = slot(inp);
                let value = match inp.u8() % 6 {
                    0 => size,
                    1 => size + 1,
                    2 => u32::MAX,
                    3 => inp.u32(),
                    4 => u32::from(inp.u8()),
                    _ => 0,
                };
                Op::Len { slot, value }
            }
            7 => {
                let slot = slot(inp);
                let word = usize::from(inp.u16()) % (size as usize).div_ceil(8);
                Op::Word { slot, word, value: inp.u64() }
            }
            8 => Op::Fill { slot: slot(inp), len: honest_len(inp), byte: inp.u8() },
            9 => Op::Header { field: inp.u8(), value: inp.u64() },
            10 => Op::Signal { field: inp.u8(), value: inp.u64() },
            _ => Op::Renumber(position(inp)),
        }
    }

    /// One read by the reader (with a publisher step inside it, if given),
    /// checked. Returns what it got.
    fn read(&mut self, step: Option<(Point, Op)>) -> ReadOutcome<Vec<u8>> {
        let g = self.reader.geometry();
        let r = self.rs.next;
        let index = (r % u64::from(g.slot_count)) as usize;
        let before = self.world.borrow().slot(index);
        let len = self.inspect.slot(index).len.load(Ordering::Relaxed).min(g.slot_size);
        self.world.borrow_mut().spend(len as usize);
        let mut calls = 0;
        let read = |b: &[u8]| {
            calls += 1;
            assert!(b.len() <= g.slot_size as usize, "{} bytes handed over from a {g:?} ring", b.len());
            b.to_vec()
        };
        let (outcome, len_before) = match step {
            None => (protocol::try_read(&self.reader, &mut self.rs, &mut self.buf, read), None),
            Some(step) => {
                let view = Interleaved {
                    reader: &self.reader,
                    inspect: &self.inspect,
                    world: &self.world,
                    step: RefCell::new(Some(step)),
                    len_before: Cell::new(None),
                };
                let outcome = protocol::try_read(&view, &mut self.rs, &mut self.buf, read);
                (outcome, view.len_before.get())
            }
        };
        self.check(r, index, &before, len_before, &outcome, calls);
        self.after(&outcome);
        outcome
    }

    fn check(
        &self,
        r: u64,
        index: usize,
        before: &Slot,
        len_before: Option<u32>,
        outcome: &ReadOutcome<Vec<u8>>,
        calls: u32,
    ) {
        let next = self.rs.next;
        let slot_size = self.reader.geometry().slot_size as usize;
        match outcome {
            ReadOutcome::Empty => {
                assert_eq!(next, r, "an empty read moved the reader");
                assert_eq!(calls, 0);
                // Nothing ran after the reader loaded the head.
                let head = self.inspect.header().head.load(Ordering::Relaxed);
                assert!(head <= r, "empty with the head at {head}, the reader at {r}");
            }
            ReadOutcome::Missed(k) => {
                assert!(*k > 0, "missed nothing");
                assert_eq!(Some(next), r.checked_add(*k), "missed {k} from {r}");
                assert_eq!(calls, 0);
            }
            ReadOutcome::Corrupt(what) => {
                assert_eq!(Some(next), r.checked_add(1), "corrupt ({what}) at {r}");
                assert_eq!(calls, 0);
                assert!(!self.honest(), "an honest publisher's slot read as corrupt ({what}) at {r}");
            }
            ReadOutcome::Message { seq, value } => {
                assert_eq!(*seq, r, "read a message other than the next");
                assert_eq!(Some(next), r.checked_add(1));
                assert_eq!(calls, 1, "the read closure ran {calls} times");
                assert!(value.len() <= slot_size);
                // What the copy saw: the slot as it is now (nothing ran
                // after the copy), with the length the reader loaded.
                let slot = self.inspect.slot(index);
                let len = len_before.unwrap_or_else(|| slot.len.load(Ordering::Relaxed));
                assert_eq!(value.len(), len as usize, "accepted a length the slot did not hold");
                assert_eq!(value[..], self.inspect.slot_data(index)[..value.len()], "accepted other bytes");
                assert_eq!(slot.seq.load(Ordering::Relaxed), even(r), "accepted a slot that moved on");
                let w = self.world.borrow();
                if self.mismatch || w.renumbered || *before == Slot::Dirty {
                    return;
                }
                match w.slot(index) {
                    Slot::Clean { seq: n, bytes } => {
                        assert_eq!(
                            *value, bytes,
                            "message {r}: accepted bytes never published as message {n}"
                        );
                        assert!(w.hostile_head || n == r, "message {n} accepted as {r}");
                    }
                    // Only a forged head sends a reader to 2^63 - 1, whose
                    // complete mark is 0, a fresh slot's: stable, empty.
                    Slot::Initial if w.hostile_head => assert!(value.is_empty()),
                    Slot::Dirty => {}
                    other => panic!("message {r} accepted from a slot {other:?}"),
                }
            }
        }
    }

    /// What `ChannelSubscriber` does after each outcome but `Empty`.
    fn after(&self, outcome: &ReadOutcome<Vec<u8>>) {
        if matches!(outcome, ReadOutcome::Empty) {
            return;
        }
        if self.block {
            if protocol::advance(&self.reader, self.cursor.cursor(), &self.rs) {
                protocol::bump_progress(&self.reader);
                let _ = futex::wake_all(&self.reader.signal().progress);
            }
            assert_eq!(self.cursor.cursor().next.load(Ordering::Relaxed), self.rs.next);
        }
        if let ReadOutcome::Missed(k) = outcome {
            self.reader.signal().overruns.fetch_add(*k, Ordering::Relaxed);
        }
    }

    /// The reader about to sleep: it must not when there is something to
    /// read or the ring is closed.
    fn sleep(&self) {
        let head = self.inspect.header().head.load(Ordering::Relaxed);
        let closed = self.inspect.header().closed.load(Ordering::Relaxed) != 0;
        let wake = self.inspect.signal().wake.load(Ordering::Relaxed);
        let got = protocol::prepare_sleep(&self.reader, &self.rs);
        protocol::end_sleep(&self.reader);
        assert_eq!(got, (head <= self.rs.next && !closed).then_some(wake), "head {head}, closed {closed}");
    }

    /// Reads until empty (or the budget is spent); returns the sequence
    /// numbers delivered. Checks it ends within `slot_count + 2` reads.
    fn drain(&mut self) -> HashSet<u64> {
        let count = u64::from(self.reader.geometry().slot_count);
        let limit = (count + 2).min(MAX_DRAIN);
        let mut got = HashSet::new();
        for _ in 0..limit {
            if self.world.borrow().budget == 0 {
                return got;
            }
            match self.read(None) {
                ReadOutcome::Empty => return got,
                ReadOutcome::Message { seq, .. } => {
                    got.insert(seq);
                }
                _ => {}
            }
        }
        assert!(limit < count + 2, "no end after {limit} reads of a ring of {count}");
        got
    }

    /// With an honest publisher, a last drain delivers every message still
    /// in the ring, up to the head.
    fn finish(&mut self) {
        self.world.borrow_mut().budget = BUDGET;
        let honest = self.honest();
        let (head, want) = {
            let w = self.world.borrow();
            let head = w.writer.header().head.load(Ordering::Relaxed);
            let count = w.count();
            let from = self.rs.next.max(head.saturating_sub(count));
            let want: Vec<u64> = if honest {
                (from..head)
                    .filter(|&s| matches!(w.slot((s % count) as usize), Slot::Clean { seq, .. } if seq == s))
                    .collect()
            } else {
                Vec::new()
            };
            (head, want)
        };
        let got = self.drain();
        if honest && self.world.borrow().budget > 0 {
            for s in want {
                assert!(got.contains(&s), "message {s} was in the ring and not delivered");
            }
            assert_eq!(self.rs.next, head, "the reader did not reach the head");
        }
    }
}
