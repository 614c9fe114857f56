//! Services: names and request/reply, with exactly one answer
//! (dbus-broker's `driver.c` name calls and `reply.c`).
//!
//! Model: a request to a name goes to its owner (or one member of a
//! shared name) as a `Serve` frame carrying a broker-chosen `serial`, and
//! the broker keeps a *reply slot* for it: (caller, its `call_id`,
//! responder, deadline). The caller gets exactly one `Answer`:
//! - the responder's `Reply` (or application error), which consumes the
//!   slot, so a second reply, a reply from another peer, or a reply after
//!   the deadline finds no slot and is refused with `NoSuchRequest`;
//! - `Timeout`, when the deadline passes first (the broker enforces it,
//!   so a hung service cannot keep a caller waiting);
//! - `ResponderGone`, when the responder leaves with the slot open;
//! - `NoResponder`, `LimitExceeded` or `Invalid`, at once, when the request
//!   cannot be delivered.
//!
//! When a caller leaves, its slots stay until answered or timed out, with
//! no caller: a reply to one is accepted, dropped and counted. Slots are
//! charged to the caller's uid (`PendingRequests`); names to their owner's
//! (`Names`). Changes of a name's primary owner are published by the
//! broker (client id 0) on `$SYS.name.<name>`, a subject tree only the
//! broker publishes on and anyone may subscribe to. No I/O.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shmbus_proto::frame::{
    encode_head, validate_origin, Answer, ErrorCode, MonitorKind, NameFlags, NameOwner, NameOwnerChanged,
    NameReply, Op, Outcome, PayloadRef, Reply, ReplyStatus, Request, Sender, Serve,
};
use shmbus_proto::limits::{
    MAX_ERROR_MESSAGE, MAX_INLINE_PAYLOAD, MAX_PACKET, MAX_SUBJECT_DEPTH, MAX_SUBJECT_LEN,
};
use shmbus_proto::subject::validate_subject;
use shmbus_proto::sys::memfd::{self, MemfdError};
use shmbus_proto::text::quote;

use super::monitor::Seen;
use super::name::OwnerChange;
use super::peer::PeerId;
use super::queue::{OutFrame, SharedFd, FRAME_OVERHEAD};
use super::quota::{charge_usage, Charge, Resource};
use super::rules::Action;
use super::{bump, Bus};

/// Subjects under this prefix are the broker's: clients may subscribe to
/// them, never publish on them or own them as names.
pub const SYS_PREFIX: &str = "$SYS";
/// Names under this prefix may be owned only by root and the broker's uid.
pub const PRIVILEGED_PREFIX: &str = "shmbus";

/// One pending request.
#[derive(Debug)]
pub struct Slot {
    /// `None` once the caller has left: a reply is then dropped, counted.
    caller: Option<PeerId>,
    call_id: u64,
    responder: PeerId,
    deadline: Instant,
    /// The name called (for the answer's monitor event).
    name: Option<Box<str>>,
    _charge: Charge,
}

/// Every reply slot, by serial, with their deadlines in order.
#[derive(Debug, Default)]
pub struct Replies {
    slots: HashMap<u64, Slot>,
    deadlines: BTreeSet<(Instant, u64)>,
    next_serial: u64,
}

impl Replies {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|d| d.0)
    }

    fn take(&mut self, serial: u64) -> Option<Slot> {
        let slot = self.slots.remove(&serial)?;
        self.deadlines.remove(&(slot.deadline, serial));
        Some(slot)
    }
}

/// Why a name may not be owned by this peer, if it may not.
fn name_refusal(name: &str, uid: u32, privileged: bool) -> Option<(ErrorCode, String)> {
    if let Err(e) = validate_subject(name) {
        return Some((ErrorCode::InvalidSubject, format!("invalid name {}: {e}", quote(name))));
    }
    // `$SYS.name.<name>` must itself be a valid subject.
    if name.split('.').count() > MAX_SUBJECT_DEPTH - 2 || name.len() > MAX_SUBJECT_LEN - 10 {
        let msg = format!("name {} is too long: at most {} tokens", quote(name), MAX_SUBJECT_DEPTH - 2);
        return Some((ErrorCode::InvalidSubject, msg));
    }
    let first = name.split('.').next().unwrap_or("");
    if first == SYS_PREFIX {
        return Some((ErrorCode::ReservedName, format!("names under {SYS_PREFIX} are the broker's")));
    }
    if first == PRIVILEGED_PREFIX && !privileged {
        let msg = format!(
            "names under {PRIVILEGED_PREFIX}. are reserved for root and the broker's uid (uid {uid} asked)"
        );
        return Some((ErrorCode::ReservedName, msg));
    }
    None
}

/// A payload as it arrived: inline bytes, or one sealed memfd.
struct Payload {
    payload_ref: PayloadRef,
    inline: Option<Arc<[u8]>>,
    shared: Option<Rc<SharedFd>>,
}

/// Checks a payload of a `Request` or `Reply` as `Publish` checks its own.
fn check_payload(
    payload_ref: PayloadRef,
    bytes: &[u8],
    mut fds: Vec<OwnedFd>,
) -> Result<Payload, (ErrorCode, String)> {
    match payload_ref {
        PayloadRef::Inline => {
            if bytes.len() > MAX_INLINE_PAYLOAD {
                return Err((ErrorCode::PayloadTooLarge, "inline payload too large".into()));
            }
            let inline = (!bytes.is_empty()).then(|| Arc::from(bytes));
            Ok(Payload { payload_ref, inline, shared: None })
        }
        PayloadRef::Memfd { len } => {
            if fds.len() != 1 || !bytes.is_empty() {
                let msg =
                    format!("a memfd payload is exactly 1 fd and no inline bytes; {} fds came", fds.len());
                return Err((ErrorCode::WrongFdCount, msg));
            }
            let fd = fds.pop().expect("one fd, checked above");
            memfd::check_sealed(fd.as_fd(), len).map_err(|e: MemfdError| {
                let code = match e {
                    MemfdError::NotMemfd => ErrorCode::NotMemfd,
                    MemfdError::NotSealed => ErrorCode::NotSealed,
                    MemfdError::SizeMismatch { .. } => ErrorCode::SizeMismatch,
                    MemfdError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
                    MemfdError::Io(_) | MemfdError::Unmappable(_) => ErrorCode::FdRefused,
                };
                (code, format!("fd refused: {e}"))
            })?;
            Ok(Payload { payload_ref, inline: None, shared: Some(Rc::new(SharedFd { fd, len })) })
        }
    }
}

impl Bus {
    fn privileged(&self, uid: u32) -> bool {
        uid == 0 || uid == self.cfg.broker.uid
    }

    pub(crate) fn name_request(
        &mut self,
        id: PeerId,
        req_id: u32,
        name: &str,
        flags: NameFlags,
        now: Instant,
    ) {
        let op = Op::Name { req_id };
        let Some(p) = self.peers.get(&id) else { return };
        if let Some((code, msg)) = name_refusal(name, p.cred.uid, self.privileged(p.cred.uid)) {
            return self.op_error(id, op, code, &msg, now);
        }
        if let Err(msg) = p.access.check(Action::Own, name) {
            self.denial(id, &msg);
            return self.op_error(id, op, ErrorCode::Denied, &msg, now);
        }
        let charge = if self.names.holds(name, id) {
            // Asking again changes flags; it costs nothing new. The charge
            // below is released at once.
            charge_usage(&p.usage, &[])
        } else {
            charge_usage(&p.usage, &[(Resource::Names, 1)])
        };
        let charge = match charge {
            Ok(c) => c,
            Err(e) => return self.quota_refusal(id, op, &e, now),
        };
        let (result, change) = self.names.request(name, id, flags, charge);
        // The peer's list follows what it holds: a request may also take
        // it out of a queue (asked again with `do_not_queue`: `Exists`).
        let holds = self.names.holds(name, id);
        if let Some(p) = self.peers.get_mut(&id) {
            let listed = p.names.iter().position(|n| n == name);
            match (holds, listed) {
                (true, None) => p.names.push(name.to_owned()),
                (false, Some(i)) => {
                    p.names.swap_remove(i);
                }
                _ => {}
            }
        }
        self.control(id, &NameReply { req_id, result }, now);
        self.announce(change, now);
    }

    pub(crate) fn name_release(&mut self, id: PeerId, req_id: u32, name: &str, now: Instant) {
        let (result, change) = self.names.release(name, id);
        if let Some(p) = self.peers.get_mut(&id) {
            p.names.retain(|n| n != name);
        }
        // A replaced owner that was dropped from the queue holds nothing.
        self.control(id, &NameReply { req_id, result }, now);
        self.announce(change, now);
    }

    pub(crate) fn get_name_owner(&mut self, id: PeerId, req_id: u32, name: &str, now: Instant) {
        let (owner, members) = self.names.owner(name);
        self.control(id, &NameOwner { req_id, owner, members }, now);
    }

    /// Publishes a change of primary owner on `$SYS.name.<name>`.
    pub(crate) fn announce(&mut self, change: Option<OwnerChange>, now: Instant) {
        let Some(c) = change else { return };
        // A peer that lost a name without asking (replaced, no queue)
        // stops listing it.
        if let Some(old) = c.old {
            if !self.names.holds(&c.name, old) {
                if let Some(p) = self.peers.get_mut(&old) {
                    p.names.retain(|n| *n != c.name);
                }
            }
        }
        let event = NameOwnerChanged { name: c.name.clone(), old_owner: c.old, new_owner: c.new };
        let bytes = event.to_bytes();
        let topic = format!("{SYS_PREFIX}.name.{}", c.name);
        self.broker_seq += 1;
        let seq = self.broker_seq;
        let sender = self.cfg.broker;
        self.fan_out(
            super::publish::Route::Walk,
            &topic,
            sender,
            seq,
            None,
            PayloadRef::Inline,
            &bytes,
            None,
            now,
        );
        if !self.monitors.is_empty() {
            let detail = format!("owner {:?} -> {:?}", c.old, c.new);
            let seen = Seen {
                kind: MonitorKind::NameChange,
                subject: &c.name,
                sender,
                receivers: Vec::new(),
                detail,
                payload_ref: PayloadRef::Inline,
                payload: &[],
            };
            self.monitor_event(seen, now);
        }
    }

    /// A peer left: give up its names, and answer what it owed.
    pub(crate) fn leave_services(&mut self, id: PeerId, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let names = std::mem::take(&mut p.names);
        let owed = std::mem::take(&mut p.calls_in);
        let asked = std::mem::take(&mut p.calls_out);
        for change in self.names.release_all(id, &names) {
            self.announce(Some(change), now);
        }
        for serial in owed {
            if let Some(slot) = self.replies.take(serial) {
                if self.shutting_down {
                    // Its caller goes too, and learns it so.
                    continue;
                }
                self.answer(
                    slot.name.as_deref(),
                    slot.caller,
                    slot.call_id,
                    Outcome::ResponderGone,
                    None,
                    None,
                    now,
                );
            }
        }
        for serial in asked {
            if let Some(slot) = self.replies.slots.get_mut(&serial) {
                slot.caller = None;
            }
        }
    }

    /// Sends a caller its one answer (if it is still there). `name`: what
    /// was called, if known (for monitors).
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &mut self,
        name: Option<&str>,
        caller: Option<PeerId>,
        call_id: u64,
        outcome: Outcome<'_>,
        responder: Option<Sender>,
        payload: Option<Payload>,
        now: Instant,
    ) {
        let Some(caller) = caller else { return };
        // The broker's own messages quote what peers sent (bounded by
        // `quote`), and a service's is refused past the bound (`reply`):
        // cut all the same, so no answer outgrows its packet for it.
        let outcome = outcome.clipped(MAX_ERROR_MESSAGE);
        let payload_ref = payload.as_ref().map_or(PayloadRef::Inline, |p| p.payload_ref);
        if !self.monitors.is_empty() {
            let bytes = payload.as_ref().and_then(|p| p.inline.clone());
            let seen = Seen {
                kind: MonitorKind::Answer,
                subject: name.unwrap_or(""),
                sender: responder.unwrap_or(self.cfg.broker),
                receivers: vec![caller],
                detail: format!("{outcome:?}"),
                payload_ref,
                payload: bytes.as_deref().unwrap_or(&[]),
            };
            self.monitor_event(seen, now);
        }
        let answer = Answer { call_id, outcome, responder, payload: payload_ref };
        let (inline, shared) = payload.map_or((None, None), |p| (p.inline, p.shared));
        let inline_len = inline.as_ref().map_or(0, |b| b.len());
        let frame = match encode_head(&answer) {
            Ok(head) if head.len() + inline_len <= MAX_PACKET => {
                OutFrame { head, payload: inline, shared_fd: shared, control_fds: Vec::new() }
            }
            // The limits above keep every answer within a packet; were one
            // not, the caller still gets its one answer, without the
            // payload (never a packet it could not receive).
            too_big => {
                let size = too_big.map_or(MAX_PACKET + 1, |h| h.len()) + inline_len;
                let message = format!("the answer ({size} bytes) does not fit in a packet");
                self.warn_limited(self.peers.get(&caller).map(|p| p.cred.uid), || {
                    format!("call {call_id} of client {caller}: {message}")
                });
                let answer = Answer {
                    call_id,
                    outcome: Outcome::Invalid { message: &message },
                    responder,
                    payload: PayloadRef::Inline,
                };
                match encode_head(&answer) {
                    Ok(head) => OutFrame::control(head),
                    // A call id, a short text and a stamp: never too long.
                    Err(_) => return,
                }
            }
        };
        self.push_answer(caller, frame, now);
    }

    pub(crate) fn request(
        &mut self,
        id: PeerId,
        r: Request<'_>,
        bytes: &[u8],
        fds: Vec<OwnedFd>,
        now: Instant,
    ) {
        let call_id = r.call_id;
        let Some(p) = self.peers.get(&id) else { return };
        let sender = Sender { client_id: id, uid: p.cred.uid, gid: p.cred.gid, pid: p.cred.pid };
        let usage = p.usage.clone();
        let refuse = |bus: &mut Bus, outcome: Outcome<'_>| {
            bus.answer(Some(r.name), Some(id), call_id, outcome, None, None, now)
        };
        if let Err(e) = validate_subject(r.name) {
            let msg = format!("invalid name {}: {e}", quote(r.name));
            return refuse(self, Outcome::Invalid { message: &msg });
        }
        if let Some(Err(e)) = r.origin.map(validate_origin) {
            let msg = format!("invalid origin for a call to {}: {e}", quote(r.name));
            return refuse(self, Outcome::Invalid { message: &msg });
        }
        let payload = match check_payload(r.payload, bytes, fds) {
            Ok(p) => p,
            Err((_, msg)) => return refuse(self, Outcome::Invalid { message: &msg }),
        };
        let charge = if r.no_reply {
            charge_usage(&usage, &[])
        } else {
            charge_usage(&usage, &[(Resource::PendingRequests, 1)])
        };
        let charge = match charge {
            Ok(c) => c,
            Err(e) => {
                bump(&mut self.counters.quota_refusals, 1);
                let msg = e.to_string();
                return refuse(self, Outcome::LimitExceeded { message: &msg });
            }
        };
        let denied = self.peers.get(&id).and_then(|p| p.access.check(Action::Call, r.name).err());
        if let Some(msg) = denied {
            self.denial(id, &msg);
            return refuse(self, Outcome::Denied { message: &msg });
        }
        let Some(responder) = self.names.route(r.name) else {
            return refuse(self, Outcome::NoResponder);
        };
        let max = self.cfg.max_request_timeout;
        let timeout = match r.timeout_ms {
            0 => max,
            ms => Duration::from_millis(u64::from(ms)).min(max),
        };
        self.replies.next_serial += 1;
        let serial = self.replies.next_serial;
        let serve = Serve {
            serial,
            name: r.name,
            sender,
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            no_reply: r.no_reply,
            origin: r.origin,
            payload: payload.payload_ref,
        };
        let inline_len = payload.inline.as_ref().map_or(0, |b| b.len());
        // The request's own limits keep this within a packet (a `Serve` is
        // its `Request` and a stamp); were it not, the caller is told.
        let head = match encode_head(&serve) {
            Ok(head) if head.len() + inline_len <= MAX_PACKET => head,
            _ => {
                return refuse(
                    self,
                    Outcome::Invalid { message: "the request does not fit in a packet with its stamp" },
                )
            }
        };
        let memfd = payload.shared.as_ref().map(|s| s.len);
        let cost = head.capacity() + inline_len + FRAME_OVERHEAD;
        let Some(rp) = self.peers.get_mut(&responder) else { return refuse(self, Outcome::NoResponder) };
        if rp.is_closing() || !rp.queue.delivery_room(cost, usize::from(memfd.is_some()), memfd) {
            let msg = format!(
                "the service (client {responder}) has {} frames ({} bytes) queued and takes no more",
                rp.queue.len(),
                rp.queue.bytes()
            );
            return refuse(self, Outcome::LimitExceeded { message: &msg });
        }
        let frame =
            OutFrame { head, payload: payload.inline, shared_fd: payload.shared, control_fds: Vec::new() };
        let watched = (!self.monitors.is_empty()).then(|| (frame.payload.clone(), serve.payload));
        if rp.queue.push_control(frame).is_err() {
            return refuse(self, Outcome::LimitExceeded { message: "the service's queue is full" });
        }

        bump(&mut self.counters.requests, 1);
        // Kept for the answer's monitor event (a monitor may start while
        // the call is pending): one boxed name per pending call.
        let name = Some(r.name.into());
        if !r.no_reply {
            rp.calls_in.insert(serial);
            let deadline = now + timeout;
            self.replies.slots.insert(
                serial,
                Slot { caller: Some(id), call_id, responder, deadline, name, _charge: charge },
            );
            self.replies.deadlines.insert((deadline, serial));
            if let Some(p) = self.peers.get_mut(&id) {
                p.calls_out.insert(serial);
            }
        }
        self.mark_dirty(responder);
        if let Some((bytes, payload_ref)) = watched {
            let seen = Seen {
                kind: MonitorKind::Request,
                subject: r.name,
                sender,
                receivers: vec![responder],
                detail: if r.no_reply { "no reply wanted".into() } else { String::new() },
                payload_ref,
                payload: bytes.as_deref().unwrap_or(&[]),
            };
            self.monitor_event(seen, now);
        }
    }

    pub(crate) fn reply(&mut self, id: PeerId, r: Reply<'_>, bytes: &[u8], fds: Vec<OwnedFd>, now: Instant) {
        let serial = r.serial;
        let op = Op::Reply { serial };
        if self.replies.slots.get(&serial).is_none_or(|s| s.responder != id) {
            bump(&mut self.counters.replies_refused, 1);
            let msg = format!("no request with serial {serial} waits for a reply from this client");
            return self.op_error(id, op, ErrorCode::NoSuchRequest, &msg, now);
        }
        let slot = self.replies.take(serial).expect("checked above");
        if let Some(p) = self.peers.get_mut(&id) {
            p.calls_in.remove(&serial);
        }
        if let Some(caller) = slot.caller {
            if let Some(p) = self.peers.get_mut(&caller) {
                p.calls_out.remove(&serial);
            }
        } else {
            // The caller left: dropped, counted.
            bump(&mut self.counters.replies_dropped, 1);
            return;
        }
        let Some(p) = self.peers.get(&id) else { return };
        let responder = Sender { client_id: id, uid: p.cred.uid, gid: p.cred.gid, pid: p.cred.pid };
        // A reply refused (an error message past the bound, a payload that
        // fails its checks; its fds close here): the caller still gets its
        // one answer, and the service is told why.
        let checked = match r.status {
            ReplyStatus::Error { message, .. } if message.len() > MAX_ERROR_MESSAGE => {
                let msg = format!("an error message of {} bytes; at most {MAX_ERROR_MESSAGE}", message.len());
                Err((ErrorCode::LimitExceeded, msg))
            }
            _ => check_payload(r.payload, bytes, fds),
        };
        // An answer is a control frame (never dropped), but its memfd holds
        // memory as a delivery's does: held to the caller's memfd bounds.
        let caller_queue = slot.caller.and_then(|c| self.peers.get(&c)).map(|c| &c.queue);
        let checked = checked.and_then(|p| match (&p.shared, caller_queue) {
            (Some(m), Some(q)) if !q.memfd_room(m.len) => Err((
                ErrorCode::LimitExceeded,
                format!(
                    "its memfd of {} bytes does not fit the caller's memfd quota (--queue-fds, \
                     --memfd-quota-bytes, --memfd-quota-fds)",
                    m.len
                ),
            )),
            _ => Ok(p),
        });
        let payload = match checked {
            Ok(p) => p,
            Err((code, msg)) => {
                let told = format!("the service's reply was refused: {msg}");
                self.answer(
                    slot.name.as_deref(),
                    slot.caller,
                    slot.call_id,
                    Outcome::Invalid { message: &told },
                    Some(responder),
                    None,
                    now,
                );
                return self.op_error(id, op, code, &msg, now);
            }
        };
        let outcome = match r.status {
            ReplyStatus::Ok => Outcome::Reply,
            ReplyStatus::Error { code, message } => Outcome::AppError { code, message },
        };
        self.answer(
            slot.name.as_deref(),
            slot.caller,
            slot.call_id,
            outcome,
            Some(responder),
            Some(payload),
            now,
        );
    }

    /// A request queued for service `id` will not reach it (its name was
    /// revoked): its caller is answered `ResponderGone`, its slot goes.
    pub(crate) fn drop_request(&mut self, id: PeerId, serial: u64, now: Instant) {
        if self.replies.slots.get(&serial).is_none_or(|s| s.responder != id) {
            // Fire and forget, or answered already: nobody waits.
            return;
        }
        let slot = self.replies.take(serial).expect("checked above");
        if let Some(p) = self.peers.get_mut(&id) {
            p.calls_in.remove(&serial);
        }
        if let Some(p) = slot.caller.and_then(|c| self.peers.get_mut(&c)) {
            p.calls_out.remove(&serial);
        }
        let name = slot.name.as_deref();
        self.answer(name, slot.caller, slot.call_id, Outcome::ResponderGone, None, None, now);
    }

    /// A request the broker could not take (its fd was lost to the
    /// broker's own shortage): the caller is answered at once.
    pub(crate) fn refuse_request(&mut self, id: PeerId, call_id: u64, message: &str, now: Instant) {
        self.answer(None, Some(id), call_id, Outcome::LimitExceeded { message }, None, None, now);
    }

    /// A reply the broker could not take: its caller is still answered,
    /// and the service is told.
    pub(crate) fn refuse_reply(&mut self, id: PeerId, serial: u64, message: &str, now: Instant) {
        let op = Op::Reply { serial };
        if self.replies.slots.get(&serial).is_some_and(|s| s.responder == id) {
            let slot = self.replies.take(serial).expect("checked above");
            if let Some(p) = self.peers.get_mut(&id) {
                p.calls_in.remove(&serial);
            }
            if let Some(p) = slot.caller.and_then(|c| self.peers.get_mut(&c)) {
                p.calls_out.remove(&serial);
            }
            let name = slot.name.as_deref();
            self.answer(name, slot.caller, slot.call_id, Outcome::LimitExceeded { message }, None, None, now);
        }
        self.op_error(id, op, ErrorCode::BrokerResource, message, now);
    }

    /// Answers `Timeout` for every slot whose deadline passed.
    pub(crate) fn expire_requests(&mut self, now: Instant) {
        while let Some(&(t, serial)) = self.replies.deadlines.first() {
            if t > now {
                break;
            }
            let Some(slot) = self.replies.take(serial) else { continue };
            if let Some(p) = self.peers.get_mut(&slot.responder) {
                p.calls_in.remove(&serial);
            }
            if let Some(p) = slot.caller.and_then(|c| self.peers.get_mut(&c)) {
                p.calls_out.remove(&serial);
            }
            bump(&mut self.counters.request_timeouts, 1);
            self.answer(slot.name.as_deref(), slot.caller, slot.call_id, Outcome::Timeout, None, None, now);
        }
    }
}
