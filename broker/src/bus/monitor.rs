//! Monitors: an administrator's view of what passes through the broker.
//!
//! Model: a monitor is a subscription that the router does not hold. A
//! peer with the `monitor` right sends `Monitor { sub_id, patterns }`; the
//! bus keeps it in the peer's subscriptions (so its queue, overflow and
//! gap accounting are a subscription's, with `Overflow::Gap`) and in
//! [`Monitors`]. Wherever something happens (a publish, a request, an
//! answer, a refusal, a connect or disconnect, a subscription or a name
//! change) the bus calls [`Bus::monitor_event`], which offers one
//! `Deliver` whose payload is a [`MonitorEvent`] to each monitor whose
//! patterns match the event's subject (events without a subject, such as
//! connects, go only to monitors without patterns).
//!
//! Invariants: with no monitor, an event costs one `is_empty` test and
//! nothing is built; a slow monitor loses events, counted as gaps on its
//! own subscription, and never holds up the bus (`Overflow::Gap`, whatever
//! the client asked). Payloads by memfd are never mapped: the monitor sees
//! their length. Inline payloads are cut to `MONITOR_EXCERPT` bytes
//! unless the monitor asked for them whole. No I/O.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use shmbus_proto::frame::{
    encode_head, Deliver, ErrorCode, Monitor, MonitorEvent, MonitorKind, Op, Overflow, PayloadRef, Sender,
    Subscribed, MONITOR_EXCERPT,
};
use shmbus_proto::limits::{MAX_ERROR_MESSAGE, MAX_PACKET};
use shmbus_proto::subject::validate_pattern;

use super::peer::{PeerId, Subscription};
use super::queue::{OutFrame, SubState, FRAME_OVERHEAD};
use super::quota::{charge_usage, Resource};
use super::router::Router;
use super::rules::Action;
use super::Bus;
use super::SubKey;

/// Most receivers a monitor event lists (its detail says how many more):
/// 10 bytes each at most, so an event with its excerpt, its detail and
/// the longest subject fits a packet.
pub const MAX_MONITOR_RECEIVERS: usize = 4096;

/// The most a monitor's `Deliver` head takes beside its subject (the
/// header, a sub id, a sender, a seq: varints of at most 10 bytes).
const DELIVER_HEAD_MAX: usize = 128;

/// Most patterns one monitor may filter on.
pub const MAX_MONITOR_PATTERNS: usize = 64;
/// Most monitors one connection may hold: each costs every event a look.
pub const MAX_MONITORS_PER_CONNECTION: usize = 4;

#[derive(Debug)]
struct MonitorSub {
    patterns: Vec<Box<str>>,
    full: bool,
}

/// Every live monitor. Their patterns sit in a router trie of their own,
/// so an event costs one walk whatever the number of monitors and
/// patterns, as a publish does.
#[derive(Debug, Default)]
pub struct Monitors {
    subs: BTreeMap<SubKey, MonitorSub>,
    /// Monitors without patterns: every event.
    everything: Vec<SubKey>,
    router: Router<SubKey>,
    /// Events offered so far: the `seq` of each monitor delivery.
    seq: u64,
}

impl Monitors {
    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    fn add(&mut self, key: SubKey, m: MonitorSub) {
        if m.patterns.is_empty() {
            self.everything.push(key);
        }
        for p in &m.patterns {
            // Valid patterns of at most MAX_SUBJECT_DEPTH tokens, which
            // the router always holds.
            self.router.insert(p, key);
        }
        self.subs.insert(key, m);
    }

    /// Forgets monitor `sub_id` of `peer`; whether it was one.
    pub fn remove(&mut self, peer: PeerId, sub_id: u32) -> bool {
        let key = (peer, sub_id);
        let Some(m) = self.subs.remove(&key) else { return false };
        for p in &m.patterns {
            self.router.remove(p, key);
        }
        self.everything.retain(|k| *k != key);
        true
    }

    /// Forgets every monitor of `peer`.
    pub fn remove_peer(&mut self, peer: PeerId) {
        for sub_id in self.of(peer) {
            self.remove(peer, sub_id);
        }
    }

    /// The monitors `peer` holds, by subscription id.
    pub fn of(&self, peer: PeerId) -> Vec<u32> {
        self.subs.range((peer, 0)..=(peer, u32::MAX)).map(|(&(_, sub_id), _)| sub_id).collect()
    }

    /// The monitors that want an event on `subject` ("" for events without
    /// one), each once, with whether it wants payloads whole.
    fn wanting(&self, subject: &str, out: &mut Vec<SubKey>) -> Vec<(SubKey, bool)> {
        out.clear();
        if !subject.is_empty() {
            self.router.matches(subject, out);
        }
        out.extend_from_slice(&self.everything);
        out.sort_unstable();
        out.dedup();
        out.iter().filter_map(|k| self.subs.get(k).map(|m| (*k, m.full))).collect()
    }
}

/// What happened, for [`Bus::monitor_event`].
pub struct Seen<'a> {
    pub kind: MonitorKind,
    /// The topic, name or pattern; "" for events without one.
    pub subject: &'a str,
    /// Who caused it.
    pub sender: Sender,
    pub receivers: Vec<u64>,
    pub detail: String,
    pub payload_ref: PayloadRef,
    /// The inline payload (empty for a memfd).
    pub payload: &'a [u8],
}

impl Bus {
    /// `Monitor`: starts a monitor for a peer with the `monitor` right.
    pub(crate) fn monitor_start(&mut self, id: PeerId, m: Monitor<'_>, now: Instant) {
        let op = Op::Subscribe { sub_id: m.sub_id };
        let max = self.cfg.max_subscriptions as usize;
        let Some(p) = self.peers.get(&id) else { return };
        // Cheap checks first: the count bounds the validation below.
        let refusal = if let Err(e) = p.access.check(Action::Monitor, "") {
            Some((ErrorCode::Denied, e))
        } else if m.patterns.len() > MAX_MONITOR_PATTERNS {
            Some((ErrorCode::LimitExceeded, format!("at most {MAX_MONITOR_PATTERNS} patterns per monitor")))
        } else if self.monitors.of(id).len() >= MAX_MONITORS_PER_CONNECTION {
            Some((
                ErrorCode::LimitExceeded,
                format!("at most {MAX_MONITORS_PER_CONNECTION} monitors per connection"),
            ))
        } else if let Some(bad) = m.patterns.iter().find(|pat| validate_pattern(pat).is_err()) {
            Some((ErrorCode::InvalidSubject, format!("invalid pattern {}", shmbus_proto::text::quote(bad))))
        } else {
            p.sub_id_refusal(m.sub_id, max)
        };
        if let Some((code, message)) = refusal {
            return self.refuse_subscription(id, op, code, &message, now);
        }
        let bytes: u64 = m.patterns.iter().map(|p| super::router::cost(p)).sum();
        let charge =
            match charge_usage(&p.usage, &[(Resource::Subscriptions, 1), (Resource::RouterBytes, bytes)]) {
                Ok(c) => c,
                Err(e) => return self.quota_refusal(id, op, &e, now),
            };
        // Never in the router: "" is no valid pattern, so no delivery of a
        // publish can name this subscription.
        let state = SubState { pattern: "".into(), overflow: Overflow::Gap, missed: 0 };
        let Some(p) = self.peers.get_mut(&id) else { return };
        p.subs.insert(m.sub_id, Subscription { state, charge });
        let sub = MonitorSub { patterns: m.patterns.iter().map(|&p| p.into()).collect(), full: m.full };
        self.monitors.add((id, m.sub_id), sub);
        self.control(id, &Subscribed { sub_id: m.sub_id }, now);
    }

    /// Offers `seen` to every monitor that wants it.
    pub(crate) fn monitor_event(&mut self, seen: Seen<'_>, now: Instant) {
        if self.monitors.is_empty() {
            return;
        }
        let mut keys = std::mem::take(&mut self.matches);
        let wanted = self.monitors.wanting(seen.subject, &mut keys);
        self.matches = keys;
        if wanted.is_empty() {
            return;
        }
        let memfd = matches!(seen.payload_ref, PayloadRef::Memfd { .. });
        let payload_len = match seen.payload_ref {
            PayloadRef::Memfd { len } => len,
            PayloadRef::Inline => seen.payload.len() as u64,
        };
        // Bounded so that an event with its excerpt always fits a packet
        // (the detail quotes peers' strings; a publish may reach any
        // number of connections): what is left out is said.
        let mut receivers = seen.receivers;
        let mut detail = seen.detail;
        if detail.len() > MAX_ERROR_MESSAGE {
            let cut = shmbus_proto::text::clip(&detail, MAX_ERROR_MESSAGE).len();
            detail.truncate(cut);
        }
        if receivers.len() > MAX_MONITOR_RECEIVERS {
            let more = receivers.len() - MAX_MONITOR_RECEIVERS;
            receivers.truncate(MAX_MONITOR_RECEIVERS);
            detail.push_str(&format!(" ({more} more receivers not listed)"));
        }
        let mut event =
            MonitorEvent { kind: seen.kind, receivers, detail, payload_len, memfd, payload: Vec::new() };
        // At most two encodings: the excerpt and the whole. The whole
        // payload beside a long subject and a long list of receivers may
        // not fit a packet: such a monitor gets the excerpt.
        let room = MAX_PACKET.saturating_sub(seen.subject.len() + DELIVER_HEAD_MAX);
        let mut encoded: [Option<Arc<[u8]>>; 2] = [None, None];
        for ((peer, sub_id), full) in wanted {
            let mut encode = |full: bool| {
                encoded[usize::from(full)]
                    .get_or_insert_with(|| {
                        let take =
                            if full { seen.payload.len() } else { seen.payload.len().min(MONITOR_EXCERPT) };
                        event.payload = seen.payload[..take].to_vec();
                        Arc::from(event.to_bytes())
                    })
                    .clone()
            };
            let mut bytes = encode(full);
            if bytes.len() > room {
                bytes = encode(false);
            }
            self.monitors.seq += 1;
            // Counted as a delivery: a busy monitor is work like any other.
            self.work = self.work.wrapping_add(1);
            let seq = self.monitors.seq;
            let (subject, sender) = (seen.subject, seen.sender);
            let cost = subject.len() + 64 + bytes.len() + FRAME_OVERHEAD;
            let make = move |_: &mut super::queue::FrameBuffers| {
                let d = Deliver {
                    sub_id,
                    topic: subject,
                    sender,
                    seq,
                    origin: None,
                    payload: PayloadRef::Inline,
                };
                let head = encode_head(&d).ok()?;
                // Sized above to fit; were it not, `deliver` counts it
                // as a gap on the monitor's subscription.
                if head.len() + bytes.len() > MAX_PACKET {
                    return None;
                }
                Some(OutFrame { head, payload: Some(bytes), shared_fd: None, control_fds: Vec::new() })
            };
            self.deliver(peer, sub_id, (cost, 0, None), make, now);
        }
    }

    /// The `Sender` stamp of peer `id` (the broker's own if it is gone).
    pub(crate) fn stamp(&self, id: PeerId) -> Sender {
        match self.peers.get(&id) {
            Some(p) => Sender { client_id: id, uid: p.cred.uid, gid: p.cred.gid, pid: p.cred.pid },
            None => self.cfg.broker,
        }
    }
}
