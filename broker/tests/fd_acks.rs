//! Fd acknowledgements against a real broker.
//!
//! The broker sends a connection at most `--fd-window` fds it has not
//! acknowledged, and all connections of one uid together at most
//! `--uid-unacked-fds`. Clients acknowledge at half their window while
//! they read, and everything they took before they wait: so subscribers of
//! one uid that wait for memfd payloads never hold the uid's whole budget
//! between them, however many they are.
//!
//! And a subscriber whose own fd table is full loses the memfds the kernel
//! could not give it: those messages are a counted gap, the connection
//! stays up.
//!
//! Every wait is bounded; the broker and the helper process are killed on
//! drop.

mod common;

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use shmbus::{Client, Event, Subscription};
use shmbus_proto::sys::memfd;

/// Subscribers of one uid, and the memfd payloads each must get.
const SUBSCRIBERS: usize = 6;
const MESSAGES: u64 = 20;

/// A window of 8 (an ack due at 4) and a uid-wide budget of 16: six
/// subscribers that each hold 3 unacknowledged fds (18) exhaust it, and
/// none of them reaches its threshold.
fn tight_broker(tag: &str) -> Broker {
    Broker::start_with(tag, &["--fd-window", "8", "--uid-unacked-fds", "16"])
}

/// Publishes `n` small sealed memfds on `topic`, the i-th holding `i` as 8
/// bytes, one at a time: each reaches every subscriber before the next is
/// sent, so the fds spread evenly over them (the worst case for the uid's
/// budget).
fn publish_memfds(publisher: &Client, topic: &str, n: u64) {
    for i in 0..n {
        let fd = memfd::from_bytes("fd-acks", &i.to_le_bytes()).unwrap();
        publisher.publish_fd(topic, fd.as_fd()).unwrap();
        publisher.flush().unwrap();
    }
}

/// What one subscriber got.
#[derive(Debug, Default)]
struct Tally {
    messages: u64,
    gaps: u64,
    /// The payload expected next (messages come in order, gaps skip).
    next: u64,
    error: Option<String>,
}

impl Tally {
    fn total(&self) -> u64 {
        self.messages + self.gaps
    }

    fn add(&mut self, ev: Event) {
        match ev {
            Event::Message(m) => {
                let got = u64::from_le_bytes(m.payload().try_into().expect("8 bytes"));
                assert!(got >= self.next, "payload {got} after {}", self.next);
                self.next = got + 1;
                self.messages += 1;
            }
            Event::Reconnected => panic!("unexpected reconnection"),
            Event::Gap { missed } => {
                self.next += missed;
                self.gaps += missed;
            }
        }
    }
}

/// Receives, waiting, until `MESSAGES` are accounted for or `deadline`.
fn receive_until(sub: &Subscription, deadline: Instant) -> Tally {
    let mut t = Tally::default();
    while t.total() < MESSAGES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match sub.recv_timeout(left) {
            Ok(Some(ev)) => t.add(ev),
            Ok(None) => break,
            Err(e) => {
                t.error = Some(e.to_string());
                break;
            }
        }
    }
    t
}

fn subscribers(b: &Broker, pattern: &str) -> Vec<(Client, Subscription)> {
    (0..SUBSCRIBERS)
        .map(|i| {
            let c = b.client_named(&format!("sub{i}"));
            let s = c.subscribe(pattern).unwrap();
            (c, s)
        })
        .collect()
}

fn check(tallies: &[Tally], clients: &[Client]) {
    for (i, t) in tallies.iter().enumerate() {
        assert_eq!(
            (t.total(), &t.error),
            (MESSAGES, &None),
            "subscriber {i} accounted for {} of {MESSAGES} messages: {t:?} (all: {tallies:?})",
            t.total()
        );
    }
    // Nothing is stuck behind a memfd waiting for fd credit: each pong
    // comes back.
    for (i, c) in clients.iter().enumerate() {
        c.ping().unwrap_or_else(|e| panic!("subscriber {i}'s ping after the stream: {e}"));
    }
}

/// Six subscribers of one uid, each on its thread blocking in
/// `recv_timeout`, share a budget of 16 unacknowledged fds.
#[test]
fn subscribers_of_one_uid_that_wait_never_deadlock_on_its_fd_budget() {
    let b = tight_broker("fdacks-wait");
    let publisher = b.client_named("publisher");
    let deadline = Instant::now() + PATIENCE;
    let threads: Vec<_> = subscribers(&b, "fdacks.>")
        .into_iter()
        .map(|(c, s)| {
            std::thread::spawn(move || {
                let t = receive_until(&s, deadline);
                (c, t)
            })
        })
        .collect();
    publish_memfds(&publisher, "fdacks.x", MESSAGES);
    // Each thread stops by the deadline.
    let (clients, tallies): (Vec<Client>, Vec<Tally>) =
        threads.into_iter().map(|h| h.join().unwrap()).unzip();
    check(&tallies, &clients);
}

/// The same six subscribers read by one thread that polls them with
/// `try_recv` and sleeps in between: a read that finds the socket empty
/// acknowledges everything too.
#[test]
fn subscribers_of_one_uid_that_poll_never_deadlock_either() {
    let b = tight_broker("fdacks-poll");
    let publisher = b.client_named("publisher");
    let subs = subscribers(&b, "fdacks.>");
    let feeder = std::thread::spawn(move || publish_memfds(&publisher, "fdacks.x", MESSAGES));
    let mut tallies: Vec<Tally> = (0..SUBSCRIBERS).map(|_| Tally::default()).collect();
    let start = Instant::now();
    while tallies.iter().any(|t| t.total() < MESSAGES) && start.elapsed() < PATIENCE {
        for ((_, s), t) in subs.iter().zip(&mut tallies) {
            while let Some(ev) = s.try_recv().expect("try_recv") {
                t.add(ev);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    feeder.join().expect("the publisher");
    let clients: Vec<Client> = subs.into_iter().map(|(c, _)| c).collect();
    check(&tallies, &clients);
}

// ------------------------------------------------- a full fd table --

/// Environment that turns this test binary into the subscriber helper.
const ROLE: &str = "SHMBUS_FDACKS_ROLE";
const ADDR: &str = "SHMBUS_FDACKS_ADDR";
/// What the helper says to its parent (libtest shares its stdout).
const SAY: &str = "FDACKS:";
/// Fds the helper may open beyond those open once it is subscribed.
const HEADROOM: u64 = 8;
/// Memfds sent to the helper: far more than its fd table holds.
const FLOOD: u64 = 64;
/// Memfds sent once it has made room again.
const AFTER: u64 = 3;

/// An fd limit under which this process can open `n` more fds: new fds
/// take the lowest free numbers, which must be below the limit (fds open
/// above it stay usable).
fn limit_leaving(n: u64) -> u64 {
    let open: std::collections::BTreeSet<u64> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .collect();
    let mut free = 0;
    (0..)
        .find(|fd| {
            free += u64::from(!open.contains(fd));
            free == n
        })
        .unwrap()
        + 1
}

/// Takes what `sub` holds now, run-length: messages then a gap is
/// `"M5,G59"`.
fn drain(sub: &Subscription) -> String {
    let mut runs: Vec<(char, u64)> = Vec::new();
    while let Some(ev) = sub.try_recv().unwrap() {
        let (kind, n) = match ev {
            Event::Message(_) => ('M', 1),
            Event::Reconnected => panic!("unexpected reconnection"),
            Event::Gap { missed } => ('G', missed),
        };
        match runs.last_mut() {
            Some((k, c)) if *k == kind => *c += n,
            _ => runs.push((kind, n)),
        }
    }
    runs.iter().map(|(k, n)| format!("{k}{n}")).collect::<Vec<_>>().join(",")
}

/// Waits (bounded) for a message on `ctl`, which must be `want`.
fn control(ctl: &Subscription, want: &[u8]) {
    match ctl.recv_timeout(PATIENCE) {
        Ok(Some(Event::Message(m))) if m.payload() == want => {}
        other => panic!("waiting for {:?} on ctl: {other:?}", String::from_utf8_lossy(want)),
    }
}

/// Not a test on its own: the body of the subscriber helper, run only when
/// a test spawns this binary with `--ignored --exact helper_process`.
#[test]
#[ignore = "helper process body, spawned by the other tests"]
fn helper_process() {
    assert_eq!(std::env::var(ROLE).expect("run as a helper by another test"), "subscriber");
    let addr = std::env::var(ADDR).unwrap();
    let client = Client::options().address(shmbus::Address::parse(&addr).unwrap()).connect().unwrap();
    let flood = client.subscribe("flood.>").unwrap();
    let ctl = client.subscribe("ctl").unwrap();
    // From now on this process may open HEADROOM more fds: the flood's
    // memfds fill its table.
    let limit = limit_leaving(HEADROOM);
    let rlimit = rustix::process::Rlimit { current: Some(limit), maximum: Some(limit) };
    rustix::process::setrlimit(rustix::process::Resource::Nofile, rlimit).unwrap();
    println!("{SAY}ready limit={limit}");
    // Reading ctl reads everything sent before it: the flood is queued
    // until the table is full, and lost beyond. The connection stays up.
    control(&ctl, b"done");
    client.ping().expect("a ping with the fd table full");
    let first = drain(&flood);
    // Taken and dropped: their fds are closed, the table has room again.
    println!("{SAY}drained");
    control(&ctl, b"again");
    let second = drain(&flood);
    client.ping().expect("a ping afterwards");
    println!("{SAY}result flood={first} after={second}");
}

fn helper(b: &Broker) -> Helper {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "helper_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE, "subscriber")
        .env(ADDR, &b.address)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Helper::spawn(&mut cmd, SAY)
}

/// A subscriber process under a low RLIMIT_NOFILE gets 64 memfds while it
/// can hold only a few: the ones its table could not take are one counted
/// gap, its connection stays up, and once it has made room memfds arrive
/// whole again.
#[test]
fn a_subscriber_with_a_full_fd_table_sees_a_gap_not_a_disconnect() {
    let b = Broker::start("fdacks-emfile");
    let publisher = b.client_named("publisher");
    let mut h = helper(&b);
    h.expect("ready");
    for i in 0..FLOOD {
        let fd = memfd::from_bytes("fd-acks-flood", &i.to_le_bytes()).unwrap();
        publisher.publish_fd("flood.x", fd.as_fd()).unwrap();
    }
    publisher.publish("ctl", b"done").unwrap();
    h.expect("drained");
    for i in 0..AFTER {
        let fd = memfd::from_bytes("fd-acks-after", &i.to_le_bytes()).unwrap();
        publisher.publish_fd("flood.x", fd.as_fd()).unwrap();
    }
    publisher.publish("ctl", b"again").unwrap();
    let result = h.expect("result");
    h.finish();
    let field = |name: &str| -> Vec<(char, u64)> {
        let v = result
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("{name} in {result:?}"));
        v.split(',')
            .filter(|r| !r.is_empty())
            .map(|r| (r.chars().next().unwrap(), r[1..].parse().unwrap()))
            .collect()
    };
    let flood = field("flood");
    let [('M', kept), ('G', missed)] = flood[..] else {
        panic!("messages while there was room, then one gap: {result}")
    };
    assert_eq!(kept + missed, FLOOD, "every memfd is delivered or counted: {result}");
    assert_eq!(field("after"), [('M', AFTER)], "room again: {result}");
}
