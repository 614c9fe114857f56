//! The ring protocol: single publisher, many readers, per-slot seqlocks.
//!
//! Written against [`RingView`] so the same code runs on a real shared
//! mapping and, under `--cfg loom`, on a heap model where loom explores
//! every interleaving (`ring::model`). Everything a process does to the
//! shared words is here, waits included; callers add only the futex system
//! calls (and the publisher's socket), so the model checks what ships.
//!
//! Publisher, for message `n` in slot `n % count`:
//! 0. if `members` (ring header; only the broker and the publisher can
//!    write it) moved since the broker news it applied, fetch the news, and
//!    in block mode wait for it: see [`join`] for why;
//! 1. (block mode) wait until every live reader's cursor is past `n - count`;
//! 2. `seq = 2n+1` (Relaxed), then a Release fence: the "writing" mark is
//!    ordered before any data byte;
//! 3. write the data and `len`;
//! 4. `seq = 2n+2` (Release): pairs with the reader's Acquire load of `seq`;
//! 5. `head = n+1` (Release): pairs with the reader's Acquire load of `head`;
//! 6. a SeqCst fence, then read `waiters`: pairs with the reader's SeqCst
//!    increment of `waiters` before its last look at `head`, so either the
//!    publisher sees the sleeper or the sleeper sees the new head. (The same
//!    fence orders this `head` store before the next look at `members`.)
//!
//! Reader, for its next sequence `r`:
//! 1. `h = head` (Acquire); nothing new if `h <= r`; if `h - r > count` the
//!    messages `r .. h - count` were overwritten: report them as missed;
//! 2. `s1 = seq` (Acquire); anything but `2r+2` means the slot moved on
//!    (missed) or holds garbage (corrupt);
//! 3. `len`, bounds-checked against the slot size *we* were told, never the
//!    one in shared memory; copy the data out into the reader's own buffer
//!    with one Relaxed atomic load per 8-byte word ([`copy_out`]): another
//!    process may be writing those bytes right now, so they are never
//!    borrowed as `&[u8]`;
//! 4. an Acquire fence, then `s2 = seq`: if `s2 != s1` the publisher lapped
//!    us while we copied, and the copy is thrown away (torn, missed); only
//!    a copy that passed this check is handed to the caller.
//!
//! Every index is `seq % count` with our own `count`, so no value a hostile
//! peer writes can move a read out of bounds; it can only produce
//! `Missed`/`Corrupt` outcomes (or, from a hostile publisher, bytes that are
//! wrong but stable: the copy is private).

use crate::ring::layout::{Cursor, RingHeader, Signal, SlotHeader};
use crate::sync::{fence, AtomicU64, Ordering};

/// The ring's shape, as the broker announced it (trusted, local).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub slot_size: u32,
    pub slot_count: u32,
}

/// Access to one ring's memory.
pub trait RingView {
    fn geometry(&self) -> Geometry;
    fn header(&self) -> &RingHeader;
    fn signal(&self) -> &Signal;
    /// Slot `index`, which the protocol guarantees is `< slot_count`.
    fn slot(&self, index: usize) -> &SlotHeader;
    /// Slot `index`'s data as `slot_size.div_ceil(8)` atomic words (the
    /// last one may run into the slot's padding). Only ever loaded.
    fn slot_words(&self, index: usize) -> &[AtomicU64];
}

/// What only the publisher may do. `&mut self`: no view of the data this
/// process handed out can be alive while it changes.
pub trait RingWriteView: RingView {
    /// Writes `bytes` (at most `slot_size`) into slot `index`.
    fn write_data(&mut self, index: usize, bytes: &[u8]);
}

/// Copies the first `len` bytes of `words` into `out[..len]`, one Relaxed
/// atomic load per word, in memory order. Relaxed: the seqlock's fences
/// order these loads (see [`try_read`]); each load only needs to be a
/// single untorn read of a word another process may be writing.
///
/// Panics if `words` holds fewer than `len` bytes or `out` is shorter than
/// `len`: callers bound `len` by their own geometry first.
pub fn copy_out(words: &[AtomicU64], len: usize, out: &mut [u8]) {
    let (full, rest) = (len / 8, len % 8);
    let out = &mut out[..len];
    let (head, tail) = out.split_at_mut(full * 8);
    for (w, chunk) in words[..full].iter().zip(head.chunks_exact_mut(8)) {
        chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
    }
    if rest > 0 {
        tail.copy_from_slice(&words[full].load(Ordering::Relaxed).to_ne_bytes()[..rest]);
    }
}

/// The seqlock word of message `n` while it is being written. Wrapping:
/// a reader's position can come from a hostile head, and must not overflow.
fn odd(n: u64) -> u64 {
    n.wrapping_mul(2).wrapping_add(1)
}

/// The seqlock word of message `n` once complete.
fn even(n: u64) -> u64 {
    n.wrapping_mul(2).wrapping_add(2)
}

/// Where a publisher stands.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriterState {
    pub next: u64,
}

/// Where a reader stands.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReaderState {
    pub next: u64,
}

/// Whether the slot for the publisher's next message is free of every
/// reader in `cursors` (block mode). A cursor that claims to be ahead of
/// the publisher (a scribbler) counts as caught up.
pub fn slot_free<'a>(st: &WriterState, count: u32, cursors: impl IntoIterator<Item = &'a Cursor>) -> bool {
    let n = st.next;
    cursors.into_iter().all(|c| {
        // Acquire: pairs with the reader's Release store of its cursor, so
        // its reads of the slot happened before we overwrite it.
        let r = c.next.load(Ordering::Acquire).min(n);
        n - r < u64::from(count)
    })
}

/// Marks the next slot as being written; returns its index.
pub fn begin_write<V: RingWriteView>(v: &V, st: &WriterState) -> usize {
    let count = u64::from(v.geometry().slot_count);
    let index = (st.next % count) as usize;
    v.slot(index).seq.store(odd(st.next), Ordering::Relaxed);
    // Release fence: the odd mark above is ordered before every data write
    // that follows; pairs with the reader's Acquire fence before it
    // re-reads `seq`.
    fence(Ordering::Release);
    index
}

/// Completes the message begun with [`begin_write`], with `len` bytes.
/// Returns whether a reader may be asleep (then the caller wakes them).
pub fn commit<V: RingWriteView>(v: &V, st: &mut WriterState, index: usize, len: u32) -> bool {
    let n = st.next;
    let slot = v.slot(index);
    slot.len.store(len, Ordering::Relaxed);
    // Release: pairs with the reader's Acquire load of `seq` == 2n+2.
    slot.seq.store(even(n), Ordering::Release);
    // Release: pairs with the reader's Acquire load of `head`.
    v.header().head.store(n.wrapping_add(1), Ordering::Release);
    st.next = n.wrapping_add(1);
    // SeqCst fence: pairs with the reader's SeqCst `waiters` increment
    // before its final `head` check (no lost wake-up).
    fence(Ordering::SeqCst);
    v.signal().waiters.load(Ordering::Relaxed) > 0
}

/// Gives up a write begun with [`begin_write`] (a dropped loan). The slot
/// stays marked as being written for message `n`, and `head` does not move:
/// in overwrite mode the slot held message `n - count`, whose bytes may now
/// be half overwritten, so a reader that still wants that message finds a
/// sequence past it and counts it missed; the next publish reuses `n`. (It
/// must not go back to `2(n - count) + 2`: a reader would then accept the
/// partial bytes as message `n - count`.)
pub fn abandon_write<V: RingView>(v: &V, st: &WriterState, index: usize) {
    // Relaxed: the same value begin_write stored (and ordered before the
    // data with its Release fence); stored again so the slot's state does
    // not depend on what happened between.
    v.slot(index).seq.store(odd(st.next), Ordering::Relaxed);
}

/// Publishes `bytes` (at most `slot_size`).
pub fn publish<V: RingWriteView>(v: &mut V, st: &mut WriterState, bytes: &[u8]) -> bool {
    let index = begin_write(v, st);
    v.write_data(index, bytes);
    commit(v, st, index, bytes.len() as u32)
}

/// The outcome of one read attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadOutcome<R> {
    /// Nothing new.
    Empty,
    /// Message `seq`, and what the reader's closure made of it.
    Message { seq: u64, value: R },
    /// This many messages were overwritten before they could be read (or
    /// changed while being read, and were thrown away).
    Missed(u64),
    /// The slot held something no honest publisher writes.
    Corrupt(&'static str),
}

/// Tries to read the reader's next message: copies it into `buf` (which
/// must hold `slot_size` bytes), checks the seqlock, and only then hands
/// the copy to `f`.
pub fn try_read<V: RingView, R>(
    v: &V,
    st: &mut ReaderState,
    buf: &mut [u8],
    f: impl FnOnce(&[u8]) -> R,
) -> ReadOutcome<R> {
    let Geometry { slot_size, slot_count } = v.geometry();
    assert!(buf.len() >= slot_size as usize, "read buffer smaller than a slot");
    let count = u64::from(slot_count);
    // Acquire: pairs with the publisher's Release store of `head`.
    let h = v.header().head.load(Ordering::Acquire);
    let r = st.next;
    if h <= r {
        return ReadOutcome::Empty;
    }
    if h - r > count {
        let missed = h - count - r;
        st.next = h - count;
        return ReadOutcome::Missed(missed);
    }
    let index = (r % count) as usize;
    let slot = v.slot(index);
    // Acquire: pairs with the publisher's Release store of `seq` = 2r+2,
    // making the data written before it visible.
    let s1 = slot.seq.load(Ordering::Acquire);
    if s1 != even(r) {
        st.next = r.wrapping_add(1);
        return if s1 > even(r) { ReadOutcome::Missed(1) } else { ReadOutcome::Corrupt("slot sequence") };
    }
    // Relaxed: ordered after the Acquire load of `seq` above, and checked
    // by the re-read of `seq` below like the data.
    let len = slot.len.load(Ordering::Relaxed);
    if len > slot_size {
        st.next = r.wrapping_add(1);
        return ReadOutcome::Corrupt("slot length");
    }
    copy_out(v.slot_words(index), len as usize, buf);
    // Acquire fence: the data loads above happen before the re-check of
    // `seq`; pairs with the publisher's Release fence after its odd mark,
    // so if we loaded any byte of a later message, we see its mark.
    fence(Ordering::Acquire);
    let s2 = slot.seq.load(Ordering::Relaxed);
    st.next = r.wrapping_add(1);
    if s2 != s1 {
        return ReadOutcome::Missed(1);
    }
    ReadOutcome::Message { seq: r, value: f(&buf[..len as usize]) }
}

/// Reader, before it sleeps: registers as a waiter, then looks at `head`
/// (and `closed`) once more. Returns the `wake` value to sleep on
/// (`FUTEX_WAIT`), or `None` when there is something to read and it must
/// not sleep. Either way, [`end_sleep`] after.
pub fn prepare_sleep<V: RingView>(v: &V, st: &ReaderState) -> Option<u32> {
    let sig = v.signal();
    // SeqCst: pairs with the publisher's SeqCst fence in `commit`, so it
    // sees this waiter or we see its new head below.
    sig.waiters.fetch_add(1, Ordering::SeqCst);
    // Acquire: pairs with the publisher's Release bump of `wake`.
    let seen = sig.wake.load(Ordering::Acquire);
    fence(Ordering::SeqCst);
    // Acquire: pairs with the publisher's Release store of `head` (and
    // the broker's or publisher's of `closed`).
    let head = v.header().head.load(Ordering::Acquire);
    let closed = v.header().closed.load(Ordering::Acquire) != 0;
    (head <= st.next && !closed).then_some(seen)
}

/// Reader, after [`prepare_sleep`] (and the sleep, if any).
pub fn end_sleep<V: RingView>(v: &V) {
    // Relaxed: a publisher that still counts us only makes one needless
    // FUTEX_WAKE.
    v.signal().waiters.fetch_sub(1, Ordering::Relaxed);
}

/// Publisher, when [`commit`] said a reader may sleep: moves `wake` on,
/// so a reader about to sleep on the old value does not; the caller then
/// wakes the sleepers (`FUTEX_WAKE`).
pub fn bump_wake<V: RingView>(v: &V) {
    // Release: pairs with the sleeper's Acquire load of `wake`.
    v.signal().wake.fetch_add(1, Ordering::Release);
}

/// Reader, after each message (block mode): publishes its position, then
/// says whether the publisher waits for it (then the caller bumps
/// `progress` with [`bump_progress`] and wakes it).
pub fn advance<V: RingView>(v: &V, cursor: &Cursor, st: &ReaderState) -> bool {
    store_cursor(cursor, st);
    // SeqCst fence: pairs with the publisher's, between its
    // `publisher_waiting` store and its last cursor check.
    fence(Ordering::SeqCst);
    // Relaxed: the SeqCst fence above orders it after our cursor.
    v.signal().publisher_waiting.load(Ordering::Relaxed) != 0
}

/// Reader: tells a waiting publisher there is progress; then `FUTEX_WAKE`.
pub fn bump_progress<V: RingView>(v: &V) {
    // Release: pairs with the publisher's Acquire load of `progress`
    // before it registers as waiting.
    v.signal().progress.fetch_add(1, Ordering::Release);
}

/// Publisher (block mode), when the next slot is not free: registers as
/// waiting, then looks at the cursors once more. Returns the `progress`
/// value to sleep on, or `None` if the slot is free now. Either way,
/// [`end_publisher_wait`] after.
pub fn prepare_publisher_wait<'a, V: RingView, I>(v: &V, st: &WriterState, cursors: I) -> Option<u32>
where
    I: IntoIterator<Item = &'a Cursor>,
{
    let sig = v.signal();
    // Acquire: pairs with a reader's Release bump of `progress`.
    let seen = sig.progress.load(Ordering::Acquire);
    // SeqCst (and the fence): pairs with the reader's SeqCst fence between
    // its cursor store and its `publisher_waiting` load.
    sig.publisher_waiting.store(1, Ordering::SeqCst);
    fence(Ordering::SeqCst);
    (!slot_free(st, v.geometry().slot_count, cursors)).then_some(seen)
}

/// Publisher, after [`prepare_publisher_wait`] (and the sleep, if any).
pub fn end_publisher_wait<V: RingView>(v: &V) {
    // Relaxed: a reader that still sees 1 only bumps `progress` once for
    // nothing.
    v.signal().publisher_waiting.store(0, Ordering::Relaxed);
}

/// Broker: a reader joins or leaves. Moves `members` on (the publisher
/// compares it with the last news it applied) and returns the new
/// generation, to send the publisher with the news.
pub fn announce<V: RingView>(v: &V) -> u32 {
    // SeqCst RMW, then a SeqCst fence: see `join`.
    let generation = v.header().members.fetch_add(1, Ordering::SeqCst).wrapping_add(1);
    fence(Ordering::SeqCst);
    generation
}

/// Broker: a reader joins. Announces it first, then reads `head`: the new
/// reader starts there. Returns the generation and that position.
///
/// Why this order makes block mode lose nothing for a late joiner: the
/// publisher only learns of the reader (its cursor) from the broker's news,
/// some time later, and meanwhile publishes as if the reader did not exist.
/// Say the broker read `head = h`. The publisher's store of `head = h + 1`
/// (committing message `h`) is followed by a SeqCst fence in [`commit`] and
/// then by its look at `members` before message `h + 1`; the broker's bump
/// of `members` is followed by a SeqCst fence and then its load of `head`,
/// which did not see `h + 1`. So (the two fences are ordered one way or the
/// other) the publisher's look sees the bump, and in block mode it waits
/// for the news before writing message `h + 1`. Message `h`, which the
/// reader wants first, would only be overwritten by message `h + count`.
pub fn join<V: RingView>(v: &V) -> (u32, u64) {
    let generation = announce(v);
    // SeqCst: the load the argument above needs after the fence (Acquire
    // would do; SeqCst makes the intent plain and costs the broker nothing).
    let head = v.header().head.load(Ordering::SeqCst);
    (generation, head)
}

/// Publisher: the broker's membership generation now (see [`join`]).
/// Compare it with the last news applied.
pub fn members<V: RingView>(v: &V) -> u32 {
    // Acquire: pairs with the broker's bump; ordered after our last `head`
    // store by the SeqCst fence in `commit`.
    v.header().members.load(Ordering::Acquire)
}

/// Whether news up to generation `applied` covers generation `target`
/// (both wrap).
pub fn caught_up(applied: u32, target: u32) -> bool {
    applied.wrapping_sub(target) as i32 >= 0
}

/// Publishes the reader's position for a block-mode publisher.
pub fn store_cursor(cursor: &Cursor, st: &ReaderState) {
    // Release: pairs with the publisher's Acquire load in `slot_free`; our
    // reads of the slots before `next` happen before it reuses them.
    cursor.next.store(st.next, Ordering::Release);
}
