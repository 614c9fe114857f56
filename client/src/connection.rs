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
//! Transport: a connection whose handshake set up a shared-memory link
//! (see `link`) reads its frames from the link's ring instead of socket
//! batches (the reader's [`LinkRx`]), and sends through [`Port`], which
//! writes records into the link or packets into the socket; everything
//! here (fd acks, auto-replies, generations, reconnection) is the same on
//! both, and a reconnection puts the new link in place with the socket.
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

use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

use shmbus_proto::frame::{
    encode_head_into, Body, FdAck, GoodbyeCode, Limits, PayloadRef, Reply, ReplyStatus,
};
use shmbus_proto::sys::socket::{self, OutPacket, PeerCred, RecvBatch, RecvStatus};

pub(crate) use crate::core::*;
use crate::error::{Disconnect, RecvError};
use crate::link::{Attachment, LinkRx, Port, Transport, Wire};

/// Packets per receive batch in a client.
const RECV_SLOTS: usize = 64;

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
    /// The reading side of the connection's shared-memory link, if it has
    /// one: then frames are read there (`link`), not in `batch`.
    pub link: Option<LinkRx>,
    /// Socket only: the end of the stream was read (and dispatched).
    eof: bool,
}

impl ReaderState {
    /// Whether the connection's end was read: nothing more comes on it.
    fn ended(&self) -> bool {
        match &self.link {
            Some(rx) => rx.ended(),
            None => self.eof,
        }
    }
}

/// Batches a lost connection's reader takes at most, to read what the
/// broker had sent before it went (it sends nothing more once gone: the
/// bound is for one that goes on writing into the ring of a connection
/// it closed).
const DRAIN_READS: usize = 4096;

/// A timed wait longer than this blocks in the receive itself, which wakes
/// at least this often (`SO_RCVTIMEO`) to look at its deadline, instead of
/// paying a `ppoll` and then a receive: one system call per wait, not two.
/// Measured: a call's round trip went from 1.17× to 1.01× a pub/sub round
/// trip (`cargo run --release -p shmbus-benches -- request`).
const RCV_TICK: Duration = Duration::from_millis(500);

/// The handshake a reconnection attempt made by a poll may wait for.
const POLL_DIAL: Duration = Duration::from_millis(20);

/// Which connection a send may go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// This one, or if it is lost the next (waiting for it up to the
    /// client's timeout): what the app sends.
    Across,
    /// Whatever it is now; fail if it is lost.
    Current,
    /// Generation `g` only: what belongs to that connection.
    Only(u64),
}

pub(crate) struct SendState {
    pub head: Vec<u8>,
    /// Encoded heads of a `publish_many` batch, reused between calls.
    pub heads: Vec<Vec<u8>>,
    /// Publishes sent so far; the broker numbers them the same way.
    pub published: u64,
    /// The subject of the last inline publish, which was valid: a stream
    /// on one subject is checked once, not per message.
    pub checked_topic: String,
}

impl SendState {
    /// [`check_subject`](crate::error::check_subject), remembering the
    /// last subject that passed.
    pub fn check_topic(&mut self, topic: &str) -> Result<(), crate::error::BadSubject> {
        // The empty subject is never one that passed, though it matches
        // what is remembered before the first publish.
        if topic.is_empty() || self.checked_topic != topic {
            crate::error::check_subject(topic)?;
            self.checked_topic.clear();
            self.checked_topic.push_str(topic);
        }
        Ok(())
    }
}

/// A connection made by [`Redial::dial`]: the socket after a successful
/// handshake, and what the broker said and is.
pub(crate) struct Dialed {
    pub fd: OwnedFd,
    pub broker: PeerCred,
    pub client_id: u64,
    pub limits: Limits,
    /// The shared-memory link the handshake set up, or why not.
    pub link: Attachment,
}

/// How to make the connection again when it is lost.
pub(crate) struct Redial {
    /// Connects, checks the broker, says hello: `ConnectOptions::connect`'s
    /// first steps.
    /// `deadline`: the handshake waits no longer (nor the client's timeout).
    pub dial: Box<dyn Fn(Option<Instant>) -> Result<Dialed, crate::error::ConnectError> + Send + Sync>,
    pub policy: crate::client::ReconnectPolicy,
}

pub(crate) struct Inner {
    /// The socket. On a reconnection the new socket takes this very fd
    /// number (`dup3`), so everyone who holds it reaches the new one.
    pub fd: OwnedFd,
    /// Changes on a reconnection: the broker names each connection anew.
    pub client_id: std::sync::atomic::AtomicU64,
    pub limits: Limits,
    pub broker: Mutex<PeerCred>,
    pub address: String,
    /// `None`: a lost connection is closed for good.
    pub redial: Option<Redial>,
    /// How long a send waits for a lost connection to be made again.
    pub timeout: Duration,
    /// Failed reconnection attempts since the connection was lost.
    attempts: std::sync::atomic::AtomicU32,
    /// `State::generation`, readable without `state` (one load on a
    /// channel publisher's hot path). Written with `swap` held.
    pub generation: std::sync::atomic::AtomicU64,
    /// Held by every send for its system call (or its push into the
    /// link), and by a reconnection while it puts the new socket and link
    /// in place and renews what lived on the old one: so a send goes whole
    /// to one connection, knows which (`generation`), and comes after the
    /// renewals. Senders hold `send` already, so they never contend for it
    /// among themselves; a mutex, not a read-write lock, so that a send
    /// costs two atomic operations here, not four (a read lock, then the
    /// link's own mutex). Lock order: `send` and `reader` before `swap`
    /// before `state`.
    swap: parking_lot::Mutex<Wire>,
    /// Why the connection has no link, if it has none (set with `swap`,
    /// kept apart so that asking never waits for a send).
    no_link: Mutex<Option<String>>,
    /// Whether the connection has a link (`swap`'s), readable without a
    /// lock: the async driver's hint that news may wait in the ring while
    /// the socket is quiet.
    linked: AtomicBool,
    /// When the next reconnection attempt may be made (backoff holds for
    /// every waiter, not only the one that failed last).
    next_attempt: Mutex<Option<Instant>>,
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
    /// Tasks of an async driver waiting for the state to change: woken
    /// (and forgotten) wherever blocked waiters are notified.
    wakers: Mutex<Vec<std::task::Waker>>,
    /// A task found the socket readable and the reader taken: whoever
    /// reads must wake everyone as it lets go, even a quiet read that
    /// found nothing (see [`Inner::read_nonblocking_or_defer`]).
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    reader_wanted: AtomicBool,
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
        Inner::with_bounds(fd, client_id, limits, broker, address, bounds, None, Duration::from_secs(5))
    }

    #[allow(clippy::too_many_arguments)]
    pub fn with_bounds(
        fd: OwnedFd,
        client_id: u64,
        limits: Limits,
        broker: PeerCred,
        address: String,
        bounds: LocalBounds,
        redial: Option<Redial>,
        timeout: Duration,
    ) -> Inner {
        Inner {
            fd,
            client_id: std::sync::atomic::AtomicU64::new(client_id),
            limits,
            broker: Mutex::new(broker),
            address,
            redial,
            timeout,
            attempts: std::sync::atomic::AtomicU32::new(0),
            generation: std::sync::atomic::AtomicU64::new(0),
            swap: parking_lot::Mutex::new(Wire::default()),
            no_link: Mutex::new(None),
            linked: AtomicBool::new(false),
            next_attempt: Mutex::new(None),
            send: Mutex::new(SendState {
                head: Vec::with_capacity(256),
                heads: Vec::new(),
                published: 0,
                checked_topic: String::new(),
            }),
            state: Mutex::new(State { bounds, fd_acks: FdAcks::new(limits.fd_window), ..State::default() }),
            reader: Mutex::new(ReaderState::default()),
            cond: Condvar::new(),
            ack_due: AtomicBool::new(false),
            #[cfg(test)]
            fake_fd_table_full: AtomicBool::new(false),
            wakers: Mutex::new(Vec::new()),
            reader_wanted: AtomicBool::new(false),
        }
    }

    /// Wakes every waiter: threads on the condvar (call with `state`
    /// held, as the condvar's rule is) and async tasks.
    pub(crate) fn notify_all(&self) {
        self.cond.notify_all();
        let wakers = std::mem::take(&mut *self.wakers.lock());
        for w in wakers {
            w.wake();
        }
    }

    /// An async task waits for the state to change: it is woken at the
    /// next [`Inner::notify_all`]. Register before the last look at the
    /// state, so no change between the look and the wait is missed.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn register_waker(&self, waker: &std::task::Waker) {
        let mut wakers = self.wakers.lock();
        if !wakers.iter().any(|w| w.will_wake(waker)) {
            wakers.push(waker.clone());
        }
    }

    /// Takes the `send` lock.
    pub fn lock_send(&self) -> SendGuard<'_> {
        SendGuard { inner: self, guard: Some(self.send.lock()) }
    }

    /// Takes the `send` lock, having checked `topic` first if the lock is
    /// busy: a bad subject fails at once, not after another thread's send
    /// (which may wait out a reconnection). Free, the lock is taken and
    /// the subject checked against the last good one
    /// ([`SendState::check_topic`]).
    pub fn lock_send_for(&self, topic: &str) -> Result<SendGuard<'_>, crate::error::BadSubject> {
        let mut s = match self.send.try_lock() {
            Some(guard) => SendGuard { inner: self, guard: Some(guard) },
            None => {
                crate::error::check_subject(topic)?;
                self.lock_send()
            }
        };
        s.check_topic(topic)?;
        Ok(s)
    }

    /// Sends one frame (blocking while the socket buffer is full): the
    /// connection generation it went on.
    pub fn send<B: Body>(&self, body: &B, payload: &[u8]) -> Result<u64, RecvError> {
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
            // Held while these go, so that they go in one piece.
            let Some(held) = self.send.try_lock() else { return };
            let (due, replies, generation) = {
                let mut st = self.state.lock();
                // Relaxed: `ack_due` is only written under `state`.
                self.ack_due.store(false, Ordering::Relaxed);
                if st.closed.is_some() || st.lost.is_some() {
                    // What they acknowledge or answer went with the
                    // connection (a reconnection starts them afresh).
                    st.auto_replies.clear();
                    (None, Vec::new(), st.generation)
                } else {
                    (st.fd_acks.take_due(), std::mem::take(&mut st.auto_replies), st.generation)
                }
            };
            // Only on the connection they belong to: an ack or a reply
            // meant for the old one would wrong the new one.
            let on = Route::Only(generation);
            if let Some(fds) = due {
                // A failure means the connection is gone, and acks with it.
                if let Ok(head) = shmbus_proto::frame::encode_head(&FdAck { fds }) {
                    let _ = self.send_encoded(&head, &[], &[], on);
                }
            }
            for r in replies {
                let status = ReplyStatus::Error { code: r.code, message: r.message };
                let reply = Reply { serial: r.serial, status, payload: PayloadRef::Inline };
                // Likewise: the broker then answers the caller itself.
                if let Ok(head) = shmbus_proto::frame::encode_head(&reply) {
                    let _ = self.send_encoded(&head, &[], &[], on);
                }
            }
            drop(held);
            // Loop: an ack may have come due while we held `send`.
        }
    }

    /// Before waiting for the socket: makes every fd taken so far due for
    /// an ack, however few, and sends it, or leaves it to the holder of
    /// `send`, who sends it as it lets go (see [`Inner::send_fd_ack`]).
    /// Takes `state`, then `send` only with `try_lock`, so it may be called
    /// holding `reader`, or `send` (that ack then goes as we let go).
    pub(crate) fn ack_everything(&self) {
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

    pub fn send_locked<B: Body>(
        &self,
        s: &mut SendState,
        body: &B,
        payload: &[u8],
    ) -> Result<u64, RecvError> {
        self.send_locked_with_fds(s, body, payload, &[])
    }

    /// Sends one frame. If the connection turns out lost and reconnection
    /// is on, waits (up to the client's timeout) for it to be made again
    /// and sends it there.
    pub fn send_locked_with_fds<B: Body>(
        &self,
        s: &mut SendState,
        body: &B,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<u64, RecvError> {
        encode_head_into(&mut s.head, body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        self.send_encoded(&s.head, payload, fds, Route::Across)
    }

    /// Sends one frame of the connection as it is, never across a
    /// reconnection, and never waiting for one: for a `Drop` (an
    /// unsubscribe, a release, a channel handle given back), which must
    /// return at once, and has nothing to do on a lost connection (what it
    /// ends is not renewed).
    pub fn send_once<B: Body>(&self, body: &B) -> Result<(), RecvError> {
        let head = shmbus_proto::frame::encode_head(body)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let gone = || {
            RecvError::Disconnected(Disconnect {
                code: None,
                reason: "the connection to the broker is lost".into(),
            })
        };
        // `send` may be held by a sender waiting out an outage: never wait
        // for it then.
        let _s = loop {
            if self.state.lock().lost.is_some() {
                return Err(gone());
            }
            if let Some(s) = self.send.try_lock_for(Duration::from_millis(10)) {
                break s;
            }
        };
        self.send_encoded(&head, &[], &[], Route::Current).map(drop)
    }

    /// Sends an encoded frame (`send`'s rules, reconnection included):
    /// the connection generation it went on.
    pub fn send_frame(&self, head: &[u8]) -> Result<u64, RecvError> {
        let _s = self.lock_send();
        self.send_encoded(head, &[], &[], Route::Across)
    }

    /// Sends an encoded frame on connection `generation` only (a reply to
    /// a request that came on it): fails if that connection is gone.
    pub fn send_frame_on(
        &self,
        generation: u64,
        head: &[u8],
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), RecvError> {
        let _s = self.lock_send();
        self.send_encoded(head, payload, fds, Route::Only(generation)).map(drop)
    }

    /// Runs `f` on the connection's way out (its socket, and its link if
    /// it has one) with `swap` held shared: the connection cannot change
    /// under it. `only`: fail (`NotConnected`) unless the connection is
    /// generation `only`. Returns `f`'s result and the generation it ran
    /// on.
    pub(crate) fn on_port<T>(
        &self,
        only: Option<u64>,
        f: impl FnOnce(&mut Port<'_>) -> io::Result<T>,
    ) -> io::Result<(T, u64)> {
        let mut wire = self.swap.lock();
        // Relaxed: written only with `swap` held.
        let generation = self.generation.load(Ordering::Relaxed);
        if only.is_some_and(|g| g != generation) {
            return Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection it belonged to was lost (the client reconnected since)",
            ));
        }
        let mut port = Port { fd: self.fd.as_fd(), link: wire.link.as_mut(), inner: self };
        Ok((f(&mut port)?, generation))
    }

    /// Puts the transport the handshake made in place (a new connection,
    /// `reader` and `swap` held).
    fn set_transport(&self, reader: &mut ReaderState, wire: &mut Wire, a: Attachment) {
        let (w, rx, why) = crate::link::split(a);
        *wire = w;
        reader.link = rx;
        *self.no_link.lock() = why;
        // Relaxed: a hint (see the field); written with `swap` held
        // exclusively, before the new generation is published under
        // `state`, whose lock orders it for whoever read that.
        self.linked.store(wire.link.is_some(), Ordering::Relaxed);
    }

    /// Gives the first connection its transport (before it is shared).
    pub(crate) fn attach(&self, a: Attachment) {
        let mut reader = self.reader.lock();
        let mut wire = self.swap.lock();
        self.set_transport(&mut reader, &mut wire, a);
    }

    /// Which transport the connection uses now.
    pub(crate) fn transport(&self) -> Transport {
        // Never waits for a send (one waiting for room holds `swap`).
        match self.linked() {
            true => Transport::SharedMemory,
            false => Transport::Socket,
        }
    }

    /// Why the connection has no shared-memory link, if it has none.
    pub(crate) fn transport_note(&self) -> Option<String> {
        self.no_link.lock().clone()
    }

    /// Whether the connection has a link: a hint, see the field.
    pub(crate) fn linked(&self) -> bool {
        // Relaxed: see the field.
        self.linked.load(Ordering::Relaxed)
    }

    fn send_encoded(
        &self,
        head: &[u8],
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
        route: Route,
    ) -> Result<u64, RecvError> {
        let packet = OutPacket { head, payload, fds };
        let only = match route {
            Route::Only(g) => Some(g),
            Route::Across | Route::Current => None,
        };
        loop {
            match self.on_port(only, |port| port.send(&[packet], true)) {
                Ok((_, generation)) => return Ok(generation),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if route == Route::Across && self.recover(&e) => {}
                Err(e) => return Err(self.send_error(e)),
            }
        }
    }

    // ------------------------------------------------------ reconnection --

    /// After a send failed with `e`: if it means the connection is lost
    /// and reconnection is on, waits up to the client's timeout for the
    /// connection to be made again. True: it was, send again.
    pub(crate) fn recover(&self, e: &io::Error) -> bool {
        if self.redial.is_none()
            || !matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
            )
        {
            return false;
        }
        // What the broker sent before it went is ours: read to the end
        // (a goodbye there says whether to come back).
        if let Some(mut reader) = self.reader.try_lock() {
            self.drain(&mut reader);
        }
        {
            let mut st = self.state.lock();
            self.settle_loss(&mut st);
            if st.closed.is_some() {
                // Closed for good: waiters learn it now.
                self.notify_all();
                return false;
            }
            st.connection_lost(Disconnect {
                code: None,
                reason: "the connection to the broker was lost".into(),
            });
            self.notify_all();
        }
        self.await_reconnect(Instant::now() + self.timeout)
    }

    /// A connection that ended in a way worth coming back from (the broker
    /// closed, restarted or shut down, or cut us off as too slow) counts as
    /// lost, not closed, when reconnection is on.
    fn settle_loss(&self, st: &mut State) {
        let comes_back = |d: &Disconnect| {
            matches!(d.code, None | Some(GoodbyeCode::Shutdown) | Some(GoodbyeCode::SlowConsumer))
        };
        if self.redial.is_some() && st.closed.as_ref().is_some_and(comes_back) {
            let why = st.closed.take().expect("checked");
            st.connection_lost(why);
        }
    }

    /// Waits until the lost connection is made again (true), it is closed
    /// for good, or `deadline` passes (false). Whoever can become the
    /// reader makes the attempts; the others wait for it.
    pub(crate) fn await_reconnect(&self, deadline: Instant) -> bool {
        loop {
            let mut st = self.state.lock();
            if st.closed.is_some() {
                return false;
            }
            if st.lost.is_none() {
                return true;
            }
            match self.reader.try_lock() {
                Some(mut reader) => {
                    drop(st);
                    let made = self.reconnect(&mut reader, Some(deadline));
                    drop(reader);
                    let _st = self.state.lock();
                    self.notify_all();
                    if made {
                        return true;
                    }
                    if Instant::now() >= deadline {
                        return false;
                    }
                }
                None => {
                    if self.cond.wait_until(&mut st, deadline).timed_out() {
                        return st.lost.is_none() && st.closed.is_none();
                    }
                }
            }
        }
    }

    /// Makes the lost connection again, `reader` held: attempts with
    /// backoff until one succeeds (true), the policy gives up or the
    /// broker refuses us (the connection is then closed for good), or
    /// `deadline` passes (false; the next waiter goes on trying).
    fn reconnect(&self, reader: &mut ReaderState, deadline: Option<Instant>) -> bool {
        let Some(redial) = &self.redial else { return false };
        // The loss may have been noticed by a send while the old
        // connection still held frames for us (in its ring or socket):
        // they are read before it is let go, not thrown away uncounted.
        self.drain(reader);
        {
            let mut st = self.state.lock();
            if st.closed.is_some() {
                // Its end said not to come back.
                st.lost = None;
                self.notify_all();
                return false;
            }
            // Requests read now came on the lost connection: gone with it.
            st.forget_lost_requests();
        }
        loop {
            if self.state.lock().lost.is_none() {
                return true;
            }
            // Relaxed: only the holder of `reader` counts attempts.
            let n = self.attempts.fetch_add(1, Ordering::Relaxed);
            if redial.policy.max_attempts.is_some_and(|max| n >= max) {
                let mut st = self.state.lock();
                let why = st.lost.take().map_or_else(String::new, |d| d.reason);
                st.closed = Some(Disconnect {
                    code: None,
                    reason: format!("{why}; gave up reconnecting after {n} attempts"),
                });
                self.notify_all();
                return false;
            }
            // Backoff holds for every waiter: a poll does not hurry it.
            let now = Instant::now();
            if let Some(at) = *self.next_attempt.lock() {
                if at > now {
                    if deadline.is_some_and(|d| d <= at) {
                        std::thread::sleep(deadline.expect("checked").saturating_duration_since(now));
                        // Not an attempt.
                        self.attempts.fetch_sub(1, Ordering::Relaxed);
                        return false;
                    }
                    std::thread::sleep(at - now);
                }
            }
            // A poll (a deadline already here) still makes a real attempt,
            // with a short handshake: an app that only polls reconnects
            // too, and no poll waits out the client's whole timeout.
            let dial_by = deadline.map(|d| d.max(Instant::now() + POLL_DIAL));
            match (redial.dial)(dial_by) {
                Ok(d) => {
                    if self.install(reader, d).is_ok() {
                        self.attempts.store(0, Ordering::Relaxed);
                        *self.next_attempt.lock() = None;
                        return true;
                    }
                }
                Err(crate::error::ConnectError::Refused(d)) if d.code == Some(GoodbyeCode::Denied) => {
                    // The broker no longer admits us: no use coming back.
                    let mut st = self.state.lock();
                    st.lost = None;
                    st.closed = Some(d);
                    self.notify_all();
                    return false;
                }
                Err(_) => {}
            }
            *self.next_attempt.lock() = Some(Instant::now() + redial.policy.delay(n));
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return false;
            }
        }
    }

    /// Reads what the connection holds, without waiting, to its end (or
    /// until nothing is there): `reader` held.
    fn drain(&self, reader: &mut ReaderState) {
        for _ in 0..DRAIN_READS {
            if reader.ended() {
                return;
            }
            match self.read_once(reader, Some(Duration::ZERO)) {
                // Closed for good (a loss is settled as it is read).
                Ok(true) if self.state.lock().closed.is_some() => return,
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
        }
    }

    /// Puts the new connection in place of the lost one and renews what
    /// lived on it: subscriptions and monitors (each then gets one
    /// `Reconnected` event), names owned or queued for. Sent without the
    /// `send` lock, whose holder may be waiting for this very moment; a
    /// frame goes whole, so the two never mix.
    fn install(&self, reader: &mut ReaderState, d: Dialed) -> io::Result<()> {
        // Exclusive: no send is in a system call, and none starts until
        // the renewals are out (an unsubscribe made meanwhile then comes
        // after the subscribe it undoes, never before).
        let mut swapping = self.swap.lock();
        socket::replace_fd(self.fd.as_fd(), d.fd)?;
        *reader = ReaderState::default();
        self.set_transport(reader, &mut swapping, d.link);
        // Relaxed: read by `Client::id` only, no ordering needed.
        self.client_id.store(d.client_id, Ordering::Relaxed);
        *self.broker.lock() = d.broker;
        let (renew, names) = {
            let mut st = self.state.lock();
            // Relaxed: `ack_due` is only written under `state`.
            self.ack_due.store(false, Ordering::Relaxed);
            let renew = st.reconnected(d.limits.fd_window);
            // Relaxed: read under `swap` (held here exclusively), or as a
            // hint by channel handles, which then ask `state`.
            self.generation.store(st.generation, Ordering::Relaxed);
            let held: Vec<(String, shmbus_proto::frame::NameFlags)> =
                st.held_names.iter().map(|(n, f)| (n.clone(), *f)).collect();
            let mut names = Vec::new();
            for (name, flags) in held {
                let Some(req_id) = st.name_ids.alloc(|_| false) else { break };
                st.name_requests.insert(req_id, name.clone());
                names.push((req_id, name, flags));
            }
            (renew, names)
        };
        // The connection is ours alone here (`swap`): straight to it.
        let mut tx = swapping.link.as_mut();
        let mut raw = |head: &[u8]| {
            let mut port = Port { fd: self.fd.as_fd(), link: tx.as_deref_mut(), inner: self };
            port.send(&[OutPacket { head, payload: &[], fds: &[] }], true).map(drop)
        };
        for (_, head) in renew {
            let _ = raw(&head);
        }
        for (req_id, name, flags) in names {
            let request = shmbus_proto::frame::NameRequest { req_id, name: &name, flags };
            let sent = shmbus_proto::frame::encode_head(&request)
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|h| raw(&h));
            if sent.is_err() {
                let mut st = self.state.lock();
                st.name_requests.remove(&req_id);
                st.name_ids.answered(req_id);
            }
        }
        drop(swapping);
        let _st = self.state.lock();
        self.notify_all();
        Ok(())
    }

    /// Like [`Inner::wait_for`], for an answer to something sent on
    /// connection generation `sent_on` (what the send returned): if that
    /// connection is lost before the answer comes, the answer never will,
    /// and this fails with `Disconnected` rather than wait for its
    /// deadline.
    pub fn wait_answer<T>(
        &self,
        deadline: Option<Instant>,
        sent_on: u64,
        mut check: impl FnMut(&mut State) -> Option<T>,
    ) -> Result<Option<T>, RecvError> {
        let got = self.wait_for(deadline, |st| {
            if let Some(v) = check(st) {
                return Some(Ok(v));
            }
            (st.generation != sent_on || st.lost.is_some()).then(|| {
                Err(st.lost.clone().unwrap_or(Disconnect {
                    code: None,
                    reason: "the connection to the broker was lost".into(),
                }))
            })
        })?;
        match got {
            Some(Ok(v)) => Ok(Some(v)),
            Some(Err(d)) => Err(RecvError::Disconnected(Disconnect {
                code: d.code,
                reason: format!(
                    "{}; the answer was lost with the connection (the client reconnects)",
                    d.reason
                ),
            })),
            None => Ok(None),
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

    /// What `check` finds in what has already been read, without reading
    /// or waiting.
    pub fn ready<T>(&self, mut check: impl FnMut(&mut State) -> Option<T>) -> Option<T> {
        check(&mut self.state.lock())
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
            // The clock is read only for a deadline (25 ns a read here).
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match self.reader.try_lock() {
                Some(mut reader) if st.lost.is_some() => {
                    // Lost: make the connection again before reading.
                    drop(st);
                    let made = self.reconnect(&mut reader, deadline);
                    drop(reader);
                    let _st = self.state.lock();
                    self.notify_all();
                    drop(_st);
                    if !made && deadline.is_some_and(|d| Instant::now() >= d) {
                        let mut st = self.state.lock();
                        return match check(&mut st) {
                            Some(v) => Ok(Some(v)),
                            None => match &st.closed {
                                Some(d) => Err(RecvError::Disconnected(d.clone())),
                                None => Ok(None),
                            },
                        };
                    }
                }
                Some(mut reader) => {
                    drop(st);
                    let got = self.read_once(&mut reader, remaining);
                    drop(reader);
                    let mut st = self.state.lock();
                    self.settle_loss(&mut st);
                    self.notify_all();
                    drop(st);
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
        if let Some(rx) = reader.link.as_mut() {
            return self.read_link(rx, timeout);
        }
        let nonblocking = timeout.is_some_and(|t| t.is_zero());
        // A receive that does not wait comes first when the last batch
        // filled every slot (more is probably waiting), when we may not
        // wait anyway, and when fds are unacknowledged: they are
        // acknowledged once the socket is found empty, not before.
        let mut try_first = reader.backlog || nonblocking || self.state.lock().fd_acks.pending();
        let ReaderState { batch, backlog, held, rcv_tick, eof, .. } = reader;
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
                    // (The fds were taken by `dispatch`: this looks at
                    // the bytes only.)
                    *eof |= (0..n).any(|i| batch.packet(i).0.is_empty());
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
                    *eof = true;
                    return Ok(true);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Whether this process's fd table is full: duplicating an fd we hold
    /// fails with `EMFILE` or `ENFILE`. A packet that lost its fds
    /// (`MSG_CTRUNC`) is then our own shortage, not the broker's doing.
    pub(crate) fn fd_table_full(&self) -> bool {
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

    pub(crate) fn close(&self, code: Option<GoodbyeCode>, reason: String) {
        let mut st = self.state.lock();
        if st.closed.is_none() {
            st.closed = Some(Disconnect { code, reason });
        }
        // Under the same lock: nobody sees `closed` for a loss that a
        // reconnection will repair.
        self.settle_loss(&mut st);
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
            let (status, fds) = std::mem::take(slot);
            let (data, _, _) = batch.packet(i);
            self.deliver(&mut st, data, status, fds, short_of_fds);
        }
        self.dispatched(&mut st);
        // Fds of packets not dispatched (the connection closed) close here.
        held.clear();
    }

    /// One packet from the broker into the state (by whichever transport
    /// it came), `state` held.
    pub(crate) fn deliver(
        &self,
        st: &mut State,
        data: &[u8],
        status: RecvStatus,
        fds: Vec<OwnedFd>,
        short_of_fds: bool,
    ) {
        if st.receive_packet(data, status, fds, short_of_fds) {
            // Relaxed: `send_fd_ack`'s fence orders it before the
            // reader tries `send`.
            self.ack_due.store(true, Ordering::Relaxed);
        }
    }

    /// After a batch of packets, `state` still held.
    pub(crate) fn dispatched(&self, st: &mut State) {
        // Under the same lock as the packets: nobody sees `closed` for a
        // loss that a reconnection will repair.
        self.settle_loss(st);
        if !st.auto_replies.is_empty() && st.closed.is_none() {
            // Relaxed: `send_fd_ack`'s fence orders it before the reader
            // tries `send`.
            self.ack_due.store(true, Ordering::Relaxed);
        }
    }
}

// ------------------------------------------------------- async driver --

/// What the tokio driver (`crate::asynch`) needs of the connection: the
/// reader's and the sender's steps without waiting, so that a task never
/// blocks its executor; the waiting itself is done there, on the socket's
/// readiness and on [`Inner::register_waker`].
#[cfg(feature = "tokio")]
impl Inner {
    /// Becomes the reader if no one is, and reads one batch if the socket
    /// holds one, without waiting; then does what [`Inner::wait_for`] does
    /// after a read (a loss settled, every waiter woken, due acks sent).
    /// `None`: someone else is the reader (it wakes everyone when done).
    /// `Some(Ok(false))`: the socket was empty, and every fd taken is
    /// acknowledged (or left to the holder of `send`), so the caller may
    /// wait for the socket.
    pub(crate) fn read_nonblocking(&self) -> Option<io::Result<bool>> {
        let mut reader = self.reader.try_lock()?;
        let got = self.read_once(&mut reader, Some(Duration::ZERO));
        drop(reader);
        self.after_nonblocking_read();
        Some(got)
    }

    /// What [`Inner::wait_for`] does after a read: a loss settled, every
    /// waiter woken, due acks sent.
    fn after_nonblocking_read(&self) {
        // Everyone is woken below: a task that deferred to this read is
        // among them.
        // Relaxed: the wake-up below goes to every registered task.
        self.reader_wanted.store(false, Ordering::Relaxed);
        let mut st = self.state.lock();
        self.settle_loss(&mut st);
        self.notify_all();
        drop(st);
        self.send_fd_ack();
    }

    /// [`Inner::read_nonblocking`] for a task about to wait on the socket
    /// of a connection with a link (whose frames may wait in the ring while
    /// the socket is quiet): a read that finds nothing changes nothing, and
    /// wakes no one, the caller included (it registered its waker: a wake
    /// now would poll it again at once, and again, for ever).
    pub(crate) fn read_nonblocking_quietly(&self) -> Option<io::Result<bool>> {
        let mut reader = self.reader.try_lock()?;
        let got = self.read_once(&mut reader, Some(Duration::ZERO));
        drop(reader);
        Some(self.after_quiet_read(got))
    }

    /// The end of [`Inner::read_nonblocking_quietly`], `reader` let go.
    pub(crate) fn after_quiet_read(&self, got: io::Result<bool>) -> io::Result<bool> {
        if matches!(got, Ok(false)) {
            // SeqCst: pairs with the fence in `read_nonblocking_or_defer`
            // (we let go of `reader`, then look at the flag; it raises the
            // flag, then tries `reader`): either it gets `reader`, or we
            // see that it waits for us.
            fence(Ordering::SeqCst);
            // Relaxed: ordered by the fence.
            if !self.reader_wanted.load(Ordering::Relaxed) {
                // Every fd taken is acknowledged already (`read_link` does
                // it before it says it sleeps).
                return got;
            }
        }
        self.after_nonblocking_read();
        got
    }

    /// [`Inner::read_nonblocking`] for a task that found the socket
    /// readable. If another task or thread is reading, the caller waits for
    /// it to wake everyone as it lets go; a quiet read that finds nothing
    /// wakes no one, so the caller first asks it to (it took the
    /// reactor's readiness, and nothing else would wake it: the reactor
    /// wakes only a task that found the socket not ready). `None`: the
    /// reader is busy and will wake the caller.
    pub(crate) fn read_nonblocking_or_defer(&self) -> Option<io::Result<bool>> {
        if let Some(got) = self.read_nonblocking() {
            return Some(got);
        }
        // Relaxed: ordered by the fence.
        self.reader_wanted.store(true, Ordering::Relaxed);
        // SeqCst: pairs with the fence in `read_nonblocking_quietly`.
        fence(Ordering::SeqCst);
        self.read_nonblocking()
    }

    /// Before a task waits for another reader: every fd taken is made due
    /// for an ack and sent (see [`Inner::ack_everything`]). Call with no
    /// lock held.
    pub(crate) fn ack_before_waiting(&self) {
        self.ack_everything();
    }

    /// The `send` lock if it is free.
    pub(crate) fn try_lock_send(&self) -> Option<SendGuard<'_>> {
        Some(SendGuard { inner: self, guard: Some(self.send.try_lock()?) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tests::revoke;
    use crate::message::Event;
    use shmbus_proto::frame::{BrokerFrame, Revocation};
    use shmbus_proto::sys::memfd;
    use std::sync::Arc;

    const SENDER: Sender = Sender { client_id: 2, uid: 0, gid: 0, pid: 2 };
    use shmbus_proto::frame::{
        decode_client, encode_head, ChannelGranted, ChannelOverflow, ClientFrame, Deliver, Pong, Revoked,
        Sender,
    };

    /// The remembered subject spares the check only for itself: a bad
    /// subject after a good one, or the good one after a bad one, is
    /// judged afresh.
    #[test]
    fn a_checked_subject_is_remembered_only_for_itself() {
        let (inner, _broker) = connected(16);
        let mut s = inner.lock_send();
        assert!(s.check_topic("").is_err(), "the empty subject, before any publish");
        assert!(s.check_topic("a.b").is_ok());
        for bad in ["a.*", "a.>", "", "a..b", "a.b."] {
            assert!(s.check_topic(bad).is_err(), "{bad:?} passed after a good subject");
        }
        assert!(s.check_topic("a.b").is_ok());
        assert_eq!(s.checked_topic, "a.b");
        assert!(s.check_topic("a.b.c").is_ok());
        assert!(s.check_topic("a.b.*").is_err(), "a bad subject after another good one");
        assert_eq!(s.checked_topic, "a.b.c", "a refused subject is not remembered");
    }

    /// A bad subject fails at once even while another send holds the
    /// lock (it may be waiting out a reconnection).
    #[test]
    fn a_bad_subject_does_not_wait_for_the_send_lock() {
        let (inner, _broker) = connected(16);
        let held = inner.lock_send();
        assert!(inner.lock_send_for("a.*").is_err());
        assert!(inner.lock_send_for("").is_err());
        drop(held);
        assert!(inner.lock_send_for("a.b").is_ok());
    }

    fn connected(window: u32) -> (Inner, OwnedFd) {
        let (ours, broker) = socket::pair().unwrap();
        let limits = crate::link::tests::limits(window);
        let cred = PeerCred { pid: 1, uid: 0, gid: 0 };
        (Inner::new(ours, 1, limits, cred, "test".into(), 16), broker)
    }

    /// The broker sends `n` memfd deliveries for a subscription the client
    /// does not have (so they are dropped: their fds count all the same).
    fn deliver_memfds(broker: &OwnedFd, n: usize) {
        let sender = Sender { client_id: 2, uid: 0, gid: 0, pid: 2 };
        for seq in 0..n as u64 {
            let d = Deliver {
                sub_id: 99,
                topic: "a.b",
                sender,
                seq,
                origin: None,
                payload: PayloadRef::Memfd { len: 3 },
            };
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
        inner.state.lock().add_sub(99, Vec::new());
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
        inner.state.lock().add_sub(99, Vec::new());
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
        let d = Deliver {
            sub_id,
            topic: "a.b",
            sender,
            seq,
            origin: None,
            payload: PayloadRef::Memfd { len: 3 },
        };
        let head = encode_head(&d).unwrap();
        let owned: Vec<OwnedFd> = (0..fds).map(|_| memfd::from_bytes("test", b"abc").unwrap()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = owned.iter().map(|f| f.as_fd()).collect();
        send_with_fds(broker, &head, &borrowed);
    }

    #[test]
    fn fds_lost_to_a_full_fd_table_are_a_gap_and_the_connection_stays() {
        let (inner, broker) = connected(8);
        inner.state.lock().add_sub(99, Vec::new());
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
        inner.state.lock().add_sub(99, Vec::new());
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
            st.add_sub(id, Vec::new());
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
        let deliver = |sub_id, seq| Deliver {
            sub_id,
            topic: "t",
            sender: SENDER,
            seq,
            origin: None,
            payload: PayloadRef::Inline,
        };
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
