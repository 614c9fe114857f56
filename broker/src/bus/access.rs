//! Access: the policy file as the bus applies it to one connection.
//!
//! Model (dbus-broker's): the rules are compiled into a per-peer
//! [`Snapshot`] when the peer connects (its uid and every group the kernel
//! reported with `SO_PEERGROUPS`), and each operation asks that snapshot
//! once, when it is made: a subscription, a name, a channel handle, a
//! monitor, a query. A publish asks once per subject, not per message: the
//! verdict is kept in a small per-peer table, so a publisher's steady
//! stream costs a hash lookup, and fan-out costs no policy lookup at all
//! (every subscription was checked when it was made). Without a policy
//! file a connection is [`Access::open`]: admission by uid is the only
//! gate, as before, but for monitoring, which shows requests and replies
//! between other clients and so needs root or the broker's uid.
//!
//! Invariant: a refusal names the action, the subject and the rule that
//! decided, so an administrator can find the line to change.
//!
//! On reload every peer gets a new snapshot ([`Access::of`]), its publish
//! verdicts are forgotten, and the bus ends what the new rules no longer
//! allow (`bus/mod.rs`, `reload_policy`). No I/O.

use std::collections::HashMap;
use std::time::Instant;

use shmbus_proto::frame::{
    decode_broker, BrokerFrame, ErrorCode, Gap, Op, PolicyCheck, PolicyVerdict, QueryEnd, QueryItem,
    QueryItemBody, Revocation, Revoked,
};
use shmbus_proto::subject::validate_pattern;
use shmbus_proto::sys::socket::PeerCred;
use shmbus_proto::text::escape;

use super::name::OwnerChange;
use super::peer::PeerId;
use super::rules::{Action, Rules, Snapshot};
use super::{bump, Bus};

/// How many subject bytes of publish verdicts one peer keeps before the
/// table starts over: bounds the memory a publisher cycling through
/// subjects can make the broker hold.
const PUBLISH_VERDICT_BYTES: usize = 16 * 1024;

/// One connection's rights.
#[derive(Debug, Clone)]
pub struct Access {
    /// `None`: no policy file; everything is allowed but monitoring,
    /// which only a privileged peer may do.
    snapshot: Option<Snapshot>,
    privileged: bool,
    /// Publish verdicts by subject, and the bytes of their keys.
    publish: HashMap<Box<str>, bool>,
    publish_bytes: usize,
}

impl Access {
    /// No policy file: every admitted peer may do everything but
    /// monitor; a `privileged` one (root, the broker's uid) that too.
    pub fn open(privileged: bool) -> Access {
        Access { snapshot: None, privileged, publish: HashMap::new(), publish_bytes: 0 }
    }

    /// The rights a compiled snapshot gives.
    pub fn of(snapshot: Snapshot) -> Access {
        let privileged = snapshot.is_privileged();
        Access { snapshot: Some(snapshot), privileged, publish: HashMap::new(), publish_bytes: 0 }
    }

    /// Whether a policy file governs this peer.
    pub fn governed(&self) -> bool {
        self.snapshot.is_some()
    }

    /// `action` on a concrete `subject` (a topic, a name, or "" for
    /// connect, monitor and introspect): `Err` with the refusal's text.
    pub fn check(&self, action: Action, subject: &str) -> Result<(), String> {
        let Some(s) = &self.snapshot else {
            if action == Action::Monitor && !self.privileged {
                return Err("denied: without a policy file only root and the broker's uid may monitor".into());
            }
            return Ok(());
        };
        let verdict = s.decide(action, subject);
        if verdict.allowed {
            Ok(())
        } else {
            Err(refusal(action, subject, &verdict.to_string()))
        }
    }

    /// What deciding a pattern for `action` may cost, in policy entries
    /// looked at: counted as work, so a peer flooding refused
    /// subscriptions gets no bigger share of the broker than any other.
    pub fn pattern_cost(&self, action: Action) -> u64 {
        self.snapshot.as_ref().map_or(0, |s| s.entry_count(action) as u64)
    }

    /// `action` (subscribe, channel-read) on a `pattern`: allowed only if
    /// every subject it can match is.
    pub fn check_pattern(&self, action: Action, pattern: &str) -> Result<(), String> {
        let Some(s) = &self.snapshot else { return Ok(()) };
        let verdict = s.decide_pattern(action, pattern);
        if verdict.allowed {
            Ok(())
        } else {
            Err(refusal(action, pattern, &verdict.to_string()))
        }
    }

    /// A publish on `topic`, with the verdict remembered per subject.
    pub fn check_publish(&mut self, topic: &str) -> Result<(), String> {
        let Some(s) = &self.snapshot else { return Ok(()) };
        if let Some(&allowed) = self.publish.get(topic) {
            if allowed {
                return Ok(());
            }
            // Refusals are rare; the text is built afresh.
            return self.check(Action::Publish, topic);
        }
        let allowed = s.decide(Action::Publish, topic).allowed;
        if self.publish_bytes + topic.len() > PUBLISH_VERDICT_BYTES {
            self.publish.clear();
            self.publish_bytes = 0;
        }
        self.publish_bytes += topic.len();
        self.publish.insert(topic.into(), allowed);
        if allowed {
            Ok(())
        } else {
            self.check(Action::Publish, topic)
        }
    }
}

// ------------------------------------------------------- the bus's side --

/// Most groups a `PolicyCheck` may name (a check costs rules × groups;
/// a real user has a few dozen).
const MAX_CHECK_GIDS: usize = 64;

/// What a reload ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Revocations {
    pub subscriptions: usize,
    pub names: usize,
    pub channels: usize,
}

impl Bus {
    /// The rights of a peer with these credentials under the current rules.
    pub(crate) fn access_for(&self, cred: &PeerCred, groups: &[u32]) -> Access {
        match &self.cfg.rules {
            None => Access::open(cred.uid == 0 || cred.uid == self.cfg.broker.uid),
            Some(rules) => Access::of(rules.snapshot(cred.uid, groups, self.cfg.broker.uid)),
        }
    }

    /// Logs a policy refusal, at a bounded rate, naming the peer.
    pub(crate) fn denial(&mut self, id: PeerId, message: &str) {
        bump(&mut self.counters.policy_denials, 1);
        if let Some(p) = self.peers.get(&id) {
            let who = p.who();
            let uid = p.cred.uid;
            self.warn_limited(Some(uid), || format!("{who}: {message}"));
        }
    }

    /// Puts new rules in force (`None`: no policy file). Every peer gets a
    /// new snapshot; what the new rules no longer allow is ended, each
    /// with a `Revoked` notice to its client: subscriptions and monitors,
    /// names (owned or queued for), and ring channels (for every member,
    /// since a mapped ring cannot be taken back from one reader).
    /// Connections stay: admission is decided at connect.
    pub fn reload_policy(&mut self, rules: Option<Rules>, now: Instant) -> Revocations {
        self.log.see(now);
        self.cfg.rules = rules;
        let mut done = Revocations::default();
        // Owner changes, announced once every revocation is made: a name
        // handed to a queued peer that loses it in the same reload is
        // announced going to its final owner, never to one the new rules
        // do not allow.
        let mut changes: Vec<OwnerChange> = Vec::new();
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            let Some(p) = self.peers.get(&id) else { continue };
            if p.is_closing() {
                continue;
            }
            let access = self.access_for(&p.cred, &p.groups);
            let monitors = self.monitors.of(id);
            let mut subs: Vec<(u32, String)> = p
                .subs
                .iter()
                .filter_map(|(&sub_id, sub)| {
                    let verdict = if monitors.contains(&sub_id) {
                        access.check(Action::Monitor, "")
                    } else {
                        access.check_pattern(Action::Subscribe, &sub.state.pattern)
                    };
                    verdict.err().map(|e| (sub_id, e))
                })
                .collect();
            subs.sort_unstable();
            let names: Vec<(String, String)> = p
                .names
                .iter()
                .filter_map(|n| access.check(Action::Own, n).err().map(|e| (n.clone(), e)))
                .collect();
            let channels: Vec<(u64, String)> = p
                .channels
                .iter()
                .filter_map(|&(channel_id, reader_id)| {
                    let topic = &self.channels.by_id.get(&channel_id)?.topic;
                    let action = if reader_id == 0 { Action::ChannelPublish } else { Action::ChannelRead };
                    access.check_pattern(action, topic).err().map(|e| (channel_id, e))
                })
                .collect();
            if let Some(p) = self.peers.get_mut(&id) {
                p.access = access;
            }
            for (sub_id, why) in subs {
                self.revoke_subscription(id, sub_id, &why, now);
                done.subscriptions += 1;
            }
            for (name, why) in names {
                self.unserve_revoked(id, &name, now);
                let (_, change) = self.names.release(&name, id);
                if let Some(p) = self.peers.get_mut(&id) {
                    p.names.retain(|n| *n != name);
                }
                let reason = format!("policy reloaded: {why}");
                self.control(id, &Revoked { what: Revocation::Name { name: &name }, reason: &reason }, now);
                changes.extend(change);
                done.names += 1;
            }
            for (channel_id, why) in channels {
                if self.revoke_channel(channel_id, &why, now) {
                    done.channels += 1;
                }
            }
        }
        let mut last: Vec<OwnerChange> = Vec::new();
        for c in changes {
            match last.iter_mut().find(|l| l.name == c.name) {
                Some(l) => l.new = c.new,
                None => last.push(c),
            }
        }
        for c in last {
            if c.old != c.new {
                self.announce(Some(c), now);
            }
        }
        done
    }

    /// Ends subscription (or monitor) `sub_id` of `id` with a notice; a
    /// gap still owed on it is sent first.
    fn revoke_subscription(&mut self, id: PeerId, sub_id: u32, why: &str, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let Some(sub) = p.subs.remove(&sub_id) else { return };
        // What was queued for it and not yet sent is not sent: the new
        // rules apply at once. It is counted in the gap before the notice.
        let unsent = p
            .queue
            .take_where(
                |f| matches!(decode_broker(&f.head), Ok(BrokerFrame::Deliver(d, _)) if d.sub_id == sub_id),
            )
            .len() as u64;
        let missed = sub.state.missed + unsent;
        if self.monitors.remove(id, sub_id) {
            // A monitor's end is no event.
        } else {
            self.router.remove(&sub.state.pattern, (id, sub_id));
            self.monitor_subscription(
                id,
                shmbus_proto::frame::MonitorKind::Unsubscribe,
                &sub.state.pattern,
                now,
            );
        }
        if missed > 0 {
            self.control(id, &Gap { sub_id, missed }, now);
            bump(&mut self.counters.gap_notices, 1);
        }
        let reason = format!("policy reloaded: {why}");
        self.control(id, &Revoked { what: Revocation::Subscription { sub_id }, reason: &reason }, now);
    }

    /// Requests for `name` queued for `id` and not yet sent are not sent:
    /// their callers are answered `ResponderGone` now (the service may no
    /// longer have them), and their reply slots go.
    fn unserve_revoked(&mut self, id: PeerId, name: &str, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let serials: Vec<u64> = p
            .queue
            .take_where(|f| matches!(decode_broker(&f.head), Ok(BrokerFrame::Serve(r, _)) if r.name == name))
            .iter()
            .filter_map(|f| match decode_broker(&f.head) {
                Ok(BrokerFrame::Serve(r, _)) => Some(r.serial),
                _ => None,
            })
            .collect();
        for serial in serials {
            self.drop_request(id, serial, now);
        }
    }

    /// Closes ring channel `channel_id` for every member, each told why.
    fn revoke_channel(&mut self, channel_id: u64, why: &str, now: Instant) -> bool {
        let Some(ch) = self.channels.by_id.get(&channel_id) else { return false };
        let publisher = ch.publisher;
        let mut members: Vec<PeerId> = ch.readers.values().map(|r| r.peer).collect();
        members.push(publisher);
        members.sort_unstable();
        members.dedup();
        if let Some(p) = self.peers.get_mut(&publisher) {
            p.channels.retain(|h| *h != (channel_id, 0));
        }
        self.close_channel(channel_id, super::channel::Ending::Revoked);
        let reason = format!("policy reloaded: channel closed for every member: {why}");
        for member in members {
            self.control(member, &Revoked { what: Revocation::Channel { channel_id }, reason: &reason }, now);
        }
        true
    }

    /// `PolicyCheck`: how the rules in force decide an action, for a peer
    /// with the `introspect` right.
    pub(crate) fn policy_check(&mut self, id: PeerId, c: PolicyCheck<'_>, now: Instant) {
        let op = Op::Query { req_id: c.req_id };
        let Some(p) = self.peers.get(&id) else { return };
        if let Err(msg) = p.access.check(Action::Introspect, "") {
            self.denial(id, &msg);
            return self.op_error(id, op, ErrorCode::Denied, &msg, now);
        }
        let Some(action) = Action::parse(c.action) else {
            let names: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
            let msg = format!("unknown action {:?}: one of {}", escape(c.action), names.join(", "));
            return self.op_error(id, op, ErrorCode::Unsupported, &msg, now);
        };
        // A pattern only where the action takes one (a subscription, a
        // channel read); a publish, a name or a channel is one subject, and
        // a wildcard there would be answered as if it were literal.
        let valid = match action {
            Action::Subscribe | Action::ChannelRead => validate_pattern(c.subject),
            a if a.takes_pattern() => shmbus_proto::subject::validate_subject(c.subject),
            _ => Ok(()),
        };
        if let Err(e) = valid {
            let msg = format!("invalid subject {:?}: {e}", escape(c.subject));
            return self.op_error(id, op, ErrorCode::InvalidSubject, &msg, now);
        }
        if c.gids.len() > MAX_CHECK_GIDS {
            let msg = format!("at most {MAX_CHECK_GIDS} groups per check");
            return self.op_error(id, op, ErrorCode::LimitExceeded, &msg, now);
        }
        let gid = c.gids.first().copied().unwrap_or(c.uid);
        let cred = PeerCred { pid: 0, uid: c.uid, gid };
        let mut gids = c.gids.clone();
        if gids.is_empty() {
            gids.push(gid);
        }
        let verdict = match &self.cfg.rules {
            Some(rules) => {
                // A snapshot looks at each rule's groups against these:
                // work like deliveries, so a flood of checks gets no bigger
                // share of a loop turn than any other peer.
                let cost = rules.rule_count() as u64 * (1 + gids.len() as u64 / 64);
                self.work = self.work.wrapping_add(cost);
                let snapshot = rules.snapshot(c.uid, &gids, self.cfg.broker.uid);
                // And deciding looks at each entry of the action that applies.
                self.work = self.work.wrapping_add(snapshot.entry_count(action) as u64);
                let v = if matches!(action, Action::Subscribe | Action::ChannelRead) {
                    snapshot.decide_pattern(action, c.subject)
                } else {
                    snapshot.decide(action, c.subject)
                };
                PolicyVerdict { allowed: v.allowed, explanation: v.to_string() }
            }
            None if action == Action::Connect => match self.cfg.policy.admit(&cred) {
                Ok(()) => PolicyVerdict {
                    allowed: true,
                    explanation: "allow: no policy file; the uid is admitted".into(),
                },
                Err(e) => PolicyVerdict { allowed: false, explanation: format!("deny: no policy file; {e}") },
            },
            None => PolicyVerdict {
                allowed: true,
                explanation: "allow: no policy file; every admitted peer may do everything".into(),
            },
        };
        let item = QueryItem { req_id: c.req_id, item: QueryItemBody::Verdict(verdict) };
        self.control(id, &item, now);
        self.control(id, &QueryEnd { req_id: c.req_id, next: None }, now);
    }
}

fn refusal(action: Action, subject: &str, verdict: &str) -> String {
    let subject = shmbus_proto::text::escape(subject);
    if subject.is_empty() {
        format!("denied by policy: {}: {verdict}", action.as_str())
    } else {
        format!("denied by policy: {} {subject}: {verdict}", action.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::super::rules::{Accounts, Rules};
    use super::*;

    fn access(text: &str, uid: u32, gids: &[u32]) -> Access {
        let rules = Rules::parse(text, &Accounts::parse("", "")).unwrap();
        Access::of(rules.snapshot(uid, gids, 4242))
    }

    const FILE: &str = r#"
[[rule]]
match = {}
allow = ["connect", "publish a.>", "subscribe a.>"]
deny = ["publish a.secret"]
"#;

    #[test]
    fn open_access_allows_everything() {
        let mut a = Access::open(false);
        assert!(!a.governed());
        assert!(a.check(Action::Monitor, "").is_err(), "monitoring needs privilege without a policy");
        assert!(Access::open(true).check(Action::Monitor, "").is_ok());
        assert!(a.check(Action::Introspect, "").is_ok());
        assert!(a.check_pattern(Action::Subscribe, ">").is_ok());
        assert!(a.check_publish("x").is_ok());
    }

    #[test]
    fn refusals_name_action_subject_and_rule() {
        let mut a = access(FILE, 1000, &[1000]);
        assert!(a.governed());
        assert!(a.check_publish("a.b").is_ok());
        let e = a.check_publish("a.secret").unwrap_err();
        assert!(e.contains("publish a.secret") && e.contains("line"), "{e}");
        let e = a.check_pattern(Action::Subscribe, ">").unwrap_err();
        assert!(e.contains("subscribe >"), "{e}");
        let e = a.check(Action::Monitor, "").unwrap_err();
        assert!(e.starts_with("denied by policy: monitor:"), "{e}");
    }

    #[test]
    fn publish_verdicts_are_remembered_within_a_bound() {
        let mut a = access(FILE, 1000, &[1000]);
        for i in 0..100_000 {
            let topic = format!("a.{i}");
            assert!(a.check_publish(&topic).is_ok());
            // Asked twice: the second answer comes from the table.
            assert!(a.check_publish(&topic).is_ok());
            assert!(a.publish_bytes <= PUBLISH_VERDICT_BYTES);
        }
        assert!(a.check_publish("a.secret").is_err());
        assert!(a.check_publish("a.secret").is_err(), "a remembered refusal is still a refusal");
    }
}
