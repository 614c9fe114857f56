//! The client's protocol core: everything a connection knows, and what
//! each frame from the broker does to it, with no I/O.
//!
//! Model (sans-io): a driver moves bytes and fds; the core holds the state
//! of the connection (subscriptions and their bounded queues, pending
//! queries, channel grants, names, calls, services, fd acknowledgements,
//! ids) and decides what each received packet means
//! ([`State::receive_packet`]: bytes, receive status and fds in; queued
//! events and due replies out). The boundary is "frames and fds", not "the
//! socket": the blocking driver (`connection.rs`) feeds it from a
//! `SOCK_SEQPACKET` socket today, and any transport that delivers whole
//! packets with their fds can feed it tomorrow. The one thing the core
//! does to an fd is inspect it: a memfd payload's seals and size are
//! checked (`fcntl`, `fstat`) before it reaches the app.
//!
//! Invariants: nothing a peer sends grows without bound (every queue is
//! bounded in messages, bytes and fds, see [`LocalBounds`]); nothing is
//! lost silently (a drop is a counted `Gap` where it happened); every fd
//! taken is counted for the broker's window ([`FdAcks`]); ids are reused
//! only once nothing can still arrive for them ([`IdSpace`]).

use std::collections::{HashMap, VecDeque};

use crate::id_map::{IdMap, IdSet};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use shmbus_proto::frame::{
    decode_broker, BrokerFrame, ErrorCode, GoodbyeCode, Op, PayloadRef, QueryItemBody, Revocation,
};
use shmbus_proto::sys::memfd;
use shmbus_proto::sys::socket::RecvStatus;

use crate::error::{Disconnect, PublishRefused, SendRefused};
use crate::message::{Body as Payload, Event, MemfdPayload, Message};
use crate::service::{AutoReply, CallSlot, NameAnswer, NameStatus, RevokedName, ServiceQueue};

/// Bookkeeping a queued message costs beyond its topic and its inline
/// payload (its slot in the queue, its allocations), counted in the byte
/// bounds so that a flood of empty messages is bounded in bytes too.
pub(crate) const QUEUED_MESSAGE_OVERHEAD: usize = 128;

/// What a queued message holds of this process: heap bytes (its topic, its
/// inline payload, [`QUEUED_MESSAGE_OVERHEAD`]) and fds (one for a memfd
/// payload). A memfd's own pages are not counted in bytes: they are
/// charged to the publisher that filled them, and its fd is what we hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Charge {
    pub bytes: usize,
    pub fds: usize,
}

impl Charge {
    /// The charge of a message on `topic_len` bytes of topic whose payload
    /// is `payload_len` bytes inline, or a memfd.
    pub fn of(topic_len: usize, memfd: bool, payload_len: usize) -> Charge {
        let payload = if memfd { 0 } else { payload_len };
        Charge {
            bytes: QUEUED_MESSAGE_OVERHEAD.saturating_add(topic_len).saturating_add(payload),
            fds: usize::from(memfd),
        }
    }

    pub(crate) fn add(&mut self, c: Charge) {
        self.bytes = self.bytes.saturating_add(c.bytes);
        self.fds = self.fds.saturating_add(c.fds);
    }

    pub(crate) fn sub(&mut self, c: Charge) {
        self.bytes = self.bytes.saturating_sub(c.bytes);
        self.fds = self.fds.saturating_sub(c.fds);
    }

    /// Whether `self + c` stays within `bytes` and `fds`.
    pub(crate) fn fits(self, c: Charge, bytes: usize, fds: usize) -> bool {
        self.bytes.checked_add(c.bytes).is_some_and(|b| b <= bytes)
            && self.fds.checked_add(c.fds).is_some_and(|f| f <= fds)
    }
}

/// Bounds of the in-process queues, from [`crate::ConnectOptions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LocalBounds {
    /// Per subscription: events queued.
    pub messages: usize,
    /// Per subscription: bytes queued (see [`Charge`]).
    pub bytes: usize,
    /// Per subscription: fds queued (memfd payloads).
    pub fds: usize,
    /// All subscriptions of the connection together: bytes queued.
    pub total_bytes: usize,
    /// All subscriptions of the connection together: fds queued.
    pub total_fds: usize,
}

impl Default for LocalBounds {
    fn default() -> Self {
        use crate::client::ConnectOptions as O;
        LocalBounds {
            messages: crate::client::DEFAULT_LOCAL_QUEUE,
            bytes: O::DEFAULT_LOCAL_QUEUE_BYTES,
            fds: O::DEFAULT_LOCAL_QUEUE_FDS,
            total_bytes: O::DEFAULT_LOCAL_TOTAL_BYTES,
            total_fds: O::DEFAULT_LOCAL_TOTAL_FDS,
        }
    }
}

/// One event in a subscription's queue.
#[derive(Debug)]
pub(crate) struct Queued {
    /// Its arrival number on the connection, so events of several
    /// subscriptions can be taken in the order the broker sent them.
    pub arrival: u64,
    pub event: Event,
    /// What it counts against the bounds (nothing for a gap).
    pub charge: Charge,
}

#[derive(Debug, Default)]
pub(crate) struct SubQueue {
    pub events: VecDeque<Queued>,
    /// Dropped locally (a bound reached, or a payload that failed its
    /// check) and not yet reported.
    pub local_missed: u64,
    /// What `events` holds, summed.
    pub charge: Charge,
    /// The broker ended this subscription (a policy reload): the arrival
    /// number of its notice and the broker's reason. The events before it
    /// are still taken; nothing after it is queued.
    pub revoked: Option<(u64, String)>,
    /// The frame that made it (a `Subscribe` or a `Monitor`), sent again
    /// to renew it after a reconnection.
    pub renew: Vec<u8>,
    /// The broker acknowledged it: only a live subscription is renewed
    /// (one still waiting is sent again by its maker, on the new
    /// connection).
    pub live: bool,
    /// The subject of the last message, shared by the messages after it
    /// on the same subject (a stream's): one allocation fewer for each.
    last_topic: Option<Arc<str>>,
}

impl SubQueue {
    /// `topic`, shared with the last message's if it is the same.
    fn topic(&mut self, topic: &str) -> Arc<str> {
        match &self.last_topic {
            Some(last) if **last == *topic => last.clone(),
            _ => self.last_topic.insert(Arc::from(topic)).clone(),
        }
    }

    /// Queues a gap of `missed` plus what was missed locally, if that
    /// makes any. A gap is never dropped (it is what reports drops), but
    /// one right after another adds to it, so gaps never outnumber
    /// messages.
    fn push_gap(&mut self, arrival: u64, missed: u64) {
        let missed = missed.saturating_add(std::mem::take(&mut self.local_missed));
        if missed == 0 {
            return;
        }
        match self.events.back_mut() {
            Some(Queued { event: Event::Gap { missed: m }, .. }) => *m = m.saturating_add(missed),
            _ => self.events.push_back(Queued {
                arrival,
                event: Event::Gap { missed },
                charge: Charge::default(),
            }),
        }
    }
}

/// Past this capacity, a queue that empties gives its memory back.
const SHRINK_ABOVE: usize = 1024;

/// Hands out the ids of one kind (u32, never 0), never one still in use.
///
/// In use: `owed` holds it (something was sent under it and the broker
/// has not answered yet, so an answer may still come), or the caller's
/// table holds it (`busy`). After 2^32 - 1 ids the counter wraps and
/// skips whatever is in use, so ids never collide.
#[derive(Debug, Default)]
pub(crate) struct IdSpace {
    next: u32,
    /// Answers owed by the broker, per id.
    owed: IdMap<u32, u32>,
}

impl IdSpace {
    /// A fresh id, for which one answer is then owed. `None` only if every
    /// id is in use.
    pub fn alloc(&mut self, busy: impl Fn(u32) -> bool) -> Option<u32> {
        // Every id at most once: the scan ends even if all are taken.
        for _ in 0..u32::MAX {
            let id = self.next;
            self.next = self.next.wrapping_add(1);
            if id != 0 && !self.owed.contains_key(&id) && !busy(id) {
                self.owed.insert(id, 1);
                return Some(id);
            }
        }
        None
    }

    /// One more answer is owed for `id` (an unsubscribe sent, say).
    pub fn owe(&mut self, id: u32) {
        let n = self.owed.entry(id).or_default();
        *n = n.saturating_add(1);
    }

    /// One answer for `id` arrived (or what was to be answered was never
    /// sent). Returns whether one was owed: an answer nobody asked for
    /// changes nothing.
    pub fn answered(&mut self, id: u32) -> bool {
        match self.owed.get_mut(&id) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                self.owed.remove(&id);
                true
            }
            None => false,
        }
    }

    /// The connection these answers were owed on is gone: none of them
    /// comes now. Without this, every id in flight at a loss stayed in
    /// use for good (and in `owed`), a few more at each reconnection.
    pub fn forget_owed(&mut self) {
        self.owed.clear();
    }

    #[cfg(test)]
    pub fn set_next(&mut self, next: u32) {
        self.next = next;
    }

    #[cfg(test)]
    pub fn owes(&self, id: u32) -> bool {
        self.owed.contains_key(&id)
    }
}

/// A channel the broker opened for us, with its fds.
#[derive(Debug)]
pub(crate) struct Grant {
    pub frame: shmbus_proto::frame::ChannelGranted,
    pub fds: Vec<OwnedFd>,
    /// The connection generation it came on (its ids are that broker's).
    pub generation: u64,
}

/// A reader joined (with its cursor page) or left a channel we publish.
#[derive(Debug)]
pub(crate) struct ReaderEvent {
    pub reader_id: u32,
    pub joined: bool,
    pub generation: u32,
    pub cursor: Option<OwnedFd>,
}

/// One page of an introspection answer, as it arrives.
#[derive(Debug, Default)]
pub(crate) struct QuerySlot {
    pub items: Vec<QueryItemBody>,
    /// The `after` of the next page, from the page's `QueryEnd`.
    pub next: Option<String>,
    pub done: bool,
    pub error: Option<(ErrorCode, String)>,
}

/// Counts the fds taken from the socket since the last `FdAck`.
///
/// The broker stops sending fds when `window` of them are unacknowledged,
/// so an ack is due once half that many (at least one) are taken: the
/// broker then still has room for the other half while the ack travels,
/// and a stream of memfd payloads is never held up by the window. That is
/// the fast path, while the socket has more to read. Before anyone waits
/// for the socket, everything taken is made due ([`FdAcks::request_all`]),
/// however little: a connection that waits holds no unacknowledged fd.
#[derive(Debug)]
pub(crate) struct FdAcks {
    threshold: u32,
    taken: u32,
    /// Everything taken is due, whatever the threshold says (set by
    /// [`FdAcks::request_all`], cleared when the ack is taken).
    all: bool,
}

impl Default for FdAcks {
    /// Acks every fd: for a broker that announced no window.
    fn default() -> Self {
        FdAcks::new(0)
    }
}

impl FdAcks {
    pub fn new(window: u32) -> FdAcks {
        FdAcks { threshold: (window / 2).max(1), taken: 0, all: false }
    }

    /// Records `n` more fds taken from the socket. Returns whether an ack
    /// is due.
    pub fn took(&mut self, n: usize) -> bool {
        self.taken = self.taken.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        self.is_due()
    }

    pub fn is_due(&self) -> bool {
        self.taken > 0 && (self.taken >= self.threshold || self.all)
    }

    /// Whether fds were taken and not yet acknowledged.
    pub fn pending(&self) -> bool {
        self.taken > 0
    }

    /// Makes everything taken due, below the threshold too. Returns
    /// whether that made a new ack due: `false` if nothing is taken, or if
    /// all of it was already requested (that ack is on its way, or left to
    /// the holder of `send`).
    pub fn request_all(&mut self) -> bool {
        if self.taken == 0 || self.all {
            return false;
        }
        self.all = true;
        true
    }

    /// If an ack is due, the count to acknowledge, which is then no longer
    /// counted.
    pub fn take_due(&mut self) -> Option<u32> {
        if !self.is_due() {
            return None;
        }
        self.all = false;
        Some(std::mem::take(&mut self.taken))
    }
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub subs: IdMap<u32, SubQueue>,
    /// Subscribe/unsubscribe acknowledgements awaited, by sub id.
    pub awaiting_ack: IdSet<u32>,
    pub acks: IdMap<u32, Result<(), (ErrorCode, String)>>,
    /// Pings awaiting their pong, by token: whether it came.
    pub pings: IdMap<u64, bool>,
    /// The last ping token handed out (u64: it never wraps).
    pub last_ping: u64,
    pub queries: IdMap<u32, QuerySlot>,
    /// Channel opens awaiting the broker's answer, and the answers.
    pub awaiting_grant: IdSet<u32>,
    pub grants: IdMap<u32, Result<Grant, (ErrorCode, String)>>,
    /// Readers joining and leaving, per channel this client publishes
    /// (news for any other channel is dropped, closing its fds).
    pub reader_events: IdMap<u64, VecDeque<ReaderEvent>>,
    /// Publishes refused since the last flush: the first `MAX_REFUSALS`,
    /// and how many more.
    pub refused_publishes: Vec<PublishRefused>,
    pub refused_publishes_more: u64,
    pub closed: Option<Disconnect>,
    /// The connection is lost and being made again (reconnection is on):
    /// why it was lost. `closed` stays `None` meanwhile, so waiters wait.
    pub lost: Option<Disconnect>,
    /// Connections made again so far.
    pub generation: u64,
    /// Names owned or queued for, with their flags: asked for again after
    /// a reconnection.
    pub held_names: std::collections::BTreeMap<String, shmbus_proto::frame::NameFlags>,
    pub sub_ids: IdSpace,
    pub query_ids: IdSpace,
    pub channel_ids: IdSpace,
    pub bounds: LocalBounds,
    /// What every subscription's queue holds, summed.
    pub queued: Charge,
    /// Frames dispatched so far: the arrival number of the next event.
    pub arrivals: u64,
    /// Fds taken and not yet acknowledged to the broker.
    pub fd_acks: FdAcks,
    /// Name requests, releases and owner queries (one id space for the
    /// three), and their answers as they come.
    pub name_ids: IdSpace,
    pub name_ops: IdMap<u32, Option<NameAnswer>>,
    /// The name of each name request awaiting its answer, by id.
    pub name_requests: IdMap<u32, String>,
    /// Calls waiting for their answer, by call id (see `service`).
    pub calls: IdMap<u64, CallSlot>,
    /// The last call id handed out (it never wraps).
    pub last_call: u64,
    /// Fire-and-forget sends so far, and those the broker refused.
    pub sends: u64,
    pub refused_sends: Vec<SendRefused>,
    pub refused_sends_more: u64,
    /// Replies the broker refused (no such request).
    pub refused_replies: u64,
    /// The queue of each name this client serves.
    pub services: HashMap<String, ServiceQueue>,
    /// Answers to send on a service's behalf (see `service`), by whoever
    /// sends the next due ack.
    pub auto_replies: Vec<AutoReply>,
    /// Names the broker released by policy, oldest first, at most
    /// [`crate::service::MAX_REVOKED_NAMES`] (see `service`).
    pub revoked_names: VecDeque<RevokedName>,
    /// Handles this client holds on each ring channel (a publisher and
    /// readers), counted from the broker's grant until the handle drops:
    /// only these channels' revocations are kept.
    pub held_channels: IdMap<u64, u32>,
    /// Why the broker closed a held channel by policy, by channel id
    /// (forgotten with the channel's last handle).
    pub revoked_channels: IdMap<u64, String>,
}

impl State {
    /// A new subscription id, free in every sense (see [`IdSpace`]).
    pub fn new_sub_id(&mut self) -> Option<u32> {
        let (subs, awaiting, acks) = (&self.subs, &self.awaiting_ack, &self.acks);
        self.sub_ids.alloc(|id| subs.contains_key(&id) || awaiting.contains(&id) || acks.contains_key(&id))
    }

    /// A new query request id, with an empty slot for its answer.
    pub fn new_query(&mut self) -> Option<u32> {
        let queries = &self.queries;
        let id = self.query_ids.alloc(|id| queries.contains_key(&id))?;
        self.queries.insert(id, QuerySlot::default());
        Some(id)
    }

    /// A new channel-open request id.
    pub fn next_channel_id(&mut self) -> io::Result<u32> {
        let (awaiting, grants) = (&self.awaiting_grant, &self.grants);
        self.channel_ids
            .alloc(|id| awaiting.contains(&id) || grants.contains_key(&id))
            .ok_or_else(|| io::Error::other("every channel request id is in use"))
    }

    /// A new ping token, awaiting its pong.
    pub fn new_ping(&mut self) -> u64 {
        self.last_ping = self.last_ping.wrapping_add(1).max(1);
        self.pings.insert(self.last_ping, false);
        self.last_ping
    }

    /// Starts the queue of subscription `id`.
    pub fn add_sub(&mut self, id: u32, renew: Vec<u8>) {
        if let Some(old) = self.subs.insert(id, SubQueue { renew, ..SubQueue::default() }) {
            self.queued.sub(old.charge);
        }
    }

    /// The connection is lost: remember why, and fail what awaits an
    /// answer on it (a waiter for one fails once `lost` is set or the
    /// generation moves on). Once per loss.
    pub(crate) fn connection_lost(&mut self, why: Disconnect) {
        if self.lost.is_some() {
            return;
        }
        // Calls in flight fail, distinctly: their answers were due on the
        // lost connection, and none is sent again behind the caller's back.
        let lost_generation = self.generation;
        for slot in self.calls.values_mut() {
            // A call not sent yet goes on the next connection.
            if slot.answer.is_none() && slot.sent_on == Some(lost_generation) {
                let d = Disconnect {
                    code: why.code,
                    reason: format!("{}; the call's answer was lost with it", why.reason),
                };
                slot.answer = Some(Err(crate::error::CallError::Disconnected(d)));
            }
        }
        self.forget_lost_requests();
        self.lost = Some(why);
    }

    /// What came on the lost connection cannot be answered on another (a
    /// serial names a request of one broker only): requests queued for
    /// services go, and the answers the reader owed with them. Their
    /// callers were answered by the broker, or went with it.
    pub(crate) fn forget_lost_requests(&mut self) {
        for q in self.services.values_mut() {
            let dropped = q.drain_requests();
            self.queued.sub(dropped);
        }
        self.auto_replies.clear();
    }

    /// A new connection is made: every live subscription is to be renewed
    /// (the frames to send again are returned, by subscription id) and
    /// gets one `Reconnected` event, in order after what it has queued.
    pub(crate) fn reconnected(&mut self, fd_window: u32) -> Vec<(u32, Vec<u8>)> {
        self.lost = None;
        self.closed = None;
        self.generation += 1;
        self.auto_replies.clear();
        self.fd_acks = FdAcks::new(fd_window);
        self.arrivals += 1;
        let arrival = self.arrivals;
        // Answers owed by the lost broker never come; the new one owes
        // only what is sent to it from here (the renewals below first).
        for ids in [&mut self.sub_ids, &mut self.query_ids, &mut self.channel_ids, &mut self.name_ids] {
            ids.forget_owed();
        }
        let mut renew = Vec::new();
        for (&id, q) in self.subs.iter_mut() {
            if q.revoked.is_some() || q.renew.is_empty() || !q.live {
                continue;
            }
            // Drops counted here before the loss are a gap in their place,
            // before the reconnection, not after it.
            q.push_gap(arrival, 0);
            q.events.push_back(Queued { arrival, event: Event::Reconnected, charge: Charge::default() });
            renew.push((id, q.renew.clone()));
        }
        for &(id, _) in &renew {
            // Its subscribe is answered by the new broker.
            self.sub_ids.owe(id);
        }
        renew.sort_unstable_by_key(|(id, _)| *id);
        renew
    }

    /// Ends the queue of subscription `id`, releasing what it held.
    pub fn remove_sub(&mut self, id: u32) {
        if let Some(q) = self.subs.remove(&id) {
            self.queued.sub(q.charge);
        }
    }

    /// Queues a message for `sub_id` that costs `c`, if it fits every
    /// bound: the one `make` builds (given the queue, whose subject text it
    /// may share), after a gap for whatever was missed before it. One that
    /// does not fit is counted as missed, and `make` is dropped unused (a
    /// memfd it holds is closed); so is one for a subscription we do not
    /// have, or one revoked. One look-up of `sub_id` for all of it: there
    /// were four, and hashbrown's `get_mut` was 5% of a streaming
    /// subscriber's samples (`perf record` of `diag-link-tp`).
    fn admit_message(
        &mut self,
        sub_id: u32,
        c: Charge,
        arrival: u64,
        make: impl FnOnce(&mut SubQueue) -> Message,
    ) {
        let (b, total) = (self.bounds, self.queued);
        let Some(q) = self.subs.get_mut(&sub_id) else { return };
        if q.revoked.is_some() {
            // The broker said nothing more comes: a broker that sends
            // more anyway is not heard.
            return;
        }
        let fits = q.events.len() < b.messages
            && q.charge.fits(c, b.bytes, b.fds)
            && total.fits(c, b.total_bytes, b.total_fds);
        if !fits {
            q.local_missed = q.local_missed.saturating_add(1);
            return;
        }
        let m = make(q);
        q.push_gap(arrival, 0);
        q.events.push_back(Queued { arrival, event: Event::Message(m), charge: c });
        q.charge.add(c);
        self.queued.add(c);
    }

    /// Counts one message of `sub_id` as missed.
    fn count_missed(&mut self, sub_id: u32) {
        if let Some(q) = self.subs.get_mut(&sub_id) {
            q.local_missed = q.local_missed.saturating_add(1);
        }
    }

    /// A gap of `missed` on `sub_id` ([`SubQueue::push_gap`]), unless it
    /// was revoked.
    fn push_gap(&mut self, sub_id: u32, arrival: u64, missed: u64) {
        let Some(q) = self.subs.get_mut(&sub_id) else { return };
        if q.revoked.is_none() {
            q.push_gap(arrival, missed);
        }
    }

    /// Arrival number of the next event of `id`; a trailing local gap
    /// (drops with nothing after them yet) sorts last; once the queue is
    /// empty, a revocation sorts where its notice arrived.
    pub fn peek_arrival(&self, id: u32) -> Option<u64> {
        let q = self.subs.get(&id)?;
        match (q.events.front(), &q.revoked) {
            (Some(e), _) => Some(e.arrival),
            (None, _) if q.local_missed > 0 => Some(u64::MAX),
            (None, Some((arrival, _))) => Some(*arrival),
            (None, None) => None,
        }
    }

    /// The next event of `id` as [`State::take_event`] gives it; once
    /// there is none and the broker revoked the subscription, its reason
    /// (every time: nothing more will come).
    pub fn take_or_revoked(&mut self, id: u32) -> Option<Result<(u64, Event), String>> {
        if let Some(e) = self.take_event(id) {
            return Some(Ok(e));
        }
        Some(Err(self.subs.get(&id)?.revoked.as_ref()?.1.clone()))
    }

    /// Why the broker revoked subscription `id`, if it did.
    pub fn revocation(&self, id: u32) -> Option<String> {
        Some(self.subs.get(&id)?.revoked.as_ref()?.1.clone())
    }

    /// A `Revoked` notice: marks what it names, if this client holds it
    /// (a notice for anything else is dropped).
    pub(crate) fn on_revoked(&mut self, what: Revocation<'_>, reason: &str, arrival: u64) {
        match what {
            Revocation::Subscription { sub_id } => {
                if let Some(q) = self.subs.get_mut(&sub_id) {
                    q.revoked.get_or_insert_with(|| (arrival, reason.to_owned()));
                }
            }
            Revocation::Name { name } => self.on_name_revoked(name, reason),
            Revocation::Channel { channel_id } => {
                if self.held_channels.contains_key(&channel_id) {
                    self.revoked_channels.entry(channel_id).or_insert_with(|| reason.to_owned());
                }
            }
        }
    }

    /// One more handle on channel `channel_id` (its grant arrived).
    fn hold_channel(&mut self, channel_id: u64) {
        let n = self.held_channels.entry(channel_id).or_default();
        *n = n.saturating_add(1);
    }

    /// A handle on channel `channel_id` is given back; with the last one,
    /// the channel's revocation, if any, is forgotten.
    pub fn release_channel(&mut self, channel_id: u64) {
        match self.held_channels.get_mut(&channel_id) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.held_channels.remove(&channel_id);
                self.revoked_channels.remove(&channel_id);
            }
            None => {}
        }
    }

    /// The next event of `id` with its arrival number, releasing what it
    /// held; then drops recorded with nothing after them yet, as a gap.
    pub fn take_event(&mut self, id: u32) -> Option<(u64, Event)> {
        let q = self.subs.get_mut(&id)?;
        if let Some(e) = q.events.pop_front() {
            q.charge.sub(e.charge);
            self.queued.sub(e.charge);
            if q.events.is_empty() && q.events.capacity() > SHRINK_ABOVE {
                q.events.shrink_to(SHRINK_ABOVE / 4);
            }
            return Some((e.arrival, e.event));
        }
        (q.local_missed > 0).then(|| (u64::MAX, Event::Gap { missed: std::mem::take(&mut q.local_missed) }))
    }
}

impl State {
    /// One packet from the broker, with its receive status and the fds
    /// that came beside it (all taken from the socket, whatever becomes of
    /// them: dropped here, they close). `short_of_fds`: the driver found
    /// this process's fd table full, so fds lost on the way in are our
    /// shortage, not the broker's fault. A fatal problem sets `closed`.
    /// Returns whether an `FdAck` came due.
    pub(crate) fn receive_packet(
        &mut self,
        data: &[u8],
        status: RecvStatus,
        mut fds: Vec<OwnedFd>,
        short_of_fds: bool,
    ) -> bool {
        let mut ack_due = false;
        if data.is_empty() {
            self.closed = Some(Disconnect { code: None, reason: "the broker closed the connection".into() });
            return ack_due;
        }
        // Fds lost on the way in because our fd table is full: the
        // frame is handled without them (a delivery becomes a counted
        // gap), and the fds the broker sent are counted all the same.
        let lost = status.fds_truncated && !status.truncated && short_of_fds;
        let frame = if lost { decode_broker(data).ok() } else { None };
        let sent = match &frame {
            Some(f) => fds_sent_with(f),
            None => None,
        };
        // Every fd taken counts against the broker's window, whatever
        // becomes of it below (kept, or closed with its frame).
        let counted = sent.map_or(fds.len(), |k| k.max(fds.len()));
        if counted > 0 && self.fd_acks.took(counted) {
            ack_due = true;
        }
        if status.truncated || (status.fds_truncated && sent.is_none()) {
            self.closed = Some(Disconnect {
                code: Some(GoodbyeCode::ProtocolViolation),
                reason: "the broker sent a truncated packet".into(),
            });
            return ack_due;
        }
        if let Some(frame) = frame {
            // A delivery is missed on its subscription (what arrived
            // of its fds, if any, closes here); a request is answered
            // on the service's behalf, an answer is a failed call. A
            // channel's frame goes on with the fds that did arrive: a
            // grant short of fds fails to open (`BadGrant`) and is
            // given back; a reader's join without its cursor is not
            // waited for.
            match frame {
                BrokerFrame::Deliver(..) | BrokerFrame::Serve(..) | BrokerFrame::Answer(..) => {
                    apply(self, frame, Some(Err(())), Vec::new())
                }
                _ => apply(self, frame, None, std::mem::take(&mut fds)),
            }
            return ack_due;
        }
        let frame = match decode_broker(data) {
            Ok(f) => f,
            Err(e) => {
                self.closed = Some(Disconnect {
                    code: Some(GoodbyeCode::ProtocolViolation),
                    reason: format!("the broker sent an invalid frame: {e}"),
                });
                return ack_due;
            }
        };
        let memfd = match &frame {
            BrokerFrame::Deliver(d, inline) => checked_payload(d.payload, inline, &mut fds),
            BrokerFrame::Serve(r, inline) => checked_payload(r.payload, inline, &mut fds),
            BrokerFrame::Answer(a, inline) => checked_payload(a.payload, inline, &mut fds),
            _ if fds.is_empty() => None,
            BrokerFrame::ChannelGranted(_) if (2..=3).contains(&fds.len()) => None,
            BrokerFrame::ChannelReader(r) if r.joined && fds.len() == 1 => None,
            _ => {
                // `fds` drops here, closing them.
                self.closed = Some(Disconnect {
                    code: Some(GoodbyeCode::ProtocolViolation),
                    reason: "the broker sent an unexpected fd".into(),
                });
                return ack_due;
            }
        };
        apply(self, frame, memfd, fds);
        ack_due
    }
}

/// The memfd of a frame whose payload is `payload`, checked: `None` for an
/// inline payload, `Err` if the fds are not one sealed memfd of the
/// declared size (or fds came with an inline payload). Trust nothing, not
/// even the broker: such an fd never reaches the app.
fn checked_payload(
    payload: PayloadRef,
    inline: &[u8],
    fds: &mut Vec<OwnedFd>,
) -> Option<Result<(OwnedFd, u64), ()>> {
    match payload {
        PayloadRef::Memfd { len } if fds.len() == 1 && inline.is_empty() => {
            let fd = fds.pop().expect("one fd");
            match memfd::check_sealed(fd.as_fd(), len) {
                Ok(()) => Some(Ok((fd, len))),
                Err(_) => Some(Err(())),
            }
        }
        PayloadRef::Memfd { .. } => Some(Err(())),
        PayloadRef::Inline if fds.is_empty() => None,
        PayloadRef::Inline => Some(Err(())),
    }
}

/// How many fds the broker sends with `frame`, for a frame that carries
/// some: one with a delivery, a request or an answer by memfd, two with
/// the grant of a channel to its publisher (ring, signal page) and three
/// to a reader (and its cursor), one with a reader's join (its cursor).
/// `None` for any other.
fn fds_sent_with(frame: &BrokerFrame<'_>) -> Option<usize> {
    match frame {
        BrokerFrame::Deliver(d, _) if matches!(d.payload, PayloadRef::Memfd { .. }) => Some(1),
        BrokerFrame::Serve(r, _) if matches!(r.payload, PayloadRef::Memfd { .. }) => Some(1),
        BrokerFrame::Answer(a, _) if matches!(a.payload, PayloadRef::Memfd { .. }) => Some(1),
        BrokerFrame::ChannelGranted(g) => Some(if g.reader_id == 0 { 2 } else { 3 }),
        BrokerFrame::ChannelReader(r) if r.joined => Some(1),
        _ => None,
    }
}

/// `memfd`: for a delivery, request or answer by memfd, the checked fd and
/// length, or `Err` if its fd failed the check or was lost (then the
/// message is counted as missed, the request turned away, the call
/// failed). `fds`: what else came beside the frame (a channel's memfds).
pub(crate) fn apply(
    st: &mut State,
    frame: BrokerFrame<'_>,
    memfd: Option<Result<(OwnedFd, u64), ()>>,
    mut fds: Vec<OwnedFd>,
) {
    st.arrivals += 1;
    let arrival = st.arrivals;
    match frame {
        BrokerFrame::Deliver(d, payload) => {
            let memfd = match memfd {
                None => None,
                Some(Ok((fd, len))) => Some(Arc::new(MemfdPayload::new(fd, len))),
                Some(Err(())) => return st.count_missed(d.sub_id),
            };
            // Decided before anything is copied; a memfd refused here
            // drops with this frame, closing its fd at once.
            let charge =
                Charge::of(d.topic.len() + d.origin.map_or(0, str::len), memfd.is_some(), payload.len());
            st.admit_message(d.sub_id, charge, arrival, |q| {
                let body = match memfd {
                    None => Payload::inline(payload),
                    Some(m) => Payload::Memfd(m),
                };
                let origin = d.origin.map(str::to_owned);
                Message { topic: q.topic(d.topic), sender: d.sender, seq: d.seq, origin, body }
            });
        }
        BrokerFrame::Gap(g) => st.push_gap(g.sub_id, arrival, g.missed),
        BrokerFrame::Subscribed(s) => {
            // The answer to a subscribe or to an unsubscribe.
            st.sub_ids.answered(s.sub_id);
            if st.awaiting_ack.remove(&s.sub_id) {
                st.acks.insert(s.sub_id, Ok(()));
                if let Some(q) = st.subs.get_mut(&s.sub_id) {
                    q.live = true;
                }
            }
        }
        BrokerFrame::OpError(e) => match e.op {
            Op::Subscribe { sub_id } | Op::Unsubscribe { sub_id } => {
                st.sub_ids.answered(sub_id);
                if st.awaiting_ack.remove(&sub_id) {
                    st.acks.insert(sub_id, Err((e.code, e.message.to_owned())));
                } else if matches!(e.op, Op::Subscribe { .. }) {
                    // Renewing it after a reconnection failed: it ends,
                    // with the broker's reason.
                    let why = format!("not renewed after reconnecting: {}", e.message);
                    st.on_revoked(Revocation::Subscription { sub_id }, &why, arrival);
                }
            }
            Op::Query { req_id } => {
                st.query_ids.answered(req_id);
                if let Some(q) = st.queries.get_mut(&req_id) {
                    q.error = Some((e.code, e.message.to_owned()));
                    q.done = true;
                }
            }
            Op::ChannelOpen { req_id } => {
                st.channel_ids.answered(req_id);
                if st.awaiting_grant.remove(&req_id) {
                    st.grants.insert(req_id, Err((e.code, e.message.to_owned())));
                }
            }
            Op::Publish { seq } => {
                if st.refused_publishes.len() < crate::error::MAX_REFUSALS {
                    st.refused_publishes.push(PublishRefused {
                        seq,
                        code: e.code,
                        message: e.message.to_owned(),
                    });
                } else {
                    st.refused_publishes_more = st.refused_publishes_more.saturating_add(1);
                }
            }
            Op::Name { req_id } => {
                st.on_name_answer(req_id, NameAnswer::Refused(e.code, e.message.to_owned()))
            }
            // A reply for which the broker had no slot (after the
            // deadline, say): counted.
            Op::Reply { .. } => st.refused_replies = st.refused_replies.saturating_add(1),
            // A handle given back that the broker no longer knew (the
            // channel closed first): our side is already gone, and no
            // one waits for an answer.
            Op::ChannelClose { .. } => {}
            // Answered during the handshake, never here.
            Op::Attach => {}
        },
        // Handshake and transport frames: not the core's.
        BrokerFrame::Attached(_) | BrokerFrame::Doorbell => {}
        BrokerFrame::Pong(p) => {
            // A pong nobody waits for (its ping timed out) is dropped.
            if let Some(came) = st.pings.get_mut(&p.token) {
                *came = true;
            }
        }
        BrokerFrame::QueryItem(q) => {
            if let Some(slot) = st.queries.get_mut(&q.req_id) {
                slot.items.push(q.item);
            }
        }
        BrokerFrame::QueryEnd(q) => {
            st.query_ids.answered(q.req_id);
            if let Some(slot) = st.queries.get_mut(&q.req_id) {
                slot.next = q.next;
                slot.done = true;
            }
        }
        BrokerFrame::ChannelGranted(g) => {
            st.channel_ids.answered(g.req_id);
            if st.awaiting_grant.remove(&g.req_id) {
                st.hold_channel(g.channel_id);
                if g.reader_id == 0 {
                    // We publish this channel: from now on keep its news.
                    st.reader_events.entry(g.channel_id).or_default();
                }
                let generation = st.generation;
                st.grants.insert(g.req_id, Ok(Grant { frame: g, fds, generation }));
            }
        }
        BrokerFrame::ChannelReader(r) => {
            let fd = fds.pop();
            let Some(queue) = st.reader_events.get_mut(&r.channel_id) else { return };
            queue.push_back(ReaderEvent {
                reader_id: r.reader_id,
                joined: r.joined,
                generation: r.generation,
                cursor: fd,
            });
        }
        BrokerFrame::Goodbye(g) => {
            st.closed = Some(Disconnect { code: Some(g.code), reason: g.reason.to_owned() });
        }
        BrokerFrame::Welcome(_) => {
            st.closed = Some(Disconnect {
                code: Some(GoodbyeCode::ProtocolViolation),
                reason: "the broker sent a second Welcome".into(),
            });
        }
        BrokerFrame::NameReply(r) => st.on_name_answer(r.req_id, NameAnswer::Result(r.result)),
        BrokerFrame::NameOwner(o) => {
            let status = NameStatus { owner: o.owner, members: o.members };
            st.on_name_answer(o.req_id, NameAnswer::Owner(status));
        }
        BrokerFrame::Serve(r, inline) => st.on_serve(&r, inline, memfd),
        BrokerFrame::Answer(a, inline) => st.on_answer(&a, inline, memfd),
        BrokerFrame::Revoked(r) => st.on_revoked(r.what, r.reason, arrival),
        // Several frames in one packet (`dispatch` saw to it that no fds
        // came with it): each handled as if it had come alone, or, if the
        // batch is damaged, none of them.
        BrokerFrame::Batch(b, entries) => match shmbus_proto::frame::batched(b, entries) {
            Ok(frames) => {
                for frame in frames {
                    if st.closed.is_some() {
                        break;
                    }
                    apply(st, frame, None, Vec::new());
                }
            }
            Err(e) => {
                st.closed = Some(Disconnect {
                    code: Some(GoodbyeCode::ProtocolViolation),
                    reason: format!("the broker sent an invalid frame: {e}"),
                })
            }
        },
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use shmbus_proto::frame::{Deliver, Gap, OpError, Pong, QueryEnd, Revoked, Sender, Subscribed};

    #[test]
    fn an_ack_is_due_at_half_the_window() {
        let mut acks = FdAcks::new(64);
        assert!(!acks.took(31));
        assert_eq!(acks.take_due(), None, "not due: nothing is taken back");
        assert!(acks.took(1));
        assert_eq!(acks.take_due(), Some(32));
        assert_eq!(acks.take_due(), None, "counted once");
        // A batch may overshoot the threshold: all of it is acknowledged.
        assert!(acks.took(40));
        assert_eq!(acks.take_due(), Some(40));
    }

    #[test]
    fn a_tiny_or_missing_window_acks_every_fd() {
        for window in [0, 1, 2, 3] {
            let mut acks = FdAcks::new(window);
            assert!(acks.took(1), "window {window}");
            assert_eq!(acks.take_due(), Some(1), "window {window}");
        }
        let mut acks = FdAcks::default();
        assert!(!acks.took(0));
        assert!(acks.took(1));
    }

    #[test]
    fn counting_saturates() {
        let mut acks = FdAcks::new(8);
        acks.took(usize::MAX);
        acks.took(5);
        assert_eq!(acks.take_due(), Some(u32::MAX));
    }

    /// A broker that keeps at most `window` fds unacknowledged, and a
    /// client that acks after each batch as `wait_for` does, with batches
    /// of every size the socket may give: the broker is never left waiting
    /// for an ack the client will not send, and the client never holds
    /// `window` fds unacknowledged when it goes back to the socket.
    #[test]
    fn the_window_never_stalls() {
        for window in [1u32, 2, 3, 4, 7, 8, 64, 255] {
            for batch in 1..=(2 * window as usize + 1) {
                let mut acks = FdAcks::new(window);
                let (mut in_flight, mut unacked_by_broker, mut delivered) = (0u32, 0u32, 0u32);
                for _ in 0..1000 {
                    // The broker sends as many fds as its window allows.
                    let room = window - unacked_by_broker;
                    in_flight += room;
                    unacked_by_broker += room;
                    // The client takes one batch, then acks if due.
                    let n = in_flight.min(batch as u32);
                    in_flight -= n;
                    delivered += n;
                    acks.took(n as usize);
                    if let Some(k) = acks.take_due() {
                        unacked_by_broker -= k;
                    }
                    assert!(acks.taken < window, "window {window} batch {batch}");
                    // Progress: before the client waits for the socket,
                    // something is in it or the broker has room to send.
                    assert!(in_flight > 0 || unacked_by_broker < window, "stalled: {window} {batch}");
                }
                assert!(delivered >= 1000, "window {window} batch {batch}: {delivered}");
            }
        }
    }

    // ------------------------------------------- bounds of local queues --

    const SENDER: Sender = Sender { client_id: 2, uid: 0, gid: 0, pid: 2 };

    /// Effectively unbounded, for the bounds a test does not exercise.
    const WIDE: LocalBounds = LocalBounds {
        messages: 1 << 20,
        bytes: 1 << 40,
        fds: 1 << 20,
        total_bytes: 1 << 40,
        total_fds: 1 << 20,
    };

    fn state_with(bounds: LocalBounds, subs: &[u32]) -> State {
        let mut st = State { bounds, ..State::default() };
        for &id in subs {
            st.add_sub(id, Vec::new());
        }
        st
    }

    fn deliver_inline(st: &mut State, sub_id: u32, seq: u64, payload: &[u8]) {
        let d =
            Deliver { sub_id, topic: "t.x", sender: SENDER, seq, origin: None, payload: PayloadRef::Inline };
        apply(st, BrokerFrame::Deliver(d, payload), None, Vec::new());
    }

    fn deliver_memfd(st: &mut State, sub_id: u32, seq: u64, fd: OwnedFd) {
        let d = Deliver {
            sub_id,
            topic: "t.x",
            sender: SENDER,
            seq,
            origin: None,
            payload: PayloadRef::Memfd { len: 3 },
        };
        apply(st, BrokerFrame::Deliver(d, &[]), Some(Ok((fd, 3))), Vec::new());
    }

    #[test]
    fn messages_on_one_subject_share_its_text() {
        let mut st = state_with(WIDE, &[1]);
        deliver_inline(&mut st, 1, 1, b"a");
        deliver_inline(&mut st, 1, 2, b"b");
        let d = Deliver {
            sub_id: 1,
            topic: "t.y",
            sender: SENDER,
            seq: 3,
            origin: None,
            payload: PayloadRef::Inline,
        };
        apply(&mut st, BrokerFrame::Deliver(d, b"c"), None, Vec::new());
        let mut topics = Vec::new();
        while let Some((_, Event::Message(m))) = st.take_event(1) {
            topics.push(m.topic);
        }
        assert_eq!(topics.iter().map(|t| &**t).collect::<Vec<_>>(), ["t.x", "t.x", "t.y"]);
        assert!(Arc::ptr_eq(&topics[0], &topics[1]), "one allocation for a stream's subject");
        assert!(!Arc::ptr_eq(&topics[1], &topics[2]));
    }

    /// An event, shortly: a message by its seq, or a gap by its count.
    #[derive(Debug, PartialEq, Eq)]
    enum Ev {
        M(u64),
        G(u64),
        R,
    }

    fn drain(st: &mut State, id: u32) -> Vec<Ev> {
        std::iter::from_fn(|| st.take_event(id))
            .map(|(_, e)| match e {
                Event::Message(m) => Ev::M(m.seq()),
                Event::Gap { missed } => Ev::G(missed),
                Event::Reconnected => Ev::R,
            })
            .collect()
    }

    /// Open fds of this process whose memfd is named `name`.
    fn memfds_named(name: &str) -> usize {
        let needle = format!("/memfd:{name} ");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t.to_string_lossy().starts_with(&needle))
            .count()
    }

    /// One inline message on "t.x" with `len` payload bytes costs this.
    fn inline_cost(len: usize) -> usize {
        Charge::of("t.x".len(), false, len).bytes
    }

    #[test]
    fn inline_bytes_are_bounded_per_subscription_and_drops_are_a_gap_where_they_happened() {
        let bounds = LocalBounds { bytes: 3 * inline_cost(1000), ..WIDE };
        let mut st = state_with(bounds, &[1]);
        let payload = vec![7u8; 1000];
        for seq in 1..=5 {
            deliver_inline(&mut st, 1, seq, &payload);
        }
        assert_eq!(st.queued.bytes, 3 * inline_cost(1000), "three fit, two are dropped");
        // Taking one makes room for one more, after the gap of two.
        assert_eq!(st.take_event(1).map(|(_, e)| e.message().unwrap().seq()), Some(1));
        deliver_inline(&mut st, 1, 6, &payload);
        assert_eq!(drain(&mut st, 1), [Ev::M(2), Ev::M(3), Ev::G(2), Ev::M(6)]);
        assert_eq!(st.queued, Charge::default(), "everything taken is released");
        assert_eq!(st.subs[&1].charge, Charge::default());
        // A message bigger than the whole bound never fits, and is a gap.
        deliver_inline(&mut st, 1, 7, &vec![0u8; 4 * 1000]);
        deliver_inline(&mut st, 1, 8, &payload);
        assert_eq!(drain(&mut st, 1), [Ev::G(1), Ev::M(8)]);
    }

    #[test]
    fn empty_messages_are_bounded_in_bytes_too() {
        let bounds = LocalBounds { bytes: 10 * inline_cost(0), ..WIDE };
        let mut st = state_with(bounds, &[1]);
        for seq in 1..=1000 {
            deliver_inline(&mut st, 1, seq, &[]);
        }
        let events = drain(&mut st, 1);
        assert_eq!(events.len(), 11);
        assert_eq!(events[10], Ev::G(990));
    }

    #[test]
    fn memfd_payloads_are_bounded_in_fds_and_a_dropped_one_is_closed_at_once() {
        let name = format!("bound-fds-{}", std::process::id());
        let bounds = LocalBounds { fds: 2, ..WIDE };
        let mut st = state_with(bounds, &[1]);
        for seq in 1..=5 {
            deliver_memfd(&mut st, 1, seq, memfd::from_bytes(&name, b"abc").unwrap());
            assert!(memfds_named(&name) <= 2, "after {seq}: {} held", memfds_named(&name));
        }
        assert_eq!(memfds_named(&name), 2);
        assert_eq!(st.queued, Charge { bytes: 2 * Charge::of(3, true, 3).bytes, fds: 2 });
        let events = drain(&mut st, 1);
        assert_eq!(events, [Ev::M(1), Ev::M(2), Ev::G(3)]);
        assert_eq!(memfds_named(&name), 0, "taken and dropped, so closed");
        // A memfd payload does not count its pages in bytes.
        let bounds = LocalBounds { bytes: inline_cost(0), ..WIDE };
        let mut st = state_with(bounds, &[1]);
        deliver_memfd(&mut st, 1, 1, memfd::from_bytes(&name, b"abc").unwrap());
        assert_eq!(drain(&mut st, 1), [Ev::M(1)]);
        // No fds at all: every memfd payload is a gap, and closed.
        let bounds = LocalBounds { fds: 0, ..WIDE };
        let mut st = state_with(bounds, &[1]);
        deliver_memfd(&mut st, 1, 1, memfd::from_bytes(&name, b"abc").unwrap());
        assert_eq!(memfds_named(&name), 0);
        deliver_inline(&mut st, 1, 2, b"x");
        assert_eq!(drain(&mut st, 1), [Ev::G(1), Ev::M(2)]);
    }

    #[test]
    fn the_connection_bounds_span_every_subscription() {
        let bounds = LocalBounds { total_bytes: 4 * inline_cost(100), total_fds: 3, ..WIDE };
        let mut st = state_with(bounds, &[1, 2]);
        for seq in 1..=3 {
            deliver_inline(&mut st, 1, seq, &[1u8; 100]);
        }
        for seq in 11..=13 {
            deliver_inline(&mut st, 2, seq, &[2u8; 100]);
        }
        assert_eq!(st.queued.bytes, 4 * inline_cost(100));
        // Subscription 1 goes: its share is released, and 2 has room again.
        st.remove_sub(1);
        assert_eq!(st.queued.bytes, inline_cost(100));
        deliver_inline(&mut st, 2, 14, &[2u8; 100]);
        assert_eq!(drain(&mut st, 2), [Ev::M(11), Ev::G(2), Ev::M(14)]);
        // Fds, likewise.
        let name = format!("bound-total-fds-{}", std::process::id());
        st.add_sub(1, Vec::new());
        for seq in 1..=3 {
            deliver_memfd(&mut st, 1, seq, memfd::from_bytes(&name, b"abc").unwrap());
        }
        deliver_memfd(&mut st, 2, 15, memfd::from_bytes(&name, b"abc").unwrap());
        assert_eq!(memfds_named(&name), 3);
        assert_eq!(drain(&mut st, 2), [Ev::G(1)]);
        assert_eq!(drain(&mut st, 1), [Ev::M(1), Ev::M(2), Ev::M(3)]);
        assert_eq!(memfds_named(&name), 0);
        assert_eq!(st.queued, Charge::default());
    }

    #[test]
    fn the_message_bound_still_holds() {
        let bounds = LocalBounds { messages: 2, ..WIDE };
        let mut st = state_with(bounds, &[1]);
        for seq in 1..=4 {
            deliver_inline(&mut st, 1, seq, b"x");
        }
        assert_eq!(drain(&mut st, 1), [Ev::M(1), Ev::M(2), Ev::G(2)]);
    }

    #[test]
    fn gaps_add_up_without_overflow_and_never_outnumber_messages() {
        let bounds = LocalBounds { messages: 1, ..WIDE };
        let mut st = state_with(bounds, &[1]);
        deliver_inline(&mut st, 1, 1, b"x");
        deliver_inline(&mut st, 1, 2, b"x"); // dropped locally
        for _ in 0..1000 {
            apply(&mut st, BrokerFrame::Gap(Gap { sub_id: 1, missed: 5 }), None, Vec::new());
        }
        apply(&mut st, BrokerFrame::Gap(Gap { sub_id: 1, missed: u64::MAX }), None, Vec::new());
        assert_eq!(st.subs[&1].events.len(), 2, "one message, one gap");
        assert_eq!(drain(&mut st, 1), [Ev::M(1), Ev::G(u64::MAX)]);
    }

    // ------------------------------------------------------------- ids --

    #[test]
    fn ids_wrap_past_whatever_is_in_use() {
        let mut ids = IdSpace::default();
        ids.set_next(u32::MAX - 1);
        let busy = |id| id == 1 || id == 3;
        let got: Vec<u32> = (0..4).map(|_| ids.alloc(busy).unwrap()).collect();
        assert_eq!(got, [u32::MAX - 1, u32::MAX, 2, 4], "0 and the busy ids are skipped");
        // Handed-out ids stay in use until answered.
        ids.set_next(u32::MAX - 1);
        assert_eq!(ids.alloc(busy), Some(5));
        assert!(ids.answered(2));
        assert!(!ids.answered(2), "an answer nobody asked for changes nothing");
        ids.set_next(u32::MAX - 1);
        assert_eq!(ids.alloc(busy), Some(2));
        // Two answers owed: free after both.
        ids.owe(4);
        assert!(ids.answered(4));
        assert!(ids.owes(4));
        assert!(ids.answered(4));
        assert!(!ids.owes(4));
    }

    #[test]
    fn a_subscription_id_is_reused_only_after_the_broker_answered_its_unsubscribe() {
        let mut st = state_with(WIDE, &[]);
        let id = st.new_sub_id().unwrap();
        st.add_sub(id, Vec::new());
        st.awaiting_ack.insert(id);
        apply(&mut st, BrokerFrame::Subscribed(Subscribed { sub_id: id }), None, Vec::new());
        assert_eq!(st.acks.remove(&id), Some(Ok(())));
        // Live: never handed out again, however the counter wraps.
        st.sub_ids.set_next(id);
        let other = st.new_sub_id().unwrap();
        assert_ne!(other, id);
        // Dropped: its queue goes, its id stays until the broker answers.
        st.remove_sub(id);
        st.sub_ids.owe(id);
        st.sub_ids.set_next(id);
        assert_ne!(st.new_sub_id().unwrap(), id);
        // A delivery sent before the unsubscribe reaches no one.
        deliver_inline(&mut st, id, 1, b"late");
        assert!(!st.subs.contains_key(&id));
        apply(&mut st, BrokerFrame::Subscribed(Subscribed { sub_id: id }), None, Vec::new());
        assert!(st.acks.is_empty(), "an unsubscribe's answer is no subscribe's ack");
        st.sub_ids.set_next(id);
        assert_eq!(st.new_sub_id(), Some(id), "answered: free again");
        // A refusal answers too.
        let op = Op::Unsubscribe { sub_id: other };
        let e = OpError { op, code: ErrorCode::UnknownSubscription, message: "" };
        apply(&mut st, BrokerFrame::OpError(e), None, Vec::new());
        assert!(!st.sub_ids.owes(other));
    }

    #[test]
    fn ids_in_flight_when_the_connection_is_lost_are_free_after_reconnecting() {
        let mut st = state_with(WIDE, &[]);
        // A live subscription, renewed after the reconnection.
        let live = st.new_sub_id().unwrap();
        st.add_sub(live, b"renew".to_vec());
        st.awaiting_ack.insert(live);
        apply(&mut st, BrokerFrame::Subscribed(Subscribed { sub_id: live }), None, Vec::new());
        st.acks.clear();
        // An unsubscribe, a query, a channel open and a name request in
        // flight when the broker went away.
        let gone = st.new_sub_id().unwrap();
        let query = st.new_query().unwrap();
        st.queries.remove(&query);
        let chan = st.next_channel_id().unwrap();
        let name = st.name_ids.alloc(|_| false).unwrap();
        assert!(st.sub_ids.owes(gone) && st.query_ids.owes(query));
        assert!(st.channel_ids.owes(chan) && st.name_ids.owes(name));
        st.connection_lost(Disconnect { code: None, reason: "test".into() });
        let renew = st.reconnected(8);
        assert_eq!(renew, [(live, b"renew".to_vec())]);
        // The lost broker's answers never come: those ids are free.
        assert!(!st.sub_ids.owes(gone) && !st.query_ids.owes(query));
        assert!(!st.channel_ids.owes(chan) && !st.name_ids.owes(name));
        st.sub_ids.set_next(gone);
        assert_eq!(st.new_sub_id(), Some(gone));
        // The renewal is owed its answer by the new broker, and its id
        // stays the subscription's.
        assert!(st.sub_ids.owes(live));
        apply(&mut st, BrokerFrame::Subscribed(Subscribed { sub_id: live }), None, Vec::new());
        assert!(!st.sub_ids.owes(live));
        st.sub_ids.set_next(live);
        assert_ne!(st.new_sub_id(), Some(live));
    }

    #[test]
    fn a_late_answer_never_reaches_a_newer_request() {
        let mut st = state_with(WIDE, &[]);
        // A query that timed out: its slot is gone, its answer may come.
        let q = st.new_query().unwrap();
        st.queries.remove(&q);
        st.query_ids.set_next(q);
        let q2 = st.new_query().unwrap();
        assert_ne!(q2, q);
        apply(&mut st, BrokerFrame::QueryEnd(QueryEnd { req_id: q, next: None }), None, Vec::new());
        assert!(!st.queries[&q2].done, "the late answer is not the new query's");
        st.query_ids.set_next(q);
        assert_eq!(st.new_query(), Some(q));
        // A channel open likewise.
        let c = st.next_channel_id().unwrap();
        st.channel_ids.set_next(c);
        assert_ne!(st.next_channel_id().unwrap(), c);
        let op = Op::ChannelOpen { req_id: c };
        let e = OpError { op, code: ErrorCode::NoSuchChannel, message: "" };
        apply(&mut st, BrokerFrame::OpError(e), None, Vec::new());
        st.channel_ids.set_next(c);
        assert_eq!(st.next_channel_id().unwrap(), c);
        // A pong for a ping that gave up is dropped, not kept forever.
        let t = st.new_ping();
        st.pings.remove(&t);
        apply(&mut st, BrokerFrame::Pong(Pong { token: t }), None, Vec::new());
        assert!(st.pings.is_empty());
        assert_ne!(st.new_ping(), t);
    }

    // ------------------------------------------------------ revocations --

    pub(crate) fn revoke(st: &mut State, what: Revocation<'_>, reason: &str) {
        apply(st, BrokerFrame::Revoked(Revoked { what, reason }), None, Vec::new());
    }

    /// What `take_or_revoked` gives, shortly.
    fn next_of(st: &mut State, id: u32) -> Option<Result<Ev, String>> {
        st.take_or_revoked(id).map(|r| {
            r.map(|(_, e)| match e {
                Event::Message(m) => Ev::M(m.seq()),
                Event::Gap { missed } => Ev::G(missed),
                Event::Reconnected => Ev::R,
            })
        })
    }

    #[test]
    fn a_revoked_subscription_yields_what_came_before_then_its_reason_every_time() {
        let mut st = state_with(WIDE, &[1, 2]);
        deliver_inline(&mut st, 1, 1, b"a");
        deliver_inline(&mut st, 2, 2, b"b");
        // The broker sends a gap it owes before the notice.
        apply(&mut st, BrokerFrame::Gap(Gap { sub_id: 1, missed: 3 }), None, Vec::new());
        revoke(&mut st, Revocation::Subscription { sub_id: 1 }, "policy reloaded: no");
        deliver_inline(&mut st, 2, 3, b"c");
        // Nothing after the notice is heard, and a second notice keeps the
        // first reason.
        deliver_inline(&mut st, 1, 4, b"late");
        apply(&mut st, BrokerFrame::Gap(Gap { sub_id: 1, missed: 9 }), None, Vec::new());
        revoke(&mut st, Revocation::Subscription { sub_id: 1 }, "another");
        assert_eq!(st.revocation(1).as_deref(), Some("policy reloaded: no"));
        assert_eq!(st.revocation(2), None);
        // In arrival order across both: 1's message, 2's, 1's gap, 1's
        // revocation, 2's last message.
        assert_eq!((st.peek_arrival(1), st.peek_arrival(2)), (Some(1), Some(2)));
        assert_eq!(next_of(&mut st, 1), Some(Ok(Ev::M(1))));
        assert_eq!(next_of(&mut st, 1), Some(Ok(Ev::G(3))));
        assert_eq!(st.peek_arrival(1), Some(4), "where the notice arrived");
        for _ in 0..3 {
            assert_eq!(next_of(&mut st, 1), Some(Err("policy reloaded: no".into())), "every time");
        }
        assert_eq!(drain(&mut st, 2), [Ev::M(2), Ev::M(3)]);
        assert_eq!(next_of(&mut st, 2), None, "a live subscription just has nothing");
        assert_eq!(st.queued, Charge::default(), "the late message was never queued");
        // A notice for a subscription we do not have changes nothing.
        revoke(&mut st, Revocation::Subscription { sub_id: 77 }, "x");
        assert!(!st.subs.contains_key(&77));
        assert_eq!(next_of(&mut st, 77), None);
    }

    #[test]
    fn local_drops_before_a_revocation_are_reported_before_it() {
        let bounds = LocalBounds { messages: 1, ..WIDE };
        let mut st = state_with(bounds, &[1]);
        deliver_inline(&mut st, 1, 1, b"x");
        deliver_inline(&mut st, 1, 2, b"x"); // dropped here
        revoke(&mut st, Revocation::Subscription { sub_id: 1 }, "gone");
        assert_eq!(next_of(&mut st, 1), Some(Ok(Ev::M(1))));
        assert_eq!(next_of(&mut st, 1), Some(Ok(Ev::G(1))));
        assert_eq!(next_of(&mut st, 1), Some(Err("gone".into())));
    }
}
