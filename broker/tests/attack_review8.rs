//! An eighth review as a hostile local user, of the reactor's per-uid read
//! budget as 5e51d42, 65bec95 and a2b8dc8 left it
//! (`broker/src/daemon/read_turns.rs`, `broker/src/daemon/event_loop.rs`).
//! Each test named for a defect fails on the code it was written against,
//! for the reason its comment gives; each has a control that passes.
//! Fixed: connections turned away for their uid's spent budget keep the
//! order they were turned away in (`ReadTurns::deferred`), where pushed
//! to the front one by one the middle one of three never came up.
//!
//! Every wait is bounded; the broker is killed on drop.

mod common;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use shmbus_proto::frame::{encode_head, BrokerFrame, Overflow, PayloadRef, Publish, Subscribe};

const HOT: u32 = 4811;
const FANOUT: u32 = 4813;

/// A broker; a subscriber (uid `FANOUT`, which never reads: its 4096
/// subscriptions to `t` overflow by gaps) makes each publish to `t` cost
/// 4096 units of work, so some 8 publishes spend a uid's `WORK_BUDGET`.
/// Then `n` connections of uid `HOT` each publish to `t` without pause
/// (blocking writers, so their sockets stay full). Returns how many
/// packets each connection got into its socket over 3 s, once the flood
/// is under way: a connection the broker never reads gets none (its
/// socket stays full).
fn progress_of_hot_siblings(tag: &str, n: usize) -> Vec<u64> {
    let _alone = measuring_alone();
    let b = Broker::launch(
        tag,
        Launch::new().args(&["--allow-uid", &HOT.to_string(), "--allow-uid", &FANOUT.to_string()]),
    );
    let mut sink = raw_as(&b, FANOUT, "fan-out");
    let mut sent = 0u32;
    let mut acked = 0u32;
    while acked < 4096 {
        while sent < 4096 && sent - acked < 512 {
            sink.send_body(&Subscribe { sub_id: sent + 1, pattern: "t", overflow: Overflow::Gap }, &[]);
            sent += 1;
        }
        match sink.recv() {
            Some(BrokerFrame::Subscribed(_)) => acked += 1,
            other => panic!("subscription {acked}: {other:?}"),
        }
    }
    let hot: Vec<Raw> = (0..n).map(|i| raw_as(&b, HOT, &format!("hot-{i}"))).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut threads = Vec::new();
    for (r, count) in hot.into_iter().zip(counts.iter().cloned()) {
        let flooding = stop.clone();
        threads.push(std::thread::spawn(move || {
            let head =
                encode_head(&Publish { topic: "t", origin: None, payload: PayloadRef::Inline }).unwrap();
            while !flooding.load(Ordering::Relaxed) {
                let packet = shmbus_proto::sys::socket::OutPacket { head: &head, payload: b"x", fds: &[] };
                // Non-blocking, so the thread sees `stop`; a full socket
                // is tried again shortly.
                match shmbus_proto::sys::socket::send_packet(r.fd.as_fd(), packet, true) {
                    Ok(_) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Err(e) => panic!("publishing: {e}"),
                }
            }
            r
        }));
    }
    // The flood under way: every socket full, the broker reading them.
    std::thread::sleep(Duration::from_secs(1));
    let before: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        drop(t.join().expect("a flooding thread"));
    }
    let progress: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    eprintln!("{n} hot connections of one uid: packets taken over 3 s: {progress:?} (before: {before:?})");
    drop(sink);
    drop(b);
    progress
}

/// Control: two busy connections of one uid share its budget, turn about.
#[test]
fn control_two_busy_connections_of_a_uid_both_progress() {
    if !needs_root("control_two_busy_connections_of_a_uid_both_progress") {
        return;
    }
    let progress = progress_of_hot_siblings("review8-two-hot", 2);
    assert!(progress.iter().all(|&p| p > 0), "a busy connection of the uid was never read: {progress:?}");
}

/// DEFECT: of three busy connections of one uid, one is never read again
/// for as long as the other two stay busy. `Reactor::read_conn`
/// (broker/src/daemon/event_loop.rs) reads the read-again list first; the
/// first connection in it spends the uid's budget and is queued at the
/// back (`ReadTurns::spent` -> `later`, `push_back`), and each one after it
/// is turned away and queued at the FRONT (`ReadTurns::deferred`,
/// `push_front`). Pushing each to the front reverses their order: a list
/// [A, B, C] becomes [C, B, A], then [A, B, C] again: A and C take turns
/// and B, in the middle, is turned away every turn, forever (with k busy
/// connections, all but the two ends starve). Promise broken: 65bec95's
/// "a uid's quiet connection could wait for ever behind its busy one ...
/// such a connection is queued at its front" and read_turns.rs's "a
/// uid's connections share one budget a turn". Reproduction: here, a
/// fan-out subscriber makes each publish cost 4096; three connections of
/// one uid publish without pause; one of them gets no packet read in 3 s.
/// Fix: keep the deferred connections in the order they were turned away
/// (e.g. a second queue, appended in order and read before the list; or
/// splice the turn's deferred ones, in order, before the rest), so every
/// connection of a uid is read within as many turns as it has busy
/// connections.
#[test]
fn the_middle_of_three_busy_connections_of_a_uid_starves() {
    if !needs_root("the_middle_of_three_busy_connections_of_a_uid_starves") {
        return;
    }
    let progress = progress_of_hot_siblings("review8-three-hot", 3);
    assert!(
        progress.iter().all(|&p| p > 0),
        "of uid {HOT}'s three busy connections, one had no packet read in 3 s ({progress:?}): turned away \
         for the uid's spent budget and pushed to the list's front each turn, it stays between the other two"
    );
}
