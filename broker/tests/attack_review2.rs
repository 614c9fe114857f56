//! A second review as a hostile local user: defects where each part was
//! legal and the combination was not. Each attack test here failed on the
//! code it was written against, for the reason its comment gives; its
//! control variant passed. Both are fixed; the tests keep them fixed.
//!
//! - A ring channel reader (of any uid the broker admits) got "read-only"
//!   ring fds: the broker downgrades the memfd by reopening
//!   `/proc/self/fd/N` `O_RDONLY`. But a memfd's inode was mode 0777 and
//!   the same reopening works the other way: the reader opened
//!   `/proc/self/fd/<its ring fd>` `O_RDWR`, mapped the ring writable and
//!   wrote messages every other reader took as the publisher's. (Now the
//!   memfd is made 0400 first: `memfd::reopen_read_only`.)
//! - A policy reload that takes away a publisher's `channel-publish` right
//!   "closed the channel for every member" by storing `closed` into the
//!   ring header: memory the publisher itself may write. A publisher that
//!   put `closed` back to 0 went on reaching its readers after its right
//!   was revoked, for as long as it liked; the same after it gave its
//!   handle back. (Now the broker ends the channel in each reader's cursor
//!   page, which the publisher cannot write: `Cursor::ended`.)
//!
//! Every wait is bounded; the broker and helpers are killed on drop.

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use shmbus::{ChannelConfig, ChannelEvent, ChannelOverflow};
use shmbus_proto::frame::{BrokerFrame, ChannelClose, ChannelOpen, ChannelRole};
use shmbus_proto::ring::protocol::{self, RingView, WriterState};
use shmbus_proto::ring::shm::RingMap;
use shmbus_proto::ring::Geometry;

/// The uid the hostile reader runs as: not root, not the broker's.
const NOBODY: u32 = 65534;
const FORGE_ADDR: &str = "SHMBUS_REVIEW2_ADDR";
const FORGE_MODE: &str = "SHMBUS_REVIEW2_MODE";
const FORGE_TOPIC: &str = "review2.ring";
const FORGED: &[u8] = b"forged-by-a-reader";
const GEOMETRY: Geometry = Geometry { slot_size: 64, slot_count: 16 };

/// Not a test on its own: a hostile channel reader, run by the tests below
/// under another uid. Mode `direct` maps the ring fd it was given writable
/// (the broker's promise: refused); mode `reopen` first reopens that fd
/// read-write through `/proc/self/fd`. Either way, if it gets a writable
/// mapping it publishes `FORGED` as the ring's next message.
#[test]
#[ignore = "helper process body, spawned by the other tests"]
fn hostile_reader_process() {
    let addr = std::env::var(FORGE_ADDR).expect("set by the parent");
    let mode = std::env::var(FORGE_MODE).expect("set by the parent");
    let client = shmbus::Client::options().address(shmbus::Address::parse(&addr).unwrap()).connect().unwrap();
    let reader = client.channel_subscriber(FORGE_TOPIC).unwrap();
    let ring = reader.ring_fd_for_tests();
    let signal = reader.signal_fd_for_tests();
    let writable = match mode.as_str() {
        "direct" => RingMap::map(ring, signal, GEOMETRY, true).map_err(|e| e.to_string()),
        "reopen" => rustix::fs::open(
            format!("/proc/self/fd/{}", ring.as_raw_fd()),
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| format!("reopen: {e}"))
        .and_then(|rw| RingMap::map(rw.as_fd(), signal, GEOMETRY, true).map_err(|e| e.to_string())),
        other => panic!("unknown mode {other}"),
    };
    match writable {
        Err(e) => println!("HOSTILE: refused {e}"),
        Ok(mut map) => {
            let next = map.header().head.load(std::sync::atomic::Ordering::Acquire);
            let mut st = WriterState { next };
            protocol::publish(&mut map, &mut st, FORGED);
            println!("HOSTILE: wrote message {next} uid {}", rustix::process::getuid().as_raw());
        }
    }
}

/// A channel with an honest publisher and an honest reader (the broker's
/// uid), joined by a hostile reader of uid `NOBODY` in `mode`; returns the
/// hostile reader's account and what the honest reader read.
fn hostile_reader_joins(tag: &str, mode: &str) -> (String, Vec<Vec<u8>>) {
    let b = Broker::start_with(tag, &["--allow-uid", &NOBODY.to_string()]);
    let c = b.client();
    let cfg = ChannelConfig {
        slot_size: GEOMETRY.slot_size,
        slot_count: GEOMETRY.slot_count,
        overflow: ChannelOverflow::Overwrite,
    };
    let mut publisher = c.channel_publisher(FORGE_TOPIC, cfg).unwrap();
    let mut honest = c.channel_subscriber(FORGE_TOPIC).unwrap();
    publisher.publish(b"real-1").unwrap();

    let exe = std::env::current_exe().unwrap();
    let mut cmd = command_as(exe.to_str().unwrap(), NOBODY);
    cmd.args(["--exact", "hostile_reader_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(FORGE_ADDR, &b.address)
        .env(FORGE_MODE, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = spawn_guarded(cmd).wait_output();
    let said = stdout(&out);
    let account = said
        .lines()
        .find_map(|l| l.find("HOSTILE: ").map(|i| l[i + 9..].to_owned()))
        .unwrap_or_else(|| panic!("the hostile reader said nothing: {said}\n{}", stderr(&out)));

    let mut read = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match honest.recv_vec_timeout(Duration::from_millis(200)).unwrap() {
            Some(ChannelEvent::Message { value, .. }) => read.push(value),
            Some(other) => panic!("unexpected {other:?}"),
            None if !read.is_empty() => break,
            None => {}
        }
    }
    (account, read)
}

/// Control: the fd a reader is given cannot be mapped writable as it is,
/// and the honest reader reads only what the publisher published.
#[test]
fn a_reader_of_another_uid_cannot_map_its_ring_fd_writable() {
    if !rustix::process::getuid().is_root() {
        eprintln!("skipped: needs root to run a reader under another uid");
        return;
    }
    let (account, read) = hostile_reader_joins("rev2-ring-direct", "direct");
    assert!(account.starts_with("refused"), "{account}");
    assert_eq!(read, vec![b"real-1".to_vec()]);
}

/// DEFECT: the same reader reopens its ring fd read-write through
/// `/proc/self/fd` (a memfd is mode 0777, owned by the broker's uid) and
/// writes a message the honest reader takes as the publisher's.
#[test]
fn attack_a_reader_of_another_uid_cannot_write_the_ring_by_reopening_its_fd() {
    if !rustix::process::getuid().is_root() {
        eprintln!("skipped: needs root to run a reader under another uid");
        return;
    }
    let (account, read) = hostile_reader_joins("rev2-ring-reopen", "reopen");
    assert!(
        !read.iter().any(|m| m == FORGED),
        "a reader of uid {NOBODY} wrote into the ring ({account}); the honest reader read {:?}",
        read.iter().map(|m| String::from_utf8_lossy(m).into_owned()).collect::<Vec<_>>()
    );
    assert!(account.starts_with("refused"), "the hostile reader got a writable ring: {account}");
}

// ------------------------------------------------ a revoked publisher --

const REVOKE_TOPIC: &str = "rev2.cam";
/// How long the hostile publisher goes on once it saw the revocation.
const AFTER_REVOCATION: Duration = Duration::from_secs(2);

/// Not a test on its own: a channel publisher of another uid, whose right
/// to publish the test revokes. Mode `honest` publishes with the library
/// and stops at its first error. Mode `hostile` writes the ring itself: it
/// keeps the ring's `closed` word at 0 (the ring is its to write) and goes
/// on publishing, `before-N` until it saw the broker close the ring,
/// `after-N` from then on.
#[test]
#[ignore = "helper process body, spawned by the other tests"]
fn revoked_publisher_process() {
    let addr = std::env::var(FORGE_ADDR).expect("set by the parent");
    let mode = std::env::var(FORGE_MODE).expect("set by the parent");
    let client = shmbus::Client::options().address(shmbus::Address::parse(&addr).unwrap()).connect().unwrap();
    let cfg = ChannelConfig {
        slot_size: GEOMETRY.slot_size,
        slot_count: GEOMETRY.slot_count,
        overflow: ChannelOverflow::Overwrite,
    };
    let mut p = client.channel_publisher(REVOKE_TOPIC, cfg).unwrap();
    let start = Instant::now();
    let give_up = start + Duration::from_secs(20);
    if mode == "honest" {
        for i in 0.. {
            if let Err(e) = p.publish(format!("before-{i}").as_bytes()) {
                println!("HOSTILE: stopped: {e}");
                return;
            }
            assert!(Instant::now() < give_up, "never revoked");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    // `closed` is put back to 0 at every message.
    let mut st = WriterState { next: 0 };
    let mut revoked_at: Option<Instant> = None;
    let mut after = 0u64;
    for i in 0u64.. {
        let map = p.ring_map_mut();
        if map.header().closed.swap(0, std::sync::atomic::Ordering::AcqRel) != 0 && revoked_at.is_none() {
            revoked_at = Some(Instant::now());
        }
        let text = match revoked_at {
            Some(_) => {
                after += 1;
                format!("after-{i}")
            }
            None => format!("before-{i}"),
        };
        protocol::publish(map, &mut st, text.as_bytes());
        if revoked_at.is_some_and(|t| t.elapsed() > AFTER_REVOCATION) {
            break;
        }
        if Instant::now() > give_up {
            break;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    match revoked_at {
        Some(_) => println!("HOSTILE: revoked, then published {after} more"),
        None => println!("HOSTILE: never saw the ring closed"),
    }
}

/// A publisher of uid `NOBODY` in `mode`, an honest reader (root); the
/// policy is reloaded to take the publisher's right away once the reader
/// read from it; the reader reads again 300 ms after the channel is gone. Returns the publisher's account, the messages the reader
/// read after the reload, and how its reading ended.
fn publisher_revoked(tag: &str, mode: &str) -> (String, Vec<String>, String) {
    let dir = TempDir::new(tag);
    let path = dir.join("policy.toml");
    let allow = |rights: &str| format!("[[rule]]\nmatch = {{}}\nallow = [{rights}]\n");
    std::fs::write(&path, allow(r#""connect", "channel-publish rev2.>", "channel-read rev2.>""#)).unwrap();
    let b = Broker::launch(tag, Launch::new().args(&["--policy", path.to_str().unwrap()]));
    let c = b.client();

    let exe = std::env::current_exe().unwrap();
    let mut cmd = command_as(exe.to_str().unwrap(), NOBODY);
    cmd.args(["--exact", "revoked_publisher_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(FORGE_ADDR, &b.address)
        .env(FORGE_MODE, mode)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let helper = spawn_guarded(cmd);

    let start = Instant::now();
    let mut reader = loop {
        match c.channel_subscriber(REVOKE_TOPIC) {
            Ok(r) => break r,
            Err(e) => {
                assert!(start.elapsed() < PATIENCE, "the publisher never opened its channel: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    // Reading from the publisher, then its right is taken away.
    loop {
        assert!(start.elapsed() < PATIENCE, "nothing was ever published");
        if let Some(ChannelEvent::Message { .. }) =
            reader.recv_vec_timeout(Duration::from_millis(200)).unwrap()
        {
            break;
        }
    }
    std::fs::write(&path, allow(r#""connect", "channel-read rev2.>""#)).unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(b.pid() as i32).unwrap(),
        rustix::process::Signal::HUP,
    )
    .unwrap();
    // The reload is done once the broker lists the channel no more.
    while c.channels().unwrap().iter().any(|ch| ch.topic == REVOKE_TOPIC) {
        assert!(start.elapsed() < PATIENCE, "the reload never ended the channel");
        std::thread::sleep(Duration::from_millis(10));
    }

    let mut after = Vec::new();
    let deadline = Instant::now() + AFTER_REVOCATION + Duration::from_secs(3);
    let end = loop {
        if Instant::now() > deadline {
            break "still reading".to_owned();
        }
        match reader.recv_vec_timeout(Duration::from_millis(200)) {
            Ok(Some(ChannelEvent::Message { value, .. })) => {
                let text = String::from_utf8_lossy(&value).into_owned();
                if text.starts_with("after-") {
                    after.push(text);
                }
            }
            Ok(_) => {}
            Err(e) => break format!("{e:?}"),
        }
    };
    let out = helper.wait_output();
    let said = stdout(&out);
    let account = said
        .lines()
        .find_map(|l| l.find("HOSTILE: ").map(|i| l[i + 9..].to_owned()))
        .unwrap_or_else(|| panic!("the publisher said nothing: {said}\n{}", stderr(&out)));
    (account, after, end)
}

/// Control: an honest publisher whose right is revoked stops, and the
/// reader's channel ends with `Revoked`.
#[test]
fn a_revoked_honest_publisher_stops_and_its_reader_is_told() {
    if !rustix::process::getuid().is_root() {
        eprintln!("skipped: needs root to run a publisher under another uid");
        return;
    }
    let (account, after, end) = publisher_revoked("rev2-revoke-honest", "honest");
    assert!(account.starts_with("stopped"), "{account}");
    assert!(after.is_empty(), "{after:?}");
    assert!(end.starts_with("Revoked"), "the reader's channel ended with {end}");
}

/// DEFECT: the broker "closes" a revoked channel by writing `closed` into
/// the ring, memory the publisher may write too; readers look at it only
/// when they find the ring empty, and never at the `Revoked` notice they
/// were sent. A publisher whose right was taken away keeps `closed` at 0
/// and goes on publishing: its readers read on, for as long as it likes.
#[test]
fn attack_a_publisher_whose_right_was_revoked_reaches_no_reader() {
    if !rustix::process::getuid().is_root() {
        eprintln!("skipped: needs root to run a publisher under another uid");
        return;
    }
    let (account, after, end) = publisher_revoked("rev2-revoke-hostile", "hostile");
    assert!(
        after.is_empty(),
        "the reader read {} messages the publisher wrote after its channel was revoked ({account}; first \
         {:?}); its reading ended with: {end}",
        after.len(),
        after.first()
    );
    assert!(end.starts_with("Revoked"), "the reader's channel ended with {end}");
}

/// A publisher that gives its handle back (the broker closes the channel)
/// but keeps its mapping, puts the ring's `closed` back to 0 and writes
/// on, each message offered to its reader as it comes; with `lie`, it
/// first claims a head far ahead (which the broker reads as the end), and
/// puts it back after. Returns what its reader read and how it ended. (A
/// raw publisher in this process: the ring is its to write whatever its
/// uid.)
fn publisher_leaves_but_writes_on(tag: &str, lie: bool) -> (Vec<String>, shmbus::ChannelError) {
    const TOPIC: &str = "rev2.leaver";
    let b = Broker::start(tag);
    let (mut raw, _) = Raw::hello_named(&b, "review2-leaver");
    let role = ChannelRole::Publish {
        slot_size: GEOMETRY.slot_size,
        slot_count: GEOMETRY.slot_count,
        overflow: shmbus_proto::frame::ChannelOverflow::Overwrite,
    };
    raw.send_body(&ChannelOpen { req_id: 1, topic: TOPIC, role }, &[]);
    let granted = raw.next_packet();
    let channel_id = match granted.frame() {
        Some(BrokerFrame::ChannelGranted(g)) => g.channel_id,
        other => panic!("expected the grant, got {other:?}"),
    };
    let [ring, signal] = <[_; 2]>::try_from(granted.fds).expect("ring and signal fds");
    let mut map = RingMap::map(ring.as_fd(), signal.as_fd(), GEOMETRY, true).unwrap();
    let c = b.client();
    let mut reader = c.channel_subscriber(TOPIC).unwrap();
    let mut st = WriterState { next: 0 };
    for i in 0..3 {
        protocol::publish(&mut map, &mut st, format!("before-{i}").as_bytes());
    }
    if lie {
        map.header().head.store(u64::MAX / 2, std::sync::atomic::Ordering::Release);
    }
    raw.send_body(&ChannelClose { channel_id, reader_id: 0 }, &[]);
    let start = Instant::now();
    while c.channels().unwrap().iter().any(|ch| ch.topic == TOPIC) {
        assert!(start.elapsed() < PATIENCE, "the broker never closed the channel");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Gone, as far as the broker knows; the ring is still its to write.
    // One at a time, each offered to the reader: a liar puts its head
    // back where its messages are, so they look like the ones before
    // the end it claimed.
    if lie {
        map.header().head.store(st.next, std::sync::atomic::Ordering::Release);
    }
    let mut read = Vec::new();
    let mut end = None;
    let take = |reader: &mut shmbus::ChannelSubscriber, read: &mut Vec<String>| match reader.try_recv_vec() {
        Ok(Some(ChannelEvent::Message { value, .. })) => {
            read.push(String::from_utf8_lossy(&value).into_owned());
            None
        }
        Ok(Some(ChannelEvent::Missed(_))) => {
            read.push("missed".into());
            None
        }
        Ok(_) => None,
        Err(e) => Some(e),
    };
    for i in 0..(3 * GEOMETRY.slot_count) {
        map.header().closed.store(0, std::sync::atomic::Ordering::Release);
        protocol::publish(&mut map, &mut st, format!("after-{i}").as_bytes());
        if end.is_none() {
            end = take(&mut reader, &mut read);
        }
    }
    let end = loop {
        if let Some(e) = end.take() {
            break e;
        }
        assert!(start.elapsed() < PATIENCE, "the reader never ended; it read {read:?}");
        end = take(&mut reader, &mut read);
        std::thread::sleep(Duration::from_millis(1));
    };
    (read, end)
}

/// DEFECT (fixed): the ring's `closed` word, put back to 0 by the
/// publisher that left, kept its reader reading what it wrote after.
#[test]
fn attack_a_publisher_that_left_but_writes_on_reaches_no_reader() {
    let (read, end) = publisher_leaves_but_writes_on("rev2-leaver", false);
    assert!(matches!(end, shmbus::ChannelError::Closed), "{end:?}");
    assert!(!read.iter().any(|m| m.starts_with("after-")), "read after the close: {read:?}");
    assert_eq!(read, ["before-0", "before-1", "before-2"], "what came before the close is read");
}

/// The same publisher, having claimed a head far ahead before it left (the
/// end the broker reads), then writing on where its reader is: the reader
/// still ends, after at most one ring's worth of reads (`ENDED_CLOSED`).
#[test]
fn a_publisher_that_lied_about_its_head_before_leaving_holds_its_reader_one_ring_at_most() {
    let (read, end) = publisher_leaves_but_writes_on("rev2-liar", true);
    assert!(matches!(end, shmbus::ChannelError::Closed), "{end:?}");
    assert!(read.len() as u32 <= GEOMETRY.slot_count + 1, "{} reads: {read:?}", read.len());
}
