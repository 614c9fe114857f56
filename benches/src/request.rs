//! `request`: calls through the broker (caller → broker → service → broker
//! → caller) beside the same four hops as pub/sub, in the same run.
//!
//! - round trip of one call at 16 B and 4 KiB against `broker_a_b_a` (the
//!   latency scenario's echo: publish a ping, an echo process publishes it
//!   back). One broker, one echo process and one service process serve
//!   both, and the two paths are timed in alternating blocks, so drift on
//!   a shared machine hits both alike; `ratio_to_floor` is call /
//!   `broker_a_b_a` at p50;
//! - calls per second with 64 in flight (one caller keeping 64
//!   `request_async` pending, one service), against the pub/sub echo with
//!   64 pings in flight (the same four hops, the same window) and beside
//!   one-way pub/sub throughput; each the median of 3.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use shmbus::{Client, Event, Subscription};

use crate::{connect_retry, percentiles, start_broker, Helper, Report, Row};

/// The service's name.
const NAME: &str = "bench.svc";
/// A call's timeout: far beyond any round trip, so none times out.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
const RTT_WARMUP: usize = 2_000;
const RTT_ITERS: usize = 20_000;
/// Samples per path before switching to the other.
const RTT_BLOCK: usize = 1_000;
const WINDOW: usize = 64;
const TP_WARMUP: u64 = 10_000;

/// The service process: serves [`NAME`] and echoes every request's
/// payload back as the reply.
pub(crate) fn helper_service(addr: &str) {
    let c = connect_retry(addr);
    let service = c.serve(NAME).unwrap();
    c.publish("bench.svc-ready", b"").unwrap();
    let mut buf = Vec::new();
    for req in &service {
        let Ok(req) = req else { return };
        buf.clear();
        buf.extend_from_slice(req.payload());
        if req.reply(&buf).is_err() {
            return;
        }
    }
}

/// One broker with an echo process (`__echo-bus`, as in `latency`) and a
/// service process; this process holds one connection for each path.
struct Rig {
    _broker: Helper,
    _echo: Helper,
    _service: Helper,
    pubsub: Client,
    pong: Subscription,
    caller: Client,
}

impl Rig {
    fn new() -> Rig {
        let (broker, addr) = start_broker("request");
        let pubsub = connect_retry(&addr);
        let ready = pubsub.subscribe("bench.ready").unwrap();
        let svc_ready = pubsub.subscribe("bench.svc-ready").unwrap();
        let pong = pubsub.subscribe("bench.pong").unwrap();
        let echo = Helper::spawn(&["__echo-bus", &addr]);
        let service = Helper::spawn(&["__service", &addr]);
        ready.recv_timeout(Duration::from_secs(10)).unwrap().expect("echo client ready");
        svc_ready.recv_timeout(Duration::from_secs(10)).unwrap().expect("service ready");
        let caller = connect_retry(&addr);
        Rig { _broker: broker, _echo: echo, _service: service, pubsub, pong, caller }
    }

    fn ping(&self, msg: &[u8]) {
        self.pubsub.publish("bench.ping", msg).unwrap();
        self.pong_back();
    }

    fn pong_back(&self) {
        match self.pong.recv().unwrap() {
            Event::Message(_) => {}
            Event::Gap { missed } => panic!("{missed} pongs lost"),
            Event::Reconnected => panic!("the broker restarted mid-bench"),
        }
    }

    fn call(&self, msg: &[u8]) {
        let reply = self.caller.request(NAME, msg, CALL_TIMEOUT).unwrap();
        assert_eq!(reply.len(), msg.len());
    }

    /// `(p50, p99)` of `broker_a_b_a` and of a call, timed in alternating
    /// blocks.
    fn rtts(&self, size: usize) -> ((u64, u64), (u64, u64)) {
        let msg = vec![1u8; size];
        for _ in 0..RTT_WARMUP {
            self.ping(&msg);
            self.call(&msg);
        }
        let mut pubsub = Vec::with_capacity(RTT_ITERS);
        let mut calls = Vec::with_capacity(RTT_ITERS);
        while calls.len() < RTT_ITERS {
            for _ in 0..RTT_BLOCK {
                let t = Instant::now();
                self.ping(&msg);
                pubsub.push(t.elapsed().as_nanos() as u64);
            }
            for _ in 0..RTT_BLOCK {
                let t = Instant::now();
                self.call(&msg);
                calls.push(t.elapsed().as_nanos() as u64);
            }
        }
        (percentiles(pubsub), percentiles(calls))
    }

    /// Calls per second with `WINDOW` in flight: `n` calls, from the first
    /// sent to the last answered.
    fn calls_per_s(&self, size: usize, n: u64) -> f64 {
        let msg = vec![1u8; size];
        let run = |n: u64| {
            let mut pending = VecDeque::with_capacity(WINDOW);
            let start = Instant::now();
            let mut sent = 0u64;
            while sent < n.min(WINDOW as u64) {
                pending.push_back(self.caller.request_async(NAME, &msg, CALL_TIMEOUT).unwrap());
                sent += 1;
            }
            while let Some(call) = pending.pop_front() {
                let reply = call.wait().unwrap();
                debug_assert_eq!(reply.len(), size);
                drop(reply);
                if sent < n {
                    pending.push_back(self.caller.request_async(NAME, &msg, CALL_TIMEOUT).unwrap());
                    sent += 1;
                }
            }
            n as f64 / start.elapsed().as_secs_f64()
        };
        run(TP_WARMUP);
        run(n)
    }

    /// The pub/sub analogue: `WINDOW` pings in flight to the echo process,
    /// a new one published as each pong comes back; round trips per
    /// second.
    fn pubsub_echoes_per_s(&self, size: usize, n: u64) -> f64 {
        let msg = vec![1u8; size];
        let run = |n: u64| {
            let start = Instant::now();
            let mut sent = 0u64;
            while sent < n.min(WINDOW as u64) {
                self.pubsub.publish("bench.ping", &msg).unwrap();
                sent += 1;
            }
            for _ in 0..n {
                self.pong_back();
                if sent < n {
                    self.pubsub.publish("bench.ping", &msg).unwrap();
                    sent += 1;
                }
            }
            n as f64 / start.elapsed().as_secs_f64()
        };
        run(TP_WARMUP);
        run(n)
    }
}

fn calls_for(size: usize) -> u64 {
    if size <= 64 {
        200_000
    } else {
        100_000
    }
}

pub(crate) fn request(report: &mut Report) {
    let rig = Rig::new();
    for size in [16usize, 4096] {
        let (pubsub, call) = rig.rtts(size);
        let floor = ("broker_a_b_a", pubsub.0);
        report.push(Row::timed("request", "broker_a_b_a", size, None, pubsub, floor));
        let mut row = Row::timed("request", "call_rtt", size, None, call, floor);
        row.note = "caller → broker → service → broker → caller".into();
        report.push(row);
    }
    for size in [16usize, 4096] {
        let n = calls_for(size);
        let (echoes, ()) = crate::median3(|| (rig.pubsub_echoes_per_s(size, n), ()));
        let (calls, ()) = crate::median3(|| (rig.calls_per_s(size, n), ()));
        let (one_way, _) = crate::median3(|| crate::tp_broker(size, false));
        let floor = "broker_a_b_a_64";
        for (path, rate, note) in [
            ("broker_a_b_a_64", echoes, "median of 3; round trips/s, 64 pings in flight"),
            ("calls_64_in_flight", calls, "median of 3; calls/s, 64 request_async pending"),
            ("broker_pub_sub", one_way, "median of 3; one-way msgs/s (a call is two)"),
        ] {
            report.push(Row {
                scenario: "request",
                path: path.into(),
                size,
                subscribers: None,
                p50_ns: None,
                p99_ns: None,
                msgs_per_s: Some(rate),
                floor: floor.into(),
                // As in `throughput`: floor/path, so bigger is slower.
                ratio_to_floor: echoes / rate,
                note: note.into(),
            });
        }
    }
}
