//! Publishing: the checks a publish must pass, then routing and delivery.
//!
//! Model: one publish is checked once (subject, size, and for a memfd the
//! seals, size and the publisher's uid quota), routed once through the
//! trie, and offered to each matching subscription's queue, where the
//! subscription's overflow policy decides what a full queue means. The
//! inline bytes are shared by every delivery (`Arc`), and so is a memfd
//! (`Rc<SharedFd>`): fan-out copies nothing. A refused publish is answered
//! with an `OpError` naming its `seq` and is not counted as accepted.
//!
//! Invariant: per publisher, each subscriber's queue receives messages in
//! the order they were published (one serialising hop, FIFO queues).

use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use shmbus_proto::frame::{
    encode_frame_into, encode_head, frame_capacity, validate_origin, Deliver, ErrorCode, GoodbyeCode,
    MonitorKind, Op, PayloadRef, Publish, Sender,
};
use shmbus_proto::limits::MAX_INLINE_PAYLOAD;
use shmbus_proto::subject::validate_subject;
use shmbus_proto::sys::memfd::{self, MemfdError};
use shmbus_proto::text::quote;

use super::monitor::Seen;
use super::peer::PeerId;
use super::queue::{offer, refuse, settle_gap, FrameBuffers, Offer, OutFrame, SharedFd, FRAME_OVERHEAD};
use super::quota::Resource;
use super::{bump, Bus};

/// How [`Bus::fan_out`] finds a message's subscriptions.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Route {
    /// From `id`'s remembered route when `remembered` (the caller found
    /// it holds for this topic, with nothing changed since), else a walk
    /// whose result `id` remembers.
    Publisher { id: PeerId, remembered: bool },
    /// A walk of the router, remembered by no one (the broker's own
    /// messages).
    Walk,
}

impl Bus {
    pub(crate) fn publish(
        &mut self,
        id: PeerId,
        publish: &Publish<'_>,
        payload: &[u8],
        mut fds: Vec<OwnedFd>,
        now: Instant,
    ) {
        let Publish { topic, origin, payload: payload_ref } = *publish;
        let generation = self.router.generation();
        let Some(p) = self.peers.get_mut(&id) else { return };
        p.published += 1;
        let seq = p.published;
        let sender = Sender { client_id: p.id, uid: p.cred.uid, gid: p.cred.gid, pid: p.cred.pid };
        let op = Op::Publish { seq };
        // The checks on the subject alone passed for the last one routed.
        let checked = p.last_route.holds(topic, generation);
        if !checked {
            if let Err(e) = validate_subject(topic) {
                let msg = format!("invalid subject {}: {e}", quote(topic));
                return self.op_error(id, op, ErrorCode::InvalidSubject, &msg, now);
            }
            if topic.split('.').next() == Some(super::service::SYS_PREFIX) {
                let msg = format!(
                    "subjects under {} are the broker's: clients may not publish on them",
                    super::service::SYS_PREFIX
                );
                return self.op_error(id, op, ErrorCode::Denied, &msg, now);
            }
        }
        if let Some(Err(e)) = origin.map(validate_origin) {
            let msg = format!("invalid origin for a publish on {}: {e}", quote(topic));
            return self.op_error(id, op, ErrorCode::InvalidOrigin, &msg, now);
        }
        // Once per subject, not per message: the verdict is remembered.
        let denied = self.peers.get_mut(&id).and_then(|p| p.access.check_publish(topic).err());
        if let Some(msg) = denied {
            self.denial(id, &msg);
            return self.op_error(id, op, ErrorCode::Denied, &msg, now);
        }
        // Every refusal below drops `fds`, closing them.
        let (shared, bytes) = match payload_ref {
            PayloadRef::Inline => {
                if payload.len() > MAX_INLINE_PAYLOAD {
                    return self.op_error(
                        id,
                        op,
                        ErrorCode::PayloadTooLarge,
                        "inline payload too large",
                        now,
                    );
                }
                (None, payload.len() as u64)
            }
            PayloadRef::Memfd { len } => {
                if fds.len() != 1 {
                    let msg = format!("a memfd publish carries exactly 1 fd; {} were attached", fds.len());
                    return self.op_error(id, op, ErrorCode::WrongFdCount, &msg, now);
                }
                if !payload.is_empty() {
                    let msg = "a memfd publish carries no inline bytes";
                    return self.op_error(id, op, ErrorCode::Unsupported, msg, now);
                }
                let fd = fds.pop().expect("one fd, checked above");
                if let Err(e) = memfd::check_sealed(fd.as_fd(), len) {
                    let code = match e {
                        MemfdError::NotMemfd => ErrorCode::NotMemfd,
                        MemfdError::NotSealed => ErrorCode::NotSealed,
                        MemfdError::SizeMismatch { .. } => ErrorCode::SizeMismatch,
                        MemfdError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
                        MemfdError::Io(_) | MemfdError::Unmappable(_) => ErrorCode::FdRefused,
                    };
                    return self.op_error(id, op, code, &format!("fd refused: {e}"), now);
                }
                (Some(Rc::new(SharedFd { fd, len })), len)
            }
        };
        bump(&mut self.counters.msgs_in, 1);
        bump(&mut self.counters.bytes_in, bytes);
        let route = Route::Publisher { id, remembered: checked };
        self.fan_out(route, topic, sender, seq, origin, payload_ref, payload, shared, now);
        if !self.monitors.is_empty() {
            let mut receivers: Vec<u64> = self.matches.iter().map(|&(peer, _)| peer).collect();
            receivers.dedup();
            let seen = Seen {
                kind: MonitorKind::Publish,
                subject: topic,
                sender,
                receivers,
                detail: String::new(),
                payload_ref,
                payload,
            };
            self.monitor_event(seen, now);
        }
    }

    /// Routes one accepted message to every matching subscription; a
    /// publisher's last route is used, or made, on the way (see
    /// [`super::peer::LastRoute`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn fan_out(
        &mut self,
        route: Route,
        topic: &str,
        sender: Sender,
        seq: u64,
        origin: Option<&str>,
        payload_ref: PayloadRef,
        payload: &[u8],
        shared: Option<Rc<SharedFd>>,
        now: Instant,
    ) {
        let mut matches = std::mem::take(&mut self.matches);
        matches.clear();
        match route {
            Route::Publisher { id, remembered } => match self.peers.get_mut(&id) {
                Some(p) if remembered => matches.extend_from_slice(&p.last_route.matches),
                Some(p) => {
                    self.router.matches(topic, &mut matches);
                    p.last_route.remember(topic, self.router.generation(), &matches);
                }
                None => self.router.matches(topic, &mut matches),
            },
            Route::Walk => self.router.matches(topic, &mut matches),
        }
        if !matches.is_empty() {
            // One receiver: its frame is one buffer, head and payload (one
            // allocation, not two); more share one copy of the payload.
            let alone = matches.len() == 1;
            let inline: Option<Arc<[u8]>> = (!alone && !payload.is_empty()).then(|| Arc::from(payload));
            // What each delivery will cost, before it is encoded: a head is
            // the topic, a few varints and the header.
            let estimate = topic.len() + origin.map_or(0, str::len) + 64 + payload.len() + FRAME_OVERHEAD;
            let memfd = shared.as_ref().map(|s| s.len);
            for &(target, sub_id) in &matches {
                self.work = self.work.wrapping_add(1);
                let make = |buffers: &mut FrameBuffers| {
                    let d = Deliver { sub_id, topic, sender, seq, origin, payload: payload_ref };
                    let head = if alone {
                        let mut head = buffers.take(frame_capacity(payload.len()));
                        encode_frame_into(&mut head, &d, payload).ok()?;
                        head
                    } else {
                        encode_head(&d).ok()?
                    };
                    Some(OutFrame {
                        head,
                        payload: inline.clone(),
                        shared_fd: shared.clone(),
                        control_fds: Vec::new(),
                    })
                };
                self.deliver(target, sub_id, (estimate, usize::from(memfd.is_some()), memfd), make, now);
            }
        }
        self.matches = matches;
        // If nobody matched (or every queue dropped it), `shared` goes here:
        // the fd is closed.
    }

    pub(crate) fn deliver(
        &mut self,
        target: PeerId,
        sub_id: u32,
        (cost, fds, memfd): (usize, usize, Option<u64>),
        make: impl FnOnce(&mut FrameBuffers) -> Option<OutFrame>,
        now: Instant,
    ) {
        let Some(p) = self.peers.get_mut(&target) else { return };
        if p.is_closing() {
            return;
        }
        let Some(sub) = p.subs.get_mut(&sub_id) else { return };
        // A frame that cannot be made (larger than a packet: the callers
        // size theirs to fit) is a loss like any other, counted and told
        // as a gap, never skipped.
        let frame = if p.queue.delivery_room(cost, fds, memfd) { make(&mut self.buffers) } else { None };
        let result = match frame {
            Some(frame) => offer(&mut p.queue, sub_id, &mut sub.state, frame),
            None => refuse(&mut sub.state),
        };
        match result {
            Offer::Queued { gap_sent } => {
                if gap_sent {
                    bump(&mut self.counters.gap_notices, 1);
                }
                self.mark_dirty(target);
            }
            Offer::Dropped => {
                p.dropped += 1;
                p.owes_gaps = true;
                bump(&mut self.counters.dropped, 1);
                if p.queue.is_empty() {
                    // Dropped for its uid's bound, not its own: no flush of
                    // its own will come to settle the gap, so settle now.
                    if settle_gap(&mut p.queue, sub_id, &mut sub.state) {
                        bump(&mut self.counters.gap_notices, 1);
                        self.mark_dirty(target);
                    }
                }
            }
            Offer::Disconnect => {
                let reason = format!(
                    "slow consumer: subscription {sub_id} ({}) fell behind with {} frames ({} bytes) queued, \
                     {} bytes for its uid",
                    shmbus_proto::text::escape(&sub.state.pattern),
                    p.queue.len(),
                    p.queue.bytes(),
                    p.usage.held(Resource::QueuedBytes)
                );
                let who = p.who();
                let uid = p.cred.uid;
                bump(&mut self.counters.slow_disconnects, 1);
                self.warn_limited(Some(uid), || format!("disconnecting {who}: {reason}"));
                self.begin_close(target, GoodbyeCode::SlowConsumer, &reason, now);
            }
        }
    }
}
