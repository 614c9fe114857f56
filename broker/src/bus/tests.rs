//! The bus core driven without sockets: frames in, effects and queued
//! frames out. Each test names the promise it checks.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmbus_proto::frame::{
    decode_broker, encode_frame, encode_head, BrokerFrame, ChannelClose, ChannelOpen, ChannelOverflow,
    ChannelRole, ErrorCode, FdAck, GoodbyeCode, Hello, Overflow, PayloadRef, Publish, Query, QueryKind,
    Subscribe, Unsubscribe, PROTOCOL_VERSION,
};
use shmbus_proto::sys::socket::PeerCred;

use super::quota::Resource;
use super::{Bus, BusConfig, Effect, PeerId};

fn config() -> BusConfig {
    let mut c = BusConfig::new("@test".into(), 0);
    c.policy.allow_all();
    c
}

struct World {
    bus: Bus,
    now: Instant,
}

impl World {
    fn new(cfg: BusConfig) -> World {
        let now = Instant::now();
        World { bus: Bus::new(cfg, now), now }
    }

    fn join(&mut self, uid: u32) -> PeerId {
        let cred = PeerCred { pid: 100 + uid, uid, gid: uid };
        let id = self.bus.connect(cred, Vec::new(), "test".into(), self.now).unwrap();
        let hello = encode_head(&Hello { version: PROTOCOL_VERSION.into(), name: "t" }).unwrap();
        self.bus.receive(id, &hello, Vec::new(), self.now);
        assert!(matches!(self.take(id).as_slice(), [BrokerFrame::Welcome(_)]));
        id
    }

    fn send<B: shmbus_proto::frame::Body>(&mut self, id: PeerId, body: &B) {
        let bytes = encode_head(body).unwrap();
        self.bus.receive(id, &bytes, Vec::new(), self.now);
    }

    fn publish(&mut self, id: PeerId, topic: &str, payload: &[u8]) {
        let bytes =
            encode_frame(&Publish { topic, origin: None, payload: PayloadRef::Inline }, payload).unwrap();
        self.bus.receive(id, &bytes, Vec::new(), self.now);
    }

    fn publish_fd(&mut self, id: PeerId, topic: &str, fd: OwnedFd, len: u64) {
        let bytes =
            encode_head(&Publish { topic, origin: None, payload: PayloadRef::Memfd { len } }).unwrap();
        self.bus.receive(id, &bytes, vec![fd], self.now);
    }

    fn subscribe(&mut self, id: PeerId, sub_id: u32, pattern: &str) {
        self.send(id, &Subscribe { sub_id, pattern, overflow: Overflow::Gap });
    }

    /// Sends everything sendable for `id` (as the daemon would), returning
    /// the decoded frames' kinds as owned debug strings and their fd counts.
    fn flush(&mut self, id: PeerId) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        loop {
            let frames = self.bus.sendable(id, 64);
            if frames.is_empty() {
                break;
            }
            let n = frames.len();
            for f in &frames {
                let mut bytes = f.head.clone();
                bytes.extend_from_slice(f.payload.as_deref().unwrap_or(&[]));
                out.push((format!("{:?}", decode_broker(&bytes).unwrap()), f.fd_count()));
            }
            self.bus.sent(id, n, self.now);
        }
        out
    }

    /// Acknowledges `fds`, and reports them read from the socket, as the
    /// daemon does once the peer's socket holds nothing unread.
    fn ack(&mut self, id: PeerId, fds: u32) {
        self.send(id, &FdAck { fds });
        self.bus.fds_delivered(id);
    }

    /// Flushes and decodes into owned frames of the simple kinds.
    fn take(&mut self, id: PeerId) -> Vec<BrokerFrame<'static>> {
        let mut out = Vec::new();
        loop {
            let frames = self.bus.sendable(id, 64);
            if frames.is_empty() {
                break;
            }
            let n = frames.len();
            for f in &frames {
                let mut bytes = f.head.clone();
                bytes.extend_from_slice(f.payload.as_deref().unwrap_or(&[]));
                let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                out.push(decode_broker(leaked).unwrap());
            }
            self.bus.sent(id, n, self.now);
        }
        out
    }
}

fn memfd(len: usize) -> OwnedFd {
    shmbus_proto::sys::memfd::from_bytes("t", &vec![7u8; len]).unwrap()
}

#[test]
fn a_publish_reaches_each_matching_subscription_in_order() {
    let mut w = World::new(config());
    let (a, b) = (w.join(1000), w.join(1001));
    w.subscribe(b, 1, "x.*");
    w.subscribe(b, 2, "x.>");
    w.subscribe(b, 3, "y");
    assert_eq!(w.take(b).len(), 3);
    w.publish(a, "x.k", b"one");
    w.publish(a, "x.k", b"two");
    let got: Vec<(u32, u64, Vec<u8>)> = w
        .take(b)
        .into_iter()
        .map(|f| match f {
            BrokerFrame::Deliver(d, p) => (d.sub_id, d.seq, p.to_vec()),
            other => panic!("{other:?}"),
        })
        .collect();
    let mut want = vec![(1, 1, b"one".to_vec()), (2, 1, b"one".to_vec())];
    want.extend([(1, 2, b"two".to_vec()), (2, 2, b"two".to_vec())]);
    let mut sorted = got.clone();
    sorted.sort();
    want.sort();
    assert_eq!(sorted, want);
    // Per subscription, in publish order.
    assert!(got.iter().filter(|g| g.0 == 1).map(|g| g.1).eq([1, 2]));
}

/// A delivery to its one receiver is one buffer, head and payload (one
/// allocation); to several, each head shares one copy of the payload.
#[test]
fn a_lone_receivers_frame_is_one_buffer_and_several_share_the_payload() {
    let mut w = World::new(config());
    let (a, b, c) = (w.join(1000), w.join(1001), w.join(1002));
    w.subscribe(b, 1, "x");
    w.subscribe(c, 1, "y");
    w.subscribe(c, 2, "y");
    w.take(b);
    w.take(c);
    w.publish(a, "x", b"alone");
    w.publish(a, "y", b"shared");
    let frames = w.bus.sendable(b, 64);
    assert_eq!(frames.len(), 1);
    assert!(frames[0].payload.is_none());
    match decode_broker(&frames[0].head).unwrap() {
        BrokerFrame::Deliver(d, p) => assert_eq!((d.topic, p), ("x", &b"alone"[..])),
        other => panic!("{other:?}"),
    }
    let frames = w.bus.sendable(c, 64);
    assert_eq!(frames.len(), 2);
    let (p0, p1) = (frames[0].payload.clone().unwrap(), frames[1].payload.clone().unwrap());
    assert!(Arc::ptr_eq(&p0, &p1));
    assert_eq!(&*p0, b"shared");
    assert_eq!(w.take(c).len(), 2);
}

/// A stream's deliveries to a lone receiver are encoded into the buffers
/// of those already sent (no allocation each), and cost the queue what a
/// new buffer would: the reused buffer is the sent one, and the bytes
/// queued are the same for the first delivery and the next.
#[test]
fn a_sent_deliverys_buffer_carries_the_next_at_the_same_charge() {
    let mut w = World::new(config());
    let (a, b) = (w.join(1000), w.join(1001));
    w.subscribe(b, 1, "x");
    w.take(b);
    w.publish(a, "x", b"first!");
    let first = {
        let frames = w.bus.sendable(b, 64);
        assert_eq!(frames.len(), 1);
        frames[0].head.as_ptr() as usize
    };
    let charged = w.bus.peer(b).unwrap().queue.bytes();
    w.bus.sent(b, 1, Instant::now());
    assert_eq!(w.bus.peer(b).unwrap().queue.bytes(), 0);
    w.publish(a, "x", b"second");
    assert_eq!(w.bus.peer(b).unwrap().queue.bytes(), charged);
    let frames = w.bus.sendable(b, 64);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].head.as_ptr() as usize, first, "the sent frame's buffer is used again");
    match decode_broker(&frames[0].head).unwrap() {
        BrokerFrame::Deliver(d, p) => assert_eq!((d.topic, p), ("x", &b"second"[..])),
        other => panic!("{other:?}"),
    }
}

/// `bytes_out` counts every delivery's inline payload, whether the frame
/// is one buffer (a lone receiver's: the payload follows the body in
/// `head`) or a head sharing the payload with other receivers'. (With
/// 2d50c04 a lone receiver's bytes were not counted at all.)
#[test]
fn bytes_out_counts_the_payload_of_a_lone_receivers_delivery() {
    let mut w = World::new(config());
    let (a, b, c) = (w.join(1000), w.join(1001), w.join(1002));
    w.subscribe(b, 1, "x");
    w.subscribe(b, 2, "y");
    w.subscribe(c, 1, "y");
    w.take(b);
    w.take(c);
    let before = w.bus.counters().bytes_out;
    w.publish(a, "x", b"alone");
    w.publish(a, "y", b"shared");
    assert_eq!(w.take(b).len(), 2);
    assert_eq!(w.take(c).len(), 1);
    assert_eq!(w.bus.counters().bytes_out - before, 5 + 2 * 6);
}

/// A lone receiver's one-buffer delivery costs its queue what it holds,
/// head and payload once, however long the subject: a queue with room
/// for three such deliveries takes three, then counts a gap. (With
/// 2d50c04 a head over 64 bytes grew the buffer to twice the payload, and
/// the queue was charged that: one delivery fitted, three were dropped.)
#[test]
fn a_lone_receivers_delivery_with_a_long_subject_costs_its_bytes_once() {
    let topic = "plant.building-north.floor-three.room-twelve.sensor-0042.temperature.celsius";
    assert!(topic.len() > 64);
    let payload = vec![7u8; 10_000];
    let mut cfg = config();
    // Three deliveries, each its payload, a head of some 120 bytes and the
    // overhead, and less than half of a fourth.
    cfg.queue.bytes = (3 * (payload.len() + 200 + super::queue::FRAME_OVERHEAD)) as u64;
    let mut w = World::new(cfg);
    let (a, b) = (w.join(1000), w.join(1001));
    w.subscribe(b, 1, topic);
    w.take(b);
    for _ in 0..4 {
        w.publish(a, topic, &payload);
    }
    let got = w.take(b);
    let delivered = got.iter().filter(|f| matches!(f, BrokerFrame::Deliver(..))).count();
    let missed: u64 = got.iter().map(|f| if let BrokerFrame::Gap(g) = f { g.missed } else { 0 }).sum();
    assert_eq!((delivered, missed), (3, 1), "{} frames", got.len());
}

/// A publisher's stream on one subject is routed once and the route
/// remembered; any subscription made or ended since, by anyone, routes
/// it again, and a subject that fails its checks is refused however often
/// the last good one was sent.
#[test]
fn a_remembered_route_follows_every_change_of_subscriptions() {
    let mut w = World::new(config());
    let (a, b, c) = (w.join(1000), w.join(1001), w.join(1002));
    w.subscribe(b, 1, "s.x");
    w.take(b);
    let delivered =
        |w: &mut World, id| w.take(id).into_iter().filter(|f| matches!(f, BrokerFrame::Deliver(..))).count();
    w.publish(a, "s.x", b"1");
    w.publish(a, "s.x", b"2");
    assert_eq!((delivered(&mut w, b), delivered(&mut w, c)), (2, 0));
    w.subscribe(c, 7, "s.*");
    w.take(c);
    w.publish(a, "s.x", b"3");
    assert_eq!((delivered(&mut w, b), delivered(&mut w, c)), (1, 1), "a new subscriber gets the stream");
    w.send(b, &Unsubscribe { sub_id: 1 });
    w.take(b);
    w.publish(a, "s.x", b"4");
    assert_eq!((delivered(&mut w, b), delivered(&mut w, c)), (0, 1), "an ended one does not");
    w.publish(a, "s..x", b"5");
    w.publish(a, "$SYS.x", b"6");
    let refused = w.take(a).into_iter().filter(|f| matches!(f, BrokerFrame::OpError(..))).count();
    assert_eq!(refused, 2, "bad subjects are refused after a good one");
    w.publish(a, "s.x", b"7");
    assert_eq!(delivered(&mut w, c), 1);
}

/// A router that empties starts afresh, but its generation goes on: one
/// subscriber leaving and the next arriving (as two `shmbusctl sub
/// --count 1` in a row do) must not bring back the generation the last
/// route was made in. (It did: the second subscriber waited forever.)
#[test]
fn a_remembered_route_does_not_outlive_an_emptied_router() {
    let mut w = World::new(config());
    let (a, b, c) = (w.join(1000), w.join(1001), w.join(1002));
    w.subscribe(b, 1, "s.x");
    w.take(b);
    w.publish(a, "s.x", b"1");
    w.send(b, &Unsubscribe { sub_id: 1 });
    w.take(b);
    w.subscribe(c, 1, "s.x");
    w.take(c);
    w.publish(a, "s.x", b"2");
    let got = w.take(c).into_iter().filter(|f| matches!(f, BrokerFrame::Deliver(..))).count();
    assert_eq!(got, 1, "the new subscriber gets the message");
}

#[test]
fn peer_ids_are_never_reused() {
    let mut w = World::new(config());
    let a = w.join(5);
    w.bus.hangup(a);
    let b = w.join(5);
    assert!(b > a);
    assert_eq!(w.bus.take_effects().iter().filter(|e| matches!(e, Effect::Close(x) if *x == a)).count(), 1);
}

#[test]
fn refused_publishes_are_not_counted_and_counters_saturate() {
    let mut w = World::new(config());
    let a = w.join(1);
    w.publish(a, "bad..subject", b"x");
    w.publish_fd(a, "ok", memfd(10), u64::MAX);
    let errors = w.take(a);
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(errors.iter().all(|f| matches!(f, BrokerFrame::OpError(_))));
    assert_eq!((w.bus.counters().msgs_in, w.bus.counters().bytes_in), (0, 0));
    w.publish(a, "ok", b"abc");
    assert_eq!((w.bus.counters().msgs_in, w.bus.counters().bytes_in), (1, 3));
    let mut c = u64::MAX - 1;
    super::bump(&mut c, 5);
    assert_eq!(c, u64::MAX);
}

#[test]
fn queued_bytes_are_bounded_per_uid_across_connections() {
    let mut cfg = config();
    cfg.uid_limits.set(Resource::QueuedBytes, 10_000);
    let mut w = World::new(cfg);
    let publisher = w.join(1);
    // Four connections of uid 2 that never read; one of uid 3.
    let slow: Vec<PeerId> = (0..4).map(|_| w.join(2)).collect();
    let other = w.join(3);
    for (i, &s) in slow.iter().enumerate() {
        w.subscribe(s, i as u32, "t");
    }
    w.subscribe(other, 9, "t");
    w.take(other);
    for _ in 0..100 {
        w.publish(publisher, "t", &[0u8; 500]);
    }
    // Nothing was flushed to uid 2: its queues hold at most its quota.
    let held = w.bus.held(2, Resource::QueuedBytes);
    assert!(held <= 10_000, "uid 2 holds {held} bytes");
    assert!(w.bus.counters().dropped > 0);
    // Uid 3's own budget was untouched by uid 2's: its one connection got
    // as much as its whole quota holds (each delivery costs about 700
    // bytes with its bookkeeping).
    let got = w.take(other);
    let delivered = got.iter().filter(|f| matches!(f, BrokerFrame::Deliver(..))).count();
    assert!(delivered >= 10_000 / 750, "{delivered}");
}

#[test]
fn subscriptions_are_bounded_per_uid_and_the_refusal_names_the_flag() {
    let mut cfg = config();
    cfg.uid_limits.set(Resource::Subscriptions, 3);
    let mut w = World::new(cfg);
    let (a, b) = (w.join(7), w.join(7));
    w.subscribe(a, 1, "a");
    w.subscribe(a, 2, "b");
    w.subscribe(b, 1, "c");
    w.subscribe(b, 2, "d");
    let frames = w.take(b);
    match frames.last() {
        Some(BrokerFrame::OpError(e)) => {
            assert_eq!(e.code, ErrorCode::LimitExceeded);
            assert!(e.message.contains("--uid-subscriptions"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(w.bus.counters().quota_refusals, 1);
    // Dropping a connection gives its subscriptions back.
    w.bus.hangup(a);
    w.subscribe(b, 3, "e");
    assert!(matches!(w.take(b).last(), Some(BrokerFrame::Subscribed(_))));
}

#[test]
fn fds_wait_for_acknowledgement_and_over_acking_is_a_violation() {
    let mut cfg = config();
    cfg.fd_window = 4;
    let mut w = World::new(cfg);
    let (p, s) = (w.join(1), w.join(2));
    w.subscribe(s, 1, "f");
    w.take(s);
    for _ in 0..10 {
        w.publish_fd(p, "f", memfd(16), 16);
    }
    let sent = w.flush(s);
    assert_eq!(sent.iter().map(|f| f.1).sum::<usize>(), 4, "window of 4 fds");
    assert_eq!(w.bus.held(2, Resource::UnackedFds), 4);
    assert!(w.bus.has_output(s));
    w.ack(s, 4);
    assert_eq!(w.flush(s).len(), 4);
    w.send(s, &FdAck { fds: 9 });
    // Closing still respects the window: nothing more goes until the peer
    // acknowledges, which a closing peer may still do.
    assert!(w.take(s).is_empty());
    w.ack(s, 4);
    let last = w.take(s);
    match last.last() {
        Some(BrokerFrame::Goodbye(g)) => assert_eq!(g.code, GoodbyeCode::ProtocolViolation),
        other => panic!("{other:?}"),
    }
    // Two fds are out and unacknowledged: the peer lingers, still charged
    // for them and its connection, until it hangs up.
    assert!(w.bus.take_effects().contains(&Effect::Shutdown(s)));
    assert_eq!(w.bus.held(2, Resource::UnackedFds), 2);
    assert_eq!(w.bus.held(2, Resource::Connections), 1);
    // Junk from a lingering peer is ignored; giving the fds back ends it,
    // once they are seen read.
    w.publish(s, "f", b"ignored");
    assert!(w.bus.peer(s).is_some());
    w.send(s, &FdAck { fds: 2 });
    assert!(w.bus.peer(s).is_some(), "acknowledged, not yet seen read");
    assert_eq!(w.bus.held(2, Resource::UnackedFds), 2);
    w.bus.fds_delivered(s);
    assert!(w.bus.peer(s).is_none());
    assert!(w.bus.take_effects().contains(&Effect::Close(s)));
    assert_eq!(w.bus.held(2, Resource::UnackedFds), 0, "released when the peer went");
    assert_eq!(w.bus.held(2, Resource::Connections), 0);
}

/// A client can acknowledge fds it never read (a linked one sees a marker
/// for each): an `FdAck` gives nothing back by itself. The fds count
/// against the window and the uid until the daemon sees them read
/// (`fds_delivered`), which is what frees room and wakes the uid's other
/// connections. Over-acking is still judged against what was sent and
/// not yet acknowledged.
#[test]
fn an_acknowledgement_gives_fds_back_only_once_they_are_seen_read() {
    let mut cfg = config();
    cfg.fd_window = 4;
    cfg.uid_limits.set(Resource::UnackedFds, 6);
    let mut w = World::new(cfg);
    let p = w.join(1);
    let (acker, other) = (w.join(2), w.join(2));
    w.subscribe(acker, 1, "f");
    w.subscribe(other, 1, "g");
    w.take(acker);
    w.take(other);
    for _ in 0..8 {
        w.publish_fd(p, "f", memfd(4), 4);
    }
    assert_eq!(w.flush(acker).len(), 4, "a window of 4");
    w.publish_fd(p, "g", memfd(4), 4);
    w.publish_fd(p, "g", memfd(4), 4);
    w.publish_fd(p, "g", memfd(4), 4);
    assert_eq!(w.flush(other).len(), 2, "the uid's 6, less the acker's 4");
    w.bus.take_effects();

    // Acknowledged, unread: nothing more goes, to it or to its uid.
    w.send(acker, &FdAck { fds: 4 });
    assert_eq!(w.bus.take_effects(), vec![Effect::Acked(acker)]);
    assert_eq!(w.bus.unconfirmed_fds(acker), 4);
    assert_eq!(w.bus.held(2, Resource::UnackedFds), 6);
    assert!(w.flush(acker).is_empty(), "the window still holds them");
    assert!(w.flush(other).is_empty(), "the uid still holds them");
    // They were acknowledged already: acking them again is acking more
    // than was sent and unacknowledged.
    let mut over = config();
    over.fd_window = 4;
    let mut v = World::new(over);
    let (vp, vs) = (v.join(1), v.join(2));
    v.subscribe(vs, 1, "f");
    v.take(vs);
    v.publish_fd(vp, "f", memfd(4), 4);
    assert_eq!(v.flush(vs).len(), 1);
    v.send(vs, &FdAck { fds: 1 });
    v.send(vs, &FdAck { fds: 1 });
    match v.take(vs).last() {
        Some(BrokerFrame::Goodbye(g)) => assert_eq!(g.code, GoodbyeCode::ProtocolViolation),
        other => panic!("{other:?}"),
    }

    // Seen read: the room comes back, and the uid's waiting connection is
    // woken.
    w.bus.fds_delivered(acker);
    assert_eq!(w.bus.unconfirmed_fds(acker), 0);
    assert_eq!(w.bus.held(2, Resource::UnackedFds), 2);
    let woken = w.bus.take_effects();
    assert!(woken.contains(&Effect::Flush(acker)) && woken.contains(&Effect::Flush(other)), "{woken:?}");
    assert_eq!(w.flush(other).len(), 1);
    assert_eq!(w.flush(acker).len(), 3, "the uid's room, 6 less the other's 3");
    // Nothing acknowledged: nothing to give back.
    w.bus.fds_delivered(acker);
    assert_eq!(w.bus.held(2, Resource::UnackedFds), 6);
    // A peer that goes takes its unconfirmed fds' charge with it.
    w.send(acker, &FdAck { fds: 3 });
    w.bus.hangup(acker);
    assert_eq!(w.bus.held(2, Resource::UnackedFds), 3);
}

/// A closing peer with acknowledged fds not yet seen read lingers, as one
/// with unacknowledged fds does: its acknowledgement alone does not end it.
#[test]
fn a_closing_peer_lingers_until_its_acknowledged_fds_are_seen_read() {
    let mut cfg = config();
    cfg.fd_window = 4;
    let mut w = World::new(cfg);
    let (p, s) = (w.join(1), w.join(2));
    w.subscribe(s, 1, "f");
    w.take(s);
    w.publish_fd(p, "f", memfd(4), 4);
    assert_eq!(w.flush(s).len(), 1);
    w.send(s, &FdAck { fds: 1 });
    w.bus.shutdown(w.now);
    match w.take(s).last() {
        Some(BrokerFrame::Goodbye(g)) => assert_eq!(g.code, GoodbyeCode::Shutdown),
        other => panic!("{other:?}"),
    }
    assert!(w.bus.take_effects().contains(&Effect::Shutdown(s)));
    assert!(w.bus.peer(s).is_some());
    assert_eq!(w.bus.held(2, Resource::UnackedFds), 1);
    w.bus.fds_delivered(s);
    assert!(w.bus.peer(s).is_none());
    assert!(w.bus.take_effects().contains(&Effect::Close(s)));
    assert_eq!(w.bus.held(2, Resource::UnackedFds), 0);
}

#[test]
fn a_silent_connection_is_closed_at_the_hello_deadline() {
    let mut cfg = config();
    cfg.hello_timeout = Duration::from_millis(100);
    let mut w = World::new(cfg);
    let cred = PeerCred { pid: 1, uid: 9, gid: 9 };
    let id = w.bus.connect(cred, Vec::new(), "silent".into(), w.now).unwrap();
    let talker = w.join(9);
    w.bus.tick(w.now + Duration::from_millis(50));
    assert!(w.bus.peer(id).is_some());
    w.bus.tick(w.now + Duration::from_millis(150));
    match w.take(id).as_slice() {
        [BrokerFrame::Goodbye(g)] => assert_eq!(g.code, GoodbyeCode::HelloTimeout),
        other => panic!("{other:?}"),
    }
    assert!(w.bus.peer(id).is_none());
    assert!(w.bus.peer(talker).is_some(), "a peer that said Hello is not timed out");
    assert_eq!(w.bus.counters().hello_timeouts, 1);
}

#[test]
fn deadlines_of_peers_that_no_longer_wait_wake_no_one() {
    let mut cfg = config();
    cfg.hello_timeout = Duration::from_millis(100);
    let mut w = World::new(cfg);
    assert_eq!(w.bus.next_deadline(), None);
    let talker = w.join(9);
    assert_eq!(w.bus.next_deadline(), None, "a peer that said Hello has no Hello deadline left");
    let cred = PeerCred { pid: 1, uid: 9, gid: 9 };
    let silent = w.bus.connect(cred, Vec::new(), "silent".into(), w.now).unwrap();
    assert_eq!(w.bus.next_deadline(), Some(w.now + Duration::from_millis(100)));
    w.bus.hangup(silent);
    assert!(w.bus.peer(silent).is_none());
    assert_eq!(w.bus.next_deadline(), None, "a peer that left has no Hello deadline left");
    // A close that finishes before its grace leaves no deadline either.
    w.bus.violation(talker, "a test", w.now);
    assert_eq!(w.bus.next_deadline(), Some(w.now + w.bus.cfg.close_grace));
    w.flush(talker);
    assert!(w.bus.peer(talker).is_none(), "its goodbye sent, the peer is gone");
    assert_eq!(w.bus.next_deadline(), None, "a finished close has no deadline left");
}

#[test]
fn introspection_comes_in_bounded_pages() {
    let mut w = World::new(config());
    let a = w.join(1);
    let n = 1000;
    for i in 0..n {
        w.subscribe(a, i, &format!("topic.{i:05}"));
    }
    w.take(a);
    let mut after: Option<String> = None;
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        w.send(a, &Query { req_id: 1, what: QueryKind::Topics, after: after.as_deref() });
        let frames = w.take(a);
        pages += 1;
        assert!(frames.len() <= super::introspect::PAGE_ITEMS + 1);
        let mut next = None;
        for f in frames {
            match f {
                BrokerFrame::QueryItem(i) => seen.push(format!("{:?}", i.item)),
                BrokerFrame::QueryEnd(e) => next = e.next,
                other => panic!("{other:?}"),
            }
        }
        match next {
            Some(k) => after = Some(k),
            None => break,
        }
    }
    assert_eq!(seen.len(), n as usize);
    assert!(pages > 1);
    let mut dedup = seen.clone();
    dedup.dedup();
    assert_eq!(dedup.len(), seen.len(), "no item twice");
}

#[test]
fn reader_churn_is_coalesced_for_the_publisher() {
    let mut w = World::new(config());
    let (p, r) = (w.join(1), w.join(2));
    let role = ChannelRole::Publish { slot_size: 64, slot_count: 16, overflow: ChannelOverflow::Block };
    w.send(p, &ChannelOpen { req_id: 1, topic: "video", role });
    let granted = w.take(p);
    let channel_id = match granted.as_slice() {
        [BrokerFrame::ChannelGranted(g)] => g.channel_id,
        other => panic!("{other:?}"),
    };
    // The publisher does not read while a reader joins and leaves 1000
    // times: it is owed nothing, and is not cut off.
    for i in 0..1000 {
        w.send(r, &ChannelOpen { req_id: i, topic: "video", role: ChannelRole::Subscribe });
        let reader_id = match w.take(r).as_slice() {
            [BrokerFrame::ChannelGranted(g)] => g.reader_id,
            other => panic!("{other:?}"),
        };
        w.ack(r, 3);
        w.send(r, &ChannelClose { channel_id, reader_id });
    }
    // At most NEWS_IN_FLIGHT frames were queued for the idle publisher;
    // the rest was coalesced (joins cancelled by their leaves).
    let news = w.take(p);
    assert!(news.len() <= 16 + 2, "{}", news.len());
    // The last frame brings the publisher's generation up to the ring's,
    // so in block mode it never waits for news that will not come.
    let members = shmbus_proto::ring::protocol::members(&w.bus.channels.by_id[&channel_id].map);
    match news.last() {
        Some(BrokerFrame::ChannelReader(r)) => assert_eq!(r.generation, members),
        other => panic!("{other:?}"),
    }
    assert!(w.bus.peer(p).is_some_and(|x| !x.is_closing()));
    assert_eq!(w.bus.held(2, Resource::ChannelReaders), 0);
}

#[test]
fn readers_per_channel_are_capped() {
    let mut cfg = config();
    cfg.max_readers_per_channel = 2;
    let mut w = World::new(cfg);
    let p = w.join(1);
    let role = ChannelRole::Publish { slot_size: 64, slot_count: 16, overflow: ChannelOverflow::Overwrite };
    w.send(p, &ChannelOpen { req_id: 1, topic: "c", role });
    w.take(p);
    let r = w.join(2);
    for i in 0..3 {
        w.send(r, &ChannelOpen { req_id: i, topic: "c", role: ChannelRole::Subscribe });
    }
    let frames = w.take(r);
    assert!(matches!(frames.last(), Some(BrokerFrame::OpError(e))
        if e.code == ErrorCode::LimitExceeded && e.message.contains("--max-readers-per-channel")));
}

#[test]
fn a_peer_waiting_for_its_uids_fd_room_is_woken_when_another_leaves() {
    let mut cfg = config();
    cfg.fd_window = 8;
    cfg.uid_limits.set(Resource::UnackedFds, 8);
    let mut w = World::new(cfg);
    let p = w.join(1);
    let (parker, honest) = (w.join(2), w.join(2));
    w.subscribe(parker, 1, "f");
    w.subscribe(honest, 1, "g");
    w.take(parker);
    w.take(honest);
    for _ in 0..8 {
        w.publish_fd(p, "f", memfd(4), 4);
    }
    assert_eq!(w.flush(parker).len(), 8, "the parker takes all of uid 2's room and never acks");
    w.publish_fd(p, "g", memfd(4), 4);
    assert!(w.flush(honest).is_empty(), "uid 2 has no room left");
    w.bus.hangup(parker);
    let woken = w.bus.take_effects();
    assert!(woken.contains(&Effect::Flush(honest)), "{woken:?}");
    assert_eq!(w.flush(honest).len(), 1);
}

#[test]
fn a_gap_owed_for_the_uids_bound_is_told_even_with_an_empty_queue() {
    let mut cfg = config();
    cfg.uid_limits.set(Resource::QueuedBytes, 3_000);
    let mut w = World::new(cfg);
    let p = w.join(1);
    let (filler, victim) = (w.join(2), w.join(2));
    w.subscribe(filler, 1, "fill");
    w.subscribe(victim, 1, "v");
    w.take(filler);
    w.take(victim);
    for _ in 0..20 {
        w.publish(p, "fill", &[0; 500]);
    }
    w.publish(p, "v", &[1; 500]);
    let got = w.take(victim);
    match got.as_slice() {
        [BrokerFrame::Gap(g)] => assert_eq!((g.sub_id, g.missed), (1, 1)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn idle_subscribers_of_another_uid_cannot_spend_a_publishers_payload_budget() {
    let mut cfg = config();
    cfg.uid_limits.set(Resource::MemfdFds, 4);
    let mut w = World::new(cfg);
    let publisher = w.join(1);
    let idle = w.join(2);
    w.subscribe(idle, 1, "p");
    w.take(idle);
    for _ in 0..20 {
        w.publish_fd(publisher, "p", memfd(8), 8);
    }
    // The publisher was never refused; the idle uid holds at most its own
    // quota and was told of the rest as a gap.
    assert!(w.take(publisher).is_empty());
    assert_eq!(w.bus.held(2, Resource::MemfdFds), 4);
    assert_eq!(w.bus.held(1, Resource::MemfdFds), 0);
    assert_eq!(w.bus.counters().dropped, 16);
}

#[test]
fn one_uid_cannot_take_every_reader_slot_of_a_channel() {
    let mut cfg = config();
    cfg.max_readers_per_channel_per_uid = 2;
    let mut w = World::new(cfg);
    let p = w.join(1);
    let role = ChannelRole::Publish { slot_size: 64, slot_count: 16, overflow: ChannelOverflow::Overwrite };
    w.send(p, &ChannelOpen { req_id: 1, topic: "c", role });
    w.take(p);
    let greedy = w.join(2);
    for i in 0..3 {
        w.send(greedy, &ChannelOpen { req_id: i, topic: "c", role: ChannelRole::Subscribe });
    }
    assert!(matches!(w.take(greedy).last(), Some(BrokerFrame::OpError(e))
        if e.code == ErrorCode::LimitExceeded && e.message.contains("--max-readers-per-channel-per-uid")));
    let owner_reader = w.join(1);
    w.send(owner_reader, &ChannelOpen { req_id: 9, topic: "c", role: ChannelRole::Subscribe });
    assert!(matches!(w.take(owner_reader).as_slice(), [BrokerFrame::ChannelGranted(_)]));
}

#[test]
fn a_flood_of_tiny_replies_is_bounded_by_what_each_frame_really_costs() {
    let mut cfg = config();
    cfg.uid_limits.set(Resource::QueuedBytes, 100_000);
    let mut w = World::new(cfg);
    let a = w.join(3);
    let mut sent = 0;
    while w.bus.peer(a).is_some_and(|p| !p.is_closing()) && sent < 100_000 {
        w.send(a, &shmbus_proto::frame::Ping { token: sent });
        sent += 1;
    }
    // Each pong is a few bytes on the wire but costs the broker its
    // bookkeeping: the uid's hard bound (twice 100 KB) stopped it long
    // before 100,000 of them.
    assert!(sent < 2_000, "{sent} pongs queued");
    assert!(w.bus.held(3, Resource::QueuedBytes) <= 200_000 + 1_000);
}

// ------------------------------------------------------------ services --

mod services {
    use super::*;
    use shmbus_proto::frame::{
        NameFlags, NameOwnerChanged, NameRelease, NameRequest, NameResult, Outcome, Reply, ReplyStatus,
        Request,
    };

    fn own(w: &mut World, id: PeerId, name: &str, flags: NameFlags) -> NameResult {
        w.send(id, &NameRequest { req_id: 1, name, flags });
        match w.take(id).as_slice() {
            [BrokerFrame::NameReply(r)] => r.result,
            other => panic!("{other:?}"),
        }
    }

    fn call(w: &mut World, id: PeerId, call_id: u64, name: &str, timeout_ms: u32, payload: &[u8]) {
        let r =
            Request { call_id, name, timeout_ms, no_reply: false, origin: None, payload: PayloadRef::Inline };
        let bytes = encode_frame(&r, payload).unwrap();
        w.bus.receive(id, &bytes, Vec::new(), w.now);
    }

    fn answer(w: &mut World, id: PeerId) -> (u64, String, Vec<u8>) {
        match w.take(id).as_slice() {
            [BrokerFrame::Answer(a, p)] => (a.call_id, format!("{:?}", a.outcome), p.to_vec()),
            other => panic!("{other:?}"),
        }
    }

    /// The serial of the one request the service was handed.
    fn served(w: &mut World, id: PeerId) -> (u64, Vec<u8>) {
        match w.take(id).as_slice() {
            [BrokerFrame::Serve(s, p)] => (s.serial, p.to_vec()),
            other => panic!("{other:?}"),
        }
    }

    fn reply(w: &mut World, id: PeerId, serial: u64, payload: &[u8]) {
        let r = Reply { serial, status: ReplyStatus::Ok, payload: PayloadRef::Inline };
        let bytes = encode_frame(&r, payload).unwrap();
        w.bus.receive(id, &bytes, Vec::new(), w.now);
    }

    #[test]
    fn a_call_gets_the_reply_and_a_second_reply_is_refused() {
        let mut w = World::new(config());
        let (svc, caller) = (w.join(10), w.join(11));
        assert_eq!(own(&mut w, svc, "thermo.kitchen", NameFlags::default()), NameResult::PrimaryOwner);
        call(&mut w, caller, 7, "thermo.kitchen", 1000, b"temp?");
        let (serial, asked) = served(&mut w, svc);
        assert_eq!(asked, b"temp?");
        reply(&mut w, svc, serial, b"21.5");
        assert_eq!(answer(&mut w, caller), (7, "Reply".into(), b"21.5".to_vec()));
        reply(&mut w, svc, serial, b"again");
        assert!(
            matches!(w.take(svc).as_slice(), [BrokerFrame::OpError(e)] if e.code == ErrorCode::NoSuchRequest)
        );
        assert!(w.take(caller).is_empty(), "exactly one answer");
        assert_eq!(w.bus.counters().replies_refused, 1);
    }

    #[test]
    fn no_responder_timeout_and_responder_gone() {
        let mut w = World::new(config());
        let (svc, caller) = (w.join(10), w.join(11));
        call(&mut w, caller, 1, "nobody.home", 1000, b"");
        assert_eq!(answer(&mut w, caller).1, "NoResponder");
        own(&mut w, svc, "slow", NameFlags::default());
        call(&mut w, caller, 2, "slow", 100, b"");
        let (serial, _) = served(&mut w, svc);
        w.bus.tick(w.now + Duration::from_millis(50));
        assert!(w.take(caller).is_empty());
        w.bus.tick(w.now + Duration::from_millis(150));
        assert_eq!(answer(&mut w, caller), (2, "Timeout".into(), vec![]));
        reply(&mut w, svc, serial, b"late");
        assert!(matches!(w.take(svc).as_slice(), [BrokerFrame::OpError(_)]), "a late reply finds no slot");
        assert!(w.take(caller).is_empty());
        for i in 0..100 {
            call(&mut w, caller, 100 + i, "slow", 10_000, b"");
        }
        w.take(svc);
        w.bus.hangup(svc);
        let answers = w.take(caller);
        assert_eq!(answers.len(), 100);
        assert!(answers
            .iter()
            .all(|a| matches!(a, BrokerFrame::Answer(a, _) if a.outcome == Outcome::ResponderGone)));
        assert_eq!(w.bus.held(11, Resource::PendingRequests), 0);
    }

    #[test]
    fn a_reply_whose_caller_left_is_dropped_and_counted() {
        let mut w = World::new(config());
        let (svc, caller) = (w.join(10), w.join(11));
        own(&mut w, svc, "s", NameFlags::default());
        call(&mut w, caller, 1, "s", 1000, b"");
        let (serial, _) = served(&mut w, svc);
        w.bus.hangup(caller);
        reply(&mut w, svc, serial, b"x");
        assert!(w.take(svc).is_empty(), "accepted, not refused");
        assert_eq!(w.bus.counters().replies_dropped, 1);
    }

    #[test]
    fn pending_requests_are_a_per_uid_quota() {
        let mut cfg = config();
        cfg.uid_limits.set(Resource::PendingRequests, 3);
        let mut w = World::new(cfg);
        let (svc, caller) = (w.join(10), w.join(11));
        own(&mut w, svc, "s", NameFlags::default());
        for i in 0..4 {
            call(&mut w, caller, i, "s", 1000, b"");
        }
        let (id, outcome, _) = answer(&mut w, caller);
        assert_eq!(id, 3);
        assert!(
            outcome.starts_with("LimitExceeded") && outcome.contains("--uid-pending-requests"),
            "{outcome}"
        );
    }

    #[test]
    fn replies_from_the_wrong_peer_are_refused() {
        let mut w = World::new(config());
        let (svc, other, caller) = (w.join(10), w.join(12), w.join(11));
        own(&mut w, svc, "s", NameFlags::default());
        call(&mut w, caller, 1, "s", 1000, b"");
        let (serial, _) = served(&mut w, svc);
        reply(&mut w, other, serial, b"forged");
        assert!(
            matches!(w.take(other).as_slice(), [BrokerFrame::OpError(e)] if e.code == ErrorCode::NoSuchRequest)
        );
        reply(&mut w, svc, serial, b"real");
        assert_eq!(answer(&mut w, caller).2, b"real");
    }

    #[test]
    fn owner_changes_are_published_in_order_and_sys_is_the_brokers() {
        let mut w = World::new(config());
        let watcher = w.join(5);
        w.subscribe(watcher, 1, "$SYS.name.>");
        w.take(watcher);
        let (a, b) = (w.join(10), w.join(11));
        own(&mut w, a, "n", NameFlags::default());
        assert_eq!(own(&mut w, b, "n", NameFlags::default()), NameResult::InQueue);
        w.bus.hangup(a);
        w.send(b, &NameRelease { req_id: 2, name: "n" });
        w.take(b);
        let events: Vec<(Option<u64>, Option<u64>, u64)> = w
            .take(watcher)
            .into_iter()
            .map(|f| match f {
                BrokerFrame::Deliver(d, p) => {
                    assert_eq!((d.topic, d.sender.client_id), ("$SYS.name.n", 0));
                    let e = NameOwnerChanged::from_bytes(p).unwrap();
                    (e.old_owner, e.new_owner, d.seq)
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(events, vec![(None, Some(a), 1), (Some(a), Some(b), 2), (Some(b), None, 3)]);
        // Nobody else may publish there or own names there.
        w.publish(b, "$SYS.name.n", b"forged");
        assert!(matches!(w.take(b).as_slice(), [BrokerFrame::OpError(e)] if e.code == ErrorCode::Denied));
        w.send(b, &NameRequest { req_id: 3, name: "$SYS.x", flags: NameFlags::default() });
        assert!(
            matches!(w.take(b).as_slice(), [BrokerFrame::OpError(e)] if e.code == ErrorCode::ReservedName)
        );
        w.send(b, &NameRequest { req_id: 4, name: "shmbus.admin", flags: NameFlags::default() });
        assert!(
            matches!(w.take(b).as_slice(), [BrokerFrame::OpError(e)] if e.code == ErrorCode::ReservedName)
        );
        let root = w.join(0);
        assert_eq!(own(&mut w, root, "shmbus.admin", NameFlags::default()), NameResult::PrimaryOwner);
    }

    #[test]
    fn names_are_a_per_uid_quota_released_on_disconnect() {
        let mut cfg = config();
        cfg.uid_limits.set(Resource::Names, 2);
        let mut w = World::new(cfg);
        let a = w.join(10);
        own(&mut w, a, "a", NameFlags::default());
        own(&mut w, a, "b", NameFlags::default());
        own(&mut w, a, "a", NameFlags::default());
        w.send(a, &NameRequest { req_id: 1, name: "c", flags: NameFlags::default() });
        assert!(
            matches!(w.take(a).as_slice(), [BrokerFrame::OpError(e)] if e.code == ErrorCode::LimitExceeded)
        );
        w.bus.hangup(a);
        assert_eq!(w.bus.held(10, Resource::Names), 0);
    }

    /// What `Query { Names }` answers, page after page.
    fn all_names(w: &mut World, id: PeerId) -> Vec<shmbus_proto::frame::NameInfo> {
        let mut infos = Vec::new();
        let mut after: Option<String> = None;
        loop {
            w.send(id, &Query { req_id: 9, what: QueryKind::Names, after: after.as_deref() });
            let mut end = None;
            for f in w.take(id) {
                match f {
                    BrokerFrame::QueryItem(i) => match i.item {
                        shmbus_proto::frame::QueryItemBody::Name(n) => infos.push(n),
                        other => panic!("{other:?}"),
                    },
                    BrokerFrame::QueryEnd(e) => end = Some(e.next),
                    other => panic!("{other:?}"),
                }
            }
            match end.expect("every page ends with its QueryEnd") {
                Some(next) => after = Some(next.to_owned()),
                None => return infos,
            }
        }
    }

    #[test]
    fn a_name_shared_by_more_clients_than_a_packet_can_list_is_still_shown_and_counted() {
        use shmbus_proto::limits::MAX_NAME_INFO_IDS;
        let mut w = World::new(config());
        // 34,000 ids, most of three varint bytes: more than MAX_PACKET.
        let n = 34_000;
        let shared = NameFlags { shared: true, ..NameFlags::default() };
        let mut members = Vec::new();
        for i in 0..n {
            // 100 a uid: two names each stay within its names quota.
            let id = w.join(2000 + i / 100);
            assert_eq!(own(&mut w, id, "crowd", shared), NameResult::PrimaryOwner);
            members.push(id);
        }
        // And an exclusive name with as long a queue behind its owner.
        for &id in &members {
            w.send(id, &NameRequest { req_id: 2, name: "queue", flags: NameFlags::default() });
            w.take(id);
        }
        let infos = all_names(&mut w, members[0]);
        assert_eq!(infos.len(), 2);
        let crowd = &infos[0];
        assert_eq!((crowd.name.as_str(), crowd.owner_count, crowd.queued_count), ("crowd", n, 0));
        assert_eq!(crowd.owners.len(), MAX_NAME_INFO_IDS);
        assert!(crowd.owners == members[..MAX_NAME_INFO_IDS], "the first members, in order");
        let queue = &infos[1];
        assert_eq!((queue.name.as_str(), queue.owner_count, queue.queued_count), ("queue", 1, n - 1));
        assert_eq!(queue.owners, [members[0]]);
        assert!(queue.queued == members[1..MAX_NAME_INFO_IDS]);
    }
}

// ------------------------------------------------------------- policy --

fn rules(text: &str) -> super::rules::Rules {
    super::rules::Rules::parse(text, &super::rules::Accounts::parse("", "")).unwrap()
}

/// A reload ends a subscription at once: what was queued for it and not
/// yet sent is not sent, and counts in the gap before the notice; a
/// service's queued requests for a revoked name are not sent either, and
/// their callers are answered.
#[test]
fn a_reload_drops_what_was_queued_for_what_it_revokes() {
    let mut cfg = config();
    cfg.rules = Some(rules(
        "[[rule]]\nmatch = {}\nallow = [\"connect\", \"subscribe secret.>\", \"subscribe open.>\", \"own svc.>\", \"call svc.>\"]\n",
    ));
    let mut w = World::new(cfg);
    let (reader, root, service, caller) = (w.join(1000), w.join(0), w.join(1001), w.join(1002));
    w.subscribe(reader, 1, "secret.>");
    w.subscribe(reader, 2, "open.>");
    w.send(
        service,
        &shmbus_proto::frame::NameRequest { req_id: 1, name: "svc.s", flags: Default::default() },
    );
    assert_eq!(w.take(reader).len(), 2);
    assert_eq!(w.take(service).len(), 1);
    for i in 0..100u32 {
        w.publish(root, "secret.x", &i.to_le_bytes());
    }
    w.publish(root, "open.x", b"still");
    for call_id in 0..3 {
        let r = shmbus_proto::frame::Request {
            call_id,
            name: "svc.s",
            timeout_ms: 10_000,
            no_reply: false,
            origin: None,
            payload: PayloadRef::Inline,
        };
        w.bus.receive(caller, &encode_frame(&r, b"q").unwrap(), Vec::new(), w.now);
    }
    // Nothing of this has been sent yet; the rules change.
    let done = w.bus.reload_policy(
        Some(rules("[[rule]]\nmatch = {}\nallow = [\"connect\", \"subscribe open.>\", \"call svc.>\"]\n")),
        w.now,
    );
    assert_eq!((done.subscriptions, done.names), (1, 1));
    let got = w.take(reader);
    let delivered_secret =
        got.iter().filter(|f| matches!(f, BrokerFrame::Deliver(d, _) if d.sub_id == 1)).count();
    assert_eq!(delivered_secret, 0, "nothing queued for the revoked subscription is sent: {got:?}");
    assert!(
        got.iter().any(|f| matches!(f, BrokerFrame::Gap(g) if g.sub_id == 1 && g.missed == 100)),
        "{got:?}"
    );
    assert!(got.iter().any(|f| matches!(f, BrokerFrame::Revoked(_))), "{got:?}");
    assert!(got.iter().any(|f| matches!(f, BrokerFrame::Deliver(d, p) if d.sub_id == 2 && *p == b"still")));
    let served = w.take(service);
    assert!(!served.iter().any(|f| matches!(f, BrokerFrame::Serve(..))), "{served:?}");
    let answers: Vec<_> = w
        .take(caller)
        .into_iter()
        .filter_map(|f| match f {
            BrokerFrame::Answer(a, _) => Some(a.outcome),
            _ => None,
        })
        .collect();
    assert_eq!(answers.len(), 3, "each queued call is answered");
    assert!(answers.iter().all(|o| matches!(o, shmbus_proto::frame::Outcome::ResponderGone)), "{answers:?}");
}

/// Whether each of `ids` got a `Deliver` since last taken, in order.
fn got_deliver(w: &mut World, ids: &[PeerId]) -> Vec<usize> {
    ids.iter()
        .map(|&id| w.take(id).into_iter().filter(|f| matches!(f, BrokerFrame::Deliver(..))).count())
        .collect()
}

/// A publisher's remembered route does not outlive a reload that takes
/// its right to publish away: the access check runs on the remembered
/// subject too, with the new rules, and a reload that gives it back
/// lets the stream go on.
#[test]
fn a_remembered_route_does_not_survive_a_reload_that_revokes_the_publisher() {
    let allow = "[[rule]]\nmatch = {}\nallow = [\"connect\", \"subscribe s.>\", \"publish s.>\"]\n";
    let mut cfg = config();
    cfg.rules = Some(rules(allow));
    let mut w = World::new(cfg);
    let (a, b) = (w.join(1000), w.join(1001));
    w.subscribe(b, 1, "s.x");
    w.take(b);
    for _ in 0..3 {
        w.publish(a, "s.x", b"ok");
    }
    assert_eq!(got_deliver(&mut w, &[b]), [3]);
    w.bus.reload_policy(
        Some(rules("[[rule]]\nmatch = {}\nallow = [\"connect\", \"subscribe s.>\"]\n")),
        w.now,
    );
    w.take(b);
    w.publish(a, "s.x", b"revoked");
    assert_eq!(got_deliver(&mut w, &[b]), [0], "a revoked publisher's remembered route must not deliver");
    let refused = w.take(a);
    assert!(
        matches!(refused.as_slice(), [BrokerFrame::OpError(e)] if e.code == ErrorCode::Denied),
        "{refused:?}"
    );
    w.bus.reload_policy(Some(rules(allow)), w.now);
    w.publish(a, "s.x", b"again");
    assert_eq!(got_deliver(&mut w, &[b]), [1]);
}

/// A reload that revokes one subscriber's right to subscribe ends its
/// subscription, and the publisher's remembered route with it: the next
/// message goes to the others only.
#[test]
fn a_remembered_route_does_not_survive_a_reload_that_revokes_a_subscriber() {
    let mut cfg = config();
    cfg.rules =
        Some(rules("[[rule]]\nmatch = {}\nallow = [\"connect\", \"subscribe s.>\", \"publish s.>\"]\n"));
    let mut w = World::new(cfg);
    let (a, b, c) = (w.join(1000), w.join(1001), w.join(1002));
    w.subscribe(b, 1, "s.>");
    w.subscribe(c, 1, "s.x");
    w.take(b);
    w.take(c);
    w.publish(a, "s.x", b"1");
    w.publish(a, "s.x", b"2");
    assert_eq!(got_deliver(&mut w, &[b, c]), [2, 2]);
    let done = w.bus.reload_policy(
        Some(rules("[[rule]]\nmatch = {}\nallow = [\"connect\", \"subscribe s.x\", \"publish s.>\"]\n")),
        w.now,
    );
    assert_eq!(done.subscriptions, 1, "b's s.> is revoked, c's s.x stays");
    w.take(b);
    w.publish(a, "s.x", b"3");
    assert_eq!(got_deliver(&mut w, &[b, c]), [0, 1]);
}

/// After a good subject is remembered, subjects that fail the checks on
/// the subject alone (wildcards, empty tokens, `$SYS`, too long) are
/// refused each time, and the good one still goes.
#[test]
fn a_remembered_route_lets_no_bad_subject_through() {
    let mut w = World::new(config());
    let (a, b) = (w.join(1000), w.join(1001));
    w.subscribe(b, 1, ">");
    w.take(b);
    w.publish(a, "s.x", b"1");
    w.publish(a, "s.x", b"2");
    assert_eq!(got_deliver(&mut w, &[b]), [2]);
    let long = "s.".repeat(600);
    for bad in ["s.*", "s.>", ">", "*", "s.x.", ".s.x", "$SYS.x", "$SYS", long.as_str()] {
        w.publish(a, bad, b"bad");
        w.publish(a, "s.x", b"good");
        let frames = w.take(a);
        assert!(matches!(frames.as_slice(), [BrokerFrame::OpError(_)]), "{bad:?}: {frames:?}");
        assert_eq!(got_deliver(&mut w, &[b]), [1], "{bad:?}");
    }
}

/// A subscriber the remembered route names leaves; a new peer (a new id,
/// never the old one) subscribes with the same subscription id: the
/// stream goes to the new one only, and nothing is queued for the gone.
#[test]
fn a_remembered_route_naming_a_gone_peer_is_made_again() {
    let mut w = World::new(config());
    let (a, b) = (w.join(1000), w.join(1001));
    w.subscribe(b, 1, "s.x");
    w.take(b);
    w.publish(a, "s.x", b"1");
    assert_eq!(got_deliver(&mut w, &[b]), [1]);
    w.bus.hangup(b);
    w.bus.take_effects();
    w.publish(a, "s.x", b"to nobody");
    let c = w.join(1001);
    assert!(c > b);
    w.subscribe(c, 1, "s.x");
    w.take(c);
    w.publish(a, "s.x", b"2");
    assert_eq!(got_deliver(&mut w, &[c]), [1]);
    assert!(w.bus.peer(b).is_none());
}

/// Gap accounting is the same along a remembered route as along a walk:
/// a subscriber that reads nothing is told exactly how many it missed,
/// in order, however many of them came by the remembered route.
#[test]
fn a_remembered_route_counts_every_drop_in_the_gap() {
    let mut cfg = config();
    cfg.queue.frames = 4;
    let mut w = World::new(cfg);
    let (a, b) = (w.join(1000), w.join(1001));
    w.subscribe(b, 1, "s.x");
    w.take(b);
    for i in 0..100u32 {
        w.publish(a, "s.x", &i.to_le_bytes());
    }
    let frames = w.take(b);
    let delivered = frames.iter().filter(|f| matches!(f, BrokerFrame::Deliver(..))).count() as u64;
    let missed: u64 = frames
        .iter()
        .filter_map(|f| match f {
            BrokerFrame::Gap(g) => Some(g.missed),
            _ => None,
        })
        .sum();
    assert!(delivered < 100, "the queue bound held: {delivered}");
    assert_eq!(delivered + missed, 100, "{frames:?}");
}

/// Deciding a refused subscription against many rules is counted as work,
/// so the reactor's budget caps one peer's share of a loop turn.
#[test]
fn policy_decisions_count_as_work() {
    let mut text = String::from("[[rule]]\nmatch = {}\nallow = [\"connect\"]\n");
    for i in 0..1000 {
        text.push_str(&format!("[[rule]]\nmatch = {{}}\nallow = [\"subscribe app{i}.>\"]\n"));
    }
    let mut cfg = config();
    cfg.rules = Some(rules(&text));
    let mut w = World::new(cfg);
    let a = w.join(1000);
    let before = w.bus.work();
    w.subscribe(a, 1, "x.y.z");
    assert!(matches!(w.take(a).as_slice(), [BrokerFrame::OpError(e)] if e.code == ErrorCode::Denied));
    assert!(w.bus.work().wrapping_sub(before) >= 1000, "{}", w.bus.work().wrapping_sub(before));
}

/// A reload that takes a name from its owner and from the peer queued
/// behind it announces one change, to the final owner (nobody), never a
/// hand-over to a peer the new rules do not allow.
#[test]
fn a_reload_announces_only_the_final_owner_of_a_revoked_name() {
    let mut cfg = config();
    cfg.rules =
        Some(rules("[[rule]]\nmatch = {}\nallow = [\"connect\", \"own svc.>\", \"subscribe $SYS.>\"]\n"));
    let mut w = World::new(cfg);
    let (watcher, a, b) = (w.join(0), w.join(1000), w.join(1001));
    w.subscribe(watcher, 1, "$SYS.name.>");
    for (id, req_id) in [(a, 1), (b, 2)] {
        w.send(id, &shmbus_proto::frame::NameRequest { req_id, name: "svc.x", flags: Default::default() });
    }
    let events = |w: &mut World| -> Vec<(Option<u64>, Option<u64>)> {
        w.take(watcher)
            .into_iter()
            .filter_map(|f| match f {
                BrokerFrame::Deliver(_, p) => {
                    let c = shmbus_proto::frame::NameOwnerChanged::from_bytes(p).unwrap();
                    Some((c.old_owner, c.new_owner))
                }
                _ => None,
            })
            .collect()
    };
    assert_eq!(events(&mut w), vec![(None, Some(a))]);
    w.bus.reload_policy(
        Some(rules("[[rule]]\nmatch = {}\nallow = [\"connect\", \"subscribe $SYS.>\"]\n")),
        w.now,
    );
    assert_eq!(events(&mut w), vec![(Some(a), None)], "one change, to the final owner");
}

// ------------------------------------------------------------- links --

fn attach_effects(w: &mut World) -> Vec<(PeerId, u32)> {
    w.bus
        .take_effects()
        .into_iter()
        .filter_map(|e| match e {
            Effect::Attach(id, cap) => Some((id, cap)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_link_is_granted_only_right_after_hello_and_is_charged_as_ring_bytes() {
    use shmbus_proto::frame::{Attach, Op, Ping};
    use shmbus_proto::link::layout::DEFAULT_CAPACITY;
    use shmbus_proto::link::shm::link_bytes;
    let mut w = World::new(config());
    let a = w.join(1000);
    w.send(a, &Attach { capacity: 0 });
    assert_eq!(attach_effects(&mut w), vec![(a, DEFAULT_CAPACITY)]);
    assert!(w.bus.is_linked(a));
    assert_eq!(w.bus.held(1000, Resource::RingBytes), link_bytes(DEFAULT_CAPACITY));
    // A second Attach, or one after any other frame, is refused and the
    // connection stays.
    w.send(a, &Attach { capacity: 0 });
    let b = w.join(1000);
    w.send(b, &Ping { token: 1 });
    w.send(b, &Attach { capacity: 0 });
    assert!(attach_effects(&mut w).is_empty());
    for id in [a, b] {
        let frames = w.take(id);
        assert!(
            frames.iter().any(|f| matches!(f, BrokerFrame::OpError(e) if e.op == Op::Attach && e.code == ErrorCode::Unsupported)),
            "{frames:?}"
        );
    }
    assert!(!w.bus.is_linked(b));
    // The charge goes with the connection.
    w.bus.hangup(a);
    w.bus.take_effects();
    assert_eq!(w.bus.held(1000, Resource::RingBytes), 0);
}

#[test]
fn a_link_past_the_uid_ring_quota_or_of_a_bad_size_is_refused_and_the_socket_goes_on() {
    use shmbus_proto::frame::{Attach, Op};
    use shmbus_proto::link::layout::DEFAULT_CAPACITY;
    use shmbus_proto::link::shm::link_bytes;
    let mut cfg = config();
    cfg.uid_limits.set(Resource::RingBytes, link_bytes(DEFAULT_CAPACITY) + 1);
    let mut w = World::new(cfg);
    let a = w.join(7);
    w.send(a, &Attach { capacity: 0 });
    assert_eq!(attach_effects(&mut w).len(), 1);
    let b = w.join(7);
    w.send(b, &Attach { capacity: 0 });
    let c = w.join(7);
    w.send(c, &Attach { capacity: 300_000 });
    assert!(attach_effects(&mut w).is_empty());
    let refused = |frames: &[BrokerFrame<'_>], code: ErrorCode| {
        frames.iter().any(|f| matches!(f, BrokerFrame::OpError(e) if e.op == Op::Attach && e.code == code))
    };
    let fb = w.take(b);
    assert!(refused(&fb, ErrorCode::LimitExceeded), "{fb:?}");
    assert!(format!("{fb:?}").contains("--uid-ring-bytes"), "{fb:?}");
    assert!(refused(&w.take(c), ErrorCode::Unsupported));
    // The daemon could not make it: the charge is given back.
    w.bus.attach_failed(a, "no memory", w.now);
    assert!(!w.bus.is_linked(a));
    assert_eq!(w.bus.held(7, Resource::RingBytes), 0);
    assert!(refused(&w.take(a), ErrorCode::BrokerResource));
    // A broker without links says so.
    let mut cfg = config();
    cfg.link_capacity = None;
    let mut w = World::new(cfg);
    let d = w.join(7);
    w.send(d, &Attach { capacity: 0 });
    assert!(attach_effects(&mut w).is_empty());
    let fd = w.take(d);
    assert!(format!("{fd:?}").contains("--no-shared-memory"), "{fd:?}");
}

#[test]
fn a_monitor_event_always_fits_a_packet_and_says_what_it_left_out() {
    use shmbus_proto::frame::{Monitor, MonitorEvent, MonitorKind};
    use shmbus_proto::limits::MAX_PACKET;
    let mut cfg = config();
    cfg.uid_limits.set(Resource::Connections, 10_000);
    let mut w = World::new(cfg);
    let mon = w.join(0);
    w.send(mon, &Monitor { sub_id: 1, patterns: Vec::new(), full: true });
    assert!(matches!(w.take(mon).as_slice(), [BrokerFrame::Subscribed(_)]));
    // More receivers than an event lists, beside a whole 64 KiB payload
    // the monitor asked for: together more than a packet.
    let receivers = super::monitor::MAX_MONITOR_RECEIVERS + 5;
    for _ in 0..receivers {
        let s = w.join(1);
        w.subscribe(s, 1, "big.x");
        w.take(s);
        // The monitor sees each join and subscription: kept read.
        w.take(mon);
    }
    let payload = vec![7u8; 64 * 1024];
    let publisher = w.join(2);
    w.publish(publisher, "big.x", &payload);
    let mut event = None;
    loop {
        let frames = w.bus.sendable(mon, 64);
        if frames.is_empty() {
            break;
        }
        let n = frames.len();
        for f in &frames {
            let len = f.head.len() + f.payload.as_ref().map_or(0, |p| p.len());
            assert!(len <= MAX_PACKET, "a frame of {len} bytes");
            let mut bytes = f.head.clone();
            bytes.extend_from_slice(f.payload.as_deref().unwrap_or(&[]));
            if let BrokerFrame::Deliver(_, p) = decode_broker(&bytes).unwrap() {
                let e = MonitorEvent::from_bytes(p).unwrap();
                if e.kind == MonitorKind::Publish {
                    event = Some(e);
                }
            }
        }
        w.bus.sent(mon, n, w.now);
    }
    let e = event.expect("the publish was seen, not dropped");
    assert_eq!(e.receivers.len(), super::monitor::MAX_MONITOR_RECEIVERS);
    assert!(e.detail.contains("(5 more receivers not listed)"), "{}", e.detail);
    // The whole payload did not fit beside them: the excerpt came, and
    // the length says what the payload was.
    assert_eq!(e.payload.len(), shmbus_proto::frame::MONITOR_EXCERPT);
    assert_eq!(e.payload_len, 64 * 1024);
}

#[test]
fn a_delivery_whose_frame_cannot_be_made_is_a_counted_gap() {
    let mut w = World::new(config());
    let sub = w.join(1);
    w.subscribe(sub, 3, "gap.x");
    w.take(sub);
    // A maker that fails (a frame larger than a packet would): the loss
    // is told as a gap, where a delivery would have been.
    w.bus.deliver(sub, 3, (64, 0, None), |_| None, w.now);
    w.publish(sub, "gap.x", b"after");
    let got = w.take(sub);
    assert!(matches!(got.first(), Some(BrokerFrame::Gap(g)) if g.sub_id == 3 && g.missed == 1), "{got:?}");
    assert!(matches!(got.get(1), Some(BrokerFrame::Deliver(d, b"after")) if d.sub_id == 3), "{got:?}");
}

#[test]
fn every_log_line_left_out_is_reported_by_a_later_one() {
    let mut w = World::new(config());
    let t0 = w.now;
    let (mut left_out, mut reported) = (0u64, 0u64);
    let mut line = |w: &mut World, uid: u32| match w.bus.log_gate(Some(uid)) {
        Some(n) => reported += n,
        None => left_out += 1,
    };
    // uid 1 floods: its own limiter (20 a window) leaves 5 out.
    w.bus.log.see(t0);
    for _ in 0..25 {
        line(&mut w, 1);
    }
    // A new window: ten other uids use the whole wide allowance (200)
    // first, then uid 1's next line passes its own limiter (carrying its
    // 5) but not the wide one.
    w.bus.log.see(t0 + Duration::from_secs(10));
    for uid in 2..12 {
        for _ in 0..20 {
            line(&mut w, uid);
        }
    }
    line(&mut w, 1);
    // The next window's first line says all that was left out.
    w.bus.log.see(t0 + Duration::from_secs(20));
    line(&mut w, 12);
    assert_eq!(left_out, 6);
    assert_eq!(reported, left_out, "every line left out is reported once");
    assert_eq!(w.bus.stats(t0).log_suppressed, left_out);
}
