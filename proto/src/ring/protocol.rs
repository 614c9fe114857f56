//! The ring protocol: single publisher, many readers, per-slot seqlocks.
//!
//! Written against [`RingView`] so the same code runs on a real shared
//! mapping and, under `--cfg loom`, on a heap model where loom explores
//! every interleaving (`ring::model`).
//!
//! Publisher, for message `n` in slot `n % count`:
//! 1. (block mode) wait until every live reader's cursor is past `n - count`;
//! 2. `seq = 2n+1` (Relaxed), then a Release fence: the "writing" mark is
//!    ordered before any data byte;
//! 3. write the data and `len`;
//! 4. `seq = 2n+2` (Release): pairs with the reader's Acquire load of `seq`;
//! 5. `head = n+1` (Release): pairs with the reader's Acquire load of `head`;
//! 6. a SeqCst fence, then read `waiters`: pairs with the reader's SeqCst
//!    increment of `waiters` before its last look at `head`, so either the
//!    publisher sees the sleeper or the sleeper sees the new head.
//!
//! Reader, for its next sequence `r`:
//! 1. `h = head` (Acquire); nothing new if `h <= r`; if `h - r > count` the
//!    messages `r .. h - count` were overwritten: report them as missed;
//! 2. `s1 = seq` (Acquire); anything but `2r+2` means the slot moved on
//!    (missed) or holds garbage (corrupt);
//! 3. `len`, bounds-checked against the slot size *we* were told, never the
//!    one in shared memory; read the data;
//! 4. an Acquire fence, then `s2 = seq`: if `s2 != s1` the publisher lapped
//!    us while we read, and what we read is thrown away (torn, missed).
//!
//! Every index is `seq % count` with our own `count`, so no value a hostile
//! peer writes can move a read out of bounds; it can only produce
//! `Missed`/`Corrupt` outcomes.

use crate::ring::layout::{Cursor, RingHeader, Signal, SlotHeader};
use crate::sync::{fence, Ordering};

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
    /// Reads `len <= slot_size` data bytes of slot `index` in place.
    fn read_data<R>(&self, index: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> R;
}

/// What only the publisher may do.
pub trait RingWriteView: RingView {
    /// Writes `bytes` (at most `slot_size`) into slot `index`.
    fn write_data(&self, index: usize, bytes: &[u8]);
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

/// Gives up a write begun with [`begin_write`]: the slot goes back to
/// the message it held before, which no reader can be waiting for.
pub fn abandon_write<V: RingWriteView>(v: &V, st: &WriterState, index: usize) {
    let count = u64::from(v.geometry().slot_count);
    let previous = if st.next >= count { even(st.next - count) } else { 0 };
    v.slot(index).seq.store(previous, Ordering::Release);
}

/// Publishes `bytes` (at most `slot_size`).
pub fn publish<V: RingWriteView>(v: &V, st: &mut WriterState, bytes: &[u8]) -> bool {
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

/// Tries to read the reader's next message, in place, with `f`.
pub fn try_read<V: RingView, R>(v: &V, st: &mut ReaderState, f: impl FnOnce(&[u8]) -> R) -> ReadOutcome<R> {
    let Geometry { slot_size, slot_count } = v.geometry();
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
    let len = slot.len.load(Ordering::Relaxed);
    if len > slot_size {
        st.next = r.wrapping_add(1);
        return ReadOutcome::Corrupt("slot length");
    }
    let value = v.read_data(index, len as usize, f);
    // Acquire fence: the data reads above happen before the re-check of
    // `seq`; pairs with the publisher's Release fence after its odd mark.
    fence(Ordering::Acquire);
    let s2 = slot.seq.load(Ordering::Relaxed);
    st.next = r.wrapping_add(1);
    if s2 != s1 {
        return ReadOutcome::Missed(1);
    }
    ReadOutcome::Message { seq: r, value }
}

/// Publishes the reader's position for a block-mode publisher.
pub fn store_cursor(cursor: &Cursor, st: &ReaderState) {
    // Release: pairs with the publisher's Acquire load in `slot_free`; our
    // reads of the slots before `next` happen before it reuses them.
    cursor.next.store(st.next, Ordering::Release);
}
