//! Loom model of the ring protocol: every interleaving of a publisher and
//! a reader on a tiny ring, with the data held in loom atomics so loom
//! sees every racy byte. Checks: no torn message is ever accepted, every
//! message is delivered or counted as missed exactly once, and in block
//! mode nothing is missed at all.

use loom::sync::atomic::AtomicU64;
use loom::sync::Arc;
use loom::thread;

use super::layout::{Cursor, RingHeader, Signal, SlotHeader};
use super::protocol::*;
use crate::sync::Ordering;

const WORDS: usize = 2;

struct Model {
    header: RingHeader,
    signal: Signal,
    slots: Vec<SlotHeader>,
    data: Vec<[AtomicU64; WORDS]>,
    geometry: Geometry,
}

impl Model {
    fn new(count: u32) -> Model {
        Model {
            header: RingHeader::new_for_model(8 * WORDS as u32, count, 0),
            signal: Signal::new_for_model(),
            slots: (0..count).map(|_| SlotHeader::new_for_model()).collect(),
            data: (0..count).map(|_| [AtomicU64::new(0), AtomicU64::new(0)]).collect(),
            geometry: Geometry { slot_size: 8 * WORDS as u32, slot_count: count },
        }
    }
}

impl RingView for Model {
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn header(&self) -> &RingHeader {
        &self.header
    }
    fn signal(&self) -> &Signal {
        &self.signal
    }
    fn slot(&self, index: usize) -> &SlotHeader {
        &self.slots[index]
    }
    fn read_data<R>(&self, index: usize, len: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        let mut bytes = Vec::with_capacity(8 * WORDS);
        for w in &self.data[index] {
            bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        f(&bytes[..len.min(bytes.len())])
    }
}

impl RingWriteView for Model {
    fn write_data(&self, index: usize, bytes: &[u8]) {
        for (w, chunk) in self.data[index].iter().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            w.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
    }
}

/// Message `n`: every word holds `n + 1`, so a mix of two messages shows.
fn message(n: u64) -> Vec<u8> {
    (0..WORDS).flat_map(|_| (n + 1).to_le_bytes()).collect()
}

fn intact(bytes: &[u8]) -> Option<u64> {
    let first = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    bytes.chunks(8).all(|c| u64::from_le_bytes(c.try_into().unwrap()) == first).then(|| first - 1)
}

#[test]
fn overwrite_mode_never_accepts_a_torn_message() {
    loom::model(|| {
        let ring = Arc::new(Model::new(2));
        const N: u64 = 3;
        let w = ring.clone();
        let writer = thread::spawn(move || {
            let mut st = WriterState::default();
            for n in 0..N {
                publish(&*w, &mut st, &message(n));
            }
        });
        let mut st = ReaderState::default();
        let (mut got, mut missed) = (Vec::new(), 0);
        for _ in 0..N {
            match try_read(&*ring, &mut st, |b| intact(b)) {
                ReadOutcome::Message { seq, value } => {
                    assert_eq!(value, Some(seq), "a torn or misplaced message was accepted");
                    got.push(seq);
                }
                ReadOutcome::Missed(k) => missed += k,
                ReadOutcome::Empty => {}
                ReadOutcome::Corrupt(what) => panic!("honest publisher read as corrupt: {what}"),
            }
        }
        writer.join().unwrap();
        // Drain what is left: every message is accounted for exactly once.
        loop {
            match try_read(&*ring, &mut st, |b| intact(b)) {
                ReadOutcome::Message { seq, value } => {
                    assert_eq!(value, Some(seq));
                    got.push(seq);
                }
                ReadOutcome::Missed(k) => missed += k,
                ReadOutcome::Empty => break,
                ReadOutcome::Corrupt(what) => panic!("{what}"),
            }
        }
        assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
        assert_eq!(got.len() as u64 + missed, N, "got {got:?}, missed {missed}");
    });
}

#[test]
fn block_mode_cursors_lose_nothing() {
    loom::model(|| {
        let ring = Arc::new(Model::new(2));
        let cursor = Arc::new(Cursor::new_for_model());
        const N: u64 = 3;
        let (w, c) = (ring.clone(), cursor.clone());
        let writer = thread::spawn(move || {
            let mut st = WriterState::default();
            for n in 0..N {
                while !slot_free(&st, 2, [&*c]) {
                    thread::yield_now();
                }
                publish(&*w, &mut st, &message(n));
            }
        });
        let mut st = ReaderState::default();
        let mut next = 0;
        while next < N {
            match try_read(&*ring, &mut st, |b| intact(b)) {
                ReadOutcome::Message { seq, value } => {
                    assert_eq!((seq, value), (next, Some(next)));
                    next += 1;
                    store_cursor(&cursor, &st);
                }
                ReadOutcome::Empty => thread::yield_now(),
                other => panic!("block mode lost or tore a message: {other:?}"),
            }
        }
        writer.join().unwrap();
    });
}

#[test]
fn a_sleeper_is_always_seen_or_sees_the_message() {
    // The wake-up handshake: the reader registers as a waiter, then looks
    // at head once more; the publisher stores head, then looks at waiters.
    loom::model(|| {
        let ring = Arc::new(Model::new(2));
        let w = ring.clone();
        let writer = thread::spawn(move || {
            let mut st = WriterState::default();
            publish(&*w, &mut st, &message(0))
        });
        ring.signal.waiters.fetch_add(1, Ordering::SeqCst);
        crate::sync::fence(Ordering::SeqCst);
        let saw_message = ring.header.head.load(Ordering::Acquire) > 0;
        let publisher_saw_waiter = writer.join().unwrap();
        assert!(saw_message || publisher_saw_waiter, "lost wake-up");
    });
}
