//! Large payloads as sealed memfds: zero-copy publish and fan-out, the
//! broker's and the client's checks, fd hygiene, quotas.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use shmbus::Event;
use shmbus_proto::frame::{
    encode_frame, encode_head, BrokerFrame, Deliver, ErrorCode, Op, PayloadRef, Ping, Publish, Sender,
    Welcome,
};
use shmbus_proto::sys::memfd;

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[1] ^ salt).collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100000001b3))
}

#[test]
fn large_payload_reaches_several_processes_byte_exact() {
    let b = Broker::start("bigfan");
    let c = b.client();
    let here = c.subscribe("big").unwrap();
    let mut kids = Vec::new();
    for _ in 0..3 {
        let mut cmd = Command::new(SHMBUSCTL);
        cmd.args(["--address", &b.address, "sub", "big", "--raw", "--count", "1"]);
        kids.push(spawn_guarded(cmd));
    }
    wait_subscribers(&c, "big", 4);
    const LEN: usize = 24 * 1024 * 1024 + 17;
    let mut loan = c.loan(LEN).unwrap();
    let want = pattern(LEN, 0x5a);
    loan.copy_from_slice(&want);
    c.publish_loan("big", loan).unwrap();
    let m = next_message(&here);
    assert!(m.is_memfd());
    assert_eq!(m.len(), LEN);
    assert_eq!(fnv1a(m.payload()), fnv1a(&want));
    for k in kids {
        let out = k.wait_output();
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(out.stdout.len(), LEN);
        assert_eq!(fnv1a(&out.stdout), fnv1a(&want), "a subscriber process got different bytes");
    }
    let st = c.stats().unwrap();
    assert_eq!(st.bytes_out, 4 * LEN as u64);
}

#[test]
fn publish_switches_to_memfd_above_the_threshold_and_ctl_sends_files() {
    let b = Broker::start("threshold");
    let c = b.client();
    let s = c.subscribe("t").unwrap();
    let small = pattern(shmbus::DEFAULT_MEMFD_THRESHOLD, 1);
    let large = pattern(shmbus::DEFAULT_MEMFD_THRESHOLD + 1, 2);
    let huge = pattern(3 * 1024 * 1024, 3);
    c.publish("t", &small).unwrap();
    c.publish("t", &large).unwrap();
    c.publish("t", &huge).unwrap();
    let m = next_message(&s);
    assert!(!m.is_memfd());
    assert_eq!(m.payload(), &small[..]);
    let m = next_message(&s);
    assert!(m.is_memfd());
    assert_eq!(m.payload(), &large[..]);
    let m = next_message(&s);
    assert_eq!(m.payload(), &huge[..]);

    // A per-client threshold.
    let eager = shmbus::Client::options()
        .address(shmbus::Address::parse(&b.address).unwrap())
        .memfd_threshold(1000)
        .connect()
        .unwrap();
    eager.publish("t", &small[..1000]).unwrap();
    eager.publish("t", &small[..1001]).unwrap();
    assert!(!next_message(&s).is_memfd());
    let m = next_message(&s);
    assert!(m.is_memfd());
    assert_eq!(m.payload(), &small[..1001]);

    // shmbusctl pub --file sends a large file by memfd.
    let dir = TempDir::new("memfd");
    let file = dir.join("f");
    std::fs::write(&file, &huge).unwrap();
    let out = b.ctl(&["pub", "t", "--file", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = next_message(&s);
    assert!(m.is_memfd());
    assert_eq!(fnv1a(m.payload()), fnv1a(&huge));
}

#[test]
fn into_fd_forwards_without_mapping_and_publish_fd_checks_seals() {
    let b = Broker::start("forward");
    let c = b.client();
    let a = c.subscribe("a").unwrap();
    let z = c.subscribe("z").unwrap();
    let data = pattern(200_000, 9);
    c.publish("a", &data).unwrap();
    let fd = next_message(&a).into_fd().unwrap();
    c.publish_fd("z", &fd).unwrap();
    assert_eq!(fnv1a(next_message(&z).payload()), fnv1a(&data));
    // An inline message becomes a sealed memfd too.
    c.publish("a", b"tiny").unwrap();
    let fd = next_message(&a).into_fd().unwrap();
    assert_eq!(memfd::sealed_len(fd.as_fd()).unwrap(), 4);
    // publish_fd refuses what is not a sealed memfd, before sending.
    let unsealed = memfd::create("x", 10).unwrap();
    assert!(matches!(
        c.publish_fd("z", &unsealed),
        Err(shmbus::PublishError::Fd(shmbus::MemfdError::NotSealed))
    ));
}

/// Every refusal the broker makes for a memfd publish, from a raw socket:
/// the error names the reason, the fd is closed, the connection goes on,
/// and other clients are unaffected.
#[test]
fn broker_refuses_bad_fds_per_publish_and_keeps_the_connection() {
    let b = Broker::start("refuse");
    let bystander = b.client();
    let watch = bystander.subscribe("ok").unwrap();
    let baseline = b.baseline_fds();
    let mut r = Raw::hello(&b);
    let (pipe_r, _pipe_w) = rustix::pipe::pipe().unwrap();
    let unsealed = memfd::create("u", 4096).unwrap();
    let partly = memfd::create("p", 4096).unwrap();
    rustix::fs::fcntl_add_seals(&partly, rustix::fs::SealFlags::WRITE).unwrap();
    let good = memfd::from_bytes("g", &[7; 4096]).unwrap();
    let publish = |len| {
        encode_head(&Publish { topic: "ok", origin: None, payload: PayloadRef::Memfd { len } }).unwrap()
    };

    let cases: Vec<(&str, Vec<u8>, Vec<&OwnedFd>, ErrorCode)> = vec![
        ("pipe", publish(0), vec![&pipe_r], ErrorCode::NotMemfd),
        ("unsealed", publish(4096), vec![&unsealed], ErrorCode::NotSealed),
        ("write seal only", publish(4096), vec![&partly], ErrorCode::NotSealed),
        ("size mismatch", publish(4095), vec![&good], ErrorCode::SizeMismatch),
        ("too many fds", publish(4096), vec![&good, &good], ErrorCode::WrongFdCount),
        ("no fd", publish(4096), vec![], ErrorCode::WrongFdCount),
    ];
    for (i, (what, frame, fds, code)) in cases.iter().enumerate() {
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        r.send(frame, &borrowed);
        match r.recv() {
            Some(BrokerFrame::OpError(e)) => {
                assert_eq!(e.op, Op::Publish { seq: i as u64 + 1 }, "{what}");
                assert_eq!(e.code, *code, "{what}: {}", e.message);
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    // The same connection still publishes, inline and by memfd.
    r.send(
        &encode_frame(&Publish { topic: "ok", origin: None, payload: PayloadRef::Inline }, b"inline")
            .unwrap(),
        &[],
    );
    r.send(&publish(4096), &[good.as_fd()]);
    r.send(&encode_head(&Ping { token: 3 }).unwrap(), &[]);
    assert!(matches!(r.recv(), Some(BrokerFrame::Pong(p)) if p.token == 3));
    assert_eq!(next_message(&watch).payload(), b"inline");
    assert_eq!(next_message(&watch).payload(), &[7; 4096][..]);
    drop(r);
    // No refused fd stayed open in the broker.
    b.wait_fd_count(baseline);
}

#[test]
fn ten_thousand_memfd_publishes_leave_no_fd_behind() {
    let b = Broker::start("storm");
    let c = b.client();
    let s1 = c.subscribe("storm").unwrap();
    let other = b.client();
    let s2 = other.subscribe("storm.>").unwrap();
    let _s3 = other.subscribe("storm").unwrap();
    let baseline = b.baseline_fds();
    let p = b.client();
    let fd = memfd::from_bytes("storm", &[1; 8192]).unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = 0;
        while got < 10_000 {
            match s1.recv_timeout(PATIENCE).unwrap().expect("storm stalled") {
                Event::Message(m) => {
                    assert_eq!(m.payload()[8191], 1);
                    got += 1;
                }
                Event::Reconnected => panic!("unexpected reconnection"),
                Event::Gap { missed } => got += missed,
            }
        }
    });
    for _ in 0..10_000 {
        p.publish_fd("storm", &fd).unwrap();
    }
    p.flush().unwrap();
    reader.join().unwrap();
    drop(s2);
    // _s3 never read: its queue drops and gaps, and the fds it held go when
    // its client goes.
    drop(_s3);
    drop(other);
    b.wait_fd_count(baseline);
}

#[test]
fn a_subscriber_that_crashes_holding_mappings_leaks_nothing() {
    let b = Broker::start("crash");
    let c = b.client();
    let baseline = b.baseline_fds();
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &b.address, "sub", "crash", "--raw"]);
    let mut kid = spawn_guarded(cmd);
    wait_subscribers(&c, "crash", 1);
    // Big payloads, more than it will read before it dies.
    let data = pattern(4 * 1024 * 1024, 4);
    for _ in 0..20 {
        c.publish("crash", &data).unwrap();
    }
    c.flush().unwrap();
    // Kill it while it holds mappings and more are queued for it.
    let child = kid.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    while c.stats().unwrap().clients != 1 {
        assert!(start.elapsed() < PATIENCE, "the broker never noticed the crash");
        std::thread::sleep(Duration::from_millis(10));
    }
    b.wait_fd_count(baseline);
}

/// Payloads waiting for a subscriber that does not read are charged to
/// the subscriber's uid, not the publisher's: the broker holds at most the
/// subscriber's quota of them, the rest reach it as a counted gap, and the
/// publisher is never refused for what another connection does not read.
#[test]
fn quota_bounds_what_one_uid_keeps_in_the_broker() {
    let b = Broker::start_with("quota", &["--memfd-quota-fds", "8", "--fd-window", "4"]);
    let baseline = b.baseline_fds();
    let slow = b.client();
    let sub = slow.subscribe("q").unwrap();
    let p = b.client();
    let fd = memfd::from_bytes("q", &[5; 100]).unwrap();
    for _ in 0..3000 {
        p.publish_fd("q", &fd).unwrap();
    }
    p.flush().expect("the publisher is not refused for a slow subscriber");
    // The subscriber has read nothing: besides the two connections' sockets
    // the broker holds at most 8 of its payloads (each a received fd),
    // however many were published.
    let held = b.fd_count().saturating_sub(baseline);
    assert!(held <= 2 + 8, "the broker holds {held} fds for a non-reader with a quota of 8");
    // Everything published is accounted for: delivered or in a gap.
    let mut seen = 0;
    let mut gaps = 0;
    while seen < 3000 {
        match sub.recv_timeout(PATIENCE).unwrap() {
            Some(shmbus::Event::Message(m)) => {
                assert_eq!(m.payload(), &[5; 100][..]);
                seen += 1;
            }
            Some(shmbus::Event::Reconnected) => panic!("unexpected reconnection"),
            Some(shmbus::Event::Gap { missed }) => {
                seen += missed;
                gaps += missed;
            }
            None => panic!("{seen} of 3000 accounted for after {PATIENCE:?}"),
        }
    }
    assert_eq!(seen, 3000);
    assert!(gaps > 0);
    // Once drained, the quota is free.
    p.publish_fd("q", &fd).unwrap();
    p.flush().unwrap();
    assert_eq!(next_message(&sub).payload(), &[5; 100][..]);
}

/// A client of the fake broker below, which speaks the socket transport
/// only (these tests are about what the client accepts from its broker,
/// whichever way it came).
fn socket_client(addr: &str) -> shmbus::Client {
    shmbus::ConnectOptions::new()
        .address(shmbus::Address::parse(addr).unwrap())
        .shared_memory(false)
        .connect()
        .unwrap()
}

/// A fake broker on its own thread: welcomes one client, acknowledges its
/// subscription (sub id 1), delivers `payloads` (an fd and the length it
/// declares for it) with seq 1, 2, …, then waits a moment.
fn fake_broker(payloads: Vec<(OwnedFd, u64)>) -> (String, std::thread::JoinHandle<()>) {
    let addr = unique_address("fakebroker");
    let listener = shmbus_proto::sys::socket::listen(&shmbus::Address::parse(&addr).unwrap(), 4).unwrap();
    let fake = std::thread::spawn(move || {
        shmbus_proto::sys::socket::set_nonblocking(listener.as_fd(), false).unwrap();
        let fd = rustix::net::accept(&listener).unwrap();
        let mut batch = shmbus_proto::sys::socket::RecvBatch::new(4);
        let mut next = || {
            batch.recv(fd.as_fd(), false).unwrap();
            batch.packet(0).0.to_vec()
        };
        let send = |bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]| {
            let p = shmbus_proto::sys::socket::OutPacket { head: bytes, payload: &[], fds };
            shmbus_proto::sys::socket::send_packet(fd.as_fd(), p, false).unwrap();
        };
        next(); // Hello
        let limits = shmbus::Limits {
            max_packet: 73728,
            max_inline_payload: 65536,
            queue_bytes: 1 << 20,
            queue_frames: 100,
            max_subscriptions: 10,
            fd_window: 128,
            max_depth: 32,
        };
        send(&encode_head(&Welcome { client_id: 1, limits }).unwrap(), &[]);
        next(); // Subscribe
        send(&encode_head(&shmbus_proto::frame::Subscribed { sub_id: 1 }).unwrap(), &[]);
        let sender = Sender { client_id: 9, uid: 0, gid: 0, pid: 1 };
        for (i, (payload, len)) in payloads.iter().enumerate() {
            let d = Deliver {
                sub_id: 1,
                topic: "x",
                sender,
                seq: i as u64 + 1,
                origin: None,
                payload: PayloadRef::Memfd { len: *len },
            };
            send(&encode_head(&d).unwrap(), &[payload.as_fd()]);
        }
        // Stay until the client hangs up, reading what it sends (its fd
        // acknowledgements): closing with unread input would make its next
        // read fail with ECONNRESET, whatever it had already received.
        loop {
            match batch.recv(fd.as_fd(), false) {
                Ok(n) if n > 0 && !batch.packet(0).0.is_empty() => {}
                _ => break,
            }
        }
    });
    (addr, fake)
}

/// A broker that is buggy or hostile hands the client an fd that is not a
/// sealed memfd: the app never sees it, and the loss is reported.
#[test]
fn client_refuses_an_unsealed_fd_even_from_its_broker() {
    let bad = memfd::create("evil", 64).unwrap();
    let good = memfd::from_bytes("ok", b"fine").unwrap();
    let (addr, fake) = fake_broker(vec![(bad, 64), (good, 4)]);
    let c = socket_client(&addr);
    let s = c.subscribe("x").unwrap();
    match s.recv_timeout(PATIENCE).unwrap().unwrap() {
        Event::Reconnected => panic!("unexpected reconnection"),
        Event::Gap { missed } => assert_eq!(missed, 1),
        Event::Message(m) => panic!("an unsealed fd reached the app: seq {}", m.seq()),
    }
    let m = next_message(&s);
    assert_eq!((m.seq(), m.payload()), (2, &b"fine"[..]));
    drop((s, c));
    fake.join().unwrap();
}

/// A sealed memfd reopened write-only through /proc.
fn write_only(fd: &OwnedFd) -> OwnedFd {
    use std::os::fd::AsRawFd;
    rustix::fs::open(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .unwrap()
}

/// A sealed 2 MiB hugetlbfs memfd, if this kernel makes one (on a host with
/// no huge pages reserved, it cannot be mapped).
fn hugetlb() -> Option<OwnedFd> {
    use rustix::fs::MemfdFlags;
    let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING | MemfdFlags::HUGETLB;
    let fd = rustix::fs::memfd_create("huge", flags).ok()?;
    rustix::fs::ftruncate(&fd, 2 << 20).ok()?;
    rustix::fs::fcntl_add_seals(&fd, memfd::REQUIRED_SEALS).ok()?;
    Some(fd)
}

/// Memfds that carry every seal and the declared size but cannot be
/// mapped read-only (write-only access; hugetlbfs): the broker refuses
/// them from a hostile publisher, so no subscriber ever gets one, and a
/// client handed one anyway (by a hostile broker) reports a gap.
#[test]
fn unmappable_memfds_are_refused_by_the_broker_and_the_client() {
    let b = Broker::start("unmappable");
    let watch = b.client();
    let s = watch.subscribe("ok").unwrap();
    // A subscriber process too: it must not crash on what it is sent.
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &b.address, "sub", "ok", "--count", "1"]);
    let kid = spawn_guarded(cmd);
    wait_subscribers(&watch, "ok", 2);
    let sealed = memfd::from_bytes("w", &[3; 4096]).unwrap();
    let mut cases = vec![("write-only", write_only(&sealed), 4096u64)];
    match hugetlb() {
        Some(fd) => cases.push(("hugetlbfs", fd, 2 << 20)),
        None => eprintln!("note: no hugetlb memfd on this kernel; that case is skipped"),
    }
    let mut r = Raw::hello(&b);
    let publish = |len| {
        encode_head(&Publish { topic: "ok", origin: None, payload: PayloadRef::Memfd { len } }).unwrap()
    };
    for (i, (what, fd, len)) in cases.iter().enumerate() {
        r.send(&publish(*len), &[fd.as_fd()]);
        // A ping behind it: an accepted publish gets no answer, so the
        // pong would come first.
        r.send(&encode_head(&Ping { token: i as u64 }).unwrap(), &[]);
        match r.recv() {
            Some(BrokerFrame::OpError(e)) => {
                assert_eq!(e.op, Op::Publish { seq: i as u64 + 1 }, "{what}");
                assert_eq!(e.code, ErrorCode::FdRefused, "{what}: {}", e.message);
            }
            other => panic!("{what} was not refused: {other:?}"),
        }
        assert!(matches!(r.recv(), Some(BrokerFrame::Pong(p)) if p.token == i as u64));
    }
    r.send(
        &encode_frame(&Publish { topic: "ok", origin: None, payload: PayloadRef::Inline }, b"after").unwrap(),
        &[],
    );
    assert_eq!(next_message(&s).payload(), b"after");
    let out = kid.wait_output();
    assert!(out.status.success(), "the subscriber process failed: {}", stderr(&out));
    assert_eq!(stdout(&out), "ok after\n");

    // The client's own check, against a broker that forwards them anyway.
    let good = memfd::from_bytes("ok", b"fine").unwrap();
    let n = cases.len() as u64;
    let mut payloads: Vec<(OwnedFd, u64)> = cases.into_iter().map(|(_, fd, len)| (fd, len)).collect();
    payloads.push((good, 4));
    let (addr, fake) = fake_broker(payloads);
    let c = socket_client(&addr);
    let s = c.subscribe("x").unwrap();
    // Each bad delivery is a missed message, reported as gaps before the
    // good one (one gap, or one per read when they came apart).
    let mut missed = 0;
    let m = loop {
        match s.recv_timeout(PATIENCE).unwrap().unwrap() {
            Event::Reconnected => panic!("unexpected reconnection"),
            Event::Gap { missed: k } => missed += k,
            Event::Message(m) => break m,
        }
    };
    assert_eq!(missed, n, "every unmappable fd is counted missed");
    assert_eq!((m.seq(), m.payload()), (n + 1, &b"fine"[..]), "an unmappable fd never reaches the app");
    drop((s, c));
    fake.join().unwrap();
}

/// The broker requires every one of the four seals: an fd lacking exactly
/// one (and carrying the other three) is refused, for each of them.
#[test]
fn broker_refuses_an_fd_lacking_any_one_seal() {
    use rustix::fs::SealFlags;
    let b = Broker::start("oneseal");
    let watch = b.client();
    let s = watch.subscribe("ok").unwrap();
    let mut r = Raw::hello(&b);
    let publish = |len| {
        encode_head(&Publish { topic: "ok", origin: None, payload: PayloadRef::Memfd { len } }).unwrap()
    };
    let all = [
        ("shrink", SealFlags::SHRINK),
        ("grow", SealFlags::GROW),
        ("write", SealFlags::WRITE),
        ("seal", SealFlags::SEAL),
    ];
    for (i, (missing, seal)) in all.iter().enumerate() {
        let fd = memfd::create("p", 4096).unwrap();
        rustix::io::pwrite(&fd, &[1; 4096], 0).unwrap();
        rustix::fs::fcntl_add_seals(&fd, memfd::REQUIRED_SEALS.difference(*seal)).unwrap();
        let seals = rustix::fs::fcntl_get_seals(&fd).unwrap();
        assert!(seals.contains(memfd::REQUIRED_SEALS.difference(*seal)) && !seals.contains(*seal));
        r.send(&publish(4096), &[fd.as_fd()]);
        // A ping behind it: an accepted publish gets no answer, so the
        // pong would come first.
        r.send(&encode_head(&Ping { token: i as u64 }).unwrap(), &[]);
        match r.recv() {
            Some(BrokerFrame::OpError(e)) => {
                assert_eq!(e.op, Op::Publish { seq: i as u64 + 1 }, "without {missing}");
                assert_eq!(e.code, ErrorCode::NotSealed, "without {missing}: {}", e.message);
            }
            other => panic!("an fd without the {missing} seal was not refused: {other:?}"),
        }
        assert!(matches!(r.recv(), Some(BrokerFrame::Pong(p)) if p.token == i as u64));
    }
    // With all four it goes through.
    let fd = memfd::from_bytes("all", &[2; 4096]).unwrap();
    r.send(&publish(4096), &[fd.as_fd()]);
    assert_eq!(next_message(&s).payload(), &[2; 4096][..]);
}
