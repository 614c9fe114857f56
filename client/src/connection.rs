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
//! Lock order: `reader` before `state`; the reader releases `reader`
//! before it notifies, and waiters check-then-wait under `state`, so no
//! wake-up is lost. Sending takes only `send`, so publishing never waits
//! for a reader.
//!
//! Nothing is lost silently: each subscription's queue is bounded by
//! `local_limit`; past it, messages are counted and surface as a
//! `Gap` event where they went missing, exactly as broker-side gaps do.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use shmbus_proto::frame::PayloadRef;
use shmbus_proto::frame::{
    decode_broker, encode_head_into, Body, BrokerFrame, ErrorCode, GoodbyeCode, Limits, Op, QueryItemBody,
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

#[derive(Debug, Default)]
pub(crate) struct QuerySlot {
    pub items: Vec<QueryItemBody>,
    pub done: bool,
    pub error: Option<(ErrorCode, String)>,
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
    pub send: Mutex<SendState>,
    pub state: Mutex<State>,
    pub reader: Mutex<ReaderState>,
    pub cond: Condvar,
}

impl Inner {
    /// Sends one frame (blocking while the socket buffer is full).
    pub fn send<B: Body>(&self, body: &B, payload: &[u8]) -> Result<(), RecvError> {
        let mut s = self.send.lock();
        self.send_locked(&mut s, body, payload)
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
