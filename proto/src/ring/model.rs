//! Loom model of the ring protocol: every interleaving of a publisher, a
//! reader (and, for joins, the broker) on a tiny ring, running the shipped
//! functions of [`super::protocol`]: the seqlock writes and reads (the
//! reader's copy-out is `protocol::copy_out` over loom atomics), the
//! cursors, the reader's sleep handshake (`prepare_sleep`, `end_sleep`,
//! `bump_wake`), the blocked publisher's (`prepare_publisher_wait`,
//! `advance`, `bump_progress`), abandoned writes, and a late join
//! (`join`, `members`, `caught_up`).
//!
//! What stays outside: the system calls. A futex wait is modelled as
//! waiting until the word differs from the value the protocol said to
//! sleep on, with no timeout, which is stricter than the real one (a lost
//! wake-up spins for ever here, which loom reports, where the real one
//! would sleep its bounded timeout). The broker's news to the publisher
//! travels on its socket; here it is a word the publisher waits on, as the
//! client's `catch_up` waits on its socket. The publisher's data stores
//! are loom atomics here and a plain copy in `shm` (readers never see
//! either as anything but words they load atomically).
//!
//! Checks: no torn message is ever accepted, every message is delivered
//! or counted as missed exactly once, block mode loses nothing (late
//! joiners included), no wake-up is lost, and a dropped write is counted
//! missed, never read.

use loom::sync::atomic::{AtomicU32, AtomicU64};
use loom::sync::Arc;
use loom::thread;

use super::layout::{Cursor, RingHeader, Signal, SlotHeader};
use super::protocol::*;
use crate::sync::Ordering;

const WORDS: usize = 2;
const SLOT: usize = 8 * WORDS;

struct Model {
    header: RingHeader,
    signal: Signal,
    slots: Vec<SlotHeader>,
    data: Vec<[AtomicU64; WORDS]>,
    geometry: Geometry,
}

impl Model {
    fn new(count: u32) -> Arc<Model> {
        Arc::new(Model {
            header: RingHeader::new_for_model(SLOT as u32, count, 0),
            signal: Signal::new_for_model(),
            slots: (0..count).map(|_| SlotHeader::new_for_model()).collect(),
            data: (0..count).map(|_| [AtomicU64::new(0), AtomicU64::new(0)]).collect(),
            geometry: Geometry { slot_size: SLOT as u32, slot_count: count },
        })
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
    fn slot_words(&self, index: usize) -> &[AtomicU64] {
        &self.data[index]
    }
}

/// The publisher's handle: the only one that may write data (`&mut`).
struct Writer(Arc<Model>);

impl RingView for Writer {
    fn geometry(&self) -> Geometry {
        self.0.geometry()
    }
    fn header(&self) -> &RingHeader {
        self.0.header()
    }
    fn signal(&self) -> &Signal {
        self.0.signal()
    }
    fn slot(&self, index: usize) -> &SlotHeader {
        self.0.slot(index)
    }
    fn slot_words(&self, index: usize) -> &[AtomicU64] {
        self.0.slot_words(index)
    }
}

impl RingWriteView for Writer {
    fn write_data(&mut self, index: usize, bytes: &[u8]) {
        for (w, chunk) in self.0.data[index].iter().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            // Relaxed: ordered by begin_write's Release fence and commit's
            // Release store, as the plain copy in `shm` is.
            w.store(u64::from_ne_bytes(b), Ordering::Relaxed);
        }
    }
}

/// Message `n`: every word holds `n + 1`, so a mix of two messages shows.
fn message(n: u64) -> Vec<u8> {
    (0..WORDS).flat_map(|_| (n + 1).to_ne_bytes()).collect()
}

fn intact(bytes: &[u8]) -> Option<u64> {
    let first = u64::from_ne_bytes(bytes[..8].try_into().unwrap());
    (bytes.len() == SLOT && bytes.chunks(8).all(|c| u64::from_ne_bytes(c.try_into().unwrap()) == first))
        .then(|| first.wrapping_sub(1))
}

/// Runs a model with at most `bound` preemptions per execution (`None`:
/// every interleaving). The small models run exhaustively; the ones with
/// sleeping threads or three threads use loom's usual bound of 3, which
/// still covers every order of the handshakes' few racing operations.
fn check(bound: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = bound;
    b.check(f);
}

/// A futex wait with no timeout: returns once `word` is not `seen`.
fn futex_wait(word: &AtomicU32, seen: u32) {
    // Acquire: as the real wait's caller re-reads under its own orderings.
    while word.load(Ordering::Acquire) == seen {
        thread::yield_now();
    }
}

/// The publisher's side of a publish, as `ChannelPublisher::publish` does
/// it: write, commit, and wake sleepers if `commit` says there may be some.
fn publish_and_wake(w: &mut Writer, st: &mut WriterState, n: u64) {
    if publish(w, st, &message(n)) {
        bump_wake(w);
    }
}

/// The reader's blocking wait, as `ChannelSubscriber::sleep` does it.
fn sleep(ring: &Model, st: &ReaderState) {
    if let Some(seen) = prepare_sleep(ring, st) {
        futex_wait(&ring.signal.wake, seen);
    }
    end_sleep(ring);
}

/// The blocked publisher's wait, as `ChannelPublisher::wait_for_room`
/// does it.
fn wait_for_room(w: &Writer, st: &WriterState, cursors: &[&Cursor]) {
    while !slot_free(st, w.geometry().slot_count, cursors.iter().copied()) {
        if let Some(seen) = prepare_publisher_wait(w, st, cursors.iter().copied()) {
            futex_wait(&w.signal().progress, seen);
        }
        end_publisher_wait(w);
    }
}

/// The reader's step after a message, as `ChannelSubscriber::advance`.
fn reader_advance(ring: &Model, cursor: &Cursor, st: &ReaderState) {
    if advance(ring, cursor, st) {
        bump_progress(ring);
    }
}

#[test]
fn overwrite_mode_never_accepts_a_torn_message() {
    check(None, || {
        let ring = Model::new(2);
        const N: u64 = 3;
        let mut w = Writer(ring.clone());
        let writer = thread::spawn(move || {
            let mut st = WriterState::default();
            for n in 0..N {
                publish(&mut w, &mut st, &message(n));
            }
        });
        let mut st = ReaderState::default();
        let mut buf = [0u8; SLOT];
        let (mut got, mut missed) = (Vec::new(), 0);
        let mut read = |st: &mut ReaderState, got: &mut Vec<u64>, missed: &mut u64| match try_read(
            &*ring, st, &mut buf, intact,
        ) {
            ReadOutcome::Message { seq, value } => {
                assert_eq!(value, Some(seq), "a torn or misplaced message was accepted");
                got.push(seq);
                true
            }
            ReadOutcome::Missed(k) => {
                *missed += k;
                true
            }
            ReadOutcome::Empty => false,
            ReadOutcome::Corrupt(what) => panic!("honest publisher read as corrupt: {what}"),
        };
        for _ in 0..N {
            read(&mut st, &mut got, &mut missed);
        }
        writer.join().unwrap();
        // Drain what is left: every message is accounted for exactly once.
        while read(&mut st, &mut got, &mut missed) {}
        assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
        assert_eq!(got.len() as u64 + missed, N, "got {got:?}, missed {missed}");
    });
}

#[test]
fn an_abandoned_write_is_counted_missed_never_read() {
    // Overwrite mode, two slots: messages 0 and 1 fill the ring, then a
    // write of message 2 over message 0 is begun, half done and dropped
    // (a loan dropped unsent), then message 2 is published properly.
    check(None, || {
        let ring = Model::new(2);
        let mut w = Writer(ring.clone());
        let writer = thread::spawn(move || {
            let mut st = WriterState::default();
            publish(&mut w, &mut st, &message(0));
            publish(&mut w, &mut st, &message(1));
            let index = begin_write(&w, &st);
            w.write_data(index, &message(7)[..8]);
            abandon_write(&w, &st, index);
            publish(&mut w, &mut st, &message(2));
        });
        let mut st = ReaderState::default();
        let mut buf = [0u8; SLOT];
        let (mut got, mut missed) = (Vec::new(), 0);
        for _ in 0..2 {
            match try_read(&*ring, &mut st, &mut buf, intact) {
                ReadOutcome::Message { seq, value } => {
                    assert_eq!(value, Some(seq), "half-written bytes accepted as message {seq}");
                    got.push(seq);
                }
                ReadOutcome::Missed(k) => missed += k,
                ReadOutcome::Empty => {}
                ReadOutcome::Corrupt(what) => panic!("{what}"),
            }
        }
        writer.join().unwrap();
        loop {
            match try_read(&*ring, &mut st, &mut buf, intact) {
                ReadOutcome::Message { seq, value } => {
                    assert_eq!(value, Some(seq));
                    got.push(seq);
                }
                ReadOutcome::Missed(k) => missed += k,
                ReadOutcome::Empty => break,
                ReadOutcome::Corrupt(what) => panic!("{what}"),
            }
        }
        assert_eq!(got.len() as u64 + missed, 3, "got {got:?}, missed {missed}");
    });
}

#[test]
fn block_mode_cursors_lose_nothing_and_no_wake_up_is_lost() {
    // The reader sleeps whenever it runs dry, the publisher whenever the
    // ring is full: both with the shipped handshakes, and futex waits that
    // never time out, so a lost wake-up hangs the model.
    check(Some(3), || {
        let ring = Model::new(2);
        let cursor = Arc::new(Cursor::new_for_model());
        const N: u64 = 3;
        let (mut w, c) = (Writer(ring.clone()), cursor.clone());
        let writer = thread::spawn(move || {
            let mut st = WriterState::default();
            for n in 0..N {
                wait_for_room(&w, &st, &[&c]);
                publish_and_wake(&mut w, &mut st, n);
            }
        });
        let mut st = ReaderState::default();
        let mut buf = [0u8; SLOT];
        let mut next = 0;
        while next < N {
            match try_read(&*ring, &mut st, &mut buf, intact) {
                ReadOutcome::Message { seq, value } => {
                    assert_eq!((seq, value), (next, Some(next)));
                    next += 1;
                    reader_advance(&ring, &cursor, &st);
                }
                ReadOutcome::Empty => sleep(&ring, &st),
                other => panic!("block mode lost or tore a message: {other:?}"),
            }
        }
        writer.join().unwrap();
    });
}

#[test]
fn a_sleeper_is_always_woken_or_sees_the_message() {
    // The reader's real wait: if `prepare_sleep` says sleep, the publisher
    // must move `wake` on (else the sleeper would wait out its timeout).
    check(None, || {
        let ring = Model::new(2);
        let mut w = Writer(ring.clone());
        let writer = thread::spawn(move || {
            let mut st = WriterState::default();
            publish_and_wake(&mut w, &mut st, 0);
        });
        let mut st = ReaderState::default();
        let mut buf = [0u8; SLOT];
        loop {
            match try_read(&*ring, &mut st, &mut buf, intact) {
                ReadOutcome::Message { seq, value } => {
                    assert_eq!((seq, value), (0, Some(0)));
                    break;
                }
                ReadOutcome::Empty => sleep(&ring, &st),
                other => panic!("{other:?}"),
            }
        }
        writer.join().unwrap();
    });
}

#[test]
fn a_late_joiner_in_block_mode_loses_nothing() {
    // The broker adds a reader while the publisher streams with nobody to
    // wait for: `join` (announce, then read the head), then the news
    // travels to the publisher (here a word; really its socket). The
    // publisher looks at `members` before each message and, when it moved,
    // waits for the news before going on, as the client's `catch_up` does.
    // The reader starts where the broker put it and must miss nothing.
    check(Some(3), || {
        let ring = Model::new(2);
        let cursor = Arc::new(Cursor::new_for_model());
        let news = Arc::new(AtomicU32::new(0));
        const N: u64 = 3;
        let (mut w, c, heard) = (Writer(ring.clone()), cursor.clone(), news.clone());
        let writer = thread::spawn(move || {
            let mut st = WriterState::default();
            let (mut applied, mut knows_reader) = (0u32, false);
            for n in 0..N {
                let target = members(&w);
                if target != applied {
                    // Acquire: pairs with the broker's Release "send".
                    while !caught_up(heard.load(Ordering::Acquire), target) {
                        thread::yield_now();
                    }
                    applied = target;
                    knows_reader = true;
                }
                let cursors: &[&Cursor] = if knows_reader { &[&*c] } else { &[] };
                wait_for_room(&w, &st, cursors);
                publish_and_wake(&mut w, &mut st, n);
            }
        });
        let (b, c, tell) = (ring.clone(), cursor.clone(), news.clone());
        let broker = thread::spawn(move || {
            let (generation, head) = join(&*b);
            // The cursor page is written before the news goes out.
            store_cursor(&c, &ReaderState { next: head });
            // Release: the "send" of the news, with the cursor.
            tell.store(generation, Ordering::Release);
            head
        });
        let start = broker.join().unwrap();
        let mut st = ReaderState { next: start };
        let mut buf = [0u8; SLOT];
        while st.next < N {
            match try_read(&*ring, &mut st, &mut buf, intact) {
                ReadOutcome::Message { seq, value } => {
                    assert_eq!(value, Some(seq));
                    reader_advance(&ring, &cursor, &st);
                }
                ReadOutcome::Empty => sleep(&ring, &st),
                other => panic!("a late joiner lost or tore a message: {other:?} (started at {start})"),
            }
        }
        writer.join().unwrap();
    });
}
