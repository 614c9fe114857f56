//! The driver: what each frame from a peer does (dbus-broker's `driver.c`).
//!
//! Model: a packet is decoded by the panic-free codec, checked against the
//! peer's state (nothing but `Hello` before `Hello`; no second `Hello`;
//! fds only where the frame declares them), then handed to its handler.
//! A malformed packet ends the peer with a reason; a refused operation
//! answers with an `OpError` and the peer goes on.
//!
//! Truncation: `MSG_TRUNC` (a packet over the size limit) is the sender's
//! fault. `MSG_CTRUNC` is the sender's fault when it attached more fds
//! than a packet may carry, but the broker's own when its fd table is full
//! and the kernel could not install them; the daemon tells which, and in
//! the second case the operation is refused with `BrokerResource` and the
//! peer stays.

use std::os::fd::OwnedFd;
use std::time::Instant;

use tracing::debug;

use shmbus_proto::frame::{
    decode_client, ClientFrame, DecodeError, ErrorCode, FdAck, GoodbyeCode, Limits, MonitorKind, Op,
    PayloadRef, Pong, Subscribe, Subscribed, Welcome, PROTOCOL_VERSION,
};
use shmbus_proto::limits::{MAX_CLIENT_NAME, MAX_INLINE_PAYLOAD, MAX_PACKET, MAX_SUBJECT_DEPTH};
use shmbus_proto::subject::validate_pattern;
use shmbus_proto::text::quote;

use super::monitor::Seen;
use super::peer::{LinkPhase, PeerId, PeerState, Subscription};
use super::queue::SubState;
use super::quota::{charge_usage, Resource};
use super::rules::Action;
use super::{bump, Bus, Effect};

/// How a packet arrived damaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damage {
    /// Larger than the largest packet (`MSG_TRUNC`).
    Truncated,
    /// Its fds did not all arrive (`MSG_CTRUNC`), and the broker's own fd
    /// table had room: the sender attached too many.
    TooManyFds,
    /// Its fds did not all arrive because the broker's fd table is full.
    BrokerOutOfFds,
}

impl Bus {
    /// A packet arrived from `id`, with the fds that came beside it.
    pub fn receive(&mut self, id: PeerId, packet: &[u8], fds: Vec<OwnedFd>, now: Instant) {
        self.log.see(now);
        let Some(p) = self.peers.get(&id) else { return };
        if p.is_closing() {
            // Nothing it says counts any more, but for giving back fds:
            // that is what lets a closing or lingering peer go.
            if let Ok(ClientFrame::FdAck(a)) = decode_client(packet) {
                self.fd_ack(id, a, now);
            }
            return;
        }
        let frame = match decode_client(packet) {
            Ok(f) => f,
            Err(DecodeError::Version(v)) => {
                bump(&mut self.counters.protocol_errors, 1);
                let reason =
                    format!("protocol version {v} is not supported (broker speaks {PROTOCOL_VERSION})");
                return self.begin_close(id, GoodbyeCode::VersionMismatch, &reason, now);
            }
            Err(e) => return self.violation(id, &e.to_string(), now),
        };
        if !fds.is_empty() {
            // Fds are closed when `fds` drops, whatever happens below.
            let memfd = |p: &PayloadRef| matches!(p, PayloadRef::Memfd { .. });
            let declared = match &frame {
                ClientFrame::Publish(p, _) => memfd(&p.payload),
                ClientFrame::Request(r, _) => memfd(&r.payload),
                ClientFrame::Reply(r, _) => memfd(&r.payload),
                _ => false,
            };
            if !declared {
                let what = frame_name(&frame);
                return self.violation(id, &format!("unexpected fd attached to a {what} frame"), now);
            }
        }
        let p = self.peers.get_mut(&id).expect("looked up above");
        let state = p.state;
        // `Attach` is only for the frame right after `Hello`.
        let may_attach = matches!(p.link, LinkPhase::Offerable);
        if may_attach {
            p.link = LinkPhase::Closed;
        }
        match (state, frame) {
            (PeerState::AwaitHello, ClientFrame::Hello(h)) => self.hello(id, h.version, h.name, now),
            (PeerState::AwaitHello, f) => {
                let what = frame_name(&f);
                self.violation(id, &format!("{what} frame before Hello"), now)
            }
            (_, ClientFrame::Hello(_)) => self.violation(id, "second Hello", now),
            (_, ClientFrame::Subscribe(s)) => self.subscribe(id, s, now),
            (_, ClientFrame::Unsubscribe(u)) => self.unsubscribe(id, u.sub_id, now),
            (_, ClientFrame::Publish(p, payload)) => self.publish(id, &p, payload, fds, now),
            (_, ClientFrame::Ping(p)) => {
                self.control(id, &Pong { token: p.token }, now);
            }
            (_, ClientFrame::Query(q)) => self.query(id, q.req_id, q.what, q.after, now),
            (_, ClientFrame::ChannelOpen(o)) => self.channel_open(id, o.req_id, o.topic, o.role, now),
            (_, ClientFrame::ChannelClose(c)) => self.channel_close(id, c.channel_id, c.reader_id, now),
            (_, ClientFrame::FdAck(a)) => self.fd_ack(id, a, now),
            (_, ClientFrame::NameRequest(n)) => self.name_request(id, n.req_id, n.name, n.flags, now),
            (_, ClientFrame::NameRelease(n)) => self.name_release(id, n.req_id, n.name, now),
            (_, ClientFrame::GetNameOwner(n)) => self.get_name_owner(id, n.req_id, n.name, now),
            (_, ClientFrame::Request(r, payload)) => self.request(id, r, payload, fds, now),
            (_, ClientFrame::Reply(r, payload)) => self.reply(id, r, payload, fds, now),
            (_, ClientFrame::Monitor(m)) => self.monitor_start(id, m, now),
            (_, ClientFrame::PolicyCheck(c)) => self.policy_check(id, c, now),
            (_, ClientFrame::Attach(a)) => self.attach(id, a, may_attach, now),
            // The daemon answers doorbells; one that reaches here is moot.
            (_, ClientFrame::Doorbell) => {}
        }
    }

    /// A packet arrived damaged (see [`Damage`]).
    pub fn receive_damaged(&mut self, id: PeerId, damage: Damage, packet: &[u8], now: Instant) {
        self.log.see(now);
        match damage {
            Damage::Truncated => self.violation(id, &format!("packet larger than {MAX_PACKET} bytes"), now),
            Damage::TooManyFds => self.violation(id, "more fds than one packet may carry", now),
            Damage::BrokerOutOfFds => {
                bump(&mut self.counters.broker_resource_errors, 1);
                let msg = "the broker has run out of file descriptors and could not take the attached fd; \
                           retry later";
                match decode_client(packet) {
                    Ok(ClientFrame::Publish(..)) => {
                        let Some(p) = self.peers.get_mut(&id) else { return };
                        // Numbered like any publish, so the client's count
                        // and the broker's stay equal.
                        p.published += 1;
                        let seq = p.published;
                        let who = p.who();
                        let uid = p.cred.uid;
                        self.warn_limited(Some(uid), || {
                            format!("{who}: publish refused: broker out of file descriptors")
                        });
                        self.op_error(id, Op::Publish { seq }, ErrorCode::BrokerResource, msg, now);
                    }
                    Ok(ClientFrame::Request(r, _)) => {
                        let msg =
                            "the broker has run out of file descriptors and could not take the request's \
                                   payload; retry later";
                        self.refuse_request(id, r.call_id, msg, now);
                    }
                    Ok(ClientFrame::Reply(r, _)) => {
                        let msg =
                            "the broker has run out of file descriptors and could not take the reply's \
                                   payload";
                        self.refuse_reply(id, r.serial, msg, now);
                    }
                    // No other frame may carry fds: the sender's fault.
                    Ok(f) => {
                        let what = frame_name(&f);
                        self.violation(id, &format!("unexpected fd attached to a {what} frame"), now)
                    }
                    Err(e) => self.violation(id, &e.to_string(), now),
                }
            }
        }
    }

    fn hello(&mut self, id: PeerId, version: u16, name: &str, now: Instant) {
        if version != u16::from(PROTOCOL_VERSION) {
            let reason =
                format!("protocol version {version} is not supported (broker speaks {PROTOCOL_VERSION})");
            bump(&mut self.counters.protocol_errors, 1);
            return self.begin_close(id, shmbus_proto::frame::GoodbyeCode::VersionMismatch, &reason, now);
        }
        if name.len() > MAX_CLIENT_NAME {
            return self.violation(id, "client name too long", now);
        }
        let limits = Limits {
            max_packet: MAX_PACKET as u32,
            max_inline_payload: MAX_INLINE_PAYLOAD as u32,
            queue_bytes: self.cfg.queue.bytes,
            queue_frames: self.cfg.queue.frames,
            max_subscriptions: self.cfg.max_subscriptions,
            fd_window: self.cfg.fd_window,
            max_depth: MAX_SUBJECT_DEPTH as u32,
        };
        let Some(p) = self.peers.get_mut(&id) else { return };
        p.name = name.to_owned();
        p.state = PeerState::Ready;
        p.link = LinkPhase::Offerable;
        debug!("{} said hello as {}", p.who(), shmbus_proto::text::escape(name));
        self.control(id, &Welcome { client_id: id, limits }, now);
        if !self.monitors.is_empty() {
            let Some(p) = self.peers.get(&id) else { return };
            let seen = Seen {
                kind: MonitorKind::Connect,
                subject: "",
                sender: self.stamp(id),
                receivers: Vec::new(),
                detail: format!("{} as {}", p.who(), shmbus_proto::text::escape(name)),
                payload_ref: PayloadRef::Inline,
                payload: &[],
            };
            self.monitor_event(seen, now);
        }
    }

    fn subscribe(&mut self, id: PeerId, s: Subscribe<'_>, now: Instant) {
        let max = self.cfg.max_subscriptions as usize;
        let op = Op::Subscribe { sub_id: s.sub_id };
        let Some(p) = self.peers.get(&id) else { return };
        // Deciding it against the policy is work like a delivery.
        let cost = p.access.pattern_cost(Action::Subscribe);
        self.work = self.work.wrapping_add(cost);
        let refusal = if let Err(e) = validate_pattern(s.pattern) {
            Some((ErrorCode::InvalidSubject, format!("invalid pattern {}: {e}", quote(s.pattern))))
        } else if let Err(e) = p.access.check_pattern(Action::Subscribe, s.pattern) {
            Some((ErrorCode::Denied, e))
        } else {
            p.sub_id_refusal(s.sub_id, max)
        };
        if let Some((code, message)) = refusal {
            return self.refuse_subscription(id, op, code, &message, now);
        }
        let cost = super::router::cost(s.pattern);
        let charge =
            match charge_usage(&p.usage, &[(Resource::Subscriptions, 1), (Resource::RouterBytes, cost)]) {
                Ok(c) => c,
                Err(e) => return self.quota_refusal(id, op, &e, now),
            };
        if !self.router.insert(s.pattern, (id, s.sub_id)) {
            let msg = format!("pattern {} is deeper than the router holds", quote(s.pattern));
            return self.op_error(id, op, ErrorCode::InvalidSubject, &msg, now);
        }
        let state = SubState { pattern: s.pattern.into(), overflow: s.overflow, missed: 0 };
        let Some(p) = self.peers.get_mut(&id) else { return };
        p.subs.insert(s.sub_id, Subscription { state, charge });
        self.control(id, &Subscribed { sub_id: s.sub_id }, now);
        self.monitor_subscription(id, MonitorKind::Subscribe, s.pattern, now);
    }

    /// Refuses a subscription (or monitor): a policy refusal is logged too.
    pub(crate) fn refuse_subscription(
        &mut self,
        id: PeerId,
        op: Op,
        code: ErrorCode,
        message: &str,
        now: Instant,
    ) {
        if code == ErrorCode::Denied {
            self.denial(id, message);
        }
        self.op_error(id, op, code, message, now);
    }

    /// Tells monitors of a subscription made or ended.
    pub(crate) fn monitor_subscription(
        &mut self,
        id: PeerId,
        kind: MonitorKind,
        pattern: &str,
        now: Instant,
    ) {
        if self.monitors.is_empty() {
            return;
        }
        let seen = Seen {
            kind,
            subject: pattern,
            sender: self.stamp(id),
            receivers: Vec::new(),
            detail: String::new(),
            payload_ref: PayloadRef::Inline,
            payload: &[],
        };
        self.monitor_event(seen, now);
    }

    fn unsubscribe(&mut self, id: PeerId, sub_id: u32, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        match p.subs.remove(&sub_id) {
            Some(sub) => {
                let owed = sub.state.missed;
                if !self.monitors.remove(id, sub_id) {
                    self.router.remove(&sub.state.pattern, (id, sub_id));
                    self.monitor_subscription(id, MonitorKind::Unsubscribe, &sub.state.pattern, now);
                }
                if owed > 0 {
                    // The subscription is gone but its loss is still owed:
                    // report it before the acknowledgement.
                    let gap = shmbus_proto::frame::Gap { sub_id, missed: owed };
                    self.control(id, &gap, now);
                    bump(&mut self.counters.gap_notices, 1);
                }
                self.control(id, &Subscribed { sub_id }, now);
            }
            None => self.op_error(
                id,
                Op::Unsubscribe { sub_id },
                ErrorCode::UnknownSubscription,
                &format!("no subscription with id {sub_id}"),
                now,
            ),
        }
    }

    /// The peer says it took `a.fds` more of the fds sent to it. Believed
    /// only once its socket shows them read: until the daemon reports that
    /// ([`Bus::fds_delivered`]), they still count against its window and
    /// its uid's `UnackedFds` (a client can ack fds it never took, and
    /// leave them in flight, charged by the kernel to the broker's user).
    fn fd_ack(&mut self, id: PeerId, a: FdAck, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let fds = u64::from(a.fds);
        if fds > p.unacked_fds && p.is_closing() {
            // Going anyway: nothing to punish, nothing to log.
            return;
        }
        if fds > p.unacked_fds {
            let msg =
                format!("acknowledged {fds} fds, but only {} were sent and unacknowledged", p.unacked_fds);
            return self.violation(id, &msg, now);
        }
        if fds == 0 {
            return;
        }
        p.unacked_fds -= fds;
        p.acked_fds += fds;
        self.effects.push(Effect::Acked(id));
    }
}

pub(crate) fn frame_name(f: &ClientFrame<'_>) -> &'static str {
    match f {
        ClientFrame::Hello(_) => "Hello",
        ClientFrame::Subscribe(_) => "Subscribe",
        ClientFrame::Unsubscribe(_) => "Unsubscribe",
        ClientFrame::Publish(..) => "Publish",
        ClientFrame::Ping(_) => "Ping",
        ClientFrame::Query(_) => "Query",
        ClientFrame::ChannelOpen(_) => "ChannelOpen",
        ClientFrame::ChannelClose(_) => "ChannelClose",
        ClientFrame::FdAck(_) => "FdAck",
        ClientFrame::NameRequest(_) => "NameRequest",
        ClientFrame::NameRelease(_) => "NameRelease",
        ClientFrame::GetNameOwner(_) => "GetNameOwner",
        ClientFrame::Request(..) => "Request",
        ClientFrame::Reply(..) => "Reply",
        ClientFrame::Monitor(_) => "Monitor",
        ClientFrame::PolicyCheck(_) => "PolicyCheck",
        ClientFrame::Attach(_) => "Attach",
        ClientFrame::Doorbell => "Doorbell",
    }
}
