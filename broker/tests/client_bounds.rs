//! The client's own queues under a flood: a subscriber process whose
//! connection keeps reading (another subscription is read) while one
//! subscription is not, fed by a publisher that floods it with inline
//! payloads or memfds. The subscriber's memory and open fds must stay
//! within its bounds, every message dropped there must be closed at once
//! and reported as one `Gap` with the exact count, where it went missing.
//!
//! The subscriber is a separate process (this binary, run as a helper), so
//! its memory and fd table are its own and nothing else in this test
//! binary moves them. Every wait is bounded; the helper and the broker are
//! killed on drop.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};

use common::*;
use shmbus::Event;

/// Environment that turns this test binary into the subscriber helper.
const ROLE: &str = "SHMBUS_BOUNDS_ROLE";
const ADDR: &str = "SHMBUS_BOUNDS_ADDR";
/// Subjects the helper subscribes to and leaves unread, comma-separated.
const FLOODS: &str = "SHMBUS_BOUNDS_FLOODS";
/// `ConnectOptions` bounds, each optional: `local_queue_bytes`,
/// `local_queue_fds`, `local_total_bytes`, `local_total_fds`.
const BYTES: &str = "SHMBUS_BOUNDS_BYTES";
const FDS: &str = "SHMBUS_BOUNDS_FDS";
const TOTAL_BYTES: &str = "SHMBUS_BOUNDS_TOTAL_BYTES";
const TOTAL_FDS: &str = "SHMBUS_BOUNDS_TOTAL_FDS";
/// Warm-up messages the parent sends on [`CTL`] before the baseline.
const WARM: &str = "SHMBUS_BOUNDS_WARM";
/// What the helper says to its parent (libtest shares its stdout).
const SAY: &str = "BOUNDS:";
/// The subject the helper reads: it keeps its connection reading, so what
/// the floods bring lands in their (unread) queues.
const CTL: &str = "ctl";

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().map(|v| v.parse().unwrap())
}

/// A field of /proc/self/status, in bytes (`VmRSS`, `VmHWM`).
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("{field} in status"));
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Not a test on its own: the body of the subscriber helper, run only when
/// a test spawns this binary with `--ignored --exact helper_process`.
#[test]
#[ignore = "helper process body, spawned by the other tests"]
fn helper_process() {
    let role = std::env::var(ROLE).expect("run as a helper by another test");
    assert_eq!(role, "subscriber");
    let addr = std::env::var(ADDR).unwrap();
    let mut options = shmbus::Client::options().address(shmbus::Address::parse(&addr).unwrap());
    if let Some(n) = env_usize(BYTES) {
        options = options.local_queue_bytes(n);
    }
    if let Some(n) = env_usize(FDS) {
        options = options.local_queue_fds(n);
    }
    if let Some(n) = env_usize(TOTAL_BYTES) {
        options = options.local_total_bytes(n);
    }
    if let Some(n) = env_usize(TOTAL_FDS) {
        options = options.local_total_fds(n);
    }
    let client = options.connect().unwrap();
    let floods: Vec<(String, shmbus::Subscription)> = std::env::var(FLOODS)
        .unwrap()
        .split(',')
        .map(|t| (t.to_owned(), client.subscribe(t).unwrap()))
        .collect();
    let ctl = client.subscribe(CTL).unwrap();
    println!("{SAY}ready");
    // Warm-up: big messages that fill the receive buffers once, so they do
    // not count as growth. The bounds apply to this subscription too, so
    // some may be dropped: they count all the same.
    let warm: u64 = env_usize(WARM).unwrap().try_into().unwrap();
    let mut seen = 0;
    while seen < warm {
        match ctl.recv_timeout(PATIENCE).unwrap() {
            Some(Event::Message(_)) => seen += 1,
            Some(Event::Reconnected) => panic!("unexpected reconnection"),
            Some(Event::Gap { missed }) => seen += missed,
            None => panic!("warm-up: {seen} of {warm} after {PATIENCE:?}"),
        }
    }
    let (fds0, hwm0, rss0) = (open_fds(), status_bytes("VmHWM:"), status_bytes("VmRSS:"));
    println!("{SAY}baseline");
    match ctl.recv_timeout(PATIENCE).unwrap() {
        Some(Event::Message(m)) if m.payload() == b"measure" => {}
        other => panic!("control: {other:?}"),
    }
    // Everything the publisher sent before "measure" has been read by now
    // (one publisher, one connection: in order), queued or dropped.
    let (fds1, hwm1, rss1) = (open_fds(), status_bytes("VmHWM:"), status_bytes("VmRSS:"));
    let mut report = format!("fds0={fds0} fds1={fds1} hwm0={hwm0} hwm1={hwm1} rss0={rss0} rss1={rss1}");
    for (topic, sub) in &floods {
        // Run-length: "M17,G495" is 17 messages, then a gap of 495.
        let mut runs: Vec<(char, u64)> = Vec::new();
        while let Some(ev) = sub.try_recv().unwrap() {
            let (kind, n) = match ev {
                Event::Message(m) => {
                    assert_eq!(m.topic(), topic);
                    assert!(m.payload().iter().all(|&b| b == m.seq() as u8), "payload {} intact", m.seq());
                    ('M', 1)
                }
                Event::Reconnected => panic!("unexpected reconnection"),
                Event::Gap { missed } => ('G', missed),
            };
            match runs.last_mut() {
                Some((k, c)) if *k == kind && kind == 'M' => *c += n,
                _ => runs.push((kind, n)),
            }
        }
        let runs: Vec<String> = runs.iter().map(|(k, n)| format!("{k}{n}")).collect();
        report += &format!(" {topic}={}", runs.join(","));
    }
    println!("{SAY}result {report}");
}

fn helper(b: &Broker, floods: &[&str], warm: usize, bounds: &[(&str, usize)]) -> Helper {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "helper_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE, "subscriber")
        .env(ADDR, &b.address)
        .env(FLOODS, floods.join(","))
        .env(WARM, warm.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in bounds {
        cmd.env(k, v.to_string());
    }
    Helper::spawn(&mut cmd, SAY)
}

/// What the helper measured and received, and the line that said it.
struct Report(HashMap<String, String>, String);

impl Report {
    fn parse(line: &str) -> Report {
        let fields = line
            .split_whitespace()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect();
        Report(fields, line.to_owned())
    }

    fn num(&self, key: &str) -> u64 {
        self.0[key].parse().unwrap()
    }

    /// The events of `topic`, run-length: messages then a gap is
    /// `[('M', 17), ('G', 495)]`.
    fn events(&self, topic: &str) -> Vec<(char, u64)> {
        self.0[topic]
            .split(',')
            .filter(|r| !r.is_empty())
            .map(|r| (r.chars().next().unwrap(), r[1..].parse().unwrap()))
            .collect()
    }
}

/// A broker whose own queues hold the whole flood, so that every drop in
/// these tests is the client's.
fn roomy_broker(tag: &str) -> Broker {
    Broker::start_with(
        tag,
        &[
            "--queue-bytes",
            "268435456",
            "--queue-frames",
            "100000",
            "--queue-fds",
            "1024",
            "--uid-queue-bytes",
            "536870912",
            "--uid-queue-fds",
            "4096",
            "--uid-unacked-fds",
            "4096",
            "--memfd-quota-fds",
            "4096",
        ],
    )
}

/// The flooding client, which counts its publishes: the subscriber sees
/// that count as `seq`, and each flood payload is filled with it (as a
/// byte), so the subscriber can check what it kept is intact.
struct Publisher {
    client: shmbus::Client,
    sent: u64,
}

impl Publisher {
    fn new(b: &Broker) -> Publisher {
        Publisher { client: b.client(), sent: 0 }
    }

    fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.client.publish(topic, payload).unwrap();
        self.sent += 1;
    }

    /// A payload of `len` bytes marked with the seq it will carry.
    fn flood(&mut self, topic: &str, len: usize) {
        let mark = (self.sent + 1) as u8;
        self.publish(topic, &vec![mark; len]);
    }

    /// Brings `h` to its baseline: its receive buffers warmed with `warm`
    /// big messages first (as many as `h` was told), so they do not count
    /// as growth.
    fn baseline(&mut self, h: &mut Helper, warm: usize) {
        h.expect("ready");
        for _ in 0..warm {
            self.publish(CTL, &[0u8; 60 * 1024]);
        }
        h.expect("baseline");
    }

    fn measure(&mut self, h: &mut Helper) -> Report {
        self.publish(CTL, b"measure");
        Report::parse(&h.expect("result"))
    }
}

/// Inline payloads: 768 of 60 KiB (45 MiB) at a subscription bounded to
/// 1 MiB. The subscriber's peak memory grows by about the bound, never by
/// the flood; what did not fit is one gap with the exact count.
#[test]
fn an_inline_flood_is_bounded_in_bytes() {
    const N: u64 = 768;
    const LEN: usize = 60 * 1024;
    const BOUND: usize = 1 << 20;
    let b = roomy_broker("bounds-bytes");
    let mut h = helper(&b, &["flood.bytes"], 256, &[(BYTES, BOUND)]);
    let mut p = Publisher::new(&b);
    p.baseline(&mut h, 256);
    for _ in 0..N {
        p.flood("flood.bytes", LEN);
    }
    let r = p.measure(&mut h);
    h.finish();
    // The receive buffers (64 packets) and the bound are what may grow.
    let grew = r.num("hwm1").saturating_sub(r.num("hwm0"));
    assert!(
        grew < 16 << 20,
        "the subscriber's peak memory grew by {grew} bytes under a {} MiB flood ({})",
        (N as usize * LEN) >> 20,
        r.1
    );
    let events = r.events("flood.bytes");
    let [('M', kept), ('G', missed)] = events[..] else { panic!("messages, then one gap: {}", r.1) };
    assert_eq!(kept + missed, N, "every message is delivered or counted: {}", r.1);
    // 1 MiB holds 17 messages of 60 KiB with their topic and bookkeeping.
    assert!((16..=17).contains(&kept), "the bound is 1 MiB: {kept} messages of {LEN} bytes kept");
}

/// Memfd payloads: 200 at a subscription bounded to 8 fds. The subscriber
/// holds 8 more fds, not 200: each memfd dropped is closed as it arrives.
#[test]
fn a_memfd_flood_is_bounded_in_fds_and_drops_close_at_once() {
    const N: u64 = 200;
    let b = roomy_broker("bounds-fds");
    let mut h = helper(&b, &["flood.fds"], 128, &[(FDS, 8)]);
    let mut p = Publisher::new(&b);
    p.baseline(&mut h, 128);
    for _ in 0..N {
        // Over the memfd threshold: each goes as its own sealed memfd.
        p.flood("flood.fds", 100 * 1024);
    }
    let r = p.measure(&mut h);
    h.finish();
    let (fds0, fds1) = (r.num("fds0"), r.num("fds1"));
    assert!(
        fds1 <= fds0 + 8,
        "the subscriber went from {fds0} to {fds1} open fds under {N} memfds ({})",
        r.1
    );
    assert_eq!(r.events("flood.fds"), [('M', 8), ('G', N - 8)], "{}", r.1);
}

/// The bound across subscriptions: two floods of memfds, alternating, at a
/// connection bounded to 6 fds in all (each subscription alone may hold
/// 256). Each keeps 3 and counts the rest.
#[test]
fn the_connection_bound_spans_subscriptions() {
    const N: u64 = 50;
    let b = roomy_broker("bounds-total");
    let mut h = helper(&b, &["flood.a", "flood.b"], 0, &[(TOTAL_FDS, 6)]);
    let mut p = Publisher::new(&b);
    p.baseline(&mut h, 0);
    for _ in 0..N {
        p.flood("flood.a", 100 * 1024);
        p.flood("flood.b", 100 * 1024);
    }
    let r = p.measure(&mut h);
    h.finish();
    let (fds0, fds1) = (r.num("fds0"), r.num("fds1"));
    assert!(fds1 <= fds0 + 6, "the subscriber went from {fds0} to {fds1} open fds ({})", r.1);
    assert_eq!(r.events("flood.a"), [('M', 3), ('G', N - 3)], "{}", r.1);
    assert_eq!(r.events("flood.b"), [('M', 3), ('G', N - 3)], "{}", r.1);
}
