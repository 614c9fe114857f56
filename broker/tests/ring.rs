//! Ring channels end to end: broker setup, multi-process stress, crashes,
//! late joiners, block mode with dead readers, hostile publishers, and the
//! permissions readers get.

mod common;

use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use shmbus::{ChannelConfig, ChannelError, ChannelEvent, ChannelOverflow, Client, ErrorCode};

/// Environment variables that turn this test binary into a helper process.
const ROLE: &str = "SHMBUS_RING_TEST_ROLE";
const ADDR: &str = "SHMBUS_RING_TEST_ADDR";
const COUNT: &str = "SHMBUS_RING_TEST_COUNT";

/// Message `seq` of the stress streams: the sequence number, then a
/// pattern derived from it, so a torn or misplaced read is visible.
fn payload(seq: u64, len: usize) -> Vec<u8> {
    let mut v = seq.to_le_bytes().to_vec();
    v.extend((0..len.saturating_sub(8)).map(|i| (seq as u8).wrapping_mul(31).wrapping_add(i as u8)));
    v
}

fn check(seq: u64, bytes: &[u8]) -> bool {
    bytes.len() >= 8 && bytes[..8] == seq.to_le_bytes() && bytes == payload(seq, bytes.len()).as_slice()
}

fn helper(role: &str, addr: &str, count: u64) -> ChildGuard {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "helper_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(ADDR, addr)
        .env(COUNT, count.to_string());
    spawn_guarded(cmd)
}

/// Not a test on its own: the body of the helper processes, run only when
/// a test spawns this binary with `--ignored --exact helper_process`.
#[test]
#[ignore = "helper process body, spawned by the other tests"]
fn helper_process() {
    let role = std::env::var(ROLE).expect("run as a helper by another test");
    let addr = std::env::var(ADDR).unwrap();
    let count: u64 = std::env::var(COUNT).unwrap().parse().unwrap();
    let c = Client::connect_to(&addr).unwrap();
    match role.as_str() {
        "publish-overwrite" | "publish-block" => {
            let overflow =
                if role == "publish-block" { ChannelOverflow::Block } else { ChannelOverflow::Overwrite };
            let mut p = c
                .channel_publisher("stress", ChannelConfig { slot_size: 64, slot_count: 64, overflow })
                .unwrap();
            // Wait for the go signal (a reader joined), then stream.
            let go = c.subscribe("stress.go").unwrap();
            c.publish("stress.ready", b"").unwrap();
            go.recv_timeout(PATIENCE).unwrap().unwrap();
            for seq in 0..count {
                let mut loan = p.loan().unwrap();
                let bytes = payload(seq, 8 + (seq % 57) as usize);
                loan[..bytes.len()].copy_from_slice(&bytes);
                loan.send(bytes.len()).unwrap();
            }
            c.publish("stress.done", b"").unwrap();
            // Stay until killed or told to go.
            let _ = c.subscribe("stress.never").unwrap().recv_timeout(PATIENCE);
        }
        "publish-forever" => {
            let mut p = c.channel_publisher("crash", ChannelConfig::default()).unwrap();
            c.publish("crash.ready", b"").unwrap();
            let mut seq = 0u64;
            loop {
                p.publish(&payload(seq, 16)).unwrap();
                seq += 1;
                if seq.is_multiple_of(1024) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
        "closed-publisher-fds" => closed_publisher_fds(&addr),
        "read-then-hang" => {
            let _s = c.channel_subscriber("blocky").unwrap();
            c.publish("blocky.joined", b"").unwrap();
            // Never read: the publisher must not wait for us forever
            // once we are gone.
            std::thread::sleep(PATIENCE);
        }
        "scribble-forever" => {
            // A hostile publisher: it announces message n complete (seq
            // 2n+2, head n+1) and then keeps rewriting its bytes, so a
            // reader reading it sees them change under it.
            let cfg = ChannelConfig { slot_size: 64, slot_count: 4, overflow: ChannelOverflow::Overwrite };
            let mut p = c.channel_publisher("scribble", cfg).unwrap();
            c.publish("scribble.ready", b"").unwrap();
            let (mut n, mut byte) = (0u64, 0u8);
            loop {
                for _ in 0..64 {
                    byte = byte.wrapping_add(1);
                    p.ring_map_mut().scribble(n + 1, (n % 4) as usize, 2 * n + 2, 64, byte);
                }
                n += 1;
            }
        }
        other => panic!("unknown role {other}"),
    }
    // Proof for the parent that this body ran (a filter that matched no
    // test would also exit 0).
    println!("helper {role}: done");
}

fn wait_ready(c: &Client, topic: &str) -> shmbus::Subscription {
    c.subscribe(topic).unwrap()
}

fn stress(role: &str, count: u64) {
    let b = Broker::start(role);
    let c = b.client();
    let ready = wait_ready(&c, "stress.ready");
    let done = c.subscribe("stress.done").unwrap();
    let _publisher = helper(role, &b.address, count);
    next_message(&ready);
    let mut sub = c.channel_subscriber("stress").unwrap();
    c.publish("stress.go", b"").unwrap();
    let (mut got, mut missed, mut bad, mut last) = (0u64, 0u64, 0u64, None::<u64>);
    let start = Instant::now();
    while got + missed < count {
        assert!(start.elapsed() < Duration::from_secs(120), "stalled at {got} + {missed}");
        match sub.recv_timeout(PATIENCE, check_and_len).unwrap() {
            Some(ChannelEvent::Message { seq, value }) => {
                if !value.0 || value.1 != seq {
                    bad += 1;
                }
                if let Some(l) = last {
                    assert!(seq > l, "out of order: {seq} after {l}");
                }
                last = Some(seq);
                got += 1;
            }
            Some(ChannelEvent::Reconnected) => panic!("unexpected reconnection"),
            Some(ChannelEvent::Missed(k)) => missed += k,
            None => panic!("no message within PATIENCE at {got} + {missed}"),
        }
    }
    assert_eq!(bad, 0, "a torn or wrong message was accepted");
    assert_eq!(got + missed, count);
    if role == "publish-block" {
        assert_eq!(missed, 0, "block mode must not lose anything");
    }
    next_message(&done);
    eprintln!("{role}: {got} delivered, {missed} missed (overwritten), 0 torn accepted");
}

fn check_and_len(b: &[u8]) -> (bool, u64) {
    let seq = if b.len() >= 8 { u64::from_le_bytes(b[..8].try_into().unwrap()) } else { u64::MAX };
    (check(seq, b), seq)
}

#[test]
fn stress_overwrite_mode_across_processes() {
    stress("publish-overwrite", 2_000_000);
}

#[test]
fn stress_block_mode_across_processes() {
    stress("publish-block", 1_000_000);
}

#[test]
fn late_joiner_starts_at_the_head_and_introspection_shows_the_channel() {
    let b = Broker::start("late");
    let c = b.client();
    let mut p = c.channel_publisher("late", ChannelConfig::default()).unwrap();
    for i in 0..100u64 {
        p.publish(&i.to_le_bytes()).unwrap();
    }
    let mut s = c.channel_subscriber("late").unwrap();
    assert_eq!(s.position(), 100);
    assert!(s.try_recv_vec().unwrap().is_none());
    p.publish(b"fresh").unwrap();
    assert_eq!(s.try_recv_vec().unwrap(), Some(ChannelEvent::Message { seq: 100, value: b"fresh".to_vec() }));
    let chans = c.channels().unwrap();
    assert_eq!(chans.len(), 1);
    let ch = &chans[0];
    assert_eq!((ch.topic.as_str(), ch.publisher, ch.readers, ch.published), ("late", c.id(), 1, 101));
    assert_eq!((ch.slot_size, ch.slot_count), (1024, 1024));
    // The CLI shows it too.
    let out = b.ctl(&["status"]);
    assert!(stdout(&out).contains("late"), "{}", stdout(&out));
    // One publisher per channel.
    let other = b.client();
    match other.channel_publisher("late", ChannelConfig::default()) {
        Err(ChannelError::Refused { code, .. }) => assert_eq!(code, ErrorCode::ChannelBusy),
        other => panic!("{other:?}"),
    }
    match other.channel_subscriber("nothing.here") {
        Err(ChannelError::Refused { code, .. }) => assert_eq!(code, ErrorCode::NoSuchChannel),
        other => panic!("{other:?}"),
    }
    // Publisher closes: the reader is told, it does not hang.
    drop(p);
    match s.recv_vec_timeout(PATIENCE) {
        Err(ChannelError::Closed) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn publisher_crash_closes_the_channel_for_readers() {
    let b = Broker::start("pcrash");
    let c = b.client();
    let ready = wait_ready(&c, "crash.ready");
    let mut kid = helper("publish-forever", &b.address, 0);
    next_message(&ready);
    let mut s = c.channel_subscriber("crash").unwrap();
    let mut got = 0;
    while got < 1000 {
        if let Some(ChannelEvent::Message { .. }) = s.recv_timeout(PATIENCE, |b| b.len()).unwrap() {
            got += 1;
        }
    }
    let child = kid.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    loop {
        match s.recv_timeout(PATIENCE, |b| b.len()) {
            Err(ChannelError::Closed) => break,
            Ok(_) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(start.elapsed() < PATIENCE, "never told the channel closed");
    }
}

#[test]
fn block_mode_publisher_is_not_held_by_a_dead_reader() {
    let b = Broker::start("deadreader");
    let c = b.client();
    let cfg = ChannelConfig { slot_size: 32, slot_count: 8, overflow: ChannelOverflow::Block };
    let mut p = c.channel_publisher("blocky", cfg).unwrap();
    let joined = c.subscribe("blocky.joined").unwrap();
    let mut kid = helper("read-then-hang", &b.address, 0);
    next_message(&joined);
    // A live reader that keeps up, in this process.
    let mut live = c.channel_subscriber("blocky").unwrap();
    let start = Instant::now();
    while p.readers() < 2 {
        p.update_readers().unwrap();
        assert!(start.elapsed() < PATIENCE, "the publisher never heard of its readers");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Fill the ring: the hanging reader holds the publisher.
    for i in 0..8u64 {
        p.publish(&i.to_le_bytes()).unwrap();
    }
    // Kill the reader that never reads; the publisher must go on.
    let child = kid.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        while seen.len() < 100 {
            if let Some(ChannelEvent::Message { value, .. }) = live.recv_vec_timeout(PATIENCE).unwrap() {
                seen.push(u64::from_le_bytes(value.try_into().unwrap()));
            }
        }
        seen
    });
    let published = bounded("publishing past a dead reader", move || {
        for i in 8..100u64 {
            p.publish(&i.to_le_bytes()).unwrap();
        }
        p.readers()
    });
    assert_eq!(published, 1, "the dead reader is out of the cursor set");
    assert_eq!(reader.join().unwrap(), (0..100).collect::<Vec<_>>());
}

#[test]
fn garbage_in_the_ring_is_reported_without_panics() {
    let b = Broker::start("garbage");
    let c = b.client();
    let cfg = ChannelConfig { slot_size: 64, slot_count: 16, overflow: ChannelOverflow::Overwrite };
    let mut p = c.channel_publisher("junk", cfg).unwrap();
    let mut s = c.channel_subscriber("junk").unwrap();
    let mut seed = 0x2545f4914f6cdd1du64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut corrupt, mut missed, mut messages) = (0, 0, 0);
    for i in 0..20_000u64 {
        let head = match i % 3 {
            0 => rnd(),
            1 => s.position().wrapping_add(1 + rnd() % 4),
            _ => u64::MAX - rnd() % 3,
        };
        let seq = if i % 2 == 0 { rnd() } else { s.position().wrapping_mul(2).wrapping_add(2) };
        p.ring_map_mut().scribble(head, rnd() as usize, seq, rnd() as u32 % 200, rnd() as u8);
        match s.try_recv(|b| {
            assert!(b.len() <= 64, "read beyond the slot");
            b.len()
        }) {
            Ok(Some(ChannelEvent::Message { .. })) => messages += 1,
            Ok(Some(ChannelEvent::Reconnected)) => panic!("unexpected reconnection"),
            Ok(Some(ChannelEvent::Missed(_))) => missed += 1,
            Ok(None) => {}
            Err(ChannelError::Corrupt(_)) => corrupt += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(corrupt > 0 && missed > 0, "corrupt {corrupt} missed {missed} messages {messages}");
}

#[test]
fn readers_get_read_only_rings_and_nothing_lands_in_dev_shm() {
    let shm_before: Vec<_> =
        std::fs::read_dir("/dev/shm").map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    let b = Broker::start("perm");
    let c = b.client();
    let cfg = ChannelConfig { slot_size: 64, slot_count: 16, overflow: ChannelOverflow::Overwrite };
    let mut p = c.channel_publisher("perm", cfg).unwrap();
    let s = c.channel_subscriber("perm").unwrap();
    p.publish(b"x").unwrap();
    let fd = s.ring_fd_for_tests();
    let geometry = shmbus_proto::ring::Geometry { slot_size: 64, slot_count: 16 };
    let signal = shmbus_proto::sys::memfd::create("s", 4096).unwrap();
    rustix::fs::fcntl_add_seals(&signal, rustix::fs::SealFlags::SHRINK | rustix::fs::SealFlags::GROW)
        .unwrap();
    let writable = shmbus_proto::ring::shm::RingMap::map(fd.as_fd(), signal.as_fd(), geometry, true);
    assert!(writable.is_err(), "a reader mapped its ring writable");
    assert!(shmbus_proto::ring::shm::RingMap::map(fd.as_fd(), signal.as_fd(), geometry, false).is_ok());
    let shm_after: Vec<_> =
        std::fs::read_dir("/dev/shm").map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert_eq!(shm_before, shm_after, "something was named in /dev/shm");
}

#[test]
fn ctl_reads_a_channel() {
    let b = Broker::start("ctlring");
    let c = b.client();
    let mut p = c.channel_publisher("ticks", ChannelConfig::default()).unwrap();
    let mut cmd = Command::new(SHMBUSCTL);
    cmd.args(["--address", &b.address, "sub", "--channel", "ticks", "--count", "3"]);
    let sub = spawn_guarded(cmd);
    let start = Instant::now();
    while c.channels().unwrap()[0].readers == 0 {
        assert!(start.elapsed() < PATIENCE, "shmbusctl never joined");
        std::thread::sleep(Duration::from_millis(10));
    }
    for t in ["a", "b", "c"] {
        p.publish(t.as_bytes()).unwrap();
    }
    let out = sub.wait_output();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ticks a\nticks b\nticks c\n");
}

#[test]
fn rings_count_against_the_publishers_quota_and_bad_geometry_is_refused() {
    let b = Broker::start_with("ringquota", &["--uid-ring-bytes", "2000000"]);
    let c = b.client();
    let big = ChannelConfig { slot_size: 4096, slot_count: 1024, overflow: ChannelOverflow::Overwrite };
    match c.channel_publisher("big", big) {
        Err(ChannelError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::LimitExceeded, "{message}");
        }
        other => panic!("{other:?}"),
    }
    let small = ChannelConfig { slot_size: 64, slot_count: 1024, overflow: ChannelOverflow::Overwrite };
    let p = c.channel_publisher("small", small).unwrap();
    // Closing the channel gives the memory back.
    drop(p);
    let start = Instant::now();
    while c.channels().unwrap().len() == 1 {
        assert!(start.elapsed() < PATIENCE);
        std::thread::sleep(Duration::from_millis(10));
    }
    let mid = ChannelConfig { slot_size: 1024, slot_count: 1024, overflow: ChannelOverflow::Overwrite };
    let _p = c.channel_publisher("mid", mid).unwrap();
    for bad in [(0, 16), (64, 0), (64, 1), (u32::MAX, 16)] {
        let cfg = ChannelConfig { slot_size: bad.0, slot_count: bad.1, overflow: ChannelOverflow::Block };
        match c.channel_publisher("bad", cfg) {
            Err(ChannelError::Refused { code, .. }) => assert_eq!(code, ErrorCode::Unsupported),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
}

fn own_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// News of a reader that arrives after (or just before) the publisher
/// closed must not leave its cursor fd behind in the client. Counted in a
/// helper process, where no other test opens fds meanwhile.
#[test]
fn a_closed_publisher_keeps_no_reader_fds() {
    let b = Broker::start("readerfds");
    let out = helper("closed-publisher-fds", &b.address, 0).wait_output();
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains("helper closed-publisher-fds: done"),
        "the helper never ran: {}",
        stdout(&out)
    );
}

fn closed_publisher_fds(addr: &str) {
    let c = Client::connect_to(addr).unwrap();
    let other = Client::connect_to(addr).unwrap();
    c.ping().unwrap();
    let baseline = own_fds();
    let p = c.channel_publisher("fds", ChannelConfig::default()).unwrap();
    let s = other.channel_subscriber("fds").unwrap();
    // The join (with a cursor fd) reaches `c`, which never publishes again.
    c.ping().unwrap();
    drop(p);
    drop(s);
    other.ping().unwrap();
    c.ping().unwrap();
    assert_eq!(own_fds(), baseline, "an fd of the closed channel is still open");
}

/// The read closure gets bytes that cannot change under it, even while a
/// hostile publisher (another process) keeps rewriting the slot it reads:
/// it copies them twice, a moment apart, and they must agree.
#[test]
fn read_closures_see_bytes_that_never_change() {
    let b = Broker::start("scribble");
    let c = b.client();
    let ready = wait_ready(&c, "scribble.ready");
    let _hostile = helper("scribble-forever", &b.address, 0);
    next_message(&ready);
    let mut s = c.channel_subscriber("scribble").unwrap();
    let (mut messages, mut changed) = (0u64, 0u64);
    let start = Instant::now();
    while messages < 3000 && start.elapsed() < Duration::from_secs(10) {
        let read = |b: &[u8]| {
            let first = b.to_vec();
            for _ in 0..500 {
                std::hint::spin_loop();
            }
            let second = std::hint::black_box(b).to_vec();
            first == second
        };
        match s.recv_timeout(PATIENCE, read) {
            Ok(Some(ChannelEvent::Message { value, .. })) => {
                messages += 1;
                changed += u64::from(!value);
            }
            Ok(_) | Err(ChannelError::Corrupt(_)) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(messages > 100, "only {messages} messages read");
    assert_eq!(changed, 0, "{changed} of {messages} messages changed while the closure read them");
}

/// A loan dropped unsent in overwrite mode has already scribbled over the
/// oldest message; a reader that had not read it yet counts it missed and
/// never takes the half-written bytes for it.
#[test]
fn an_abandoned_loan_is_counted_missed_never_misread() {
    let b = Broker::start("abandon");
    let c = b.client();
    let cfg = ChannelConfig { slot_size: 64, slot_count: 4, overflow: ChannelOverflow::Overwrite };
    let mut p = c.channel_publisher("abandon", cfg).unwrap();
    let mut s = c.channel_subscriber("abandon").unwrap();
    for seq in 0..4 {
        p.publish(&payload(seq, 64)).unwrap();
    }
    {
        // Message 4 goes over message 0, which the reader has not read.
        let mut loan = p.loan().unwrap();
        loan[..40].fill(0xee);
    }
    let mut read_all = || {
        let mut events = Vec::new();
        while let Some(ev) = s.try_recv(check_and_len).unwrap() {
            events.push(match ev {
                ChannelEvent::Message { seq, value } => {
                    assert!(value.0 && value.1 == seq, "message {seq} read wrong: {value:?}");
                    ChannelEvent::Message { seq, value: () }
                }
                ChannelEvent::Reconnected => panic!("unexpected reconnection"),
                ChannelEvent::Missed(k) => ChannelEvent::Missed(k),
            });
        }
        events
    };
    let msg = |seq| ChannelEvent::Message { seq, value: () };
    assert_eq!(read_all(), vec![ChannelEvent::Missed(1), msg(1), msg(2), msg(3)]);
    // Message 4, sent properly this time, is read as itself.
    p.publish(&payload(4, 64)).unwrap();
    assert_eq!(read_all(), vec![msg(4)]);
}

/// Block mode loses nothing for a reader that joins while the publisher is
/// streaming as fast as it can, with nobody else to wait for: from where
/// the broker starts it, the reader gets every message.
#[test]
fn block_mode_late_joiners_miss_nothing() {
    let b = Broker::start("lateblock");
    let c = b.client();
    let cfg = ChannelConfig { slot_size: 16, slot_count: 4, overflow: ChannelOverflow::Block };
    let mut p = c.channel_publisher("lateblock", cfg).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let halt = stop.clone();
    let publisher = std::thread::spawn(move || {
        let mut n = 0u64;
        while !halt.load(std::sync::atomic::Ordering::Relaxed) {
            p.publish(&n.to_le_bytes()).unwrap();
            n += 1;
        }
        n
    });
    let reader_client = b.client();
    for round in 0..20 {
        // Let the publisher hear that the last reader left and run free.
        std::thread::sleep(Duration::from_millis(50));
        let mut s = reader_client.channel_subscriber("lateblock").unwrap();
        let mut expect = s.position();
        for _ in 0..2000 {
            match s.recv_vec_timeout(PATIENCE).unwrap() {
                Some(ChannelEvent::Message { seq, value }) => {
                    assert_eq!(seq, expect, "round {round}: out of order");
                    assert_eq!(value, seq.to_le_bytes(), "round {round}: wrong bytes for {seq}");
                    expect += 1;
                }
                Some(ChannelEvent::Reconnected) => panic!("unexpected reconnection"),
                Some(ChannelEvent::Missed(k)) => {
                    panic!("round {round}: block mode lost {k} messages at {expect} to a late joiner")
                }
                None => panic!("round {round}: stalled at {expect}"),
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(publisher.join().unwrap() > 10_000);
}

/// Kill the broker, then the publisher: a reader asleep on the ring must
/// notice its broker is gone (its socket at end of stream) and fail,
/// not wait forever. The reader is `shmbusctl sub --channel`.
#[test]
fn channel_readers_notice_a_dead_broker() {
    let mut b = Broker::start("deadbroker");
    let c = b.client();
    let ready = wait_ready(&c, "crash.ready");
    let mut publisher = helper("publish-forever", &b.address, 0);
    next_message(&ready);
    let mut cmd = Command::new(SHMBUSCTL);
    // Not reconnecting: with reconnection on (the default) a reader keeps
    // reading its ring, which needs no broker, until the broker is back.
    cmd.args([
        "--address",
        &b.address,
        "--no-reconnect",
        "sub",
        "--channel",
        "crash",
        "--count",
        "1000000000",
    ]);
    let reader = spawn_guarded(cmd);
    let start = Instant::now();
    while c.channels().unwrap()[0].readers == 0 {
        assert!(start.elapsed() < PATIENCE, "shmbusctl never joined");
        std::thread::sleep(Duration::from_millis(10));
    }
    let broker = b.child.as_mut().unwrap();
    broker.kill().unwrap();
    broker.wait().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let child = publisher.0.as_mut().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let out = reader.wait_output();
    assert!(!out.status.success(), "shmbusctl exited 0 with its broker gone");
    assert!(start.elapsed() < PATIENCE, "took {:?}", start.elapsed());
    let err = stderr(&out);
    assert!(err.contains("broker") && !err.contains("panicked"), "{err}");
}

/// The word that makes a publisher read its socket for news of readers is
/// out of every reader's reach: a reader scribbling its whole signal page
/// (the one page it may write) costs the publisher no socket reads.
#[test]
fn a_reader_cannot_make_the_publisher_read_its_socket() {
    let b = Broker::start("members");
    let c = b.client();
    let cfg = ChannelConfig { slot_size: 8, slot_count: 64, overflow: ChannelOverflow::Overwrite };
    let mut p = c.channel_publisher("members", cfg).unwrap();
    let reader = b.client();
    let s = reader.channel_subscriber("members").unwrap();
    // Let the news of the reader arrive, then count from there.
    p.publish(b"first").unwrap();
    let start = Instant::now();
    while p.readers() < 1 {
        p.update_readers().unwrap();
        assert!(start.elapsed() < PATIENCE, "the publisher never heard of its reader");
    }
    let signal = s.signal_fd_for_tests().try_clone_to_owned().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let halt = stop.clone();
    let scribbler = std::thread::spawn(move || {
        let mut k = 0u32;
        while !halt.load(std::sync::atomic::Ordering::Relaxed) {
            k = k.wrapping_add(1);
            let junk: Vec<u8> = (0..128u32).map(|i| (k.wrapping_mul(31) ^ i) as u8).collect();
            rustix::io::pwrite(&signal, &junk, 0).unwrap();
        }
        k
    });
    let before = p.news_checks();
    for i in 0..100_000u64 {
        p.publish(&i.to_le_bytes()).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(scribbler.join().unwrap() > 100, "the scribbler hardly ran");
    let checks = p.news_checks() - before;
    assert!(checks < 10, "a reader made the publisher read its socket {checks} times in 100000 publishes");
}
