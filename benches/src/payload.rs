//! `payload` and `fanout`: large payloads by sealed memfd, against a pipe
//! between two processes and a plain memcpy.
//!
//! One-way times are taken with CLOCK_MONOTONIC in both processes: the
//! sender reads it just before it starts, the receiver just after it is
//! done and sends the reading back, so no acknowledgement wake-up is
//! counted. Two figures per size:
//! - `transfer`: from a filled loan to the receiver holding a usable
//!   mapping (`Message::payload` returned);
//! - `e2e`: from bytes in a `Vec` to the receiver having read every byte.

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use shmbus::{Client, Event};

use crate::{connect_retry, percentiles, start_broker, Helper, Report, Row};

fn mono_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Reads every byte (eight at a time) so the optimiser cannot skip it.
fn read_all(bytes: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        acc = acc.wrapping_add(u64::from_le_bytes(c.try_into().unwrap()));
    }
    for b in chunks.remainder() {
        acc = acc.wrapping_add(u64::from(*b));
    }
    std::hint::black_box(acc)
}

/// A subscriber process: for each payload, maps it (`map`) or also reads
/// every byte (`read`), then reports the time.
pub(crate) fn helper_payload_sink(addr: &str, mode: &str) {
    let c = connect_retry(addr);
    let s = c.subscribe("bench.payload").unwrap();
    c.publish("bench.ready", b"").unwrap();
    while let Ok(Event::Message(m)) = s.recv() {
        let bytes = m.payload();
        if mode == "read" {
            read_all(bytes);
        }
        let t1 = mono_ns();
        if c.publish("bench.ack", t1.to_le_bytes()).is_err() {
            return;
        }
    }
}

/// A pipe reader process: reads `size`-byte payloads from stdin into a
/// reused buffer (and, in `read` mode, reads them again as the bus sink
/// does), and writes the time to stdout after each.
pub(crate) fn helper_pipe_sink(size: usize, mode: &str) {
    let mut buf = vec![1u8; size];
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    while stdin.read_exact(&mut buf).is_ok() {
        if mode == "read" {
            read_all(&buf);
        }
        let t1 = mono_ns();
        if stdout.write_all(&t1.to_le_bytes()).and_then(|_| stdout.flush()).is_err() {
            return;
        }
    }
}

fn iterations(size: usize) -> usize {
    match size {
        0..=65536 => 300,
        65537..=1048576 => 60,
        1048577..=16777216 => 12,
        _ => 6,
    }
}

/// A broker, a sender client with the given memfd threshold, and `n` sinks.
struct BusRig {
    _broker: Helper,
    _sinks: Vec<Helper>,
    client: Client,
    acks: shmbus::Subscription,
    n: usize,
}

impl BusRig {
    fn new(mode: &str, n: usize, threshold: usize) -> BusRig {
        let (broker, addr) = start_broker("payload");
        let client = Client::options()
            .address(shmbus::Address::parse(&addr).unwrap())
            .memfd_threshold(threshold)
            .connect()
            .unwrap();
        let ready = client.subscribe("bench.ready").unwrap();
        let acks = client.subscribe("bench.ack").unwrap();
        let sinks = (0..n).map(|_| Helper::spawn(&["__payload-sink", &addr, mode])).collect();
        for _ in 0..n {
            ready.recv_timeout(Duration::from_secs(20)).unwrap().expect("sink ready");
        }
        BusRig { _broker: broker, _sinks: sinks, client, acks, n }
    }

    /// Latest receiver time of the `n` acknowledgements.
    fn wait_acks(&self) -> u64 {
        let mut last = 0;
        for _ in 0..self.n {
            match self.acks.recv_timeout(Duration::from_secs(60)).unwrap().expect("ack") {
                Event::Message(m) => last = last.max(u64::from_le_bytes(m.payload().try_into().unwrap())),
                Event::Gap { .. } => panic!("an ack was lost"),
                Event::Reconnected => panic!("the broker restarted mid-bench"),
            }
        }
        last
    }
}

/// `(p50, p99)` of `iters` one-way times.
fn measure(iters: usize, mut once: impl FnMut() -> u64) -> (u64, u64) {
    once(); // warm-up: first-touch costs are not what is measured
    percentiles((0..iters).map(|_| once()).collect())
}

fn memfd_transfer(size: usize, n: usize) -> (u64, u64) {
    let rig = BusRig::new("map", n, 0);
    measure(iterations(size), || {
        let mut loan = rig.client.loan(size).unwrap();
        loan.fill(0x5a);
        let t0 = mono_ns();
        rig.client.publish_loan("bench.payload", loan).unwrap();
        rig.wait_acks() - t0
    })
}

/// From a payload already in a sealed memfd (`publish_fd`): no writable
/// mapping to tear down first.
fn memfd_fd_transfer(size: usize) -> (u64, u64) {
    let rig = BusRig::new("map", 1, 0);
    measure(iterations(size), || {
        let fd = shmbus_proto::sys::memfd::from_bytes("bench", &vec![0x5a; size]).unwrap();
        let t0 = mono_ns();
        rig.client.publish_fd("bench.payload", &fd).unwrap();
        rig.wait_acks() - t0
    })
}

fn bus_e2e(size: usize, threshold: usize) -> (u64, u64) {
    let rig = BusRig::new("read", 1, threshold);
    let data = vec![0x5au8; size];
    measure(iterations(size), || {
        let t0 = mono_ns();
        rig.client.publish("bench.payload", &data).unwrap();
        rig.wait_acks() - t0
    })
}

fn inline_transfer(size: usize) -> (u64, u64) {
    let rig = BusRig::new("map", 1, usize::MAX);
    let data = vec![0x5au8; size];
    measure(iterations(size), || {
        let t0 = mono_ns();
        rig.client.publish("bench.payload", &data).unwrap();
        rig.wait_acks() - t0
    })
}

/// The same bytes through one pipe to each of `n` reader processes, one
/// after the other, as a copying bus would send them.
fn pipe(size: usize, n: usize, mode: &str) -> (u64, u64) {
    let mut sinks: Vec<Helper> = (0..n)
        .map(|_| {
            Helper::spawn_with(&["__pipe-sink", &size.to_string(), mode], Stdio::piped(), Stdio::piped())
        })
        .collect();
    let mut pipes: Vec<_> =
        sinks.iter_mut().map(|h| (h.0.stdin.take().unwrap(), h.0.stdout.take().unwrap())).collect();
    let data = vec![0x5au8; size];
    let r = measure(iterations(size), || {
        let t0 = mono_ns();
        for (to, _) in &mut pipes {
            to.write_all(&data).unwrap();
        }
        let mut last = 0;
        for (_, from) in &mut pipes {
            let mut t = [0u8; 8];
            from.read_exact(&mut t).unwrap();
            last = last.max(u64::from_le_bytes(t));
        }
        last - t0
    });
    drop(pipes);
    drop(sinks);
    r
}

fn memcpy(size: usize) -> (u64, u64) {
    let src = vec![0x5au8; size];
    let mut dst = vec![1u8; size];
    measure(iterations(size), || {
        let t0 = mono_ns();
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&dst);
        mono_ns() - t0
    })
}

pub(crate) fn payload(report: &mut Report) {
    for size in [4096usize, 64 * 1024, 1 << 20, 16 << 20, 64 << 20] {
        let pipe_r = pipe(size, 1, "read");
        let floor = ("pipe", pipe_r.0);
        report.push(Row::timed("payload", "pipe", size, None, pipe_r, floor));
        report.push(Row::timed("payload", "memcpy", size, None, memcpy(size), floor));
        if size <= shmbus_proto::limits::MAX_INLINE_PAYLOAD {
            report.push(Row::timed("payload", "inline_transfer", size, None, inline_transfer(size), floor));
            report.push(Row::timed("payload", "inline_e2e", size, None, bus_e2e(size, usize::MAX), floor));
        }
        report.push(Row::timed("payload", "memfd_transfer", size, None, memfd_transfer(size, 1), floor));
        report.push(Row::timed("payload", "memfd_fd_transfer", size, None, memfd_fd_transfer(size), floor));
        report.push(Row::timed("payload", "memfd_e2e", size, None, bus_e2e(size, 0), floor));
    }
}

pub(crate) fn fanout(report: &mut Report) {
    let size = 16 << 20;
    let memfd_one = memfd_transfer(size, 1);
    let pipe_one = pipe(size, 1, "map");
    for n in [1usize, 2, 4, 8] {
        let m = if n == 1 { memfd_one } else { memfd_transfer(size, n) };
        let p = if n == 1 { pipe_one } else { pipe(size, n, "map") };
        let mut r = Row::timed("fanout", "memfd", size, Some(n as u32), m, ("memfd@1", memfd_one.0));
        r.note = format!("{n} subscribers; {:.1}× faster than pipe copies", p.0 as f64 / m.0 as f64);
        report.push(r);
        let mut r =
            Row::timed("fanout", "pipe_copies", size, Some(n as u32), p, ("pipe_copies@1", pipe_one.0));
        r.note = format!("{n} subscribers");
        report.push(r);
    }
}
