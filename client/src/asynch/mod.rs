//! The async API, on tokio (cargo feature `tokio`): [`AsyncClient`] and
//! its handles, driving the very connection the blocking API drives.
//!
//! Model: an [`AsyncClient`] is a blocking [`Client`] (the sans-io core in
//! `core`, the shared `Inner` of `connection`) plus the socket's
//! registration with tokio's reactor (`tokio::io::unix::AsyncFd`). Nothing
//! runs in the background: as in the blocking driver, whoever waits for
//! something reads the socket, and wakes the others.
//!
//! Reading (`driver::Waiter`). A task that waits for the state (a
//! subscription's next event, a call's answer, an ack) looks at it under
//! `state`, and, before letting go of `state`, registers its waker with
//! `Inner::register_waker`: every reader wakes every waiter after each
//! batch (`Inner::notify_all`, condvar and wakers alike), so no change
//! after the look is missed. If the socket is readable, the task tries to
//! become the reader (`reader.try_lock`), reads one batch without waiting
//! (`Inner::read_nonblocking`), and looks again; once the socket is empty
//! it clears the reactor's readiness and waits for the next. If another
//! task or a thread is the reader, it waits for its wake-up. The `reader`
//! lock is never held across an `.await`, so a thread of the blocking API
//! can always take over, and a task can take over from a thread that is
//! done. A poll reads at most 16 batches, then yields.
//!
//! The reactor keeps one waker per direction: the last task that found
//! the socket not ready. So a task that may hold that slot hands the
//! socket over when it stops waiting (its value came, it failed, or its
//! future was dropped): it wakes every waiter, and the next one to find
//! the socket empty takes the slot. Nobody is left waiting on a socket
//! that nobody watches.
//!
//! Fd acknowledgements follow the rule of `connection`: before a task
//! waits, for the socket or for another reader, every fd taken is
//! acknowledged (`Inner::ack_before_waiting`; the non-blocking read does
//! it too when it finds the socket empty).
//!
//! Sending (`driver::send_with`) never blocks the executor: `send` is only
//! tried (a task holds it only for a non-blocking send, never across an
//! `.await`), the packet goes with `MSG_DONTWAIT`, and a full socket is
//! waited for on the reactor's writability (with the same hand-over of
//! its one waker). A task that finds `send` taken by a thread of the
//! blocking API (which wakes no task when it lets go) looks again every
//! millisecond. Letting go of `send` still sends a due `FdAck` as the
//! blocking driver does, with a blocking send of one small frame: it can
//! only wait while the socket's buffer is full.
//!
//! Cancellation: every future can be dropped at any `.await` and leaves
//! the connection as the blocking API would after a timeout. A dropped
//! `subscribe` takes its subscription back (if its `Subscribe` went, the
//! id stays owed and an `Unsubscribe` goes, so the broker answers both
//! before the id is used again); a dropped `request` gives up its call
//! slot (a late answer is dropped); a dropped `ping` its token; a dropped
//! wait hands the socket over. What a `Drop` must send (an unsubscribe, a
//! request's `UNANSWERED`) goes at once if `send` is free and the socket
//! has room, else from tokio's blocking pool.
//!
//! Setup that is rare and waits for the broker runs the blocking code on
//! tokio's blocking pool: connecting (the handshake), serving a name,
//! joining a channel. Dropping such a future lets the blocking call finish
//! there, and drops what it made (which gives it back as a drop does).
//!
//! Reconnection: a lost connection is made again by the blocking driver,
//! on the blocking pool (`Inner::await_reconnect`, `Inner::recover`); the
//! socket is registered anew with the reactor once it is (a new socket
//! takes the old one's fd number: what is registered is a duplicate, so
//! that dropping the old registration cannot remove the new socket).
//!
//! Ring channels: a futex cannot be awaited, and an eventfd beside it
//! would take a system call from every publish that has a sleeping reader
//! and a change to the channel protocol. So an [`AsyncChannelSubscriber`]
//! waits on tokio's blocking pool, one bounded wait (20 ms) at a time,
//! without reading there (so a dropped `recv` loses no message): the
//! helper spins and sleeps on the futex as the blocking reader does and
//! returns when a read would find something; the task then reads. This
//! costs one thread hop on the wake-up path (see the `async_ring`
//! benchmark). A read of a closed ring, which may ask the broker why or
//! follow a reconnection to the new ring, is made on the blocking pool as
//! well, its event handed back to the task.
//!
//! Differences from the blocking API:
//! - `Request::reply*` may block (briefly, while the socket is full or a
//!   thread holds `send`); from a task use `Request::reply_async` and its
//!   siblings, which send at once when they can and otherwise hand the
//!   blocking send to the blocking pool. A `Request` dropped unanswered
//!   still sends its `UNANSWERED` with the blocking send.
//! - Timeouts: receiving has no `recv_timeout`; wrap `recv()` in
//!   `tokio::time::timeout` (every future here is cancel-safe).
//! - Dropping an [`AsyncService`] releases the name from the blocking
//!   pool, so shortly after the drop rather than before it returns.

mod channel;
mod driver;
mod service;
mod subscription;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{check_pattern, check_subject, Refusals};
use shmbus_proto::frame::{
    encode_head, validate_origin, ErrorCode, Limits, Overflow, PayloadRef, Ping, Publish, Subscribe,
};
use shmbus_proto::sys::memfd;
use shmbus_proto::sys::socket::{OutPacket, MAX_BATCH};

use crate::channel::ChannelError;
use crate::client::{Client, ConnectOptions};
use crate::connection::State;
use crate::error::{ConnectError, FlushError, LoanError, PublishError, RequestError, SubscribeError};
use crate::loan::Loan;

pub use channel::AsyncChannelSubscriber;
pub use service::AsyncService;
pub use subscription::AsyncSubscription;

use driver::Shared;

/// A connection to a shmbus broker for async code, on tokio. Cheap to
/// clone; clones share the connection, and so does the blocking
/// [`Client`] it wraps ([`AsyncClient::blocking`]): both APIs may be used
/// on one connection at once.
///
/// Names, errors and semantics are the blocking client's. Every future is
/// cancel-safe: dropping one leaves the connection usable (a dropped
/// `subscribe` takes its subscription back, a dropped `request` gives up
/// its call). No method blocks the executor, but for the rare frame sent
/// from a `Drop` while the socket is full.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use shmbus::{AsyncClient, Event};
///
/// let client = AsyncClient::connect().await?;
/// let sub = client.subscribe("sensors.*.temp").await?;
/// client.publish("sensors.kitchen.temp", b"21.5").await?;
/// if let Event::Message(m) = sub.recv().await? {
///     println!("{}: {:?}", m.topic(), m.payload());
/// }
/// # Ok(())
/// # }
/// ```
///
/// Needs a tokio runtime with its I/O and time drivers enabled
/// (`enable_all`); the socket is registered with the runtime that was
/// current when the client was made.
#[derive(Clone)]
pub struct AsyncClient {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AsyncClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncClient")
            .field("address", &self.shared.client.inner.address)
            .field("client_id", &self.shared.client.id())
            .finish()
    }
}

impl AsyncClient {
    /// Connects to `$SHMBUS_ADDRESS`, else to the user bus `@shmbus.<uid>`.
    pub async fn connect() -> Result<AsyncClient, ConnectError> {
        ConnectOptions::new().connect_async().await
    }

    /// Connects to `address` (`@name` or a path).
    pub async fn connect_to(address: &str) -> Result<AsyncClient, ConnectError> {
        ConnectOptions::new().address(shmbus_proto::Address::parse(address)?).connect_async().await
    }

    /// The async API on a connection made by the blocking one (which goes
    /// on working beside it). Call it within a tokio runtime.
    pub fn from_blocking(client: Client) -> io::Result<AsyncClient> {
        Ok(AsyncClient { shared: Shared::new(client)? })
    }

    /// The blocking API on this very connection.
    pub fn blocking(&self) -> &Client {
        &self.shared.client
    }

    fn client(&self) -> &Client {
        &self.shared.client
    }

    /// Our id on the bus, as stamped on what we send.
    pub fn id(&self) -> u64 {
        self.client().id()
    }

    /// The limits the broker announced.
    pub fn limits(&self) -> Limits {
        self.client().limits()
    }

    /// Which transport the connection uses now, as [`Client::transport`].
    pub fn transport(&self) -> crate::Transport {
        self.client().transport()
    }

    /// Publishes `payload` to `topic`, as [`Client::publish`]: inline up to
    /// the memfd threshold, above it copied once into a sealed memfd.
    /// Returns once the frame is handed to the kernel (waiting, without
    /// blocking, while the socket is full); a refusal by the broker comes
    /// back from [`AsyncClient::flush`].
    pub async fn publish(&self, topic: &str, payload: impl AsRef<[u8]>) -> Result<(), PublishError> {
        self.publish_from(topic, payload.as_ref(), None).await
    }

    /// Publishes with an origin, as [`Client::publish_with_origin`].
    pub async fn publish_with_origin(
        &self,
        topic: &str,
        payload: impl AsRef<[u8]>,
        origin: &str,
    ) -> Result<(), PublishError> {
        validate_origin(origin)?;
        self.publish_from(topic, payload.as_ref(), Some(origin)).await
    }

    async fn publish_from(
        &self,
        topic: &str,
        payload: &[u8],
        origin: Option<&str>,
    ) -> Result<(), PublishError> {
        check_subject(topic)?;
        if payload.len() > self.client().memfd_threshold() {
            let fd = memfd::from_bytes("shmbus-payload", payload).map_err(PublishError::Memfd)?;
            return self.send_memfd(topic, fd.as_fd(), payload.len() as u64, origin).await;
        }
        let max = self.limits().max_inline_payload as usize;
        if payload.len() > max {
            return Err(PublishError::PayloadTooLarge { len: payload.len(), max });
        }
        let body = Publish { topic, origin, payload: PayloadRef::Inline };
        driver::send_frame(&self.shared, &body, payload, &[], true).await?;
        Ok(())
    }

    /// A writable shared-memory buffer of `len` bytes to fill in place and
    /// send with [`AsyncClient::publish_loan`], without a copy.
    pub fn loan(&self, len: usize) -> Result<Loan, LoanError> {
        self.client().loan(len)
    }

    /// Seals the loan and publishes it: subscribers map these very pages.
    pub async fn publish_loan(&self, topic: &str, loan: Loan) -> Result<(), PublishError> {
        check_subject(topic)?;
        let (fd, len) = loan.seal().map_err(PublishError::Memfd)?;
        self.send_memfd(topic, fd.as_fd(), len, None).await
    }

    /// Publishes a sealed memfd the caller holds, as [`Client::publish_fd`].
    pub async fn publish_fd(&self, topic: &str, fd: impl AsFd) -> Result<(), PublishError> {
        check_subject(topic)?;
        let len = memfd::sealed_len(fd.as_fd())?;
        self.send_memfd(topic, fd.as_fd(), len, None).await
    }

    async fn send_memfd(
        &self,
        topic: &str,
        fd: BorrowedFd<'_>,
        len: u64,
        origin: Option<&str>,
    ) -> Result<(), PublishError> {
        let body = Publish { topic, origin, payload: PayloadRef::Memfd { len } };
        driver::send_frame(&self.shared, &body, &[], &[fd], true).await?;
        Ok(())
    }

    /// Publishes several messages with as few system calls as possible, as
    /// [`Client::publish_many`]: same semantics as calling
    /// [`AsyncClient::publish`] for each, in order (inline payloads only);
    /// on an error, the messages before the failing one have been sent.
    pub async fn publish_many<'a, P: AsRef<[u8]> + ?Sized + 'a>(
        &self,
        messages: impl IntoIterator<Item = (&'a str, &'a P)>,
    ) -> Result<(), PublishError> {
        let max = self.limits().max_inline_payload as usize;
        let mut heads: Vec<Vec<u8>> = Vec::new();
        let mut payloads: Vec<&[u8]> = Vec::with_capacity(MAX_BATCH);
        let mut result = Ok(());
        // A function, not a closure: a future holding a closure over
        // borrowed arguments is not `Send` (rustc cannot prove it for
        // every lifetime), so it could not be spawned.
        fn bytes<'t, 'p, P: AsRef<[u8]> + ?Sized>((topic, payload): (&'t str, &'p P)) -> (&'t str, &'p [u8]) {
            (topic, payload.as_ref())
        }
        let mut iter = messages.into_iter().map(bytes::<P>).peekable();
        while iter.peek().is_some() && result.is_ok() {
            result = crate::client::fill_publish_batch(&mut iter, max, &mut heads, &mut payloads);
            let packets: Vec<OutPacket<'_>> = heads
                .iter()
                .zip(&payloads)
                .map(|(h, p)| OutPacket { head: h, payload: p, fds: &[] })
                .collect();
            let mut sent = 0;
            while sent < packets.len() {
                match driver::send_packets(&self.shared, &packets[sent..]).await {
                    Ok(n) => sent += n,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        result
    }

    /// Publishes `value` encoded with postcard; read it back with
    /// [`crate::Message::decode`].
    pub async fn publish_value<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<(), PublishError> {
        let bytes = postcard::to_allocvec(value).map_err(|e| PublishError::Encode(e.to_string()))?;
        self.publish(topic, &bytes).await
    }

    /// Round trip to the broker; returns how long it took.
    pub async fn ping(&self) -> Result<Duration, RequestError> {
        let inner = self.shared.inner();
        let token = inner.state.lock().new_ping();
        // Dropped (or done): the token goes, and a late pong with it.
        let _forget = OnDrop(|| {
            inner.state.lock().pings.remove(&token);
        });
        let start = Instant::now();
        let sent_on = driver::send_frame(&self.shared, &Ping { token }, &[], &[], false).await?;
        let timeout = self.client().timeout();
        let came = |st: &mut State| {
            if st.pings.get(&token) == Some(&true) {
                st.pings.remove(&token);
                Some(())
            } else {
                None
            }
        };
        match driver::wait_answer(&self.shared, Some(start + timeout), sent_on, came).await? {
            Some(()) => Ok(start.elapsed()),
            None => Err(RequestError::Timeout(timeout)),
        }
    }

    /// Waits until the broker has handled everything sent so far, and
    /// returns the publishes it refused since the last flush, if any; else
    /// the fire-and-forget sends it refused, as [`Client::flush`].
    pub async fn flush(&self) -> Result<(), FlushError> {
        self.ping().await?;
        let mut st = self.shared.inner().state.lock();
        let refused = std::mem::take(&mut st.refused_publishes);
        if !refused.is_empty() {
            let more = std::mem::take(&mut st.refused_publishes_more);
            return Err(FlushError::Refused(Refusals { kept: refused, more }));
        }
        let sends = std::mem::take(&mut st.refused_sends);
        if !sends.is_empty() {
            let more = std::mem::take(&mut st.refused_sends_more);
            return Err(FlushError::SendsRefused(Refusals { kept: sends, more }));
        }
        Ok(())
    }

    /// Subscribes to `pattern` (`*` one token, `>` the rest), with gap
    /// notices when the subscriber falls behind. Returns once the broker
    /// has the subscription: every later publish that matches reaches it.
    pub async fn subscribe(&self, pattern: &str) -> Result<AsyncSubscription, SubscribeError> {
        self.subscribe_with(pattern, Overflow::Gap).await
    }

    /// Subscribes with an explicit overflow policy.
    pub async fn subscribe_with(
        &self,
        pattern: &str,
        overflow: Overflow,
    ) -> Result<AsyncSubscription, SubscribeError> {
        check_pattern(pattern)?;
        let inner = self.shared.inner();
        let (sub_id, head) = {
            let mut st = inner.state.lock();
            if let Some(d) = &st.closed {
                return Err(SubscribeError::Disconnected(d.clone()));
            }
            let Some(id) = st.new_sub_id() else {
                return Err(SubscribeError::Refused {
                    code: ErrorCode::LimitExceeded,
                    message: "every subscription id is in use".into(),
                });
            };
            let head = match encode_head(&Subscribe { sub_id: id, pattern, overflow }) {
                Ok(h) => h,
                Err(e) => {
                    st.sub_ids.answered(id);
                    return Err(SubscribeError::Io(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        e.to_string(),
                    )));
                }
            };
            // Kept, to renew it after a reconnection.
            st.add_sub(id, head.clone());
            st.awaiting_ack.insert(id);
            (id, head)
        };
        // Whatever ends this future before the broker's answer is taken
        // takes the subscription back.
        let mut opening = subscription::Opening::new(self.shared.clone(), sub_id);
        let sent_on = driver::send_encoded(&self.shared, &head).await?;
        opening.sent();
        let timeout = self.client().timeout();
        let deadline = Instant::now() + timeout;
        match driver::wait_answer(&self.shared, Some(deadline), sent_on, |st| st.acks.remove(&sub_id)).await {
            Ok(Some(Ok(()))) => {
                opening.done();
                Ok(AsyncSubscription::new(self.shared.clone(), sub_id, pattern.to_owned()))
            }
            Ok(Some(Err((code, message)))) => {
                opening.answered();
                Err(SubscribeError::Refused { code, message })
            }
            // `opening` takes it back as it drops: the broker may still
            // make it.
            Ok(None) => Err(SubscribeError::Timeout(timeout)),
            Err(e) => {
                opening.answered();
                Err(e.into())
            }
        }
    }

    /// Joins the ring channel on `topic` as a reader, starting at its
    /// current head (the broker's answer is awaited on tokio's blocking
    /// pool).
    pub async fn channel_subscriber(&self, topic: &str) -> Result<AsyncChannelSubscriber, ChannelError> {
        let client = self.client().clone();
        let topic = topic.to_owned();
        let sub = driver::blocking(move || client.channel_subscriber(&topic)).await??;
        Ok(AsyncChannelSubscriber::new(sub))
    }
}

impl ConnectOptions {
    /// [`ConnectOptions::connect`] for async code: the handshake runs on
    /// tokio's blocking pool, and the connection is then registered with
    /// the current runtime.
    pub async fn connect_async(self) -> Result<AsyncClient, ConnectError> {
        let client = driver::blocking(move || self.connect()).await??;
        Ok(AsyncClient::from_blocking(client)?)
    }
}

/// Runs its closure when dropped: cleanup that must happen however a
/// future ends, cancelled included.
pub(crate) struct OnDrop<F: FnMut()>(pub F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}
