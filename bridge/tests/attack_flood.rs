//! A hostile NATS publisher floods plain publishes on an exported service
//! name with a forged `Shmbus-Bridge` header. Each becomes a local send;
//! the header must not make each cost the local writer (which also
//! publishes every imported message locally) more than a send without it,
//! or the flood starves an honest publisher's imported messages.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use shmbus_bridge::stats::DirStatus;

#[test]
#[ignore = "the harness's broker role, not a test"]
fn broker_process() {
    common::broker_process();
}

const FLOOD: u64 = 30_000;
const EVERY: u64 = 10; // one bystander message per EVERY flood messages
const BY: u64 = FLOOD / EVERY;

struct Outcome {
    delivered: u64,
    dropped: u64,
    sends: u64,
    looped: u64,
}

fn calls(d: &DirStatus) -> u64 {
    d.calls_ok + d.calls_failed.values().sum::<u64>()
}

/// One run: bridge `fA` imports `t.>` and exports `svc.>`; a local client
/// owns `svc.fire` and another counts `t.>`. A NATS client floods
/// `svc.fire` (with `forged` as `Shmbus-Bridge`, if any) while an honest
/// one publishes on `t.by`. With `second`, a bridge `fB` runs on the same
/// broker too.
fn run(forged: Option<&str>, second: bool) -> Outcome {
    let nats = Nats::start(None);
    let broker = Broker::start("flood");
    let a = Bridge::start(
        "fA",
        &broker,
        &nats,
        "import = [\"t.>\"]\nservices_export = [\"svc.>\"]\nqueue = 1024\n",
    );
    let _b = second.then(|| Bridge::start("fB", &broker, &nats, "import = [\"zz.>\"]\n"));
    let c = broker.client();
    let svc = c.serve("svc.fire").unwrap();
    let sub = broker.client().subscribe("t.>").unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = {
        let (count, stop) = (count.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some(shmbus::Event::Message(m))) = sub.recv_timeout(Duration::from_millis(100)) {
                    if m.topic() == "t.by" {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    // Drain the service's sends so that the broker does not refuse them.
    let svc_stop = Arc::new(AtomicBool::new(false));
    let drainer = {
        let stop = svc_stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = svc.recv_timeout(Duration::from_millis(100));
            }
        })
    };
    let before = a.status().nats_to_local;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = nats.url();
    rt.block_on(async {
        let flood = async_nats::connect(&url).await.unwrap();
        let honest = async_nats::connect(&url).await.unwrap();
        let payload = bytes::Bytes::from_static(&[7u8; 64]);
        for i in 0..FLOOD {
            match forged {
                Some(b) => {
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Shmbus-Bridge", b);
                    flood.publish_with_headers("svc.fire", h, payload.clone()).await.unwrap();
                }
                None => flood.publish("svc.fire", payload.clone()).await.unwrap(),
            }
            if i % EVERY == 0 {
                honest.publish("t.by", payload.clone()).await.unwrap();
            }
        }
        flood.flush().await.unwrap();
        honest.flush().await.unwrap();
    });
    // Every flood send and every bystander message accounted for, or the
    // bridge has been quiet (what NATS dropped as a slow consumer never
    // arrives).
    let last = std::cell::Cell::new(u64::MAX);
    a.wait_status("the flood to be accounted for", |s| {
        let d = &s.nats_to_local;
        let n = calls(d) + d.loops_suppressed + d.forwarded + d.dropped.values().sum::<u64>();
        let done = calls(d) + d.loops_suppressed - calls(&before) - before.loops_suppressed >= FLOOD;
        done || n == last.replace(n)
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    svc_stop.store(true, Ordering::Relaxed);
    counter.join().unwrap();
    drainer.join().unwrap();
    let s2 = a.status();
    let d = &s2.nats_to_local;
    let out = Outcome {
        delivered: count.load(Ordering::Relaxed),
        dropped: d.dropped.values().sum::<u64>() - before.dropped.values().sum::<u64>(),
        sends: calls(d) - calls(&before),
        looped: d.loops_suppressed - before.loops_suppressed,
    };
    eprintln!(
        "forged {forged:?} second {second}: delivered {}/{BY}, dropped {} {:?}, sends {} {:?} looped {}, slow {}",
        out.delivered, out.dropped, d.dropped, out.sends, d.calls_failed, out.looped, s2.nats.slow_consumer_notices
    );
    out
}

/// Attempts at each forged flood before it counts as costing more.
///
/// On two CPUs the test's own flood, two bridges, the broker and
/// nats-server starve the bridge's NATS reader now and then, whatever the
/// header: NATS then drops imported messages as a slow consumer (counted
/// and reported, `slow_consumer_notices`). Measured here: in 2 of 10 runs
/// of this file a forged case lost 961 or 1,581 of 3,000 that way, and in
/// 1 of 12 runs of the code before today's broker and client changes, 646; the
/// control lost none. The defect this guards against (two broker look-ups
/// per forged send) delivered only 194 and 261 of 3,000.
const ATTEMPTS: usize = 3;

/// The same flood, without the header (the control), with a header naming
/// a bridge that is not on this broker, and with one naming a real second
/// bridge on it: the honest publisher's messages fare about as well (in
/// one of [`ATTEMPTS`] runs).
#[test]
fn a_flood_of_sends_with_a_forged_bridge_header_costs_no_more_than_without() {
    let control = run(None, true);
    let lost_control = BY - control.delivered.min(BY);
    for (what, forged) in [("unknown", "nobody"), ("second bridge", "fB")] {
        let mut losses = Vec::new();
        for _ in 0..ATTEMPTS {
            let o = run(Some(forged), true);
            let lost = BY - o.delivered.min(BY);
            losses.push(lost);
            if lost <= 2 * lost_control + BY / 10 {
                break;
            }
        }
        assert!(
            losses.iter().any(|&l| l <= 2 * lost_control + BY / 10),
            "{what}: the honest publisher lost {losses:?} of {BY} in {ATTEMPTS} runs with the forged header, {lost_control} without"
        );
    }
}
