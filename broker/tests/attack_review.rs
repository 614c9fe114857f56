//! Frames whose parts are each within the protocol's limits, but whose
//! answer, built by the broker around them, would not be: found by a
//! review as a hostile local user, each once a defect.
//!
//! - A service (a raw peer: the Rust library cuts its error messages to
//!   `MAX_ERROR_MESSAGE`, the protocol did not) replies
//!   `ReplyStatus::Error` with a message that fills one packet. The
//!   `Answer` carrying it is a few bytes larger (it adds the responder's
//!   `Sender`): the broker could not encode it, had consumed the reply
//!   slot, and sent nothing, not even the caller's `Timeout`. Now the
//!   reply is refused (`OpError` to the service) and the caller answered
//!   `Invalid`, its one answer.
//! - The same with an inline payload beside the message: the `Answer`'s
//!   head still encoded, and the caller was sent a packet larger than
//!   `MAX_PACKET`, received cut (`MSG_TRUNC`): the Rust client ended its
//!   connection as a protocol violation by the broker, so a service could
//!   cut off any of its callers.
//! - A peer sends an invalid subject or name of 15,000 control
//!   characters (a 15 KB packet): the refusal quoted it with `{:?}`, six
//!   bytes each, no longer encoded and was never sent. Refusals now quote
//!   at most `MAX_QUOTED_CHARS` characters (`text::quote`), and every
//!   message the broker writes is cut to `MAX_ERROR_MESSAGE`.
//! - The same refusal, seen by a monitor: its `Error` event, larger than a
//!   packet, was neither delivered nor counted in a `Gap`. A frame that
//!   cannot be made is now a counted gap, and monitor events are bounded.
//!
//! Every wait is bounded; the broker is killed on drop.

mod common;

use std::time::{Duration, Instant};

use common::*;
use shmbus_proto::frame::{
    encode_frame, encode_head, BrokerFrame, Monitor, MonitorEvent, MonitorKind, NameFlags, NameRequest,
    NameResult, Overflow, PayloadRef, Ping, Publish, Reply, ReplyStatus, Request, Subscribe,
};
use shmbus_proto::limits::MAX_PACKET;

/// The request timeout the caller asks for: any answer, `Timeout`
/// included, is due by then.
const CALL_TIMEOUT_MS: u32 = 1000;
/// Slack beyond the call's timeout for the answer to arrive.
const SLACK: Duration = Duration::from_secs(5);

/// A raw service owning `name`, and a raw caller.
fn service_and_caller(b: &Broker, name: &str) -> (Raw, Raw) {
    let (mut svc, _) = Raw::hello_named(b, "review-service");
    svc.send_body(&NameRequest { req_id: 1, name, flags: NameFlags::default() }, &[]);
    match svc.recv() {
        Some(BrokerFrame::NameReply(r)) => assert_eq!((r.req_id, r.result), (1, NameResult::PrimaryOwner)),
        other => panic!("expected the name, got {other:?}"),
    }
    let (caller, _) = Raw::hello_named(b, "review-caller");
    (svc, caller)
}

/// Sends a request for `name` and returns the serial the service got.
fn call(svc: &mut Raw, caller: &Raw, name: &str, call_id: u64) -> u64 {
    let req = Request {
        call_id,
        name,
        timeout_ms: CALL_TIMEOUT_MS,
        no_reply: false,
        origin: None,
        payload: PayloadRef::Inline,
    };
    caller.send_body(&req, &[]);
    match svc.recv() {
        Some(BrokerFrame::Serve(s, _)) => s.serial,
        other => panic!("expected the request, got {other:?}"),
    }
}

/// A `Reply` with an error message of the length that makes the whole
/// frame (with `payload` inline) exactly `MAX_PACKET` bytes.
fn reply_filling_a_packet(serial: u64, payload: &[u8]) -> Vec<u8> {
    let frame = |message: &str| {
        let r =
            Reply { serial, status: ReplyStatus::Error { code: 7, message }, payload: PayloadRef::Inline };
        encode_frame(&r, payload).map(|f| f.len())
    };
    // Past 16 KiB the message's length prefix is three bytes whatever
    // its exact length: the frame grows one byte per byte of message.
    let probe = "m".repeat(16_500);
    let base = frame(&probe).unwrap();
    let len = 16_500 + MAX_PACKET - base;
    let message = "m".repeat(len);
    let r = Reply {
        serial,
        status: ReplyStatus::Error { code: 7, message: &message },
        payload: PayloadRef::Inline,
    };
    let bytes = encode_frame(&r, payload).unwrap();
    assert_eq!(bytes.len(), MAX_PACKET, "the reply fills one packet, no more");
    bytes
}

/// What the caller got for `call_id`, waiting at most `limit`.
enum Got {
    Answer,
    /// A packet the caller's buffer (`MAX_PACKET` bytes) could not hold.
    Oversized,
    Nothing,
}

fn answer_for(caller: &mut Raw, call_id: u64, limit: Duration) -> Got {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(pkt) = caller.recv_packet(left) else { return Got::Nothing };
        if pkt.status.truncated {
            return Got::Oversized;
        }
        match pkt.frame() {
            Some(BrokerFrame::Answer(a, _)) if a.call_id == call_id => {
                return Got::Answer;
            }
            Some(_) => continue,
            None => panic!("the broker closed the caller's connection"),
        }
    }
}

#[test]
fn a_service_error_message_that_fills_a_packet_still_gets_the_caller_one_answer() {
    let b = Broker::start("review-long-apperror");
    let (mut svc, mut caller) = service_and_caller(&b, "svc.long");
    let serial = call(&mut svc, &caller, "svc.long", 41);
    // A legal packet: the broker reads it whole.
    svc.send(&reply_filling_a_packet(serial, &[]), &[]);
    // The service is not told its reply was lost either: a ping comes
    // back with nothing before it.
    // The service is told its reply was refused, before the pong.
    let told = before_pong_sent(&mut svc, 5);
    assert!(
        told.iter().any(|s| s.starts_with("OpError") && s.contains("Reply")),
        "the service was not told its reply was refused: {told:?}"
    );
    let limit = Duration::from_millis(u64::from(CALL_TIMEOUT_MS)) + SLACK;
    match answer_for(&mut caller, 41, limit) {
        Got::Answer => {}
        Got::Oversized => panic!("the caller was sent a packet larger than MAX_PACKET"),
        Got::Nothing => panic!(
            "the caller got no Answer at all within {limit:?} (its request's timeout is {CALL_TIMEOUT_MS} ms): \
             the reply slot was consumed and the Answer, a few bytes larger than the reply, was never \
             encoded (service.rs, Bus::answer: `let Ok(head) = encode_head(&answer) else {{ return }}`)"
        ),
    }
    // The broker lives.
    caller.send_body(&Ping { token: 6 }, &[]);
    assert!(matches!(answer_or_pong(&mut caller, 6), Some(6)), "the broker still answers");
}

#[test]
fn a_reply_that_fills_a_packet_is_never_forwarded_in_a_larger_one() {
    let b = Broker::start("review-long-reply");
    let (mut svc, mut caller) = service_and_caller(&b, "svc.big");
    let serial = call(&mut svc, &caller, "svc.big", 42);
    svc.send(&reply_filling_a_packet(serial, &vec![0x5a; 50_000]), &[]);
    let limit = Duration::from_millis(u64::from(CALL_TIMEOUT_MS)) + SLACK;
    match answer_for(&mut caller, 42, limit) {
        Got::Answer => {}
        Got::Oversized => panic!(
            "the broker sent the caller a packet larger than MAX_PACKET ({MAX_PACKET} bytes): the caller \
             received it cut (MSG_TRUNC) and its one answer is lost"
        ),
        Got::Nothing => panic!("the caller got no Answer at all within {limit:?}"),
    }
}

/// Pings with `token` and returns the token of the first pong (skipping
/// other frames), `None` if nothing came.
fn answer_or_pong(r: &mut Raw, token: u64) -> Option<u64> {
    let deadline = Instant::now() + SLACK;
    loop {
        let pkt = r.recv_packet(deadline.saturating_duration_since(Instant::now()))?;
        if let Some(BrokerFrame::Pong(p)) = pkt.frame() {
            if p.token == token {
                return Some(token);
            }
        }
    }
}

/// Sends `frame`, then a ping; returns a description of every frame that
/// came before the pong.
fn before_pong(r: &mut Raw, frame: &[u8], token: u64) -> Vec<String> {
    r.send(frame, &[]);
    before_pong_sent(r, token)
}

/// Sends a ping; returns a description of every frame that came before
/// the pong.
fn before_pong_sent(r: &mut Raw, token: u64) -> Vec<String> {
    r.send_body(&Ping { token }, &[]);
    let mut seen = Vec::new();
    let deadline = Instant::now() + SLACK;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let pkt = r.recv_packet(left).expect("the broker went silent");
        assert!(!pkt.status.truncated, "a packet larger than MAX_PACKET");
        match pkt.frame() {
            Some(BrokerFrame::Pong(p)) if p.token == token => return seen,
            Some(f) => seen.push(format!("{f:?}").chars().take(60).collect()),
            None => panic!("the broker closed the connection"),
        }
    }
}

#[test]
fn an_invalid_subject_of_control_characters_is_still_refused_with_a_word() {
    let b = Broker::start("review-escaped-refusals");
    let (mut r, _) = Raw::hello_named(&b, "review-bad-subjects");
    // 15,000 bytes, a quarter of a packet; `{:?}` makes each `\u{1}`.
    let bad = "\u{1}".repeat(15_000);
    let mut silent = Vec::new();

    let publish = encode_head(&Publish { topic: &bad, origin: None, payload: PayloadRef::Inline }).unwrap();
    let seen = before_pong(&mut r, &publish, 1);
    if !seen.iter().any(|s| s.contains("OpError")) {
        silent.push(format!("Publish: {seen:?}"));
    }

    let subscribe = encode_head(&Subscribe { sub_id: 9, pattern: &bad, overflow: Overflow::Gap }).unwrap();
    let seen = before_pong(&mut r, &subscribe, 2);
    if !seen.iter().any(|s| s.contains("OpError")) {
        silent.push(format!("Subscribe: {seen:?}"));
    }

    let name = encode_head(&NameRequest { req_id: 3, name: &bad, flags: NameFlags::default() }).unwrap();
    let seen = before_pong(&mut r, &name, 3);
    if !seen.iter().any(|s| s.contains("OpError")) {
        silent.push(format!("NameRequest: {seen:?}"));
    }

    let request = encode_head(&Request {
        call_id: 77,
        name: &bad,
        timeout_ms: CALL_TIMEOUT_MS,
        no_reply: false,
        origin: None,
        payload: PayloadRef::Inline,
    })
    .unwrap();
    let seen = before_pong(&mut r, &request, 4);
    if !seen.iter().any(|s| s.contains("Answer")) {
        silent.push(format!("Request (no Answer before the pong): {seen:?}"));
        // Nor later, even past the request's timeout.
        let limit = Duration::from_millis(u64::from(CALL_TIMEOUT_MS)) + SLACK;
        if let Got::Nothing = answer_for(&mut r, 77, limit) {
            silent.push(format!("Request: still no Answer {limit:?} later"));
        }
    }
    assert!(
        silent.is_empty(),
        "refused without a word (the refusal quoting the input with {{:?}} is larger than a packet and \
         is dropped where it is encoded, mod.rs Bus::control / service.rs Bus::answer):\n{}",
        silent.join("\n")
    );
}

#[test]
fn a_hostile_service_cannot_disconnect_a_library_caller() {
    let b = Broker::start("review-kill-caller");
    let (mut svc, _) = Raw::hello_named(&b, "review-service");
    svc.send_body(&NameRequest { req_id: 1, name: "svc.evil", flags: NameFlags::default() }, &[]);
    match svc.recv() {
        Some(BrokerFrame::NameReply(r)) => assert_eq!(r.result, NameResult::PrimaryOwner),
        other => panic!("expected the name, got {other:?}"),
    }
    let caller = b.client();
    let id = caller.id();
    let timeout = Duration::from_millis(u64::from(CALL_TIMEOUT_MS));
    let mut call = caller.request_async("svc.evil", b"q", timeout).unwrap();
    let serial = match svc.recv() {
        Some(BrokerFrame::Serve(s, _)) => s.serial,
        other => panic!("expected the request, got {other:?}"),
    };
    svc.send(&reply_filling_a_packet(serial, &vec![0x5a; 50_000]), &[]);
    let outcome = call.wait_timeout(timeout + SLACK);
    let outcome = format!("{outcome:?}");
    // Whatever the call's outcome, the caller's connection must not have
    // been ended by what another peer sent.
    let alive = caller.ping();
    assert!(
        alive.is_ok() && caller.id() == id,
        "the caller's connection was ended by a service's reply (the broker forwarded it in an Answer \
         larger than MAX_PACKET): ping {alive:?}; its call ended {outcome}"
    );
}

#[test]
fn a_monitor_event_larger_than_a_packet_is_a_counted_gap_not_a_silent_hole() {
    // The test runs as root, which may monitor without a policy file.
    let b = Broker::start("review-monitor-hole");
    let (mut mon, _) = Raw::hello_named(&b, "review-monitor");
    mon.send_body(&Monitor { sub_id: 1, patterns: Vec::new(), full: false }, &[]);
    match mon.recv() {
        Some(BrokerFrame::Subscribed(s)) => assert_eq!(s.sub_id, 1),
        other => panic!("expected the monitor, got {other:?}"),
    }
    let (peer, _) = Raw::hello_named(&b, "review-bad-publisher");
    // Refused; its refusal is an `Error` event whose detail quotes the
    // subject escaped twice (`{:?}`, then `text::escape`): 105 KB.
    let bad = "\u{1}".repeat(15_000);
    peer.send_body(&Publish { topic: &bad, origin: None, payload: PayloadRef::Inline }, &[]);
    peer.send_body(&Publish { topic: "review.after", origin: None, payload: PayloadRef::Inline }, &[]);
    let mut seen = Vec::new();
    let deadline = Instant::now() + SLACK;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let pkt = mon.recv_packet(left).expect("the monitor never saw the publish that followed");
        match pkt.frame() {
            Some(BrokerFrame::Deliver(d, payload)) => {
                let e = MonitorEvent::from_bytes(payload).expect("a monitor event");
                if e.kind == MonitorKind::Publish && d.topic == "review.after" {
                    break;
                }
                seen.push(format!("{:?}", e.kind));
            }
            Some(BrokerFrame::Gap(g)) => seen.push(format!("Gap {}", g.missed)),
            Some(_) => {}
            None => panic!("the broker closed the monitor"),
        }
    }
    assert!(
        seen.iter().any(|s| s == "Error" || s.starts_with("Gap")),
        "the refusal's event was neither delivered nor counted in a Gap (Bus::deliver returns when the \
         event's frame cannot be made, monitor.rs / publish.rs); the monitor saw only {seen:?}"
    );
}
