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
    let (_generation, fd, _ro, _broker_cursor) = join_reader(map).unwrap();
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

// ------------------------------------------------ the client's fd checks --
//
// A hostile broker's packets, with fds, read by the client's real receive
// path (`shmbus::fuzzing`, the `client_delivery` fuzz target's entry
// point): which frames may carry fds, and how many.

mod client_fds {
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

    use shmbus::fuzzing;
    use shmbus::{ChannelOverflow, Disconnect, Event, GoodbyeCode};
    use shmbus_proto::frame::{
        decode_client, encode_frame, Answer, Body, ChannelGranted, ChannelReader, ClientFrame, Deliver, Gap,
        Outcome, PayloadRef, Sender, Serve, Subscribed,
    };
    use shmbus_proto::sys::memfd;
    use shmbus_proto::sys::socket::RecvBatch;
    use shmbus_proto::sys::socket::{self, OutPacket};

    fn sealed(len: usize) -> OwnedFd {
        memfd::from_bytes("mutant-kills", &vec![7; len]).unwrap()
    }

    /// Sends `body` with `fds` to a fresh connection; returns why the
    /// connection ended, if it did.
    fn after<B: Body>(body: &B, fds: &[OwnedFd]) -> Option<Disconnect> {
        let (conn, broker) = fuzzing::connection(16, 1 << 20, 16, 8).unwrap();
        let head = encode_frame(body, &[]).unwrap();
        let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        socket::send_packet(broker.as_fd(), OutPacket { head: &head, payload: &[], fds: &fds }, true)
            .unwrap();
        let (_events, closed) = conn.drain();
        closed
    }

    fn violation(closed: Option<Disconnect>, what: &str) {
        let closed = closed.unwrap_or_else(|| panic!("{what}: the connection stayed"));
        assert_eq!(closed.code, Some(GoodbyeCode::ProtocolViolation), "{what}: {closed:?}");
    }

    const SENDER: Sender = Sender { client_id: 9, uid: 0, gid: 0, pid: 1 };

    /// Frames that carry no fds: an fd beside one is a protocol violation
    /// (and is closed), never silently taken.
    #[test]
    fn an_fd_beside_a_frame_that_carries_none_closes_the_connection() {
        violation(after(&Gap { sub_id: 1, missed: 1 }, &[sealed(8)]), "gap with an fd");
        violation(after(&Subscribed { sub_id: 1 }, &[sealed(8)]), "subscribed with an fd");
        assert_eq!(after(&Gap { sub_id: 1, missed: 1 }, &[]), None);
    }

    fn grant(reader_id: u32) -> ChannelGranted {
        ChannelGranted {
            req_id: 1,
            channel_id: 1,
            reader_id,
            slot_size: 64,
            slot_count: 4,
            overflow: ChannelOverflow::Overwrite,
        }
    }

    /// A channel grant comes with two fds (publisher) or three (reader);
    /// any other count is a protocol violation.
    #[test]
    fn a_channel_grant_comes_with_two_or_three_fds() {
        for n in [1, 4] {
            let fds: Vec<OwnedFd> = (0..n).map(|_| sealed(8)).collect();
            violation(after(&grant(0), &fds), &format!("a grant with {n} fds"));
        }
        for n in [2, 3] {
            let fds: Vec<OwnedFd> = (0..n).map(|_| sealed(8)).collect();
            assert_eq!(after(&grant(n - 2), &fds), None, "a grant with {n} fds");
        }
    }

    /// A reader's join comes with its cursor (one fd); a leave, or a join
    /// with more, is a protocol violation.
    #[test]
    fn a_reader_join_comes_with_exactly_its_cursor() {
        let reader = |joined| ChannelReader { channel_id: 1, reader_id: 1, joined, generation: 1 };
        assert_eq!(after(&reader(true), &[sealed(8)]), None, "a join with its cursor");
        assert_eq!(after(&reader(false), &[]), None, "a leave");
        violation(after(&reader(false), &[sealed(8)]), "a leave with an fd");
        violation(after(&reader(true), &[sealed(8), sealed(8)]), "a join with two fds");
    }

    /// A request or an answer by memfd comes with its memfd: taken, never
    /// a protocol violation.
    #[test]
    fn requests_and_answers_by_memfd_are_taken() {
        let payload = PayloadRef::Memfd { len: 100 };
        let serve = Serve {
            serial: 1,
            name: "svc.a",
            sender: SENDER,
            timeout_ms: 1000,
            no_reply: false,
            origin: None,
            payload,
        };
        assert_eq!(after(&serve, &[sealed(100)]), None, "a request by memfd");
        let answer = Answer { call_id: 1, outcome: Outcome::Reply, responder: Some(SENDER), payload };
        assert_eq!(after(&answer, &[sealed(100)]), None, "an answer by memfd");
    }

    /// What a subscription got from one delivery: `Some(true)` for a
    /// message, `Some(false)` for a gap, `None` for nothing.
    fn delivered(payload: PayloadRef, inline: &[u8], fds: &[OwnedFd]) -> Option<bool> {
        let (conn, broker) = fuzzing::connection(16, 1 << 20, 16, 8).unwrap();
        let d = Deliver { sub_id: 1, topic: "a.b", sender: SENDER, seq: 1, origin: None, payload };
        let head = encode_frame(&d, inline).unwrap();
        let fds: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        socket::send_packet(broker.as_fd(), OutPacket { head: &head, payload: &[], fds: &fds }, true)
            .unwrap();
        let (events, closed) = conn.drain();
        assert_eq!(closed, None);
        assert!(events.len() <= 1, "{events:?}");
        events.into_iter().next().map(|(sub, ev)| {
            assert_eq!(sub, 1);
            match ev {
                Event::Message(_) => true,
                Event::Gap { missed } => {
                    assert_eq!(missed, 1);
                    false
                }
                Event::Reconnected => panic!("no reconnection here"),
            }
        })
    }

    /// A delivery's fds must be exactly its payload: one memfd and no
    /// inline bytes for a memfd payload, none for an inline one. Anything
    /// else is a gap (never a message, never a panic).
    #[test]
    fn a_delivery_carries_exactly_its_memfd() {
        let memfd = PayloadRef::Memfd { len: 8 };
        assert_eq!(delivered(memfd, &[], &[sealed(8)]), Some(true), "an honest memfd delivery");
        assert_eq!(delivered(PayloadRef::Inline, b"hi", &[]), Some(true), "an honest inline delivery");
        assert_eq!(delivered(memfd, &[], &[]), Some(false), "a memfd payload without its fd");
        assert_eq!(delivered(memfd, b"hi", &[sealed(8)]), Some(false), "a memfd payload with inline bytes");
        assert_eq!(
            delivered(memfd, &[], &[sealed(8), sealed(8)]),
            Some(false),
            "a memfd payload with two fds"
        );
        assert_eq!(
            delivered(PayloadRef::Inline, b"hi", &[sealed(8)]),
            Some(false),
            "an inline payload with an fd"
        );
    }

    // -- fds lost to a full fd table --
    //
    // The kernel drops the fds of a packet (MSG_CTRUNC) when the receiver's
    // fd table is full. The client then handles the frame without them and
    // counts the fds the frame should have had. A full table is made for
    // real (RLIMIT_NOFILE, then filling every slot), so it runs in a child
    // process: this test binary again, running only
    // `fds_lost_to_a_full_table_child`.

    const CHILD: &str = "SHMBUS_MUTANT_KILLS_CHILD";

    /// Runs `f` with the process's fd table full, then frees it.
    fn with_full_fd_table<R>(f: impl FnOnce() -> R) -> R {
        let fds = std::fs::read_dir("/proc/self/fd").unwrap().count() as u64;
        let old = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let limit = rustix::process::Rlimit { current: Some(fds + 16), maximum: old.maximum };
        rustix::process::setrlimit(rustix::process::Resource::Nofile, limit).unwrap();
        let mut filler = Vec::new();
        while let Ok(fd) = rustix::io::fcntl_dupfd_cloexec(std::io::stderr().as_fd(), 0) {
            filler.push(fd);
        }
        let r = f();
        drop(filler);
        rustix::process::setrlimit(rustix::process::Resource::Nofile, old).unwrap();
        r
    }

    /// Sends `body` with `n` sealed memfds, which the client loses to its
    /// full fd table; returns why the connection ended, if it did, and how
    /// many fds the client acknowledged (with the broker's fd window 0:
    /// every fd taken is acknowledged at once).
    fn lost<B: Body>(body: &B, n: usize) -> (Option<Disconnect>, u64) {
        let (conn, broker) = fuzzing::connection(16, 1 << 20, 16, 0).unwrap();
        let head = encode_frame(body, &[]).unwrap();
        let owned: Vec<OwnedFd> = (0..n).map(|_| sealed(8)).collect();
        let fds: Vec<BorrowedFd<'_>> = owned.iter().map(|f| f.as_fd()).collect();
        socket::send_packet(broker.as_fd(), OutPacket { head: &head, payload: &[], fds: &fds }, true)
            .unwrap();
        let (_events, closed) = with_full_fd_table(|| conn.drain());
        let mut batch = RecvBatch::new(8);
        let mut acked = 0;
        while let Ok(k) = batch.recv(broker.as_fd(), true) {
            for i in 0..k {
                if let Ok(ClientFrame::FdAck(a)) = decode_client(batch.packet(i).0) {
                    acked += u64::from(a.fds);
                }
            }
        }
        (closed, acked)
    }

    /// In the child: each frame that carries fds, sent with them lost.
    #[test]
    fn fds_lost_to_a_full_table_child() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let memfd = PayloadRef::Memfd { len: 8 };
        // A delivery by memfd: a gap; the connection stays.
        let deliver =
            |payload| Deliver { sub_id: 1, topic: "a.b", sender: SENDER, seq: 1, origin: None, payload };
        assert_eq!(lost(&deliver(memfd), 1), (None, 1), "a memfd delivery");
        // An inline delivery has no fds to lose: fds beside it are a violation.
        violation(lost(&deliver(PayloadRef::Inline), 1).0, "an inline delivery with lost fds");
        // A request by memfd: turned away for the service; the connection stays.
        let serve = |payload| Serve {
            serial: 1,
            name: "svc.a",
            sender: SENDER,
            timeout_ms: 1000,
            no_reply: false,
            origin: None,
            payload,
        };
        assert_eq!(lost(&serve(memfd), 1), (None, 1), "a memfd request");
        violation(lost(&serve(PayloadRef::Inline), 1).0, "an inline request with lost fds");
        // An answer by memfd: a failed call; the connection stays.
        let answer =
            |payload| Answer { call_id: 1, outcome: Outcome::Reply, responder: Some(SENDER), payload };
        assert_eq!(lost(&answer(memfd), 1), (None, 1), "a memfd answer");
        violation(lost(&answer(PayloadRef::Inline), 1).0, "an inline answer with lost fds");
        // A grant: two fds for the publisher, three for a reader, counted
        // as such; the grant fails to open, the connection stays.
        assert_eq!(lost(&grant(0), 2), (None, 2), "a publisher's grant");
        assert_eq!(lost(&grant(1), 3), (None, 3), "a reader's grant");
        // A reader's join: its cursor; a leave has no fd to lose.
        let reader = |joined| ChannelReader { channel_id: 1, reader_id: 1, joined, generation: 1 };
        assert_eq!(lost(&reader(true), 1), (None, 1), "a join");
        violation(lost(&reader(false), 1).0, "a leave with lost fds");
        // A frame that never carries fds.
        violation(lost(&Gap { sub_id: 1, missed: 1 }, 1).0, "a gap with lost fds");
    }

    #[test]
    fn fds_lost_to_a_full_table() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "client_fds::fds_lost_to_a_full_table_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
        // It ran (a filter that matched nothing would pass too).
        assert!(stdout.contains("1 passed"), "child ran no test:\n{stdout}");
    }
}
