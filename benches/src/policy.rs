//! `policy`: what a publish costs with 1,000 policy rules loaded against
//! none, on the broker's core in-process (no sockets, no other process).
//!
//! Each row times one publish through `Bus`: a 16 B `Publish` frame
//! received from a publisher, routed to the one subscription (`bench.>`)
//! of one subscriber, and the subscriber's frame drained from its queue
//! (`sendable` + `sent`, as the daemon does after a write), so no queue
//! ever fills. Both peers connect as uid 5000, neither root nor the
//! broker's uid: privileged peers never consult the rules.
//! - `publish_no_policy`: no policy file (the floor).
//! - `publish_1000_rules`: 1,000 rules, each about everyone
//!   (`match = {}`). The entry that allows the subject is in the first
//!   rule, the lowest precedence; each of the 999 later rules allows or
//!   denies `publish other.<i>.>`, so a decision made by trying entries in
//!   turn would try all 999 before the one that decides (the rules keep
//!   each action's patterns in the router's trie instead, `bus/rules.rs`,
//!   so a decision costs one lookup). The same subject every time:
//!   after the first publish the verdict comes from the publisher's
//!   per-subject table (`bus/access.rs`), a hash lookup.
//! - `publish_1000_rules_cold`: the same rules, a new subject every
//!   publish (`bench.s.<n>`), so every publish misses that table and asks
//!   the rules (the trie lookup). The table starts over when its keys reach their byte
//!   bound; that cost lands in a sample now and then, above the p50.
//!
//! The subject is a fixed-width counter rewritten in place in one encoded
//! frame before every publish, in every path (to the same value in the
//! first two), so the paths differ in the policy alone. Timed as `router`
//! times its fast calls: in batches (each sample a batch's mean), p50/p99
//! over the samples; `ratio_to_floor` is p50 over the floor's p50.

use std::hint::black_box;
use std::time::Instant;

use shmbus_broker::bus::rules::{Accounts, Rules};
use shmbus_broker::bus::{Bus, BusConfig, Id};
use shmbus_proto::frame::{
    decode_broker, encode_frame, encode_head, BrokerFrame, Hello, Overflow, PayloadRef, Publish, Subscribe,
    PROTOCOL_VERSION,
};
use shmbus_proto::sys::socket::PeerCred;

use crate::router::per_call;
use crate::{Report, Row};

/// Both peers' uid: not root, not the broker's, so the rules are asked.
const PEER_UID: u32 = 5000;
const BROKER_UID: u32 = 4242;
const _: () = assert!(PEER_UID != 0 && PEER_UID != BROKER_UID, "a privileged peer never asks the rules");
const RULES: usize = 1_000;
const SIZE: usize = 16;
/// Width of the subject's counter: `bench.s.000000000`.
const DIGITS: usize = 9;
const BUDGET_MS: u64 = 1_500;

/// The policy file: rule 1 allows connecting and everything under
/// `bench`; rules 2..=1000 each allow (even) or deny (odd) publishing
/// under `other.<i>`, which no benchmark subject matches.
fn rules_text() -> String {
    let mut text = String::from(
        "[[rule]]\nmatch = {}\nallow = [\"connect\", \"subscribe bench.>\", \"publish bench.>\"]\n",
    );
    for i in 1..RULES {
        let list = if i % 2 == 0 { "allow" } else { "deny" };
        text.push_str(&format!("\n[[rule]]\nmatch = {{}}\n{list} = [\"publish other.{i}.>\"]\n"));
    }
    text
}

/// Writes `n` as zero-padded decimal over `digits`.
fn stamp(digits: &mut [u8], mut n: u64) {
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// One bus with a publisher and a subscriber to `bench.>`, and the
/// publisher's encoded frame.
struct Rig {
    bus: Bus,
    now: Instant,
    publisher: Id,
    subscriber: Id,
    frame: Vec<u8>,
    /// Where the subject's counter sits in `frame`.
    at: usize,
    n: u64,
    published: u64,
}

impl Rig {
    fn new(rules: Option<Rules>) -> Rig {
        let mut cfg = BusConfig::new("@shmbus-bench-policy".into(), BROKER_UID);
        // Without a policy file, admission goes by uid: admit the peers'.
        cfg.policy.allow_all();
        cfg.rules = rules;
        let now = Instant::now();
        let bus = Bus::new(cfg, now);
        let subject = format!("bench.s.{}", "0".repeat(DIGITS));
        let frame = encode_frame(
            &Publish { topic: &subject, origin: None, payload: PayloadRef::Inline },
            &[0xa5; SIZE],
        )
        .expect("encode publish");
        let at =
            frame.windows(subject.len()).position(|w| w == subject.as_bytes()).expect("subject in frame")
                + subject.len()
                - DIGITS;
        let mut rig = Rig { bus, now, publisher: 0, subscriber: 0, frame, at, n: 0, published: 0 };
        rig.publisher = rig.join("bench-pub");
        rig.subscriber = rig.join("bench-sub");
        let sub = encode_head(&Subscribe { sub_id: 1, pattern: "bench.>", overflow: Overflow::Gap }).unwrap();
        rig.bus.receive(rig.subscriber, &sub, Vec::new(), now);
        let kinds = rig.drain(rig.subscriber);
        assert!(matches!(kinds.as_slice(), [k] if k.starts_with("Subscribed")), "subscribe: {kinds:?}");
        // One publish, checked frame by frame: it reaches the subscriber
        // and the publisher hears nothing back (no refusal).
        rig.bus.receive(rig.publisher, &rig.frame, Vec::new(), now);
        rig.published += 1;
        let kinds = rig.drain(rig.subscriber);
        assert!(matches!(kinds.as_slice(), [k] if k.starts_with("Deliver")), "delivery: {kinds:?}");
        assert!(rig.drain(rig.publisher).is_empty(), "the publish was refused");
        rig
    }

    fn join(&mut self, name: &str) -> Id {
        let cred = PeerCred { pid: 1, uid: PEER_UID, gid: PEER_UID };
        let id = self.bus.connect(cred, Vec::new(), "bench".into(), self.now).expect("admitted");
        let hello = encode_head(&Hello { version: PROTOCOL_VERSION.into(), name }).unwrap();
        self.bus.receive(id, &hello, Vec::new(), self.now);
        let kinds = self.drain(id);
        assert!(matches!(kinds.as_slice(), [k] if k.starts_with("Welcome")), "hello: {kinds:?}");
        id
    }

    /// Sends everything queued for `id`; the kinds of the frames.
    fn drain(&mut self, id: Id) -> Vec<String> {
        let mut kinds = Vec::new();
        loop {
            let frames = self.bus.sendable(id, 64);
            if frames.is_empty() {
                break;
            }
            let n = frames.len();
            for f in &frames {
                let mut bytes = f.head.clone();
                bytes.extend_from_slice(f.payload.as_deref().unwrap_or(&[]));
                let kind = match decode_broker(&bytes) {
                    Ok(BrokerFrame::Deliver(..)) => "Deliver".to_string(),
                    Ok(other) => format!("{other:?}"),
                    Err(e) => format!("undecodable: {e}"),
                };
                kinds.push(kind);
            }
            self.bus.sent(id, n, self.now);
        }
        self.bus.take_effects();
        kinds
    }

    /// One publish, on a new subject if `fresh`, routed and drained.
    fn publish(&mut self, fresh: bool) {
        if fresh {
            self.n += 1;
        }
        stamp(&mut self.frame[self.at..self.at + DIGITS], self.n);
        self.bus.receive(self.publisher, &self.frame, Vec::new(), self.now);
        black_box(self.bus.take_effects());
        let n = self.bus.sendable(self.subscriber, 64).len();
        self.bus.sent(self.subscriber, n, self.now);
        self.published += 1;
    }

    /// `(p50, p99)` ns per publish; checks every one was delivered.
    fn time(&mut self, fresh: bool) -> (u64, u64) {
        let t = per_call(BUDGET_MS, || self.publish(fresh));
        let c = self.bus.counters();
        assert_eq!(c.policy_denials, 0, "no publish may be refused");
        assert_eq!(c.msgs_in, self.published, "every publish accepted");
        assert_eq!(c.msgs_out, self.published, "every publish delivered and drained");
        assert!(!self.bus.has_output(self.publisher) && !self.bus.has_output(self.subscriber));
        t
    }
}

pub(crate) fn policy(report: &mut Report) {
    let rules = Rules::parse(&rules_text(), &Accounts::parse("", "")).expect("the bench's policy file");
    assert_eq!(rules.rule_count(), RULES);

    let mut open = Rig::new(None);
    let floor = open.time(false);
    let mut cached = Rig::new(Some(rules.clone()));
    let hot = cached.time(false);
    let mut cold = Rig::new(Some(rules));
    let fresh = cold.time(true);
    let subjects = cold.n;

    let later = RULES - 1;
    let rows = [
        ("publish_no_policy", floor, "no policy file; 1 sub `bench.>`; publish + route + drain".to_string()),
        (
            "publish_1000_rules",
            hot,
            format!(
                "{RULES} rules match the peer, allow at rule 1 (lowest); same subject: verdict from the \
                 per-subject table"
            ),
        ),
        (
            "publish_1000_rules_cold",
            fresh,
            format!(
                "same rules; a new subject each publish ({subjects} in all): table miss, trie lookup past \
                 {later} later entries to rule 1"
            ),
        ),
    ];
    for (path, t, note) in rows {
        let mut row = Row::timed("policy", path, SIZE, Some(1), t, ("publish_no_policy", floor.0));
        row.note = note;
        report.push(row);
    }
}
