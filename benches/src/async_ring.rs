//! `async_ring`: what waiting from async code costs, against the blocking
//! path in the same run, both between two processes through a real broker.
//!
//! - ring channel round trip at 8 B, the reader sleeping at once (spin 0):
//!   `ring_blocking` (the reader sleeps on the futex itself) against
//!   `ring_async` (an `AsyncChannelSubscriber` on a current-thread tokio
//!   runtime: the futex is waited on tokio's blocking pool, which then
//!   wakes the task: one thread hop more). The echo process reads with the
//!   blocking reader in both. Median of 3 rounds taken in alternation, as
//!   sleep/wake latency on these VMs moves between minutes;
//! - pub/sub to oneself through the broker at 16 B (`pubsub_self_blocking`
//!   against `pubsub_self_async`: the socket waited on by tokio's reactor
//!   instead of a blocking receive).

use std::time::{Duration, Instant};

use shmbus::{AsyncChannelSubscriber, AsyncClient, ChannelConfig, ChannelEvent, ChannelOverflow, Event};

use crate::{connect_retry, percentiles, start_broker, Helper, Report, Row};

const WARMUP: usize = 2_000;
const ITERS: usize = 20_000;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime")
}

/// Round trips through a ring echo (`__ring-echo` in block mode), read
/// here by the blocking reader or, with `asynch`, the async one.
fn ring_rtt(size: usize, asynch: bool) -> (u64, u64) {
    let (_broker, addr) = start_broker("aring");
    let c = connect_retry(&addr);
    let ready = c.subscribe("bench.ready").unwrap();
    let cfg = ChannelConfig { slot_size: size as u32, slot_count: 64, overflow: ChannelOverflow::Overwrite };
    let mut ping = c.channel_publisher("bench.ring.ping", cfg).unwrap();
    let _echo = Helper::spawn(&["__ring-echo", &addr, &size.to_string(), "block"]);
    ready.recv_timeout(Duration::from_secs(20)).unwrap().expect("echo ready");
    let mut pong = c.channel_subscriber("bench.ring.pong").unwrap();
    pong.set_spin(0);
    let msg = vec![7u8; size];
    let mut send = move || {
        let mut loan = ping.loan().unwrap();
        loan[..size].copy_from_slice(&msg);
        loan.send(size).unwrap();
    };
    if !asynch {
        return crate::timed(WARMUP, ITERS, || {
            send();
            while !matches!(pong.recv(|b| b.len()).unwrap(), ChannelEvent::Message { .. }) {}
        });
    }
    runtime().block_on(async move {
        let mut pong = AsyncChannelSubscriber::new(pong);
        let mut times = Vec::with_capacity(ITERS);
        for i in 0..WARMUP + ITERS {
            let t = Instant::now();
            send();
            while !matches!(pong.recv(|b| b.len()).await.unwrap(), ChannelEvent::Message { .. }) {}
            if i >= WARMUP {
                times.push(t.elapsed().as_nanos() as u64);
            }
        }
        percentiles(times)
    })
}

/// Round trips of a publish to one's own subscription through the broker.
fn pubsub_self(size: usize, asynch: bool) -> (u64, u64) {
    let (_broker, addr) = start_broker("aself");
    let msg = vec![1u8; size];
    if !asynch {
        let c = connect_retry(&addr);
        let s = c.subscribe("bench.self").unwrap();
        return crate::timed(WARMUP, ITERS, || {
            c.publish("bench.self", &msg).unwrap();
            let _ = s.recv().unwrap();
        });
    }
    runtime().block_on(async move {
        let c = AsyncClient::from_blocking(connect_retry(&addr)).unwrap();
        let s = c.subscribe("bench.self").await.unwrap();
        let mut times = Vec::with_capacity(ITERS);
        for i in 0..WARMUP + ITERS {
            let t = Instant::now();
            c.publish("bench.self", &msg).await.unwrap();
            let Event::Message(_) = s.recv().await.unwrap() else { panic!("a gap in a ping-pong") };
            if i >= WARMUP {
                times.push(t.elapsed().as_nanos() as u64);
            }
        }
        percentiles(times)
    })
}

pub(crate) fn async_ring(report: &mut Report) {
    let (mut blocking, mut asynch) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        blocking.push(ring_rtt(8, false));
        asynch.push(ring_rtt(8, true));
    }
    blocking.sort();
    asynch.sort();
    let (blocking, asynch) = (blocking[1], asynch[1]);
    let note = "median of 3; reader spin 0".to_string();
    let floor = ("ring_blocking", blocking.0);
    report.push(Row {
        note: note.clone(),
        ..Row::timed("async_ring", "ring_blocking", 8, None, blocking, floor)
    });
    report.push(Row { note, ..Row::timed("async_ring", "ring_async", 8, None, asynch, floor) });
    let blocking = pubsub_self(16, false);
    let asynch = pubsub_self(16, true);
    let floor = ("pubsub_self_blocking", blocking.0);
    report.push(Row::timed("async_ring", "pubsub_self_blocking", 16, None, blocking, floor));
    report.push(Row::timed("async_ring", "pubsub_self_async", 16, None, asynch, floor));
}
