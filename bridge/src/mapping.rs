//! Subject mapping, the bridge's NATS headers, origin text and the error
//! mapping of calls: the pure rules of what crosses and how it is named.
//!
//! Prefix (symmetric): a local subject or name `S` is `prefix + S` on NATS,
//! in both directions, for messages and services alike. A NATS subject that
//! does not start with the prefix, or whose rest is not a valid shmbus
//! subject (NATS allows what shmbus does not: longer subjects, more tokens),
//! or whose rest lies under `$SYS`, does not map: [`Prefix::to_local`]
//! refuses it, and the caller counts and drops the message.
//!
//! Headers on everything the bridge puts on NATS (messages, requests and
//! replies):
//! - `Shmbus-Bridge: <name>`: the bridge that put it there; a bridge drops
//!   what carries its own name (loop prevention, beside NATS's `no_echo`);
//! - `Shmbus-Host: <hostname>` and `Shmbus-Sender: uid=U,pid=P,client=C`:
//!   the original local sender as its broker stamped it;
//! - on requests, `Shmbus-Timeout-Ms: N`: what is left of the caller's
//!   timeout, so the far side does not wait longer than the caller;
//! - on error replies, `Shmbus-Error: <kind>[ <code>][ <message>]` (see
//!   [`RemoteError`]);
//! - on messages, `Shmbus-Seq: N`: the exporting bridge's count of what it
//!   handed to NATS on that subject (1, 2, ...; [`SeqOut`]). NATS core is at
//!   most once: it drops a slow consumer's messages, and says so only
//!   through a notice that is itself lossy. The importing bridge checks the
//!   sequence per (bridge, subject) ([`SeqIn`]) and counts every number it
//!   did not see as lost (`nats-lost`), when the next one comes.
//!
//! Origin (what a local receiver reads with `origin()`): `nats:<bridge>@<host>
//! uid=U pid=P client=C` for a message that another shmbus host's bridge
//! put on NATS, `nats:<subject>` for one from a plain NATS publisher.
//! Always printable ASCII (anything else becomes `?`), at most
//! [`MAX_ORIGIN`] bytes. Header values the bridge writes are cleaned the
//! same way, so no peer input can make a header that async-nats refuses.

use shmbus::{CallError, Sender};
use shmbus_proto::subject::{pattern_matches, validate_subject};

pub const H_BRIDGE: &str = "Shmbus-Bridge";
pub const H_HOST: &str = "Shmbus-Host";
pub const H_SENDER: &str = "Shmbus-Sender";
pub const H_TIMEOUT: &str = "Shmbus-Timeout-Ms";
pub const H_ERROR: &str = "Shmbus-Error";
pub const H_SEQ: &str = "Shmbus-Seq";

/// How many subjects a sequence table holds (on the receiving side, per
/// bridge name); past that it starts again empty, so a peer's subjects
/// cannot grow it, and a peer's own subjects reset only its own name's
/// table (see [`SEQ_PAIRS`]). A subject it forgot starts again at 1 on
/// the sending side, and is taken as new on the receiving side: no loss
/// is counted across a reset.
pub const SEQ_SUBJECTS: usize = 4096;

/// The longest bridge name and subject a sequence table keeps (longer ones
/// are not tracked), so that its 4,096 entries are bounded in bytes too.
pub const SEQ_KEY_MAX: usize = 1024;

/// The largest gap taken as a loss; a bigger jump in a sender's numbers is
/// taken as a sender that started again (a forged number cannot add more
/// than this per message).
pub const SEQ_MAX_GAP: u64 = 1 << 20;

/// The exporting side's per-subject sequence numbers.
#[derive(Debug, Default)]
pub struct SeqOut {
    next: std::collections::HashMap<String, u64>,
}

impl SeqOut {
    /// The number for the next message on `subject`.
    pub fn take(&mut self, subject: &str) -> u64 {
        // The common case, a subject seen before, allocates nothing.
        if let Some(n) = self.next.get_mut(subject) {
            *n += 1;
            return *n;
        }
        if self.next.len() >= SEQ_SUBJECTS {
            self.next.clear();
        }
        self.next.insert(subject.to_owned(), 1);
        1
    }

    /// Gives back the number just taken for `subject` (its publish failed,
    /// and was counted as such: the far side must not count it again).
    pub fn give_back(&mut self, subject: &str) {
        if let Some(n) = self.next.get_mut(subject) {
            *n = n.saturating_sub(1);
        }
    }
}

/// The importing side's last sequence number seen per (bridge, subject).
#[derive(Debug, Default)]
pub struct SeqIn {
    /// Bridge name → its subjects' last numbers (nested, so that a pair
    /// seen before is looked up without allocating).
    last: std::collections::HashMap<String, BridgeSeqs>,
    /// Pairs held in all.
    pairs: usize,
    /// Calls so far: when each bridge's table was last used.
    clock: u64,
}

#[derive(Debug, Default)]
struct BridgeSeqs {
    subjects: std::collections::HashMap<String, u64>,
    touched: u64,
}

/// Pairs a sequence table holds in all, over every bridge name: past it,
/// the table of the bridge name used least recently is forgotten (not
/// the one in use: a peer that writes many names or subjects of its own
/// resets its own, or the idlest, never an active stream's).
pub const SEQ_PAIRS: usize = 4 * SEQ_SUBJECTS;

/// Bridge names a sequence table holds at once (likewise: past it, the
/// one used least recently goes; and finding it is a walk over these).
pub const SEQ_BRIDGES: usize = 256;

impl SeqIn {
    /// Notes `seq` from `bridge` on `subject`; returns how many numbers
    /// were skipped since the last one (lost on the way). A number at or
    /// below the last one means the sender started again (a restart, or a
    /// reset of its table): nothing is counted.
    pub fn missed(&mut self, bridge: &str, subject: &str, seq: u64) -> u64 {
        if bridge.len() > SEQ_KEY_MAX || subject.len() > SEQ_KEY_MAX {
            return 0;
        }
        self.clock += 1;
        if let Some(b) = self.last.get_mut(bridge) {
            b.touched = self.clock;
            if let Some(l) = b.subjects.get_mut(subject) {
                let missed = match seq.checked_sub(*l) {
                    Some(d) if d >= 1 && d - 1 <= SEQ_MAX_GAP => d - 1,
                    _ => 0,
                };
                *l = seq;
                return missed;
            }
            if b.subjects.len() >= SEQ_SUBJECTS {
                // Its own subjects past the bound: only its own table
                // starts again.
                self.pairs -= b.subjects.len();
                b.subjects.clear();
            }
        }
        let new_name = !self.last.contains_key(bridge);
        if self.pairs >= SEQ_PAIRS || (new_name && self.last.len() >= SEQ_BRIDGES) {
            // Forget the table used least recently (never this one: it was
            // just touched, or is new).
            let idlest = self.last.iter().filter(|(name, _)| *name != bridge).min_by_key(|(_, b)| b.touched);
            if let Some(name) = idlest.map(|(name, _)| name.clone()) {
                if let Some(b) = self.last.remove(&name) {
                    self.pairs -= b.subjects.len();
                }
            }
        }
        let b = self.last.entry(bridge.to_owned()).or_default();
        b.touched = self.clock;
        b.subjects.insert(subject.to_owned(), seq);
        self.pairs += 1;
        0
    }
}

/// Longest origin text the bridge sets.
pub const MAX_ORIGIN: usize = 200;
/// Longest header value the bridge writes (error messages are cut).
pub const MAX_HEADER_VALUE: usize = 1024;

/// Application error codes a bridge answers local callers with, on behalf
/// of the far side (below the client library's reserved `0xFFFF_0000`). A
/// caller sees `CallError::App { code, .. }` with one of these; an
/// application error of the remote service keeps its own code.
pub mod code {
    /// Nobody serves the name on the far side (NATS no-responders, or the
    /// far bridge found no local owner).
    pub const NO_RESPONDER: u32 = 0xFFFE_0001;
    /// No answer within the timeout.
    pub const TIMEOUT: u32 = 0xFFFE_0002;
    /// The far service went away without answering.
    pub const RESPONDER_GONE: u32 = 0xFFFE_0003;
    /// The request or its reply is larger than NATS's `max_payload`.
    pub const TOO_LARGE: u32 = 0xFFFE_0004;
    /// NATS is not connected, or the bridge is overloaded.
    pub const UNAVAILABLE: u32 = 0xFFFE_0005;
    /// The far broker's policy denied the call.
    pub const DENIED: u32 = 0xFFFE_0006;
    /// A limit refused the call on the far side.
    pub const LIMIT: u32 = 0xFFFE_0007;
    /// The far side found the request invalid (a bad name, a bad payload).
    pub const INVALID: u32 = 0xFFFE_0008;
    /// Anything else (I/O, a broken reply).
    pub const OTHER: u32 = 0xFFFE_00FF;
}

/// Why a NATS subject has no local counterpart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("{0:?} does not start with the prefix")]
    NoPrefix(String),
    #[error("{subject:?} is not a valid shmbus subject: {reason}")]
    Invalid { subject: String, reason: String },
    #[error("{0:?} lies under $SYS")]
    Reserved(String),
}

/// The symmetric subject prefix (`""` or `"a.b."`; checked by the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(String);

impl Prefix {
    pub fn new(p: &str) -> Prefix {
        Prefix(p.to_owned())
    }

    /// The NATS subject (or pattern) for a local subject (or pattern).
    pub fn to_nats(&self, local: &str) -> String {
        format!("{}{local}", self.0)
    }

    /// A NATS subject without the prefix (as it is if it lacks it), valid
    /// or not: for matching it against local patterns.
    pub fn strip<'a>(&self, nats: &'a str) -> &'a str {
        nats.strip_prefix(self.0.as_str()).unwrap_or(nats)
    }

    /// The local subject for a NATS subject, if it has one.
    pub fn to_local<'a>(&self, nats: &'a str) -> Result<&'a str, MapError> {
        let rest =
            nats.strip_prefix(self.0.as_str()).ok_or_else(|| MapError::NoPrefix(printable(nats, 200)))?;
        validate_subject(rest)
            .map_err(|e| MapError::Invalid { subject: printable(rest, 200), reason: e.to_string() })?;
        if rest.split('.').next() == Some("$SYS") {
            return Err(MapError::Reserved(rest.to_owned()));
        }
        Ok(rest)
    }
}

/// Whether the subscription of `patterns[index]` is the one that forwards
/// `subject` (a subject it matched, without the prefix): no earlier pattern of the
/// same list matches it. Each side delivers a message once per matching
/// subscription, so overlapping patterns in one list (`t.>` and `t.a.*`)
/// would otherwise forward it once per pattern.
pub fn first_match(patterns: &[String], index: usize, subject: &str) -> bool {
    !patterns[..index.min(patterns.len())].iter().any(|p| pattern_matches(p, subject))
}

/// `s` with anything but printable ASCII made `?`, cut to `max` bytes.
pub fn printable(s: &str, max: usize) -> String {
    s.chars().take(max).map(|c| if (' '..='~').contains(&c) { c } else { '?' }).collect()
}

/// The `Shmbus-Sender` value for a broker-stamped sender.
pub fn sender_value(s: &Sender) -> String {
    format!("uid={},pid={},client={}", s.uid, s.pid, s.client_id)
}

/// The origin text for a NATS message, from its headers (as found, any
/// bytes) and subject.
pub fn origin(bridge: Option<&str>, host: Option<&str>, sender: Option<&str>, subject: &str) -> String {
    let text = match bridge {
        Some(b) => {
            let mut t = format!("nats:{b}");
            if let Some(h) = host {
                t.push('@');
                t.push_str(h);
            }
            if let Some(s) = sender {
                t.push(' ');
                t.push_str(&s.replace(',', " "));
            }
            t
        }
        None => format!("nats:{subject}"),
    };
    printable(&text, MAX_ORIGIN)
}

/// Whether `origin` (a local message's, call's or send's origin text)
/// says it came from NATS: a bridge put it on this bus (`nats:…`, every
/// import is so marked). Such is never put on NATS again (split horizon):
/// NATS has given it to every bridge that wanted it, and going out again
/// would loop, through another bridge on this broker or, with
/// export-only and import-only bridges on two hosts, around both hosts
/// (a review saw one publish 1,858 times in 2 s). A local client can
/// write such an origin, but then only its own message or call stays on
/// this bus.
pub fn from_nats(origin: Option<&str>) -> bool {
    origin.is_some_and(|o| o.starts_with("nats:"))
}

/// Whether a NATS message was put there by the bridge named `me`.
pub fn is_own(bridge_header: Option<&str>, me: &str) -> bool {
    bridge_header == Some(me)
}

/// An error crossing NATS as a reply's `Shmbus-Error` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteError {
    NoResponder,
    Timeout,
    ResponderGone,
    TooLarge(String),
    Unavailable(String),
    Denied(String),
    Limit(String),
    Invalid(String),
    App { code: u32, message: String },
    Other(String),
}

impl RemoteError {
    /// The header value: `<kind>[ <code>][ <message>]`, printable ASCII.
    pub fn header(&self) -> String {
        let v = match self {
            RemoteError::NoResponder => "no-responder".to_owned(),
            RemoteError::Timeout => "timeout".to_owned(),
            RemoteError::ResponderGone => "responder-gone".to_owned(),
            RemoteError::TooLarge(m) => format!("too-large {m}"),
            RemoteError::Unavailable(m) => format!("unavailable {m}"),
            RemoteError::Denied(m) => format!("denied {m}"),
            RemoteError::Limit(m) => format!("limit {m}"),
            RemoteError::Invalid(m) => format!("invalid {m}"),
            RemoteError::App { code, message } => format!("app {code} {message}"),
            RemoteError::Other(m) => format!("other {m}"),
        };
        printable(v.trim_end(), MAX_HEADER_VALUE)
    }

    /// Reads a header value; anything unknown is `Other`, never a panic.
    pub fn parse(v: &str) -> RemoteError {
        let (kind, rest) = v.split_once(' ').unwrap_or((v, ""));
        let m = rest.to_owned();
        match kind {
            "no-responder" => RemoteError::NoResponder,
            "timeout" => RemoteError::Timeout,
            "responder-gone" => RemoteError::ResponderGone,
            "too-large" => RemoteError::TooLarge(m),
            "unavailable" => RemoteError::Unavailable(m),
            "denied" => RemoteError::Denied(m),
            "limit" => RemoteError::Limit(m),
            "invalid" => RemoteError::Invalid(m),
            "other" => RemoteError::Other(m),
            "app" => {
                let (c, msg) = rest.split_once(' ').unwrap_or((rest, ""));
                match c.parse() {
                    Ok(code) => RemoteError::App { code, message: msg.to_owned() },
                    Err(_) => RemoteError::Other(format!("malformed app error {:?}", printable(v, 200))),
                }
            }
            _ => RemoteError::Other(printable(v, MAX_HEADER_VALUE)),
        }
    }

    /// What a local caller is answered: `(code, message)` for
    /// `reply_error`. `name` is the called name, for the message.
    pub fn local_answer(&self, name: &str) -> (u32, String) {
        match self {
            RemoteError::NoResponder => {
                (code::NO_RESPONDER, format!("no responder for {name} across the bridge"))
            }
            RemoteError::Timeout => {
                (code::TIMEOUT, format!("no answer from {name} across the bridge in time"))
            }
            RemoteError::ResponderGone => {
                (code::RESPONDER_GONE, format!("{name} went away without answering across the bridge"))
            }
            RemoteError::TooLarge(m) => (code::TOO_LARGE, format!("too large for NATS: {m}")),
            RemoteError::Unavailable(m) => (code::UNAVAILABLE, format!("bridge unavailable: {m}")),
            RemoteError::Denied(m) => (code::DENIED, format!("denied across the bridge: {m}")),
            RemoteError::Limit(m) => (code::LIMIT, format!("limit across the bridge: {m}")),
            RemoteError::Invalid(m) => (code::INVALID, format!("invalid across the bridge: {m}")),
            RemoteError::App { code, message } => (*code, message.clone()),
            RemoteError::Other(m) => (code::OTHER, format!("bridge error: {m}")),
        }
    }

    /// A local call's failure, as it crosses to a NATS caller.
    pub fn from_call(e: &CallError) -> RemoteError {
        match e {
            CallError::NoResponder { .. } => RemoteError::NoResponder,
            CallError::ResponderGone { .. } => RemoteError::ResponderGone,
            CallError::Timeout { .. } => RemoteError::Timeout,
            CallError::Denied { message, .. } => RemoteError::Denied(message.clone()),
            CallError::LimitExceeded { message, .. } => RemoteError::Limit(message.clone()),
            CallError::App { code, message, .. } => {
                RemoteError::App { code: *code, message: message.clone() }
            }
            CallError::InvalidName(e) => RemoteError::Invalid(e.to_string()),
            CallError::Invalid { message, .. } => RemoteError::Invalid(message.clone()),
            other => RemoteError::Other(other.to_string()),
        }
    }

    /// The counter label of this error.
    pub fn kind(&self) -> &'static str {
        match self {
            RemoteError::NoResponder => "no-responder",
            RemoteError::Timeout => "timeout",
            RemoteError::ResponderGone => "responder-gone",
            RemoteError::TooLarge(_) => "too-large",
            RemoteError::Unavailable(_) => "unavailable",
            RemoteError::Denied(_) => "denied",
            RemoteError::Limit(_) => "limit",
            RemoteError::Invalid(_) => "invalid",
            RemoteError::App { .. } => "app",
            RemoteError::Other(_) => "other",
        }
    }
}

/// The timeout for a call crossing: the far caller's (`Shmbus-Timeout-Ms`,
/// if present and sane) bounded by the bridge's own.
pub fn call_timeout(header: Option<&str>, own: std::time::Duration) -> std::time::Duration {
    match header.and_then(|h| h.trim().parse::<u64>().ok()) {
        Some(ms) if ms > 0 => own.min(std::time::Duration::from_millis(ms)),
        _ => own,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sequences_count_what_was_skipped_and_forget_nothing_unbounded() {
        let mut out = SeqOut::default();
        assert_eq!((out.take("a"), out.take("a"), out.take("b")), (1, 2, 1));
        out.give_back("a");
        assert_eq!(out.take("a"), 2, "a failed publish's number is used again");
        let mut seen = SeqIn::default();
        assert_eq!(seen.missed("A", "a", 1), 0);
        assert_eq!(seen.missed("A", "a", 2), 0);
        assert_eq!(seen.missed("A", "a", 6), 3, "3, 4 and 5 were lost");
        assert_eq!(seen.missed("B", "a", 4), 0, "another bridge's numbers are its own");
        assert_eq!(seen.missed("A", "a", 1), 0, "a restarted sender");
        assert_eq!(seen.missed("A", "a", 2), 0);
        // Forged numbers: an absurd jump is a restart, not 2^64 losses.
        assert_eq!(seen.missed("A", "a", u64::MAX), 0);
        assert_eq!(seen.missed("A", "a", 1), 0);
        assert_eq!(seen.missed("A", "a", 2 + SEQ_MAX_GAP), SEQ_MAX_GAP);
        // Keys too long to keep are not tracked.
        let long = "x".repeat(SEQ_KEY_MAX + 1);
        assert_eq!(seen.missed(&long, "a", 1), 0);
        assert_eq!(seen.missed(&long, "a", 9), 0);
        assert!(!seen.last.contains_key(&long));
        // Bounded: past SEQ_SUBJECTS, the tables start again.
        for i in 0..SEQ_SUBJECTS + 10 {
            out.take(&i.to_string());
            seen.missed("A", &i.to_string(), 1);
        }
        assert!(out.next.len() <= SEQ_SUBJECTS && seen.pairs <= SEQ_PAIRS);
        assert!(seen.last["A"].subjects.len() <= SEQ_SUBJECTS);
        assert_eq!(seen.last.values().map(|m| m.subjects.len()).sum::<usize>(), seen.pairs);
    }

    #[test]
    fn a_peers_own_names_and_subjects_never_reset_an_active_stream() {
        let mut seen = SeqIn::default();
        assert_eq!(seen.missed("hostA", "t.v", 1), 0);
        // One peer's many subjects under its own name: only its own table.
        for i in 0..3 * SEQ_SUBJECTS {
            seen.missed("peer", &format!("t.s{i}"), 1);
        }
        assert_eq!(seen.missed("hostA", "t.v", 5), 3, "hostA's stream kept its place");
        // Many names: the idlest tables go, never the one in use, and the
        // whole stays bounded.
        for i in 0..4 * SEQ_BRIDGES {
            seen.missed(&format!("forged{i}"), "t.x", 1);
            if i % 100 == 0 {
                let n = seen.missed("hostA", "t.v", 6 + (i / 100) as u64);
                assert_eq!(n, 0, "hostA's stream, in use, is never forgotten");
            }
        }
        assert!(seen.pairs <= SEQ_PAIRS && seen.last.len() <= SEQ_BRIDGES);
        assert_eq!(seen.last.values().map(|m| m.subjects.len()).sum::<usize>(), seen.pairs);
    }

    use super::*;
    use std::time::Duration;

    #[test]
    fn the_prefix_is_symmetric() {
        let p = Prefix::new("host1.");
        assert_eq!(p.to_nats("sensors.t"), "host1.sensors.t");
        assert_eq!(p.to_nats("sensors.>"), "host1.sensors.>");
        assert_eq!(p.to_local("host1.sensors.t"), Ok("sensors.t"));
        assert_eq!(p.to_local(&p.to_nats("a.b.c")), Ok("a.b.c"));
        assert!(matches!(p.to_local("host2.sensors.t"), Err(MapError::NoPrefix(_))));
        let none = Prefix::new("");
        assert_eq!(none.to_local("a.b"), Ok("a.b"));
    }

    #[test]
    fn subjects_shmbus_cannot_carry_do_not_map() {
        let p = Prefix::new("");
        let deep = vec!["t"; 40].join(".");
        assert!(matches!(p.to_local(&deep), Err(MapError::Invalid { .. })));
        assert!(matches!(p.to_local("a..b"), Err(MapError::Invalid { .. })));
        assert!(matches!(p.to_local("a.\u{7}"), Err(MapError::Invalid { .. })));
        assert!(matches!(p.to_local("$SYS.x"), Err(MapError::Reserved(_))));
        assert!(matches!(p.to_local(&"x".repeat(5000)), Err(MapError::Invalid { .. })));
        // The error text is printable and bounded whatever came in.
        let e = p.to_local(&format!("a.{}\u{0}", "é".repeat(3000))).unwrap_err().to_string();
        assert!(e.len() < 400 && e.chars().all(|c| (' '..='~').contains(&c)), "{e}");
    }

    #[test]
    fn only_the_first_matching_pattern_forwards() {
        let ps: Vec<String> = ["t.>", "t.a.*", "u.x"].iter().map(|s| s.to_string()).collect();
        assert!(first_match(&ps, 0, "t.a.b"));
        assert!(!first_match(&ps, 1, "t.a.b"));
        assert!(first_match(&ps, 2, "u.x"));
        let dup: Vec<String> = vec!["a.*".into(), "a.*".into()];
        assert!(!first_match(&dup, 1, "a.b"));
    }

    #[test]
    fn origin_names_the_far_bridge_and_sender_or_the_subject() {
        let o = origin(Some("hostA"), Some("a.example"), Some("uid=1000,pid=42,client=7"), "s.x");
        assert_eq!(o, "nats:hostA@a.example uid=1000 pid=42 client=7");
        assert_eq!(origin(None, None, None, "sensors.t"), "nats:sensors.t");
        let hostile = origin(Some(&"\n\u{1}é".repeat(500)), None, None, "s");
        assert!(hostile.len() <= MAX_ORIGIN);
        assert!(hostile.chars().all(|c| (' '..='~').contains(&c)));
    }

    #[test]
    fn sender_value_is_what_origin_reads() {
        let s = Sender { client_id: 7, uid: 1000, gid: 1000, pid: 42 };
        assert_eq!(sender_value(&s), "uid=1000,pid=42,client=7");
    }

    #[test]
    fn an_origin_names_the_bridge_that_put_it_on_nats() {
        let o = origin(Some("hostA"), Some("a.example"), Some("uid=1,pid=2,client=3"), "s.x");
        assert!(from_nats(Some(&o)));
        assert!(from_nats(Some(&origin(Some("hostA"), None, None, "s"))));
        assert!(
            from_nats(Some(&origin(None, None, None, "hostA.x"))),
            "a plain publisher's, through a bridge"
        );
        assert!(!from_nats(None), "a local publisher's");
        assert!(!from_nats(Some("hostA")), "a local origin");
    }

    #[test]
    fn own_messages_are_recognised_by_exact_name() {
        assert!(is_own(Some("a"), "a"));
        assert!(!is_own(Some("ab"), "a"));
        assert!(!is_own(None, "a"));
    }

    #[test]
    fn error_headers_round_trip() {
        let all = [
            RemoteError::NoResponder,
            RemoteError::Timeout,
            RemoteError::ResponderGone,
            RemoteError::TooLarge("600000 > 1048576".into()),
            RemoteError::Unavailable("nats down".into()),
            RemoteError::Denied("policy".into()),
            RemoteError::Limit("queue".into()),
            RemoteError::Invalid("bad".into()),
            RemoteError::App { code: 42, message: "out of paper".into() },
            RemoteError::App { code: 7, message: String::new() },
            RemoteError::Other("x".into()),
        ];
        for e in all {
            assert_eq!(RemoteError::parse(&e.header()), e, "{}", e.header());
        }
    }

    #[test]
    fn hostile_error_headers_parse_to_other() {
        assert!(matches!(RemoteError::parse(""), RemoteError::Other(_)));
        assert!(matches!(RemoteError::parse("app notanumber x"), RemoteError::Other(_)));
        assert!(matches!(RemoteError::parse("app 99999999999999 x"), RemoteError::Other(_)));
        let long = RemoteError::parse(&"z".repeat(100_000));
        assert!(matches!(long, RemoteError::Other(ref m) if m.len() <= MAX_HEADER_VALUE));
        // A message with newlines becomes a clean header value.
        let h = RemoteError::App { code: 1, message: "a\r\nb".into() }.header();
        assert_eq!(h, "app 1 a??b");
    }

    #[test]
    fn local_answers_use_the_bridge_codes_or_keep_the_app_code() {
        assert_eq!(RemoteError::NoResponder.local_answer("b.x").0, code::NO_RESPONDER);
        assert_eq!(RemoteError::Timeout.local_answer("b.x").0, code::TIMEOUT);
        assert_eq!(RemoteError::App { code: 3, message: "m".into() }.local_answer("b.x"), (3, "m".into()));
        const { assert!(code::OTHER < shmbus::reply_code::RESERVED) };
    }

    #[test]
    fn call_errors_map_to_remote_errors() {
        let n = || "x".to_owned();
        assert_eq!(RemoteError::from_call(&CallError::NoResponder { name: n() }), RemoteError::NoResponder);
        assert_eq!(
            RemoteError::from_call(&CallError::Timeout { name: n(), timeout: Duration::from_secs(1) }),
            RemoteError::Timeout
        );
        assert_eq!(
            RemoteError::from_call(&CallError::App { name: n(), code: 9, message: "m".into() }),
            RemoteError::App { code: 9, message: "m".into() }
        );
        assert_eq!(
            RemoteError::from_call(&CallError::ResponderGone { name: n() }),
            RemoteError::ResponderGone
        );
    }

    #[test]
    fn the_far_callers_timeout_bounds_the_call() {
        let own = Duration::from_secs(5);
        assert_eq!(call_timeout(Some("250"), own), Duration::from_millis(250));
        assert_eq!(call_timeout(Some("999999"), own), own);
        assert_eq!(call_timeout(Some("0"), own), own);
        assert_eq!(call_timeout(Some("junk"), own), own);
        assert_eq!(call_timeout(None, own), own);
    }
}
