//! Attacks on reconnection over the shared-memory transport (and, run with
//! `SHMBUS_TRANSPORT=socket`, over the socket alone): the broker is killed
//! (SIGKILL) while a publisher waits on a full ring, while calls are in
//! flight, while a subscriber's ring is full, and fifty times in a row
//! under load, with the blocking client and the tokio one. What must
//! hold: every blocking call returns (the reconnected connection, or
//! `Disconnected` within its timeout); a call gets exactly its own answer
//! or a clear error; a subscription's messages come once each and in
//! order, with what went missing said by a `Gap` or `Reconnected`; and
//! the process's fds and memfd mappings come back to where they were.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rustix::process::{Pid, Signal};
use shmbus::{CallError, Client, ErrorKind, Event};

const SAY: &str = "RECON:";
const ROLE: &str = "SHMBUS_RECON_ROLE";

fn signal(b: &Broker, sig: Signal) {
    let pid = Pid::from_raw(b.pid() as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

/// Kills the broker for good (bounded wait), leaving nothing at its address.
fn kill_for_good(b: &mut Broker) {
    if let Some(mut c) = b.child.take() {
        let _ = c.kill();
        assert!(wait_timeout(&mut c, PATIENCE).is_some(), "the broker did not die");
    }
}

/// Which transport clients here get.
fn transport() -> shmbus::Transport {
    match std::env::var("SHMBUS_TRANSPORT").as_deref() {
        Ok("socket") => shmbus::Transport::Socket,
        _ => shmbus::Transport::SharedMemory,
    }
}

/// Publishes from a thread until a publish blocks (the broker is stopped,
/// so the ring, or the socket, fills): the thread and its count. The
/// thread stops at `total` publishes, or at the first that fails; it
/// returns every publish's result.
struct Pump {
    count: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<Vec<Result<(), ErrorKind>>>>,
}

impl Pump {
    fn start(c: Client, topic: &'static str, total: u64) -> Pump {
        let count = Arc::new(AtomicU64::new(0));
        let n = count.clone();
        let thread = std::thread::spawn(move || {
            let payload = vec![7u8; 1000];
            let mut results = Vec::new();
            for _ in 0..total {
                let r = c.publish(topic, &payload).map_err(|e| e.kind());
                let failed = r.is_err();
                results.push(r);
                n.fetch_add(1, Ordering::SeqCst);
                if failed {
                    break;
                }
            }
            results
        });
        Pump { count, thread: Some(thread) }
    }

    /// Waits (bounded) until the count has not moved for 300 ms: a
    /// publish is blocked.
    fn wait_blocked(&self) -> u64 {
        let start = Instant::now();
        let mut last = self.count.load(Ordering::SeqCst);
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = self.count.load(Ordering::SeqCst);
            if now == last {
                return now;
            }
            assert!(start.elapsed() < PATIENCE, "the publisher never blocked ({now} publishes)");
            last = now;
        }
    }

    fn join(mut self) -> Vec<Result<(), ErrorKind>> {
        let t = self.thread.take().unwrap();
        bounded("the blocked publisher", move || t.join().unwrap())
    }
}

/// A publisher waiting for room (the broker stopped, its ring or socket
/// full) when the broker is killed wakes, reconnects to the new broker
/// and goes on: its remaining publishes are delivered there.
#[test]
fn a_publisher_waiting_on_a_full_ring_goes_on_with_the_restarted_broker() {
    let mut b = Broker::start("recon-full-restart");
    let publisher = b.options().timeout(PATIENCE).connect().unwrap();
    assert_eq!(publisher.transport(), transport());
    let subscriber = b.client();
    let sub = subscriber.subscribe("full.>").unwrap();
    signal(&b, Signal::STOP);
    let pump = Pump::start(publisher.clone(), "full.x", 20_000);
    let blocked_at = pump.wait_blocked();
    assert!(blocked_at < 20_000, "never blocked");
    // SIGKILL ends a stopped process; a new broker starts at once.
    b.restart(Signal::KILL);
    let results = pump.join();
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(
        failed,
        0,
        "publishes failed though the broker came back: {:?}",
        results.iter().find(|r| r.is_err())
    );
    // The subscriber hears of the restart, then the publisher's next.
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "no Reconnected");
        if let Some(Event::Reconnected) = sub.recv_timeout(Duration::from_millis(200)).unwrap() {
            break;
        }
    }
    wait_subscribers(&publisher, "full.>", 1);
    publisher.publish("full.end", b"end").unwrap();
    loop {
        assert!(Instant::now() < deadline, "the end never came");
        if let Some(Event::Message(m)) = sub.recv_timeout(Duration::from_millis(200)).unwrap() {
            if m.payload() == b"end" {
                break;
            }
        }
    }
}

/// The same, with no broker coming back: the waiting publish fails with
/// `Disconnected` after about the client's timeout, never hangs.
#[test]
fn a_publisher_waiting_on_a_full_ring_fails_in_time_when_the_broker_is_killed() {
    let mut b = Broker::start("recon-full-gone");
    let timeout = Duration::from_millis(500);
    let publisher = b.options().timeout(timeout).connect().unwrap();
    signal(&b, Signal::STOP);
    let pump = Pump::start(publisher, "gone.x", 20_000);
    pump.wait_blocked();
    let killed = Instant::now();
    kill_for_good(&mut b);
    let results = pump.join();
    let took = killed.elapsed();
    let (last, before) = results.split_last().unwrap();
    assert!(before.iter().all(Result::is_ok), "only the last publish failed");
    assert_eq!(last, &Err(ErrorKind::Disconnected));
    eprintln!("the blocked publish failed {took:?} after the kill");
    assert!(took < timeout + Duration::from_secs(5), "failed only after {took:?}");
}

// ------------------------------------------------------------- calls --

/// Many calls in flight when the broker is killed: each gets exactly one
/// answer, its own (the echo of its own payload), or a clear
/// `Disconnected`; none waits past its bound. After the restart calls go
/// through again.
#[test]
fn calls_in_flight_when_the_broker_is_killed_get_their_own_answer_or_disconnected() {
    let mut b = Broker::start("recon-calls");
    let server = b.client();
    let service = server.serve("calls.echo").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let serving = std::thread::spawn(move || {
        // Answers every other request at once and holds the rest a little
        // (so some answers are in the ring, some not yet written, when the
        // broker dies).
        let mut held = std::collections::VecDeque::new();
        while !stopped.load(Ordering::Relaxed) {
            match service.recv_timeout(Duration::from_millis(5)) {
                Ok(Some(req)) => {
                    if req.payload().ends_with(b"0") {
                        held.push_back(req);
                    } else {
                        let p = req.payload().to_vec();
                        let _ = req.reply(&p);
                    }
                }
                Ok(None) => {
                    while let Some(req) = held.pop_front() {
                        let p = req.payload().to_vec();
                        let _ = req.reply(&p);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    let caller = b.options().timeout(Duration::from_secs(2)).connect().unwrap();
    let before = caller.request("calls.echo", b"warm", PATIENCE).unwrap();
    assert_eq!(before.payload(), b"warm");
    let mut rounds = Vec::new();
    for round in 0..3 {
        let calls: Vec<_> = (0..300)
            .map(|i| {
                let body = format!("r{round}:{i}");
                let call =
                    caller.request_async("calls.echo", body.as_bytes(), Duration::from_secs(10)).unwrap();
                (body, call)
            })
            .collect();
        // Some answers in the caller's ring (or socket) by the kill, some
        // not yet.
        std::thread::sleep(Duration::from_millis([2, 10, 30][round]));
        b.restart(Signal::KILL);
        let (mut ok, mut lost) = (0, 0);
        for (body, call) in calls {
            let start = Instant::now();
            match call.wait() {
                Ok(r) => {
                    assert_eq!(r.payload(), body.as_bytes(), "a call got another call's answer");
                    ok += 1;
                }
                Err(CallError::Disconnected(_)) => lost += 1,
                Err(e) => panic!("call {body}: {e}"),
            }
            assert!(start.elapsed() < PATIENCE, "call {body} waited {:?}", start.elapsed());
        }
        rounds.push((ok, lost));
        // Calls go through again once the name is back.
        let deadline = Instant::now() + PATIENCE;
        loop {
            match caller.request("calls.echo", b"again", Duration::from_secs(2)) {
                Ok(r) => {
                    assert_eq!(r.payload(), b"again");
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "calls never came back: {e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!("(answered, failed) per round: {rounds:?}");
    stop.store(true, Ordering::Relaxed);
    bounded("the server", move || serving.join()).unwrap();
}

// ------------------------------------------------- a full subscriber --

/// What a subscription saw up to its `Reconnected`: message numbers (the
/// payload's first 8 bytes), and the gaps, in order.
#[derive(Debug, Default)]
struct Seen {
    numbers: Vec<u64>,
    gaps: u64,
    events: usize,
}

/// Reads `sub` (bounded) until `Reconnected`.
fn read_until_reconnected(sub: &shmbus::Subscription) -> Seen {
    let mut seen = Seen::default();
    let deadline = Instant::now() + PATIENCE;
    loop {
        assert!(Instant::now() < deadline, "no Reconnected after {seen:?}");
        match sub.recv_timeout(Duration::from_millis(500)).unwrap() {
            Some(Event::Message(m)) => {
                seen.numbers.push(u64::from_le_bytes(m.payload()[..8].try_into().unwrap()));
                seen.events += 1;
            }
            Some(Event::Gap { missed }) => {
                seen.gaps += missed;
                seen.events += 1;
            }
            Some(Event::Reconnected) => return seen,
            None => {}
        }
    }
}

fn numbered(i: u64) -> Vec<u8> {
    let mut p = i.to_le_bytes().to_vec();
    p.resize(200, 0xAB);
    p
}

/// How many messages the broker has handed to client `id` (written into
/// its ring, or its socket), once that stops changing.
fn handed_over(probe: &Client, id: u64) -> u64 {
    let out = || probe.clients().unwrap().into_iter().find(|c| c.id == id).expect("the client").msgs_out;
    let mut last = out();
    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = out();
        if now == last {
            return now;
        }
        assert!(start.elapsed() < PATIENCE, "the broker never stopped writing to client {id}");
        last = now;
    }
}

/// Floods a subscriber that does not read (its ring, or socket, fills,
/// then the broker's queue, which drops and counts), kills the broker,
/// and has the subscriber read what it has. What the broker had handed
/// over (in the subscriber's ring or socket) was the subscriber's before
/// the broker died: it is read, each message once, in order, before the
/// `Reconnected`. (What the dead broker still queued, and the drops it
/// had counted, are what `Reconnected` stands for.)
/// With `memfd`, payloads go as memfds: each delivery is a packet with
/// an fd on the socket (and, on a link, a marker in the ring), and the
/// broker hands over at most its fd window of them.
fn flood_then_kill(b: &mut Broker, subscriber_sends: bool, memfd: bool) {
    let subscriber = b.client();
    let sub = subscriber.subscribe("fl.x").unwrap();
    let publisher = b.options().memfd_threshold(1024).connect().unwrap();
    let n: u64 = if memfd { 2_000 } else { 20_000 };
    for i in 0..n {
        let mut p = numbered(i);
        if memfd {
            p.resize(2048, 0xCD);
        }
        publisher.publish("fl.x", p).unwrap();
    }
    // Everything published reached the broker, which queued it for the
    // subscriber or counted it dropped.
    publisher.flush().unwrap();
    let handed = handed_over(&publisher, subscriber.id());
    assert!(handed > 64, "only {handed} messages in the subscriber's hands?");
    b.restart(Signal::KILL);
    if subscriber_sends {
        // The subscriber's own client sends first: it finds the
        // connection lost before its reader has read the old one.
        subscriber.publish("fl.other", b"x").unwrap();
    }
    let seen = read_until_reconnected(&sub);
    assert!(seen.numbers.windows(2).all(|w| w[0] < w[1]), "out of order or twice: {:?}", seen.numbers);
    assert_eq!(seen.gaps, 0, "no gap was told before the kill");
    assert!(
        seen.numbers.iter().copied().eq(0..handed),
        "the {handed} messages in the subscriber's hands when the broker died come before Reconnected: \
         {} came, the last {:?}",
        seen.numbers.len(),
        seen.numbers.last()
    );
    // After the renewal, the stream goes on, whole.
    wait_subscribers(&publisher, "fl.x", 1);
    for i in n..n + 100 {
        publisher.publish("fl.x", numbered(i)).unwrap();
    }
    publisher.flush().unwrap();
    for i in n..n + 100 {
        let m = next_message(&sub);
        assert_eq!(u64::from_le_bytes(m.payload()[..8].try_into().unwrap()), i);
    }
    eprintln!("read {} of {n}, {} counted missed, in {} events", seen.numbers.len(), seen.gaps, seen.events);
}

#[test]
fn a_full_subscriber_killed_under_reads_what_it_was_handed_once_in_order() {
    let mut b = Broker::start("recon-full-sub");
    flood_then_kill(&mut b, false, false);
}

/// The same when the subscriber's client notices the loss by a send of
/// its own, before its reader has read the old connection: what it was
/// handed is still read (it was thrown away with the old ring, or
/// socket, uncounted: 64 of 1,129 messages read).
#[test]
fn a_full_subscriber_whose_client_sends_first_after_the_kill_reads_what_it_was_handed() {
    let mut b = Broker::start("recon-full-sub-sends");
    flood_then_kill(&mut b, true, false);
}

/// The same with memfd payloads: a packet with an fd each (and a marker
/// each in the ring), not batched, so over the socket alone too a send
/// that noticed first threw away all but the first 64.
#[test]
fn a_full_memfd_subscriber_whose_client_sends_first_after_the_kill_reads_what_it_was_handed() {
    let mut b = Broker::start("recon-full-memfd-sends");
    flood_then_kill(&mut b, true, true);
}

#[test]
fn a_full_memfd_subscriber_killed_under_reads_what_it_was_handed() {
    let mut b = Broker::start("recon-full-memfd");
    flood_then_kill(&mut b, false, true);
}

// ------------------------------------------- fifty restarts under load --

/// This process's open fds and its memfd mappings (lines of
/// /proc/self/maps naming a memfd: the link's halves, payloads mapped).
fn own_resources() -> (usize, usize) {
    let fds = std::fs::read_dir("/proc/self/fd").unwrap().count();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    (fds, maps.lines().filter(|l| l.contains("/memfd:")).count())
}

/// What the fds and memfd mappings are, for a failure message.
fn describe_resources() -> String {
    let mut out = String::new();
    for e in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let target = std::fs::read_link(e.path()).map(|p| p.display().to_string()).unwrap_or_default();
        out.push_str(&format!("fd {} -> {target}\n", e.file_name().to_string_lossy()));
    }
    for l in std::fs::read_to_string("/proc/self/maps").unwrap().lines().filter(|l| l.contains("/memfd:")) {
        out.push_str(l);
        out.push('\n');
    }
    out
}

const RESTARTS: usize = 50;
const BIG: usize = 64 * 1024;

/// One round of everything each client does, each bounded, errors
/// allowed (the broker may be away): a small and a memfd publish, a
/// call, a ping.
fn blocking_round(publisher: &Client, caller: &Client, i: u64) {
    let _ = publisher.publish("soak.s", numbered(i));
    let mut big = numbered(i);
    big.resize(BIG, 1);
    let _ = publisher.publish("soak.s", &big);
    let _ = publisher.publish_many([("soak.s", &numbered(i)[..]), ("soak.s", &numbered(i)[..])]);
    let _ = caller.request("soak.svc", b"q", Duration::from_secs(2));
    let _ = caller.ping();
}

/// The helper's blocking soak: a subscriber, a publisher (small and memfd
/// payloads), a service and its caller, each on its own client, all busy
/// while the broker is killed `RESTARTS` times.
fn soak_blocking() {
    let mut b = Broker::start("recon-soak");
    let opts = || b.options().timeout(Duration::from_secs(2)).memfd_threshold(4096);
    let subscriber = opts().connect().unwrap();
    let publisher = opts().connect().unwrap();
    let server = opts().connect().unwrap();
    let caller = opts().connect().unwrap();
    let sub = subscriber.subscribe("soak.>").unwrap();
    let service = server.serve("soak.svc").unwrap();
    let serve_stop = Arc::new(AtomicBool::new(false));
    let serving = {
        let stop = serve_stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some(req)) = service.recv_timeout(Duration::from_millis(50)) {
                    let mut big = vec![3u8; BIG];
                    big[0] = req.payload().first().copied().unwrap_or(0);
                    let _ = req.reply(&big);
                }
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let reading = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some(Event::Message(m))) = sub.recv_timeout(Duration::from_millis(50)) {
                    // Touch the payload: a memfd one is mapped to be read.
                    n += m.payload().len() as u64;
                }
            }
            (sub, n)
        })
    };
    // Warm up: every path once, with the broker there.
    blocking_round(&publisher, &caller, 0);
    assert_eq!(caller.request("soak.svc", b"q", PATIENCE).unwrap().payload().len(), BIG);
    let quiet = |sub: &shmbus::Subscription| {
        for c in [&subscriber, &publisher, &server, &caller] {
            c.ping().unwrap();
        }
        while let Ok(Some(_)) = sub.recv_timeout(Duration::from_millis(100)) {}
    };
    let working = {
        let stop = stop.clone();
        let (publisher, caller) = (publisher.clone(), caller.clone());
        std::thread::spawn(move || {
            let mut i = 1;
            while !stop.load(Ordering::Relaxed) {
                blocking_round(&publisher, &caller, i);
                i += 1;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    // The baseline: the load paused (stopped and started again is not
    // possible with threads; it is measured with everything connected and
    // the subscription drained by the reader).
    stop.store(true, Ordering::Relaxed);
    working.join().unwrap();
    let (sub, _) = reading.join().unwrap();
    quiet(&sub);
    let base = own_resources();
    println!("{SAY}baseline fds={} maps={}", base.0, base.1);
    let base_list = describe_resources();
    let stop = Arc::new(AtomicBool::new(false));
    let reading = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some(Event::Message(m))) = sub.recv_timeout(Duration::from_millis(50)) {
                    let _ = m.payload().len();
                }
            }
            sub
        })
    };
    let working = {
        let stop = stop.clone();
        let (publisher, caller) = (publisher.clone(), caller.clone());
        std::thread::spawn(move || {
            let mut i = 1;
            while !stop.load(Ordering::Relaxed) {
                blocking_round(&publisher, &caller, i);
                i += 1;
            }
        })
    };
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    for _ in 0..RESTARTS {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        std::thread::sleep(Duration::from_millis(10 + u64::from(seed % 40)));
        b.restart(Signal::KILL);
    }
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    bounded("the load", move || working.join().unwrap());
    let sub = bounded("the reader", move || reading.join().unwrap());
    // The name is back with its owner before the last look.
    let deadline = Instant::now() + PATIENCE;
    while caller.request("soak.svc", b"q", Duration::from_secs(2)).is_err() {
        assert!(Instant::now() < deadline, "the service never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
    quiet(&sub);
    let after = own_resources();
    println!("{SAY}after fds={} maps={}", after.0, after.1);
    if after != base {
        eprintln!("before:\n{base_list}\nafter:\n{}", describe_resources());
    }
    serve_stop.store(true, Ordering::Relaxed);
    bounded("the server", move || serving.join().unwrap());
}

/// The helper's async soak: the same on `AsyncClient`s, tasks on a
/// two-thread runtime.
fn soak_async() {
    let mut b = Broker::start("recon-soak-async");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let opts = || b.options().timeout(Duration::from_secs(2)).memfd_threshold(4096);
    let (subscriber, publisher, server, caller) = rt.block_on(async {
        (
            opts().connect_async().await.unwrap(),
            opts().connect_async().await.unwrap(),
            opts().connect_async().await.unwrap(),
            opts().connect_async().await.unwrap(),
        )
    });
    let sub = Arc::new(rt.block_on(subscriber.subscribe("soak.>")).unwrap());
    let service = Arc::new(rt.block_on(server.serve("soak.svc")).unwrap());
    // The service answers throughout, until the end.
    let serve_stop = Arc::new(AtomicBool::new(false));
    let serving = {
        let (stop, service) = (serve_stop.clone(), service.clone());
        rt.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Ok(req)) = tokio::time::timeout(Duration::from_millis(50), service.recv()).await {
                    let big = vec![3u8; BIG];
                    let _ = req.reply_async(&big).await;
                }
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let start_load = |stop: &Arc<AtomicBool>| {
        let mut tasks = Vec::new();
        {
            let (stop, sub) = (stop.clone(), sub.clone());
            tasks.push(rt.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(Ok(Event::Message(m))) =
                        tokio::time::timeout(Duration::from_millis(50), sub.recv()).await
                    {
                        let _ = m.payload().len();
                    }
                }
            }));
        }
        {
            let (stop, publisher, caller) = (stop.clone(), publisher.clone(), caller.clone());
            tasks.push(rt.spawn(async move {
                let mut i = 1;
                while !stop.load(Ordering::Relaxed) {
                    let t = Duration::from_secs(4);
                    let _ = tokio::time::timeout(t, publisher.publish("soak.s", numbered(i))).await;
                    let mut big = numbered(i);
                    big.resize(BIG, 1);
                    let _ = tokio::time::timeout(t, publisher.publish("soak.s", &big)).await;
                    let small = numbered(i);
                    let many = [("soak.s", &small[..]), ("soak.s", &small[..])];
                    let _ = tokio::time::timeout(t, publisher.publish_many(many)).await;
                    let _ = tokio::time::timeout(t, caller.request("soak.svc", b"q", Duration::from_secs(2)))
                        .await;
                    let _ = tokio::time::timeout(t, caller.ping()).await;
                    i += 1;
                }
            }));
        }
        tasks
    };
    let finish = |stop: &Arc<AtomicBool>, tasks: Vec<tokio::task::JoinHandle<()>>| {
        stop.store(true, Ordering::Relaxed);
        rt.block_on(async {
            for t in tasks {
                tokio::time::timeout(PATIENCE, t).await.expect("a task ended in time").unwrap();
            }
            // The name is back with its owner, and everyone is connected.
            let deadline = Instant::now() + PATIENCE;
            loop {
                let q = caller.request("soak.svc", b"q", Duration::from_secs(2));
                match tokio::time::timeout(Duration::from_secs(4), q).await {
                    Ok(Ok(_)) => break,
                    _ => assert!(Instant::now() < deadline, "the service never came back"),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    };
    // Warm up, then the baseline.
    let tasks = start_load(&stop);
    std::thread::sleep(Duration::from_millis(300));
    let quiet = || {
        rt.block_on(async {
            for c in [&subscriber, &publisher, &server, &caller] {
                tokio::time::timeout(PATIENCE, c.ping()).await.unwrap().unwrap();
            }
            while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(100), sub.recv()).await {}
        })
    };
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for t in tasks {
            tokio::time::timeout(PATIENCE, t).await.unwrap().unwrap();
        }
    });
    quiet();
    let base = own_resources();
    println!("{SAY}baseline fds={} maps={}", base.0, base.1);
    let base_list = describe_resources();
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = start_load(&stop);
    let mut seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    for _ in 0..RESTARTS {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        std::thread::sleep(Duration::from_millis(10 + u64::from(seed % 40)));
        b.restart(Signal::KILL);
    }
    std::thread::sleep(Duration::from_millis(200));
    finish(&stop, tasks);
    quiet();
    let after = own_resources();
    println!("{SAY}after fds={} maps={}", after.0, after.1);
    if after != base {
        eprintln!("before:\n{base_list}\nafter:\n{}", describe_resources());
    }
    serve_stop.store(true, Ordering::Relaxed);
    rt.block_on(async { tokio::time::timeout(PATIENCE, serving).await.unwrap().unwrap() });
}

/// Not a test on its own: the soaks run in a process of their own, whose
/// fds and mappings no other test touches.
#[test]
#[ignore = "helper process body, spawned by the soak tests"]
fn soak_helper_process() {
    match std::env::var(ROLE).as_deref() {
        Ok("blocking") => soak_blocking(),
        Ok("async") => soak_async(),
        other => panic!("unknown role {other:?}"),
    }
    println!("{SAY}done");
}

fn soak(role: &str) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--exact", "soak_helper_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .stdin(std::process::Stdio::null());
    let mut h = Helper::spawn(&mut cmd, SAY);
    let base = h.expect("baseline");
    // Fifty restarts take a while; each is bounded by the helper itself.
    let after = h.expect("after");
    h.expect("done");
    let stderr = h.stderr();
    h.finish();
    assert_eq!(after, base, "{role}: fds and memfd mappings after {RESTARTS} restarts; {stderr}");
}

#[test]
fn fifty_kills_under_load_leave_a_blocking_clients_fds_and_mappings_as_they_were() {
    soak("blocking");
}

#[test]
fn fifty_kills_under_load_leave_an_async_clients_fds_and_mappings_as_they_were() {
    soak("async");
}

// ------------------------------------------------- sends in an outage --

/// `AsyncClient::publish_many` is `publish` for each message: during an
/// outage it waits for the broker (up to the client's timeout), as
/// `publish` and the blocking `publish_many` do.
#[test]
fn publish_many_waits_for_the_broker_during_an_outage_blocking_and_async() {
    let mut b = Broker::start("recon-outage-many");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let blocking = b.options().timeout(PATIENCE).connect().unwrap();
    let asynch = rt.block_on(b.options().timeout(PATIENCE).connect_async()).unwrap();
    let subscriber = b.client();
    let sub = subscriber.subscribe("om.>").unwrap();
    let addr = b.address.clone();
    kill_for_good(&mut b);
    // The broker comes back a little later, from a thread.
    let (tx, rx) = std::sync::mpsc::channel();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        tx.send(Broker::launch_at(addr, Launch::new())).unwrap();
    });
    // Spawned: its future is `Send` (it was not: spawning failed to
    // compile, "implementation of `FnOnce` is not general enough").
    let async_many = rt.spawn({
        let c = asynch.clone();
        let topic = String::from("om.a");
        async move {
            let payload = [1u8; 3];
            let many = [(topic.as_str(), &payload[..]), (topic.as_str(), &payload[..])];
            tokio::time::timeout(PATIENCE, c.publish_many(many)).await.expect("bounded")
        }
    });
    let blocking_many = blocking.publish_many([("om.b", b"b1"), ("om.b", b"b2")]);
    let async_many = rt.block_on(async_many).unwrap();
    let _b = rx.recv_timeout(PATIENCE).unwrap();
    restarter.join().unwrap();
    blocking_many.expect("the blocking publish_many waits for the broker");
    async_many.expect("the async publish_many waits for the broker as publish does");
    drop(sub);
}

// ------------------------------------------- one loss, one reconnection --

/// A client whose reader and whose sender both notice a kill (the reader
/// by the end of the stream, the sender, blocked on a full ring or
/// socket, by its failed send) reconnects once per kill: each
/// subscription gets one `Reconnected` per restart, never two (a second
/// would mean the new connection was taken for lost and made again,
/// failing what was sent on it).
#[test]
fn a_reader_and_a_blocked_sender_of_one_client_make_one_reconnection_per_kill() {
    let mut b = Broker::start("recon-once");
    let c = b.options().timeout(PATIENCE).connect().unwrap();
    let sub = c.subscribe("once.in").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reconnections = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, n) = (stop.clone(), reconnections.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(Some(Event::Reconnected)) = sub.recv_timeout(Duration::from_millis(50)) {
                    n.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let sender = {
        let (stop, c) = (stop.clone(), c.clone());
        std::thread::spawn(move || {
            let payload = vec![5u8; 1000];
            while !stop.load(Ordering::Relaxed) {
                let _ = c.publish("once.out", &payload);
            }
        })
    };
    const KILLS: u64 = 10;
    for kill in 1..=KILLS {
        // The broker stops: the sender blocks on a full ring (or socket).
        signal(&b, Signal::STOP);
        std::thread::sleep(Duration::from_millis(100));
        b.restart(Signal::KILL);
        let deadline = Instant::now() + PATIENCE;
        while reconnections.load(Ordering::SeqCst) < kill {
            assert!(Instant::now() < deadline, "kill {kill}: no Reconnected");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Time for a second, needless reconnection to show.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(reconnections.load(Ordering::SeqCst), kill, "Reconnected events after {kill} kills");
    }
    stop.store(true, Ordering::Relaxed);
    bounded("the reader", move || reader.join().unwrap());
    bounded("the sender", move || sender.join().unwrap());
}

/// An async call in flight when the broker is killed fails with
/// `Disconnected` once the loss is known, as a blocking one does; it does
/// not wait out its own timeout to fail with `Timeout` (the async call
/// never said which connection its request went on, so the loss did not
/// fail it).
#[test]
fn an_async_call_in_flight_at_a_kill_fails_with_disconnected_not_timeout() {
    let mut b = Broker::start("recon-async-call");
    let server = b.client();
    let service = server.serve("ac.hold").unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let caller = rt.block_on(b.options().connect_async()).unwrap();
    // A long call: its own timeout is far past the test's patience.
    let call = rt.spawn({
        let c = caller.clone();
        async move { c.request("ac.hold", b"held", Duration::from_secs(60)).await }
    });
    // The service has it (and never answers).
    let held = service.recv_timeout(PATIENCE).unwrap().expect("the request");
    b.restart(Signal::KILL);
    let got = rt.block_on(async { tokio::time::timeout(PATIENCE, call).await });
    let got = got.expect("the call ended within PATIENCE, not at its 60 s timeout").unwrap();
    match got {
        Err(CallError::Disconnected(_)) => {}
        other => panic!("expected Disconnected, got {other:?}"),
    }
    drop(held);
}

/// An async publisher waiting for room in a full ring (or socket: the
/// broker stopped) when the broker is killed goes on with the new broker;
/// with none coming back, its publish fails with `Disconnected` in about
/// the client's timeout. Never a hang.
#[test]
fn an_async_publisher_waiting_on_a_full_ring_wakes_when_the_broker_is_killed() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    for comes_back in [true, false] {
        let mut b = Broker::start("recon-async-full");
        let timeout = if comes_back { PATIENCE } else { Duration::from_millis(500) };
        let c = rt.block_on(b.options().timeout(timeout).connect_async()).unwrap();
        assert_eq!(c.transport(), transport());
        signal(&b, Signal::STOP);
        let count = Arc::new(AtomicU64::new(0));
        let pump = rt.spawn({
            let (c, count) = (c.clone(), count.clone());
            async move {
                let payload = vec![7u8; 1000];
                for _ in 0..20_000 {
                    let r = c.publish("af.x", &payload).await;
                    count.fetch_add(1, Ordering::SeqCst);
                    if let Err(e) = r {
                        return Err(e.kind());
                    }
                }
                Ok(())
            }
        });
        // Blocked: the count stands still.
        let start = Instant::now();
        let mut last = count.load(Ordering::SeqCst);
        loop {
            std::thread::sleep(Duration::from_millis(300));
            let now = count.load(Ordering::SeqCst);
            if now == last {
                break;
            }
            assert!(start.elapsed() < PATIENCE, "never blocked");
            last = now;
        }
        let killed = Instant::now();
        if comes_back {
            b.restart(Signal::KILL);
        } else {
            kill_for_good(&mut b);
        }
        let r = rt
            .block_on(async { tokio::time::timeout(PATIENCE, pump).await })
            .expect("the pump ended")
            .unwrap();
        if comes_back {
            assert_eq!(r, Ok(()), "every publish went, to the new broker after the kill");
        } else {
            assert_eq!(r, Err(ErrorKind::Disconnected));
            let took = killed.elapsed();
            assert!(took < timeout + Duration::from_secs(5), "failed only after {took:?}");
        }
    }
}

/// Messages dropped by the subscriber's own full queue before the broker
/// died are a `Gap` in their place, before `Reconnected`, not after it
/// (where they would seem lost on the new connection).
#[test]
fn a_local_gap_from_before_a_kill_comes_before_reconnected() {
    let mut b = Broker::start("recon-local-gap");
    let subscriber = b.options().local_queue(10).connect().unwrap();
    let sub = subscriber.subscribe("lg.x").unwrap();
    let publisher = b.client();
    for i in 0..100 {
        publisher.publish("lg.x", numbered(i)).unwrap();
    }
    publisher.flush().unwrap();
    // The subscriber's client reads everything (the pong comes after the
    // messages): ten are queued, ninety dropped and counted.
    subscriber.ping().unwrap();
    b.restart(Signal::KILL);
    // The client reconnects before the app reads its queue (another
    // thread's call, here a ping).
    let _ = subscriber.ping();
    let mut events = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    while !matches!(events.last(), Some(Event::Reconnected)) {
        assert!(Instant::now() < deadline, "no Reconnected: {events:?}");
        if let Some(e) = sub.recv_timeout(Duration::from_millis(200)).unwrap() {
            events.push(e);
        }
    }
    let shown: Vec<String> = events
        .iter()
        .map(|e| match e {
            Event::Message(m) => u64::from_le_bytes(m.payload()[..8].try_into().unwrap()).to_string(),
            other => format!("{other:?}"),
        })
        .collect();
    let mut want: Vec<String> = (0..10).map(|i: u64| i.to_string()).collect();
    want.push("Gap { missed: 90 }".into());
    want.push("Reconnected".into());
    assert_eq!(shown, want);
    // Nothing more: the gap was told once.
    assert!(sub.try_recv().unwrap().is_none());
}
