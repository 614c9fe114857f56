//! A second review as a hostile local user: defects where each part was
//! legal and the combination was not. Each test here failed on the code it
//! was written against, for the reason its comment gives; its control
//! variant passed.
//!
//! - A ring channel reader (of any uid the broker admits) gets "read-only"
//!   ring fds: the broker downgrades the memfd by reopening
//!   `/proc/self/fd/N` `O_RDONLY`. But a memfd's inode is mode 0777 and the
//!   same reopening works the other way: the reader opens
//!   `/proc/self/fd/<its ring fd>` `O_RDWR`, maps the ring writable and
//!   writes messages every other reader takes as the publisher's. The
//!   promise "readers get read-only fds and mappings; only the publisher
//!   can write" (DESIGN.md) does not hold, across uids.
//!
//! Every wait is bounded; the broker and helpers are killed on drop.

mod common;

use std::os::fd::{AsFd, AsRawFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use shmbus::{ChannelConfig, ChannelEvent, ChannelOverflow};
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
