//! Attacks on the answer wait (`daemon/link.rs`: `ANSWER_GAP`,
//! `ConnLink::delivered`, `answers`, `window`, `slept`; its use in
//! `flush_link`): after delivering into the ring of a client that answers
//! quickly, the broker wakes that ring and spins on it (no system call)
//! for up to `2 * ANSWER_GAP`, to catch the answer without a doorbell.
//!
//! A hostile client (or several, colluding) tries to buy spinning with
//! it: a self-feeding loop, a ping-pong pair, a client trained to look
//! quick that then leaves its answers out, clients that lie in their half
//! while an answer is awaited, and answerers killed with SIGKILL in the
//! middle of an exchange. In each:
//! - once the attackers go quiet (still connected), the broker's CPU
//!   comes back to nothing: under [`QUIET_CPU`] over the [`QUIET`] that
//!   follows (an idle broker spends 0 µs there);
//! - the wake-ups of an attacker's ring and the doorbells the broker
//!   sends it are bounded by what it writes and is sent, not by time;
//! - a bystander of another uid (65534) doing ping and pub/sub round
//!   trips through `shmbusctl` is never refused nor cut off, each round
//!   within PATIENCE;
//! - the broker lives, and gives back every fd.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use shmbus_proto::frame::{BrokerFrame, Doorbell, Overflow, PayloadRef, Publish};

const SAY: &str = "ANSWER:";
const ROLE: &str = "SHMBUS_ANSWER_ROLE";
const ADDRESS: &str = "SHMBUS_ANSWER_ADDRESS";

/// How long after the attackers went quiet the broker's CPU is measured.
const QUIET: Duration = Duration::from_secs(1);
/// The most CPU the broker may spend over [`QUIET`]: an answer window is
/// 200 µs at most, a spin window 400 µs; a broker left spinning spends
/// the whole second.
const QUIET_CPU: Duration = Duration::from_millis(50);

fn publish(topic: &str) -> Publish<'_> {
    Publish { topic, origin: None, payload: PayloadRef::Inline }
}

fn alive(b: &mut Broker) {
    let status = b.child.as_mut().unwrap().try_wait().unwrap();
    assert!(status.is_none(), "the broker died: {status:?}");
}

/// The broker's CPU over the [`QUIET`] from now, which must be under
/// [`QUIET_CPU`]: no ring is left hot once its clients are silent.
fn quiet_costs_nothing(b: &Broker, what: &str) -> Duration {
    let c0 = b.cpu_ns();
    let w0 = b.runs();
    std::thread::sleep(QUIET);
    let spent = Duration::from_nanos(b.cpu_ns() - c0);
    let woke = b.runs() - w0;
    eprintln!("{what}: the broker spent {spent:?} of CPU ({woke} wake-ups) in the {QUIET:?} after its clients went quiet");
    assert!(
        spent < QUIET_CPU,
        "{what}: the broker spent {spent:?} of CPU in the {QUIET:?} after its clients went quiet: a ring left hot"
    );
    spent
}

/// Times the broker put `l`'s ring to sleep since `since` (its
/// `consumer_sleep` word in the broker's half goes up by 2 a sleep and
/// wake-up; by 1 if it sleeps now).
fn ring_sleeps(l: &RawLink, since: u32) -> u32 {
    l.map.peer().consumer_sleep.v.load(Ordering::Acquire).wrapping_sub(since).div_ceil(2)
}

fn sleep_word(l: &RawLink) -> u32 {
    l.map.peer().consumer_sleep.v.load(Ordering::Acquire)
}

fn is_deliver(p: &Packet) -> bool {
    matches!(p.frame(), Some(BrokerFrame::Deliver(..)))
}

// ------------------------------------------------------------ bystander --

/// A broker that lets the bystander in. (With the default Hello timeout:
/// the bystander's few hundred short connections once woke the broker at
/// each one's Hello deadline, inside the quiet windows measured here.)
fn bystander_broker(tag: &str) -> Broker {
    Broker::start_with(tag, &["--allow-uid", "65534"])
}

/// Joins `h` within PATIENCE.
fn join_bounded<T>(h: std::thread::JoinHandle<T>) -> T {
    let deadline = Instant::now() + PATIENCE;
    while !h.is_finished() {
        assert!(Instant::now() < deadline, "an attacker thread never stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
    h.join().expect("an attacker thread")
}

// ------------------------------------------------- 1: feeding loops --

/// A linked client that answers every frame it gets with a publish to
/// `to` (delivered back to itself or to an accomplice) until `stop`;
/// returns itself (still connected, from then on silent), with how many
/// it answered, how many doorbells the broker sent it, and how often the
/// broker put its ring to sleep.
fn answer_every_frame(
    mut l: RawLink,
    to: String,
    kick: usize,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(RawLink, u64, u32)> {
    std::thread::spawn(move || {
        let word = sleep_word(&l);
        for _ in 0..kick {
            l.send_body(&publish(&to), b"kick");
        }
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if let Some(p) = l.recv_packet(Duration::from_millis(20)) {
                assert!(!p.is_eof(), "a feeding client was cut off");
                if is_deliver(&p) {
                    l.send_body(&publish(&to), b"again");
                    n += 1;
                }
            }
        }
        let sleeps = ring_sleeps(&l, word);
        (l, n, sleeps)
    })
}

/// A client subscribed to its own subject answers each delivery with a
/// publish to it (a self-feeding loop, 4 frames in flight), and two
/// colluding clients ping-pong one frame between them, each answering at
/// once: the broker serves them as any busy exchange, spinning. Once they
/// stop (staying connected, silent), the broker's CPU must come back to
/// nothing within [`QUIET`]; meanwhile a bystander of another uid is
/// served.
#[test]
fn attack_feeding_loops_leave_no_spin_once_they_stop() {
    if !needs_root("attack_feeding_loops_leave_no_spin_once_they_stop") {
        return;
    }
    let _alone = measuring_alone();
    let mut b = bystander_broker("att-answer-loop");
    let base = b.baseline_fds();
    // Twice: with the bystander running meanwhile, then alone (so the
    // quiet second starts the moment the attackers stop).
    for with_bystander in [true, false] {
        let stop = Arc::new(AtomicBool::new(false));
        let mut me = RawLink::attach(&b, "self-feeder");
        me.subscribe(1, "loop.self", Overflow::Gap);
        let mut a = RawLink::attach(&b, "ping");
        a.subscribe(1, "pp.a", Overflow::Gap);
        let mut z = RawLink::attach(&b, "pong");
        z.subscribe(1, "pp.b", Overflow::Gap);
        let by = with_bystander.then(|| Bystander::start(&b));
        let (c0, t0) = (b.cpu_ns(), Instant::now());
        let hs = vec![
            answer_every_frame(me, "loop.self".into(), 4, stop.clone()),
            answer_every_frame(z, "pp.a".into(), 0, stop.clone()),
            answer_every_frame(a, "pp.b".into(), 1, stop.clone()),
        ];
        std::thread::sleep(Duration::from_millis(1500));
        let rounds = by.map(Bystander::finish);
        alive(&mut b);
        stop.store(true, Ordering::Relaxed);
        let done: Vec<_> = hs.into_iter().map(join_bounded).collect();
        let share = (b.cpu_ns() - c0) as f64 / t0.elapsed().as_nanos() as f64;
        for (what, (l, n, sleeps)) in ["self-feeder", "pong", "ping"].iter().zip(&done) {
            eprintln!(
                "{what}: answered {n} frames; the broker rang it {} times, put its ring to sleep {sleeps} times",
                l.doorbells
            );
            assert!(*n > 100, "{what}: the loop hardly ran ({n} answers)");
            assert!(l.doorbells <= n + 16, "{what}: {} doorbells for {n} frames", l.doorbells);
            assert!(
                u64::from(*sleeps) <= 2 * n + 16,
                "{what}: its ring slept {sleeps} times for {n} records"
            );
        }
        eprintln!("broker CPU during the loops: {:.0}%; bystander rounds: {rounds:?}", share * 100.0);
        // Silent, still connected.
        quiet_costs_nothing(&b, &format!("feeding loops (bystander: {with_bystander})"));
        let mut links: Vec<RawLink> = done.into_iter().map(|(l, _, _)| l).collect();
        // Still served: the loops' frames in flight are read off first.
        for (i, l) in links.iter_mut().enumerate() {
            l.send_body(&shmbus_proto::frame::Ping { token: 1000 + i as u64 }, &[]);
            let deadline = Instant::now() + PATIENCE;
            loop {
                let p = l.next_packet();
                assert!(!p.is_eof(), "a quiet feeding client was cut off");
                if matches!(p.frame(), Some(BrokerFrame::Pong(p)) if p.token == 1000 + i as u64) {
                    break;
                }
                assert!(Instant::now() < deadline, "no pong");
            }
        }
        quiet_costs_nothing(&b, "feeding loops, after a ping each");
    }
    b.wait_fd_count(base);
    alive(&mut b);
}

// ------------------------------------------ 2: answers left out --

/// Clients trained to look quick (they answer two deliveries in three at
/// once) leave every third answer out, and come back only after 300 µs
/// (a sparse stream: the answer wait is what keeps their rings hot): each
/// left-out answer buys up to `2 * ANSWER_GAP` of spinning for nothing.
/// That spinning is bounded by the records they write (one window per
/// record), the broker's wake-ups of their rings and its doorbells by
/// what they write and are sent; a bystander of another uid is served;
/// once they stop, the broker sleeps. Some clients also flip their
/// `consumer_sleep` word after each record, so that the broker must ring
/// them at each delivery.
#[test]
fn attack_clients_that_leave_answers_out_buy_no_unbounded_spin() {
    if !needs_root("attack_clients_that_leave_answers_out_buy_no_unbounded_spin") {
        return;
    }
    let _alone = measuring_alone();
    const K: usize = 8;
    let mut b = bystander_broker("att-answer-leave-out");
    let base = b.baseline_fds();
    let mut ls: Vec<RawLink> = (0..K).map(|k| RawLink::attach(&b, &format!("quick{k}"))).collect();
    let baits: Vec<String> = (0..K).map(|k| format!("bait.{k}")).collect();
    for (l, bait) in ls.iter_mut().zip(&baits) {
        l.subscribe(1, bait, Overflow::Gap);
    }
    let words: Vec<u32> = ls.iter().map(sleep_word).collect();
    let by = Bystander::start(&b);
    let (mut records, mut delivered, mut rounds) = (vec![0u64; K], vec![0u64; K], 0u64);
    let (c0, t0) = (b.cpu_ns(), Instant::now());
    while t0.elapsed() < Duration::from_secs(2) {
        rounds += 1;
        for (k, l) in ls.iter_mut().enumerate() {
            l.send_body(&publish(&baits[k]), b"bait");
            records[k] += 1;
            // Its delivery, at once (the broker's window runs from it).
            let p = loop {
                let p = l.next_packet();
                assert!(!p.is_eof(), "quick{k} was cut off");
                if is_deliver(&p) {
                    break p;
                }
            };
            drop(p);
            delivered[k] += 1;
            // Some lie: "I sleep" (fresh odd values), while they do not.
            let own = l.map.mine().consumer_sleep.v.load(Ordering::Relaxed);
            if k % 2 == 1 {
                let w = &l.map.mine().consumer_sleep.v;
                w.store(own.wrapping_add(2) | 1, Ordering::Release);
                w.store(own, Ordering::Release);
                w.store(own.wrapping_add(4) | 1, Ordering::Release);
            }
            if rounds % 3 != 0 {
                // The answer, at once: a publish no one receives.
                l.send_body(&publish("answers.sink"), b"a");
                records[k] += 1;
            }
            // Its own value back, for its own consumer's sake.
            l.map.mine().consumer_sleep.v.store(own, Ordering::Release);
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    let share = (b.cpu_ns() - c0) as f64 / t0.elapsed().as_nanos() as f64;
    let rounds_by = by.finish();
    alive(&mut b);
    eprintln!(
        "{rounds} rounds of {K} clients, {} records, {} deliveries: broker CPU {:.0}%; bystander rounds {rounds_by}",
        records.iter().sum::<u64>(),
        delivered.iter().sum::<u64>(),
        share * 100.0
    );
    for (k, l) in ls.iter().enumerate() {
        let sleeps = ring_sleeps(l, words[k]);
        eprintln!(
            "quick{k}: {} records, {} deliveries; {sleeps} sleeps of its ring, {} doorbells to it",
            records[k], delivered[k], l.doorbells
        );
        // Each record may wake its ring twice: its doorbell, and the
        // answer wait after the delivery it causes.
        assert!(
            u64::from(sleeps) <= 2 * records[k] + 16,
            "quick{k}: its ring slept (and was woken) {sleeps} times for {} records",
            records[k]
        );
        assert!(
            l.doorbells <= delivered[k] + 16,
            "quick{k}: {} doorbells for {} deliveries",
            l.doorbells,
            delivered[k]
        );
    }
    quiet_costs_nothing(&b, "clients that leave answers out");
    for (i, l) in ls.iter_mut().enumerate() {
        l.ping(i as u64);
    }
    drop(ls);
    b.wait_fd_count(base);
    alive(&mut b);
}

// -------------------------------------------------- 3: scribbles --

/// A client that answers each of its own frames at once, `n` times: the
/// broker then times it as answering quickly.
fn train(l: &mut RawLink, topic: &str, n: u32) {
    for _ in 0..n {
        l.send_body(&publish(topic), b"t");
        loop {
            let p = l.next_packet();
            assert!(!p.is_eof(), "cut off while training");
            if is_deliver(&p) {
                break;
            }
        }
    }
}

/// The reason of the goodbye the broker left in `l`'s ring, if any (its
/// socket closed already: the ring is read to its end, nothing waited for).
fn goodbye_in_ring(l: &mut RawLink) -> Option<String> {
    let mut reason = None;
    while let Some(p) = l.recv_packet(Duration::ZERO) {
        if let Some(BrokerFrame::Goodbye(g)) = p.frame() {
            reason = Some(g.reason.to_string());
        }
    }
    reason
}

/// Whether `l`'s socket is at its end (or reset) within `wait`; packets
/// before the end (doorbells, a goodbye on the socket) are passed over.
fn socket_ends_within(l: &mut RawLink, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        match l.raw.recv_packet(left) {
            Some(p) if p.is_eof() => return true,
            Some(_) => {}
            None => return false,
        }
    }
}

/// Lies told in a client's half while the broker awaits its answer
/// (trained first, so its ring is hot after each delivery): its ring's
/// tail far ahead, its tail moved back, a read position in our ring past
/// what we wrote, and a sleep flag and presence word flipped at random
/// while it answers. The broker cuts the first three off (with a reason
/// where its ring still can carry one) and ignores the last; it never
/// dies, hangs, or spins once they are quiet; a bystander of another uid
/// is served throughout; every fd comes back.
#[test]
fn attack_lies_while_an_answer_is_awaited_end_the_liar_or_are_ignored() {
    if !needs_root("attack_lies_while_an_answer_is_awaited_end_the_liar_or_are_ignored") {
        return;
    }
    let _alone = measuring_alone();
    let mut b = bystander_broker("att-answer-lies");
    let base = b.baseline_fds();
    let by = Bystander::start(&b);
    let mut calm = RawLink::attach(&b, "calm");
    let mut flippers = Vec::new();
    // What the bystander alone costs the broker, for the log.
    std::thread::sleep(Duration::from_millis(200));
    let (c0, t0) = (b.cpu_ns(), Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    eprintln!(
        "the bystander alone: broker CPU {:?} in {:?}",
        Duration::from_nanos(b.cpu_ns() - c0),
        t0.elapsed()
    );

    for round in 0..3 {
        // Its ring's tail far ahead, told right after our delivery (the
        // ring hot, awaiting the answer), no doorbell.
        let mut liar = RawLink::attach(&b, "tail-ahead");
        liar.subscribe(1, "lie.tail", Overflow::Gap);
        train(&mut liar, "lie.tail", 64);
        liar.send_body(&publish("lie.tail"), b"x");
        assert!(is_deliver(&liar.next_packet()));
        liar.map.mine().tail.v.store(1 << 40, Ordering::Release);
        let unrung = socket_ends_within(&mut liar, Duration::from_millis(200));
        if !unrung {
            // Its window ran out before the broker saw the lie (a
            // preempted broker): a doorbell makes it look.
            liar.raw.send_body(&Doorbell, &[]);
            assert!(socket_ends_within(&mut liar, PATIENCE), "a tail far ahead never ended its liar");
        }
        let why = goodbye_in_ring(&mut liar);
        eprintln!(
            "round {round}: a tail far ahead ended its liar ({why:?}; seen without a doorbell: {unrung})"
        );
        assert!(why.is_some_and(|w| w.contains("position")), "a tail far ahead: no reason given");
        drop(liar);

        // Its tail moved back, behind what the broker read.
        let mut liar = RawLink::attach(&b, "tail-back");
        liar.subscribe(1, "lie.back", Overflow::Gap);
        train(&mut liar, "lie.back", 64);
        liar.send_body(&publish("lie.back"), b"x");
        assert!(is_deliver(&liar.next_packet()));
        let t = liar.map.mine().tail.v.load(Ordering::Acquire);
        liar.map.mine().tail.v.store(t - 8, Ordering::Release);
        let unrung = socket_ends_within(&mut liar, Duration::from_millis(200));
        let ended = unrung || {
            liar.raw.send_body(&Doorbell, &[]);
            socket_ends_within(&mut liar, Duration::from_secs(2))
        };
        let why = goodbye_in_ring(&mut liar);
        eprintln!(
            "round {round}: a tail moved back: liar ended {ended} ({why:?}; without a doorbell: {unrung})"
        );
        // The broker read all it wrote (its delivery came back), so the
        // tail is now behind the broker's own position: a lie, seen at the
        // broker's next look (the doorbell makes one).
        assert!(ended, "a tail moved back behind what the broker read did not end its liar");
        assert!(
            why.as_deref().is_some_and(|w| w.contains("position")),
            "a tail moved back: no reason given ({why:?})"
        );
        drop(liar);

        // A read position in our ring past what we wrote, told while an
        // answer is awaited: harmless until the broker needs room in its
        // ring (frames it is sent and does not read, from another client),
        // then found, and the ring can no longer be written: the socket
        // is closed.
        let mut liar = RawLink::attach(&b, "head-ahead");
        liar.subscribe(1, "lie.head", Overflow::Gap);
        train(&mut liar, "lie.head", 64);
        liar.send_body(&publish("lie.head"), b"x");
        assert!(is_deliver(&liar.next_packet()));
        liar.map.mine().head.v.store(1 << 40, Ordering::Release);
        let mut flood = RawLink::attach(&b, "flood");
        let mut floods = 0;
        while floods < 20_000 && !socket_ends_within(&mut liar, Duration::from_micros(1)) {
            for _ in 0..256 {
                flood.send_body(&publish("lie.head"), &[floods as u8; 100]);
                floods += 1;
            }
        }
        assert!(
            socket_ends_within(&mut liar, PATIENCE),
            "a read position past our writing never ended its liar"
        );
        eprintln!("round {round}: a read position past our writing ended its liar after {floods} frames");
        flood.ping(round.into());
        drop((liar, flood));

        // The sleep flag and presence word flipped at random around each
        // answer, for 300 ms: at most a doorbell per delivery.
        let mut liar = RawLink::attach(&b, "flipper");
        liar.subscribe(1, "lie.flip", Overflow::Gap);
        train(&mut liar, "lie.flip", 64);
        let own_presence = liar.map.mine().presence.v.load(Ordering::Relaxed);
        let (word, bells) = (sleep_word(&liar), liar.doorbells);
        let mut x: u32 = 0x9e37_79b9 ^ round;
        let (mut sent, mut got) = (0u64, 0u64);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(300) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let own = liar.map.mine().consumer_sleep.v.load(Ordering::Relaxed);
            liar.map.mine().consumer_sleep.v.store(x, Ordering::Release);
            liar.map.mine().presence.v.store(x.rotate_left(7), Ordering::Release);
            liar.send_body(&publish("lie.flip"), b"f");
            sent += 1;
            liar.map.mine().consumer_sleep.v.store(own, Ordering::Release);
            loop {
                let p = liar.next_packet();
                assert!(!p.is_eof(), "a flipper was cut off: a lie in a hint word is to be ignored");
                if is_deliver(&p) {
                    got += 1;
                    break;
                }
            }
        }
        liar.map.mine().presence.v.store(own_presence, Ordering::Release);
        let sleeps = ring_sleeps(&liar, word);
        eprintln!(
            "round {round}: a flipper: {sent} records, {got} deliveries, {} doorbells, {sleeps} sleeps of its ring",
            liar.doorbells - bells
        );
        assert!(
            liar.doorbells - bells <= got + 16,
            "{} doorbells for {got} deliveries",
            liar.doorbells - bells
        );
        assert!(u64::from(sleeps) <= 2 * sent + 16, "its ring slept {sleeps} times for {sent} records");
        liar.ping(7);
        // Quiet, connected, with a lie in place: "I wait for you, on a
        // CPU of my choosing" (measured once the bystander is done).
        liar.map.mine().presence.v.store(x | 1, Ordering::Release);
        flippers.push(liar);
        calm.ping(round.into());
        alive(&mut b);
    }
    let rounds = by.finish();
    eprintln!("bystander rounds: {rounds}");
    quiet_costs_nothing(&b, "after the lies (the flippers connected, quiet)");
    drop((calm, flippers));
    b.wait_fd_count(base);
    alive(&mut b);
}

// -------------------------------------------- 4: SIGKILL mid-exchange --

/// Not a test on its own: the body of the answerer processes, run only
/// when a test spawns this binary with `--ignored --exact helper_process`.
#[test]
#[ignore = "helper process body, spawned by the other tests"]
fn helper_process() {
    let address = std::env::var(ADDRESS).expect("the broker's address");
    match std::env::var(ROLE).as_deref() {
        Ok("answerer") => {
            let mut l = RawLink::attach_at(&address, "answerer");
            l.subscribe(1, "req", Overflow::Gap);
            println!("{SAY}ready");
            // Answers each request at once, until killed.
            loop {
                if let Some(p) = l.recv_packet(Duration::from_secs(60)) {
                    assert!(!p.is_eof(), "the answerer was cut off");
                    if is_deliver(&p) {
                        l.send_body(&publish("ans"), b"answer");
                    }
                }
            }
        }
        other => panic!("unknown role {other:?}"),
    }
}

fn answerer(address: &str) -> Helper {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--exact", "helper_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE, "answerer")
        .env(ADDRESS, address)
        .stdin(std::process::Stdio::null());
    let mut h = Helper::spawn(&mut cmd, SAY);
    h.expect("ready");
    h
}

/// An answerer in a process of its own is killed with SIGKILL in the
/// middle of a quick request/answer exchange (the broker awaiting its
/// answer, or with requests it has not read yet), a few times at
/// different moments: the broker ends its connection, its CPU comes back
/// to nothing while the requester stays connected and quiet, and every
/// fd comes back.
#[test]
fn attack_an_answerer_killed_mid_exchange_leaves_no_spin_and_no_fd() {
    let _alone = measuring_alone();
    let mut b = Broker::start("att-answer-kill");
    let base = b.baseline_fds();
    let mut requester = RawLink::attach(&b, "requester");
    requester.subscribe(1, "ans", Overflow::Gap);
    let with_requester = b.baseline_fds();
    for (i, backlog) in [0usize, 1, 64, 0, 1000].into_iter().enumerate() {
        let mut h = answerer(&b.address);
        // A quick exchange: one request at a time, answered at once.
        let t0 = Instant::now();
        let mut rounds = 0u64;
        while t0.elapsed() < Duration::from_millis(300) {
            requester.send_body(&publish("req"), &rounds.to_le_bytes());
            loop {
                let p = requester.next_packet();
                assert!(!p.is_eof(), "the requester was cut off");
                if is_deliver(&p) {
                    break;
                }
            }
            rounds += 1;
        }
        // The moment: requests in flight (or none), then SIGKILL.
        for _ in 0..backlog {
            requester.send_body(&publish("req"), b"more");
        }
        if i == 3 {
            std::thread::sleep(Duration::from_micros(150));
        }
        let mut child = h.child.0.take().unwrap();
        child.kill().unwrap();
        assert!(wait_timeout(&mut child, PATIENCE).is_some(), "the answerer did not die");
        eprintln!("kill {i}: after {rounds} rounds, {backlog} requests in flight");
        quiet_costs_nothing(&b, &format!("kill {i} ({backlog} requests in flight)"));
        // Its connection is gone: its fds came back.
        b.wait_fd_count(with_requester);
        // The answers that came before the kill are the requester's.
        while let Some(p) = requester.recv_packet(Duration::from_millis(50)) {
            assert!(!p.is_eof(), "the requester was cut off");
        }
        requester.ping(i as u64);
    }
    quiet_costs_nothing(&b, "after the kills");
    drop(requester);
    b.wait_fd_count(base);
    alive(&mut b);
}

// ------------------------------------- 5: an answerer cut off for slowness --

/// A client trained to answer quickly is then sent more than its ring
/// and queue hold on a subscription that disconnects slow consumers, and
/// goes silent without reading (still connected): the broker, which
/// starts closing it and waits up to its close grace (2 s) for the queue
/// to drain, must wait asleep, not spinning on the ring it last wrote
/// to; then it cuts the client off, and every fd comes back.
#[test]
fn attack_an_answerer_cut_off_for_slowness_is_waited_for_asleep() {
    let _alone = measuring_alone();
    let mut b = Broker::start_with("att-answer-slow", &["--queue-bytes", "65536"]);
    let base = b.baseline_fds();
    let mut slow = RawLink::attach(&b, "slow");
    slow.subscribe(1, "slow.>", Overflow::Disconnect);
    train(&mut slow, "slow.train", 64);
    let mut flood = RawLink::attach(&b, "flood");
    for i in 0..5000u32 {
        flood.send_body(&publish("slow.x"), &[i as u8; 100]);
    }
    flood.ping(0);
    // The slow one never reads again; the flood is done.
    quiet_costs_nothing(&b, "an answerer being cut off for slowness");
    assert!(socket_ends_within(&mut slow, PATIENCE), "the slow answerer was never cut off");
    quiet_costs_nothing(&b, "after the slow answerer was cut off");
    flood.ping(1);
    drop((slow, flood));
    b.wait_fd_count(base);
    alive(&mut b);
}
