//! Credentials and policy, proven with processes under another uid (the
//! tests run as root, as CI does), and hostile peers on a raw socket.

mod common;

use std::os::fd::{AsFd, OwnedFd};

use common::*;
use shmbus::{ErrorKind, Event};
use shmbus_proto::frame::{
    encode_frame, encode_head, BrokerFrame, ErrorCode, GoodbyeCode, Hello, Op, Overflow, PayloadRef, Ping,
    Publish, Subscribe, MAGIC, PROTOCOL_VERSION,
};
use shmbus_proto::limits::{MAX_FDS_PER_PACKET, MAX_PACKET};
use shmbus_proto::sys::socket;

/// `binary` run as `uid` with primary group `gid` (supplementary groups
/// are dropped when a root parent changes uid).
fn command_as_ids(binary: &str, uid: u32, gid: u32) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = command_as(binary, uid);
    cmd.gid(gid);
    cmd
}

#[test]
fn other_uid_is_refused_with_a_reason_and_logged() {
    if !needs_root("other_uid_is_refused_with_a_reason_and_logged") {
        return;
    }
    let b = Broker::start("denied");
    let out = b.ctl_as(&["ping"], Some(NOBODY));
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("denied"), "{err}");
    assert!(err.contains(&NOBODY.to_string()), "{err}");
    let probe = b.client();
    assert_eq!(probe.stats().unwrap().connections_refused, 1);
}

#[test]
fn allowed_other_uid_is_stamped_as_itself() {
    if !needs_root("allowed_other_uid_is_stamped_as_itself") {
        return;
    }
    let b = Broker::start_with("stamp", &["--allow-uid", &NOBODY.to_string()]);
    let c = b.client();
    let s = c.subscribe("who").unwrap();
    let mut cmd = command_as(SHMBUSCTL, NOBODY);
    cmd.args(["--address", &b.address, "pub", "who", "me"]);
    let child = spawn_guarded(cmd);
    let pid = child.0.as_ref().unwrap().id();
    let out = child.wait_output();
    assert!(out.status.success(), "{}", stderr(&out));
    let m = s.recv_timeout(PATIENCE).unwrap().unwrap().message().unwrap();
    let sender = m.sender();
    assert_eq!((sender.uid, sender.gid, sender.pid), (NOBODY, NOBODY, pid));
    assert_ne!(sender.client_id, c.id());
}

/// Admission is decided on the peer's uid, never its gid. A client whose
/// uid is not allowed is refused even when its gid equals an allowed uid
/// (gid 0, and root is allowed by default): a check that compared the
/// allowed uids with the gid would let it in.
#[test]
fn a_refused_uid_is_refused_whatever_its_gid() {
    if !needs_root("a_refused_uid_is_refused_whatever_its_gid") {
        return;
    }
    let b = Broker::start("uid-not-gid");
    let probe = b.client();
    for (n, gid) in [0, NOBODY].into_iter().enumerate() {
        let mut cmd = command_as_ids(SHMBUSCTL, NOBODY, gid);
        cmd.args(["--address", &b.address, "ping"]);
        let out = run_bounded(cmd);
        assert!(!out.status.success(), "uid {NOBODY} with gid {gid} was admitted; stdout {:?}", stdout(&out));
        let err = stderr(&out);
        assert!(err.contains("denied") && err.contains(&format!("uid {NOBODY}")), "gid {gid}: {err}");
        assert_eq!(probe.stats().unwrap().connections_refused, n as u64 + 1, "gid {gid}");
    }
}

/// The other half: an allowed uid is admitted whatever its gid, and is
/// stamped with both as the kernel reports them.
#[test]
fn an_allowed_uid_is_admitted_whatever_its_gid() {
    if !needs_root("an_allowed_uid_is_admitted_whatever_its_gid") {
        return;
    }
    // Neither 0 nor 65534, so a check on the gid would refuse it.
    const GID: u32 = 4242;
    let b = Broker::start_with("gid-not-uid", &["--allow-uid", &NOBODY.to_string()]);
    let c = b.client();
    let s = c.subscribe("who").unwrap();
    let mut cmd = command_as_ids(SHMBUSCTL, NOBODY, GID);
    cmd.args(["--address", &b.address, "pub", "who", "me"]);
    let child = spawn_guarded(cmd);
    let pid = child.0.as_ref().unwrap().id();
    let out = child.wait_output();
    assert!(out.status.success(), "uid {NOBODY} (allowed) with gid {GID} was refused: {}", stderr(&out));
    let m = next_message(&s);
    let sender = m.sender();
    assert_eq!((sender.uid, sender.gid, sender.pid), (NOBODY, GID, pid));
    assert_eq!(c.stats().unwrap().connections_refused, 0);
}

#[test]
fn client_refuses_a_broker_run_by_another_uid() {
    if !needs_root("client_refuses_a_broker_run_by_another_uid") {
        return;
    }
    // A "squatter": a broker under uid 65534 on the name root wants.
    let b = Broker::spawn("squat", &[], Some(NOBODY));
    let err = shmbus::Client::connect_to(&b.address).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Denied, "{err}");
    assert!(err.to_string().contains("65534"), "{err}");
    // Trusting it explicitly works.
    let c = shmbus::Client::options()
        .address(shmbus::Address::parse(&b.address).unwrap())
        .trust_broker_uid(NOBODY)
        .connect()
        .unwrap();
    c.ping().unwrap();
}

#[test]
fn unreachable_broker_is_a_clear_error() {
    let out = std::process::Command::new(SHMBUSCTL)
        .args(["--address", &unique_address("nobody-home"), "ping"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot reach the bus"), "{}", stderr(&out));
}

// ------------------------------------------------------- hostile peers --

fn any_fd() -> (OwnedFd, OwnedFd) {
    socket::pair().unwrap()
}

/// A normal client still gets service.
fn still_serving(b: &Broker) {
    let c = b.client();
    let s = c.subscribe("alive").unwrap();
    c.publish("alive", b"yes").unwrap();
    match s.recv_timeout(PATIENCE).unwrap() {
        Some(Event::Message(m)) => assert_eq!(m.payload(), b"yes"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn garbage_and_stray_fds_disconnect_only_the_offender_and_leak_nothing() {
    let b = Broker::start("hostile");
    // A bystander with a subscription, to prove others go on.
    let bystander = b.client();
    let watch = bystander.subscribe("keep.going").unwrap();
    bystander.ping().unwrap();
    let baseline = b.baseline_fds();

    type Case<'a> = (&'a str, Box<dyn Fn(&Raw)>, GoodbyeCode, &'a str);
    let cases: Vec<Case<'_>> = vec![
        (
            "random bytes",
            Box::new(|r: &Raw| r.send(b"\xde\xad\xbe\xef garbage", &[])),
            GoodbyeCode::ProtocolViolation,
            "bad magic",
        ),
        ("short", Box::new(|r: &Raw| r.send(b"\x53", &[])), GoodbyeCode::ProtocolViolation, "shorter"),
        (
            "unknown kind",
            Box::new(|r: &Raw| {
                let mut f = MAGIC.to_le_bytes().to_vec();
                f.extend_from_slice(&[PROTOCOL_VERSION, 250, 0, 0, 0, 0]);
                r.send(&f, &[])
            }),
            GoodbyeCode::ProtocolViolation,
            "unknown frame kind 250",
        ),
        (
            "frame before hello",
            Box::new(|r: &Raw| r.send(&encode_head(&Ping { token: 1 }).unwrap(), &[])),
            GoodbyeCode::ProtocolViolation,
            "before Hello",
        ),
        (
            "wrong version",
            Box::new(|r: &Raw| r.send(&encode_head(&Hello { version: 99, name: "x" }).unwrap(), &[])),
            GoodbyeCode::VersionMismatch,
            "99",
        ),
        (
            "oversize packet",
            Box::new(|r: &Raw| {
                rustix::net::sockopt::set_socket_send_buffer_size(&r.fd, 4 * MAX_PACKET).unwrap();
                r.send(&vec![0x53; MAX_PACKET + 100], &[])
            }),
            GoodbyeCode::ProtocolViolation,
            "larger than",
        ),
        (
            "fd on a hello",
            Box::new(|r: &Raw| {
                let (x, _y) = any_fd();
                let hello = encode_head(&Hello { version: PROTOCOL_VERSION.into(), name: "x" }).unwrap();
                r.send(&hello, &[x.as_fd()])
            }),
            GoodbyeCode::ProtocolViolation,
            "unexpected fd",
        ),
    ];
    for (what, act, code, needle) in &cases {
        let mut r = Raw::connect(&b);
        act(&r);
        r.expect_goodbye(*code, needle);
        eprintln!("ok: {what}");
    }

    // After a good hello: stray fds, too many fds, a malformed body.
    let mut r = Raw::hello(&b);
    let (x, _y) = any_fd();
    r.send(&encode_head(&Ping { token: 7 }).unwrap(), &[x.as_fd()]);
    r.expect_goodbye(GoodbyeCode::ProtocolViolation, "unexpected fd attached to a Ping");

    let mut r = Raw::hello(&b);
    let many: Vec<OwnedFd> = (0..MAX_FDS_PER_PACKET + 2).map(|_| x.try_clone().unwrap()).collect();
    send_too_many_fds(&r.fd, &many);
    r.expect_goodbye(GoodbyeCode::ProtocolViolation, "more fds");

    let mut r = Raw::hello(&b);
    let mut bad = encode_head(&Ping { token: 7 }).unwrap();
    bad[4] = 200; // body length past the end
    r.send(&bad, &[]);
    r.expect_goodbye(GoodbyeCode::ProtocolViolation, "body length");

    // A declared fd payload is refused for that publish only: the
    // connection stays usable and the fd is closed.
    let mut r = Raw::hello(&b);
    let publish =
        encode_head(&Publish { topic: "keep.going", origin: None, payload: PayloadRef::Memfd { len: 4096 } })
            .unwrap();
    r.send(&publish, &[x.as_fd()]);
    match r.recv() {
        Some(BrokerFrame::OpError(e)) => {
            assert_eq!((e.op, e.code), (Op::Publish { seq: 1 }, ErrorCode::NotMemfd), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }
    r.send(
        &encode_frame(&Publish { topic: "keep.going", origin: None, payload: PayloadRef::Inline }, b"after")
            .unwrap(),
        &[],
    );
    r.send(&encode_head(&Ping { token: 9 }).unwrap(), &[]);
    assert!(matches!(r.recv(), Some(BrokerFrame::Pong(p)) if p.token == 9));
    match watch.recv_timeout(PATIENCE).unwrap() {
        Some(Event::Message(m)) => assert_eq!(m.payload(), b"after"),
        other => panic!("{other:?}"),
    }
    drop(r);

    // A client that vanishes mid-stream, with a subscription and a full queue.
    {
        let mut r = Raw::hello(&b);
        r.send(&encode_head(&Subscribe { sub_id: 1, pattern: ">", overflow: Overflow::Gap }).unwrap(), &[]);
        assert!(matches!(r.recv(), Some(BrokerFrame::Subscribed(_))));
        for _ in 0..2000 {
            bystander.publish("keep.going.x", [0; 512]).unwrap();
        }
    }

    still_serving(&b);
    drop(x);
    let probe_stats = bystander.stats().unwrap();
    assert!(probe_stats.protocol_errors >= cases.len() as u64 + 3, "{probe_stats:?}");
    // Every offender's socket and every fd they sent are closed.
    b.wait_fd_count(baseline);
    bystander.ping().unwrap();
}

fn send_too_many_fds(sock: &OwnedFd, fds: &[OwnedFd]) {
    use std::os::fd::AsRawFd;
    let ping = encode_head(&Ping { token: 1 }).unwrap();
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    // Build the control message with rustix, which allows any count.
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let mut space = vec![std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(raw.len()))];
    let mut anc = rustix::net::SendAncillaryBuffer::new(&mut space);
    assert!(anc.push(rustix::net::SendAncillaryMessage::ScmRights(&borrowed)));
    rustix::net::sendmsg(sock, &[std::io::IoSlice::new(&ping)], &mut anc, rustix::net::SendFlags::empty())
        .unwrap();
}

#[test]
fn clients_that_never_read_replies_are_cut_off() {
    let b = Broker::start_with("noread", &["--queue-frames", "16"]);
    let baseline = b.baseline_fds();
    let mut r = Raw::hello(&b);
    // Spam pings without reading a single pong.
    for i in 0..5000u64 {
        r.send(&encode_head(&Ping { token: i }).unwrap(), &[]);
    }
    // Pongs up to the hard bound, then the goodbye.
    let mut pongs = 0;
    loop {
        match r.recv() {
            Some(BrokerFrame::Pong(_)) => pongs += 1,
            Some(BrokerFrame::Goodbye(g)) => {
                assert_eq!(g.code, GoodbyeCode::LimitExceeded);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    // What fit in the kernel's socket buffer (a few hundred small frames)
    // plus the queue's hard bound (2 × 16): far fewer than were asked for.
    assert!(pongs < 1000, "{pongs} pongs before the cut-off");
    drop(r);
    still_serving(&b);
    b.wait_fd_count(baseline);
}

#[test]
fn connections_per_uid_are_bounded() {
    let b = Broker::start_with("conncap", &["--max-connections-per-uid", "3"]);
    let c1 = b.client();
    let _c2 = b.client();
    let _c3 = b.client();
    let err = shmbus::Client::connect_to(&b.address).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::LimitExceeded, "{err}");
    assert!(err.to_string().contains("3 connections"), "{err}");
    // Closing one makes room again.
    drop(_c3);
    let start = std::time::Instant::now();
    loop {
        match shmbus::Client::connect_to(&b.address) {
            Ok(_) => break,
            Err(_) if start.elapsed() < PATIENCE => std::thread::sleep(std::time::Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(c1.stats().unwrap().connections_refused >= 1);
}
