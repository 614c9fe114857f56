//! Loom model of the link protocol: every interleaving of one producer and
//! one consumer on a tiny ring, running the shipped functions of
//! [`super::protocol`]: record writes and copy-out reads, positions, and
//! both doorbell handshakes (a consumer going to sleep on an empty ring, a
//! producer going to sleep on a full one).
//!
//! What stays outside: the doorbell itself (a socket packet or a futex
//! wake). Here it is a counter the sleeper waits to see move, with no
//! timeout, which is stricter than the real ones: a lost wake-up spins for
//! ever here, which loom reports.
//!
//! Checks: every record arrives once, whole and in order, and no wake-up
//! is lost, in either direction.

use loom::sync::atomic::{AtomicU32, AtomicU64};
use loom::sync::Arc;
use loom::thread;

use super::layout::HalfHeader;
use super::protocol::*;
use crate::sync::Ordering;

const CAP: u32 = 32;

struct Link {
    producer_half: HalfHeader,
    consumer_half: HalfHeader,
    data: Vec<AtomicU64>,
    /// Rung by the producer for the consumer, and by the consumer for the
    /// producer.
    consumer_bell: AtomicU32,
    producer_bell: AtomicU32,
}

fn link() -> Arc<Link> {
    Arc::new(Link {
        producer_half: HalfHeader::default(),
        consumer_half: HalfHeader::default(),
        data: (0..CAP / 8).map(|_| AtomicU64::new(0)).collect(),
        consumer_bell: AtomicU32::new(0),
        producer_bell: AtomicU32::new(0),
    })
}

fn wait_for_bell(bell: &AtomicU32, seen: u32) {
    while bell.load(Ordering::Acquire) == seen {
        thread::yield_now();
    }
}

#[test]
fn a_consumer_going_to_sleep_is_always_rung() {
    loom::model(|| {
        let l = link();
        let p = {
            let l = l.clone();
            thread::spawn(move || {
                let mut p = Producer::new(CAP);
                assert!(p.try_push(&l.consumer_half, &l.data, RecordKind::Frame, &[&[7u8; 3]]).unwrap());
                p.publish(&l.producer_half);
                if p.must_ring(&l.consumer_half) {
                    l.consumer_bell.fetch_add(1, Ordering::Release);
                }
            })
        };
        let mut c = Consumer::new(CAP);
        let mut out = Vec::new();
        loop {
            if let Some(k) = c.next(&l.producer_half, &l.data, &mut out).unwrap() {
                assert_eq!(k, RecordKind::Frame);
                assert_eq!(out, [7u8; 3]);
                break;
            }
            let seen = l.consumer_bell.load(Ordering::Acquire);
            if c.prepare_sleep(&l.consumer_half, &l.producer_half).unwrap() {
                wait_for_bell(&l.consumer_bell, seen);
                c.wake(&l.consumer_half);
            }
        }
        p.join().unwrap();
    });
}

#[test]
fn a_producer_waiting_for_room_is_always_rung() {
    loom::model(|| {
        let l = link();
        let c = {
            let l = l.clone();
            thread::spawn(move || {
                let mut c = Consumer::new(CAP);
                let mut out = Vec::new();
                let mut got = 0u8;
                while got < 3 {
                    out.clear();
                    match c.next(&l.producer_half, &l.data, &mut out).unwrap() {
                        Some(_) => {
                            assert_eq!(out, [got; 8]);
                            got += 1;
                            c.commit(&l.consumer_half);
                            if c.must_ring_room(&l.producer_half) {
                                l.producer_bell.fetch_add(1, Ordering::Release);
                            }
                        }
                        None => thread::yield_now(),
                    }
                }
            })
        };
        let mut p = Producer::new(CAP);
        for i in 0..3u8 {
            loop {
                if p.try_push(&l.consumer_half, &l.data, RecordKind::Frame, &[&[i; 8]]).unwrap() {
                    p.publish(&l.producer_half);
                    break;
                }
                let seen = l.producer_bell.load(Ordering::Acquire);
                if p.prepare_wait(&l.producer_half, &l.consumer_half, 8).unwrap() {
                    wait_for_bell(&l.producer_bell, seen);
                    p.end_wait(&l.producer_half);
                }
            }
        }
        c.join().unwrap();
    });
}
