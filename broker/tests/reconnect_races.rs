//! Reconnection under races and outages, from a review that found each
//! of these broken: stale replies, stale channel handles, a handle or a
//! name request caught by a reconnection, a restart seen as a final
//! disconnect, drops that block during an outage, polls that wait out a
//! handshake or burn the reconnection budget.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;
use shmbus::{ChannelConfig, Client, ReconnectPolicy};

/// Waits (bounded) until `name` is owned by `owner`.
fn wait_owner(c: &Client, name: &str, owner: &Client) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if c.name_owner(name).ok().flatten() == Some(owner.id()) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never came back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A channel handle from before the restart, dropped without having been
/// used since, gives nothing back to the new broker, which may have given
/// its ids to this client's live channel (once it did: a drop closed it).
#[test]
fn dropping_a_pre_restart_channel_handle_leaves_a_live_channel_with_the_same_id_alone() {
    let mut b = Broker::start("rv-stale-close");
    let pc = b.client();
    let x = pc.channel_publisher("rv.a", ChannelConfig::default()).unwrap(); // id 1
    let mut y = pc.channel_publisher("rv.b", ChannelConfig::default()).unwrap(); // id 2
    b.restart(Signal::TERM);
    pc.ping().unwrap(); // reconnected
                        // y reopens on the new broker: id 1 there.
    y.publish(b"after").unwrap();
    let rc = b.client();
    let mut reader = rc.channel_subscriber("rv.b").unwrap();
    // x was never used since: not marked stale; its drop sends
    // ChannelClose{1, 0} on the new connection.
    drop(x);
    pc.ping().unwrap();
    y.publish(b"still open?").expect("the live channel must not be closed by a stale handle");
    match reader.recv_vec_timeout(Duration::from_secs(2)) {
        Ok(Some(shmbus::ChannelEvent::Message { value, .. })) => assert_eq!(value, b"still open?"),
        other => panic!("the reader of the live channel lost it: {other:?}"),
    }
}

/// A channel publisher opened while the broker is away (its open goes on
/// the new connection) belongs to the new broker: it publishes (once it
/// took itself for the old broker's, and every publish failed `ChannelBusy`).
#[test]
fn a_channel_publisher_opened_across_a_reconnection_publishes() {
    let mut b = Broker::start("rv-open-across");
    let pc = b.client();
    b.restart(Signal::KILL);
    // The client has not noticed: the open's send fails, recovers.
    let mut p = pc.channel_publisher("rv.cam", ChannelConfig::default()).unwrap();
    for i in 0..3 {
        if let Err(e) = p.publish(b"x") {
            panic!("publish {i} failed: {e}");
        }
    }
}

/// A request from the old broker answered after the reconnection: the
/// reply goes nowhere (an error for the service), never to the new
/// broker, where its serial names another caller's request.
#[test]
fn a_reply_to_a_request_from_the_old_broker_never_answers_a_new_callers_request() {
    let mut b = Broker::start("rv-stale-reply");
    let server = b.client();
    let service = server.serve("rv.svc").unwrap();
    let old_caller = b.client();
    let old_call = old_caller.request_async("rv.svc", b"old question", PATIENCE).unwrap();
    let old_req = service.recv_timeout(PATIENCE).unwrap().expect("the old request");
    assert_eq!(old_req.payload(), b"old question");
    b.restart(Signal::TERM);
    let _ = old_call.wait();
    // No background thread: make the server notice and reconnect.
    let _ = server.ping();
    let new_caller = b.client();
    wait_owner(&new_caller, "rv.svc", &server);
    let new_call = new_caller.request_async("rv.svc", b"new question", PATIENCE).unwrap();
    // Make sure the server's connection has the new request (serial 1 on
    // the new broker, as the old one was serial 1 on the old).
    let new_req = service.recv_timeout(PATIENCE).unwrap().expect("the new request");
    assert_eq!(new_req.payload(), b"new question");
    // The service answers the old request late.
    let e = old_req.reply(b"answer to the OLD question").unwrap_err();
    assert_eq!(
        e.kind(),
        shmbus::ErrorKind::Disconnected,
        "a reply to the old broker's request goes nowhere: {e}"
    );
    new_req.reply(b"answer to the new question").unwrap();
    let got = new_call.wait().unwrap();
    assert_eq!(
        String::from_utf8_lossy(got.payload()),
        "answer to the new question",
        "the new caller got the reply meant for a request of the old broker"
    );
}

/// With the broker gone, dropping a service with queued requests returns
/// at once: their answers belonged to the lost connection.
#[test]
fn dropping_a_service_while_the_broker_is_away_returns_at_once() {
    let mut b = Broker::start("rv-drop-service");
    let timeout = Duration::from_millis(700);
    let server = b.options().timeout(timeout).connect().unwrap();
    let service = server.serve("rv.q").unwrap();
    let caller = b.client();
    let calls: Vec<_> = (0..3).map(|_| caller.request_async("rv.q", b"q", PATIENCE).unwrap()).collect();
    // Let them arrive in the service's queue.
    caller.ping().unwrap();
    server.ping().unwrap();
    if let Some(mut c) = b.child.take() {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    let start = Instant::now();
    drop(service);
    let took = start.elapsed();
    drop(calls);
    assert!(took < Duration::from_millis(300), "Service::drop took {took:?} with the broker away");
}

/// A `try_recv` (never waits) on a lost connection keeps its deadline:
/// a reconnection attempt's handshake waits no longer than the caller
/// does, even with something that accepts but never answers.
#[test]
fn try_recv_during_an_outage_keeps_its_deadline() {
    let mut b = Broker::start("rv-try-recv");
    let timeout = Duration::from_secs(2);
    let c = b.options().timeout(timeout).connect().unwrap();
    let sub = c.subscribe("rv.>").unwrap();
    let addr = b.address.clone();
    if let Some(mut child) = b.child.take() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    // Notice the loss.
    let _ = sub.try_recv();
    // A listener that never accepts (a hung broker, or a socket held by
    // systemd with the broker not started yet).
    let _listener = shmbus_proto::sys::socket::listen(&shmbus::Address::parse(&addr).unwrap(), 16).unwrap();
    let start = Instant::now();
    let r = sub.try_recv();
    let took = start.elapsed();
    assert!(took < Duration::from_millis(500), "try_recv took {took:?}: {r:?}");
    let start = Instant::now();
    let r = sub.recv_timeout(Duration::from_millis(50));
    let took = start.elapsed();
    assert!(took < Duration::from_millis(500), "recv_timeout(50ms) took {took:?}: {r:?}");
}

/// Backoff holds for every waiter: an app polling with zero-wait receives
/// does not use up `max_attempts` in milliseconds.
#[test]
fn polling_does_not_burn_the_reconnection_budget() {
    let mut b = Broker::start("rv-attempts");
    let policy = ReconnectPolicy {
        initial_delay: Duration::from_secs(1),
        max_delay: Duration::from_secs(8),
        max_attempts: Some(5),
    };
    let c = b.options().reconnect(policy).connect().unwrap();
    let sub = c.subscribe("rv.>").unwrap();
    if let Some(mut child) = b.child.take() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let start = Instant::now();
    let mut ended = None;
    for _ in 0..50 {
        if let Err(e) = sub.try_recv() {
            ended = Some(e);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(ended.is_none(), "closed for good after {:?} of polling: {}", start.elapsed(), ended.unwrap());
}

/// A thread looking at the connection while another reads the end of
/// the old one never sees it closed for good: the loss is settled under
/// the same lock as the packets that told it.
#[test]
fn a_restart_never_surfaces_as_a_final_disconnected_to_another_thread() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let mut b = Broker::start("rv-transient");
    let c = b.client();
    let reader_sub = c.subscribe("rv.r.>").unwrap();
    let poll_sub = c.subscribe("rv.p.>").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s1 = stop.clone();
    let reader = std::thread::spawn(move || {
        while !s1.load(Ordering::Relaxed) {
            let _ = reader_sub.recv_timeout(Duration::from_millis(200));
        }
    });
    let s2 = stop.clone();
    let poller = std::thread::spawn(move || {
        let mut errors = Vec::new();
        while !s2.load(Ordering::Relaxed) {
            if let Err(e) = poll_sub.try_recv() {
                errors.push(e.to_string());
            }
        }
        errors
    });
    for _ in 0..30 {
        b.restart(Signal::KILL);
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().unwrap();
    let errors = poller.join().unwrap();
    assert!(errors.is_empty(), "{} errors, e.g. {:?}", errors.len(), errors.first());
}

/// A name request whose send went on the new connection (the client had
/// not noticed the restart) waits for that connection's answer: it is
/// not failed for a loss that came before it was sent.
#[test]
fn a_name_request_that_reconnects_is_answered() {
    let mut b = Broker::start("rv-name-across");
    let c = b.client();
    b.restart(Signal::KILL);
    let r = c.serve("rv.name");
    let probe = b.client();
    let owner = probe.name_owner("rv.name").unwrap();
    match r {
        Ok(_service) => {}
        Err(e) => panic!("serve failed ({e}) yet the broker says the owner is {owner:?} (client {})", c.id()),
    }
}

/// A `Drop` that sends (`Subscription`, `Service`, channel handles) does
/// not wait for a sender that waits out an outage: it returns at once.
#[test]
fn dropping_a_subscription_returns_at_once_while_another_thread_publishes_into_an_outage() {
    let mut b = Broker::start("rv-drop-blocks");
    let timeout = Duration::from_secs(2);
    let c = b.options().timeout(timeout).connect().unwrap();
    let sub = c.subscribe("rv.>").unwrap();
    if let Some(mut child) = b.child.take() {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let p = c.clone();
    let publisher = std::thread::spawn(move || {
        // The first may land in the dead socket's buffer; then one waits.
        for _ in 0..3 {
            let _ = p.publish("rv.x", b"1");
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    drop(sub);
    let took = start.elapsed();
    publisher.join().unwrap();
    assert!(took < Duration::from_millis(300), "Subscription::drop took {took:?}");
}
