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
//! that we have not acknowledged with an `FdAck`. The reader counts every
//! fd it takes from the socket (in [`FdAcks`], under `state`), whatever
//! becomes of it: a payload for a live subscription, one for a dropped
//! one (closed at once), a channel grant, a refused fd. Once half the
//! window is taken, an ack is due; the reader sends it right after its
//! batch, with nothing but `send` held. The reader never *waits* for
//! `send`, though (its holder may be blocked on a full socket, and only
//! reading lets the broker go on): if `send` is taken, the ack is left to
//! the holder, which sends it as it lets go (see [`SendGuard`]). Either
//! way a due ack is on its way without waiting for more input, so taken
//! and unacknowledged fds stay under half the window whenever the reader
//! waits, and the broker always has room to send more.
//!
//! Nothing is lost silently: each subscription's queue is bounded by
//! `local_limit`; past it, messages are counted and surface as a
//! `Gap` event where they went missing, exactly as broker-side gaps do.

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
    QueryItemBody,
};
use shmbus_proto::sys::memfd;
use shmbus_proto::sys::socket::{self, OutPacket, PeerCred, RecvBatch};
use std::sync::Arc;

use crate::error::{Disconnect, PublishRefused, RecvError};
use crate::message::{Body as Payload, Event, MemfdPayload, Message};

/// Packets per receive batch in a client.
const RECV_SLOTS: usize = 64;

#[derive(Debug, Default)]
pub(crate) struct SubQueue {
    /// Events with their arrival number on the connection, so events of
    /// several subscriptions can be taken in the order the broker sent them.
    pub events: VecDeque<(u64, Event)>,
    /// Dropped locally (queue full) and not yet reported.
    pub local_missed: u64,
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
/// and a stream of memfd payloads is never held up by the window.
#[derive(Debug)]
pub(crate) struct FdAcks {
    threshold: u32,
    taken: u32,
}

impl Default for FdAcks {
    /// Acks every fd: for a broker that announced no window.
    fn default() -> Self {
        FdAcks::new(0)
    }
}

impl FdAcks {
    pub fn new(window: u32) -> FdAcks {
        FdAcks { threshold: (window / 2).max(1), taken: 0 }
    }

    /// Records `n` more fds taken from the socket. Returns whether an ack
    /// is due.
    pub fn took(&mut self, n: usize) -> bool {
        self.taken = self.taken.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        self.is_due()
    }

    pub fn is_due(&self) -> bool {
        self.taken >= self.threshold
    }

    /// If an ack is due, the count to acknowledge, which is then no longer
    /// counted.
    pub fn take_due(&mut self) -> Option<u32> {
        self.is_due().then(|| std::mem::take(&mut self.taken))
    }
}

#[derive(Debug, Default)]
pub(crate) struct State {
    pub subs: HashMap<u32, SubQueue>,
    /// Subscribe/unsubscribe acknowledgements awaited, by sub id.
    pub awaiting_ack: HashSet<u32>,
    pub acks: HashMap<u32, Result<(), (ErrorCode, String)>>,
    pub pongs: HashSet<u64>,
    pub queries: HashMap<u32, QuerySlot>,
    /// Channel opens awaiting the broker's answer, and the answers.
    pub awaiting_grant: HashSet<u32>,
    pub grants: HashMap<u32, Result<Grant, (ErrorCode, String)>>,
    /// Readers joining and leaving, per channel this client publishes
    /// (news for any other channel is dropped, closing its fds).
    pub reader_events: HashMap<u64, VecDeque<ReaderEvent>>,
    pub refused_publishes: Vec<PublishRefused>,
    pub closed: Option<Disconnect>,
    pub next_id: u32,
    pub local_limit: usize,
    /// Frames dispatched so far: the arrival number of the next event.
    pub arrivals: u64,
    /// Fds taken and not yet acknowledged to the broker.
    pub fd_acks: FdAcks,
}

/// What the reader keeps between batches.
#[derive(Default)]
pub(crate) struct ReaderState {
    pub batch: Option<RecvBatch>,
    /// The last batch filled every slot, so more is probably waiting: try
    /// a non-blocking receive before paying for a poll.
    pub backlog: bool,
}

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
    /// `state.fd_acks.is_due()`, readable without `state` (written only
    /// under `state`).
    ack_due: AtomicBool,
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
    pub fn new(
        fd: OwnedFd,
        client_id: u64,
        limits: Limits,
        broker: PeerCred,
        address: String,
        local_limit: usize,
    ) -> Inner {
        Inner {
            fd,
            client_id,
            limits,
            broker,
            address,
            send: Mutex::new(SendState { head: Vec::with_capacity(256), heads: Vec::new(), published: 0 }),
            state: Mutex::new(State {
                next_id: 1,
                local_limit,
                fd_acks: FdAcks::new(limits.fd_window),
                ..State::default()
            }),
            reader: Mutex::new(ReaderState::default()),
            cond: Condvar::new(),
            ack_due: AtomicBool::new(false),
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

    /// Sends the `FdAck` that is due, if any, unless `send` is taken: then
    /// its holder sends it as it lets go. Called with no lock held, by the
    /// reader after each batch and by every holder of `send` as it lets go.
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
            let due = {
                let mut st = self.state.lock();
                // Relaxed: `ack_due` is only written under `state`.
                self.ack_due.store(false, Ordering::Relaxed);
                if st.closed.is_some() {
                    None
                } else {
                    st.fd_acks.take_due()
                }
            };
            if let Some(fds) = due {
                // A failure means the connection is gone, and acks with it.
                let _ = self.send_locked(&mut s, &FdAck { fds }, &[]);
            }
            drop(s);
            // Loop: an ack may have come due while we held `send`.
        }
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
    fn read_once(&self, reader: &mut ReaderState, timeout: Option<Duration>) -> io::Result<bool> {
        let backlog = reader.backlog;
        let batch = reader.batch.get_or_insert_with(|| RecvBatch::new(RECV_SLOTS));
        let mut resets = 0;
        loop {
            let r = match timeout {
                None => batch.recv(self.fd.as_fd(), false),
                Some(t) if t.is_zero() || backlog => match batch.recv(self.fd.as_fd(), true) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock && !t.is_zero() => {
                        if socket::wait_readable(self.fd.as_fd(), Some(t))? {
                            batch.recv(self.fd.as_fd(), true)
                        } else {
                            return Ok(false);
                        }
                    }
                    r => r,
                },
                // The socket was drained last time: poll first.
                Some(t) => {
                    if socket::wait_readable(self.fd.as_fd(), Some(t))? {
                        batch.recv(self.fd.as_fd(), true)
                    } else {
                        return Ok(false);
                    }
                }
            };
            match r {
                Ok(n) => {
                    self.dispatch(batch, n);
                    reader.backlog = n == RECV_SLOTS;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if timeout.is_some_and(|t| t.is_zero()) {
                        return Ok(false);
                    }
                }
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

    fn close(&self, code: Option<GoodbyeCode>, reason: String) {
        let mut st = self.state.lock();
        if st.closed.is_none() {
            st.closed = Some(Disconnect { code, reason });
        }
    }

    fn dispatch(&self, batch: &mut RecvBatch, n: usize) {
        let mut st = self.state.lock();
        for i in 0..n {
            if st.closed.is_some() {
                return;
            }
            let (data, status, mut fds) = batch.packet(i);
            // Every fd taken counts against the broker's window, whatever
            // becomes of it below (kept, or closed with its frame).
            if !fds.is_empty() && st.fd_acks.took(fds.len()) {
                // Relaxed: `send_fd_ack`'s fence orders it before the
                // reader tries `send`.
                self.ack_due.store(true, Ordering::Relaxed);
            }
            if data.is_empty() {
                st.closed =
                    Some(Disconnect { code: None, reason: "the broker closed the connection".into() });
                return;
            }
            if status.truncated || status.fds_truncated {
                st.closed = Some(Disconnect {
                    code: Some(GoodbyeCode::ProtocolViolation),
                    reason: "the broker sent a truncated packet".into(),
                });
                return;
            }
            let frame = match decode_broker(data) {
                Ok(f) => f,
                Err(e) => {
                    st.closed = Some(Disconnect {
                        code: Some(GoodbyeCode::ProtocolViolation),
                        reason: format!("the broker sent an invalid frame: {e}"),
                    });
                    return;
                }
            };
            let memfd = match &frame {
                BrokerFrame::Deliver(d, inline) => match d.payload {
                    PayloadRef::Memfd { len } if fds.len() == 1 && inline.is_empty() => {
                        let fd = fds.pop().expect("one fd");
                        // Trust nothing, not even the broker: an fd that is not
                        // a sealed memfd of the declared size never reaches
                        // the app. Its loss is reported as a gap.
                        match memfd::check_sealed(fd.as_fd(), len) {
                            Ok(()) => Some(Ok(Arc::new(MemfdPayload::new(fd, len)))),
                            Err(_) => Some(Err(())),
                        }
                    }
                    PayloadRef::Memfd { .. } => Some(Err(())),
                    PayloadRef::Inline if fds.is_empty() => None,
                    PayloadRef::Inline => Some(Err(())),
                },
                _ if fds.is_empty() => None,
                BrokerFrame::ChannelGranted(_) if (2..=3).contains(&fds.len()) => None,
                BrokerFrame::ChannelReader(r) if r.joined && fds.len() == 1 => None,
                _ => {
                    // `fds` drops here, closing them.
                    st.closed = Some(Disconnect {
                        code: Some(GoodbyeCode::ProtocolViolation),
                        reason: "the broker sent an unexpected fd".into(),
                    });
                    return;
                }
            };
            apply(&mut st, frame, memfd, fds);
        }
    }
}

/// `memfd`: for a delivery by memfd, the checked payload, or `Err` if its
/// fd failed the check (then the message is counted as missed).
/// `fds`: what else came beside the frame (a channel's memfds).
fn apply(
    st: &mut State,
    frame: BrokerFrame<'_>,
    memfd: Option<Result<Arc<MemfdPayload>, ()>>,
    mut fds: Vec<OwnedFd>,
) {
    st.arrivals += 1;
    let arrival = st.arrivals;
    match frame {
        BrokerFrame::Deliver(d, payload) => {
            let limit = st.local_limit;
            let Some(q) = st.subs.get_mut(&d.sub_id) else { return };
            let body = match memfd {
                None => Payload::Inline(payload.to_vec()),
                Some(Ok(m)) => Payload::Memfd(m),
                Some(Err(())) => {
                    q.local_missed += 1;
                    return;
                }
            };
            if q.events.len() >= limit {
                q.local_missed += 1;
                return;
            }
            if q.local_missed > 0 {
                q.events.push_back((arrival, Event::Gap { missed: std::mem::take(&mut q.local_missed) }));
            }
            q.events.push_back((
                arrival,
                Event::Message(Message { topic: d.topic.to_owned(), sender: d.sender, seq: d.seq, body }),
            ));
        }
        BrokerFrame::Gap(g) => {
            if let Some(q) = st.subs.get_mut(&g.sub_id) {
                let missed = g.missed + std::mem::take(&mut q.local_missed);
                // A gap notice is never dropped: it is what reports drops.
                q.events.push_back((arrival, Event::Gap { missed }));
            }
        }
        BrokerFrame::Subscribed(s) => {
            if st.awaiting_ack.remove(&s.sub_id) {
                st.acks.insert(s.sub_id, Ok(()));
            }
        }
        BrokerFrame::OpError(e) => match e.op {
            Op::Subscribe { sub_id } | Op::Unsubscribe { sub_id } => {
                if st.awaiting_ack.remove(&sub_id) {
                    st.acks.insert(sub_id, Err((e.code, e.message.to_owned())));
                }
            }
            Op::Query { req_id } => {
                if let Some(q) = st.queries.get_mut(&req_id) {
                    q.error = Some((e.code, e.message.to_owned()));
                    q.done = true;
                }
            }
            Op::ChannelOpen { req_id } => {
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
            // A handle given back that the broker no longer knew (the
            // channel closed first): our side is already gone, and no
            // one waits for an answer.
            Op::ChannelClose { .. } => {}
        },
        BrokerFrame::Pong(p) => {
            st.pongs.insert(p.token);
        }
        BrokerFrame::QueryItem(q) => {
            if let Some(slot) = st.queries.get_mut(&q.req_id) {
                slot.items.push(q.item);
            }
        }
        BrokerFrame::QueryEnd(q) => {
            if let Some(slot) = st.queries.get_mut(&q.req_id) {
                slot.next = q.next;
                slot.done = true;
            }
        }
        BrokerFrame::ChannelGranted(g) => {
            if st.awaiting_grant.remove(&g.req_id) {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shmbus_proto::frame::{
        decode_client, encode_head, ChannelGranted, ChannelOverflow, ClientFrame, Deliver, Sender,
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

    #[test]
    fn fds_of_dropped_frames_are_acknowledged_at_half_the_window() {
        let (inner, broker) = connected(8);
        deliver_memfds(&broker, 3);
        read_all(&inner);
        assert_eq!(acks_received(&broker), Vec::<u32>::new(), "3 < 4: not due yet");
        deliver_memfds(&broker, 2);
        read_all(&inner);
        assert_eq!(acks_received(&broker), vec![5]);
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
        deliver_memfds(&broker, 1);
        read_all(&inner);
        assert_eq!(acks_received(&broker), vec![4]);
        assert!(inner.state.lock().closed.is_none());
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
}
