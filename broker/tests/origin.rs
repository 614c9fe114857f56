//! Origins: where a message or a call comes from, as its sender claims it
//! (a bridge names the remote host and sender). The broker checks the form
//! and passes it on unchanged; `sender` stays the broker's own word.

mod common;

use std::time::Duration;

use common::*;
use shmbus::{CallError, ErrorKind, PublishError};
use shmbus_proto::frame::{
    encode_frame, BrokerFrame, ErrorCode, Op, Outcome, PayloadRef, Ping, Publish, Request, Subscribe,
};

#[test]
fn an_origin_reaches_subscribers_beside_the_brokers_sender() {
    let b = Broker::start("origin-pub");
    let sub_client = b.client();
    let sub = sub_client.subscribe("o.>").unwrap();
    let publisher = b.client();
    publisher.publish_with_origin("o.small", "21.5", "nats:host1 uid=1000 pid=7").unwrap();
    publisher.publish("o.plain", "x").unwrap();
    // Above the memfd threshold: the origin rides with the memfd too.
    let big = vec![7u8; 512 * 1024];
    publisher.publish_with_origin("o.big", &big, "nats:host2").unwrap();

    let m = next_message(&sub);
    assert_eq!(
        (m.topic(), m.payload(), m.origin()),
        ("o.small", &b"21.5"[..], Some("nats:host1 uid=1000 pid=7"))
    );
    assert_eq!(m.sender().client_id, publisher.id(), "the sender is still the broker's word");
    let m = next_message(&sub);
    assert_eq!((m.topic(), m.origin()), ("o.plain", None));
    let m = next_message(&sub);
    assert!(m.is_memfd());
    assert_eq!((m.topic(), m.payload(), m.origin()), ("o.big", &big[..], Some("nats:host2")));
}

#[test]
fn a_service_reads_the_callers_origin() {
    let b = Broker::start("origin-call");
    let owner = b.client();
    let service = owner.serve("svc.origin").unwrap();
    let caller = b.client();
    let worker = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let r = service.recv_timeout(PATIENCE).unwrap().expect("a request within the patience");
            seen.push(r.origin().map(str::to_owned));
            let answer = r.origin().unwrap_or("none").to_owned();
            r.reply(answer.as_bytes()).unwrap();
        }
        seen
    });
    let t = Duration::from_secs(10);
    let reply = caller.request_with_origin("svc.origin", "hi", t, "nats:host1 caller=9").unwrap();
    assert_eq!(reply.payload(), b"nats:host1 caller=9");
    let reply = caller.request("svc.origin", "hi", t).unwrap();
    assert_eq!(reply.payload(), b"none");
    assert_eq!(worker.join().unwrap(), [Some("nats:host1 caller=9".to_owned()), None]);
}

#[test]
fn the_client_refuses_a_bad_origin_before_sending() {
    let b = Broker::start("origin-local");
    let c = b.client();
    for bad in ["", "two\nlines", &"a".repeat(257)] {
        let e = c.publish_with_origin("o.x", "p", bad).unwrap_err();
        assert!(matches!(e, PublishError::InvalidOrigin(_)), "{bad:?}: {e}");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        let e = c.request_with_origin("svc.x", "p", Duration::from_secs(1), bad).unwrap_err();
        assert!(matches!(e, CallError::InvalidOrigin(_)), "{bad:?}: {e}");
    }
}

/// A peer that skips the library's check: the broker refuses the publish
/// (numbered, with a reason) and the call, delivers nothing, and keeps the
/// connection.
#[test]
fn the_broker_refuses_a_bad_origin_and_keeps_the_connection() {
    let b = Broker::start("origin-raw");
    let watcher = b.client();
    let all = watcher.subscribe("o.>").unwrap();
    let mut r = Raw::hello(&b);
    r.send_body(&Subscribe { sub_id: 1, pattern: "o.>", overflow: Default::default() }, &[]);
    let long = "a".repeat(257);
    for origin in ["evil\u{1b}[31m", long.as_str(), ""] {
        let p = Publish { topic: "o.bad", origin: Some(origin), payload: PayloadRef::Inline };
        r.send(&encode_frame(&p, b"x").unwrap(), &[]);
    }
    let good = Publish { topic: "o.good", origin: Some("nats:h"), payload: PayloadRef::Inline };
    r.send(&encode_frame(&good, b"ok").unwrap(), &[]);
    let call = Request {
        call_id: 5,
        name: "svc.none",
        timeout_ms: 1000,
        no_reply: false,
        origin: Some("bad\u{7}"),
        payload: PayloadRef::Inline,
    };
    r.send(&encode_frame(&call, b"").unwrap(), &[]);
    r.send_body(&Ping { token: 77 }, &[]);

    let mut refused = Vec::new();
    let mut delivered = Vec::new();
    let mut answer = None;
    loop {
        match r.recv() {
            Some(BrokerFrame::OpError(e)) => {
                assert_eq!(e.code, ErrorCode::InvalidOrigin, "{}", e.message);
                assert!(e.message.contains("o.bad"), "the refusal names the subject: {}", e.message);
                refused.push(e.op);
            }
            Some(BrokerFrame::Deliver(d, payload)) => {
                delivered.push((d.topic.to_owned(), d.origin.map(str::to_owned), payload.to_vec()))
            }
            Some(BrokerFrame::Answer(a, _)) => {
                assert_eq!(a.call_id, 5);
                match a.outcome {
                    Outcome::Invalid { message } => answer = Some(message.to_owned()),
                    other => panic!("a call with a bad origin answered {other:?}"),
                }
            }
            Some(BrokerFrame::Pong(p)) if p.token == 77 => break,
            Some(BrokerFrame::Subscribed(_)) => {}
            Some(BrokerFrame::Goodbye(g)) => panic!("disconnected ({:?}): {}", g.code, g.reason),
            None => panic!("disconnected without a goodbye"),
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    let want: Vec<Op> = (1..=3).map(|seq| Op::Publish { seq }).collect();
    assert_eq!(refused, want);
    assert_eq!(delivered, [("o.good".to_owned(), Some("nats:h".to_owned()), b"ok".to_vec())]);
    assert!(answer.is_some_and(|m| m.contains("origin")), "the call is refused for its origin");
    // The bystander got the good one only.
    let m = next_message(&all);
    assert_eq!((m.topic(), m.origin()), ("o.good", Some("nats:h")));
    assert!(all.recv_timeout(Duration::from_millis(200)).unwrap().is_none());
}
