//! Refusals the broker makes on its own, for requests an honest client
//! never lets reach it, and what a refusal or a release leaves behind.
//!
//! - The client library checks subjects and patterns before it sends them,
//!   so only a peer speaking the protocol by hand ([`common::Raw`]) tests
//!   the broker's own checks. [`invalid_subjects_and_patterns_are_refused_by_the_broker`]
//!   sends every kind of invalid subject in a `Publish` and a `ChannelOpen`
//!   (both roles) and every kind of invalid pattern in a `Subscribe`, and
//!   expects an `OpError` with `InvalidSubject` for exactly that operation,
//!   a connection that goes on (a ping after each), nothing delivered,
//!   registered or created, and the legal extremes (32 tokens, 1024 bytes)
//!   accepted.
//! - With `--uid-ring-bytes` room for one ring and no more, a publisher
//!   opens and closes a channel five times
//!   ([`a_closed_channel_gives_back_its_ring_quota_and_fds`]); each open must be granted (a ring
//!   leaked by the close would take the room), and the broker's fds come
//!   back to where they were.

mod common;

use std::os::fd::OwnedFd;

use common::*;
use shmbus_proto::frame::{
    encode_frame, BrokerFrame, ChannelOpen, ChannelOverflow, ChannelRole, ErrorCode, FdAck, Op, Overflow,
    PayloadRef, Ping, Publish, Subscribe,
};
use shmbus_proto::limits::{MAX_SUBJECT_DEPTH, MAX_SUBJECT_LEN};

// ---------------------------------------------- subjects and patterns --

/// `n` tokens: `t0.t1.…`.
fn tokens(n: usize) -> String {
    (0..n).map(|i| format!("t{i}")).collect::<Vec<_>>().join(".")
}

/// One token of `len` bytes.
fn long(len: usize) -> String {
    "x".repeat(len)
}

/// The error text `shmbus_proto::subject` gives for each kind of refusal,
/// as the broker quotes it in the `OpError`.
const EMPTY: &str = "subject is empty";
const EMPTY_TOKEN: &str = "empty token";
const BAD_CHAR: &str = "whitespace or a control character";
const WILDCARD: &str = "wildcards ('*', '>') are only allowed in subscription patterns";
const PARTIAL: &str = "must be whole tokens";
const TAIL: &str = "'>' may only be the last token";
const DEEP: &str = "more than 32 tokens";
const LONG: &str = "longer than 1024 bytes";

/// Subjects no publish or channel may use, each with the reason expected.
fn bad_subjects() -> Vec<(String, &'static str)> {
    let mut v: Vec<(String, &'static str)> = vec![
        (String::new(), EMPTY),
        ("a..b".into(), EMPTY_TOKEN),
        (".a".into(), EMPTY_TOKEN),
        ("a.".into(), EMPTY_TOKEN),
        (".".into(), EMPTY_TOKEN),
        ("a b".into(), BAD_CHAR),
        ("a\tb".into(), BAD_CHAR),
        ("a.b\n".into(), BAD_CHAR),
        ("a\u{1}b".into(), BAD_CHAR),
        ("a\u{7f}".into(), BAD_CHAR),
        // Past the ASCII fast path: an em space and a C1 control.
        ("a\u{2003}b".into(), BAD_CHAR),
        ("caf\u{e9}.\u{85}".into(), BAD_CHAR),
        ("*".into(), WILDCARD),
        (">".into(), WILDCARD),
        ("a.*".into(), WILDCARD),
        ("a.>".into(), WILDCARD),
        ("a.>.b".into(), WILDCARD),
        ("a*".into(), WILDCARD),
        ("a.b>".into(), WILDCARD),
    ];
    v.push((tokens(MAX_SUBJECT_DEPTH + 1), DEEP));
    v.push((tokens(200), DEEP));
    v.push((long(MAX_SUBJECT_LEN + 1), LONG));
    v
}

/// Patterns no subscription may use, each with the reason expected.
fn bad_patterns() -> Vec<(String, &'static str)> {
    let mut v: Vec<(String, &'static str)> = vec![
        (String::new(), EMPTY),
        ("a..b".into(), EMPTY_TOKEN),
        (".a".into(), EMPTY_TOKEN),
        ("a.".into(), EMPTY_TOKEN),
        ("*..>".into(), EMPTY_TOKEN),
        ("a b".into(), BAD_CHAR),
        ("a.*\t".into(), BAD_CHAR),
        ("a\u{1}b".into(), BAD_CHAR),
        ("a\u{2003}b".into(), BAD_CHAR),
        (">.a".into(), TAIL),
        ("a.>.b".into(), TAIL),
        ("a.>.>".into(), TAIL),
        ("a*".into(), PARTIAL),
        ("*a".into(), PARTIAL),
        ("a.b>".into(), PARTIAL),
        (">>".into(), PARTIAL),
        ("**".into(), PARTIAL),
    ];
    v.push((tokens(MAX_SUBJECT_DEPTH + 1), DEEP));
    // A final `>` counts as a token.
    v.push((format!("{}.>", tokens(MAX_SUBJECT_DEPTH)), DEEP));
    v.push((vec!["*"; MAX_SUBJECT_DEPTH + 1].join("."), DEEP));
    v.push((long(MAX_SUBJECT_LEN + 1), LONG));
    v
}

/// What the broker answered, up to the pong that follows an operation.
#[derive(Debug)]
enum Answer {
    OpError {
        op: Op,
        code: ErrorCode,
        message: String,
    },
    /// Anything else (a grant, a subscription, a delivery), named.
    Other(String),
}

/// Sends `Ping { token }` on `r` and returns what came before the pong,
/// acknowledging any fds as an honest client would (so a grant that
/// should never have been made is reported, not tripped over). A goodbye
/// or the end of the stream fails the test: a refusal must not cost the
/// connection.
fn answers_before_pong(r: &mut Raw, token: u64, what: &str) -> Vec<Answer> {
    r.send_body(&Ping { token }, &[]);
    let mut out = Vec::new();
    loop {
        let pkt = r.next_packet();
        let fds: Vec<OwnedFd> = pkt.fds;
        let answer = match decode(&pkt.data) {
            Decoded::Pong(t) if t == token => return out,
            Decoded::Eof => panic!("{what}: the broker closed the connection instead of refusing"),
            Decoded::Goodbye(reason) => panic!("{what}: disconnected instead of refused: {reason}"),
            Decoded::Answer(a) => a,
            Decoded::Pong(t) => Answer::Other(format!("a pong for token {t}")),
        };
        if !fds.is_empty() {
            r.send_body(&FdAck { fds: fds.len() as u32 }, &[]);
        }
        out.push(answer);
    }
}

enum Decoded {
    Pong(u64),
    Goodbye(String),
    Eof,
    Answer(Answer),
}

fn decode(data: &[u8]) -> Decoded {
    if data.is_empty() {
        return Decoded::Eof;
    }
    match shmbus_proto::frame::decode_broker(data).expect("the broker sends valid frames") {
        BrokerFrame::Pong(p) => Decoded::Pong(p.token),
        BrokerFrame::Goodbye(g) => Decoded::Goodbye(format!("{:?}: {}", g.code, g.reason)),
        BrokerFrame::OpError(e) => {
            Decoded::Answer(Answer::OpError { op: e.op, code: e.code, message: e.message.to_owned() })
        }
        other => Decoded::Answer(Answer::Other(format!("{other:?}"))),
    }
}

/// The answers must be exactly one `InvalidSubject` refusal of `op`, whose
/// message gives `reason`; if not, what went wrong is added to `failures`.
fn expect_invalid(answers: Vec<Answer>, op: Op, reason: &str, what: &str, failures: &mut Vec<String>) {
    match &answers[..] {
        [Answer::OpError { op: got, code: ErrorCode::InvalidSubject, message }] if *got == op => {
            if !message.contains(reason) {
                failures.push(format!("{what}: the refusal {message:?} does not say {reason:?}"));
            }
        }
        _ => failures.push(format!(
            "{what}: expected one InvalidSubject refusal of {op:?}, the broker answered {answers:?}"
        )),
    }
}

/// Fails the test with every entry of `failures`, if there is one.
fn assert_none(failures: &[String], section: &str) {
    assert!(
        failures.is_empty(),
        "{section}: {} of the invalid requests were not refused as they must be:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn show(s: &str) -> String {
    let mut shown = format!("{s:?}");
    if shown.len() > 60 {
        shown.truncate(40);
        shown.push_str(&format!("… ({} bytes)", s.len()));
    }
    shown
}

const RING: ChannelRole =
    ChannelRole::Publish { slot_size: 64, slot_count: 16, overflow: ChannelOverflow::Overwrite };

/// The broker checks every subject and pattern itself: an invalid one is
/// refused with `InvalidSubject` for that operation only, whoever sent it.
/// (If the broker left this to the client, a hand-written peer could
/// publish to `a.*`, reaching every `>` subscriber, subscribe past the
/// router's depth bound, or open a channel no one may name.)
#[test]
fn invalid_subjects_and_patterns_are_refused_by_the_broker() {
    let b = Broker::start("refuse-subjects");
    // Sees every valid subject: whatever an invalid publish reached would
    // arrive here before the marker sent last.
    let watcher = b.client_named("watcher");
    let everything = watcher.subscribe(">").unwrap();
    wait_subscribers(&watcher, ">", 1);

    let mut r = Raw::hello(&b);
    let mut token = 0u64;
    let mut ping = |r: &mut Raw, what: &str| {
        token += 1;
        answers_before_pong(r, token, what)
    };

    // Publish: each refused publish still takes its number, as the client
    // counts it.
    let mut failures = Vec::new();
    for (seq, (subject, reason)) in (1u64..).zip(bad_subjects()) {
        let what = format!("Publish to {}", show(&subject));
        r.send(
            &encode_frame(&Publish { topic: &subject, origin: None, payload: PayloadRef::Inline }, b"x")
                .unwrap(),
            &[],
        );
        expect_invalid(ping(&mut r, &what), Op::Publish { seq }, reason, &what, &mut failures);
    }
    assert_none(&failures, "Publish");

    // Subscribe.
    for (sub_id, (pattern, reason)) in (1u32..).zip(bad_patterns()) {
        let what = format!("Subscribe to {}", show(&pattern));
        r.send_body(&Subscribe { sub_id, pattern: &pattern, overflow: Overflow::Gap }, &[]);
        expect_invalid(ping(&mut r, &what), Op::Subscribe { sub_id }, reason, &what, &mut failures);
    }
    assert_none(&failures, "Subscribe");

    // ChannelOpen, as a publisher and as a reader. (Checking the subject
    // is the first thing: a reader on a channel that does not exist would
    // otherwise hear NoSuchChannel.)
    for (req_id, (subject, reason)) in (1u32..).zip(bad_subjects()) {
        for (role, req_id) in [(RING, req_id), (ChannelRole::Subscribe, 1000 + req_id)] {
            let what = format!("ChannelOpen ({role:?}) on {}", show(&subject));
            r.send_body(&ChannelOpen { req_id, topic: &subject, role }, &[]);
            expect_invalid(ping(&mut r, &what), Op::ChannelOpen { req_id }, reason, &what, &mut failures);
        }
    }
    assert_none(&failures, "ChannelOpen");

    // The legal extremes pass: 32 tokens, 1024 bytes, a `>` as 32nd token.
    let deepest = tokens(MAX_SUBJECT_DEPTH);
    let longest =
        format!("{}.{}", long(MAX_SUBJECT_LEN / 2), long(MAX_SUBJECT_LEN - MAX_SUBJECT_LEN / 2 - 1));
    assert_eq!(longest.len(), MAX_SUBJECT_LEN);
    for subject in [&deepest, &longest] {
        let what = format!("Publish to {}", show(subject));
        r.send(
            &encode_frame(&Publish { topic: subject, origin: None, payload: PayloadRef::Inline }, b"ok")
                .unwrap(),
            &[],
        );
        let answers = ping(&mut r, &what);
        assert!(answers.is_empty(), "{what} is legal: {answers:?}");
    }
    let good_patterns =
        [format!("{}.>", tokens(MAX_SUBJECT_DEPTH - 1)), vec!["*"; MAX_SUBJECT_DEPTH].join(".")];
    for (sub_id, pattern) in (500u32..).zip(&good_patterns) {
        let what = format!("Subscribe to {}", show(pattern));
        r.send_body(&Subscribe { sub_id, pattern, overflow: Overflow::Gap }, &[]);
        let answers = ping(&mut r, &what);
        assert!(
            matches!(&answers[..], [Answer::Other(s)] if s.starts_with("Subscribed")),
            "{what} is legal: {answers:?}"
        );
    }

    // The connection is still served, and nothing invalid got through:
    // the watcher's first messages are the legal ones, then the marker.
    r.send(
        &encode_frame(&Publish { topic: "refusals.end", origin: None, payload: PayloadRef::Inline }, b"end")
            .unwrap(),
        &[],
    );
    for topic in [deepest.as_str(), longest.as_str(), "refusals.end"] {
        let m = next_message(&everything);
        assert_eq!(m.topic(), topic, "delivered before the marker");
    }
    let mut patterns: Vec<String> = watcher.topics().unwrap().into_iter().map(|t| t.pattern).collect();
    patterns.sort();
    let mut expected = vec![">".to_owned()];
    expected.extend(good_patterns.iter().cloned());
    expected.sort();
    assert_eq!(patterns, expected, "only the legal patterns are registered");
    assert_eq!(watcher.channels().unwrap(), Vec::new(), "no channel was created");
    let stats = watcher.stats().unwrap();
    assert_eq!(stats.msgs_in, 3, "only accepted publishes count: {stats:?}");
    assert_eq!(stats.protocol_errors, 0, "{stats:?}");
    watcher.ping().unwrap();
}

// ------------------------------------------------------------ channels --

/// A ring channel's memory is charged to its publisher's uid until the
/// channel closes. With `--uid-ring-bytes` room for one ring of this
/// geometry and not two, a publisher that opens and closes a channel five
/// times is granted each one only if every close gave the ring back; the
/// broker's fds (the ring and signal memfds it keeps) come back to their
/// baseline too.
#[test]
fn a_closed_channel_gives_back_its_ring_quota_and_fds() {
    // 16 slots of 4 KiB: a ring of 64 KiB and some headers, plus the
    // signal page. 100,000 bytes hold one, never two (the test checks).
    let config =
        shmbus::ChannelConfig { slot_size: 4096, slot_count: 16, overflow: ChannelOverflow::Overwrite };
    let b = Broker::start_with("ring-release", &["--uid-ring-bytes", "100000"]);
    let c = b.client();
    let baseline = b.baseline_fds();

    // The premise: while one ring is open, a second does not fit.
    let first = c.channel_publisher("leak.a", config).expect("one ring fits");
    let Err(err) = c.channel_publisher("leak.b", config) else { panic!("a second ring must not fit") };
    assert!(err.to_string().contains("uid-ring-bytes"), "refused for another reason: {err}");
    drop(first);

    for round in 1..=5 {
        // Alternate the topic: a channel forgotten by topic but not by id
        // (or the other way round) fails one or the other.
        let topic = if round % 2 == 0 { "leak.a" } else { "leak.b" };
        let mut p = c
            .channel_publisher(topic, config)
            .unwrap_or_else(|e| panic!("round {round}: the closed channels' rings were not given back: {e}"));
        p.publish(b"x").unwrap();
        let channels = c.channels().unwrap();
        assert_eq!(
            channels.iter().map(|ch| ch.topic.as_str()).collect::<Vec<_>>(),
            [topic],
            "round {round}: only the open channel is listed"
        );
        drop(p);
    }
    assert_eq!(c.channels().unwrap(), Vec::new(), "every channel closed");
    b.wait_fd_count(baseline);
    c.ping().unwrap();
}
