//! When the broker spins for a linked client's answer. A test of timing
//! on a shared machine, so it has a test binary of its own: the other
//! link tests' brokers, run beside it on two CPUs, preempted its
//! answerer past its window in half of its rounds.

mod common;

use std::time::Duration;

use common::*;
use shmbus_proto::frame::{BrokerFrame, Overflow, PayloadRef, Publish};

/// A client that answers each frame another client sends it within a
/// few tens of µs, but whose records come far apart (300 µs between
/// rounds: a sparse stream, its ring asleep when each request comes),
/// still finds the broker awake when it answers: its ring is woken and
/// kept hot for the answer, so the answer needs no doorbell and the
/// broker no wake-up. (Its ring used to stay asleep, and got the least
/// window, 10 µs, after each record: every answer rang a sleeping
/// broker, and a busy request/answer exchange fell into sleeping at
/// every hop, 210-240 µs a round trip instead of 5.)
#[test]
fn a_client_that_answers_quickly_finds_the_broker_awake_for_its_answer() {
    // Rounds in which the answerer ran on time: saw the request within
    // PROMPT_SEEN of its sending and answered within PROMPT_ANSWER of
    // seeing it. Only those count (on a loaded machine the answerer is
    // preempted past any window), and there must be enough of them.
    const PROMPT_ROUNDS: u32 = 100;
    const PROMPT_SEEN: Duration = Duration::from_micros(200);
    const PROMPT_ANSWER: Duration = Duration::from_micros(40);
    let b = Broker::start("link-answer");
    let mut answerer = RawLink::attach(&b, "answerer");
    answerer.subscribe(1, "requests", Overflow::Gap);
    let mut requester = RawLink::attach(&b, "requester");
    let publish = |topic| Publish { topic, origin: None, payload: PayloadRef::Inline };
    const SETTLED: u32 = 8;
    let (mut prompt, mut rang, mut rounds, mut run) = (0u32, 0u32, 0u64, 0u32);
    let give_up = std::time::Instant::now() + PATIENCE;
    while prompt < PROMPT_ROUNDS && std::time::Instant::now() < give_up {
        rounds += 1;
        std::thread::sleep(Duration::from_micros(300));
        let sent = std::time::Instant::now();
        requester.send_body(&publish("requests"), &rounds.to_le_bytes());
        // Spin for the request: a sleep here would put our own wake-up
        // into the answer time.
        let p = loop {
            if let Some(p) = answerer.recv_packet(Duration::ZERO) {
                break p;
            }
            assert!(sent.elapsed() < PATIENCE, "round {rounds}: no request");
        };
        assert!(matches!(p.frame(), Some(BrokerFrame::Deliver(..))), "round {rounds}: {:?}", p.frame());
        let seen = std::time::Instant::now();
        while seen.elapsed() < Duration::from_micros(20) {
            std::hint::spin_loop();
        }
        // The answer: a publish nobody receives, so no frame comes back.
        let head = shmbus_proto::frame::encode_head(&publish("answers")).unwrap();
        let frame = shmbus_proto::link::RecordKind::Frame;
        assert!(answerer
            .producer
            .try_push(answerer.map.peer(), answerer.map.my_data(), frame, &[&head, b"a"])
            .unwrap());
        answerer.producer.publish(answerer.map.mine());
        let on_time = seen - sent < PROMPT_SEEN && seen.elapsed() < PROMPT_ANSWER;
        let ring = answerer.producer.must_ring(answerer.map.peer());
        if ring {
            answerer.raw.send_body(&shmbus_proto::frame::Doorbell, &[]);
        }
        // The broker learns how fast the client answers from the last
        // few answers: one preempted past its window makes it wait less
        // for a while. Counted: those after a run of prompt ones.
        if on_time && run >= SETTLED {
            prompt += 1;
            rang += u32::from(ring);
        }
        run = if on_time { run + 1 } else { 0 };
    }
    eprintln!("{rang} of {prompt} prompt answers ({rounds} rounds) found the broker's ring asleep");
    assert_eq!(prompt, PROMPT_ROUNDS, "too few rounds ran on time to tell ({rounds} rounds)");
    assert!(rang <= prompt / 2, "{rang} of {prompt} prompt answers had to ring a sleeping broker");
    answerer.ping(u64::MAX);
    requester.ping(u64::MAX);
}
