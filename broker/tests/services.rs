//! Services: names and calls through a real broker, with services (and a
//! caller) in separate processes.
//!
//! The other process is this test binary run as a helper (`helper_process`,
//! spawned with `--ignored --exact`), told by environment variables what
//! to be: a service that echoes, answers errors, holds requests unanswered
//! until told, names itself, or counts fire-and-forget sends; or a caller
//! that sends one request and waits. It reports on stdout with a prefix;
//! it is told things on the pub/sub subject `ctl.<tag>`. Every wait is
//! bounded; helpers and brokers are killed on drop.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use shmbus::{
    reply_code, CallError, Client, Event, FlushError, NameFlags, NameFlagsExt, NameOwnerChanged, NameResult,
    NameStatus, ServeError,
};
use shmbus_proto::frame::{
    encode_frame, BrokerFrame, ErrorCode, NameRequest, Op, Outcome, PayloadRef, Reply, ReplyStatus, Request,
};

const ROLE: &str = "SHMBUS_SVC_ROLE";
const ADDR: &str = "SHMBUS_SVC_ADDR";
const NAME: &str = "SHMBUS_SVC_NAME";
const TAG: &str = "SHMBUS_SVC_TAG";
/// Comma-separated: `shared`, `queue` (exclusive, waiting in the queue).
const FLAGS: &str = "SHMBUS_SVC_FLAGS";
/// What the helper says to its parent (libtest shares its stdout).
const SAY: &str = "SVC:";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is set by the parent"))
}

/// A pattern of `len` bytes, different per `salt`.
fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt)).collect()
}

/// Not a test on its own: the body of the helper processes, run only when
/// a test spawns this binary with `--ignored --exact helper_process`.
#[test]
#[ignore = "helper process body, spawned by the other tests"]
fn helper_process() {
    let role = env(ROLE);
    let addr = env(ADDR);
    let name = env(NAME);
    let tag = std::env::var(TAG).unwrap_or_default();
    let client = Client::options().address(shmbus::Address::parse(&addr).unwrap()).connect().unwrap();
    match role.as_str() {
        "service" => {
            let flags = std::env::var(FLAGS).unwrap_or_default();
            let flags = match flags.as_str() {
                "shared" => NameFlags::shared(),
                "queue" => NameFlags::exclusive(),
                _ => NameFlags::exclusive().do_not_queue(),
            };
            let ctl = client.subscribe(&format!("ctl.{tag}")).unwrap();
            let service = client.serve_with(&name, flags).unwrap();
            println!("{SAY}ready {}", client.id());
            serve_loop(&client, &service, &ctl, &tag);
        }
        "caller" => {
            let call = client.request_async(&name, b"hold me", Duration::from_secs(60)).unwrap();
            client.ping().unwrap();
            println!("{SAY}sent {}", client.id());
            // Wait to be killed, the call in flight.
            let r = call.wait();
            println!("{SAY}answered {r:?}");
        }
        other => panic!("unknown role {other}"),
    }
}

/// The helper service: answers by payload.
fn serve_loop(client: &Client, service: &shmbus::Service, ctl: &shmbus::Subscription, tag: &str) {
    let mut held = Vec::new();
    let mut notes = 0u64;
    let threshold = shmbus::DEFAULT_MEMFD_THRESHOLD;
    loop {
        if let Some(req) = service.recv_timeout(Duration::from_millis(20)).unwrap() {
            let p = req.payload();
            if !req.expects_reply() {
                // A note, or a large one (by memfd).
                assert!(p == b"note" || (req.is_memfd() && p == pattern(1 << 20, 1).as_slice()));
                notes += 1;
            } else if p.starts_with(b"hang") {
                held.push(req);
                println!("{SAY}held {}", held.len());
            } else if p == b"error" {
                req.reply_error(7, "app says no").unwrap();
            } else if p == b"drop" {
                drop(req);
            } else if p == b"who" {
                req.reply(tag.as_bytes()).unwrap();
            } else if p == b"notes" {
                req.reply(notes.to_string().as_bytes()).unwrap();
            } else if p == b"sender" {
                let s = req.sender();
                req.reply(format!("{} {} {} {}", s.client_id, s.uid, s.gid, s.pid).as_bytes()).unwrap();
            } else if let Some(n) = p.strip_prefix(b"loan:") {
                let n: usize = std::str::from_utf8(n).unwrap().parse().unwrap();
                let mut loan = client.loan(n).unwrap();
                loan.copy_from_slice(&pattern(n, 9));
                req.reply_loan(loan).unwrap();
            } else if req.len() > threshold && !req.is_memfd() {
                req.reply_error(99, "a large request came inline").unwrap();
            } else {
                let echo = p.to_vec();
                req.reply(&echo).unwrap();
            }
        }
        while let Some(ev) = ctl.try_recv().unwrap() {
            if let Event::Message(m) = ev {
                if m.payload() == b"answer-held" {
                    let n = held.len();
                    for r in held.drain(..) {
                        r.reply(b"late").unwrap();
                    }
                    client.ping().unwrap();
                    println!("{SAY}answered {n}");
                }
            }
        }
    }
}

fn helper(b: &Broker, role: &str, name: &str, tag: &str, flags: &str) -> Helper {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "helper_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(ADDR, &b.address)
        .env(NAME, name)
        .env(TAG, tag)
        .env(FLAGS, flags)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Helper::spawn(&mut cmd, SAY)
}

/// A service helper on `name`, ready; returns it and its client id.
fn service(b: &Broker, name: &str, tag: &str, flags: &str) -> (Helper, u64) {
    let mut h = helper(b, "service", name, tag, flags);
    let id = h.expect("ready").parse().unwrap();
    (h, id)
}

impl Helper {
    /// Kills it with SIGKILL and reaps it.
    fn kill(&mut self) {
        let mut child = self.child.0.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// Waits (bounded) until `f` holds of the broker's stats.
fn wait_stats(c: &Client, what: &str, f: impl Fn(&shmbus::Stats) -> bool) -> shmbus::Stats {
    let start = Instant::now();
    loop {
        let s = c.stats().unwrap();
        if f(&s) {
            return s;
        }
        assert!(start.elapsed() < PATIENCE, "{what} never held; stats: {s:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

const LONG: Duration = Duration::from_secs(30);

// -------------------------------------------------------------- outcomes --

#[test]
fn every_outcome_reaches_the_caller() {
    let b = Broker::start("svc-outcomes");
    let (mut svc, svc_id) = service(&b, "svc.outcomes", "o", "");
    let caller = b.client();

    // The reply, with the responder's identity as the broker stamped it.
    let r = caller.request("svc.outcomes", b"hello", LONG).unwrap();
    assert_eq!(r.payload(), b"hello");
    assert!(!r.is_memfd());
    assert_eq!(r.responder().client_id, svc_id);
    assert_eq!(r.responder().pid, svc.child.0.as_ref().unwrap().id());
    // The caller's identity, as the service saw it.
    let r = caller.request("svc.outcomes", b"sender", LONG).unwrap();
    let me = format!(
        "{} {} {} {}",
        caller.id(),
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
        std::process::id()
    );
    assert_eq!(std::str::from_utf8(r.payload()).unwrap(), me);

    // An application error.
    match caller.request("svc.outcomes", b"error", LONG) {
        Err(CallError::App { name, code: 7, message }) => {
            assert_eq!((name.as_str(), message.as_str()), ("svc.outcomes", "app says no"));
        }
        other => panic!("{other:?}"),
    }
    // A request the service dropped unanswered.
    match caller.request("svc.outcomes", b"drop", LONG) {
        Err(CallError::App { code: reply_code::UNANSWERED, .. }) => {}
        other => panic!("{other:?}"),
    }

    // Nobody owns the name.
    match caller.request("svc.nobody", b"x", LONG) {
        Err(e @ CallError::NoResponder { .. }) => {
            assert_eq!(e.to_string(), "no responder for svc.nobody");
            assert_eq!(e.kind(), shmbus::ErrorKind::NoResponder);
        }
        other => panic!("{other:?}"),
    }

    // A service that never answers: the broker enforces the deadline
    // (the client alone would wait the connection's timeout longer).
    let before = caller.stats().unwrap();
    match caller.request("svc.outcomes", b"hang", Duration::from_millis(200)) {
        Err(CallError::Timeout { timeout, .. }) => assert_eq!(timeout, Duration::from_millis(200)),
        other => panic!("{other:?}"),
    }
    svc.expect("held 1");
    let after = caller.stats().unwrap();
    assert_eq!(after.request_timeouts, before.request_timeouts + 1, "the broker answered Timeout");
    assert_eq!(after.pending_requests, 0);
    // Its late reply finds no slot: refused, counted.
    caller.publish("ctl.o", b"answer-held").unwrap();
    svc.expect("answered 1");
    wait_stats(&caller, "the late reply refused", |s| s.replies_refused == before.replies_refused + 1);

    // The service goes away with a request unanswered.
    let pending = caller.request_async("svc.outcomes", b"hang", LONG).unwrap();
    svc.expect("held 1");
    svc.kill();
    match pending.wait() {
        Err(e @ CallError::ResponderGone { .. }) => assert_eq!(e.kind(), shmbus::ErrorKind::NoResponder),
        other => panic!("{other:?}"),
    }
    // And then nobody owns the name.
    assert_eq!(caller.name_owner("svc.outcomes").unwrap(), None);
    assert!(matches!(caller.request("svc.outcomes", b"x", LONG), Err(CallError::NoResponder { .. })));
}

/// `Invalid`, which the library never provokes: raw requests with a bad
/// name and with an unsealed memfd.
#[test]
fn malformed_requests_are_answered_invalid() {
    let b = Broker::start("svc-invalid");
    let (mut raw, _) = Raw::hello_named(&b, "raw-caller");
    let bad_name = Request {
        call_id: 1,
        name: "a..b",
        timeout_ms: 1000,
        no_reply: false,
        origin: None,
        payload: PayloadRef::Inline,
    };
    raw.send_body(&bad_name, &[]);
    match raw.recv() {
        Some(BrokerFrame::Answer(a, _)) => {
            assert_eq!(a.call_id, 1);
            assert!(matches!(a.outcome, Outcome::Invalid { message } if message.contains("invalid name")));
        }
        other => panic!("{other:?}"),
    }
    let fd = shmbus_proto::sys::memfd::create("unsealed", 16).unwrap();
    let unsealed = Request {
        call_id: 2,
        name: "svc.x",
        timeout_ms: 1000,
        no_reply: false,
        origin: None,
        payload: PayloadRef::Memfd { len: 16 },
    };
    use std::os::fd::AsFd;
    raw.send_body(&unsealed, &[fd.as_fd()]);
    match raw.recv() {
        Some(BrokerFrame::Answer(a, _)) => {
            assert_eq!(a.call_id, 2);
            assert!(matches!(a.outcome, Outcome::Invalid { .. }), "{:?}", a.outcome);
        }
        other => panic!("{other:?}"),
    }
    // The connection stays usable.
    let c = b.client();
    assert_eq!(c.stats().unwrap().pending_requests, 0);
}

/// Answers this side gives on a service's behalf: a full local queue
/// (`LimitExceeded` to the caller), a name owned but not served, a
/// service dropped with requests queued.
#[test]
fn the_library_answers_for_a_service_that_cannot() {
    let b = Broker::start("svc-local");
    let caller = b.client();

    // A service whose queue holds 2 requests, and that does not take them.
    let svc_client = b.options().local_queue(2).connect().unwrap();
    let service = svc_client.serve("svc.full").unwrap();
    let calls: Vec<_> =
        (0..5).map(|i| caller.request_async("svc.full", format!("{i}").as_bytes(), LONG).unwrap()).collect();
    caller.ping().unwrap();
    // The service's connection reads (a ping), queues two and turns three
    // away at once.
    svc_client.ping().unwrap();
    let mut calls = calls.into_iter();
    let first: Vec<_> = calls.by_ref().take(2).collect();
    for call in calls {
        match call.wait() {
            Err(CallError::LimitExceeded { name, message }) => {
                assert_eq!(name, "svc.full");
                assert!(message.contains("queue is full"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(service.turned_away(), 3);
    for (i, call) in first.into_iter().enumerate() {
        let req = service.try_recv().unwrap().expect("queued");
        assert_eq!(req.payload(), format!("{i}").as_bytes());
        req.reply(b"ok").unwrap();
        assert_eq!(call.wait().unwrap().payload(), b"ok");
    }

    // Dropped with requests queued: each is answered.
    let queued: Vec<_> = (0..2).map(|_| caller.request_async("svc.full", b"q", LONG).unwrap()).collect();
    caller.ping().unwrap();
    svc_client.ping().unwrap();
    drop(service);
    for call in queued {
        assert!(matches!(call.wait(), Err(CallError::App { code: reply_code::UNANSWERED, .. })));
    }
    // The name was released with it.
    assert_eq!(caller.name_owner("svc.full").unwrap(), None);

    // Owned, not served.
    assert_eq!(
        svc_client.request_name("svc.owned", NameFlags::exclusive()).unwrap(),
        NameResult::PrimaryOwner
    );
    let call = caller.request_async("svc.owned", b"q", LONG).unwrap();
    caller.ping().unwrap();
    svc_client.ping().unwrap();
    assert!(matches!(call.wait(), Err(CallError::App { code: reply_code::NOT_SERVED, .. })));

    // One service per name per connection.
    let s = svc_client.serve("svc.once").unwrap();
    assert!(matches!(svc_client.serve("svc.once"), Err(ServeError::AlreadyServed { .. })));
    drop(s);
    let _again = svc_client.serve("svc.once").expect("served again once dropped");
}

// -------------------------------------------------------- pending quota --

#[test]
fn a_flood_beyond_the_pending_quota_is_refused_and_the_quota_comes_back() {
    let b = Broker::start_with("svc-quota", &["--uid-pending-requests", "8"]);
    let (mut svc, _) = service(&b, "svc.quota", "q", "");
    let caller = b.client();
    let before = caller.stats().unwrap();
    let mut calls: Vec<_> =
        (0..50).map(|_| caller.request_async("svc.quota", b"hang", LONG).unwrap()).collect();
    // The first 8 are pending; the rest are refused at once, in order.
    svc.expect("held 8");
    let refused: Vec<_> = calls.split_off(8);
    for call in refused {
        match call.wait() {
            Err(e @ CallError::LimitExceeded { .. }) => {
                assert_eq!(e.kind(), shmbus::ErrorKind::LimitExceeded)
            }
            other => panic!("{other:?}"),
        }
    }
    let s = caller.stats().unwrap();
    assert_eq!(s.pending_requests, 8);
    assert_eq!(s.quota_refusals, before.quota_refusals + 42);
    for call in &mut calls {
        assert!(call.try_get().unwrap().is_none(), "still pending");
    }
    // Fire-and-forget sends hold no reply slot: not refused.
    for _ in 0..3 {
        caller.send("svc.quota", b"note").unwrap();
    }
    caller.flush().unwrap();
    // Other clients of the same uid share the quota.
    let other = b.client();
    assert!(matches!(other.request("svc.quota", b"x", LONG), Err(CallError::LimitExceeded { .. })));
    // Answered, the slots come back.
    caller.publish("ctl.q", b"answer-held").unwrap();
    svc.expect("answered 8");
    for call in calls {
        assert_eq!(call.wait().unwrap().payload(), b"late");
    }
    assert_eq!(caller.request("svc.quota", b"notes", LONG).unwrap().payload(), b"3");
    assert_eq!(other.request("svc.quota", b"again", LONG).unwrap().payload(), b"again");
    assert_eq!(caller.stats().unwrap().pending_requests, 0);
}

// ----------------------------------------------------------------- names --

#[test]
fn the_owner_queue_and_the_replacement_flags() {
    let b = Broker::start("svc-queue");
    let [a, bb, c, d, e] = std::array::from_fn(|i| b.client_named(&format!("n{i}")));
    let n = "q.name";
    let excl = NameFlags::exclusive();
    assert_eq!(a.request_name(n, excl).unwrap(), NameResult::PrimaryOwner);
    assert_eq!(bb.request_name(n, excl).unwrap(), NameResult::InQueue);
    assert_eq!(c.request_name(n, excl.do_not_queue()).unwrap(), NameResult::Exists);
    // A does not allow replacement: D only queues.
    assert_eq!(d.request_name(n, excl.replace_existing()).unwrap(), NameResult::InQueue);
    assert_eq!(a.request_name(n, excl.allow_replacement()).unwrap(), NameResult::AlreadyOwner);
    // Now it does: E takes over, and A waits first in the queue.
    assert_eq!(e.request_name(n, excl.replace_existing().do_not_queue()).unwrap(), NameResult::PrimaryOwner);
    let info = a.names().unwrap().into_iter().find(|i| i.name == n).unwrap();
    assert_eq!(info.owners, vec![e.id()]);
    assert_eq!(info.queued, vec![a.id(), bb.id(), d.id()]);
    assert!(!info.shared);
    assert_eq!(a.name_status(n).unwrap(), NameStatus { owner: Some(e.id()), members: 1 });
    // Serving a taken name fails at once (no queueing).
    assert!(matches!(c.serve(n), Err(ServeError::Exists { .. })));
    // A shared ask on an exclusive name is refused as existing.
    assert_eq!(c.request_name(n, NameFlags::shared()).unwrap(), NameResult::Exists);
    // The queue hands over in order: on release, and on disconnect.
    assert_eq!(e.release_name(n).unwrap(), NameResult::Released);
    assert_eq!(c.name_owner(n).unwrap(), Some(a.id()));
    assert_eq!(a.release_name(n).unwrap(), NameResult::Released);
    assert_eq!(c.name_owner(n).unwrap(), Some(bb.id()));
    let bb_id = bb.id();
    drop(bb);
    let start = Instant::now();
    while c.name_owner(n).unwrap() == Some(bb_id) {
        assert!(start.elapsed() < PATIENCE, "the owner's disconnect never handed the name over");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(c.name_owner(n).unwrap(), Some(d.id()));
    // Releasing what one does not hold.
    assert_eq!(c.release_name(n).unwrap(), NameResult::NotOwner);
    assert_eq!(c.release_name("q.unknown").unwrap(), NameResult::NonExistent);
    // A name left in the queue is left.
    assert_eq!(c.request_name(n, excl).unwrap(), NameResult::InQueue);
    assert_eq!(c.release_name(n).unwrap(), NameResult::Released);
    assert_eq!(c.name_owner(n).unwrap(), Some(d.id()));
    // Reserved names.
    match c.request_name("$SYS.mine", excl) {
        Err(shmbus::NameError::Refused { code: ErrorCode::ReservedName, .. }) => {}
        other => panic!("{other:?}"),
    }
    let privileged = c.request_name("shmbus.mine", excl);
    if rustix::process::getuid().is_root() {
        assert_eq!(privileged.unwrap(), NameResult::PrimaryOwner);
    } else {
        assert!(matches!(privileged, Err(shmbus::NameError::Refused { code: ErrorCode::ReservedName, .. })));
    }
    assert!(matches!(c.request_name("a.*", excl), Err(shmbus::NameError::InvalidName(_))));
}

#[test]
fn names_are_a_per_uid_quota() {
    let b = Broker::start_with("svc-names-quota", &["--uid-names", "3"]);
    let (c1, c2) = (b.client(), b.client());
    assert_eq!(c1.request_name("n.1", NameFlags::exclusive()).unwrap(), NameResult::PrimaryOwner);
    assert_eq!(c1.request_name("n.2", NameFlags::exclusive()).unwrap(), NameResult::PrimaryOwner);
    // Waiting in a queue holds a name too.
    assert_eq!(c2.request_name("n.1", NameFlags::exclusive()).unwrap(), NameResult::InQueue);
    match c2.request_name("n.3", NameFlags::exclusive()) {
        Err(e @ shmbus::NameError::Refused { code: ErrorCode::LimitExceeded, .. }) => {
            assert_eq!(e.kind(), shmbus::ErrorKind::LimitExceeded)
        }
        other => panic!("{other:?}"),
    }
    // Asking again for a name held costs nothing new.
    assert_eq!(c1.request_name("n.1", NameFlags::exclusive()).unwrap(), NameResult::AlreadyOwner);
    assert_eq!(c1.release_name("n.2").unwrap(), NameResult::Released);
    assert_eq!(c2.request_name("n.3", NameFlags::exclusive()).unwrap(), NameResult::PrimaryOwner);
}

#[test]
fn shared_names_spread_the_load() {
    let b = Broker::start("svc-shared");
    let tags = ["a", "b", "c"];
    let members: Vec<(Helper, u64)> = tags.iter().map(|t| service(&b, "svc.shared", t, "shared")).collect();
    let caller = b.client();
    let status = caller.name_status("svc.shared").unwrap();
    assert_eq!(status, NameStatus { owner: Some(members[0].1), members: 3 });
    let info = caller.names().unwrap().into_iter().find(|i| i.name == "svc.shared").unwrap();
    assert!(info.shared);
    assert_eq!(info.owners.len(), 3);
    // An exclusive asker is refused.
    assert!(matches!(caller.serve("svc.shared"), Err(ServeError::Exists { .. })));
    let total = 300;
    let calls: Vec<_> =
        (0..total).map(|_| caller.request_async("svc.shared", b"who", LONG).unwrap()).collect();
    let mut got: HashMap<String, usize> = HashMap::new();
    for call in calls {
        let r = call.wait().unwrap();
        *got.entry(String::from_utf8(r.payload().to_vec()).unwrap()).or_default() += 1;
    }
    assert_eq!(got.values().sum::<usize>(), total);
    for t in tags {
        let n = got.get(t).copied().unwrap_or(0);
        assert!(n > 0 && n < total, "member {t} got {n} of {total}: {got:?}");
    }
    drop(members);
}

#[test]
fn name_owner_changes_are_published_in_order() {
    let b = Broker::start("svc-events");
    let watcher = b.client();
    let events = watcher.subscribe("$SYS.name.>").unwrap();
    let (mut h, h_id) = service(&b, "ev.a", "h", "queue");
    let (bb, c, d, e) = (b.client(), b.client(), b.client(), b.client());
    let excl = NameFlags::exclusive();
    assert_eq!(bb.request_name("ev.a", excl).unwrap(), NameResult::InQueue);
    h.kill();
    // Wait for the hand-over, so what follows is B's to give.
    let start = Instant::now();
    while c.name_owner("ev.a").unwrap() != Some(bb.id()) {
        assert!(start.elapsed() < PATIENCE, "the name never reached B");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(c.request_name("ev.a", excl.replace_existing()).unwrap(), NameResult::InQueue);
    assert_eq!(bb.request_name("ev.a", excl.allow_replacement()).unwrap(), NameResult::AlreadyOwner);
    assert_eq!(c.request_name("ev.a", excl.replace_existing()).unwrap(), NameResult::PrimaryOwner);
    assert_eq!(c.release_name("ev.a").unwrap(), NameResult::Released);
    assert_eq!(bb.release_name("ev.a").unwrap(), NameResult::Released);
    assert_eq!(d.request_name("ev.s", NameFlags::shared()).unwrap(), NameResult::PrimaryOwner);
    assert_eq!(e.request_name("ev.s", NameFlags::shared()).unwrap(), NameResult::PrimaryOwner);
    assert_eq!(d.release_name("ev.s").unwrap(), NameResult::Released);
    let e_id = e.id();
    drop(e);
    let (b_id, c_id, d_id) = (bb.id(), c.id(), d.id());
    let want = [
        ("ev.a", None, Some(h_id)),
        ("ev.a", Some(h_id), Some(b_id)),
        ("ev.a", Some(b_id), Some(c_id)),
        ("ev.a", Some(c_id), Some(b_id)),
        ("ev.a", Some(b_id), None),
        ("ev.s", None, Some(d_id)),
        ("ev.s", Some(d_id), Some(e_id)),
        ("ev.s", Some(e_id), None),
    ];
    for (i, (name, old, new)) in want.into_iter().enumerate() {
        let m = next_message(&events);
        assert_eq!(m.topic(), format!("$SYS.name.{name}"));
        assert_eq!(m.sender().client_id, 0, "published by the broker");
        let ev = NameOwnerChanged::from_bytes(m.payload()).unwrap();
        assert_eq!(
            (ev.name.as_str(), ev.old_owner, ev.new_owner),
            (name, old, new),
            "event {i} of {}",
            want.len()
        );
    }
    watcher.ping().unwrap();
    assert!(events.try_recv().unwrap().is_none(), "no other event");
    // Clients may not publish under $SYS.
    watcher.publish("$SYS.name.ev.a", b"forged").unwrap();
    assert!(matches!(watcher.flush(), Err(FlushError::Refused(r)) if r[0].code == ErrorCode::Denied));
}

// ------------------------------------------------------------- failures --

#[test]
fn a_service_killed_holding_100_requests_answers_every_caller_and_leaks_nothing() {
    let b = Broker::start("svc-kill");
    let baseline = b.baseline_fds();
    let (mut svc, _) = service(&b, "svc.kill", "k", "");
    let callers: Vec<Client> = (0..4).map(|_| b.client()).collect();
    let mut calls = Vec::new();
    for i in 0..100 {
        // One in ten travels as a memfd.
        let mut payload = b"hang".to_vec();
        if i % 10 == 0 {
            payload.extend(pattern(shmbus::DEFAULT_MEMFD_THRESHOLD + 1, i as u8));
        }
        calls.push(callers[i % 4].request_async("svc.kill", &payload, LONG).unwrap());
    }
    svc.expect("held 100");
    assert_eq!(callers[0].stats().unwrap().pending_requests, 100);
    svc.kill();
    for call in calls {
        match call.wait() {
            Err(CallError::ResponderGone { name }) => assert_eq!(name, "svc.kill"),
            other => panic!("{other:?}"),
        }
    }
    let s = callers[0].stats().unwrap();
    assert_eq!((s.pending_requests, s.names), (0, 0));
    drop(callers);
    b.wait_fd_count(baseline);
}

#[test]
fn a_caller_that_vanishes_mid_request_leaves_its_reply_dropped_and_counted() {
    let b = Broker::start("svc-vanish");
    let svc_client = b.client();
    let service = svc_client.serve("svc.vanish").unwrap();
    let probe = b.client();
    let mut caller = helper(&b, "caller", "svc.vanish", "", "");
    caller.expect("sent");
    let req = service.recv_timeout(PATIENCE).unwrap().expect("the request");
    assert!(req.expects_reply());
    caller.kill();
    // The service and the probe are left.
    b.wait_clients(&probe, 2);
    assert_eq!(probe.stats().unwrap().pending_requests, 1, "the slot outlives its caller");
    req.reply(b"nobody listens").unwrap();
    svc_client.flush().unwrap();
    let s = probe.stats().unwrap();
    assert_eq!((s.replies_dropped, s.replies_refused, s.pending_requests), (1, 0, 0));
    assert_eq!(svc_client.refused_replies(), 0, "the reply was accepted");
}

/// Replies for which the broker has no slot: a made-up serial, another
/// client's request, a second reply. Raw frames, which the library never
/// sends.
#[test]
fn replies_to_the_wrong_id_are_refused() {
    let b = Broker::start("svc-wrong-id");
    let (mut raw, welcome) = Raw::hello_named(&b, "raw-service");
    raw.send_body(&NameRequest { req_id: 1, name: "svc.raw", flags: NameFlags::default() }, &[]);
    match raw.recv() {
        Some(BrokerFrame::NameReply(r)) => assert_eq!((r.req_id, r.result), (1, NameResult::PrimaryOwner)),
        other => panic!("{other:?}"),
    }
    let caller = b.client();
    let mut call = caller.request_async("svc.raw", b"q", LONG).unwrap();
    let serial = match raw.recv() {
        Some(BrokerFrame::Serve(s, payload)) => {
            assert_eq!((s.name, payload, s.no_reply), ("svc.raw", &b"q"[..], false));
            assert_eq!(s.sender.client_id, caller.id());
            s.serial
        }
        other => panic!("{other:?}"),
    };
    let reply = |serial, payload: &[u8]| {
        encode_frame(&Reply { serial, status: ReplyStatus::Ok, payload: PayloadRef::Inline }, payload)
            .unwrap()
    };
    let expect_refused = |raw: &mut Raw, want: u64| match raw.recv() {
        Some(BrokerFrame::OpError(e)) => {
            assert_eq!((e.op, e.code), (Op::Reply { serial: want }, ErrorCode::NoSuchRequest));
        }
        other => panic!("{other:?}"),
    };
    // A serial never handed out.
    raw.send(&reply(serial + 1000, b"wrong"), &[]);
    expect_refused(&mut raw, serial + 1000);
    // The right serial, from a client it was not sent to.
    let (mut intruder, _) = Raw::hello_named(&b, "intruder");
    intruder.send(&reply(serial, b"forged"), &[]);
    expect_refused(&mut intruder, serial);
    caller.ping().unwrap();
    assert!(call.try_get().unwrap().is_none(), "no answer yet");
    // The right reply; then a second one.
    raw.send(&reply(serial, b"right"), &[]);
    let r = call.wait_timeout(PATIENCE).unwrap().expect("the reply");
    assert_eq!((r.payload(), r.responder().client_id), (&b"right"[..], welcome.client_id));
    assert!(matches!(call.try_get(), Err(CallError::AlreadyTaken)));
    raw.send(&reply(serial, b"again"), &[]);
    expect_refused(&mut raw, serial);
    let s = caller.stats().unwrap();
    assert_eq!((s.replies_refused, s.pending_requests), (3, 0));
    // The library counts the refusals of its own late replies.
    let svc_client = b.client();
    let service = svc_client.serve("svc.late").unwrap();
    let late = caller.request_async("svc.late", b"q", Duration::from_millis(50)).unwrap();
    let req = service.recv_timeout(PATIENCE).unwrap().expect("the request");
    assert!(matches!(late.wait(), Err(CallError::Timeout { .. })));
    req.reply(b"too late").unwrap();
    svc_client.ping().unwrap();
    assert_eq!(svc_client.refused_replies(), 1);
}

// ------------------------------------------------------------- payloads --

#[test]
fn memfd_requests_and_replies_carry_every_byte() {
    let b = Broker::start("svc-memfd");
    let baseline = b.baseline_fds();
    let (_svc, _) = service(&b, "svc.memfd", "m", "");
    let caller = b.client();
    for (len, memfd) in
        [(10, false), (shmbus::DEFAULT_MEMFD_THRESHOLD, false), (64 * 1024 + 1, true), (4 << 20, true)]
    {
        let payload = pattern(len, len as u8);
        let r = caller.request("svc.memfd", &payload, LONG).unwrap();
        assert_eq!(r.is_memfd(), memfd, "reply of {len} bytes");
        assert_eq!(r.len(), len);
        assert!(r.payload() == payload.as_slice(), "{len} bytes intact both ways");
    }
    // A caller with a lower threshold sends small payloads by memfd; the
    // service answers from a loan.
    let low = b.options().memfd_threshold(100).connect().unwrap();
    let r = low.request("svc.memfd", pattern(1000, 3), LONG).unwrap();
    assert_eq!(r.payload(), pattern(1000, 3).as_slice());
    let r = low.request("svc.memfd", b"loan:300000", LONG).unwrap();
    assert!(r.is_memfd());
    assert_eq!(r.into_payload().unwrap(), pattern(300_000, 9));
    // Many in flight at once, none lost.
    let calls: Vec<_> = (0..50u8)
        .map(|i| (i, caller.request_async("svc.memfd", pattern(100_000, i), LONG).unwrap()))
        .collect();
    for (i, call) in calls {
        assert!(call.wait().unwrap().payload() == pattern(100_000, i).as_slice());
    }
    drop((caller, low));
    drop(_svc);
    b.wait_fd_count(baseline);
}

#[test]
fn fire_and_forget_sends_arrive_and_their_refusals_come_back_from_flush() {
    let b = Broker::start("svc-send");
    let (_svc, _) = service(&b, "svc.send", "s", "");
    let caller = b.client();
    for i in 1..=5 {
        assert_eq!(caller.send("svc.send", b"note").unwrap(), i);
    }
    caller.flush().unwrap();
    // Same connection, in order: the notes came before this call.
    assert_eq!(caller.request("svc.send", b"notes", LONG).unwrap().payload(), b"5");
    assert_eq!(caller.send("svc.nobody", b"note").unwrap(), 6);
    assert_eq!(caller.send("svc.send", b"note").unwrap(), 7);
    match caller.flush() {
        Err(FlushError::SendsRefused(r)) => {
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].seq, 6);
            assert!(matches!(r[0].error, CallError::NoResponder { .. }));
        }
        other => panic!("{other:?}"),
    }
    caller.flush().unwrap();
    // A large send goes as a memfd like any payload.
    assert_eq!(caller.send("svc.send", pattern(1 << 20, 1)).unwrap(), 8);
    caller.flush().unwrap();
    assert_eq!(caller.request("svc.send", b"notes", LONG).unwrap().payload(), b"7");
}
