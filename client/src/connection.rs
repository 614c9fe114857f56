//! The shared connection behind `Client` and its `Subscription`s.
//!
//! Model: one socket, many consumers. Frames from the broker arrive in one
//! stream and are dispatched to per-subscription queues and per-request
//! slots in [`State`]. There is no background thread: whichever caller
//! needs something that is not yet there becomes the *reader* (it holds
//! the `reader` lock), receives a batch, dispatches it, and wakes the
//! others; callers that find the reader busy wait on the condvar. So a
//! single-threaded app pays no thread hop, and a multi-threaded one still
//! has every frame delivered.
//!
//! Lock order: `reader` before `state`, and `send` before `state`; the
//! reader releases `reader` before it notifies, and waiters check-then-wait
//! under `state`, so no wake-up is lost. Sending takes only `send`, so
//! publishing never waits for a reader.
//!
//! Fd acknowledgements: the broker sends at most `Limits::fd_window` fds
//! that we have not acknowledged with an `FdAck`, and at most a uid-wide
//! number across every connection of our uid. The reader counts every fd
//! it takes from the socket (in [`FdAcks`], under `state`), whatever
//! becomes of it: a payload for a live subscription, one for a dropped
//! one (closed at once), a channel grant, a refused fd, one the kernel
//! could not install. Two rules say when an ack is due:
//!
//! - While the socket has more to read (the fast path), once half the
//!   window is taken: a busy stream pays one ack per half window.
//! - Before anyone waits for the socket (the reader before it polls or
//!   blocks in a receive, and before it gives up on an empty socket; a
//!   caller before it waits on the condvar for the reader), everything
//!   taken, however little.
//!
//! So a connection that waits holds no unacknowledged fd. That is what
//! keeps the uid-wide limit from deadlocking honest clients: if every
//! connection of the uid waits for input, none holds an unacknowledged fd,
//! so the broker has room to send; with the threshold alone, 17 clients
//! each holding 63 of 1024 would wait forever. (The fds the broker sent
//! and a connection has not read yet count as well, but they are read
//! before that connection waits.)
//!
//! The ack goes with nothing but `send` held. The reader never *waits*
//! for `send` (its holder may be blocked on a full socket, and only
//! reading lets the broker go on): if `send` is taken, the ack is left to
//! the holder, which sends it as it lets go (see [`SendGuard`]). Either
//! way a due ack is on its way without waiting for more input, so the
//! broker always has room to send more.
//!
//! Our own fd table full: a packet whose fds the kernel could not install
//! arrives with `MSG_CTRUNC`. If duplicating an fd then fails with
//! `EMFILE`/`ENFILE`, the shortage is ours, not a broker's fault: a
//! delivery that lost its memfd is counted as missed on its subscription
//! (a `Gap`), and the fds the broker sent with it are counted (for the
//! ack) as sent. Any other `MSG_CTRUNC` ends the connection.
//!
//! Nothing is lost silently, and nothing a peer sends grows without bound:
//! each subscription's queue is bounded in messages, in bytes and in fds,
//! and all of them together in bytes and in fds ([`LocalBounds`]). A
//! message past any bound is dropped on arrival (a memfd payload's fd is
//! closed there and then), counted, and surfaces as a `Gap` event where it
//! went missing, exactly as broker-side gaps do.
//!
//! Ids: subscription ids, query, channel-open and name request ids are
//! u32 on the wire, each kind with its own [`IdSpace`]. An id is handed out
//! again only once its table no longer holds it *and* the broker has
//! answered everything sent under it (a subscribe, an unsubscribe, a
//! query, a channel open, a name request, release or owner query), so
//! neither a live queue nor a late answer can be mixed up with a newer
//! user of the same id after the counter wraps. Ping tokens and call ids
//! are u64 and never wrap (a fire-and-forget send's call id has bit 63
//! set; see `service`).
//!
//! Services (see `service`): a `Serve` goes to its service's bounded
//! queue (counted in the connection's totals with the subscriptions), and
//! an `Answer` to the call waiting for it. What the reader must answer on a
//! service's behalf (a full queue, a name not served) is queued in
//! `State::auto_replies` and sent like a due `FdAck`: by the reader if
//! `send` is free, else by its holder as it lets go.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use shmbus_proto::frame::PayloadRef;
use shmbus_proto::frame::{
    decode_broker, encode_head_into, Body, BrokerFrame, ErrorCode, FdAck, GoodbyeCode, Limits, Op,
    QueryItemBody, Reply, ReplyStatus, Revocation,
};
use shmbus_proto::sys::memfd;
use shmbus_proto::sys::socket::{self, OutPacket, PeerCred, RecvBatch, RecvStatus};
use std::sync::Arc;

use crate::error::{Disconnect, PublishRefused, RecvError, SendRefused};
use crate::message::{Body as Payload, Event, MemfdPayload, Message};
use crate::service::{AutoReply, CallSlot, NameAnswer, NameStatus, RevokedName, ServiceQueue};

/// Packets per receive batch in a client.
const RECV_SLOTS: usize = 64;

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
    owed: HashMap<u32, u32>,
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
    pub subs: HashMap<u32, SubQueue>,
    /// Subscribe/unsubscribe acknowledgements awaited, by sub id.
    pub awaiting_ack: HashSet<u32>,
    pub acks: HashMap<u32, Result<(), (ErrorCode, String)>>,
    /// Pings awaiting their pong, by token: whether it came.
    pub pings: HashMap<u64, bool>,
    /// The last ping token handed out (u64: it never wraps).
    pub last_ping: u64,
    pub queries: HashMap<u32, QuerySlot>,
    /// Channel opens awaiting the broker's answer, and the answers.
    pub awaiting_grant: HashSet<u32>,
    pub grants: HashMap<u32, Result<Grant, (ErrorCode, String)>>,
    /// Readers joining and leaving, per channel this client publishes
    /// (news for any other channel is dropped, closing its fds).
    pub reader_events: HashMap<u64, VecDeque<ReaderEvent>>,
    pub refused_publishes: Vec<PublishRefused>,
    pub closed: Option<Disconnect>,
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
    pub name_ops: HashMap<u32, Option<NameAnswer>>,
    /// The name of each name request awaiting its answer, by id.
    pub name_requests: HashMap<u32, String>,
    /// Calls waiting for their answer, by call id (see `service`).
    pub calls: HashMap<u64, CallSlot>,
    /// The last call id handed out (it never wraps).
    pub last_call: u64,
    /// Fire-and-forget sends so far, and those the broker refused.
    pub sends: u64,
    pub refused_sends: Vec<SendRefused>,
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
    pub held_channels: HashMap<u64, u32>,
    /// Why the broker closed a held channel by policy, by channel id
    /// (forgotten with the channel's last handle).
    pub revoked_channels: HashMap<u64, String>,
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
    pub fn add_sub(&mut self, id: u32) {
        if let Some(old) = self.subs.insert(id, SubQueue::default()) {
            self.queued.sub(old.charge);
        }
    }

    /// Ends the queue of subscription `id`, releasing what it held.
    pub fn remove_sub(&mut self, id: u32) {
        if let Some(q) = self.subs.remove(&id) {
            self.queued.sub(q.charge);
        }
    }

    /// Whether a message for `sub_id` that costs `c` fits every bound. If
    /// it does not, it is counted as missed (the caller drops it, closing
    /// its fd). `false` too for a subscription we do not have.
    fn admit(&mut self, sub_id: u32, c: Charge) -> bool {
        let (b, total) = (self.bounds, self.queued);
        let Some(q) = self.subs.get_mut(&sub_id) else { return false };
        if q.revoked.is_some() {
            // The broker said nothing more comes: a broker that sends
            // more anyway is not heard.
            return false;
        }
        let fits = q.events.len() < b.messages
            && q.charge.fits(c, b.bytes, b.fds)
            && total.fits(c, b.total_bytes, b.total_fds);
        if !fits {
            q.local_missed = q.local_missed.saturating_add(1);
        }
        fits
    }

    /// Counts one message of `sub_id` as missed.
    fn count_missed(&mut self, sub_id: u32) {
        if let Some(q) = self.subs.get_mut(&sub_id) {
            q.local_missed = q.local_missed.saturating_add(1);
        }
    }

    /// Queues a message that [`State::admit`] let in, after a gap for
    /// whatever was missed before it.
    fn push_message(&mut self, sub_id: u32, arrival: u64, m: Message, charge: Charge) {
        self.push_gap(sub_id, arrival, 0);
        let Some(q) = self.subs.get_mut(&sub_id) else { return };
        q.events.push_back(Queued { arrival, event: Event::Message(m), charge });
        q.charge.add(charge);
        self.queued.add(charge);
    }

    /// Queues a gap of `missed` plus what was missed locally, if that makes
    /// any. A gap is never dropped (it is what reports drops), but one
    /// right after another adds to it, so gaps never outnumber messages.
    fn push_gap(&mut self, sub_id: u32, arrival: u64, missed: u64) {
        let Some(q) = self.subs.get_mut(&sub_id) else { return };
        if q.revoked.is_some() {
            return;
        }
        let missed = missed.saturating_add(std::mem::take(&mut q.local_missed));
        if missed == 0 {
            return;
        }
        match q.events.back_mut() {
            Some(Queued { event: Event::Gap { missed: m }, .. }) => *m = m.saturating_add(missed),
            _ => q.events.push_back(Queued {
                arrival,
                event: Event::Gap { missed },
                charge: Charge::default(),
            }),
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
    fn on_revoked(&mut self, what: Revocation<'_>, reason: &str, arrival: u64) {
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

/// What the reader keeps between batches.
#[derive(Default)]
pub(crate) struct ReaderState {
    pub batch: Option<RecvBatch>,
    /// The last batch filled every slot, so more is probably waiting: try
    /// a non-blocking receive before paying for a poll.
    pub backlog: bool,
    /// Each packet's status and fds, taken out of the batch before any
    /// packet is dispatched (reused between batches).
    held: Vec<(RecvStatus, Vec<OwnedFd>)>,
    /// `SO_RCVTIMEO` is set to [`RCV_TICK`] on the socket.
    rcv_tick: bool,
}

/// A timed wait longer than this blocks in the receive itself, which wakes
/// at least this often (`SO_RCVTIMEO`) to look at its deadline, instead of
/// paying a `ppoll` and then a receive: one system call per wait, not two.
/// Measured: a call's round trip went from 1.17× to 1.01× a pub/sub round
/// trip (`cargo run --release -p shmbus-benches -- request`).
const RCV_TICK: Duration = Duration::from_millis(500);

pub(crate) struct SendState {
    pub head: Vec<u8>,
    /// Encoded heads of a `publish_many` batch, reused between calls.
    pub heads: Vec<Vec<u8>>,
    /// Publishes sent so far; the broker numbers them the same way.
    pub published: u64,
}

pub(crate) struct Inner {
    pub fd: OwnedFd,
    pub client_id: u64,
    pub limits: Limits,
    pub broker: PeerCred,
    pub address: String,
    /// Taken through [`Inner::lock_send`] only, so that whoever lets go of
    /// it sends a due `FdAck`.
    send: Mutex<SendState>,
    pub state: Mutex<State>,
    pub reader: Mutex<ReaderState>,
    pub cond: Condvar,
    /// `state.fd_acks.is_due()` or `state.auto_replies` not empty,
    /// readable without `state` (written only under `state`).
    ack_due: AtomicBool,
    /// Makes [`Inner::fd_table_full`] say yes, for tests.
    #[cfg(test)]
    fake_fd_table_full: AtomicBool,
}

/// The `send` lock. Letting go of it sends an `FdAck` that came due while
/// it was held (the reader does not wait for `send` to send one).
pub(crate) struct SendGuard<'a> {
    inner: &'a Inner,
    guard: Option<MutexGuard<'a, SendState>>,
}

impl Deref for SendGuard<'_> {
    type Target = SendState;
    fn deref(&self) -> &SendState {
        self.guard.as_ref().expect("held until drop")
    }
}

impl DerefMut for SendGuard<'_> {
    fn deref_mut(&mut self) -> &mut SendState {
        self.guard.as_mut().expect("held until drop")
    }
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.inner.send_fd_ack();
    }
}

impl Inner {
    #[cfg(test)]
    pub fn new(
        fd: OwnedFd,
        client_id: u64,
        limits: Limits,
        broker: PeerCred,
        address: String,
        local_limit: usize,
    ) -> Inner {
        let bounds = LocalBounds { messages: local_limit, ..LocalBounds::default() };
        Inner::with_bounds(fd, client_id, limits, broker, address, bounds)
    }

    pub fn with_bounds(
        fd: OwnedFd,
        client_id: u64,
        limits: Limits,
        broker: PeerCred,
        address: String,
        bounds: LocalBounds,
    ) -> Inner {
        Inner {
            fd,
            client_id,
            limits,
            broker,
            address,
            send: Mutex::new(SendState { head: Vec::with_capacity(256), heads: Vec::new(), published: 0 }),
            state: Mutex::new(State { bounds, fd_acks: FdAcks::new(limits.fd_window), ..State::default() }),
            reader: Mutex::new(ReaderState::default()),
            cond: Condvar::new(),
            ack_due: AtomicBool::new(false),
            #[cfg(test)]
            fake_fd_table_full: AtomicBool::new(false),
        }
    }

    /// Takes the `send` lock.
    pub fn lock_send(&self) -> SendGuard<'_> {
        SendGuard { inner: self, guard: Some(self.send.lock()) }
    }

    /// Sends one frame (blocking while the socket buffer is full).
    pub fn send<B: Body>(&self, body: &B, payload: &[u8]) -> Result<(), RecvError> {
        let mut s = self.lock_send();
        self.send_locked(&mut s, body, payload)
    }

    /// Sends the `FdAck` that is due, if any, and the answers the reader
    /// queued on a service's behalf (`State::auto_replies`), unless `send`
    /// is taken: then its holder sends them as it lets go. Called by the reader after each
    /// batch and before it waits ([`Inner::ack_everything`], `reader` held:
    /// `send` is only tried, never waited for), by one who waits for the
    /// reader (no lock held), and by every holder of `send` as it lets go.
    ///
    /// No ack is left behind: the reader stores `ack_due` and then tries
    /// `send`; a holder unlocks `send` and then loads `ack_due`. With a
    /// SeqCst fence between the two steps on both sides, at least one of
    /// them sees the other's write (the store-buffering pattern), so either
    /// the reader gets the lock or the holder sees the ack is due.
    pub fn send_fd_ack(&self) {
        loop {
            // SeqCst: pairs with the fence of the other side (see above).
            fence(Ordering::SeqCst);
            // Relaxed: ordered by the fence above.
            if !self.ack_due.load(Ordering::Relaxed) {
                return;
            }
            let Some(mut s) = self.send.try_lock() else { return };
            let (due, replies) = {
                let mut st = self.state.lock();
                // Relaxed: `ack_due` is only written under `state`.
                self.ack_due.store(false, Ordering::Relaxed);
                if st.closed.is_some() {
                    st.auto_replies.clear();
                    (None, Vec::new())
                } else {
                    (st.fd_acks.take_due(), std::mem::take(&mut st.auto_replies))
                }
            };
            if let Some(fds) = due {
                // A failure means the connection is gone, and acks with it.
                let _ = self.send_locked(&mut s, &FdAck { fds }, &[]);
            }
            for r in replies {
                let status = ReplyStatus::Error { code: r.code, message: r.message };
                let reply = Reply { serial: r.serial, status, payload: PayloadRef::Inline };
                // Likewise: the broker then answers the caller itself.
                let _ = self.send_locked(&mut s, &reply, &[]);
            }
            drop(s);
            // Loop: an ack may have come due while we held `send`.
        }
    }

    /// Before waiting for the socket: makes every fd taken so far due for
    /// an ack, however few, and sends it, or leaves it to the holder of
    /// `send`, who sends it as it lets go (see [`Inner::send_fd_ack`]).
    /// Takes `state`, then `send` only with `try_lock`, so it may be called
    /// holding `reader`, or `send` (that ack then goes as we let go).
    fn ack_everything(&self) {
        {
            let mut st = self.state.lock();
            if !st.fd_acks.request_all() {
                // Nothing taken, or all of it already on its way.
                return;
            }
            // Relaxed: `send_fd_ack`'s fence orders it before we try `send`.
            self.ack_due.store(true, Ordering::Relaxed);
        }
        self.send_fd_ack();
    }

    pub fn send_locked<B: Body>(&self, s: &mut SendState, body: &B, payload: &[u8]) -> Result<(), RecvError> {
        self.send_locked_with_fds(s, body, payload, &[])
    }

    pub fn send_locked_with_fds<B: Body>(
        &self,
        s: &mut SendState,
        body: &B,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), RecvError> {
        encode_head_into(&mut s.head, body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let packet = OutPacket { head: &s.head, payload, fds };
        loop {
            match socket::send_packet(self.fd.as_fd(), packet, false) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.send_error(e)),
            }
        }
    }

    /// Maps a send failure to what the caller is told.
    pub fn send_error(&self, e: io::Error) -> RecvError {
        match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected => {
                RecvError::Disconnected(self.disconnect_reason())
            }
            _ => RecvError::Io(e),
        }
    }

    /// The recorded reason the connection ended, after reading whatever the
    /// broker left in the socket (its goodbye, usually).
    pub fn disconnect_reason(&self) -> Disconnect {
        if let Some(d) = self.state.lock().closed.clone() {
            return d;
        }
        let _ = self.wait_for(Some(Instant::now()), |st| st.closed.clone());
        self.state
            .lock()
            .closed
            .clone()
            .unwrap_or(Disconnect { code: None, reason: "the broker closed the connection".into() })
    }

    /// Waits until `check` yields a value, reading from the socket as
    /// needed, until `deadline` (`None`: forever). `Ok(None)` on timeout.
    /// Fails once the connection is closed and `check` has nothing left.
    pub fn wait_for<T>(
        &self,
        deadline: Option<Instant>,
        mut check: impl FnMut(&mut State) -> Option<T>,
    ) -> Result<Option<T>, RecvError> {
        loop {
            let mut st = self.state.lock();
            if let Some(v) = check(&mut st) {
                return Ok(Some(v));
            }
            if let Some(d) = &st.closed {
                return Err(RecvError::Disconnected(d.clone()));
            }
            let now = Instant::now();
            let remaining = deadline.map(|d| d.saturating_duration_since(now));
            match self.reader.try_lock() {
                Some(mut reader) => {
                    drop(st);
                    let got = self.read_once(&mut reader, remaining);
                    drop(reader);
                    let _st = self.state.lock();
                    self.cond.notify_all();
                    drop(_st);
                    // Before anyone reads again, acknowledge the fds taken.
                    self.send_fd_ack();
                    match got {
                        Ok(true) => {}
                        Ok(false) => {
                            // Nothing arrived in time; one last look.
                            let mut st = self.state.lock();
                            return match check(&mut st) {
                                Some(v) => Ok(Some(v)),
                                None => match &st.closed {
                                    Some(d) => Err(RecvError::Disconnected(d.clone())),
                                    None => Ok(None),
                                },
                            };
                        }
                        Err(e) => return Err(RecvError::Io(e)),
                    }
                }
                None => {
                    if remaining == Some(Duration::ZERO) {
                        return Ok(None);
                    }
                    // The reader acknowledges what it took before it waits
                    // for the socket; one who waits for the reader makes
                    // sure of it too, so no fd taken stays unacknowledged
                    // while this connection waits.
                    if st.fd_acks.request_all() {
                        // Relaxed: `send_fd_ack`'s fence orders it.
                        self.ack_due.store(true, Ordering::Relaxed);
                        drop(st);
                        self.send_fd_ack();
                        // Look again: something may have come meanwhile.
                        continue;
                    }
                    match deadline {
                        Some(d) => {
                            let _ = self.cond.wait_until(&mut st, d);
                        }
                        None => self.cond.wait(&mut st),
                    }
                }
            }
        }
    }

    /// Receives one batch, waiting up to `timeout` for it (`None`: forever).
    /// Returns whether anything was received (or the connection closed).
    ///
    /// Before it waits for the socket, and before it gives up on an empty
    /// one, it acknowledges every fd taken ([`Inner::ack_everything`]);
    /// while the socket has more, the half-window threshold applies.
    fn read_once(&self, reader: &mut ReaderState, timeout: Option<Duration>) -> io::Result<bool> {
        let nonblocking = timeout.is_some_and(|t| t.is_zero());
        // A receive that does not wait comes first when the last batch
        // filled every slot (more is probably waiting), when we may not
        // wait anyway, and when fds are unacknowledged: they are
        // acknowledged once the socket is found empty, not before.
        let mut try_first = reader.backlog || nonblocking || self.state.lock().fd_acks.pending();
        let ReaderState { batch, backlog, held, rcv_tick } = reader;
        let batch = batch.get_or_insert_with(|| RecvBatch::new(RECV_SLOTS));
        let mut resets = 0;
        loop {
            let r = if try_first {
                match batch.recv(self.fd.as_fd(), true) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Nothing waiting: acknowledge everything taken
                        // before waiting (or leaving empty-handed).
                        self.ack_everything();
                        if nonblocking {
                            return Ok(false);
                        }
                        try_first = false;
                        continue;
                    }
                    r => r,
                }
            } else {
                match timeout {
                    // With the tick set, this wakes every RCV_TICK for
                    // nothing (WouldBlock below), and waits again.
                    None => batch.recv(self.fd.as_fd(), false),
                    Some(t) if t > RCV_TICK => {
                        if !*rcv_tick {
                            rustix::net::sockopt::set_socket_timeout(
                                &self.fd,
                                rustix::net::sockopt::Timeout::Recv,
                                Some(RCV_TICK),
                            )?;
                            *rcv_tick = true;
                        }
                        match batch.recv(self.fd.as_fd(), false) {
                            // The tick passed: the caller looks at its deadline.
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                            r => r,
                        }
                    }
                    Some(t) => {
                        if socket::wait_readable(self.fd.as_fd(), Some(t))? {
                            batch.recv(self.fd.as_fd(), true)
                        } else {
                            return Ok(false);
                        }
                    }
                }
            };
            match r {
                Ok(n) => {
                    self.dispatch(batch, held, n);
                    *backlog = n == RECV_SLOTS;
                    return Ok(true);
                }
                // Readable, and then nothing (a spurious wake-up): wait
                // again. Everything taken is acknowledged already.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The broker closed while our data was unread; the error is
                // reported once, and what it sent before is still readable.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset && resets < 2 => resets += 1,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    self.close(None, "connection reset by the broker".into());
                    return Ok(true);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether this process's fd table is full: duplicating an fd we hold
    /// fails with `EMFILE` or `ENFILE`. A packet that lost its fds
    /// (`MSG_CTRUNC`) is then our own shortage, not the broker's doing.
    fn fd_table_full(&self) -> bool {
        #[cfg(test)]
        if self.fake_fd_table_full.load(Ordering::Relaxed) {
            return true;
        }
        match rustix::io::fcntl_dupfd_cloexec(self.fd.as_fd(), 0) {
            // The duplicate closes here.
            Ok(_dup) => false,
            Err(e) => e == rustix::io::Errno::MFILE || e == rustix::io::Errno::NFILE,
        }
    }

    fn close(&self, code: Option<GoodbyeCode>, reason: String) {
        let mut st = self.state.lock();
        if st.closed.is_none() {
            st.closed = Some(Disconnect { code, reason });
        }
    }

    fn dispatch(&self, batch: &mut RecvBatch, held: &mut Vec<(RecvStatus, Vec<OwnedFd>)>, n: usize) {
        // Every packet's fds come out of the batch first, so that if one
        // lost its fds, the fd table is probed with all of this batch's
        // still held: a payload dropped below would make room, and hide
        // why they were lost.
        held.clear();
        held.extend((0..n).map(|i| {
            let (_, status, fds) = batch.packet(i);
            (status, fds)
        }));
        let short_of_fds = held.iter().any(|(s, _)| s.fds_truncated) && self.fd_table_full();
        let mut st = self.state.lock();
        for (i, slot) in held.iter_mut().enumerate() {
            if st.closed.is_some() {
                break;
            }
            let (status, mut fds) = std::mem::take(slot);
            let (data, _, _) = batch.packet(i);
            if data.is_empty() {
                st.closed =
                    Some(Disconnect { code: None, reason: "the broker closed the connection".into() });
                break;
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
            if counted > 0 && st.fd_acks.took(counted) {
                // Relaxed: `send_fd_ack`'s fence orders it before the
                // reader tries `send`.
                self.ack_due.store(true, Ordering::Relaxed);
            }
            if status.truncated || (status.fds_truncated && sent.is_none()) {
                st.closed = Some(Disconnect {
                    code: Some(GoodbyeCode::ProtocolViolation),
                    reason: "the broker sent a truncated packet".into(),
                });
                break;
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
                        apply(&mut st, frame, Some(Err(())), Vec::new())
                    }
                    _ => apply(&mut st, frame, None, std::mem::take(&mut fds)),
                }
                continue;
            }
            let frame = match decode_broker(data) {
                Ok(f) => f,
                Err(e) => {
                    st.closed = Some(Disconnect {
                        code: Some(GoodbyeCode::ProtocolViolation),
                        reason: format!("the broker sent an invalid frame: {e}"),
                    });
                    break;
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
                    st.closed = Some(Disconnect {
                        code: Some(GoodbyeCode::ProtocolViolation),
                        reason: "the broker sent an unexpected fd".into(),
                    });
                    break;
                }
            };
            apply(&mut st, frame, memfd, fds);
        }
        if !st.auto_replies.is_empty() && st.closed.is_none() {
            // Relaxed: `send_fd_ack`'s fence orders it before the reader
            // tries `send`.
            self.ack_due.store(true, Ordering::Relaxed);
        }
        // Fds of packets not dispatched (the connection closed) close here.
        held.clear();
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
fn apply(
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
            let charge = Charge::of(d.topic.len(), memfd.is_some(), payload.len());
            if !st.admit(d.sub_id, charge) {
                return;
            }
            let body = match memfd {
                None => Payload::Inline(payload.to_vec()),
                Some(m) => Payload::Memfd(m),
            };
            let m = Message { topic: d.topic.to_owned(), sender: d.sender, seq: d.seq, body };
            st.push_message(d.sub_id, arrival, m, charge);
        }
        BrokerFrame::Gap(g) => st.push_gap(g.sub_id, arrival, g.missed),
        BrokerFrame::Subscribed(s) => {
            // The answer to a subscribe or to an unsubscribe.
            st.sub_ids.answered(s.sub_id);
            if st.awaiting_ack.remove(&s.sub_id) {
                st.acks.insert(s.sub_id, Ok(()));
            }
        }
        BrokerFrame::OpError(e) => match e.op {
            Op::Subscribe { sub_id } | Op::Unsubscribe { sub_id } => {
                st.sub_ids.answered(sub_id);
                if st.awaiting_ack.remove(&sub_id) {
                    st.acks.insert(sub_id, Err((e.code, e.message.to_owned())));
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
                st.refused_publishes.push(PublishRefused {
                    seq,
                    code: e.code,
                    message: e.message.to_owned(),
                });
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
        },
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
                st.grants.insert(g.req_id, Ok(Grant { frame: g, fds }));
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
mod tests {
    use super::*;
    use shmbus_proto::frame::{
        decode_client, encode_head, ChannelGranted, ChannelOverflow, ClientFrame, Deliver, Gap, OpError,
        Pong, QueryEnd, Revoked, Sender, Subscribed,
    };

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

    fn connected(window: u32) -> (Inner, OwnedFd) {
        let (ours, broker) = socket::pair().unwrap();
        let limits = Limits {
            max_packet: 65536,
            max_inline_payload: 65536,
            queue_bytes: 1 << 20,
            queue_frames: 1024,
            max_subscriptions: 100,
            fd_window: window,
            max_depth: 32,
        };
        let cred = PeerCred { pid: 1, uid: 0, gid: 0 };
        (Inner::new(ours, 1, limits, cred, "test".into(), 16), broker)
    }

    /// The broker sends `n` memfd deliveries for a subscription the client
    /// does not have (so they are dropped: their fds count all the same).
    fn deliver_memfds(broker: &OwnedFd, n: usize) {
        let sender = Sender { client_id: 2, uid: 0, gid: 0, pid: 2 };
        for seq in 0..n as u64 {
            let d = Deliver { sub_id: 99, topic: "a.b", sender, seq, payload: PayloadRef::Memfd { len: 3 } };
            let head = encode_head(&d).unwrap();
            let fd = memfd::from_bytes("test", b"abc").unwrap();
            let fds = [fd.as_fd()];
            socket::send_packet(broker.as_fd(), OutPacket { head: &head, payload: &[], fds: &fds }, false)
                .unwrap();
        }
    }

    /// Lets the client read whatever is waiting.
    fn read_all(inner: &Inner) {
        let got = inner.wait_for(Some(Instant::now() + Duration::from_millis(20)), |_| None::<()>).unwrap();
        assert!(got.is_none());
    }

    /// The acks the broker has received, in order.
    fn acks_received(broker: &OwnedFd) -> Vec<u32> {
        let mut batch = RecvBatch::new(8);
        let mut acks = Vec::new();
        loop {
            match batch.recv(broker.as_fd(), true) {
                Ok(n) => {
                    for i in 0..n {
                        let (data, _, fds) = batch.packet(i);
                        assert!(fds.is_empty());
                        match decode_client(data).unwrap() {
                            ClientFrame::FdAck(a) => acks.push(a.fds),
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return acks,
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Takes the next event of subscription `id`, reading as needed: it
    /// returns as soon as a batch brought one, without looking for more.
    fn take(inner: &Inner, id: u32) -> Event {
        let deadline = Instant::now() + Duration::from_secs(20);
        inner.wait_for(Some(deadline), |st| st.take_event(id)).unwrap().expect("an event in time").1
    }

    #[test]
    fn fds_are_acknowledged_at_half_the_window_while_more_is_read() {
        let (inner, broker) = connected(8);
        inner.state.lock().add_sub(99);
        deliver_memfds(&broker, 3);
        assert!(take(&inner, 99).message().is_some());
        assert_eq!(acks_received(&broker), Vec::<u32>::new(), "3 < 4, and the reader did not wait: not due");
        deliver_memfds(&broker, 2);
        for _ in 0..3 {
            assert!(take(&inner, 99).message().is_some());
        }
        assert_eq!(acks_received(&broker), vec![5]);
        assert!(inner.state.lock().closed.is_none());
    }

    #[test]
    fn fds_of_dropped_frames_count_too() {
        let (inner, broker) = connected(8);
        // A channel grant nobody asked for: its fds are closed, and counted.
        let grant = ChannelGranted {
            req_id: 77,
            channel_id: 1,
            reader_id: 1,
            slot_size: 64,
            slot_count: 4,
            overflow: ChannelOverflow::Overwrite,
        };
        let head = encode_head(&grant).unwrap();
        let (f1, f2, f3) =
            (memfd::create("a", 1).unwrap(), memfd::create("b", 1).unwrap(), memfd::create("c", 1).unwrap());
        let fds = [f1.as_fd(), f2.as_fd(), f3.as_fd()];
        socket::send_packet(broker.as_fd(), OutPacket { head: &head, payload: &[], fds: &fds }, false)
            .unwrap();
        // And deliveries for a subscription we do not have.
        deliver_memfds(&broker, 1);
        read_all(&inner);
        assert_eq!(acks_received(&broker), vec![4]);
        assert!(inner.state.lock().closed.is_none());
    }

    #[test]
    fn everything_taken_is_acknowledged_before_the_reader_waits() {
        let (inner, broker) = connected(8);
        deliver_memfds(&broker, 3);
        // Read, then wait (20 ms) for more: 3 < 4, acknowledged all the same.
        read_all(&inner);
        assert_eq!(acks_received(&broker), vec![3]);
        // A read that does not wait finds the socket empty: likewise.
        deliver_memfds(&broker, 1);
        let got = inner.wait_for(Some(Instant::now()), |_| None::<()>).unwrap();
        assert!(got.is_none());
        assert_eq!(acks_received(&broker), vec![1]);
        // Nothing taken since: nothing more to acknowledge.
        read_all(&inner);
        assert_eq!(acks_received(&broker), Vec::<u32>::new());
        assert!(inner.state.lock().closed.is_none());
    }

    #[test]
    fn one_who_waits_for_the_reader_acknowledges_what_was_taken() {
        let (inner, broker) = connected(8);
        inner.state.lock().add_sub(99);
        deliver_memfds(&broker, 3);
        assert!(take(&inner, 99).message().is_some());
        assert_eq!(acks_received(&broker), Vec::<u32>::new());
        // Someone else is the reader (busy): we wait for it, acknowledging
        // first what was taken.
        let reader = inner.reader.lock();
        let got = inner.wait_for(Some(Instant::now() + Duration::from_millis(20)), |_| None::<()>).unwrap();
        assert!(got.is_none());
        drop(reader);
        assert_eq!(acks_received(&broker), vec![3]);
    }

    #[test]
    fn a_holder_of_send_acknowledges_everything_a_waiting_reader_took() {
        let (inner, broker) = connected(8);
        let guard = inner.lock_send();
        deliver_memfds(&broker, 3);
        // The reader finds the socket empty and `send` taken: it waits
        // without sending, and leaves the ack to the holder.
        read_all(&inner);
        assert_eq!(acks_received(&broker), Vec::<u32>::new());
        drop(guard);
        assert_eq!(acks_received(&broker), vec![3]);
    }

    /// Clients of one uid, each with its own window, share a uid-wide
    /// limit lower than their thresholds together. The broker sends each
    /// client's backlog, one fd per message, as long as both the client's
    /// window and the uid's room allow. Each client takes what its socket
    /// holds and acks as [`FdAcks`] says; when its socket is empty it
    /// waits, and (`ack_before_waiting`) acknowledges everything first.
    /// Returns whether they got stuck: every client waiting on an empty
    /// socket, messages left, and the broker unable to send any.
    fn uid_limit_gets_stuck(clients: usize, window: u32, uid_limit: u32, ack_before_waiting: bool) -> bool {
        let mut acks: Vec<FdAcks> = (0..clients).map(|_| FdAcks::new(window)).collect();
        let mut backlog = vec![200u32; clients];
        let mut in_socket = vec![0u32; clients];
        let mut unacked = vec![0u32; clients];
        for _ in 0..10_000 {
            // The broker, round-robin, one message at a time.
            let mut sent_any = true;
            while sent_any {
                sent_any = false;
                for c in 0..clients {
                    let total: u32 = unacked.iter().sum();
                    if backlog[c] > 0 && unacked[c] < window && total < uid_limit {
                        backlog[c] -= 1;
                        in_socket[c] += 1;
                        unacked[c] += 1;
                        sent_any = true;
                    }
                }
            }
            if backlog.iter().all(|&b| b == 0) && in_socket.iter().all(|&s| s == 0) {
                return false;
            }
            // Each client reads its socket; an empty one waits.
            let mut progress = false;
            for c in 0..clients {
                if in_socket[c] > 0 {
                    acks[c].took(std::mem::take(&mut in_socket[c]) as usize);
                    progress = true;
                } else if ack_before_waiting {
                    acks[c].request_all();
                }
                if let Some(k) = acks[c].take_due() {
                    unacked[c] -= k;
                    progress = true;
                }
            }
            if !progress {
                return true;
            }
        }
        panic!("neither done nor stuck");
    }

    #[test]
    fn a_uid_wide_limit_never_stalls_clients_that_ack_before_waiting() {
        // The model finds the deadlock of acking at the threshold only...
        assert!(uid_limit_gets_stuck(6, 8, 16, false));
        assert!(uid_limit_gets_stuck(17, 128, 1024, false));
        // ... and none once everything is acknowledged before waiting.
        for clients in 1..=20 {
            for window in [4u32, 8, 128] {
                for uid_limit in [4u32, 5, 16, 1024] {
                    assert!(
                        !uid_limit_gets_stuck(clients, window, uid_limit, true),
                        "{clients} clients, window {window}, uid limit {uid_limit}"
                    );
                }
            }
        }
    }

    /// Sends one packet with `fds` beside `head`: more than a packet may
    /// carry (5), so the kernel truncates the control data on the way in,
    /// as it does when the receiver's fd table is full.
    fn send_with_fds(broker: &OwnedFd, head: &[u8], fds: &[BorrowedFd<'_>]) {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
        rustix::net::sendmsg(broker, &[io::IoSlice::new(head)], &mut control, SendFlags::empty()).unwrap();
    }

    /// A delivery by memfd for `sub_id` whose packet carries `fds` memfds.
    fn deliver_with_fds(broker: &OwnedFd, sub_id: u32, seq: u64, fds: usize) {
        let sender = Sender { client_id: 2, uid: 0, gid: 0, pid: 2 };
        let d = Deliver { sub_id, topic: "a.b", sender, seq, payload: PayloadRef::Memfd { len: 3 } };
        let head = encode_head(&d).unwrap();
        let owned: Vec<OwnedFd> = (0..fds).map(|_| memfd::from_bytes("test", b"abc").unwrap()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = owned.iter().map(|f| f.as_fd()).collect();
        send_with_fds(broker, &head, &borrowed);
    }

    #[test]
    fn fds_lost_to_a_full_fd_table_are_a_gap_and_the_connection_stays() {
        let (inner, broker) = connected(8);
        inner.state.lock().add_sub(99);
        inner.fake_fd_table_full.store(true, Ordering::Relaxed);
        deliver_with_fds(&broker, 99, 1, 5);
        deliver_with_fds(&broker, 99, 2, 1);
        match take(&inner, 99) {
            Event::Gap { missed } => assert_eq!(missed, 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(take(&inner, 99).message().map(|m| m.seq()), Some(2));
        assert!(inner.state.lock().closed.is_none());
        // What arrived of its fds (4 of 5) is counted, and acknowledged.
        read_all(&inner);
        assert_eq!(acks_received(&broker), vec![5]);
    }

    #[test]
    fn fds_truncated_otherwise_are_a_protocol_violation() {
        let (inner, broker) = connected(8);
        inner.state.lock().add_sub(99);
        deliver_with_fds(&broker, 99, 1, 5);
        let got = inner.wait_for(Some(Instant::now() + Duration::from_secs(20)), |st| st.take_event(99));
        match got {
            Err(RecvError::Disconnected(d)) => {
                assert_eq!(d.code, Some(GoodbyeCode::ProtocolViolation));
                assert!(d.reason.contains("truncated"), "{}", d.reason);
            }
            other => panic!("{other:?}"),
        }
        // With a full fd table, a frame that carries no fds is no excuse.
        let (inner, broker) = connected(8);
        inner.fake_fd_table_full.store(true, Ordering::Relaxed);
        let head = encode_head(&Pong { token: 1 }).unwrap();
        let f = memfd::from_bytes("test", b"abc").unwrap();
        send_with_fds(&broker, &head, &[f.as_fd(); 5]);
        let got = inner.wait_for(Some(Instant::now() + Duration::from_secs(20)), |_| None::<()>);
        assert!(matches!(got, Err(RecvError::Disconnected(_))), "{got:?}");
        let closed = inner.state.lock().closed.clone().expect("closed");
        assert_eq!(closed.code, Some(GoodbyeCode::ProtocolViolation));
    }

    #[test]
    fn a_holder_of_send_sends_the_ack_the_reader_could_not() {
        let (inner, broker) = connected(2);
        let guard = inner.lock_send();
        deliver_memfds(&broker, 1);
        // The reader finds `send` taken and goes on without waiting.
        read_all(&inner);
        assert_eq!(acks_received(&broker), Vec::<u32>::new());
        drop(guard);
        assert_eq!(acks_received(&broker), vec![1]);
    }

    #[test]
    fn a_closed_connection_sends_no_ack() {
        let (inner, broker) = connected(2);
        deliver_memfds(&broker, 1);
        let guard = inner.lock_send();
        read_all(&inner);
        inner.close(None, "test".into());
        drop(guard);
        assert_eq!(acks_received(&broker), Vec::<u32>::new());
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
            st.add_sub(id);
        }
        st
    }

    fn deliver_inline(st: &mut State, sub_id: u32, seq: u64, payload: &[u8]) {
        let d = Deliver { sub_id, topic: "t.x", sender: SENDER, seq, payload: PayloadRef::Inline };
        apply(st, BrokerFrame::Deliver(d, payload), None, Vec::new());
    }

    fn deliver_memfd(st: &mut State, sub_id: u32, seq: u64, fd: OwnedFd) {
        let d = Deliver { sub_id, topic: "t.x", sender: SENDER, seq, payload: PayloadRef::Memfd { len: 3 } };
        apply(st, BrokerFrame::Deliver(d, &[]), Some(Ok((fd, 3))), Vec::new());
    }

    /// An event, shortly: a message by its seq, or a gap by its count.
    #[derive(Debug, PartialEq, Eq)]
    enum Ev {
        M(u64),
        G(u64),
    }

    fn drain(st: &mut State, id: u32) -> Vec<Ev> {
        std::iter::from_fn(|| st.take_event(id))
            .map(|(_, e)| match e {
                Event::Message(m) => Ev::M(m.seq()),
                Event::Gap { missed } => Ev::G(missed),
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
        st.add_sub(1);
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
        st.add_sub(id);
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

    fn revoke(st: &mut State, what: Revocation<'_>, reason: &str) {
        apply(st, BrokerFrame::Revoked(Revoked { what, reason }), None, Vec::new());
    }

    /// What `take_or_revoked` gives, shortly.
    fn next_of(st: &mut State, id: u32) -> Option<Result<Ev, String>> {
        st.take_or_revoked(id).map(|r| {
            r.map(|(_, e)| match e {
                Event::Message(m) => Ev::M(m.seq()),
                Event::Gap { missed } => Ev::G(missed),
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

    /// The broker sends `body` (and `payload`) to the client.
    fn broker_sends<B: Body>(broker: &OwnedFd, body: &B, payload: &[u8]) {
        let head = encode_head(body).unwrap();
        socket::send_packet(broker.as_fd(), OutPacket { head: &head, payload, fds: &[] }, false).unwrap();
    }

    /// What the client sent the broker, shortly.
    fn client_sent(broker: &OwnedFd) -> Vec<String> {
        let mut batch = RecvBatch::new(8);
        let mut out = Vec::new();
        loop {
            match batch.recv(broker.as_fd(), true) {
                Ok(n) => {
                    for i in 0..n {
                        let (data, _, _) = batch.packet(i);
                        out.push(match decode_client(data).unwrap() {
                            ClientFrame::Unsubscribe(u) => format!("unsubscribe {}", u.sub_id),
                            ClientFrame::FdAck(a) => format!("ack {}", a.fds),
                            other => format!("{other:?}"),
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// A subscription the broker acknowledged, on `inner`.
    fn live_subscription(inner: &Arc<Inner>, pattern: &str) -> crate::subscription::Subscription {
        let id = {
            let mut st = inner.state.lock();
            let id = st.new_sub_id().unwrap();
            st.add_sub(id);
            st.sub_ids.answered(id);
            id
        };
        crate::subscription::Subscription::new(inner.clone(), id, pattern.to_owned())
    }

    #[test]
    fn a_revoked_subscription_ends_every_receive_and_drops_without_an_unsubscribe() {
        use crate::subscription::Subscription;
        let (inner, broker) = connected(8);
        let inner = Arc::new(inner);
        let keep = live_subscription(&inner, "keep.>");
        let gone = live_subscription(&inner, "gone.>");
        let deliver =
            |sub_id, seq| Deliver { sub_id, topic: "t", sender: SENDER, seq, payload: PayloadRef::Inline };
        let reason = "policy reloaded: denied by policy: subscribe gone.>: no rule allows it";
        broker_sends(&broker, &deliver(gone.id(), 1), b"one");
        broker_sends(&broker, &Revoked { what: Revocation::Subscription { sub_id: gone.id() }, reason }, &[]);
        broker_sends(&broker, &deliver(keep.id(), 2), b"two");

        // In the order the broker sent them: the message, then the
        // revocation, which `recv_any` reports until it is left out.
        let t = Some(Duration::from_secs(20));
        let (i, ev) = Subscription::recv_any(&[&keep, &gone], t).unwrap().unwrap();
        assert_eq!((i, ev.message().map(|m| m.seq())), (1, Some(1)));
        for _ in 0..2 {
            let e = Subscription::recv_any(&[&keep, &gone], t).unwrap_err();
            assert!(matches!(&e, RecvError::Revoked(r) if r == reason), "{e}");
        }
        assert_eq!(gone.revocation().as_deref(), Some(reason));
        assert_eq!(keep.revocation(), None);
        let (i, ev) = Subscription::recv_any(&[&keep], t).unwrap().unwrap();
        assert_eq!((i, ev.message().map(|m| m.seq())), (0, Some(2)));

        // Every way of receiving says so, every time, with the reason.
        let e = gone.recv().unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Denied);
        assert!(e.to_string().contains("revoked") && e.to_string().contains(reason), "{e}");
        assert!(matches!(gone.try_recv(), Err(RecvError::Revoked(_))));
        assert!(matches!(gone.recv_timeout(Duration::from_secs(20)), Err(RecvError::Revoked(_))));
        let mut it = gone.iter();
        assert!(matches!(it.next(), Some(Err(RecvError::Revoked(_)))));
        assert!(it.next().is_none(), "the iterator yields it once and ends");
        // A live one just has nothing.
        assert!(keep.try_recv().unwrap().is_none());

        // Dropped: no unsubscribe (the broker forgot it), nothing owed, so
        // its id is free at once.
        let (gone_id, keep_id) = (gone.id(), keep.id());
        drop(gone);
        assert_eq!(client_sent(&broker), Vec::<String>::new());
        {
            let mut st = inner.state.lock();
            assert!(!st.sub_ids.owes(gone_id) && !st.subs.contains_key(&gone_id));
            st.sub_ids.set_next(gone_id);
            assert_eq!(st.new_sub_id(), Some(gone_id));
        }
        // A live one unsubscribes, and its id stays owed until answered.
        drop(keep);
        assert_eq!(client_sent(&broker), [format!("unsubscribe {keep_id}")]);
        assert!(inner.state.lock().sub_ids.owes(keep_id));
    }

    #[test]
    fn channel_revocations_are_kept_only_while_a_handle_is_held() {
        let mut st = State::default();
        let grant = |req_id, channel_id, reader_id| ChannelGranted {
            req_id,
            channel_id,
            reader_id,
            slot_size: 64,
            slot_count: 4,
            overflow: ChannelOverflow::Overwrite,
        };
        // Two handles on channel 5 (publisher and reader), granted as asked.
        for (req_id, reader_id) in [(1, 0), (2, 1)] {
            st.awaiting_grant.insert(req_id);
            apply(&mut st, BrokerFrame::ChannelGranted(grant(req_id, 5, reader_id)), None, Vec::new());
        }
        // A grant nobody waits for holds nothing.
        apply(&mut st, BrokerFrame::ChannelGranted(grant(3, 6, 0)), None, Vec::new());
        revoke(&mut st, Revocation::Channel { channel_id: 6 }, "not ours");
        revoke(&mut st, Revocation::Channel { channel_id: 5 }, "closed for every member");
        assert_eq!(st.revoked_channels.len(), 1);
        assert_eq!(st.revoked_channels[&5], "closed for every member");
        st.release_channel(5);
        assert!(st.revoked_channels.contains_key(&5), "one handle is left");
        st.release_channel(5);
        assert!(st.revoked_channels.is_empty() && st.held_channels.is_empty());
        st.release_channel(5);
        assert!(st.held_channels.is_empty(), "a release too many changes nothing");
    }
}
