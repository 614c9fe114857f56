//! `ring`: ring channels against two floors measured in the same run, a
//! shared-memory spin ping-pong on one cache line and a raw futex
//! ping-pong, both between two processes.
//!
//! - round trip (A publishes on one channel, B echoes on another) at 8 B
//!   and 64 KiB, busy-polling (`ring_busy`) and sleeping on the futex at
//!   once (`ring_blocking`), each with `ratio_to_floor` against the matching
//!   floor; the futex floor and the 8 B blocking ring are each the median
//!   of 3 rounds taken in alternation;
//! - throughput at 8 B, one publisher to 1, 2 and 4 subscriber processes,
//!   block mode (nothing lost), as the slowest subscriber's rate;
//! - the cost of one read at 8 B and 64 KiB (`ring_read`: copy the slot
//!   out word by word with atomic loads, check the seqlock, hand the copy
//!   over) against a plain `memcpy` of the same bytes out of the same
//!   mapping (`read_memcpy`: what a reader that copied its message paid
//!   when the closure ran on the slot in place, before reads were made
//!   sound), in one process, the slot warm in cache; each sample times a
//!   batch of reads.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use shmbus::{ChannelConfig, ChannelEvent, ChannelOverflow, Client, Event};
use shmbus_proto::ring::protocol::{self, RingView};
use shmbus_proto::ring::shm::{create_ring, RingMap};
use shmbus_proto::ring::{Geometry, ReadOutcome, ReaderState, WriterState};
use shmbus_proto::sync::Ordering;
use shmbus_proto::sys::futex;
use shmbus_proto::sys::memfd;

use crate::{connect_retry, start_broker, Helper, Report, Row};

const RTT_WARMUP: usize = 2_000;
const RTT_ITERS: usize = 50_000;
const FLOOR_GEOMETRY: Geometry = Geometry { slot_size: 8, slot_count: 2 };

fn rtt(once: impl FnMut()) -> (u64, u64) {
    crate::timed(RTT_WARMUP, RTT_ITERS, once)
}

fn open_parent_fd(ppid: &str, fd: &str) -> OwnedFd {
    OwnedFd::from(
        std::fs::File::options().read(true).write(true).open(format!("/proc/{ppid}/fd/{fd}")).unwrap(),
    )
}

/// The floors' partner: `spin` or `futex` ping-pong on the signal page's
/// `wake` word: the parent writes odd values, this process answers with
/// the next even one.
pub(crate) fn helper_floor(kind: &str, ppid: &str, ring: &str, signal: &str) {
    let (ring, signal) = (open_parent_fd(ppid, ring), open_parent_fd(ppid, signal));
    let map = RingMap::map(ring.as_fd(), signal.as_fd(), FLOOR_GEOMETRY, true).unwrap();
    // Every store here is Release and every load Acquire: each side's store
    // pairs with the other side's load of the same word.
    let word = &map.signal().wake;
    let mut expect = 1u32;
    loop {
        loop {
            let v = word.load(Ordering::Acquire);
            if v == u32::MAX {
                return;
            }
            if v == expect {
                break;
            }
            if kind == "futex" {
                futex::wait(word, v, Some(Duration::from_secs(1))).unwrap();
            } else {
                std::hint::spin_loop();
            }
        }
        word.store(expect + 1, Ordering::Release);
        if kind == "futex" {
            futex::wake_all(word).unwrap();
        }
        expect += 2;
    }
}

/// The three-process floor's partners, on the signal page's `wake` word:
/// the parent (A) writes 4k+1; the `relay` (the broker's place) answers
/// 4k+1 with 4k+2 and 4k+3 with 4k+4; the `echo` (B) answers 4k+2 with
/// 4k+3. `kind`: `spin` polls with a CPU pause only, `yield` gives the CPU
/// away between polls (`sched_yield`), as a spinner must when three
/// processes share two CPUs.
pub(crate) fn helper_floor3(kind: &str, role: &str, ppid: &str, ring: &str, signal: &str) {
    crate::pin_env(if role == "relay" { "SHMBUS_BENCH_PIN_BROKER" } else { "SHMBUS_BENCH_PIN_CLIENTS" });
    if role == "echo" {
        crate::pin_env("SHMBUS_BENCH_PIN_ECHO");
    }
    let (ring, signal) = (open_parent_fd(ppid, ring), open_parent_fd(ppid, signal));
    let map = RingMap::map(ring.as_fd(), signal.as_fd(), FLOOR_GEOMETRY, true).unwrap();
    // Every store here is Release and every load Acquire: each side's store
    // pairs with the next side's load of the same word.
    let word = &map.signal().wake;
    let mine = |v: u32| if role == "relay" { v % 4 == 1 || v % 4 == 3 } else { v % 4 == 2 };
    loop {
        let v = word.load(Ordering::Acquire);
        if v == u32::MAX {
            return;
        }
        if mine(v) {
            word.store(v + 1, Ordering::Release);
        } else if kind == "yield" {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

/// The physical floor of a busy brokered round trip A → broker → B →
/// broker → A: three processes handing one cache line on, four hops, no
/// system call but `sched_yield` (with `kind` = `yield`). On fewer than
/// three CPUs one of them always waits for a CPU.
pub(crate) fn floor3(kind: &str) -> (u64, u64) {
    let (ring, signal, map) = create_ring(FLOOR_GEOMETRY, false).unwrap();
    let me = std::process::id().to_string();
    let (r, s) = (ring.as_raw_fd().to_string(), signal.as_raw_fd().to_string());
    let _relay = Helper::spawn(&["__ring-floor3", kind, "relay", &me, &r, &s]);
    let _echo = Helper::spawn(&["__ring-floor3", kind, "echo", &me, &r, &s]);
    // Release stores pair with the relay's Acquire loads, and back.
    let word = &map.signal().wake;
    let mut next = 1u32;
    let result = crate::timed(200, 5_000, || {
        word.store(next, Ordering::Release);
        while word.load(Ordering::Acquire) != next + 3 {
            if kind == "yield" {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        next += 4;
    });
    word.store(u32::MAX, Ordering::Release);
    result
}

pub(crate) fn diag_floor3() {
    crate::pin_env("SHMBUS_BENCH_PIN_CLIENTS");
    for kind in ["yield", "spin"] {
        let (p50, p99) = floor3(kind);
        println!("3-process floor, {kind}: p50 {:.2} µs, p99 {:.2} µs", p50 as f64 / 1e3, p99 as f64 / 1e3);
    }
}

fn floor(kind: &str) -> (u64, u64) {
    let (ring, signal, map) = create_ring(FLOOR_GEOMETRY, false).unwrap();
    let me = std::process::id().to_string();
    let (r, s) = (ring.as_raw_fd().to_string(), signal.as_raw_fd().to_string());
    let _partner = Helper::spawn(&["__ring-floor", kind, &me, &r, &s]);
    // Release stores pair with the partner's Acquire loads, and back.
    let word = &map.signal().wake;
    let mut next = 1u32;
    let result = rtt(|| {
        word.store(next, Ordering::Release);
        if kind == "futex" {
            futex::wake_all(word).unwrap();
        }
        loop {
            let v = word.load(Ordering::Acquire);
            if v == next + 1 {
                break;
            }
            if kind == "futex" {
                futex::wait(word, v, Some(Duration::from_secs(1))).unwrap();
            } else {
                std::hint::spin_loop();
            }
        }
        next += 2;
    });
    word.store(u32::MAX, Ordering::Release);
    let _ = futex::wake_all(word);
    result
}

fn spin_for(mode: &str) -> u32 {
    if mode == "busy" {
        u32::MAX
    } else {
        0
    }
}

/// Echoes each message of `bench.ring.ping` into `bench.ring.pong`.
pub(crate) fn helper_echo(addr: &str, size: usize, mode: &str) {
    let c = connect_retry(addr);
    let cfg = ChannelConfig { slot_size: size as u32, slot_count: 64, overflow: ChannelOverflow::Overwrite };
    let mut pong = c.channel_publisher("bench.ring.pong", cfg).unwrap();
    let mut ping = c.channel_subscriber("bench.ring.ping").unwrap();
    ping.set_spin(spin_for(mode));
    c.publish("bench.ready", b"").unwrap();
    loop {
        // The closure gets a checked private copy, so it may act on it at
        // once: publish it straight from there.
        match ping.recv(|b| pong.publish(b).unwrap()) {
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

fn ring_rtt(size: usize, mode: &str) -> (u64, u64) {
    let (_broker, addr) = start_broker("ring");
    let c = connect_retry(&addr);
    let ready = c.subscribe("bench.ready").unwrap();
    let cfg = ChannelConfig { slot_size: size as u32, slot_count: 64, overflow: ChannelOverflow::Overwrite };
    let mut ping = c.channel_publisher("bench.ring.ping", cfg).unwrap();
    let _echo = Helper::spawn(&["__ring-echo", &addr, &size.to_string(), mode]);
    ready.recv_timeout(Duration::from_secs(20)).unwrap().expect("echo ready");
    let mut pong = c.channel_subscriber("bench.ring.pong").unwrap();
    pong.set_spin(spin_for(mode));
    let msg = vec![7u8; size];
    rtt(|| {
        let mut loan = ping.loan().unwrap();
        loan[..size].copy_from_slice(&msg);
        loan.send(size).unwrap();
        loop {
            if let ChannelEvent::Message { .. } = pong.recv(|b| b.len()).unwrap() {
                break;
            }
        }
    })
}

/// Counts `n` messages of `bench.ring.tp` and reports its rate.
pub(crate) fn helper_sink(addr: &str, n: u64) {
    let c = connect_retry(addr);
    let mut s = c.channel_subscriber("bench.ring.tp").unwrap();
    c.publish("bench.ready", b"").unwrap();
    let (mut got, mut missed) = (0u64, 0u64);
    let mut start = None;
    while got + missed < n {
        match s.recv_timeout(Duration::from_secs(30), |b| b.len()).unwrap() {
            Some(ChannelEvent::Message { .. }) => got += 1,
            Some(ChannelEvent::Reconnected) => panic!("unexpected reconnection"),
            Some(ChannelEvent::Missed(k)) => missed += k,
            None => break,
        }
        start.get_or_insert_with(Instant::now);
    }
    let rate = got.saturating_sub(1) as f64 / start.map_or(f64::INFINITY, |s| s.elapsed().as_secs_f64());
    let mut report = rate.to_le_bytes().to_vec();
    report.extend_from_slice(&missed.to_le_bytes());
    c.publish("bench.tp.result", &report).unwrap();
    c.flush().unwrap();
}

/// A publisher alone (to count its system calls under strace): opens
/// `bench.ring.tp` in block mode, waits for one reader, publishes `n`.
pub(crate) fn helper_pub(addr: &str, n: u64) {
    let c = connect_retry(addr);
    let cfg = ChannelConfig { slot_size: 8, slot_count: 1 << 16, overflow: ChannelOverflow::Block };
    let mut p = c.channel_publisher("bench.ring.tp", cfg).unwrap();
    while p.readers() < 1 {
        p.update_readers().unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    for i in 0..n {
        p.publish(&i.to_le_bytes()).unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
}

pub(crate) fn ring_throughput(readers: usize) -> (f64, u64) {
    const N: u64 = 5_000_000;
    let (_broker, addr) = start_broker("ringtp");
    let c: Client = connect_retry(&addr);
    let ready = c.subscribe("bench.ready").unwrap();
    let results = c.subscribe("bench.tp.result").unwrap();
    let cfg = ChannelConfig { slot_size: 8, slot_count: 1 << 16, overflow: ChannelOverflow::Block };
    let mut p = c.channel_publisher("bench.ring.tp", cfg).unwrap();
    let _sinks: Vec<Helper> =
        (0..readers).map(|_| Helper::spawn(&["__ring-sink", &addr, &N.to_string()])).collect();
    for _ in 0..readers {
        ready.recv_timeout(Duration::from_secs(20)).unwrap().expect("sink ready");
    }
    let start = Instant::now();
    while p.readers() < readers {
        p.update_readers().unwrap();
        assert!(start.elapsed() < Duration::from_secs(20), "readers never registered");
    }
    for i in 0..N {
        p.publish(&i.to_le_bytes()).unwrap();
    }
    let (mut slowest, mut missed) = (f64::INFINITY, 0);
    for _ in 0..readers {
        match results.recv_timeout(Duration::from_secs(60)).unwrap().expect("result") {
            Event::Message(m) => {
                let b = m.payload();
                slowest = slowest.min(f64::from_le_bytes(b[..8].try_into().unwrap()));
                missed += u64::from_le_bytes(b[8..16].try_into().unwrap());
            }
            Event::Gap { .. } => panic!("a result was lost"),
            Event::Reconnected => panic!("the broker restarted mid-bench"),
        }
    }
    (slowest, missed)
}

/// p50 and p99 of one call of `once`, timing batches of `batch` calls.
fn per_call(batch: usize, mut once: impl FnMut()) -> (u64, u64) {
    let (p50, p99) = crate::timed(200, 20_000, || {
        for _ in 0..batch {
            once();
        }
    });
    (p50.div_ceil(batch as u64), p99.div_ceil(batch as u64))
}

/// One read of a `size`-byte message from a local ring (`ring_read`), and
/// the floor: a `memcpy` of the same bytes out of the same mapping.
fn read_cost(size: usize) -> ((u64, u64), (u64, u64)) {
    let g = Geometry { slot_size: size as u32, slot_count: 2 };
    let (ring, signal, mut w) = create_ring(g, false).unwrap();
    let ro = memfd::reopen_read_only(ring.as_fd()).unwrap();
    let r = RingMap::map(ro.as_fd(), signal.as_fd(), g, false).unwrap();
    let msg: Vec<u8> = (0..size).map(|i| i as u8).collect();
    protocol::publish(&mut w, &mut WriterState::default(), &msg);
    let batch = if size <= 64 { 1000 } else { 4 };
    let mut buf = vec![0u8; size];
    let read = per_call(batch, || {
        let mut st = ReaderState { next: 0 };
        match protocol::try_read(&r, &mut st, &mut buf, |b| std::hint::black_box(b).len()) {
            ReadOutcome::Message { value, .. } => assert_eq!(value, size),
            other => panic!("{other:?}"),
        }
    });
    let mut out = vec![0u8; size];
    let slot = w.slot_data(0);
    let floor = per_call(batch, || {
        out.copy_from_slice(std::hint::black_box(&slot[..size]));
        std::hint::black_box(&mut out);
    });
    (read, floor)
}

pub(crate) fn ring(report: &mut Report) {
    for size in [8usize, 64 * 1024] {
        let (read, memcpy) = read_cost(size);
        report.push(Row::timed("ring", "read_memcpy", size, None, memcpy, ("read_memcpy", memcpy.0)));
        report.push(Row::timed("ring", "ring_read", size, None, read, ("read_memcpy", memcpy.0)));
    }
    let spin_floor = floor("spin");
    // Sleep/wake latency on this VM moves with the guest's halt-polling
    // state, sometimes by 40x between minutes; measure the futex floor and
    // the blocking ring in alternation and keep the median of each.
    let (mut floors, mut blockings) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        floors.push(floor("futex"));
        blockings.push(ring_rtt(8, "block"));
    }
    floors.sort();
    blockings.sort();
    let (futex_floor, blocking_8) = (floors[1], blockings[1]);
    let push = |report: &mut Report, path: &str, size: usize, r: (u64, u64), f: (&str, u64)| {
        report.push(Row::timed("ring", path, size, None, r, f))
    };
    push(report, "spin_floor", 8, spin_floor, ("spin_floor", spin_floor.0));
    push(report, "futex_floor", 8, futex_floor, ("futex_floor", futex_floor.0));
    for size in [8usize, 64 * 1024] {
        push(report, "ring_busy", size, ring_rtt(size, "busy"), ("spin_floor", spin_floor.0));
        let blocking = if size == 8 { blocking_8 } else { ring_rtt(size, "block") };
        push(report, "ring_blocking", size, blocking, ("futex_floor", futex_floor.0));
    }
    let mut one = None;
    for readers in [1usize, 2, 4] {
        let (rate, missed) = ring_throughput(readers);
        let base = *one.get_or_insert(rate);
        report.push(Row {
            scenario: "ring",
            path: "ring_throughput".into(),
            size: 8,
            subscribers: Some(readers as u32),
            p50_ns: None,
            p99_ns: None,
            msgs_per_s: Some(rate),
            floor: "ring_throughput@1".into(),
            ratio_to_floor: base / rate,
            note: format!("{readers} subscribers, block mode, slowest reader; {missed} missed"),
        });
    }
}
