//! Attacks on the reactor reading a linked connection's socket, for a
//! readable event, only up to the first doorbell (a84b0df): whatever the
//! client sent after that doorbell stays in the kernel until the next
//! event on the socket or the next marker. Its argument is that every
//! packet's arrival is an event of its own (edge-triggered epoll); but
//! packets that arrive before the broker asks for events come as one.
//!
//! To make "arrive together" certain rather than lucky, each test stops
//! the broker (SIGSTOP) while the client sends, and lets it go (SIGCONT):
//! everything then comes in one event, as it does whenever the broker is
//! busy (spinning over hot rings, it asks for events only now and then).
//! What is left behind a doorbell: more doorbells, a frame without fds (a
//! violation), a packet with fds whose marker comes later, one whose fds
//! were truncated, a packet carrying the client's own end of the socket,
//! the end of the stream (a close, a reset, a kill -9).
//!
//! Every wait is bounded; nothing here measures time.
//!
//! At a84b0df three fail, and all pass with its `event_loop.rs` put back:
//! a frame without fds behind a doorbell is never reported while the
//! client, answered, rings no more; the client's own socket end behind a
//! doorbell keeps a killed client connected for good; and doorbells two
//! per event pile up in the socket (a full send buffer of them, 212 736
//! bytes here, after 277 rounds) until a marker's read (64 packets) no
//! longer reaches its packet: an honest memfd publish ends the connection
//! as a protocol violation. No wake-up was lost: any arrival is an event,
//! and every event wakes the ring.

mod common;

use std::io::{BufRead, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use shmbus_proto::frame::{
    decode_broker, encode_head, BrokerFrame, Doorbell, GoodbyeCode, Overflow, PayloadRef, Ping, Publish,
    Subscribe,
};
use shmbus_proto::link::RecordKind;
use shmbus_proto::sys::socket::{self, OutPacket};

/// How long a test waits for something that must happen (a goodbye, a
/// pong, the broker forgetting a client): failing after it, not measuring.
const WAIT: Duration = Duration::from_secs(5);

fn signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

/// The broker stopped (SIGSTOP) while this lives, continued (SIGCONT) when
/// it drops, even if the test fails meanwhile. Packets sent while it is
/// stopped reach it as one readable event.
struct Stopped(u32);

impl Stopped {
    fn new(b: &Broker) -> Stopped {
        let pid = b.pid();
        signal(pid, rustix::process::Signal::STOP);
        let stopped = Stopped(pid);
        let start = Instant::now();
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let state = stat.rsplit_once(')').unwrap().1.trim_start().chars().next().unwrap();
            if state == 'T' {
                return stopped;
            }
            assert!(start.elapsed() < PATIENCE, "the broker never stopped (state {state})");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(self.0, rustix::process::Signal::CONT);
    }
}

/// A doorbell sent as the client library sends it: without waiting (a
/// full socket drops it). Whether the kernel took it.
fn bell(raw: &Raw) -> bool {
    let head = encode_head(&Doorbell).unwrap();
    socket::send_packet(raw.fd.as_fd(), OutPacket { head: &head, payload: &[], fds: &[] }, true).is_ok()
}

/// Bytes the client sent that the broker has not read yet (`SIOCOUTQ`: the
/// kernel's charge for them, a doorbell costs hundreds).
fn unread_by_broker(raw: &Raw) -> i32 {
    let mut n: libc::c_int = 0;
    let r = unsafe { libc::ioctl(raw.fd.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    assert_eq!(r, 0, "SIOCOUTQ: {}", std::io::Error::last_os_error());
    n
}

/// Waits (bounded) until the broker has put the client's ring to sleep:
/// a record written now must be rung for.
fn wait_asleep(l: &RawLink) {
    wait_asleep_but_for(l, None);
}

/// As [`wait_asleep`], but not counting the flag value `rung` (one a
/// doorbell already went for: the broker may not have lowered it yet).
fn wait_asleep_but_for(l: &RawLink, rung: Option<u32>) {
    let start = Instant::now();
    loop {
        let s = l.map.peer().consumer_sleep.v.load(Ordering::Acquire);
        if s & 1 == 1 && Some(s) != rung {
            return;
        }
        assert!(start.elapsed() < PATIENCE, "the broker never put the ring to sleep");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Writes a record into the ring and publishes it, ringing (without
/// waiting, as the client library does) if the broker's flag asks for it:
/// `None` if it did not, else whether the doorbell went.
fn write(l: &mut RawLink, kind: RecordKind, head: &[u8]) -> Option<bool> {
    assert!(
        l.producer.try_push(l.map.peer(), l.map.my_data(), kind, &[head, &[]]).unwrap(),
        "the client's ring is full"
    );
    l.producer.publish(l.map.mine());
    l.producer.must_ring(l.map.peer()).then(|| bell(&l.raw))
}

fn ping(token: u64) -> Vec<u8> {
    encode_head(&Ping { token }).unwrap()
}

/// The next frame in the broker's ring, within `timeout`; `None` if none
/// came, an empty one at the end of the stream (once the ring is read to
/// its end). Sleeps by the contract (flag raised, then the socket), and
/// rings for room without waiting, as the client library does.
fn next_frame(l: &mut RawLink, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut eof = false;
    loop {
        let mut buf = Vec::new();
        match l.consumer.next(l.map.peer(), l.map.peer_data(), &mut buf).unwrap() {
            Some(RecordKind::Frame) => {
                l.consumer.commit(l.map.mine());
                if l.consumer.must_ring_room(l.map.peer()) {
                    bell(&l.raw);
                }
                return Some(buf);
            }
            Some(RecordKind::Marker) => panic!("no frame with fds is sent to this client"),
            None if eof => return Some(Vec::new()),
            None => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if l.consumer.prepare_sleep(l.map.mine(), l.map.peer()).unwrap() {
            if left.is_zero() {
                l.consumer.wake(l.map.mine());
                return None;
            }
            // Doorbells (and the end) from the broker; nothing else comes
            // on the socket to this client.
            if socket::wait_readable(l.raw.fd.as_fd(), Some(left.min(Duration::from_millis(20)))).unwrap() {
                while let Some(p) = l.raw.recv_packet(Duration::ZERO) {
                    if p.is_eof() {
                        eof = true;
                        break;
                    }
                    assert!(
                        matches!(p.frame(), Some(BrokerFrame::Doorbell)),
                        "only doorbells on the socket: {:?}",
                        p.frame()
                    );
                }
            }
            l.consumer.wake(l.map.mine());
        }
    }
}

/// Reads the broker's next frame, which must be `Pong { token }` (true),
/// or nothing within `timeout` (false); another frame fails the test.
fn wait_pong(l: &mut RawLink, token: u64, timeout: Duration) -> bool {
    let Some(f) = next_frame(l, timeout) else { return false };
    match decode_broker(&f) {
        Ok(BrokerFrame::Pong(p)) if p.token == token => true,
        other => panic!("expected pong {token}, got {other:?}"),
    }
}

/// A `Publish` whose payload is a memfd (or whatever fd goes with it).
fn memfd_publish(topic: &str, len: u64) -> Vec<u8> {
    encode_head(&Publish { topic, origin: None, payload: PayloadRef::Memfd { len } }).unwrap()
}

/// Waits (bounded by [`WAIT`]) until the broker counts `clients` clients
/// and holds `fds` fds: a client that is gone is forgotten, all of it.
fn wait_forgotten(b: &Broker, probe: &shmbus::Client, clients: u32, fds: usize, what: &str) {
    let start = Instant::now();
    loop {
        let now = probe.stats().unwrap().clients;
        if now == clients && b.fd_count() == fds {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "{what}: the broker still counts {now} clients (want {clients}) and holds {} fds (baseline \
             {fds}) {WAIT:?} after the client left",
            b.fd_count()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ----------------------------------------------------- doorbells only --

/// Two doorbells in one event, round after round, from a client that
/// writes a record each round and rings for it as the contract says (the
/// second doorbell stands for the other one a client may owe in the same
/// moment: for room in the broker's ring, or for a raise the broker
/// lowered again at once). The broker must not leave doorbells behind in
/// the socket: they would pile up round after round until the kernel
/// refuses the client's next doorbell (the client library then drops it,
/// "a full socket means the broker has packets to read"), and with no new
/// arrival there is no new edge: the record in the ring is never read.
#[test]
fn two_doorbells_in_one_event_never_cost_a_later_wake_up() {
    let b = Broker::start("door-two-bells");
    let mut l = RawLink::attach(&b, "two-bells");
    // Enough rounds to fill a client's socket with the doorbells of one
    // round each, if they were left behind (277 filled the default buffer
    // here), and go on with it full.
    const ROUNDS: u64 = 600;
    for i in 0..ROUNDS {
        wait_asleep(&l);
        let (rang, second) = {
            let _stopped = Stopped::new(&b);
            let rang = write(&mut l, RecordKind::Frame, &ping(i));
            (rang, bell(&l.raw))
        };
        if !wait_pong(&mut l, i, WAIT) {
            panic!(
                "round {i}: the ping in the ring was never answered (a lost wake-up): its doorbell \
                 {rang:?} (Some(false): the kernel refused it), the second {second}; the broker left \
                 {} bytes of doorbells unread in the socket",
                unread_by_broker(&l.raw)
            );
        }
        if i % 100 == 0 {
            eprintln!("round {i}: {} bytes unread by the broker", unread_by_broker(&l.raw));
        }
    }
}

/// The same two doorbells per event, for fewer rounds than fill the
/// socket but more than the packets a marker's read looks through
/// (`SOCKET_READS`, 64); then the client publishes a memfd as the contract
/// says (the packet, then its marker, rung for). Doorbells left behind
/// would stand between the marker and its packet: the broker would find
/// no packet for the marker and end an honest client's connection as a
/// protocol violator.
#[test]
fn two_doorbells_in_one_event_never_hide_a_later_marker_s_packet() {
    let b = Broker::start("door-two-bells-marker");
    let mut sub = RawLink::attach(&b, "sub");
    sub.send_body(&Subscribe { sub_id: 1, pattern: "fd", overflow: Overflow::Gap }, &[]);
    assert!(matches!(sub.next_packet().frame(), Some(BrokerFrame::Subscribed(_))));
    let mut l = RawLink::attach(&b, "two-bells-marker");
    for i in 0..100 {
        wait_asleep(&l);
        let _stopped = Stopped::new(&b);
        write(&mut l, RecordKind::Frame, &ping(i));
        bell(&l.raw);
        drop(_stopped);
        assert!(wait_pong(&mut l, i, WAIT), "round {i}: the ping went unanswered");
    }
    eprintln!("after 100 rounds: {} bytes unread by the broker", unread_by_broker(&l.raw));
    let fd = shmbus_proto::sys::memfd::from_bytes("fd", &[3; 8]).unwrap();
    let packet = memfd_publish("fd", 8);
    socket::send_packet(
        l.raw.fd.as_fd(),
        OutPacket { head: &packet, payload: &[], fds: &[fd.as_fd()] },
        true,
    )
    .expect("the socket takes the packet with fds");
    write(&mut l, RecordKind::Marker, &[]);
    write(&mut l, RecordKind::Frame, &ping(1000));
    let f = next_frame(&mut l, WAIT).expect("no answer to a ping after a memfd publish");
    match decode_broker(&f) {
        Ok(BrokerFrame::Pong(p)) => assert_eq!(p.token, 1000),
        other => {
            panic!("an honest memfd publish after two doorbells per event, round after round: {other:?}")
        }
    }
    let p = sub.recv_packet(WAIT).expect("the memfd publish never reached the subscriber");
    assert!(matches!(p.frame(), Some(BrokerFrame::Deliver(..))), "{:?}", p.frame());
}

// ------------------------------------------------- a frame without fds --

/// A doorbell, then a frame without fds on the socket (a violation), in
/// one event, the doorbell for a ping in the ring. The broker must end the
/// connection for it, and not answer the ping and carry on as if the
/// socket held nothing (the violation would wait for a doorbell the client
/// may never send).
#[test]
fn a_frame_without_fds_behind_a_doorbell_ends_the_connection() {
    let b = Broker::start("door-violation");
    let probe = b.client();
    let base = b.baseline_fds();
    let mut l = RawLink::attach(&b, "violator");
    wait_asleep(&l);
    {
        let _stopped = Stopped::new(&b);
        assert_eq!(write(&mut l, RecordKind::Frame, &ping(1)), Some(true), "the ping is rung for");
        l.raw.send_body(&Ping { token: 2 }, &[]);
    }
    let mut seen = Vec::new();
    loop {
        let Some(f) = next_frame(&mut l, WAIT) else {
            panic!(
                "no goodbye within {WAIT:?} for a frame without fds on a linked socket (it came behind a \
                 doorbell); the client got {seen:?} and is still connected ({} clients)",
                probe.stats().unwrap().clients
            );
        };
        if f.is_empty() {
            panic!("the connection ended without a goodbye; the client got {seen:?}");
        }
        match decode_broker(&f).unwrap() {
            BrokerFrame::Goodbye(g) => {
                assert_eq!(g.code, GoodbyeCode::ProtocolViolation, "{}", g.reason);
                assert!(g.reason.contains("a frame without fds on the socket"), "{}", g.reason);
                break;
            }
            other => seen.push(format!("{other:?}")),
        }
    }
    drop(l);
    wait_forgotten(&b, &probe, 1, base, "the violator");
}

// ------------------------------------------------------ packets with fds --

/// A doorbell, then a publish with a memfd whose marker the client writes
/// only later (after a round trip): the packet waits in the kernel, and
/// its marker takes it; the subscriber gets it with its fd, and every fd
/// comes back.
#[test]
fn a_packet_with_fds_behind_a_doorbell_is_taken_by_its_later_marker() {
    let b = Broker::start("door-late-marker");
    let base = b.baseline_fds();
    let mut sub = RawLink::attach(&b, "sub");
    sub.send_body(&Subscribe { sub_id: 1, pattern: "late", overflow: Overflow::Gap }, &[]);
    assert!(matches!(sub.next_packet().frame(), Some(BrokerFrame::Subscribed(_))));
    let mut l = RawLink::attach(&b, "late-marker");
    let fd = shmbus_proto::sys::memfd::from_bytes("late", &[5; 8]).unwrap();
    wait_asleep(&l);
    {
        let _stopped = Stopped::new(&b);
        assert!(bell(&l.raw));
        l.raw.send(&memfd_publish("late", 8), &[fd.as_fd()]);
    }
    // A round trip first: the ring goes on without the marker.
    write(&mut l, RecordKind::Frame, &ping(1));
    assert!(wait_pong(&mut l, 1, WAIT), "the ping behind a doorbell and a held packet went unanswered");
    assert!(write(&mut l, RecordKind::Marker, &[]).is_none_or(|sent| sent), "the marker's doorbell");
    let p = sub.recv_packet(WAIT).expect("the publish at the marker never reached the subscriber");
    assert!(matches!(p.frame(), Some(BrokerFrame::Deliver(..))), "{:?}", p.frame());
    assert_eq!(p.fds.len(), 1, "a delivery with its memfd");
    write(&mut l, RecordKind::Frame, &ping(2));
    assert!(wait_pong(&mut l, 2, WAIT), "the connection goes on after the marker");
    drop((p, l, sub, fd));
    b.wait_fd_count(base);
}

/// A doorbell, then a publish with more fds than a packet may carry (they
/// arrive truncated, `MSG_CTRUNC`): judged when its marker comes, as a
/// violation; no fd is left in the broker.
#[test]
fn a_packet_with_truncated_fds_behind_a_doorbell_is_judged_at_its_marker() {
    let b = Broker::start("door-ctrunc");
    let probe = b.client();
    let base = b.baseline_fds();
    let mut l = RawLink::attach(&b, "ctrunc");
    let fds: Vec<OwnedFd> =
        (0..8).map(|i| shmbus_proto::sys::memfd::from_bytes("t", &[i; 8]).unwrap()).collect();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    wait_asleep(&l);
    {
        let _stopped = Stopped::new(&b);
        assert!(bell(&l.raw));
        l.raw.send(&memfd_publish("t", 8), &borrowed);
    }
    write(&mut l, RecordKind::Frame, &ping(1));
    assert!(wait_pong(&mut l, 1, WAIT), "the ping behind a doorbell and a held packet went unanswered");
    write(&mut l, RecordKind::Marker, &[]);
    let f = next_frame(&mut l, WAIT).expect("no answer to a marker for a packet with truncated fds");
    match decode_broker(&f) {
        Ok(BrokerFrame::Goodbye(g)) => assert_eq!(g.code, GoodbyeCode::ProtocolViolation, "{}", g.reason),
        other => panic!("expected a goodbye for truncated fds, got {other:?}"),
    }
    drop(l);
    drop(fds);
    wait_forgotten(&b, &probe, 1, base, "the client with truncated fds");
}

// ------------------------------------------------------------ the end --

/// A doorbell and a publish in the ring, then the client closes, all in
/// one event; with `unread`, a doorbell from the broker is left unread in
/// the client's socket, so the broker's receive fails with ECONNRESET
/// instead of reading the end. The publish reaches the subscriber (the
/// ring is read to its end) and the client is forgotten.
fn doorbell_then_the_end(tag: &str, unread: bool) {
    let b = Broker::start(tag);
    let probe = b.client();
    let base = b.baseline_fds();
    let mut sub = RawLink::attach(&b, "sub");
    sub.send_body(&Subscribe { sub_id: 1, pattern: "last", overflow: Overflow::Gap }, &[]);
    assert!(matches!(sub.next_packet().frame(), Some(BrokerFrame::Subscribed(_))));
    let mut l = RawLink::attach(&b, "leaver");
    let mut rung = None;
    if unread {
        // Our flag up, a ping: the broker rings us for the pong; the
        // doorbell stays unread.
        assert!(l.consumer.prepare_sleep(l.map.mine(), l.map.peer()).unwrap());
        wait_asleep(&l);
        rung = Some(l.map.peer().consumer_sleep.v.load(Ordering::Acquire));
        assert_eq!(write(&mut l, RecordKind::Frame, &ping(1)), Some(true), "the ping is rung for");
        assert!(
            socket::wait_readable(l.raw.fd.as_fd(), Some(WAIT)).unwrap(),
            "the broker never rang a sleeping client"
        );
    }
    // Asleep again after the ping (its flag value is spent: the broker
    // may not have lowered it yet when its doorbell for us came), and
    // stopped there: a broker caught between a wake-up (any event wakes
    // every ring) and its next sleep is let go and caught again.
    let stopped = (0..1000)
        .find_map(|_| {
            wait_asleep_but_for(&l, rung);
            let stopped = Stopped::new(&b);
            let s = l.map.peer().consumer_sleep.v.load(Ordering::Acquire);
            (s & 1 == 1 && Some(s) != rung).then_some(stopped)
        })
        .expect("the broker was never caught asleep");
    let publish = encode_head(&Publish { topic: "last", origin: None, payload: PayloadRef::Inline }).unwrap();
    assert_eq!(write(&mut l, RecordKind::Frame, &publish), Some(true), "the publish is rung for");
    drop(l);
    drop(stopped);
    let p = sub.recv_packet(WAIT).expect("the last publish of a client that left never came");
    assert!(matches!(p.frame(), Some(BrokerFrame::Deliver(..))), "{:?}", p.frame());
    drop(sub);
    wait_forgotten(&b, &probe, 1, base, tag);
}

#[test]
fn a_doorbell_then_a_close_is_forgotten_after_the_ring() {
    doorbell_then_the_end("door-close", false);
}

#[test]
fn a_doorbell_then_a_reset_is_forgotten_after_the_ring() {
    doorbell_then_the_end("door-reset", true);
}

// ------------------------------------------ the client's own socket end --

const ROLE: &str = "SHMBUS_DOORSTOP_ROLE";
const ADDR: &str = "SHMBUS_DOORSTOP_ADDR";
const SAY: &str = "DOORSTOP:";

/// The body of the helper processes the tests below kill: a linked client
/// that, told to on its stdin, rings, then sends a packet carrying its own
/// end of the socket (no marker ever), and waits to be killed.
#[test]
#[ignore = "helper process body, spawned by the other tests"]
fn helper_process() {
    assert_eq!(std::env::var(ROLE).expect("run as a helper by another test"), "own-socket");
    let l = RawLink::attach_at(&std::env::var(ADDR).unwrap(), "own-socket");
    println!("{SAY}attached");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line).unwrap();
    assert!(bell(&l.raw));
    let own = l.raw.fd.try_clone().unwrap();
    l.raw.send(&memfd_publish("t", 8), &[own.as_fd()]);
    println!("{SAY}sent");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// A linked client rings, then sends its own end of the socket on it, in
/// one event, and is killed (-9). Read, the packet's fd would be made
/// inert by the broker (the end closes, the hang-up comes); left in the
/// kernel behind the doorbell, it keeps the client's end open inside the
/// broker's socket: no hang-up ever, and the connection, its link and its
/// charges live on.
#[test]
fn a_doorbell_then_its_own_socket_then_kill_9_is_still_forgotten() {
    let b = Broker::start("door-own-socket");
    let probe = b.client();
    let base = b.baseline_fds();
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "helper_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE, "own-socket")
        .env(ADDR, &b.address)
        .stdin(Stdio::piped());
    let mut helper = Helper::spawn(&mut cmd, SAY);
    helper.expect("attached");
    let mut stdin = helper.child.0.as_mut().unwrap().stdin.take().unwrap();
    {
        let _stopped = Stopped::new(&b);
        writeln!(stdin, "go").unwrap();
        helper.expect("sent");
        let child = helper.child.0.as_mut().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
    wait_forgotten(&b, &probe, 1, base, "a client killed after its own socket end behind a doorbell");
}

/// The same in-process, by a client that holds a memfd delivery it never
/// acknowledged, then the broker is told to stop: the connection lingers
/// for that fd until its hang-up, which must come; a client that is gone
/// must not hold the broker's shutdown until its deadline. (It does not:
/// shutting the socket down is an event on it, whose read takes the
/// packet and lets the client's end go; the connection is still a live
/// client until then, see the test above.)
#[test]
fn a_doorbell_then_its_own_socket_does_not_linger_at_shutdown() {
    let mut b =
        Broker::launch("door-own-socket-term", Launch::new().capture_log().args(&["--log-level", "info"]));
    let probe = b.client();
    {
        let mut l = RawLink::attach(&b, "own-socket");
        l.send_body(&Subscribe { sub_id: 1, pattern: "held", overflow: Overflow::Gap }, &[]);
        assert!(matches!(l.next_packet().frame(), Some(BrokerFrame::Subscribed(_))));
        let fd = shmbus_proto::sys::memfd::from_bytes("held", &[9; 8]).unwrap();
        let publisher = Raw::hello(&b);
        publisher.send(&memfd_publish("held", 8), &[fd.as_fd()]);
        let p = l.next_packet();
        assert!(matches!(p.frame(), Some(BrokerFrame::Deliver(..))), "{:?}", p.frame());
        assert_eq!(p.fds.len(), 1, "the delivery's memfd, never acknowledged");
        drop(publisher);
        let own = l.raw.fd.try_clone().unwrap();
        wait_asleep(&l);
        let _stopped = Stopped::new(&b);
        assert!(bell(&l.raw));
        l.raw.send(&memfd_publish("t", 8), &[own.as_fd()]);
        // It "exits": every fd it had is closed.
        drop((own, p, l));
    }
    // The broker has had its event once the probe's ping comes back.
    probe.ping().unwrap();
    drop(probe);
    let status = b.terminate();
    assert!(status.success(), "{status}");
    let log = b.wait_log("shut down (");
    assert!(
        log.contains("shut down (0 connections cut at the deadline)"),
        "a client that was gone held the shutdown until its deadline:\n{log}"
    );
}
