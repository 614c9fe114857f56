//! The tokio driver: waiting for the connection's state without blocking
//! an executor, and sending without blocking one (see the module notes in
//! `asynch`).

use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::time::Sleep;

use shmbus_proto::frame::{encode_head_into, Body};
use shmbus_proto::sys::socket::OutPacket;

use crate::client::Client;
use crate::connection::{Inner, SendState, State};
use crate::error::{Disconnect, RecvError};
use crate::link::Full;

/// Batches one poll reads before it yields to the executor, so that a
/// busy socket cannot starve the other tasks.
const READS_PER_POLL: u32 = 16;

/// How soon a sender that finds `send` taken by a thread (a blocking
/// sender, which wakes no task as it lets go) tries again.
const SEND_LOCK_RETRY: Duration = Duration::from_millis(1);

/// How soon a sender that finds the shared-memory link's ring full tries
/// again: the broker's "room" is a futex wake, which no reactor sees, so a
/// task looks again on a timer (a full ring is backpressure: the broker is
/// behind by a whole ring).
const RING_FULL_RETRY: Duration = Duration::from_millis(1);

/// What the async handles of one connection share: the blocking client
/// (the connection itself), the socket's registration with the reactor,
/// and the tasks waiting to send.
pub(crate) struct Shared {
    pub client: Client,
    registration: Mutex<Registration>,
    /// A blocking helper is making a lost connection again.
    reconnecting: AtomicBool,
    /// Tasks waiting for `send` or for room in the socket.
    send_waiters: Mutex<Vec<Waker>>,
}

/// The socket as the reactor knows it, for one connection (`generation`).
struct Registration {
    generation: u64,
    fd: Option<Arc<AsyncFd<OwnedFd>>>,
}

impl Shared {
    /// Registers `client`'s socket with the current tokio runtime.
    pub fn new(client: Client) -> io::Result<Arc<Shared>> {
        tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("the async client needs a tokio runtime: {e}")))?;
        let generation = client.inner.state.lock().generation;
        let shared = Arc::new(Shared {
            client,
            registration: Mutex::new(Registration { generation, fd: None }),
            reconnecting: AtomicBool::new(false),
            send_waiters: Mutex::new(Vec::new()),
        });
        shared.io(generation)?;
        Ok(shared)
    }

    pub fn inner(&self) -> &Arc<Inner> {
        &self.client.inner
    }

    /// The socket's registration for connection `generation`, made anew
    /// after a reconnection (the new socket takes the old one's number,
    /// but the reactor knew the old socket). A duplicate of the fd is
    /// registered, never the number itself: dropping a registration
    /// removes its fd number from the reactor, which must not be the
    /// number the new socket took meanwhile.
    fn io(&self, generation: u64) -> io::Result<Arc<AsyncFd<OwnedFd>>> {
        let mut reg = self.registration.lock();
        if let Some(fd) = &reg.fd {
            if reg.generation == generation {
                return Ok(fd.clone());
            }
        }
        let dup = self.inner().fd.try_clone()?;
        let fd = Arc::new(AsyncFd::with_interest(dup, Interest::READABLE | Interest::WRITABLE)?);
        reg.fd = Some(fd.clone());
        reg.generation = generation;
        Ok(fd)
    }

    /// The connection is lost: makes it again on a blocking thread (the
    /// blocking driver does it, with its backoff), unless a helper is at it
    /// already. Everyone is woken when the helper is done.
    fn reconnect_in_background(self: &Arc<Self>) {
        if self.reconnecting.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.reconnecting.store(false, Ordering::Release);
            return;
        };
        let shared = self.clone();
        handle.spawn_blocking(move || {
            let inner = shared.inner();
            inner.await_reconnect(Instant::now() + inner.timeout);
            shared.reconnecting.store(false, Ordering::Release);
            let _st = inner.state.lock();
            inner.notify_all();
        });
    }

    /// Wakes the tasks waiting to send.
    fn wake_senders(&self) {
        let waiters = std::mem::take(&mut *self.send_waiters.lock());
        for w in waiters {
            w.wake();
        }
    }
}

// ------------------------------------------------------------ waiting --

/// One task waiting for the connection's state: the async counterpart of
/// `Inner::wait_for`'s loop, one poll at a time.
///
/// The reactor keeps one waker per direction of a registration: that of
/// the last task that found the socket not ready ("the slot"). So whoever
/// may hold the slot hands the socket over when it stops waiting (it has
/// its value, fails, or is dropped): it wakes every waiting task, and the
/// next to find the socket empty takes the slot.
pub(crate) struct Waiter {
    shared: Arc<Shared>,
    holds_slot: bool,
}

impl Waiter {
    pub fn new(shared: Arc<Shared>) -> Waiter {
        Waiter { shared, holds_slot: false }
    }

    /// Polls for `check` to yield a value, reading the socket when it is
    /// readable and no one else reads it. Fails once the connection is
    /// closed and `check` has nothing left, as `wait_for` does.
    pub fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut check: impl FnMut(&mut State) -> Option<T>,
    ) -> Poll<Result<T, RecvError>> {
        let shared = self.shared.clone();
        let inner = shared.inner();
        let mut budget = READS_PER_POLL;
        loop {
            let generation = {
                let mut st = inner.state.lock();
                if let Some(v) = check(&mut st) {
                    self.hand_over(inner);
                    return Poll::Ready(Ok(v));
                }
                if let Some(d) = &st.closed {
                    let d = d.clone();
                    self.hand_over(inner);
                    return Poll::Ready(Err(RecvError::Disconnected(d)));
                }
                // Under `state`, before the socket is looked at: whatever
                // changes the state after this look wakes us.
                inner.register_waker(cx.waker());
                if st.lost.is_some() {
                    drop(st);
                    shared.reconnect_in_background();
                    return Poll::Pending;
                }
                st.generation
            };
            let io = match shared.io(generation) {
                Ok(io) => io,
                Err(e) => return Poll::Ready(Err(self.fail(RecvError::Io(e)))),
            };
            let mut ready = match io.poll_read_ready(cx) {
                Poll::Pending => {
                    // The reactor wakes us when something arrives. Nothing
                    // taken stays unacknowledged while we wait.
                    self.holds_slot = true;
                    if inner.linked() {
                        // With a shared-memory link the broker rings the
                        // socket only once we have said we sleep: frames
                        // may wait in the ring while it is quiet. Look
                        // there; a read that finds nothing leaves the flag
                        // raised, so the next frame makes the socket
                        // readable, and the reactor (registered just now)
                        // wakes us.
                        match inner.read_nonblocking_quietly() {
                            None | Some(Ok(false)) => {}
                            Some(Ok(true)) => {
                                budget -= 1;
                                if budget == 0 {
                                    cx.waker().wake_by_ref();
                                    return Poll::Pending;
                                }
                                continue;
                            }
                            Some(Err(e)) => return Poll::Ready(Err(self.fail(RecvError::Io(e)))),
                        }
                    }
                    inner.ack_before_waiting();
                    return Poll::Pending;
                }
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(self.fail(RecvError::Io(e)))),
            };
            match inner.read_nonblocking_or_defer() {
                None => {
                    // Another task or thread reads: it wakes us when done
                    // (asked to, should it be a quiet read that finds
                    // nothing: we hold the readiness, and the reactor wakes
                    // no one for it).
                    inner.ack_before_waiting();
                    return Poll::Pending;
                }
                Some(Ok(false)) => ready.clear_ready(),
                Some(Ok(true)) => {
                    budget -= 1;
                    if budget == 0 {
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(self.fail(RecvError::Io(e)))),
            }
        }
    }

    /// Stops waiting: hands the socket over if we may hold the slot. Call
    /// with `state` held (the condvar's rule).
    fn hand_over(&mut self, inner: &Inner) {
        if std::mem::take(&mut self.holds_slot) {
            inner.notify_all();
        }
    }

    fn fail(&mut self, e: RecvError) -> RecvError {
        let inner = self.shared.inner().clone();
        let _st = inner.state.lock();
        self.hand_over(&inner);
        e
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.holds_slot {
            let inner = self.shared.inner().clone();
            let _st = inner.state.lock();
            self.hand_over(&inner);
        }
    }
}

/// Waits until `check` yields a value, until `deadline` (`None`: no
/// limit): `Inner::wait_for` for a task. `Ok(None)` on timeout.
pub(crate) async fn wait_for<T>(
    shared: &Arc<Shared>,
    deadline: Option<Instant>,
    mut check: impl FnMut(&mut State) -> Option<T>,
) -> Result<Option<T>, RecvError> {
    let mut waiter = Waiter::new(shared.clone());
    let mut sleep: Option<Pin<Box<Sleep>>> = deadline.map(|d| Box::pin(tokio::time::sleep_until(d.into())));
    poll_fn(|cx| {
        if let Poll::Ready(r) = waiter.poll(cx, &mut check) {
            return Poll::Ready(r.map(Some));
        }
        if let Some(s) = sleep.as_mut() {
            if s.as_mut().poll(cx).is_ready() {
                // One last look.
                let mut st = shared.inner().state.lock();
                return Poll::Ready(match check(&mut st) {
                    Some(v) => Ok(Some(v)),
                    None => match &st.closed {
                        Some(d) => Err(RecvError::Disconnected(d.clone())),
                        None => Ok(None),
                    },
                });
            }
        }
        Poll::Pending
    })
    .await
}

/// [`wait_for`] for an answer to something sent on connection generation
/// `sent_on` (what the send returned; as `Inner::wait_answer`): if that
/// connection is lost first, the answer never comes, and this fails with
/// `Disconnected`. (Taken from the send itself: the epoch read after it,
/// as this was, missed a loss between the two, and the caller waited out
/// its timeout for an answer that could not come.)
pub(crate) async fn wait_answer<T>(
    shared: &Arc<Shared>,
    deadline: Option<Instant>,
    sent_on: u64,
    mut check: impl FnMut(&mut State) -> Option<T>,
) -> Result<Option<T>, RecvError> {
    let got = wait_for(shared, deadline, |st| {
        if let Some(v) = check(st) {
            return Some(Ok(v));
        }
        (st.generation != sent_on || st.lost.is_some()).then(|| {
            Err(st.lost.clone().unwrap_or(Disconnect {
                code: None,
                reason: "the connection to the broker was lost before the answer came".into(),
            }))
        })
    })
    .await?;
    match got {
        Some(Ok(v)) => Ok(Some(v)),
        Some(Err(d)) => Err(RecvError::Disconnected(Disconnect {
            code: d.code,
            reason: format!("{} before the answer came (the client is reconnecting)", d.reason),
        })),
        None => Ok(None),
    }
}

/// What `check` yields now, after reading what the socket holds without
/// waiting (and without reconnecting here: a lost connection is made
/// again in the background).
pub(crate) fn try_now<T>(
    shared: &Arc<Shared>,
    mut check: impl FnMut(&mut State) -> Option<T>,
) -> Result<Option<T>, RecvError> {
    let inner = shared.inner();
    let look = |check: &mut dyn FnMut(&mut State) -> Option<T>| {
        let mut st = inner.state.lock();
        if let Some(v) = check(&mut st) {
            return Some(Ok(Some(v)));
        }
        if let Some(d) = &st.closed {
            return Some(Err(RecvError::Disconnected(d.clone())));
        }
        if st.lost.is_some() {
            drop(st);
            shared.reconnect_in_background();
            return Some(Ok(None));
        }
        None
    };
    for _ in 0..READS_PER_POLL {
        if let Some(r) = look(&mut check) {
            return r;
        }
        match inner.read_nonblocking() {
            Some(Ok(true)) => {}
            None | Some(Ok(false)) => break,
            Some(Err(e)) => return Err(RecvError::Io(e)),
        }
    }
    look(&mut check).unwrap_or(Ok(None))
}

// ------------------------------------------------------------ sending --

/// What one attempt at a send (`send` held) found: `Ok(Ok(_))` sent,
/// `Ok(Err(_))` no room (in the socket, or in the link's ring).
type Attempt<R> = io::Result<Result<R, Full>>;

/// One try at a send.
enum Step<R> {
    Done(io::Result<R>),
    /// `send` is taken; the task is registered to try again.
    Busy,
    Full(Full),
}

/// One task sending: takes `send` only if it is free, sends without
/// waiting, and waits for room in the socket on the reactor (with the
/// same hand-over of the reactor's one waker as [`Waiter`]), or for room
/// in the link's ring on a timer.
struct SendWaiter {
    shared: Arc<Shared>,
    holds_slot: bool,
    /// Found full: try again only once there is room.
    full: Option<Full>,
    retry: Option<Pin<Box<Sleep>>>,
    ring_retry: Option<Pin<Box<Sleep>>>,
}

impl SendWaiter {
    fn poll<R>(
        &mut self,
        cx: &mut Context<'_>,
        attempt: &mut impl FnMut(&Inner, &mut SendState) -> Attempt<R>,
    ) -> Poll<io::Result<R>> {
        loop {
            match self.full {
                None => match self.step(cx, attempt) {
                    Step::Done(r) => return Poll::Ready(r),
                    Step::Busy => return Poll::Pending,
                    Step::Full(f) => self.full = Some(f),
                },
                Some(Full::Ring) => {
                    let t =
                        self.ring_retry.get_or_insert_with(|| Box::pin(tokio::time::sleep(RING_FULL_RETRY)));
                    if t.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.ring_retry = None;
                    self.full = None;
                }
                Some(Full::Socket) => return self.poll_socket(cx, attempt),
            }
        }
    }

    /// The socket was found full: waits until it is writable and tries
    /// again.
    fn poll_socket<R>(
        &mut self,
        cx: &mut Context<'_>,
        attempt: &mut impl FnMut(&Inner, &mut SendState) -> Attempt<R>,
    ) -> Poll<io::Result<R>> {
        let generation = self.shared.inner().state.lock().generation;
        let io = match self.shared.io(generation) {
            Ok(io) => io,
            Err(e) => {
                self.hand_over();
                return Poll::Ready(Err(e));
            }
        };
        loop {
            let mut ready = match io.poll_write_ready(cx) {
                Poll::Pending => {
                    self.holds_slot = true;
                    self.shared.send_waiters.lock().push(cx.waker().clone());
                    return Poll::Pending;
                }
                Poll::Ready(Ok(guard)) => guard,
                Poll::Ready(Err(e)) => {
                    self.hand_over();
                    return Poll::Ready(Err(e));
                }
            };
            match self.step(cx, attempt) {
                Step::Done(r) => return Poll::Ready(r),
                Step::Busy => return Poll::Pending,
                Step::Full(Full::Socket) => ready.clear_ready(),
                Step::Full(Full::Ring) => {
                    // The socket took the packet; its marker found no room.
                    self.full = Some(Full::Ring);
                    return self.poll(cx, attempt);
                }
            }
        }
    }

    fn step<R>(
        &mut self,
        cx: &mut Context<'_>,
        attempt: &mut impl FnMut(&Inner, &mut SendState) -> Attempt<R>,
    ) -> Step<R> {
        let inner = self.shared.inner().clone();
        loop {
            let Some(mut s) = inner.try_lock_send() else {
                // Taken by a task (it wakes the waiters as it lets go) or
                // by a thread (which wakes no one: look again shortly).
                self.shared.send_waiters.lock().push(cx.waker().clone());
                let retry = self.retry.get_or_insert_with(|| Box::pin(tokio::time::sleep(SEND_LOCK_RETRY)));
                if retry.as_mut().poll(cx).is_ready() {
                    self.retry = None;
                    continue;
                }
                return Step::Busy;
            };
            let r = attempt(&inner, &mut s);
            // Letting go sends an ack that came due meanwhile.
            drop(s);
            self.shared.wake_senders();
            return match r {
                Ok(Ok(v)) => {
                    self.hand_over();
                    Step::Done(Ok(v))
                }
                Ok(Err(f)) => Step::Full(f),
                Err(e) => {
                    self.hand_over();
                    Step::Done(Err(e))
                }
            };
        }
    }

    fn hand_over(&mut self) {
        if std::mem::take(&mut self.holds_slot) {
            self.shared.wake_senders();
        }
    }
}

impl Drop for SendWaiter {
    fn drop(&mut self) {
        self.hand_over();
    }
}

fn lost_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

/// Sends with `attempt` (called with `send` held; `Ok(Err(_))`: no room),
/// never blocking the executor. With `across_reconnection`, a
/// connection found lost is made again (as the blocking send does, on a
/// blocking thread) and the send tried there.
pub(crate) async fn send_with<R>(
    shared: &Arc<Shared>,
    across_reconnection: bool,
    mut attempt: impl FnMut(&Inner, &mut SendState) -> Attempt<R>,
) -> Result<R, RecvError> {
    let inner = shared.inner();
    loop {
        let mut sender = SendWaiter {
            shared: shared.clone(),
            holds_slot: false,
            full: None,
            retry: None,
            ring_retry: None,
        };
        let r = poll_fn(|cx| sender.poll(cx, &mut attempt)).await;
        drop(sender);
        match r {
            Ok(v) => return Ok(v),
            Err(e) if across_reconnection && inner.redial.is_some() && lost_connection(&e) => {
                let kind = e.kind();
                let i = inner.clone();
                if !blocking(move || i.recover(&io::Error::from(kind))).await.unwrap_or(false) {
                    return Err(send_failure(shared, e));
                }
            }
            Err(e) => return Err(send_failure(shared, e)),
        }
    }
}

/// What a failed send tells its caller: as `Inner::send_error`, reading
/// the broker's goodbye without waiting.
fn send_failure(shared: &Arc<Shared>, e: io::Error) -> RecvError {
    if !lost_connection(&e) {
        return RecvError::Io(e);
    }
    let _ = try_now(shared, |st| st.closed.clone());
    let st = shared.inner().state.lock();
    RecvError::Disconnected(
        st.closed
            .clone()
            .or_else(|| st.lost.clone())
            .unwrap_or(Disconnect { code: None, reason: "the broker closed the connection".into() }),
    )
}

/// Sends packets without waiting: how many went, or where there was no
/// room, and the connection generation they went on. `only`: on that
/// generation only (see `Inner::on_port`).
fn try_packets_gen(inner: &Inner, only: Option<u64>, packets: &[OutPacket<'_>]) -> Attempt<(usize, u64)> {
    loop {
        match inner.on_port(only, |port| port.send(packets, false)) {
            Ok((sent, generation)) => return Ok(sent.map(|n| (n, generation))),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// [`try_packets_gen`] without the generation.
fn try_packets_on(inner: &Inner, only: Option<u64>, packets: &[OutPacket<'_>]) -> Attempt<usize> {
    Ok(try_packets_gen(inner, only, packets)?.map(|(n, _)| n))
}

/// Sends one packet without waiting.
fn try_packet_on(inner: &Inner, only: Option<u64>, packet: OutPacket<'_>) -> Attempt<()> {
    Ok(try_packets_on(inner, only, &[packet])?.map(drop))
}

fn encode_into<B: Body>(s: &mut SendState, body: &B) -> io::Result<()> {
    encode_head_into(&mut s.head, body)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

/// Sends one frame (`published`: it is a publish, counted as the broker
/// counts them): the connection generation it went on (an answer to it
/// is lost with that connection, see `State::call_sent`).
pub(crate) async fn send_frame<B: Body>(
    shared: &Arc<Shared>,
    body: &B,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
    published: bool,
) -> Result<u64, RecvError> {
    send_with(shared, true, |inner, s| {
        encode_into(s, body)?;
        let sent = try_packets_gen(inner, None, &[OutPacket { head: &s.head, payload, fds }])?;
        if sent.is_ok() && published {
            s.published += 1;
        }
        Ok(sent.map(|(_, generation)| generation))
    })
    .await
}

/// Sends several inline packets in as few system calls as the socket
/// allows: how many went (at least one).
pub(crate) async fn send_packets(
    shared: &Arc<Shared>,
    packets: &[OutPacket<'_>],
) -> Result<usize, RecvError> {
    // Across a reconnection, as `publish` and the blocking `publish_many`:
    // a send that fails sent none of `packets`, which go on the next
    // connection once it is made.
    send_with(shared, true, |inner, s| {
        let sent = try_packets_on(inner, None, packets)?;
        if let Ok(n) = sent {
            s.published += n as u64;
        }
        Ok(sent)
    })
    .await
}

/// Sends one frame at once if `send` is free and the socket has room:
/// whether it went. Anything else (taken, full, failed) is for the caller
/// to hand to the blocking path ([`off_executor`], [`blocking`]), which
/// waits, or reports the failure, as the blocking API does.
/// `only`: on that connection generation only (a reply to a request that
/// came on it).
pub(crate) fn send_now<B: Body>(
    inner: &Inner,
    only: Option<u64>,
    body: &B,
    payload: &[u8],
    fds: &[BorrowedFd<'_>],
) -> bool {
    let Some(mut s) = inner.try_lock_send() else { return false };
    if encode_into(&mut s, body).is_err() {
        return false;
    }
    matches!(try_packet_on(inner, only, OutPacket { head: &s.head, payload, fds }), Ok(Ok(())))
}

/// Runs `f`, which may block, where it cannot block an executor: on
/// tokio's blocking pool inside a runtime; outside one, here.
pub(crate) fn off_executor(f: impl FnOnce() + Send + 'static) {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(f);
        }
        Err(_) => f(),
    }
}

/// Runs `f`, which may block, on tokio's blocking pool, and awaits it.
pub(crate) async fn blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> io::Result<R> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(r),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(io::Error::other("the tokio runtime is shutting down")),
    }
}

/// Sends one frame encoded already: the connection generation it went on
/// (as [`send_frame`]).
pub(crate) async fn send_encoded(shared: &Arc<Shared>, head: &[u8]) -> Result<u64, RecvError> {
    send_with(shared, true, |inner, _| {
        let sent = try_packets_gen(inner, None, &[OutPacket { head, payload: &[], fds: &[] }])?;
        Ok(sent.map(|(_, generation)| generation))
    })
    .await
}
