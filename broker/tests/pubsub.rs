//! Publish/subscribe through a real broker: across processes, wildcards,
//! ordering, sender stamping, slow subscribers and their gap notices.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use shmbus::{ErrorKind, Event, GoodbyeCode, Overflow, RecvError};

#[test]
fn pubsub_across_processes_both_ways() {
    let b = Broker::start("xproc");
    // Another process subscribes (shmbusctl), this one publishes.
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &b.address, "sub", "greet.>", "--count", "2"]);
    let sub = spawn_guarded(cmd);
    let c = b.client();
    // Wait until the subscription is registered, then publish.
    let start = std::time::Instant::now();
    while c.topics().unwrap().iter().all(|t| t.pattern != "greet.>") {
        assert!(start.elapsed() < PATIENCE, "shmbusctl never subscribed");
        std::thread::sleep(Duration::from_millis(10));
    }
    c.publish("greet.world", b"hello").unwrap();
    c.publish("greet.you.too", b"hi there").unwrap();
    let out = sub.wait_output();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "greet.world hello\ngreet.you.too hi there\n");

    // And the other way: another process publishes, this one subscribes.
    let s = c.subscribe("news.*").unwrap();
    let out = b.ctl(&["pub", "news.today", "extra"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = next_message(&s);
    assert_eq!((m.topic(), m.payload()), ("news.today", &b"extra"[..]));
}

#[test]
fn wildcards_route_exactly() {
    let b = Broker::start("wild");
    let c = b.client();
    let exact = c.subscribe("a.b.c").unwrap();
    let star = c.subscribe("a.*.c").unwrap();
    let tail = c.subscribe("a.>").unwrap();
    let all = c.subscribe(">").unwrap();
    let p = b.client();
    for t in ["a.b.c", "a.x.c", "a.b", "a.b.c.d", "z", "a"] {
        p.publish(t, t.as_bytes()).unwrap();
    }
    p.flush().unwrap();
    let drain = |s: &shmbus::Subscription| {
        let mut v = Vec::new();
        while let Some(ev) = s.recv_timeout(Duration::from_millis(200)).unwrap() {
            v.push(ev.message().unwrap().topic().to_owned());
        }
        v
    };
    assert_eq!(drain(&exact), ["a.b.c"]);
    assert_eq!(drain(&star), ["a.b.c", "a.x.c"]);
    assert_eq!(drain(&tail), ["a.b.c", "a.x.c", "a.b", "a.b.c.d"]);
    assert_eq!(drain(&all), ["a.b.c", "a.x.c", "a.b", "a.b.c.d", "z", "a"]);
}

/// The client refuses invalid subjects before sending them; a peer that
/// sends them anyway is refused by the broker (every kind is covered in
/// `refusals.rs`).
#[test]
fn invalid_subjects_are_refused_locally_and_by_the_broker() {
    use shmbus_proto::frame::{encode_frame, BrokerFrame, ErrorCode, Op, PayloadRef, Publish, Subscribe};
    let b = Broker::start("invalid");
    let c = b.client();
    assert_eq!(c.publish("a.*", b"x").unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(c.subscribe("a.>.b").unwrap_err().kind(), ErrorKind::InvalidInput);
    assert_eq!(c.publish("a..b", b"x").unwrap_err().kind(), ErrorKind::InvalidInput);

    let mut r = Raw::hello(&b);
    r.send(
        &encode_frame(&Publish { topic: "a.*", origin: None, payload: PayloadRef::Inline }, b"x").unwrap(),
        &[],
    );
    r.send_body(&Subscribe { sub_id: 7, pattern: "a.>.b", overflow: Overflow::Gap }, &[]);
    for op in [Op::Publish { seq: 1 }, Op::Subscribe { sub_id: 7 }] {
        match r.recv() {
            Some(BrokerFrame::OpError(e)) => {
                assert_eq!((e.op, e.code), (op, ErrorCode::InvalidSubject), "{}", e.message)
            }
            other => panic!("expected the broker to refuse {op:?}, got {other:?}"),
        }
    }
}

#[test]
fn per_publisher_order_and_broker_stamped_sender() {
    // Room for every message: this test is about order, not flow control.
    let b = Broker::start_with("order", &["--queue-frames", "100000", "--queue-bytes", "100000000"]);
    let c = b.client();
    let s = c.subscribe("seq.>").unwrap();
    const N: u64 = 5000;
    // Two publishers in other processes and one here, interleaved.
    let mut kids = Vec::new();
    for i in 0..2 {
        let mut cmd = Command::new(SHMBUSCTL);
        cmd.args(["--address", &b.address, "pub", &format!("seq.p{i}"), "x", "--count", &N.to_string()]);
        kids.push(spawn_guarded(cmd));
    }
    let p = b.client();
    let p2 = p.clone();
    let local_pub = std::thread::spawn(move || {
        for i in 1..=N {
            p2.publish("seq.local", i.to_le_bytes()).unwrap();
        }
    });
    let mut pids: std::collections::HashMap<u32, u64> =
        kids.iter().map(|k| (k.0.as_ref().unwrap().id(), 0)).collect();
    let mut local = 0u64;
    let mut last_seq = std::collections::HashMap::new();
    // Every publisher runs as this test process does (root in CI, anyone
    // elsewhere), and the broker stamps what the kernel says.
    let me = (rustix::process::geteuid().as_raw(), rustix::process::getegid().as_raw());
    for _ in 0..3 * N {
        let m = next_message(&s);
        let sender = m.sender();
        assert_eq!((sender.uid, sender.gid), me, "stamped credentials of {sender:?}");
        let prev = last_seq.insert(sender.client_id, m.seq()).unwrap_or(0);
        assert_eq!(m.seq(), prev + 1, "per-publisher order broken for {sender:?}");
        if m.topic() == "seq.local" {
            local += 1;
            assert_eq!(sender.client_id, p.id());
            assert_eq!(sender.pid, std::process::id());
            assert_eq!(m.payload(), &local.to_le_bytes());
        } else {
            *pids.get_mut(&sender.pid).expect("sender pid is one of the shmbusctl children") += 1;
        }
    }
    assert_eq!(local, N);
    assert!(pids.values().all(|&n| n == N), "{pids:?}");
    local_pub.join().unwrap();
    for k in kids {
        let out = k.wait_output();
        assert!(out.status.success(), "{}", stderr(&out));
    }
}

/// Frames queued for a client together share packets (`Batch`), and the
/// client sees each of them whole, once, in order, as if it had come
/// alone.
#[test]
fn queued_frames_share_packets_and_arrive_whole_and_in_order() {
    use shmbus_proto::frame::{BrokerFrame, Overflow as WireOverflow, Subscribe};
    let b = Broker::start_with("batch", &["--queue-frames", "100000", "--queue-bytes", "100000000"]);
    let mut raw = Raw::hello(&b);
    raw.send_body(&Subscribe { sub_id: 1, pattern: "b.>", overflow: WireOverflow::Disconnect }, &[]);
    match raw.recv() {
        Some(BrokerFrame::Subscribed(s)) => assert_eq!(s.sub_id, 1),
        other => panic!("expected Subscribed, got {other:?}"),
    }
    // A real client subscribes too, to see the same stream through the
    // library's receive path.
    let c = b.client();
    let s = c.subscribe("b.>").unwrap();
    let p = b.client();
    const N: u64 = 5000;
    for i in 1..=N {
        p.publish("b.x", i.to_le_bytes()).unwrap();
    }
    // Everything was routed once the ping comes back: the subscriber's
    // socket is full and the rest waits in the broker's queue.
    p.ping().unwrap();
    let before = raw.packets;
    for i in 1..=N {
        match raw.recv() {
            Some(BrokerFrame::Deliver(d, payload)) => {
                assert_eq!((d.sub_id, d.seq), (1, i), "order");
                assert_eq!(payload, &i.to_le_bytes()[..]);
            }
            other => panic!("message {i}: expected a delivery, got {other:?}"),
        }
    }
    let packets = raw.packets - before;
    eprintln!("{N} deliveries came in {packets} packets");
    assert!(packets <= N / 4, "{N} deliveries came in {packets} packets: queued frames were not batched");
    raw.send_body(&shmbus_proto::frame::Ping { token: 9 }, &[]);
    match raw.recv() {
        Some(BrokerFrame::Pong(p)) => assert_eq!(p.token, 9),
        other => panic!("expected the pong after the deliveries, got {other:?}"),
    }
    for i in 1..=N {
        let m = next_message(&s);
        assert_eq!((m.seq(), m.payload()), (i, &i.to_le_bytes()[..]));
    }
}

#[test]
fn typed_values_roundtrip() {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Reading {
        room: String,
        celsius: f32,
    }
    let b = Broker::start("typed");
    let c = b.client();
    let s = c.subscribe("temp").unwrap();
    let r = Reading { room: "kitchen".into(), celsius: 21.5 };
    c.publish_value("temp", &r).unwrap();
    assert_eq!(next_message(&s).decode::<Reading>().unwrap(), r);
}

/// A subscriber that never reads: the publisher is not blocked, and the
/// subscriber later learns exactly how many it missed, where it missed them.
#[test]
fn slow_subscriber_gets_exact_gap_notice_and_publisher_is_not_blocked() {
    let b = Broker::start_with("gap", &["--queue-frames", "64"]);
    let slow = b.client_named("slow");
    let sub = slow.subscribe("flood").unwrap();
    const N: u64 = 20_000;
    let p = b.client_named("fast");
    let p2 = p.clone();
    bounded("publishing past a stalled subscriber", move || {
        for i in 1..=N {
            p2.publish("flood", i.to_le_bytes()).unwrap();
        }
        p2.flush().unwrap();
    });
    let stats = p.stats().unwrap();
    assert!(stats.dropped > 0, "the test must overflow the queue: {stats:?}");

    let mut expect_next = 1u64;
    let mut received = 0u64;
    let mut missed_total = 0u64;
    let mut pending_gap = 0u64;
    while received + missed_total < N {
        let ev = sub.recv_timeout(PATIENCE).unwrap();
        let Some(ev) = ev else {
            panic!("stream ended early: expect_next {expect_next} received {received} missed {missed_total} pending {pending_gap}; stats {:?}; clients {:?}", p.stats().unwrap(), p.clients().unwrap());
        };
        match ev {
            Event::Reconnected => panic!("unexpected reconnection"),
            Event::Gap { missed } => {
                pending_gap += missed;
                missed_total += missed;
            }
            Event::Message(m) => {
                let v = u64::from_le_bytes(m.payload().try_into().unwrap());
                assert_eq!(v, m.seq());
                assert_eq!(
                    v,
                    expect_next + pending_gap,
                    "a gap notice must stand exactly where the loss was"
                );
                pending_gap = 0;
                expect_next = v + 1;
                received += 1;
            }
        }
    }
    assert_eq!(received + missed_total, N);
    // A loss at the very end is reported by a trailing gap.
    assert_eq!(expect_next - 1 + pending_gap, N);
    let stats = p.stats().unwrap();
    assert_eq!(stats.dropped, missed_total, "every drop was reported");
    // The slow client's counters show it too.
    let info = p.clients().unwrap().into_iter().find(|c| c.name == "slow").unwrap();
    assert_eq!(info.dropped, missed_total);
}

#[test]
fn gap_owed_at_the_end_of_a_burst_is_still_delivered() {
    // The loss happens at the very end: no later message carries the gap
    // out, so the broker must send it on its own once there is room.
    let b = Broker::start_with("gaptail", &["--queue-frames", "16"]);
    let slow = b.client();
    let sub = slow.subscribe("t").unwrap();
    let p = b.client();
    for i in 0..5000u32 {
        p.publish("t", i.to_le_bytes()).unwrap();
    }
    p.flush().unwrap();
    let mut got = 0u64;
    let mut missed = 0u64;
    while got + missed < 5000 {
        match sub.recv_timeout(PATIENCE).unwrap().expect("the owed gap never came") {
            Event::Message(_) => got += 1,
            Event::Reconnected => panic!("unexpected reconnection"),
            Event::Gap { missed: m } => missed += m,
        }
    }
    assert!(missed > 0);
    assert_eq!(got + missed, 5000);
}

#[test]
fn disconnect_policy_flushes_then_disconnects_with_reason() {
    let b = Broker::start_with("slowdc", &["--queue-frames", "32"]);
    // A client that does not come back: this is about the disconnect.
    let slow = b.options().reconnect(shmbus::ReconnectPolicy::never()).connect().unwrap();
    let sub = slow.subscribe_with("flood", Overflow::Disconnect).unwrap();
    let p = b.client();
    let p2 = p.clone();
    bounded("publishing", move || {
        for i in 0..5000u32 {
            p2.publish("flood", i.to_le_bytes()).unwrap();
        }
        p2.flush().unwrap();
    });
    let mut got = 0u32;
    let err = loop {
        match sub.recv_timeout(PATIENCE) {
            Ok(Some(Event::Message(m))) => {
                assert_eq!(
                    m.payload(),
                    &got.to_le_bytes(),
                    "what was queued arrives in order, without holes"
                );
                got += 1;
            }
            Ok(Some(Event::Reconnected)) => panic!("unexpected reconnection"),
            Ok(Some(Event::Gap { .. })) => panic!("a Disconnect subscription never gets gaps"),
            Ok(None) => panic!("no disconnect within PATIENCE"),
            Err(e) => break e,
        }
    };
    assert!(got > 0 && got < 5000, "got {got}");
    match err {
        RecvError::Disconnected(d) => {
            assert_eq!(d.code, Some(GoodbyeCode::SlowConsumer), "{d}");
            assert!(d.reason.contains("slow consumer"), "{d}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.stats().unwrap().slow_disconnects, 1);
}

#[test]
fn unsubscribe_stops_delivery() {
    let b = Broker::start("unsub");
    let c = b.client();
    let s1 = c.subscribe("u").unwrap();
    let s2 = c.subscribe("u").unwrap();
    drop(s1);
    c.publish("u", b"1").unwrap();
    assert_eq!(next_message(&s2).payload(), b"1");
    let topics = c.topics().unwrap();
    assert_eq!(topics.len(), 1);
    assert_eq!((topics[0].pattern.as_str(), topics[0].subscribers), ("u", 1));
}

#[test]
fn sigterm_flushes_and_exits_zero() {
    let mut b = Broker::start("term");
    // A client that does not come back: this is about the goodbye.
    let c = b.options().reconnect(shmbus::ReconnectPolicy::never()).connect().unwrap();
    let s = c.subscribe("bye").unwrap();
    let p = b.client();
    for i in 0..100u32 {
        p.publish("bye", i.to_le_bytes()).unwrap();
    }
    p.flush().unwrap();
    let status = b.terminate();
    assert!(status.success(), "{status:?}");
    // Everything queued before the signal still arrives, then the goodbye.
    for i in 0..100u32 {
        assert_eq!(next_message(&s).payload(), &i.to_le_bytes());
    }
    match s.recv_timeout(PATIENCE) {
        Err(RecvError::Disconnected(d)) => assert_eq!(d.code, Some(GoodbyeCode::Shutdown), "{d}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn recv_any_keeps_broker_order_across_subscriptions() {
    let b = Broker::start("any");
    let c = b.client();
    let s1 = c.subscribe("one").unwrap();
    let s2 = c.subscribe("two").unwrap();
    let p = b.client();
    for i in 0..200u32 {
        p.publish(if i % 3 == 0 { "one" } else { "two" }, i.to_le_bytes()).unwrap();
    }
    p.flush().unwrap();
    for i in 0..200u32 {
        let (which, ev) = shmbus::Subscription::recv_any(&[&s1, &s2], Some(PATIENCE)).unwrap().unwrap();
        assert_eq!(which, usize::from(i % 3 != 0));
        assert_eq!(ev.message().unwrap().payload(), &i.to_le_bytes());
    }
}

#[test]
fn client_fd_joins_an_external_event_loop() {
    use std::os::fd::AsFd;
    let b = Broker::start("evloop");
    let c = b.client();
    let s = c.subscribe("ev").unwrap();
    assert!(s.try_recv().unwrap().is_none());
    let p = b.client();
    p.publish("ev", b"ring").unwrap();
    // Wait the way an outside poll loop would, on the client's fd.
    let fd = c.as_fd();
    let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
    let ts = rustix::event::Timespec { tv_sec: PATIENCE.as_secs() as i64, tv_nsec: 0 };
    assert_eq!(rustix::event::poll(&mut fds, Some(&ts)).unwrap(), 1);
    let m = s.try_recv().unwrap().expect("readable means a frame is there").message().unwrap();
    assert_eq!(m.payload(), b"ring");
}

#[test]
fn publish_many_sends_in_order_and_stops_at_a_bad_subject() {
    let b = Broker::start("many");
    let c = b.client();
    let s = c.subscribe("m.>").unwrap();
    let payloads: Vec<[u8; 4]> = (0..300u32).map(|i| i.to_le_bytes()).collect();
    let topics: Vec<String> = (0..300).map(|i| format!("m.{}", i % 7)).collect();
    c.publish_many(topics.iter().map(String::as_str).zip(payloads.iter().map(|p| &p[..]))).unwrap();
    for i in 0..300u32 {
        let m = next_message(&s);
        assert_eq!((m.payload(), m.seq()), (&i.to_le_bytes()[..], u64::from(i) + 1));
        assert_eq!(m.topic(), format!("m.{}", i % 7));
    }
    let err = c.publish_many([("m.ok", &b"1"[..]), ("m.*", &b"2"[..]), ("m.never", &b"3"[..])]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    c.publish("m.after", b"4").unwrap();
    // The one before the bad subject went out; nothing after it did.
    assert_eq!(next_message(&s).payload(), b"1");
    let m = next_message(&s);
    assert_eq!((m.payload(), m.seq()), (&b"4"[..], 302));
}

/// A connection whose packets cost the broker much (each publish here
/// fans out to 1,500 subscriptions) is cut off in the middle of a batch
/// when its share of a loop turn is spent; the rest of the batch waits for
/// its next turn. Nothing is lost or reordered on the way.
#[test]
fn packets_left_over_by_the_work_budget_are_handled_later_in_order() {
    use shmbus_proto::frame::{encode_frame, BrokerFrame, PayloadRef, Ping, Publish};
    let b = Broker::start_with("budget", &["--queue-frames", "100000", "--queue-bytes", "100000000"]);
    let fan = b.client();
    let subs: Vec<_> = (0..1500).map(|_| fan.subscribe("w.x").unwrap()).collect();
    let mut raw = Raw::hello(&b);
    // 22 of these spend a turn's budget (32,768 deliveries); all fit the
    // subscriber's queue (90,000 frames).
    const N: u64 = 60;
    for i in 0..N {
        let p = encode_frame(
            &Publish { topic: "w.x", origin: None, payload: PayloadRef::Inline },
            &i.to_le_bytes(),
        )
        .unwrap();
        raw.send(&p, &[]);
    }
    raw.send_body(&Ping { token: 7 }, &[]);
    match raw.recv() {
        Some(BrokerFrame::Pong(p)) => assert_eq!(p.token, 7),
        other => panic!("expected the pong after the publishes, got {other:?}"),
    }
    let stats = fan.stats().unwrap();
    assert_eq!(stats.msgs_in, N, "every publish before the ping was handled");
    // One subscription's view: all of them, in order.
    for i in 0..N {
        assert_eq!(next_message(&subs[0]).payload(), &i.to_le_bytes());
    }
}
