//! shmbus benchmarks: each path beside its physical floor, in one run.
//!
//! ```text
//! cargo run --release -p shmbus-benches -- --help
//! cargo run --release -p shmbus-benches -- [--json] [SCENARIO...]   (default: all)
//! cargo run --release -p shmbus-benches -- latency throughput --json
//! ```
//!
//! The scenarios are the table [`SCENARIOS`] (`--help` lists them).
//! Diagnostics (not part of `all`): `diag-raw-peers` runs the broker between
//! hand-written raw peers, to separate the library's cost from the
//! broker's; `diag-publish-cost` times `publish()` against a raw send.
//!
//! Every peer is a separate process: this binary re-executes itself in a
//! helper role (`__broker`, `__echo-*`, `__pub-*`, `__service`), so the broker under
//! test is the real broker code in its own process, and the floors are
//! measured between two processes as well. The machines are small and
//! noisy: read the ratios of one run, not absolute times across runs.

#![forbid(unsafe_code)]

mod async_ring;
mod bridge;
mod link;
mod payload;
mod policy;
mod request;
mod ring;
mod router;

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::{Child, Command, ExitCode, Stdio};

use clap::Parser;
use std::time::{Duration, Instant};

use serde_json::json;
use shmbus::{Client, Event};
use shmbus_proto::sys::socket::{self, OutPacket, RecvBatch};
use shmbus_proto::Address;

const LAT_WARMUP: usize = 2_000;
const LAT_ITERS: usize = 20_000;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Helper roles (`__name ARGS...`) are this binary's own re-executions,
    // not for people: they take positional arguments and no flags.
    if args.first().is_some_and(|a| a.starts_with("__")) {
        helper(&args);
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    quiet_broken_pipe();
    match std::panic::catch_unwind(|| run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(p) if is_broken_pipe(p.as_ref()) => ExitCode::SUCCESS,
        Err(p) => std::panic::resume_unwind(p),
    }
}

fn run(cli: &Cli) {
    let mut report = Report { json: cli.json, rows: Vec::new() };
    let names: Vec<&str> = if cli.scenarios.is_empty() {
        vec!["all"]
    } else {
        cli.scenarios.iter().map(String::as_str).collect()
    };
    for name in names {
        if name == "all" {
            for s in SCENARIOS.iter().filter(|s| s.in_all) {
                (s.run)(&mut report, cli);
            }
        } else if let Some(s) = SCENARIOS.iter().find(|s| s.name == name) {
            (s.run)(&mut report, cli);
        }
    }
    report.finish();
}

/// A scenario: its name on the command line, what it measures, whether
/// `all` runs it, and how. Adding one is one line in [`SCENARIOS`].
struct Scenario {
    name: &'static str,
    about: &'static str,
    in_all: bool,
    run: fn(&mut Report, &Cli),
}

/// Every scenario, in the order `all` runs them.
#[rustfmt::skip]
const SCENARIOS: &[Scenario] = &[
    Scenario { name: "latency", about: "round trips: broker vs seqpacket and pipe floors", in_all: true, run: |r, _| latency(r) },
    Scenario { name: "throughput", about: "one-way messages per second through the broker", in_all: true, run: |r, _| throughput(r) },
    Scenario { name: "payload", about: "large payloads by sealed memfd, against a pipe and a memcpy", in_all: true, run: |r, _| payload::payload(r) },
    Scenario { name: "fanout", about: "one large memfd payload to many subscribers", in_all: true, run: |r, _| payload::fanout(r) },
    Scenario { name: "ring", about: "ring channels against shared-memory and futex floors", in_all: true, run: |r, _| ring::ring(r) },
    Scenario { name: "link", about: "the shared-memory transport beside the socket", in_all: true, run: |r, _| link::link(r) },
    Scenario { name: "router", about: "the router in-process, with 1 and 100k subscriptions", in_all: true, run: |r, _| router::router(r) },
    Scenario { name: "request", about: "calls through the broker beside pub/sub's four hops", in_all: true, run: |r, _| request::request(r) },
    Scenario { name: "policy", about: "a publish with 1,000 policy rules against none", in_all: true, run: |r, _| policy::policy(r) },
    Scenario { name: "async_ring", about: "waiting from async code against the blocking path", in_all: false, run: |r, _| async_ring::async_ring(r) },
    Scenario { name: "bridge", about: "calls and messages between two brokers through shmbus-bridge and NATS, beside raw NATS", in_all: false, run: |r, _| bridge::bridge(r) },
    Scenario { name: "diag-publish-cost", about: "diagnostic: publish() against a raw send", in_all: false, run: |_, _| diag_publish_cost() },
    Scenario { name: "diag-raw-peers", about: "diagnostic: the broker between hand-written raw peers", in_all: false, run: |_, _| diag_raw_peers() },
    Scenario { name: "diag-link-rtt", about: "diagnostic: link round trips (--idle, --transport)", in_all: false, run: |_, c| link::diag_rtt(c.idle, c.transport.as_str()) },
    Scenario { name: "diag-busy-floor", about: "diagnostic: the busy round trip's floor, 3 processes on one cache line", in_all: false, run: |_, _| ring::diag_floor3() },
    Scenario { name: "diag-link-trickle", about: "diagnostic: broker CPU under a trickle of messages", in_all: false, run: |_, _| diag_link_trickle() },
    Scenario { name: "diag-link-tp", about: "diagnostic: link throughput (--size, --transport)", in_all: false, run: |_, c| link::diag_tp(c.size, c.transport.as_str()) },
];

/// The scenario list for `--help`.
fn scenario_help() -> String {
    let mut s = String::from("Scenarios (none given: all):\n");
    s.push_str("  all                 every scenario below not marked (not in all)\n");
    for sc in SCENARIOS {
        let extra = if sc.in_all { "" } else { " (not in all)" };
        s.push_str(&format!("  {:<19} {}{extra}\n", sc.name, sc.about));
    }
    s.push_str(
        "\nExamples:\n  cargo run --release -p shmbus-benches -- latency throughput\n  \
         cargo run --release -p shmbus-benches -- --json link | jq .\n  \
         cargo run --release -p shmbus-benches -- diag-link-tp --size 4096 --transport socket",
    );
    s
}

fn scenario_name(s: &str) -> Result<String, String> {
    if s == "all" || SCENARIOS.iter().any(|sc| sc.name == s) {
        return Ok(s.to_owned());
    }
    let names: Vec<&str> = SCENARIOS.iter().map(|sc| sc.name).collect();
    Err(format!("no such scenario; one of: all, {}", names.join(", ")))
}

/// shmbus benchmarks: each path beside its physical floor, in one run.
///
/// Every peer is a separate process; read the ratios of one run, not
/// absolute times across runs. Set SHMBUS_TRANSPORT=socket to measure the
/// socket transport alone.
#[derive(Parser, Debug)]
#[command(name = "shmbus-benches", after_help = scenario_help())]
struct Cli {
    /// Scenarios to run, in order (see the list below).
    #[arg(value_name = "SCENARIO", value_parser = scenario_name)]
    scenarios: Vec<String>,
    /// One JSON object per result row, as it is measured, instead of a
    /// table at the end.
    #[arg(long)]
    json: bool,
    /// diag-link-rtt: time round trips on an idle bus (every side asleep), on both transports interleaved.
    #[arg(long)]
    idle: bool,
    /// diag-link-rtt, diag-link-tp: shm or socket.
    #[arg(long, value_name = "TRANSPORT", default_value = "shm", value_parser = ["shm", "socket"])]
    transport: String,
    /// diag-link-tp: payload size in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 16)]
    size: usize,
}

/// `shmbus-benches ... | head`: end quietly when the reader goes away, not
/// with a panic message and a backtrace. println! panics on EPIPE; the
/// panic still unwinds (helper processes are killed by their drops) and
/// `main` turns it into a plain exit.
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !is_broken_pipe(info.payload()) {
            default(info)
        }
    }));
}

fn is_broken_pipe(payload: &(dyn std::any::Any + Send)) -> bool {
    let msg = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("");
    msg.contains("failed printing to stdout") && msg.contains("Broken pipe")
}

/// The helper roles.
fn helper(args: &[String]) {
    match args[0].as_str() {
        "__broker" => helper_broker(&args[1]),
        "__echo-seqpacket" => helper_echo_seqpacket(&args[1]),
        "__echo-pipe" => helper_echo_pipe(),
        "__relay" => helper_relay(&args[1], &args[2]),
        "__echo-bus" => helper_echo_bus(&args[1]),
        "__pub-seqpacket" => {
            helper_pub_seqpacket(&args[1], args[2].parse().unwrap(), args[3].parse().unwrap())
        }
        "__pub-bus" => helper_pub_bus(&args[1], args[2].parse().unwrap(), args[3].parse().unwrap(), 1),
        "__pub-raw" => {
            use shmbus_proto::frame::{
                encode_frame, encode_head, Hello, PayloadRef, Publish, PROTOCOL_VERSION,
            };
            let fd = connect_raw_retry(&args[1]);
            let size: usize = args[2].parse().unwrap();
            let n: u64 = args[3].parse().unwrap();
            let send = |b: &[u8]| {
                socket::send_packet(fd.as_fd(), OutPacket { head: b, payload: &[], fds: &[] }, false).unwrap()
            };
            send(&encode_head(&Hello { version: PROTOCOL_VERSION.into(), name: "rawpub" }).unwrap());
            let frame = encode_frame(
                &Publish { topic: "bench.tp", origin: None, payload: PayloadRef::Inline },
                &vec![0xa5; size],
            )
            .unwrap();
            for _ in 0..n {
                send(&frame);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        "__pub-bus-batched" => {
            helper_pub_bus(&args[1], args[2].parse().unwrap(), args[3].parse().unwrap(), 64)
        }
        "__payload-sink" => payload::helper_payload_sink(&args[1], &args[2]),
        "__pipe-sink" => payload::helper_pipe_sink(args[1].parse().unwrap(), &args[2]),
        "__ring-floor" => ring::helper_floor(&args[1], &args[2], &args[3], &args[4]),
        "__ring-floor3" => ring::helper_floor3(&args[1], &args[2], &args[3], &args[4], &args[5]),
        "__ring-echo" => ring::helper_echo(&args[1], args[2].parse().unwrap(), &args[3]),
        "__ring-sink" => ring::helper_sink(&args[1], args[2].parse().unwrap()),
        "__ring-pub" => ring::helper_pub(&args[1], args[2].parse().unwrap()),
        "__router-mem" => router::helper_mem(&args[1]),
        "__service" => request::helper_service(&args[1]),
        "__link-pub" => link::helper_pub_go(&args[1], args[2].parse().unwrap(), args[3].parse().unwrap()),
        "__link-echo" => link::helper_echo(&args[1]),
        "__bridge" => bridge::helper_bridge(&args[1]),
        other => panic!("unknown helper role {other}"),
    }
}

/// diag-publish-cost: `publish()` against a raw send of the same frame.
fn diag_publish_cost() {
    use shmbus_proto::frame::{encode_frame, PayloadRef, Publish};
    let (_broker, addr) = start_broker("pubcost");
    let c = connect_retry(&addr);
    let n = 1_000_000;
    let payload = [0xa5u8; 16];
    let t = Instant::now();
    for _ in 0..n {
        c.publish("bench.tp", payload).unwrap();
    }
    c.flush().unwrap();
    println!("publish(): {:.0} ns each", t.elapsed().as_nanos() as f64 / n as f64);
    let fd = connect_raw_retry(&addr);
    let send = |b: &[u8]| {
        socket::send_packet(fd.as_fd(), OutPacket { head: b, payload: &[], fds: &[] }, false).unwrap()
    };
    send(
        &shmbus_proto::frame::encode_head(&shmbus_proto::frame::Hello {
            version: shmbus_proto::frame::PROTOCOL_VERSION.into(),
            name: "r",
        })
        .unwrap(),
    );
    let frame =
        encode_frame(&Publish { topic: "bench.tp", origin: None, payload: PayloadRef::Inline }, &payload)
            .unwrap();
    let t = Instant::now();
    for _ in 0..n {
        send(&frame);
    }
    println!("raw send: {:.0} ns each", t.elapsed().as_nanos() as f64 / n as f64);
    let t = Instant::now();
    for _ in 0..n {
        std::hint::black_box(
            shmbus_proto::subject::validate_subject(std::hint::black_box("bench.tp")).is_ok(),
        );
    }
    println!("validate_subject: {:.1} ns each", t.elapsed().as_nanos() as f64 / n as f64);
    let mut buf = Vec::new();
    let t = Instant::now();
    for _ in 0..n {
        shmbus_proto::frame::encode_head_into(
            &mut buf,
            &Publish { topic: "bench.tp", origin: None, payload: PayloadRef::Inline },
        )
        .unwrap();
        std::hint::black_box(&buf);
    }
    println!("encode_head_into: {:.1} ns each", t.elapsed().as_nanos() as f64 / n as f64);
}

/// diag-raw-peers: the broker between hand-written raw peers, to separate
/// the library's cost from the broker's.
fn diag_raw_peers() {
    for raw_pub in [false, true] {
        for _ in 0..3 {
            let who = if raw_pub { "raw publisher" } else { "shmbus publisher" };
            println!("{who} → broker → raw subscriber, 16 B: {:.0} msgs/s", tp_broker_raw_sub(16, raw_pub));
        }
    }
}

/// diag-link-trickle: the broker's CPU share under a trickle of messages.
fn diag_link_trickle() {
    for us in [20u64, 100, 300, 1000] {
        let (share, n) = link::trickle_cpu(Duration::from_micros(us));
        println!("a message every {us} µs ({n} sent): broker CPU {:.1}%", share * 100.0);
    }
}

// ------------------------------------------------------------- report --

pub(crate) struct Row {
    scenario: &'static str,
    path: String,
    size: usize,
    subscribers: Option<u32>,
    p50_ns: Option<u64>,
    p99_ns: Option<u64>,
    msgs_per_s: Option<f64>,
    floor: String,
    ratio_to_floor: f64,
    note: String,
}

impl Row {
    /// A row of p50/p99 times against a floor's p50.
    pub(crate) fn timed(
        scenario: &'static str,
        path: &str,
        size: usize,
        subscribers: Option<u32>,
        r: (u64, u64),
        floor: (&str, u64),
    ) -> Row {
        Row {
            scenario,
            path: path.into(),
            size,
            subscribers,
            p50_ns: Some(r.0),
            p99_ns: Some(r.1),
            msgs_per_s: None,
            floor: floor.0.into(),
            ratio_to_floor: r.0 as f64 / floor.1 as f64,
            note: String::new(),
        }
    }
}

pub(crate) struct Report {
    json: bool,
    rows: Vec<Row>,
}

impl Report {
    pub(crate) fn push(&mut self, row: Row) {
        if self.json {
            let mut v = json!({
                "scenario": row.scenario, "path": row.path, "size": row.size,
                "floor": row.floor, "ratio_to_floor": (row.ratio_to_floor * 1000.0).round() / 1000.0,
            });
            if let Some(p) = row.p50_ns {
                v["p50_ns"] = json!(p);
            }
            if let Some(p) = row.p99_ns {
                v["p99_ns"] = json!(p);
            }
            if let Some(m) = row.msgs_per_s {
                v["msgs_per_s"] = json!(m.round());
            }
            if let Some(n) = row.subscribers {
                v["subscribers"] = json!(n);
            }
            if !row.note.is_empty() {
                v["note"] = json!(row.note);
            }
            println!("{v}");
        }
        self.rows.push(row);
    }

    fn finish(&self) {
        if self.json {
            return;
        }
        println!(
            "{:<11} {:<24} {:>7} {:>10} {:>10} {:>13} {:<18} {:>7}  note",
            "scenario", "path", "size", "p50", "p99", "msgs/s", "floor", "ratio"
        );
        for r in &self.rows {
            let us = |n: Option<u64>| {
                n.map_or("-".into(), |n| {
                    if n >= 10_000_000 {
                        format!("{:.2}ms", n as f64 / 1e6)
                    } else {
                        format!("{:.2}µs", n as f64 / 1000.0)
                    }
                })
            };
            println!(
                "{:<11} {:<24} {:>7} {:>10} {:>10} {:>13} {:<18} {:>6.2}×  {}",
                r.scenario,
                r.path,
                size_label(r.size),
                us(r.p50_ns),
                us(r.p99_ns),
                r.msgs_per_s.map_or("-".into(), |m| format!("{m:.0}")),
                r.floor,
                r.ratio_to_floor,
                r.note
            );
        }
    }
}

fn size_label(n: usize) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}MiB", n >> 20)
    } else if n >= 1024 && n.is_multiple_of(1024) {
        format!("{}KiB", n / 1024)
    } else {
        format!("{n}B")
    }
}

pub(crate) fn percentiles(mut v: Vec<u64>) -> (u64, u64) {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

// ----------------------------------------------------------- helpers --

/// A helper process, killed on drop.
pub(crate) struct Helper(pub(crate) Child);

impl Helper {
    pub(crate) fn spawn(args: &[&str]) -> Helper {
        Helper::spawn_with(args, Stdio::null(), Stdio::null())
    }

    pub(crate) fn spawn_with(args: &[&str], stdin: Stdio, stdout: Stdio) -> Helper {
        let exe = std::env::current_exe().expect("own path");
        let child = Command::new(exe).args(args).stdin(stdin).stdout(stdout).spawn().expect("spawn helper");
        Helper(child)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn unique(tag: &str) -> String {
    // Several brokers of one tag may run at once (the idle round trip's
    // two rigs).
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("@shmbus-bench-{tag}-{}-{n}", std::process::id())
}

pub(crate) fn connect_retry(addr: &str) -> Client {
    let start = Instant::now();
    loop {
        match Client::connect_to(addr) {
            Ok(c) => return c,
            Err(e) if start.elapsed() > Duration::from_secs(10) => panic!("cannot connect to {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// A broker process with queues big enough that the throughput runs
/// measure speed, not overflow (drops are still counted and shown).
pub(crate) fn start_broker(tag: &str) -> (Helper, String) {
    let addr = unique(tag);
    let h = Helper::spawn(&["__broker", &addr]);
    drop(connect_retry(&addr));
    (h, addr)
}

fn helper_broker(addr: &str) {
    pin_env("SHMBUS_BENCH_PIN_BROKER");
    let mut cfg = shmbus_broker::daemon::Config::new(Address::parse(addr).unwrap());
    // A benchmark measures throughput, not the overflow policy: queues
    // deep enough that nothing is dropped, per connection and per uid.
    cfg.bus.queue.frames = 1 << 20;
    cfg.bus.queue.bytes = 1 << 30;
    cfg.bus.uid_limits.set(shmbus_broker::bus::quota::Resource::QueuedBytes, 1 << 31);
    // Diagnostic: SHMBUS_BENCH_LINK_CAPACITY sets the links' size.
    if let Some(c) = std::env::var("SHMBUS_BENCH_LINK_CAPACITY").ok().and_then(|c| c.parse().ok()) {
        cfg.bus.link_capacity = Some(c);
    }
    shmbus_broker::daemon::run(cfg).unwrap();
}

fn helper_echo_seqpacket(addr: &str) {
    let fd = socket::connect(&Address::parse(addr).unwrap()).unwrap();
    let mut batch = RecvBatch::new(1);
    loop {
        match batch.recv(fd.as_fd(), false) {
            Ok(1) => {}
            _ => return,
        }
        let (data, _, _) = batch.packet(0);
        if data.is_empty() {
            return;
        }
        let data = data.to_vec();
        if socket::send_packet(fd.as_fd(), OutPacket { head: &data, payload: &[], fds: &[] }, false).is_err()
        {
            return;
        }
    }
}

fn helper_echo_pipe() {
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut len = [0u8; 4];
    let mut buf = Vec::new();
    while stdin.read_exact(&mut len).is_ok() {
        buf.resize(u32::from_le_bytes(len) as usize, 0);
        if stdin.read_exact(&mut buf).is_err() {
            return;
        }
        let _ = stdout.write_all(&len);
        let _ = stdout.write_all(&buf);
        let _ = stdout.flush();
    }
}

fn helper_echo_bus(addr: &str) {
    let c = connect_retry(addr);
    let sub = c.subscribe("bench.ping").unwrap();
    c.publish("bench.ready", b"").unwrap();
    while let Ok(Event::Message(m)) = sub.recv() {
        if c.publish("bench.pong", m.payload()).is_err() {
            return;
        }
    }
}

fn connect_raw_retry(addr: &str) -> std::os::fd::OwnedFd {
    let start = Instant::now();
    loop {
        match socket::connect(&Address::parse(addr).unwrap()) {
            Ok(fd) => return fd,
            Err(e) if start.elapsed() > Duration::from_secs(10) => panic!("cannot connect to {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// A minimal broker stand-in: everything from one peer to another, batched
/// both ways, with no decoding, routing or queueing. The floor for one
/// brokered hop.
fn helper_relay(listen_addr: &str, out_addr: &str) {
    let out = connect_raw_retry(out_addr);
    let listener = socket::listen(&Address::parse(listen_addr).unwrap(), 4).unwrap();
    socket::set_nonblocking(listener.as_fd(), false).unwrap();
    let input = rustix::net::accept(&listener).unwrap();
    let mut batch = RecvBatch::new(32);
    loop {
        let n = match batch.recv(input.as_fd(), false) {
            Ok(n) => n,
            Err(_) => return,
        };
        let mut packets = Vec::with_capacity(n);
        for i in 0..n {
            let (data, _, _) = batch.packet(i);
            if data.is_empty() {
                return;
            }
            packets.push(data.to_vec());
        }
        let out_packets: Vec<OutPacket<'_>> =
            packets.iter().map(|p| OutPacket { head: p, payload: &[], fds: &[] }).collect();
        let mut sent = 0;
        while sent < out_packets.len() {
            match socket::send_packets(out.as_fd(), &out_packets[sent..], false) {
                Ok(k) => sent += k,
                Err(_) => return,
            }
        }
    }
}

fn helper_pub_seqpacket(addr: &str, size: usize, count: u64) {
    let fd = connect_raw_retry(addr);
    let payload = vec![0xa5u8; size];
    for _ in 0..count {
        socket::send_packet(fd.as_fd(), OutPacket { head: &payload, payload: &[], fds: &[] }, false).unwrap();
    }
}

fn helper_pub_bus(addr: &str, size: usize, count: u64, batch: u64) {
    let c = connect_retry(addr);
    let payload = vec![0xa5u8; size];
    if batch == 1 {
        for _ in 0..count {
            c.publish("bench.tp", &payload).unwrap();
        }
    } else {
        let mut left = count;
        while left > 0 {
            let k = left.min(batch);
            c.publish_many((0..k).map(|_| ("bench.tp", &payload[..]))).unwrap();
            left -= k;
        }
    }
    c.flush().unwrap();
}

// ----------------------------------------------------------- latency --

/// `(p50, p99)` of `iters` timed calls of `once`, after `warmup` untimed.
pub(crate) fn timed(warmup: usize, iters: usize, mut once: impl FnMut()) -> (u64, u64) {
    for _ in 0..warmup {
        once();
    }
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        once();
        v.push(t.elapsed().as_nanos() as u64);
    }
    percentiles(v)
}

fn time_rtts(once: impl FnMut()) -> (u64, u64) {
    timed(LAT_WARMUP, LAT_ITERS, once)
}

fn rtt_seqpacket(size: usize) -> (u64, u64) {
    let addr = unique("floor");
    let listener = socket::listen(&Address::parse(&addr).unwrap(), 4).unwrap();
    let _echo = Helper::spawn(&["__echo-seqpacket", &addr]);
    socket::set_nonblocking(listener.as_fd(), false).unwrap();
    let fd = rustix::net::accept(&listener).unwrap();
    let msg = vec![1u8; size];
    let mut batch = RecvBatch::new(1);
    time_rtts(|| {
        socket::send_packet(fd.as_fd(), OutPacket { head: &msg, payload: &[], fds: &[] }, false).unwrap();
        assert_eq!(batch.recv(fd.as_fd(), false).unwrap(), 1);
    })
}

fn rtt_pipe(size: usize) -> (u64, u64) {
    let mut echo = Helper::spawn_with(&["__echo-pipe"], Stdio::piped(), Stdio::piped());
    let mut to = echo.0.stdin.take().unwrap();
    let mut from = echo.0.stdout.take().unwrap();
    let mut msg = (size as u32).to_le_bytes().to_vec();
    msg.extend(std::iter::repeat_n(1u8, size));
    let mut back = vec![0u8; msg.len()];
    time_rtts(|| {
        to.write_all(&msg).unwrap();
        from.read_exact(&mut back).unwrap();
    })
}

fn rtt_broker(size: usize) -> (u64, u64) {
    let (_broker, addr) = start_broker("lat");
    let c = connect_retry(&addr);
    let ready = c.subscribe("bench.ready").unwrap();
    let pong = c.subscribe("bench.pong").unwrap();
    let _echo = Helper::spawn(&["__echo-bus", &addr]);
    ready.recv_timeout(Duration::from_secs(10)).unwrap().expect("echo client ready");
    let msg = vec![1u8; size];
    time_rtts(|| {
        c.publish("bench.ping", &msg).unwrap();
        let _ = pong.recv().unwrap();
    })
}

fn rtt_self(size: usize) -> (u64, u64) {
    let (_broker, addr) = start_broker("self");
    let c = connect_retry(&addr);
    let s = c.subscribe("bench.self").unwrap();
    let msg = vec![1u8; size];
    time_rtts(|| {
        c.publish("bench.self", &msg).unwrap();
        let _ = s.recv().unwrap();
    })
}

fn latency(report: &mut Report) {
    for size in [16usize, 1024] {
        let floor = rtt_seqpacket(size);
        let rows = [
            ("seqpacket_floor", floor),
            ("pipe", rtt_pipe(size)),
            ("broker_a_b_a", rtt_broker(size)),
            ("broker_self_forward", rtt_self(size)),
        ];
        for (path, (p50, p99)) in rows {
            report.push(Row {
                scenario: "latency",
                path: path.into(),
                size,
                subscribers: None,
                p50_ns: Some(p50),
                p99_ns: Some(p99),
                msgs_per_s: None,
                floor: "seqpacket_floor".into(),
                ratio_to_floor: p50 as f64 / floor.0 as f64,
                note: String::new(),
            });
        }
    }
}

// -------------------------------------------------------- throughput --

fn count_for(size: usize) -> u64 {
    match size {
        0..=64 => 400_000,
        65..=2048 => 200_000,
        _ => 50_000,
    }
}

/// Raw seqpacket, one direction, pipelined: msgs/s.
fn tp_seqpacket(size: usize) -> f64 {
    let n = count_for(size);
    let addr = unique("tpfloor");
    let listener = socket::listen(&Address::parse(&addr).unwrap(), 4).unwrap();
    socket::set_nonblocking(listener.as_fd(), false).unwrap();
    let _p = Helper::spawn(&["__pub-seqpacket", &addr, &size.to_string(), &n.to_string()]);
    let fd = rustix::net::accept(&listener).unwrap();
    receive_rate(&fd, n)
}

/// Receives `n` raw packets; the rate from the first to the last.
fn receive_rate(fd: &std::os::fd::OwnedFd, n: u64) -> f64 {
    let mut batch = RecvBatch::new(64);
    let mut got = 0u64;
    let mut start = None;
    while got < n {
        let k = batch.recv(fd.as_fd(), false).unwrap();
        start.get_or_insert_with(Instant::now);
        got += k as u64;
    }
    (n - 1) as f64 / start.unwrap().elapsed().as_secs_f64()
}

/// Raw seqpacket through a relay process that forwards in batches: the
/// floor for a brokered hop (three processes, two hops, no bus logic).
fn tp_relay(size: usize) -> f64 {
    let n = count_for(size);
    let out_addr = unique("relay-out");
    let in_addr = unique("relay-in");
    let listener = socket::listen(&Address::parse(&out_addr).unwrap(), 4).unwrap();
    socket::set_nonblocking(listener.as_fd(), false).unwrap();
    let _relay = Helper::spawn(&["__relay", &in_addr, &out_addr]);
    let fd = rustix::net::accept(&listener).unwrap();
    let _p = Helper::spawn(&["__pub-seqpacket", &in_addr, &size.to_string(), &n.to_string()]);
    receive_rate(&fd, n)
}

/// Through the broker: publisher process → broker → this subscriber.
/// Returns (delivered msgs/s, dropped).
pub(crate) fn tp_broker(size: usize, batched: bool) -> (f64, u64) {
    let n = count_for(size);
    let (_broker, addr) = start_broker("tp");
    let c = connect_retry(&addr);
    let s = c.subscribe("bench.tp").unwrap();
    let mode = if batched { "__pub-bus-batched" } else { "__pub-bus" };
    let p = Helper::spawn(&[mode, &addr, &size.to_string(), &n.to_string()]);
    let cpu0 = [cpu_ticks(_broker.0.id()), cpu_ticks(p.0.id()), cpu_ticks(std::process::id())];
    let mut got = 0u64;
    let mut missed = 0u64;
    let mut start = None;
    while got + missed < n {
        match s.recv_timeout(Duration::from_secs(30)).unwrap().expect("stream stalled") {
            Event::Message(_) => got += 1,
            Event::Gap { missed: m } => missed += m,
            Event::Reconnected => panic!("the broker restarted mid-bench"),
        }
        start.get_or_insert_with(Instant::now);
    }
    let rate = (got.saturating_sub(1)) as f64 / start.unwrap().elapsed().as_secs_f64();
    if std::env::var_os("SHMBUS_BENCH_CPU").is_some() {
        let cpu1 = [cpu_ticks(_broker.0.id()), cpu_ticks(p.0.id()), cpu_ticks(std::process::id())];
        let us = |i: usize| (cpu1[i] - cpu0[i]) as f64 * 10_000.0 / n as f64;
        eprintln!(
            "cpu µs/msg at {size}B: broker {:.2}, publisher {:.2}, subscriber {:.2}",
            us(0),
            us(1),
            us(2)
        );
    }
    (rate, missed)
}

/// utime + stime of a process, in clock ticks (100 Hz).
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // Fields 14 and 15 of stat; after the comm they are the 12th and 13th,
    // and the state letter (field 3) does not parse as a number.
    f.get(10).copied().unwrap_or(0) + f.get(11).copied().unwrap_or(0)
}

/// Diagnostic: the broker with a raw subscriber (hand-written protocol, a
/// plain recvmmsg loop) instead of the client library, to tell the
/// library's receive cost from the broker's.
fn tp_broker_raw_sub(size: usize, raw_pub: bool) -> f64 {
    use shmbus_proto::frame::{encode_head, Hello, Overflow, Subscribe, PROTOCOL_VERSION};
    let n = count_for(size);
    let (_broker, addr) = start_broker("tpraw");
    let fd = socket::connect(&Address::parse(&addr).unwrap()).unwrap();
    let send = |b: &[u8]| {
        socket::send_packet(fd.as_fd(), OutPacket { head: b, payload: &[], fds: &[] }, false).unwrap()
    };
    let mut batch = RecvBatch::new(64);
    send(&encode_head(&Hello { version: PROTOCOL_VERSION.into(), name: "raw" }).unwrap());
    batch.recv(fd.as_fd(), false).unwrap();
    send(&encode_head(&Subscribe { sub_id: 1, pattern: "bench.tp", overflow: Overflow::Gap }).unwrap());
    batch.recv(fd.as_fd(), false).unwrap();
    let mode = if raw_pub { "__pub-raw" } else { "__pub-bus" };
    let _p = Helper::spawn(&[mode, &addr, &size.to_string(), &n.to_string()]);
    receive_rate(&fd, n)
}

/// Median of three runs of `f` (by rate): one run on a shared 2-vCPU
/// machine is too noisy to report alone.
pub(crate) fn median3<T: Copy>(mut f: impl FnMut() -> (f64, T)) -> (f64, T) {
    let mut runs = [f(), f(), f()];
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    runs[1]
}

fn throughput(report: &mut Report) {
    for size in [16usize, 1024, 16 * 1024] {
        let (floor, ()) = median3(|| (tp_seqpacket(size), ()));
        let (relay, ()) = median3(|| (tp_relay(size), ()));
        let (bus, dropped) = median3(|| tp_broker(size, false));
        let (batched, batched_dropped) = median3(|| tp_broker(size, true));
        let note = |dropped: u64| {
            if dropped > 0 {
                format!("median of 3; {dropped} dropped (gap-reported)")
            } else {
                "median of 3".into()
            }
        };
        for (path, rate, note) in [
            ("seqpacket_floor", floor, "median of 3".to_string()),
            ("seqpacket_relay_floor", relay, "median of 3; pub → relay process → sub".to_string()),
            ("broker_pub_sub", bus, note(dropped)),
            ("broker_pub_many_sub", batched, note(batched_dropped)),
        ] {
            report.push(Row {
                scenario: "throughput",
                path: path.into(),
                size,
                subscribers: None,
                p50_ns: None,
                p99_ns: None,
                msgs_per_s: Some(rate),
                floor: "seqpacket_floor".into(),
                // For rates, the ratio is floor/path so that, as for
                // latency, 1.0 is the floor and bigger is slower.
                ratio_to_floor: floor / rate,
                note,
            });
        }
    }
}

/// Pins this process to the CPU named by `var`, if set: the busy round
/// trips (`diag-link-rtt`, `diag-busy-floor`) depend on which processes
/// share a CPU, and these fix it. `SHMBUS_BENCH_PIN_BROKER` is the broker
/// (the floor's relay), `SHMBUS_BENCH_PIN_CLIENTS` this process and the
/// echo, `SHMBUS_BENCH_PIN_ECHO` the echo alone.
pub(crate) fn pin_env(var: &str) {
    if let Some(cpu) = std::env::var(var).ok().and_then(|v| v.parse::<usize>().ok()) {
        let mut set = rustix::thread::CpuSet::new();
        set.set(cpu);
        if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
            eprintln!("{var}={cpu}: cannot pin: {e}");
        }
    }
}
