//! Attacks on the linked-socket handling of the reactor: doorbell floods
//! (with and without records), a doorbell then a hang-up at once (the
//! socket is drained at the end of the turn, after the ring), fd-carrying
//! packets without markers under doorbells, a churn of linked
//! connections (the `PeerMap`) while others trickle, and lies in the
//! `presence` word by which the broker decides when to yield. In each a
//! socket bystander (and in some a linked one) pings: its p50 must stay
//! within 3× its idle p50 + 2 ms, every round trip within 5 s; the broker
//! must live and give back every fd.

mod common;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use shmbus_proto::frame::{encode_head, BrokerFrame, Doorbell, PayloadRef, Ping, Publish};
use shmbus_proto::sys::socket::{self, OutPacket};

/// The same for a linked client (the ping in its ring).
fn link_rtts(l: &mut RawLink, n: u64) -> Vec<Duration> {
    let mut v = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        l.send_body(&Ping { token: i }, &[]);
        loop {
            let left = ONE_PING.saturating_sub(t.elapsed());
            let p =
                l.recv_packet(left).unwrap_or_else(|| panic!("linked ping {i} unanswered in {ONE_PING:?}"));
            assert!(!p.is_eof(), "the linked bystander was cut off");
            if matches!(p.frame(), Some(BrokerFrame::Pong(p)) if p.token == i) {
                break;
            }
        }
        v.push(t.elapsed());
        std::thread::sleep(Duration::from_micros(300));
    }
    v.sort();
    v
}

/// The slack [`check`] allows over three times the idle p50: 2 ms (the
/// hang-up attack measured up to 654 µs here, its own linking cost, and CI
/// machines are busier).
const SLACK: Duration = Duration::from_millis(2);

fn check(what: &str, idle: &[Duration], busy: &[Duration]) {
    check_within(what, idle, busy, SLACK)
}

fn check_within(what: &str, idle: &[Duration], busy: &[Duration], slack: Duration) {
    eprintln!(
        "{what}: idle p50 {:?} p99 {:?} max {:?}; attacked p50 {:?} p99 {:?} max {:?}",
        pct(idle, 50),
        pct(idle, 99),
        idle[idle.len() - 1],
        pct(busy, 50),
        pct(busy, 99),
        busy[busy.len() - 1]
    );
    assert!(
        pct(busy, 50) < pct(idle, 50) * 3 + slack,
        "{what}: the attack slows the bystander's round trips (p50 {:?}, idle {:?})",
        pct(busy, 50),
        pct(idle, 50)
    );
    assert!(busy[busy.len() - 1] < ONE_PING, "{what}: a round trip took {:?}", busy[busy.len() - 1]);
}

fn alive(b: &mut Broker) {
    let status = b.child.as_mut().unwrap().try_wait().unwrap();
    assert!(status.is_none(), "the broker died: {status:?}");
}

/// A doorbell packet sent without blocking (a full socket drops it).
fn ring_nonblocking(raw: &Raw, head: &[u8]) -> bool {
    socket::send_packet(raw.fd.as_fd(), OutPacket { head, payload: &[], fds: &[] }, true).is_ok()
}

/// Attackers on threads until `stop`; returns their join handles.
fn attackers(
    n: usize,
    stop: &Arc<AtomicBool>,
    count: &Arc<AtomicU64>,
    address: &str,
    body: impl Fn(&mut RawLink, u64) + Send + Sync + Clone + 'static,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..n)
        .map(|k| {
            let (stop, count, address, body) =
                (stop.clone(), count.clone(), address.to_owned(), body.clone());
            std::thread::spawn(move || {
                let mut l = RawLink::attach_at(&address, &format!("attacker{k}"));
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    body(&mut l, i);
                    i += 1;
                }
                count.fetch_add(i, Ordering::Relaxed);
            })
        })
        .collect()
}

fn join_bounded(handles: Vec<std::thread::JoinHandle<()>>) {
    let deadline = Instant::now() + PATIENCE;
    for h in handles {
        while !h.is_finished() {
            assert!(Instant::now() < deadline, "an attacker thread never stopped");
            std::thread::sleep(Duration::from_millis(5));
        }
        h.join().unwrap();
    }
}

/// A socket and a linked client that ping while an attack runs, with
/// their round trips before it, and the broker's fd count then.
struct Bystanders {
    /// What [`check_within`] allows over three times the idle p50.
    slack: Duration,
    base: usize,
    raw: Raw,
    linked: RawLink,
    idle: Vec<Duration>,
    idle_link: Vec<Duration>,
}

impl Bystanders {
    fn join(b: &Broker) -> Bystanders {
        let base = b.baseline_fds();
        let mut raw = Raw::hello(b);
        let mut linked = RawLink::attach(b, "linked-bystander");
        let idle = socket_rtts(&mut raw, 200);
        let idle_link = link_rtts(&mut linked, 200);
        Bystanders { slack: SLACK, base, raw, linked, idle, idle_link }
    }

    /// Their round trips while the attack runs (after 100 ms of it), each
    /// checked against before (`what` names the attack); then the attack
    /// stopped, its threads joined.
    fn measure(
        &mut self,
        b: &mut Broker,
        what: &str,
        stop: &AtomicBool,
        handles: Vec<std::thread::JoinHandle<()>>,
    ) {
        std::thread::sleep(Duration::from_millis(100));
        let busy = socket_rtts(&mut self.raw, 300);
        let busy_link = link_rtts(&mut self.linked, 300);
        alive(b);
        stop.store(true, Ordering::Relaxed);
        join_bounded(handles);
        check_within(&format!("socket bystander {what}"), &self.idle, &busy, self.slack);
        check_within(&format!("linked bystander {what}"), &self.idle_link, &busy_link, self.slack);
    }

    /// They leave; every fd comes back, the broker sleeps, and lives.
    fn leave(self, mut b: Broker) {
        let base = self.base;
        drop(self);
        b.wait_fd_count(base);
        idle_costs_nothing(&b);
        alive(&mut b);
    }
}

/// A record nobody answers (a doorbell frame) in the attacker's ring,
/// published; skipped when the ring is full.
fn push_unanswered(l: &mut RawLink, bell: &[u8]) {
    let _ = l.producer.try_push(
        l.map.peer(),
        l.map.my_data(),
        shmbus_proto::link::RecordKind::Frame,
        &[bell, &[]],
    );
    l.producer.publish(l.map.mine());
}

/// Several linked clients flood doorbells on their sockets as fast as the
/// kernel takes them, some also writing a record into their ring each
/// time: the broker reads at most `SOCKET_READS` per event and defers the
/// drain to the end of the turn; the bystanders must not notice.
fn doorbell_flood(with_records: bool) {
    let mut b = Broker::start("attack-doorbell-flood");
    let mut by = Bystanders::join(&b);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let bell = encode_head(&Doorbell).unwrap();
    let hs = attackers(4, &stop, &count, &b.address, move |l, i| {
        if with_records && i.is_multiple_of(4) {
            push_unanswered(l, &bell);
        }
        if !ring_nonblocking(&l.raw, &bell) {
            std::thread::yield_now();
        }
    });
    let t0 = Instant::now();
    by.measure(&mut b, "under a doorbell flood", &stop, hs);
    let el = t0.elapsed();
    eprintln!("{} doorbells sent in ~{el:?} (records: {with_records})", count.load(Ordering::Relaxed));
    by.leave(b);
}

/// Once the attackers are gone no ring is left hot: the broker sleeps.
fn idle_costs_nothing(b: &Broker) {
    std::thread::sleep(Duration::from_millis(100));
    let c0 = b.cpu_ns();
    std::thread::sleep(Duration::from_millis(300));
    let spent = b.cpu_ns() - c0;
    assert!(spent < 30_000_000, "an idle broker spent {spent} ns of CPU in 300 ms: a ring left hot");
}

#[test]
fn attack_a_doorbell_flood_on_linked_sockets_starves_no_one() {
    let _alone = measuring_alone();
    doorbell_flood(false);
}

#[test]
fn attack_a_doorbell_flood_with_records_starves_no_one() {
    let _alone = measuring_alone();
    doorbell_flood(true);
}

/// A linked client writes a record, rings, and hangs up (or half-closes)
/// at once, over and over: the hang-up and the doorbell come in one
/// event, the socket is drained after the ring. Nothing may be left
/// behind (fds, mappings, hot rings spinning), and the bystander goes on.
#[test]
fn attack_doorbell_then_hang_up_at_once_leaves_nothing_behind() {
    let _alone = measuring_alone();
    let mut b = Broker::start("attack-bell-eof");
    let base = b.baseline_fds();
    let mut raw = Raw::hello(&b);
    let idle = socket_rtts(&mut raw, 200);
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = (0..3)
        .map(|k| {
            let (stop, rounds, address) = (stop.clone(), rounds.clone(), b.address.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut l = RawLink::attach_at(&address, "bell-eof");
                    if i.is_multiple_of(2) {
                        l.send_body(&Ping { token: i }, &[]);
                    }
                    l.raw.send_body(&Doorbell, &[]);
                    match (i + k) % 3 {
                        // Half-close: the broker sees EOF but may still write.
                        0 => unsafe {
                            libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&l.raw.fd), libc::SHUT_WR);
                        },
                        // Several doorbells, then close.
                        1 => {
                            for _ in 0..8 {
                                l.raw.send_body(&Doorbell, &[]);
                            }
                        }
                        _ => {}
                    }
                    drop(l);
                    i += 1;
                }
                rounds.fetch_add(i, Ordering::Relaxed);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50));
    let busy = socket_rtts(&mut raw, 300);
    alive(&mut b);
    stop.store(true, Ordering::Relaxed);
    join_bounded(hs);
    eprintln!("{} doorbell-and-hang-up rounds", rounds.load(Ordering::Relaxed));
    check("socket bystander while linked clients ring and hang up", &idle, &busy);
    drop(raw);
    b.wait_fd_count(base);
    idle_costs_nothing(&b);
    alive(&mut b);
}

/// Linked clients send packets with fds on their socket and never a
/// marker, then flood doorbells: the broker holds at most one packet's
/// fds per connection, the doorbells behind it wait in the kernel, and
/// the bystander goes on.
#[test]
fn attack_fd_packets_without_markers_then_doorbells() {
    let _alone = measuring_alone();
    let mut b = Broker::start("attack-fds-bells");
    let base = b.baseline_fds();
    let mut raw = Raw::hello(&b);
    let idle = socket_rtts(&mut raw, 200);
    let fds: Vec<_> = (0..4).map(|i| shmbus_proto::sys::memfd::from_bytes("p", &[i; 8]).unwrap()).collect();
    let bell = encode_head(&Doorbell).unwrap();
    let publish =
        encode_head(&Publish { topic: "x", origin: None, payload: PayloadRef::Memfd { len: 8 } }).unwrap();
    const CONNS: usize = 8;
    let mut evil: Vec<RawLink> = (0..CONNS).map(|k| RawLink::attach(&b, &format!("evil{k}"))).collect();
    for (k, l) in evil.iter().enumerate() {
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        // The first is not flooded (below it must still make progress: a
        // socket filled with doorbells while its ring sleeps would leave
        // it no way to ring, its own doing).
        let (packets, bells) = if k == 0 { (4, 4) } else { (16, 32) };
        for _ in 0..packets {
            let _ = socket::send_packet(
                l.raw.fd.as_fd(),
                OutPacket { head: &publish, payload: &[], fds: &borrowed },
                true,
            );
            for _ in 0..bells {
                ring_nonblocking(&l.raw, &bell);
            }
        }
    }
    // Doorbells keep coming while the bystander pings.
    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = evil
        .iter()
        .skip(1)
        .map(|l| {
            let fd = l.raw.fd.try_clone().unwrap();
            let (stop, bell) = (stop.clone(), bell.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if socket::send_packet(
                        fd.as_fd(),
                        OutPacket { head: &bell, payload: &[], fds: &[] },
                        true,
                    )
                    .is_err()
                    {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            })
        })
        .collect();
    let busy = socket_rtts(&mut raw, 300);
    alive(&mut b);
    let held = b.fd_count();
    stop.store(true, Ordering::Relaxed);
    join_bounded(flooders);
    check("socket bystander while fd packets wait for markers", &idle, &busy);
    // The sockets, the bystander's, and one packet's fds per connection.
    assert!(held <= base + 1 + CONNS * (1 + 4), "the broker holds {held} fds (baseline {base})");
    // Markers for a few: the connection goes on, in order.
    let l = &mut evil[0];
    for _ in 0..4 {
        assert!(l
            .producer
            .try_push(l.map.peer(), l.map.my_data(), shmbus_proto::link::RecordKind::Marker, &[])
            .unwrap());
    }
    l.publish();
    l.raw.send_body(&Doorbell, &[]);
    l.send_body(&Ping { token: 7 }, &[]);
    let deadline = Instant::now() + ONE_PING;
    let mut refused = 0;
    loop {
        let p =
            l.recv_packet(deadline.saturating_duration_since(Instant::now())).expect("no pong within 5 s");
        match p.frame() {
            Some(BrokerFrame::OpError(_)) => refused += 1,
            Some(BrokerFrame::Pong(p)) => {
                assert_eq!(p.token, 7);
                assert_eq!(refused, 4, "each payload taken in its place (and refused: 4 fds for one memfd)");
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    drop(evil);
    drop(fds);
    drop(raw);
    b.wait_fd_count(base);
    alive(&mut b);
}

/// Hundreds of linked connections come and go (the peer map grows,
/// shrinks, its slots reused) while a few others trickle records and a
/// linked and a socket bystander ping.
#[test]
fn attack_linked_connection_churn_while_others_trickle() {
    let _alone = measuring_alone();
    // Room for 200 links at once and those still closing.
    let mut b = Broker::start_with(
        "attack-link-churn",
        &["--max-connections-per-uid", "2048", "--uid-ring-bytes", "2147483648"],
    );
    let mut by = Bystanders::join(&b);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let trick = attackers(3, &stop, &count, &b.address, |l, _| {
        l.send_body(&Doorbell, &[]);
        std::thread::sleep(Duration::from_micros(30));
    });
    let churned = Arc::new(AtomicU64::new(0));
    let churn: Vec<_> = (0..2)
        .map(|_| {
            let (stop, churned, address) = (stop.clone(), churned.clone(), b.address.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // 100 at once per thread (200 in all), then all gone.
                    let mut ls: Vec<RawLink> =
                        (0..100).map(|_| RawLink::attach_at(&address, "churn")).collect();
                    for (i, l) in ls.iter_mut().enumerate() {
                        if i.is_multiple_of(3) {
                            l.send_body(&Doorbell, &[]);
                        }
                    }
                    churned.fetch_add(ls.len() as u64, Ordering::Relaxed);
                    drop(ls);
                }
            })
        })
        .collect();
    let handles = churn.into_iter().chain(trick).collect();
    by.measure(&mut b, "during link churn", &stop, handles);
    eprintln!("{} linked connections churned", churned.load(Ordering::Relaxed));
    by.leave(b);
}

/// Linked clients keep their rings dense while writing every kind of lie
/// into their `presence` word: any 32-bit word, "running on CPU 0", "on
/// CPU 1", "only waiting, on some other CPU" while they write, and the
/// claims swapped at every record. The word decides only when the broker
/// gives its CPU away, so the bystanders, socket and linked, must not
/// notice; the broker lives, gives back every fd, and sleeps once they
/// are gone.
#[test]
fn attack_presence_lies_starve_no_one() {
    let _alone = measuring_alone();
    let mut b = Broker::start("attack-presence");
    let mut by = Bystanders::join(&b);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let bell = encode_head(&Doorbell).unwrap();
    let hs = attackers(4, &stop, &count, &b.address, move |l, i| {
        let word = match i % 5 {
            0 => (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32,
            1 => 1 << 1,
            2 => 2 << 1,
            3 => (8 << 1) | 1,
            _ => u32::MAX,
        };
        // Relaxed: as a real client says it (a hint).
        l.map.mine().presence.v.store(word, Ordering::Relaxed);
        // So that the ring stays dense.
        push_unanswered(l, &bell);
        if l.producer.must_ring(l.map.peer()) && !ring_nonblocking(&l.raw, &bell) {
            std::thread::yield_now();
        }
        if i % 8 == 7 {
            // Records well under 100 µs apart keep the ring dense, and
            // the attackers' threads leave the two CPUs to the broker and
            // the bystanders now and then: spinning flat out, they alone
            // made the bystanders' p50 0.75 ms, lies or no lies (4.9 ms
            // beside another attack test in CI).
            std::thread::sleep(Duration::from_micros(20));
        }
    });
    by.measure(&mut b, "under presence lies", &stop, hs);
    eprintln!("{} lies told", count.load(Ordering::Relaxed));
    by.leave(b);
}

/// The other side of the `presence` word: linked *readers* that lie. More
/// linked subscribers than the broker follows (`UNREAD_TRACKED`, 64) take
/// a hot stream and never read their rings (so frames stay unread there,
/// their queues fill and they owe gaps), while one thread rewrites their
/// words with every kind of lie and keeps raising their sleep flags (so
/// the broker rings them, `rang`, until their sockets are full). Two
/// linked publishers keep the stream dense. The bystanders must not
/// notice; the broker lives, gives back every fd, and sleeps once they
/// are gone.
#[test]
fn attack_presence_lies_of_readers_that_never_read_starve_no_one() {
    let _alone = measuring_alone();
    use shmbus_proto::frame::{Overflow, Subscribe};
    const READERS: usize = 70;
    let mut b = Broker::start_with(
        "attack-presence-readers",
        &["--max-connections-per-uid", "2048", "--uid-ring-bytes", "2147483648"],
    );
    let mut by = Bystanders::join(&b);
    // Each record fans out to 70 stalled readers: the broker is saturated,
    // and in a debug build beside the binary's other attacks its turns
    // held the bystanders 1.0-4.2 ms at p50. Before turns were bounded
    // (`link::WORK_PER_TURN`, `TURN_TIME`) they waited 25 ms.
    by.slack = Duration::from_millis(10);
    let mut readers: Vec<RawLink> = (0..READERS)
        .map(|k| {
            let mut l = RawLink::attach(&b, &format!("liar-reader{k}"));
            l.send_body(&Subscribe { sub_id: 1, pattern: "hot.>", overflow: Overflow::Gap }, &[]);
            let p = l.recv_packet(ONE_PING).expect("Subscribed");
            assert!(matches!(p.frame(), Some(BrokerFrame::Subscribed(_))), "{:?}", p.frame());
            l
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let liar = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for (k, l) in readers.iter_mut().enumerate() {
                    let n = i.wrapping_add(k as u64);
                    let word = match n % 6 {
                        0 => (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32,
                        1 => 1 << 1,
                        2 => 2 << 1,
                        3 => (1 << 1) | 1,
                        4 => (2 << 1) | 1,
                        _ => u32::MAX,
                    };
                    let mine = l.map.mine();
                    mine.presence.v.store(word, Ordering::Relaxed);
                    // Raised (odd) and lowered in turn: a fresh raise to
                    // ring for, every other sweep.
                    mine.consumer_sleep.v.fetch_add(1, Ordering::Relaxed);
                }
                i += 1;
                // A sweep of 70 every 200 µs: each lie is held longer than
                // the broker keeps a verdict (5 µs), and the liar leaves
                // the test process's bystanders a CPU (sweeping every
                // 20 µs, it alone slowed them past the limit in a debug
                // build beside the binary's other attacks).
                std::thread::sleep(Duration::from_micros(200));
            }
            readers
        })
    };
    let count = Arc::new(AtomicU64::new(0));
    let publish =
        encode_head(&Publish { topic: "hot.x", origin: None, payload: PayloadRef::Inline }).unwrap();
    let hs = attackers(2, &stop, &count, &b.address, move |l, i| {
        let _ = l.producer.try_push(
            l.map.peer(),
            l.map.my_data(),
            shmbus_proto::link::RecordKind::Frame,
            &[&publish, b"0123456789abcdef"],
        );
        l.publish();
        if i % 8 == 7 {
            std::thread::sleep(Duration::from_micros(20));
        }
    });
    by.measure(&mut b, "under presence lies of readers that never read", &stop, hs);
    let readers = liar.join().unwrap();
    eprintln!("{} messages published to {} lying readers", count.load(Ordering::Relaxed), readers.len());
    drop(readers);
    by.leave(b);
}
