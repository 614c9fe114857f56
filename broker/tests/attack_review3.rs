//! A third review as a hostile local user: names and services, the
//! shared-memory link's order and accounting, and what each part allows
//! alone but not together. Each test here once failed on the code it was
//! written against, for the reason its comment gives.
//!
//! Every wait is bounded; the broker is killed on drop.

mod common;

use std::time::Duration;

use common::*;
use shmbus_proto::frame::{BrokerFrame, GetNameOwner, NameFlags, NameRequest, NameResult, Ping};

/// Asks for `name` with `flags`; returns the result.
fn ask(r: &mut Raw, req_id: u32, name: &str, flags: NameFlags) -> NameResult {
    r.send_body(&NameRequest { req_id, name, flags }, &[]);
    loop {
        match r.recv() {
            Some(BrokerFrame::NameReply(n)) if n.req_id == req_id => return n.result,
            Some(BrokerFrame::OpError(e)) => panic!("name request refused: {e:?}"),
            Some(_) => continue,
            None => panic!("the broker closed the connection"),
        }
    }
}

/// Every frame `r` receives before the `Pong` for `token` (which it asks
/// for now), as debug text.
fn frames_before_pong(r: &mut Raw, token: u64) -> Vec<String> {
    r.send_body(&Ping { token }, &[]);
    let mut seen = Vec::new();
    loop {
        match r.recv() {
            Some(BrokerFrame::Pong(p)) if p.token == token => return seen,
            Some(f) => seen.push(format!("{f:?}")),
            None => panic!("the broker closed the connection; saw {seen:?}"),
        }
    }
}

/// The primary owner of `name` and its member count, asked by `r`.
fn owner(r: &mut Raw, req_id: u32, name: &str) -> (Option<u64>, u32) {
    r.send_body(&GetNameOwner { req_id, name }, &[]);
    loop {
        match r.recv() {
            Some(BrokerFrame::NameOwner(o)) if o.req_id == req_id => return (o.owner, o.members),
            Some(_) => continue,
            None => panic!("the broker closed the connection"),
        }
    }
}

fn hup(b: &Broker) {
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(b.pid() as i32).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
}

const EXCL: NameFlags =
    NameFlags { allow_replacement: false, replace_existing: false, do_not_queue: false, shared: false };

/// A peer that waited in a name's queue and left it by asking again with
/// `do_not_queue` (`Exists`, "and the asker leaves the queue if it was in
/// it", §14.1) holds nothing of the name. Yet the broker kept the name in
/// the peer's own list of held names (`Peer::names`: only `PrimaryOwner`
/// and `InQueue` answers touch it, `bus/service.rs`, `name_request`), so a
/// policy reload that no longer allows the name sent it a `Revoked` for a
/// name it did not hold, and counted it among the names it ended. The
/// control: a peer still in the queue is told, as it must be.
#[test]
fn a_peer_that_left_a_name_queue_is_not_told_the_name_was_revoked() {
    if !needs_root("a_peer_that_left_a_name_queue_is_not_told_the_name_was_revoked") {
        return;
    }
    let dir = TempDir::new("review3-revoke");
    let path = dir.join("policy.toml");
    std::fs::write(&path, "[[rule]]\nmatch = {}\nallow = [\"connect\", \"own svc.>\"]\n").unwrap();
    let b = Broker::launch(
        "review3-revoke",
        Launch::new().args(&["--policy", path.to_str().unwrap(), "--log-level", "info"]).capture_log(),
    );
    let mut holder = raw_as(&b, 4301, "holder");
    let mut left = raw_as(&b, 4302, "left-the-queue");
    let mut waiting = raw_as(&b, 4303, "still-waiting");
    assert_eq!(ask(&mut holder, 1, "svc.x", EXCL), NameResult::PrimaryOwner);
    assert_eq!(ask(&mut left, 1, "svc.x", EXCL), NameResult::InQueue);
    assert_eq!(ask(&mut waiting, 1, "svc.x", EXCL), NameResult::InQueue);
    let no_queue = NameFlags { do_not_queue: true, ..EXCL };
    assert_eq!(ask(&mut left, 2, "svc.x", no_queue), NameResult::Exists, "and it left the queue");
    assert_eq!(owner(&mut left, 3, "svc.x"), (Some(holder_id(&mut holder)), 1));

    std::fs::write(&path, "[[rule]]\nmatch = {}\nallow = [\"connect\"]\n").unwrap();
    hup(&b);
    let log = b.wait_log("policy reloaded");
    let told_waiting = frames_before_pong(&mut waiting, 10);
    assert!(
        told_waiting.iter().any(|f| f.contains("Revoked") && f.contains("svc.x")),
        "control: a peer in the queue is told its place was revoked: {told_waiting:?}"
    );
    let told_left = frames_before_pong(&mut left, 10);
    let revoked: Vec<&String> = told_left.iter().filter(|f| f.contains("Revoked")).collect();
    assert!(
        revoked.is_empty(),
        "a peer that holds no place for svc.x was told it was revoked: {revoked:?}; log: {}",
        log.lines().filter(|l| l.contains("policy reloaded")).collect::<Vec<_>>().join(" | ")
    );
    assert!(
        log.lines().any(|l| l.contains("policy reloaded") && l.contains(" 2 names")),
        "the owner and the waiter lost svc.x, two names: {log}"
    );
}

/// The client id of `r`, from the broker's own answer (its `Welcome` was
/// read by `raw_as`): asked through a name it owns.
fn holder_id(r: &mut Raw) -> u64 {
    owner(r, 99, "svc.x").0.expect("the holder owns svc.x")
}

/// The largest file tmpfs makes (`MAX_LFS_FILESIZE`): a memfd this long
/// costs its maker nothing (no page is ever touched).
const SPARSE_MAX: u64 = i64::MAX as u64;

/// A sealed memfd of `len` bytes, none of them written.
fn sparse_memfd(len: u64) -> std::os::fd::OwnedFd {
    let fd = shmbus_proto::sys::memfd::create("review3", len).expect("a memfd");
    shmbus_proto::sys::memfd::seal(std::os::fd::AsFd::as_fd(&fd)).expect("sealed");
    fd
}

/// A service answers three calls of one caller, which has not read them
/// yet, each with a sealed memfd of `len` bytes. Whether the broker still
/// answers a bystander afterwards; its log.
fn three_memfd_answers(tag: &str, len: u64) -> (bool, String) {
    use shmbus_proto::frame::{PayloadRef, Reply, ReplyStatus, Request};
    use std::os::fd::AsFd;
    let b = Broker::launch(tag, Launch::new().capture_log());
    let mut svc = Raw::hello_named(&b, "hostile-service").0;
    assert_eq!(ask(&mut svc, 1, "svc.huge", EXCL), NameResult::PrimaryOwner);
    let caller = Raw::hello_named(&b, "caller").0;
    let mut bystander = Raw::hello_named(&b, "bystander").0;
    for call_id in 1..=3 {
        let req = Request {
            call_id,
            name: "svc.huge",
            timeout_ms: 10_000,
            no_reply: false,
            origin: None,
            payload: PayloadRef::Inline,
        };
        caller.send_body(&req, &[]);
    }
    let mut serials = Vec::new();
    while serials.len() < 3 {
        match svc.recv() {
            Some(BrokerFrame::Serve(s, _)) => serials.push(s.serial),
            Some(_) => continue,
            None => panic!("the service was cut off"),
        }
    }
    for serial in serials {
        let fd = sparse_memfd(len);
        let reply = Reply { serial, status: ReplyStatus::Ok, payload: PayloadRef::Memfd { len } };
        svc.send_body(&reply, &[fd.as_fd()]);
    }
    // The caller reads nothing yet: its three answers wait in its queue.
    bystander.send_body(&Ping { token: 5 }, &[]);
    let alive = loop {
        match bystander.recv_packet(Duration::from_secs(5)) {
            Some(p) if p.is_eof() => break false,
            Some(p) if matches!(p.frame(), Some(BrokerFrame::Pong(_))) => break true,
            Some(_) => continue,
            None => break false,
        }
    };
    drop(caller);
    (alive, b.log())
}

/// A memfd payload's declared length is checked against the memfd's size
/// (`fstat`), and tmpfs makes sparse files up to 2^63 − 1 bytes at no
/// cost. Deliveries and requests are held to the receiver's memfd quota
/// (`delivery_room`), but an `Answer` is a control frame
/// (`Bus::push_answer` → `OutQueue::push_control`, which looks at bytes,
/// frames and fds only): a reply's memfd of any size is queued, and its
/// length added to the caller queue's `memfd_bytes` with a plain `+=`
/// (`OutQueue::charge`). Three such answers waiting for one caller
/// overflow it: the broker (as the tests build it) panicked, "attempt to
/// add with overflow", and every client lost its bus. (Built for release
/// the sum wraps instead, and the uid's `MemfdBytes`, a saturating count,
/// no longer comes back to what it held: a caller that leaves with such
/// answers queued leaves its uid charged beyond its quota, so none of its
/// connections is given a memfd payload again.) The control: the same
/// three answers with 4 KiB memfds.
#[test]
fn a_service_answering_with_huge_sparse_memfds_does_not_break_the_broker() {
    let (alive, log) = three_memfd_answers("review3-memfd-small", 4096);
    assert!(alive, "control: three 4 KiB answers; the broker's log:\n{log}");
    let (alive, log) = three_memfd_answers("review3-memfd-huge", SPARSE_MAX);
    assert!(alive, "three answers of 2^63 - 1 bytes each broke the broker; its log:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// The same unbounded length, through a configuration the broker takes:
/// `--memfd-quota-bytes 18446744073709551615`, "no limit" on memfd bytes
/// queued per uid. Two sparse memfds of 2^63 − 1 bytes and one small
/// inline message, published to one subscriber, go out in one flush, and
/// `Bus::sent` adds their bytes with a plain `+=` (`bytes_out`): the
/// broker panicked, "attempt to add with overflow". The control: the same
/// publishes with 4 KiB memfds.
#[test]
fn huge_sparse_memfds_under_an_unlimited_memfd_quota_do_not_break_the_broker() {
    use shmbus_proto::frame::{encode_frame, encode_head, Overflow, PayloadRef, Publish, Subscribe};
    use std::os::fd::AsFd;
    let run = |tag: &str, len: u64| -> (bool, String) {
        let b = Broker::launch(
            tag,
            Launch::new().args(&["--memfd-quota-bytes", &u64::MAX.to_string()]).capture_log(),
        );
        let mut sub = Raw::hello_named(&b, "subscriber").0;
        sub.send_body(&Subscribe { sub_id: 1, pattern: "big.>", overflow: Overflow::Gap }, &[]);
        assert!(matches!(sub.recv(), Some(BrokerFrame::Subscribed(_))));
        let publisher = Raw::hello_named(&b, "publisher").0;
        let mut bystander = Raw::hello_named(&b, "bystander").0;
        let fds = [sparse_memfd(len), sparse_memfd(len)];
        let head = encode_head(&Publish { topic: "big.a", origin: None, payload: PayloadRef::Memfd { len } })
            .unwrap();
        for fd in &fds {
            publisher.send(&head, &[fd.as_fd()]);
        }
        let small =
            encode_frame(&Publish { topic: "big.b", origin: None, payload: PayloadRef::Inline }, b"tail")
                .unwrap();
        publisher.send(&small, &[]);
        // The subscriber takes what it is sent (three deliveries), or
        // the end of its connection.
        let mut delivered = 0;
        while delivered < 3 {
            match sub.recv_packet(Duration::from_secs(5)) {
                Some(p) if p.is_eof() => break,
                Some(p) if matches!(p.frame(), Some(BrokerFrame::Deliver(..))) => delivered += 1,
                Some(_) => continue,
                None => break,
            }
        }
        bystander.send_body(&Ping { token: 6 }, &[]);
        let alive = loop {
            match bystander.recv_packet(Duration::from_secs(5)) {
                Some(p) if p.is_eof() => break false,
                Some(p) if matches!(p.frame(), Some(BrokerFrame::Pong(_))) => break true,
                Some(_) => continue,
                None => break false,
            }
        };
        (alive, b.log())
    };
    let (alive, log) = run("review3-quota-small", 4096);
    assert!(alive, "control: 4 KiB memfds; the broker's log:\n{log}");
    let (alive, log) = run("review3-quota-huge", SPARSE_MAX);
    assert!(alive, "two memfds of 2^63 - 1 bytes broke the broker; its log:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
}

/// `n` subscriptions to `pattern` on a new connection (ids 1..=n), all
/// confirmed; the connection reads nothing after.
fn subscriber(b: &Broker, pattern: &str, n: u32) -> Raw {
    use shmbus_proto::frame::{Overflow, Subscribe};
    let mut r = Raw::hello_named(b, "many-subscriptions").0;
    for sub_id in 1..=n {
        r.send_body(&Subscribe { sub_id, pattern, overflow: Overflow::Gap }, &[]);
    }
    let mut confirmed = 0;
    while confirmed < n {
        match r.recv() {
            Some(BrokerFrame::Subscribed(_)) => confirmed += 1,
            Some(BrokerFrame::OpError(e)) => panic!("subscription refused: {e:?}"),
            Some(_) => continue,
            None => panic!("the subscriber was cut off"),
        }
    }
    r
}

/// Hello, then at once `Attach`, (`heavy`) four publishes that fan out
/// to 16,384 subscriptions each, 25 memfd publishes (one sealed fd each)
/// and a `Ping`. Returns the broker's fd count beyond `baseline` once the
/// link is up and the broker idle, and what the connection was told, on
/// the socket and in the ring (where it sends a `Ping` of its own).
fn attach_behind_a_spent_budget(b: &Broker, baseline: usize, heavy: bool, busy: &Raw) -> (usize, String) {
    use shmbus_proto::frame::{encode_frame, encode_head, Attach, PayloadRef, Publish};
    use shmbus_proto::sys::socket::{send_packets, OutPacket};
    use std::os::fd::AsFd;
    let (mut r, _) = Raw::hello_named(b, "attacher");
    let attach = encode_head(&Attach { capacity: 0 }).unwrap();
    let fan_out =
        encode_frame(&Publish { topic: "w.x", origin: None, payload: PayloadRef::Inline }, b"x").unwrap();
    let memfd_publish =
        encode_head(&Publish { topic: "m.x", origin: None, payload: PayloadRef::Memfd { len: 1 } }).unwrap();
    let ping = encode_head(&Ping { token: 77 }).unwrap();
    let memfds: Vec<_> =
        (0..25).map(|_| shmbus_proto::sys::memfd::from_bytes("review3", b"m").unwrap()).collect();
    let fd_lists: Vec<[std::os::fd::BorrowedFd<'_>; 1]> = memfds.iter().map(|m| [m.as_fd()]).collect();
    let mut packets: Vec<OutPacket<'_>> = Vec::new();
    packets.push(OutPacket { head: &attach, payload: &[], fds: &[] });
    if heavy {
        for _ in 0..4 {
            packets.push(OutPacket { head: &fan_out, payload: &[], fds: &[] });
        }
    }
    for fds in &fd_lists {
        packets.push(OutPacket { head: &memfd_publish, payload: &[], fds });
    }
    packets.push(OutPacket { head: &ping, payload: &[], fds: &[] });
    // Another connection keeps the broker busy for a moment (fan-outs of
    // its own), so that the whole burst is in the socket when it is read.
    for _ in 0..3 {
        busy.send(&fan_out, &[]);
    }
    let sent = send_packets(r.fd.as_fd(), &packets, false).unwrap();
    assert_eq!(sent, packets.len(), "one sendmmsg");
    drop(fd_lists);
    drop(memfds);
    // Whatever comes on the socket: the Pong, the Attached (then the rest
    // is in the ring), or a goodbye.
    let mut seen = Vec::new();
    let mut attached = None;
    while let Some(p) = r.recv_packet(Duration::from_secs(2)) {
        if p.is_eof() {
            seen.push("end of stream".to_string());
            break;
        }
        match p.frame() {
            Some(BrokerFrame::Attached(a)) => {
                attached = Some((a.capacity, p.fds));
                break;
            }
            Some(f) => seen.push(format!("{f:?}")),
            None => {}
        }
    }
    if let Some((capacity, fds)) = attached {
        let map = shmbus_proto::link::shm::attach(capacity, fds[0].as_fd(), fds[1].as_fd()).unwrap();
        let mut consumer = shmbus_proto::link::Consumer::new(capacity);
        // The connection lives on: a Ping through the ring is answered.
        let mut producer = shmbus_proto::link::Producer::new(capacity);
        let ring_ping = encode_head(&Ping { token: 78 }).unwrap();
        let kind = shmbus_proto::link::RecordKind::Frame;
        assert!(producer.try_push(map.peer(), map.my_data(), kind, &[&ring_ping]).unwrap());
        producer.publish(map.mine());
        if producer.must_ring(map.peer()) {
            r.send_body(&shmbus_proto::frame::Doorbell, &[]);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            let mut buf = Vec::new();
            match consumer.next(map.peer(), map.peer_data(), &mut buf).unwrap() {
                Some(_) => seen.push(format!("{:?}", shmbus_proto::frame::decode_broker(&buf))),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        consumer.commit(map.mine());
    }
    std::thread::sleep(Duration::from_millis(300));
    let held = b.fd_count().saturating_sub(baseline + 1);
    // Keep the connection open until counted.
    drop(r);
    (held, seen.join(" | "))
}

/// A linked connection's socket is read one packet at a time, stopping at
/// a packet with fds, so that "a client can make the broker hold at most
/// one packet's fds (4)" (§15.7, `daemon/link.rs`). But packets received
/// before the link existed and left over by the work budget
/// (`Conn::pending`, `Reactor::read_conn`) are never looked at once the
/// connection is linked: `read_conn` goes straight to the link's socket
/// event. `Attach` only makes the link at `apply_effects`, after the
/// turn's reads (`read_again` included): a burst of `Attach`, four
/// publishes fanning out to 16 Ki subscriptions each (the uid's default
/// subscription quota; two spend a read's `WORK_BUDGET`, 32 Ki
/// deliveries, and the turn reads the connection twice), then more
/// packets, leaves those packets parked for the life of the connection.
/// Their fds stay open in the broker (25 here; up to 4 per packet and
/// some 27 packets per connection, so about 27,000 for one uid's 256
/// connections, in the fd table every client shares), and their frames
/// are neither handled nor refused: the `Ping` among them is never
/// answered, and the connection goes on (a `Ping` in its ring is
/// answered). The control: the same burst without the heavy publishes
/// is read before the link is made, answered, and leaves no fd behind.
/// Fixed: packets left over when the link would be made make the broker
/// refuse the link (`Attach` answered with an `OpError`), and they are
/// read on the socket as any other.
#[test]
fn packets_left_over_by_the_budget_before_a_link_are_not_parked_forever() {
    let b = Broker::launch("review3-pending", Launch::new().capture_log());
    let _subscribers: Vec<Raw> = (0..4).map(|_| subscriber(&b, "w.x", 4096)).collect();
    let baseline = b.baseline_fds() + 1;
    let busy = Raw::hello_named(&b, "busy").0;
    let (held, seen) = attach_behind_a_spent_budget(&b, baseline, false, &busy);
    assert!(held == 0 && seen.contains("token: 77"), "control: {held} fds held; saw {seen}; log {}", b.log());
    let baseline = b.baseline_fds();
    let (held, seen) = attach_behind_a_spent_budget(&b, baseline, true, &busy);
    // The broker refuses the link (the client did not wait for the
    // answer to its `Attach`, §15.1) and reads those packets on the
    // socket; or, had it made the link, a `Ping` in the ring is answered.
    let refused = seen.contains("op: Attach");
    assert!(refused || seen.contains("token: 78"), "the connection lives on: {seen}");
    let answered = seen.contains("token: 77") || seen.contains("Goodbye") || seen.contains("end of stream");
    assert!(
        held <= 4 && answered,
        "the broker holds {held} fds of the linked connection's unread packets (at most 4 promised), and \
         its Ping was {}; it saw: {seen}",
        if answered { "answered" } else { "neither answered nor refused" }
    );
}
