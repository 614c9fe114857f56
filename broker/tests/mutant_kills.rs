//! Tests written to kill mutants that `cargo mutants` left alive in the
//! security-critical code (issue 9): each checks one word of the ring
//! protocol (`shmbus_proto::ring::protocol`) directly, on a real ring
//! mapping, one step at a time, where the cross-process tests
//! (`tests/ring.rs`) and the loom model only see the end result of many
//! steps, or are not run by `cargo test`.

use std::os::fd::AsFd;

use shmbus_proto::ring::layout::Cursor;
use shmbus_proto::ring::protocol::{self, Geometry, ReadOutcome, ReaderState, RingView, WriterState};
use shmbus_proto::ring::shm::{create_ring, join_reader, CursorMap, RingMap};
use shmbus_proto::sync::Ordering;

const G: Geometry = Geometry { slot_size: 64, slot_count: 4 };

fn ring() -> RingMap {
    let (_ring, _signal, map) = create_ring(G, true).unwrap();
    map
}

/// A reader's cursor page, mapped writable (as the reader maps it).
fn cursor(map: &RingMap) -> CursorMap {
    let (_generation, fd, _ro) = join_reader(map).unwrap();
    CursorMap::map(fd.as_fd(), true).unwrap()
}

fn waiters(map: &RingMap) -> u32 {
    map.signal().waiters.load(Ordering::SeqCst)
}

fn wake(map: &RingMap) -> u32 {
    map.signal().wake.load(Ordering::SeqCst)
}

/// `prepare_sleep` registers a waiter and says to sleep on the current
/// `wake` only while there is nothing to read and the ring is open;
/// `end_sleep` takes the waiter away; `bump_wake` moves `wake` on.
#[test]
fn the_reader_sleeps_only_on_an_open_ring_with_nothing_new() {
    let mut map = ring();
    for _ in 0..5 {
        protocol::bump_wake(&map);
    }
    assert_eq!(wake(&map), 5, "bump_wake moves wake on by one");
    let st = ReaderState { next: 0 };

    // Nothing published: sleep on wake = 5.
    assert_eq!(waiters(&map), 0);
    assert_eq!(protocol::prepare_sleep(&map, &st), Some(5));
    assert_eq!(waiters(&map), 1, "prepare_sleep registers the sleeper");
    protocol::end_sleep(&map);
    assert_eq!(waiters(&map), 0, "end_sleep takes the sleeper away");

    // Something to read: no sleep.
    let mut w = WriterState::default();
    protocol::publish(&mut map, &mut w, b"m0");
    assert_eq!(protocol::prepare_sleep(&map, &st), None, "slept with a message to read");
    protocol::end_sleep(&map);
    // Read up to the head: sleep again.
    let st = ReaderState { next: 1 };
    assert_eq!(protocol::prepare_sleep(&map, &st), Some(5));
    protocol::end_sleep(&map);
    // A reader that claims to be ahead of the head sleeps too.
    let st = ReaderState { next: 2 };
    assert_eq!(protocol::prepare_sleep(&map, &st), Some(5));
    protocol::end_sleep(&map);

    // Closed: never sleep (close also moves wake on).
    map.close();
    let st = ReaderState { next: 1 };
    assert_eq!(protocol::prepare_sleep(&map, &st), None, "slept on a closed ring");
    protocol::end_sleep(&map);
    assert_eq!(waiters(&map), 0);
}

/// `commit` (through `publish`) says to wake readers exactly when one is
/// registered as a sleeper.
#[test]
fn a_publish_wakes_exactly_when_someone_sleeps() {
    let mut map = ring();
    let mut w = WriterState::default();
    let far = ReaderState { next: 1000 };
    assert!(!protocol::publish(&mut map, &mut w, b"a"), "woke with no sleeper");
    protocol::prepare_sleep(&map, &far);
    assert!(protocol::publish(&mut map, &mut w, b"b"), "did not wake one sleeper");
    protocol::prepare_sleep(&map, &far);
    assert!(protocol::publish(&mut map, &mut w, b"c"), "did not wake two sleepers");
    protocol::end_sleep(&map);
    protocol::end_sleep(&map);
    assert!(!protocol::publish(&mut map, &mut w, b"d"), "woke after the sleepers left");
}

/// Block mode: the next slot is free of a reader exactly when the reader
/// is less than `slot_count` messages behind; a cursor ahead of the
/// publisher counts as caught up.
#[test]
fn slot_free_is_exactly_less_than_a_ring_behind() {
    let map = ring();
    let c = cursor(&map);
    let at = |next: u64| {
        let cur: &Cursor = c.cursor();
        cur.next.store(next, Ordering::SeqCst);
    };
    let free = |n: u64| protocol::slot_free(&WriterState { next: n }, G.slot_count, [c.cursor()]);

    at(0);
    assert!(free(0));
    assert!(free(3), "3 behind in a ring of 4 is free");
    assert!(!free(4), "a full ring behind is not free");
    assert!(!free(5));
    at(2);
    assert!(free(5));
    assert!(!free(6));
    // Ahead of the publisher (a scribbler): caught up.
    at(10);
    assert!(free(4));
    assert!(free(9));
    // No readers at all: always free.
    assert!(protocol::slot_free(&WriterState { next: 100 }, G.slot_count, std::iter::empty::<&Cursor>()));
}

/// `advance` publishes the reader's position and says whether the
/// publisher waits; `prepare_publisher_wait` registers the publisher and
/// returns the `progress` to sleep on only while the slot is not free;
/// `bump_progress` moves `progress` on; `end_publisher_wait` unregisters.
#[test]
fn the_block_mode_handshake_words() {
    let map = ring();
    let c = cursor(&map);
    let sig = map.signal();
    for _ in 0..3 {
        protocol::bump_progress(&map);
    }
    assert_eq!(sig.progress.load(Ordering::SeqCst), 3, "bump_progress moves progress on by one");

    // Nobody waits: advance stores the cursor and says no.
    assert!(!protocol::advance(&map, c.cursor(), &ReaderState { next: 7 }));
    assert_eq!(c.cursor().next.load(Ordering::SeqCst), 7, "advance did not store the cursor");
    protocol::store_cursor(c.cursor(), &ReaderState { next: 0 });
    assert_eq!(c.cursor().next.load(Ordering::SeqCst), 0, "store_cursor did not store");

    // The publisher is a ring ahead of the reader: it waits, on progress = 3.
    let w = WriterState { next: 4 };
    assert_eq!(protocol::prepare_publisher_wait(&map, &w, [c.cursor()]), Some(3));
    assert_eq!(sig.publisher_waiting.load(Ordering::SeqCst), 1);
    assert!(
        protocol::advance(&map, c.cursor(), &ReaderState { next: 1 }),
        "a waiting publisher was not told"
    );
    protocol::end_publisher_wait(&map);
    assert_eq!(sig.publisher_waiting.load(Ordering::SeqCst), 0);
    assert!(!protocol::advance(&map, c.cursor(), &ReaderState { next: 1 }));

    // The reader moved on (cursor 1): the slot is free, no wait.
    assert_eq!(protocol::prepare_publisher_wait(&map, &w, [c.cursor()]), None);
    protocol::end_publisher_wait(&map);
}

/// `announce` and `join` move the membership generation on by one and
/// return it; `join` also returns the head the new reader starts at;
/// `members` reads the generation.
#[test]
fn membership_generations_and_the_join_position() {
    let mut map = ring();
    assert_eq!(protocol::members(&map), 0);
    assert_eq!(protocol::announce(&map), 1);
    assert_eq!(protocol::announce(&map), 2);
    assert_eq!(protocol::members(&map), 2);
    let mut w = WriterState::default();
    for i in 0..7u8 {
        protocol::publish(&mut map, &mut w, &[i]);
    }
    assert_eq!(protocol::join(&map), (3, 7));
    assert_eq!(protocol::members(&map), 3);
    // join_reader sets the new cursor there.
    let c = cursor(&map);
    assert_eq!(c.cursor().next.load(Ordering::SeqCst), 7);
    assert_eq!(protocol::members(&map), 4);
}

#[test]
fn caught_up_compares_generations_that_wrap() {
    assert!(protocol::caught_up(5, 5));
    assert!(protocol::caught_up(6, 5));
    assert!(!protocol::caught_up(4, 5));
    assert!(protocol::caught_up(0, u32::MAX), "0 comes after u32::MAX");
    assert!(!protocol::caught_up(u32::MAX, 0));
}

/// A dropped loan leaves its slot marked as being written for message
/// `n`, whatever the slot's sequence word says by then: a reader that
/// still wants the slot's old message counts it missed.
#[test]
fn an_abandoned_write_marks_the_slot_whatever_it_held() {
    let mut map = ring();
    let mut w = WriterState::default();
    for i in 0..4u8 {
        protocol::publish(&mut map, &mut w, &[i; 8]);
    }
    // Message 4 goes into slot 0, over message 0.
    let index = protocol::begin_write(&map, &w);
    assert_eq!(index, 0);
    assert_eq!(map.slot(0).seq.load(Ordering::SeqCst), 2 * 4 + 1);
    // Say the sequence word went back to message 0's (as it once did).
    map.slot(0).seq.store(2, Ordering::SeqCst);
    protocol::abandon_write(&map, &w, index);
    assert_eq!(map.slot(0).seq.load(Ordering::SeqCst), 2 * 4 + 1, "the abandoned slot is not marked");
    let mut st = ReaderState { next: 0 };
    let got = protocol::try_read(&map, &mut st, &mut [0; 64], |b| b.to_vec());
    assert_eq!(got, ReadOutcome::Missed(1));
}
