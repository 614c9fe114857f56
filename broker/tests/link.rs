//! The shared-memory transport, from the broker's side of the contract:
//! clients that speak it by hand (`RawLink`), so the broker is checked
//! against the protocol, not against our own client library. Order across
//! ring records and socket packets, a full ring's exact gaps, and hostile
//! clients that scribble their half.

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::*;
use shmbus_proto::frame::{decode_broker, BrokerFrame, GoodbyeCode, Overflow, PayloadRef, Ping, Publish};

#[test]
fn ring_frames_and_socket_frames_keep_one_order_both_ways() {
    let b = Broker::start("link-order");
    let mut sub = RawLink::attach(&b, "sub");
    sub.subscribe(1, "t.>", Overflow::Gap);
    let mut publ = RawLink::attach(&b, "pub");
    // Inline publishes through the ring, and every seventh a memfd payload
    // on the socket with a marker in the ring at its place.
    let n = 700u64;
    for i in 0..n {
        let body = i.to_le_bytes();
        if i % 7 == 3 {
            let fd = shmbus_proto::sys::memfd::from_bytes("p", &body).unwrap();
            publ.send_with_fds(
                &Publish { topic: "t.x", origin: None, payload: PayloadRef::Memfd { len: 8 } },
                &[fd.as_fd()],
            );
        } else {
            publ.send_body(&Publish { topic: "t.x", origin: None, payload: PayloadRef::Inline }, &body);
        }
    }
    let mut taken = 0u32;
    for i in 0..n {
        let p = sub.next_packet();
        let (seq, payload, fds) = match decode_broker(&p.data).unwrap() {
            BrokerFrame::Deliver(d, payload) => (d.seq, payload.to_vec(), p.fds.len()),
            other => panic!("expected a delivery, got {other:?}"),
        };
        assert_eq!(seq, i + 1, "in order");
        if i % 7 == 3 {
            assert_eq!(fds, 1, "message {i} comes with its memfd");
            let len = shmbus_proto::sys::memfd::sealed_len(p.fds[0].as_fd()).unwrap();
            assert_eq!(len, 8);
        } else {
            assert_eq!(fds, 0);
            assert_eq!(payload, i.to_le_bytes());
        }
        taken += fds as u32;
        if taken >= 8 {
            // Acknowledge the fds taken, as a client must.
            sub.send_body(&shmbus_proto::frame::FdAck { fds: taken }, &[]);
            taken = 0;
        }
    }
    publ.ping(9);
}

#[test]
fn a_full_ring_then_a_full_queue_gives_exact_gaps() {
    // A subscriber that does not read: its ring fills, then its queue in
    // the broker; what does not fit is counted, and told in one gap.
    let b = Broker::start_with("link-gaps", &["--queue-frames", "100"]);
    let mut sub = RawLink::attach(&b, "sub");
    sub.subscribe(1, "g", Overflow::Gap);
    let mut publ = RawLink::attach(&b, "pub");
    let n = 20_000u64;
    for i in 0..n {
        publ.send_body(&Publish { topic: "g", origin: None, payload: PayloadRef::Inline }, &i.to_le_bytes());
    }
    publ.ping(1);
    // Everything the publisher sent has been routed.
    let (mut delivered, mut missed, mut last) = (0u64, 0u64, 0u64);
    while delivered + missed < n {
        let p = sub.next_packet();
        match decode_broker(&p.data).unwrap() {
            BrokerFrame::Deliver(d, payload) => {
                assert!(d.seq > last, "in order");
                assert_eq!(payload, (d.seq - 1).to_le_bytes());
                last = d.seq;
                delivered += 1;
            }
            BrokerFrame::Gap(g) => missed += g.missed,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(delivered + missed, n, "every message delivered or counted");
    assert!(missed > 0, "the ring and the queue cannot hold 20,000");
    eprintln!("delivered {delivered}, missed {missed}");
    assert!(sub.recv_packet(Duration::from_millis(200)).is_none(), "nothing more");
}

#[test]
fn a_client_that_scribbles_its_ring_is_cut_off_and_no_one_else_notices() {
    let b = Broker::start("link-scribble");
    let mut bystander = RawLink::attach(&b, "bystander");
    bystander.subscribe(1, "calm", Overflow::Gap);
    let words = [u64::MAX, 0x0000_0009_0000_0010, 0x0000_0001_ffff_fff0, 0x0000_0003_0000_0005];
    for (i, &w) in words.iter().enumerate() {
        let mut evil = RawLink::attach(&b, "evil");
        // A record header that cannot be, and a tail that covers it.
        evil.map.my_data()[0].store(w, std::sync::atomic::Ordering::Relaxed);
        evil.map.mine().tail.v.store(64, std::sync::atomic::Ordering::Release);
        evil.raw.send_body(&shmbus_proto::frame::Doorbell, &[]);
        eprintln!("case {i}");
        // It hears why, in its ring, and is cut off.
        expect_goodbye(&mut evil, "corrupt");
        bystander.ping(i as u64);
    }
    // Lies about positions: a tail far ahead, then a reader position
    // beyond what the broker wrote.
    let mut evil = RawLink::attach(&b, "evil");
    evil.map.mine().tail.v.store(1 << 40, std::sync::atomic::Ordering::Release);
    evil.raw.send_body(&shmbus_proto::frame::Doorbell, &[]);
    expect_goodbye(&mut evil, "position");
    let mut liar = RawLink::attach(&b, "liar");
    liar.subscribe(1, "flood", Overflow::Gap);
    liar.map.mine().head.v.store(1 << 40, std::sync::atomic::Ordering::Release);
    // The lie is harmless until the broker needs room in the liar's ring:
    // then it finds it, can no longer use that ring, and closes the socket.
    let mut flood = RawLink::attach(&b, "flood");
    for i in 0..4000u32 {
        flood.send_body(
            &Publish { topic: "flood", origin: None, payload: PayloadRef::Inline },
            &[i as u8; 100],
        );
    }
    loop {
        let p = liar.raw.next_packet();
        if p.is_eof() {
            break;
        }
    }
    bystander.ping(99);
}

fn expect_goodbye(l: &mut RawLink, needle: &str) {
    let p = l.next_packet();
    match p.frame() {
        Some(BrokerFrame::Goodbye(g)) => {
            assert_eq!(g.code, GoodbyeCode::ProtocolViolation, "{}", g.reason);
            assert!(g.reason.contains(needle), "{:?} lacks {needle:?}", g.reason);
        }
        other => panic!("expected a goodbye, got {other:?}"),
    }
    assert!(l.next_packet().is_eof(), "closed after the goodbye");
}

#[test]
fn an_idle_bus_with_links_puts_every_ring_to_sleep_and_costs_no_cpu() {
    let b = Broker::start("link-idle");
    let mut links: Vec<RawLink> = (0..4).map(|i| RawLink::attach(&b, &format!("idle{i}"))).collect();
    for (i, l) in links.iter_mut().enumerate() {
        l.subscribe(1, "x", Overflow::Gap);
        l.ping(i as u64);
    }
    // Each ring goes to sleep once quiet: the broker's flag for it is up
    // (odd), so the client knows to ring.
    let deadline = std::time::Instant::now() + PATIENCE;
    for l in &links {
        while l.map.peer().consumer_sleep.v.load(std::sync::atomic::Ordering::Acquire) & 1 == 0 {
            assert!(std::time::Instant::now() < deadline, "a quiet ring never went to sleep");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let before = b.cpu_ticks();
    std::thread::sleep(Duration::from_millis(1500));
    let spent = b.cpu_ticks() - before;
    // A spinning broker would have used ~150 ticks.
    assert!(spent <= 3, "an idle broker used {spent} ticks of CPU in 1.5 s");
    // And it still wakes at once for a ring that has news.
    links[0].ping(42);
}

/// Connections that said Hello and left cost an idle broker no wake-up at
/// their Hello deadlines: after a burst of short connections (a CLI's) it
/// had woken once for each, a Hello timeout later (80 times a second for
/// 5 s after a few hundred `shmbusctl` runs).
#[test]
fn an_idle_broker_sleeps_through_the_deadlines_of_connections_gone() {
    let b = Broker::start_with("idle-deadlines", &["--hello-timeout-ms", "1000"]);
    let start = std::time::Instant::now();
    for _ in 0..40 {
        let c = b.client();
        c.ping().unwrap();
    }
    let probe = b.client();
    b.wait_clients(&probe, 1);
    drop(probe);
    std::thread::sleep(Duration::from_millis(100));
    let before = b.runs();
    // Past every deadline of the burst (each 1 s after its connection).
    let until = start + Duration::from_millis(1000) + start.elapsed() + Duration::from_millis(300);
    std::thread::sleep(until.saturating_duration_since(std::time::Instant::now()));
    let woken = b.runs() - before;
    eprintln!("the idle broker woke {woken} times");
    assert!(woken <= 5, "an idle broker woke {woken} times at the deadlines of 41 connections gone");
}

const ROLE: &str = "SHMBUS_LINK_ROLE";
const ADDR: &str = "SHMBUS_LINK_ADDR";
const SAY: &str = "LINK:";

/// Not a test on its own: the body of the helper processes, run only when
/// a test spawns this binary with `--ignored --exact helper_process`.
#[test]
#[ignore = "helper process body, spawned by the other tests"]
fn helper_process() {
    let role = std::env::var(ROLE).expect("run as a helper by another test");
    let addr = std::env::var(ADDR).unwrap();
    match role.as_str() {
        // A linked publisher and a linked subscriber of its messages, as
        // busy as they can be, fds on the socket now and then, until killed.
        "busy" => {
            let mut sub = RawLink::attach_at(&addr, "busy-sub");
            sub.subscribe(1, "busy", Overflow::Gap);
            let mut publ = RawLink::attach_at(&addr, "busy-pub");
            println!("{SAY}ready");
            for i in 0u64.. {
                if i % 50 == 0 {
                    let fd = shmbus_proto::sys::memfd::from_bytes("p", &i.to_le_bytes()).unwrap();
                    publ.send_with_fds(
                        &Publish { topic: "busy", origin: None, payload: PayloadRef::Memfd { len: 8 } },
                        &[fd.as_fd()],
                    );
                } else {
                    publ.send_body(
                        &Publish { topic: "busy", origin: None, payload: PayloadRef::Inline },
                        &i.to_le_bytes(),
                    );
                }
                // Read some, not all: the subscriber's ring and queue stay busy.
                if i % 3 == 0 {
                    let _ = sub.recv_packet(Duration::ZERO);
                }
            }
        }
        other => panic!("unknown role {other}"),
    }
}

fn helper(role: &str, address: &str) -> Helper {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--exact", "helper_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(ADDR, address)
        .stdin(std::process::Stdio::null());
    Helper::spawn(&mut cmd, SAY)
}

/// Mappings of link memfds in the broker.
fn link_mappings(b: &Broker) -> usize {
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", b.pid())).unwrap();
    maps.lines().filter(|l| l.contains("shmbus-link")).count()
}

#[test]
fn clients_killed_at_random_moments_leave_nothing_behind() {
    let b = Broker::start("link-kill");
    let mut bystander = RawLink::attach(&b, "bystander");
    let base_fds = b.baseline_fds();
    let base_maps = link_mappings(&b);
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    for round in 0..8 {
        let mut h = helper("busy", &b.address);
        h.expect("ready");
        // A moment somewhere in a busy stream: mid-record, mid-marker,
        // with fds in flight, with the broker's ring to it full.
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        std::thread::sleep(Duration::from_millis(u64::from(seed % 40)));
        drop(h); // SIGKILL, and reaped
        bystander.ping(round);
    }
    b.wait_fd_count(base_fds);
    let deadline = std::time::Instant::now() + PATIENCE;
    while link_mappings(&b) != base_maps {
        assert!(std::time::Instant::now() < deadline, "link mappings left behind");
        std::thread::sleep(Duration::from_millis(10));
    }
    bystander.ping(100);
}

#[test]
fn packets_with_fds_but_no_markers_stay_in_the_kernel_not_in_the_broker() {
    let b = Broker::start("link-ahead");
    let base = b.baseline_fds();
    let mut evil = RawLink::attach(&b, "evil");
    // 64 payloads of 4 fds each on the socket, and never a marker; a
    // doorbell after each, so the broker looks.
    let fds: Vec<_> = (0..4).map(|i| shmbus_proto::sys::memfd::from_bytes("p", &[i; 8]).unwrap()).collect();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    for _ in 0..64 {
        evil.raw.send_body(
            &Publish { topic: "x", origin: None, payload: PayloadRef::Memfd { len: 8 } },
            &borrowed,
        );
        evil.raw.send_body(&shmbus_proto::frame::Doorbell, &[]);
    }
    let mut bystander = RawLink::attach(&b, "bystander");
    bystander.ping(1);
    // Two sockets (a link's memfds are closed once mapped) and one packet
    // read ahead: at most 4 fds more than that, never 256.
    let held = b.fd_count();
    assert!(held <= base + 2 + 4, "the broker holds {held} fds (baseline {base})");
    // A marker for each: they are all taken in order (and refused or
    // routed; here nobody listens), and the connection goes on.
    for _ in 0..64 {
        assert!(evil
            .producer
            .try_push(evil.map.peer(), evil.map.my_data(), shmbus_proto::link::RecordKind::Marker, &[])
            .unwrap());
    }
    evil.publish();
    evil.raw.send_body(&shmbus_proto::frame::Doorbell, &[]);
    evil.send_body(&Ping { token: 2 }, &[]);
    let mut refused = 0;
    loop {
        let p = evil.next_packet();
        match p.frame() {
            Some(BrokerFrame::OpError(_)) => refused += 1,
            Some(BrokerFrame::Pong(p)) => {
                assert_eq!(p.token, 2);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(refused, 64, "each payload taken in its place, and refused (4 fds for one memfd)");
    drop(fds);
    drop(evil);
    // The bystander's socket (a link's memfds are closed once mapped).
    b.wait_fd_count(base + 1);
}

#[test]
fn a_scribbler_holding_unacknowledged_fds_is_forgotten_when_it_hangs_up() {
    let b = Broker::start("link-linger");
    let base = b.baseline_fds();
    let mut evil = RawLink::attach(&b, "evil");
    evil.subscribe(1, "f", Overflow::Gap);
    let mut publ = RawLink::attach(&b, "pub");
    let fd = shmbus_proto::sys::memfd::from_bytes("p", &[1; 8]).unwrap();
    publ.send_with_fds(
        &Publish { topic: "f", origin: None, payload: PayloadRef::Memfd { len: 8 } },
        &[fd.as_fd()],
    );
    let p = evil.next_packet();
    assert_eq!(p.fds.len(), 1, "a payload it never acknowledges");
    // Now it scribbles: cut off, and lingering for its unacknowledged fd.
    evil.map.my_data()[0].store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
    evil.map.mine().tail.v.store(64, std::sync::atomic::Ordering::Release);
    evil.raw.send_body(&shmbus_proto::frame::Doorbell, &[]);
    expect_goodbye(&mut evil, "corrupt");
    drop(evil);
    // Its hang-up ends it: only the publisher's socket is left.
    b.wait_fd_count(base + 1);
}

#[test]
fn a_broker_killed_at_random_moments_of_a_busy_linked_stream_hangs_no_client() {
    use shmbus::{Event, Transport};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut b = Broker::start("link-broker-kill");
    // The run over the socket alone (SHMBUS_TRANSPORT=socket) checks that
    // path the same way.
    let want = match std::env::var("SHMBUS_TRANSPORT").as_deref() {
        Ok("socket") => Transport::Socket,
        _ => Transport::SharedMemory,
    };
    let subscriber = b.client();
    let publisher = b.client();
    assert_eq!(publisher.transport(), want);
    let sub = subscriber.subscribe("k").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    // Publishes as fast as it can; every publish returns (delivered, or an
    // error while the broker is away): a hang fails the join below.
    let pump = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if publisher.publish("k", b"x").is_ok() {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            publisher
        })
    };
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    for round in 0..4 {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        std::thread::sleep(Duration::from_millis(20 + u64::from(seed % 60)));
        b.restart(rustix::process::Signal::KILL);
        // The subscriber hears of it, then messages flow again.
        let deadline = std::time::Instant::now() + PATIENCE;
        let (mut reconnected, mut after) = (false, 0);
        while after < 10 {
            assert!(std::time::Instant::now() < deadline, "round {round}: the stream never came back");
            match sub.recv_timeout(Duration::from_millis(200)).unwrap() {
                Some(Event::Reconnected) => reconnected = true,
                Some(Event::Message(_)) if reconnected => after += 1,
                _ => {}
            }
        }
        assert_eq!(subscriber.transport(), want, "the same transport after the restart");
    }
    stop.store(true, Ordering::Relaxed);
    let publisher = bounded("the publisher stops", move || pump.join().unwrap());
    assert_eq!(publisher.transport(), want);
    assert!(sent.load(Ordering::Relaxed) > 0);
    publisher.ping().unwrap();
}

#[test]
fn a_client_that_trickles_records_does_not_keep_the_broker_spinning() {
    let _alone = measuring_alone();
    const GAP_US: u64 = 120;
    // A record, then 120 µs of sleep (about 200 µs apart, with the
    // sleep's slack): too far apart for spinning to pay. The broker used
    // to stay hot for it, 98% of a CPU; its ring must sleep between
    // records instead, woken by doorbells.
    let b = Broker::start("link-trickle");
    let mut l = RawLink::attach(&b, "trickle");
    l.ping(0);
    let (t0, start) = (b.cpu_ns(), std::time::Instant::now());
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(1) {
        l.send_body(&Publish { topic: "t", origin: None, payload: PayloadRef::Inline }, b"x");
        sent += 1;
        std::thread::sleep(Duration::from_micros(GAP_US));
    }
    let share = (b.cpu_ns() - t0) as f64 / start.elapsed().as_nanos() as f64;
    eprintln!("{sent} records: broker CPU {:.1}%", share * 100.0);
    assert!(share < 0.5, "a trickle of {sent} records kept the broker {:.0}% busy", share * 100.0);
    l.ping(1);
}

// ------------------------------------------------------------ attacks --

/// A client raising a fresh `producer_wait` value at every moment, while
/// keeping its ring hot with cheap records (doorbells in the ring, which
/// the broker ignores), must not make the broker bump `room` and
/// `FUTEX_WAKE` once per turn of its loop: a system call per turn bought
/// with a store to shared memory.
#[test]
fn attack_toggling_producer_wait_does_not_buy_a_wake_per_turn() {
    use shmbus_proto::sync::Ordering;
    let b = Broker::start("attack-wait-toggle");
    let mut l = RawLink::attach(&b, "toggler");
    l.ping(0);
    let room0 = l.map.peer().room.v.load(Ordering::Acquire);
    let (t0, start) = (b.cpu_ns(), std::time::Instant::now());
    let mut flag: u32 = 1;
    let mut records = 0u64;
    let mut last_record = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        flag = flag.wrapping_add(2);
        l.map.mine().producer_wait.v.store(flag, Ordering::Relaxed);
        if last_record.elapsed() >= Duration::from_micros(50) {
            l.send_body(&shmbus_proto::frame::Doorbell, &[]);
            records += 1;
            last_record = std::time::Instant::now();
        }
    }
    let bumps = l.map.peer().room.v.load(Ordering::Acquire).wrapping_sub(room0);
    let share = (b.cpu_ns() - t0) as f64 / start.elapsed().as_nanos() as f64;
    eprintln!("{records} records, {bumps} room wake-ups, broker CPU {:.0}%", share * 100.0);
    assert!(
        u64::from(bumps) <= records,
        "{bumps} futex wakes for {records} records: one per turn of the broker's loop"
    );
    l.map.mine().producer_wait.v.store(flag.wrapping_add(1), Ordering::Relaxed);
    l.ping(1);
}

/// A link client that writes one cheap record every ~50 µs keeps the
/// broker spinning; socket clients' round trips must not suffer for it
/// (the spinning broker asks the kernel for events only every 1 ms).
#[test]
fn attack_a_dense_trickle_does_not_slow_socket_clients() {
    let _alone = measuring_alone();
    let b = Broker::start("attack-trickle-latency");
    let rtt = |raw: &mut Raw, n: u64| -> Vec<Duration> {
        let mut v = Vec::new();
        for i in 0..n {
            let t = std::time::Instant::now();
            raw.send_body(&Ping { token: i }, &[]);
            loop {
                let p = raw.next_packet();
                if matches!(p.frame(), Some(BrokerFrame::Pong(_))) {
                    break;
                }
            }
            v.push(t.elapsed());
            std::thread::sleep(Duration::from_micros(300));
        }
        v.sort();
        v
    };
    let mut raw = Raw::hello(&b);
    let idle = rtt(&mut raw, 500);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (stop2, addr) = (stop.clone(), b.address.clone());
    let t = std::thread::spawn(move || {
        let mut l = RawLink::attach_at(&addr, "trickler");
        let mut n = 0u64;
        let start = std::time::Instant::now();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            l.send_body(&shmbus_proto::frame::Doorbell, &[]);
            n += 1;
            std::thread::sleep(Duration::from_micros(1));
        }
        (n, start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    let (c0, s0) = (b.cpu_ns(), std::time::Instant::now());
    let busy = rtt(&mut raw, 500);
    let share = (b.cpu_ns() - c0) as f64 / s0.elapsed().as_nanos() as f64;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (n, el) = t.join().unwrap();
    let pct = |v: &[Duration], p: usize| v[v.len() * p / 100];
    eprintln!(
        "trickle {n} records in {el:?}; broker CPU {:.0}%; socket RTT idle p50 {:?} p99 {:?}; with trickle p50 {:?} p99 {:?}",
        share * 100.0,
        pct(&idle, 50),
        pct(&idle, 99),
        pct(&busy, 50),
        pct(&busy, 99)
    );
    assert!(
        pct(&busy, 50) < pct(&idle, 50) * 3 + Duration::from_micros(200),
        "a link client's cheap trickle slows every socket client's round trip"
    );
}

/// Odd capacities are refused with a reason and the connection carries on
/// over the socket; a second `Attach` (in the ring) is refused too; links
/// beyond `--uid-ring-bytes` are refused and the charge comes back when a
/// linked connection goes.
#[test]
fn attack_odd_attaches_and_the_ring_bytes_quota() {
    use shmbus_proto::frame::{Attach, ErrorCode, Op};
    let link = 2 * (4096 + 262_144);
    let b = Broker::start_with("attack-attach", &["--uid-ring-bytes", &(2 * link).to_string()]);
    for capacity in [1, 262_144 + 8, 1 << 25, u32::MAX, 1 << 31] {
        let (mut raw, _) = Raw::hello_at(&b.address, "odd");
        raw.send_body(&Attach { capacity }, &[]);
        match raw.next_packet().frame() {
            Some(BrokerFrame::OpError(e)) => {
                assert_eq!((e.op, e.code), (Op::Attach, ErrorCode::Unsupported), "{capacity}")
            }
            other => panic!("{capacity}: {other:?}"),
        }
        raw.send_body(&Ping { token: 5 }, &[]);
        assert!(matches!(raw.next_packet().frame(), Some(BrokerFrame::Pong(_))));
    }
    let mut a = RawLink::attach(&b, "a");
    a.send_body(&Attach { capacity: 0 }, &[]);
    match a.next_packet().frame() {
        Some(BrokerFrame::OpError(e)) => assert_eq!((e.op, e.code), (Op::Attach, ErrorCode::Unsupported)),
        other => panic!("{other:?}"),
    }
    a.ping(1);
    let _b2 = RawLink::attach(&b, "b");
    let (mut raw, _) = Raw::hello_at(&b.address, "c");
    raw.send_body(&Attach { capacity: 0 }, &[]);
    match raw.next_packet().frame() {
        Some(BrokerFrame::OpError(e)) => assert_eq!((e.op, e.code), (Op::Attach, ErrorCode::LimitExceeded)),
        other => panic!("{other:?}"),
    }
    drop(a);
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let (mut raw, _) = Raw::hello_at(&b.address, "d");
        raw.send_body(&Attach { capacity: 0 }, &[]);
        if matches!(raw.next_packet().frame(), Some(BrokerFrame::Attached(_))) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the charge never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A client that corrupts its ring and hangs up at once, in one go: the
/// broker must forget it as soon as it has read that (it waits for nothing
/// else), not keep the connection, its socket and its mappings around.
#[test]
fn attack_scribble_and_hang_up_at_once_is_forgotten_promptly() {
    let b = Broker::start("attack-scribble-close");
    let base = b.baseline_fds();
    let maps0 = link_mappings(&b);
    for _ in 0..20 {
        let evil = RawLink::attach(&b, "evil");
        evil.map.my_data()[0].store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        evil.map.mine().tail.v.store(64, std::sync::atomic::Ordering::Release);
        evil.raw.send_body(&shmbus_proto::frame::Doorbell, &[]);
        drop(evil);
    }
    let start = std::time::Instant::now();
    while (b.fd_count() > base || link_mappings(&b) > maps0) && start.elapsed() < PATIENCE {
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("forgotten after {:?}", start.elapsed());
    assert!(start.elapsed() < Duration::from_millis(1000), "kept for {:?}", start.elapsed());
}

#[test]
fn a_ring_frame_larger_than_a_socket_packet_is_refused_as_on_the_socket() {
    let b = Broker::start("link-big");
    let mut l = RawLink::attach(&b, "big");
    // A publish of 100 KiB inline: fits the ring (half of 256 KiB), not a
    // packet (72 KiB).
    l.send_body(&Publish { topic: "t", origin: None, payload: PayloadRef::Inline }, &vec![1u8; 100 * 1024]);
    let p = l.next_packet();
    match p.frame() {
        Some(BrokerFrame::Goodbye(g)) => {
            assert_eq!(g.code, GoodbyeCode::ProtocolViolation, "{}", g.reason);
            assert!(g.reason.contains("larger than"), "{}", g.reason);
        }
        other => panic!("expected a goodbye, got {other:?}"),
    }
}
