//! An attack on a connection's subscription map (`SubMap` in
//! `broker/src/bus/peer.rs`): the broker finds each delivery's
//! subscription there by the id the client chose (`Bus::deliver`, once
//! per matching subscription, so a publish to 4,096 subscriptions of one
//! connection is 4,096 lookups), and a client that could aim its ids at
//! one bucket would make each of its deliveries a long probe. Here a
//! hostile uid (65533) fills a connection with the most subscriptions it
//! may hold, all on one subject, with ids in several shapes (random;
//! sequential; strides of 2^12, 2^16, 2^20; ids that all fall in one
//! bucket were the map's secret key 0), and publishes on that subject at
//! a steady rate it drains, so every publish fans out to all of them. A
//! bystander of another uid (65534) pings the broker and makes pub/sub
//! round trips meanwhile.
//!
//! What is asserted is the broker's CPU time per delivery with each shape
//! against random ids in the same round (CPU time, not wall-clock: it
//! does not move with the machine's other load the way latencies do):
//! no more than [`K`] times, a generous factor, as one bucket would cost
//! tens of times more per lookup (the control,
//! [`aimed_ids_collide_only_under_the_key_they_were_aimed_at`], measures
//! it on a copy of the hasher). The attacker must never be cut off, and
//! each delivery must arrive or be counted in a gap. The bystander's
//! round trips are printed, not asserted: near saturation (a debug build)
//! its p50 jumps between 0.1 and 20 ms from one run to the next,
//! whatever the ids.
//!
//! `SUBMAP_ROUNDS`, `SUBMAP_CONNS` and `SUBMAP_PERIOD_US` tune a longer
//! run by hand (defaults: 1 round, 1 connection, a publish every 20 ms);
//! [`probe_fan_out_to_the_subscription_allowance`] (ignored) measures the
//! bystander against a uid's whole subscription allowance.
//!
//! That probe found a defect in the reactor, not the map, which
//! [`a_fan_out_flood_costs_a_bystander_one_read_budget_a_turn`] keeps
//! fixed: over the socket, a connection that spent its read budget
//! (`WORK_BUDGET` deliveries) was queued to be read again once per spent
//! read, with no check for duplicates, and a readable event in the same
//! turn read it once more; each entry was a fresh budget in one turn. The
//! publisher's connection sat in that list dozens of times over, and a
//! bystander's ping waited 85 ms (p50; 15 µs idle) behind 4 connections'
//! fan-out, a publish every 200 µs. Now a connection is read with one
//! budget a turn at most (`daemon/read_turns.rs`).

mod common;

use std::io::Read;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use shmbus_proto::frame::{encode_head, Body, BrokerFrame, Overflow, PayloadRef, Publish, Subscribe};
use shmbus_proto::limits::DEFAULT_MAX_SUBSCRIPTIONS;

const ROLE: &str = "SHMBUS_SUBMAP_ROLE";
const ADDR: &str = "SHMBUS_SUBMAP_ADDR";
const MODE: &str = "SHMBUS_SUBMAP_MODE";
const CONNS: &str = "SHMBUS_SUBMAP_CONNS";
const PERIOD: &str = "SHMBUS_SUBMAP_PERIOD_US";
const DRAIN: &str = "SHMBUS_SUBMAP_DRAIN";
const SAY: &str = "SUBMAP:";

/// The hostile uid (admitted by `--allow-uid`; it needs no passwd entry).
const ATTACKER: u32 = 65533;

/// How much more than random ids structured ones may cost.
const K: f64 = 3.0;

/// Subscriptions per attacking connection: the most one may hold.
const PER_CONN: usize = DEFAULT_MAX_SUBSCRIPTIONS as usize;

/// The id shapes tried, after random ids.
const SHAPES: [&str; 5] = ["sequential", "stride-2^12", "stride-2^16", "stride-2^20", "one-bucket-if-key-0"];

/// murmur3's finaliser over `id ^ key`: the broker's `SubIdHasher` for a
/// `u32` key, copied here to aim ids (and for the control below).
fn fmix(id: u32, key: u64) -> u64 {
    let mut x = u64::from(id) ^ key;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// Buckets of a std `HashMap` holding [`PER_CONN`] entries (at most 7/8
/// full, a power of two): the low bits of the hash pick the bucket.
const BUCKETS: u64 = 8192;

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// `n` distinct subscription ids of shape `mode`.
fn ids(mode: &str, n: usize) -> Vec<u32> {
    let n32 = n as u32;
    match mode {
        "random" => {
            let mut seed =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
                    | 1;
            let mut seen = std::collections::HashSet::new();
            let mut v = Vec::new();
            while v.len() < n {
                let id = xorshift(&mut seed) as u32;
                if seen.insert(id) {
                    v.push(id);
                }
            }
            v
        }
        "sequential" => (0..n32).collect(),
        "stride-2^12" => (0..n32).map(|i| i << 12).collect(),
        "stride-2^16" => (0..n32).map(|i| i << 16).collect(),
        "stride-2^20" => (0..n32).map(|i| i << 20).collect(),
        // Every id's hash under key 0 ends in 13 zero bits: one bucket,
        // and one probe sequence, for all of them, were the key 0.
        "one-bucket-if-key-0" => {
            (0..=u32::MAX).filter(|&id| fmix(id, 0).is_multiple_of(BUCKETS)).take(n).collect()
        }
        other => panic!("unknown id shape {other}"),
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn socket_only() -> bool {
    std::env::var("SHMBUS_TRANSPORT").as_deref() == Ok("socket")
}

/// A raw connection on the transport the run is for.
enum Conn {
    Socket(Raw),
    Link(Box<RawLink>),
}

impl Conn {
    fn open(address: &str, name: &str) -> Conn {
        if socket_only() {
            Conn::Socket(Raw::hello_at(address, name).0)
        } else {
            Conn::Link(Box::new(RawLink::attach_at(address, name)))
        }
    }

    fn send<B: Body>(&mut self, body: &B, payload: &[u8]) {
        match self {
            Conn::Socket(r) => {
                let mut f = encode_head(body).unwrap();
                f.extend_from_slice(payload);
                r.send(&f, &[]);
            }
            Conn::Link(l) => l.send_body(body, payload),
        }
    }

    fn recv(&mut self, timeout: Duration) -> Option<Packet> {
        match self {
            Conn::Socket(r) => r.recv_packet(timeout),
            Conn::Link(l) => l.recv_packet(timeout),
        }
    }

    /// Subscribes `ids` to `pattern`, 256 at a time; each must be granted.
    fn subscribe_all(&mut self, ids: &[u32], pattern: &str) {
        for chunk in ids.chunks(256) {
            for &sub_id in chunk {
                self.send(&Subscribe { sub_id, pattern, overflow: Overflow::Gap }, &[]);
            }
            let mut granted = 0;
            while granted < chunk.len() {
                let p = self.recv(PATIENCE).expect("subscriptions answered within PATIENCE");
                match p.frame() {
                    Some(BrokerFrame::Subscribed(_)) => granted += 1,
                    other => panic!("subscribing: {other:?}"),
                }
            }
        }
    }
}

/// What the attacker's connections saw.
#[derive(Default)]
struct Tally {
    delivered: AtomicU64,
    missed: AtomicU64,
    /// Connections cut off (a goodbye or the end of the stream).
    cut: AtomicU64,
}

impl Tally {
    fn settled(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed) + self.missed.load(Ordering::Relaxed)
    }
}

/// Not a test on its own: the body of the helper processes, run only when
/// a test spawns this binary with `--ignored --exact helper_process`.
#[test]
#[ignore = "helper process body, spawned by the other tests"]
fn helper_process() {
    let role = std::env::var(ROLE).expect("run as a helper by another test");
    let addr = std::env::var(ADDR).unwrap();
    match role.as_str() {
        "attacker" => attacker(&addr),
        "bystander" => bystander(&addr),
        other => panic!("unknown role {other}"),
    }
}

/// `SHMBUS_SUBMAP_CONNS` connections, each with [`PER_CONN`] subscriptions
/// to `atk.t` of ids shaped as `SHMBUS_SUBMAP_MODE`, drained by a thread
/// each; one more connection publishes on `atk.t` every
/// `SHMBUS_SUBMAP_PERIOD_US`, but never while more than half a fan-out is
/// still on its way (so it never overflows its own queues); with
/// `SHMBUS_SUBMAP_DRAIN=0` it never reads and never holds back. Runs until
/// its stdin closes, then says what it published and received.
fn attacker(addr: &str) {
    let mode = std::env::var(MODE).unwrap();
    let conns = env_or(CONNS, 1) as usize;
    let period = Duration::from_micros(env_or(PERIOD, 20_000));
    // Not draining: its subscriptions (all `Gap`) drop what does not fit,
    // and it publishes at its period regardless.
    let drain = env_or(DRAIN, 1) == 1;
    let t0 = Instant::now();
    let ids = Arc::new(ids(&mode, PER_CONN));
    let aimed = t0.elapsed();
    let stop = Arc::new(AtomicBool::new(false));
    // The drains stop after the publisher, once all is in.
    let done = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let t1 = Instant::now();
    let drains: Vec<_> = (0..conns)
        .map(|i| {
            let (addr, ids, done, tally, ready) =
                (addr.to_owned(), ids.clone(), done.clone(), tally.clone(), ready_tx.clone());
            std::thread::spawn(move || {
                let mut c = Conn::open(&addr, &format!("hostile-subs-{i}"));
                c.subscribe_all(&ids, "atk.t");
                ready.send(()).unwrap();
                while !drain && !done.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(10));
                }
                while !done.load(Ordering::Relaxed) {
                    let Some(p) = c.recv(Duration::from_millis(50)) else { continue };
                    match p.frame() {
                        Some(BrokerFrame::Deliver(..)) => {
                            tally.delivered.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(BrokerFrame::Gap(g)) => {
                            tally.missed.fetch_add(g.missed, Ordering::Relaxed);
                        }
                        Some(BrokerFrame::Goodbye(g)) => {
                            eprintln!("attacker connection {i}: goodbye {:?}: {}", g.code, g.reason);
                            tally.cut.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        None => {
                            eprintln!("attacker connection {i}: end of stream");
                            tally.cut.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Some(_) => {}
                    }
                }
            })
        })
        .collect();
    for _ in 0..conns {
        ready_rx.recv_timeout(3 * PATIENCE).expect("every attacking connection subscribed");
    }
    let setup = t1.elapsed();
    // Stop when the parent closes our stdin.
    {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            stop.store(true, Ordering::Relaxed);
        });
    }
    let mut publisher = Conn::open(addr, "hostile-pub");
    println!("{SAY}ready aim_us={} setup_us={}", aimed.as_micros(), setup.as_micros());
    let fan_out = (PER_CONN * conns) as u64;
    let publish = Publish { topic: "atk.t", origin: None, payload: PayloadRef::Inline };
    let start = Instant::now();
    let mut published = 0u64;
    let mut next = Instant::now();
    let mut held_back = 0u64;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < 3 * PATIENCE {
        let now = Instant::now();
        if now < next {
            std::thread::sleep((next - now).min(Duration::from_millis(1)));
            continue;
        }
        if drain && (published * fan_out).saturating_sub(tally.settled()) > fan_out / 2 {
            held_back += 1;
            std::thread::sleep(Duration::from_micros(100));
            continue;
        }
        publisher.send(&publish, b"0123456789abcdef");
        published += 1;
        next += period;
        if next < now {
            // Behind (held back): the next one a period from now.
            next = now + period;
        }
    }
    let elapsed = start.elapsed();
    // What is on its way still arrives (bounded, well within the
    // parent's patience).
    let deadline = Instant::now() + PATIENCE / 4;
    while drain
        && tally.settled() < published * fan_out
        && tally.cut.load(Ordering::Relaxed) == 0
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    if drain && tally.settled() < published * fan_out {
        // For the failure message: where the rest is, as the broker says.
        eprintln!("short: {} of {} delivered or reported missed", tally.settled(), published * fan_out);
        if let Ok(c) = shmbus::Client::options().address(shmbus::Address::parse(addr).unwrap()).connect() {
            for ci in c.clients().unwrap_or_default() {
                eprintln!(
                    "client {} {:?} uid {}: queued {} frames {} bytes, in {} out {} dropped {}",
                    ci.id,
                    ci.name,
                    ci.uid,
                    ci.queued_frames,
                    ci.queued_bytes,
                    ci.msgs_in,
                    ci.msgs_out,
                    ci.dropped
                );
            }
        }
    }
    done.store(true, Ordering::Relaxed);
    for d in drains {
        d.join().expect("an attacking connection's thread");
    }
    // Our own CPU time, all threads (utime and stime, in ticks of 10 ms).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = stat[stat.rfind(')').unwrap() + 1..].split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    println!(
        "{SAY}stats published={published} expected={} delivered={} missed={} cut={} held_back={held_back} elapsed_us={} cpu_ms={}",
        published * fan_out,
        tally.delivered.load(Ordering::Relaxed),
        tally.missed.load(Ordering::Relaxed),
        tally.cut.load(Ordering::Relaxed),
        elapsed.as_micros(),
        ticks * 10
    );
}

/// Pings, then pub/sub round trips through the broker, as a `shmbus`
/// client; says the p50 and p99 of each, in ns.
fn bystander(addr: &str) {
    let c = shmbus::Client::options()
        .address(shmbus::Address::parse(addr).unwrap())
        .name("bystander")
        .connect()
        .expect("the bystander connects");
    let sub = c.subscribe("by.rt").unwrap();
    // 600 pings and 300 round trips, or what fits in 3 s each when the
    // broker is that slow (a debug build under a heavy attack).
    let enough = Duration::from_secs(3);
    let mut pings = Vec::new();
    let start = Instant::now();
    while pings.len() < 600 && (pings.len() < 50 || start.elapsed() < enough) {
        let t = Instant::now();
        c.ping().expect("a ping answered");
        pings.push(t.elapsed());
        std::thread::sleep(Duration::from_micros(300));
    }
    let mut trips = Vec::new();
    let start = Instant::now();
    for i in 0u32.. {
        if trips.len() >= 300 || trips.len() >= 50 && start.elapsed() >= enough {
            break;
        }
        let t = Instant::now();
        c.publish("by.rt", i.to_le_bytes()).unwrap();
        match sub.recv_timeout(ONE_PING).unwrap() {
            Some(shmbus::Event::Message(m)) => assert_eq!(m.payload(), i.to_le_bytes()),
            other => panic!("the bystander's own message {i}: {other:?}"),
        }
        trips.push(t.elapsed());
        std::thread::sleep(Duration::from_micros(300));
    }
    pings.sort();
    trips.sort();
    let ns = |d: Duration| d.as_nanos();
    println!(
        "{SAY}rtts ping_p50={} ping_p99={} pubsub_p50={} pubsub_p99={} max={} transport={:?}",
        ns(pct(&pings, 50)),
        ns(pct(&pings, 99)),
        ns(pct(&trips, 50)),
        ns(pct(&trips, 99)),
        ns(pings[pings.len() - 1].max(trips[trips.len() - 1])),
        c.transport()
    );
}

thread_local! {
    /// The transport this test thread's helpers use, if it says
    /// (`SHMBUS_TRANSPORT`); else whatever the environment says.
    static TRANSPORT: std::cell::Cell<Option<&'static str>> = const { std::cell::Cell::new(None) };
    /// How long an attack runs before the bystander measures.
    static WARM_MS: std::cell::Cell<u64> = const { std::cell::Cell::new(300) };
}

fn helper(role: &str, address: &str, uid: u32, envs: &[(&str, String)]) -> Helper {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = command_as(exe.to_str().unwrap(), uid);
    if let Some(t) = TRANSPORT.get() {
        cmd.env("SHMBUS_TRANSPORT", t);
    }
    cmd.args(["--exact", "helper_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(ADDR, address)
        .stdin(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Helper::spawn(&mut cmd, SAY)
}

/// `key=value` fields of a helper's line, as numbers.
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .parse()
        .unwrap()
}

#[derive(Debug, Clone)]
struct Measured {
    shape: String,
    ping_p50: u64,
    ping_p99: u64,
    pubsub_p50: u64,
    pubsub_p99: u64,
    /// Broker CPU ns per delivery to the attacker (0 when idle).
    ns_per_delivery: f64,
    deliveries_per_s: f64,
    setup_ms: f64,
}

fn run_bystander(b: &Broker) -> String {
    let mut h = helper("bystander", &b.address, NOBODY, &[]);
    let line = h.expect("rtts");
    h.finish();
    line
}

/// One attack of `shape` with the run's settings, a bystander measured
/// meanwhile; the attacker must not be cut off, nor lose anything
/// silently.
fn measure(b: &Broker, shape: &str) -> Measured {
    if shape == "idle" {
        let r = run_bystander(b);
        return Measured {
            shape: shape.into(),
            ping_p50: field(&r, "ping_p50"),
            ping_p99: field(&r, "ping_p99"),
            pubsub_p50: field(&r, "pubsub_p50"),
            pubsub_p99: field(&r, "pubsub_p99"),
            ns_per_delivery: 0.0,
            deliveries_per_s: 0.0,
            setup_ms: 0.0,
        };
    }
    let conns = env_or("SUBMAP_CONNS", 1);
    let period = env_or("SUBMAP_PERIOD_US", 20_000);
    let run = attack(b, shape, conns, period, true);
    let (stats, delivered) = (&run.stats, field(&run.stats, "delivered"));
    assert!(delivered > 0, "{shape}: the attacker received nothing: {stats}");
    // Nothing lost silently: each delivery came, or a gap counted it.
    assert_eq!(
        delivered + field(stats, "missed"),
        field(stats, "expected"),
        "{shape}: deliveries neither received nor reported missed: {stats}\n{}",
        run.stderr
    );
    Measured {
        shape: shape.into(),
        ping_p50: field(&run.bystander, "ping_p50"),
        ping_p99: field(&run.bystander, "ping_p99"),
        pubsub_p50: field(&run.bystander, "pubsub_p50"),
        pubsub_p99: field(&run.bystander, "pubsub_p99"),
        ns_per_delivery: run.broker_cpu.as_nanos() as f64 / delivered as f64,
        deliveries_per_s: delivered as f64 / run.elapsed.as_secs_f64(),
        setup_ms: field(&run.ready, "setup_us") as f64 / 1000.0,
    }
}

/// What one attack's helpers said, and the broker's CPU time meanwhile.
struct Run {
    ready: String,
    stats: String,
    stderr: String,
    bystander: String,
    broker_cpu: Duration,
    elapsed: Duration,
}

fn attack(b: &Broker, shape: &str, conns: u64, period_us: u64, drain: bool) -> Run {
    let envs = [
        (MODE, shape.to_owned()),
        (CONNS, conns.to_string()),
        (PERIOD, period_us.to_string()),
        (DRAIN, u8::from(drain).to_string()),
    ];
    let mut a = helper("attacker", &b.address, ATTACKER, &envs);
    let ready = a.expect("ready");
    let (cpu0, t0) = (b.cpu_ns(), Instant::now());
    std::thread::sleep(Duration::from_millis(WARM_MS.get()));
    let bystander = run_bystander(b);
    // Closing its stdin stops the attacker.
    drop(a.child.0.as_mut().unwrap().stdin.take());
    let stats = a.expect("stats");
    let (cpu1, elapsed) = (b.cpu_ns(), t0.elapsed());
    let stderr = a.stderr();
    a.finish();
    eprintln!("SUBMAP   {shape}: attacker {ready}; {stats}");
    assert_eq!(field(&stats, "cut"), 0, "{shape}: the attacker was cut off: {stats}\n{stderr}");
    Run { ready, stats, stderr, bystander, broker_cpu: Duration::from_nanos(cpu1 - cpu0), elapsed }
}

fn show(m: &Measured) {
    let us = |ns: u64| ns as f64 / 1000.0;
    eprintln!(
        "SUBMAP {:>20}: ping p50 {:7.1} µs p99 {:7.1} µs | pub/sub p50 {:7.1} µs p99 {:7.1} µs | broker {:6.0} ns/delivery, {:8.0} deliveries/s | setup {:6.1} ms",
        m.shape,
        us(m.ping_p50),
        us(m.ping_p99),
        us(m.pubsub_p50),
        us(m.pubsub_p99),
        m.ns_per_delivery,
        m.deliveries_per_s,
        m.setup_ms
    );
}

/// The ids aimed at one bucket under key 0 do share one bucket under key
/// 0, and do not under a random key (the broker draws one per map); and
/// the copy of the hasher shows what one bucket would cost a lookup.
#[test]
fn aimed_ids_collide_only_under_the_key_they_were_aimed_at() {
    use std::hash::{BuildHasher, Hasher};
    let aimed = ids("one-bucket-if-key-0", PER_CONN);
    let buckets =
        |key: u64| aimed.iter().map(|&id| fmix(id, key) % BUCKETS).collect::<std::collections::HashSet<_>>();
    assert_eq!(buckets(0).len(), 1);
    let key = std::collections::hash_map::RandomState::new().hash_one(0u64);
    assert!(buckets(key).len() > 2000, "aimed ids fell in {} buckets under a random key", buckets(key).len());

    // What a lookup costs, one bucket against spread (informative only).
    #[derive(Clone, Copy)]
    struct Fmix(u64);
    struct H(u64, u64);
    impl Hasher for H {
        fn finish(&self) -> u64 {
            self.1
        }
        fn write(&mut self, _: &[u8]) {
            unreachable!()
        }
        fn write_u32(&mut self, id: u32) {
            self.1 = fmix(id, self.0);
        }
    }
    impl BuildHasher for Fmix {
        type Hasher = H;
        fn build_hasher(&self) -> H {
            H(self.0, 0)
        }
    }
    for (what, k) in [("key 0 (one bucket)", 0), ("a random key", key)] {
        let mut map = std::collections::HashMap::with_hasher(Fmix(k));
        let t = Instant::now();
        for &id in &aimed {
            map.insert(id, id);
        }
        let insert = t.elapsed();
        let t = Instant::now();
        let mut found = 0u64;
        for _ in 0..20 {
            for id in &aimed {
                found += u64::from(*map.get(id).unwrap() == *id);
            }
        }
        let per = t.elapsed().as_nanos() as f64 / found as f64;
        eprintln!(
            "SUBMAP control, aimed ids under {what}: {insert:?} to insert {PER_CONN}, {per:.1} ns per lookup"
        );
    }
}

#[test]
fn attack_structured_subscription_ids_cost_no_more_than_random_ones() {
    if !needs_root("attack_structured_subscription_ids_cost_no_more_than_random_ones") {
        return;
    }
    let _alone = measuring_alone();
    let b = Broker::start_with(
        "attack-submap",
        &["--allow-uid", &NOBODY.to_string(), "--allow-uid", &ATTACKER.to_string()],
    );
    let rounds = env_or("SUBMAP_ROUNDS", 1);
    let mut failures = Vec::new();
    for round in 0..rounds {
        eprintln!("SUBMAP round {round} ({})", if socket_only() { "socket" } else { "shared memory" });
        show(&measure(&b, "idle"));
        let random = measure(&b, "random");
        show(&random);
        let shaped: Vec<Measured> = SHAPES.iter().map(|shape| measure(&b, shape)).inspect(show).collect();
        let again = measure(&b, "random");
        show(&again);
        // Against the dearer of the two random runs, before and after.
        let base = random.ns_per_delivery.max(again.ns_per_delivery);
        for m in &shaped {
            eprintln!("SUBMAP   {}: {:.2}× random's CPU per delivery", m.shape, m.ns_per_delivery / base);
            if m.ns_per_delivery > K * base {
                failures.push(format!(
                    "round {round}, {}: {:.0} ns of broker CPU per delivery, random ids {:.0} and {:.0}",
                    m.shape, m.ns_per_delivery, random.ns_per_delivery, again.ns_per_delivery
                ));
            }
        }
    }
    assert!(failures.is_empty(), "structured ids cost more than random ones:\n{}", failures.join("\n"));
}

/// Not a test: a probe of what one uid's fan-out costs a bystander
/// whatever the ids, at that uid's whole subscription allowance (4
/// connections of 4,096: `--uid-subscriptions`' 16,384), random ids,
/// draining or never reading (`Gap` subscriptions drop, and cost the
/// broker a lookup and a count each). Prints; asserts nothing.
///
/// Over the socket (`SHMBUS_TRANSPORT=socket`), never reading, a publish
/// every 200 µs (3% of a CPU for the attacker), it showed on 2026-12-01
/// the bystander's ping p50 at 88–140 ms (idle 15 µs), its pub/sub p99
/// at 0.2–0.5 s: the publisher's connection was in the reactor's
/// `read_again` list dozens of times over (each `read_conn` that spends
/// its work budget pushes it again, and a readable event reads it once
/// more in the same turn), and each entry is a fresh `WORK_BUDGET` in
/// one turn. Over the link it stayed near 1 ms.
#[test]
#[ignore = "a probe, run by hand: --ignored --nocapture probe_"]
fn probe_fan_out_to_the_subscription_allowance() {
    if !needs_root("probe_fan_out_to_the_subscription_allowance") {
        return;
    }
    let _alone = measuring_alone();
    let b = Broker::start_with(
        "probe-fan-out",
        &["--allow-uid", &NOBODY.to_string(), "--allow-uid", &ATTACKER.to_string()],
    );
    let conns = env_or("SUBMAP_CONNS", 4);
    show(&measure(&b, "idle"));
    for (drain, period) in [(true, 5000), (false, 5000), (false, 1000), (false, 200), (false, 0)] {
        let run = attack(&b, "random", conns, period, drain);
        let published = field(&run.stats, "published");
        eprintln!(
            "SUBMAP probe {conns}x{PER_CONN} subs, {}, a publish every {period} µs: {published} publishes ({:.0}/s); broker CPU {:.0}%, attacker CPU {} ms in {:?}; bystander {}",
            if drain { "draining" } else { "never reading" },
            published as f64 / run.elapsed.as_secs_f64(),
            run.broker_cpu.as_secs_f64() / run.elapsed.as_secs_f64() * 100.0,
            field(&run.stats, "cpu_ms"),
            run.elapsed,
            run.bystander
        );
    }
}

/// A uid's whole subscription allowance (4 connections of 4,096, random
/// ids, never reading: each delivery is dropped and counted), a publish
/// every 200 µs over the socket: the bystander's ping waits for at most
/// about one turn of the broker's loop, and a turn gives the attacker's
/// connection one read budget (`WORK_BUDGET`, 32 Ki deliveries: two of
/// its publishes). What one publish costs the broker is measured in the
/// same run (its CPU time over the publishes it handled), so the bound
/// is relative to this machine and build: the ping's p50 at most three
/// times its idle p50, plus eight publishes' broker time (four turns),
/// plus 2 ms. Before the fix (a connection read with a fresh budget as
/// often as it was queued in one turn) it was 85 ms against a bound of
/// 5 ms, release build; fixed, 1.9 ms. In a debug build the margins are
/// thin (fixed 10–20 ms against a bound of 23–37 ms; before, 54–57 ms
/// against 22–25), too thin for a shared CI machine: so it is run by hand
/// (`--release -- --ignored --nocapture a_fan_out`), and
/// `daemon/read_turns.rs`'s unit tests hold the rule in CI.
#[test]
#[ignore = "timing, run by hand in release: --ignored --nocapture a_fan_out"]
fn a_fan_out_flood_costs_a_bystander_one_read_budget_a_turn() {
    if !needs_root("a_fan_out_flood_costs_a_bystander_one_read_budget_a_turn") {
        return;
    }
    let _alone = measuring_alone();
    TRANSPORT.set(Some("socket"));
    WARM_MS.set(env_or("SUBMAP_WARM_MS", 300));
    let b = Broker::start_with(
        "budget-a-turn",
        &["--allow-uid", &NOBODY.to_string(), "--allow-uid", &ATTACKER.to_string()],
    );
    let idle = measure(&b, "idle");
    let run = attack(&b, "random", 4, 200, false);
    let published = field(&run.stats, "published").max(1);
    let per_publish = run.broker_cpu / published as u32;
    let ping_p50 = Duration::from_nanos(field(&run.bystander, "ping_p50"));
    let bound = Duration::from_nanos(idle.ping_p50) * 3 + per_publish * 8 + Duration::from_millis(2);
    eprintln!(
        "SUBMAP budget: idle ping p50 {:?}; under attack {ping_p50:?} ({} publishes, {per_publish:?} of broker CPU each); bound {bound:?}",
        Duration::from_nanos(idle.ping_p50),
        published
    );
    assert!(
        ping_p50 <= bound,
        "a bystander's ping waited {ping_p50:?} (p50) behind another uid's fan-out, more than {bound:?} \
         (three times its idle {:?}, eight publishes' broker time {per_publish:?} each, and 2 ms): {}",
        Duration::from_nanos(idle.ping_p50),
        run.bystander
    );
}
