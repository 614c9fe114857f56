//! `AsyncChannelSubscriber`: a ring channel reader for async code.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use tokio::task::JoinHandle;

use crate::channel::{ChannelError, ChannelEvent, ChannelSubscriber};

/// What a helper on the blocking pool hands back: the reader, and what it
/// found (`Ok(None)`: look again).
type Helped = (ChannelSubscriber, Result<Option<ChannelEvent<Vec<u8>>>, ChannelError>);

/// Reads one ring channel from async code, from
/// [`AsyncClient::channel_subscriber`](super::AsyncClient::channel_subscriber)
/// or [`AsyncChannelSubscriber::new`].
///
/// Reading is the blocking reader's (`try_recv` on the ring, no system
/// call while messages are there). Waiting for the publisher is not: a
/// futex cannot be awaited, so the reader waits on tokio's blocking pool,
/// at most 20 ms at a time, spinning and sleeping on the futex as
/// [`ChannelSubscriber::recv`] does, and reads nothing there: a `recv`
/// dropped mid-wait loses no message. A wake-up costs one thread hop more
/// than the blocking reader's (the `async_ring` benchmark measures it).
/// Once the ring is closed, reads (which may then ask the broker why, or
/// follow a reconnection) are made there too.
pub struct AsyncChannelSubscriber {
    /// `None` while a helper has it, or once it is lost.
    sub: Option<ChannelSubscriber>,
    /// The helper on the blocking pool, which hands the reader back.
    helper: Option<JoinHandle<Helped>>,
    /// Set while a helper had the reader: applied when it comes back.
    spin: Option<u32>,
}

impl std::fmt::Debug for AsyncChannelSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncChannelSubscriber")
            .field("reader", &self.sub)
            .field("helped", &self.helper.is_some())
            .finish()
    }
}

impl From<ChannelSubscriber> for AsyncChannelSubscriber {
    fn from(sub: ChannelSubscriber) -> Self {
        AsyncChannelSubscriber::new(sub)
    }
}

/// What `read` makes of an event read on the blocking pool.
fn apply<R>(ev: ChannelEvent<Vec<u8>>, read: &mut impl FnMut(&[u8]) -> R) -> ChannelEvent<R> {
    match ev {
        ChannelEvent::Message { seq, value } => ChannelEvent::Message { seq, value: read(&value) },
        ChannelEvent::Missed(k) => ChannelEvent::Missed(k),
        ChannelEvent::Reconnected => ChannelEvent::Reconnected,
    }
}

impl AsyncChannelSubscriber {
    /// Reads `sub` from async code (within a tokio runtime).
    pub fn new(sub: ChannelSubscriber) -> AsyncChannelSubscriber {
        AsyncChannelSubscriber { sub: Some(sub), helper: None, spin: None }
    }

    /// The reader is back from its helper: what the helper found.
    fn returned(
        &mut self,
        joined: Result<Helped, tokio::task::JoinError>,
    ) -> Result<Option<ChannelEvent<Vec<u8>>>, ChannelError> {
        match joined {
            Ok((mut sub, found)) => {
                if let Some(spin) = self.spin.take() {
                    sub.set_spin(spin);
                }
                self.sub = Some(sub);
                found
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => Err(lost()),
        }
    }

    /// Hands the reader to a helper on the blocking pool.
    fn help(
        &mut self,
        f: impl FnOnce(&mut ChannelSubscriber) -> Result<Option<ChannelEvent<Vec<u8>>>, ChannelError>
            + Send
            + 'static,
    ) {
        let mut sub = self.sub.take().expect("held");
        self.helper = Some(tokio::task::spawn_blocking(move || {
            let found = f(&mut sub);
            (sub, found)
        }));
    }

    /// Waits for the next message and reads it with `read`, as
    /// [`ChannelSubscriber::recv`] does (`read` gets a checked private
    /// copy). Cancel-safe.
    pub async fn recv<R>(&mut self, read: impl FnMut(&[u8]) -> R) -> Result<ChannelEvent<R>, ChannelError> {
        let mut read = read;
        loop {
            if let Some(h) = self.helper.as_mut() {
                // Cancel-safe: dropped here, the handle stays, and the
                // next call takes the reader back.
                let joined = h.await;
                self.helper = None;
                if let Some(ev) = self.returned(joined)? {
                    return Ok(apply(ev, &mut read));
                }
            }
            let sub = self.sub.as_mut().ok_or_else(lost)?;
            if sub.read_may_block() {
                self.help(read_closed);
                continue;
            }
            if let Some(ev) = sub.try_recv(&mut read)? {
                return Ok(ev);
            }
            self.help(|sub| sub.wait_ready(ChannelSubscriber::ASYNC_WAIT));
        }
    }

    /// [`AsyncChannelSubscriber::recv`], copying the message out.
    pub async fn recv_vec(&mut self) -> Result<ChannelEvent<Vec<u8>>, ChannelError> {
        self.recv(<[u8]>::to_vec).await
    }

    /// The next message if there is one, without waiting, as
    /// [`ChannelSubscriber::try_recv`]. `Ok(None)` too while a helper has
    /// the reader (a cancelled `recv`'s wait, or a read of a closed ring,
    /// whose outcome a later call gives).
    pub fn try_recv<R>(
        &mut self,
        read: impl FnMut(&[u8]) -> R,
    ) -> Result<Option<ChannelEvent<R>>, ChannelError> {
        let mut read = read;
        if let Some(h) = self.helper.take() {
            match finished(h) {
                Ok(joined) => {
                    if let Some(ev) = self.returned(joined)? {
                        return Ok(Some(apply(ev, &mut read)));
                    }
                }
                Err(h) => {
                    self.helper = Some(h);
                    return Ok(None);
                }
            }
        }
        let sub = self.sub.as_mut().ok_or_else(lost)?;
        if sub.read_may_block() {
            self.help(read_closed);
            return Ok(None);
        }
        sub.try_recv(read)
    }

    /// Like `try_recv`, copying the message out.
    pub fn try_recv_vec(&mut self) -> Result<Option<ChannelEvent<Vec<u8>>>, ChannelError> {
        self.try_recv(<[u8]>::to_vec)
    }

    /// How many read attempts a wait spins before it sleeps on the futex,
    /// as [`ChannelSubscriber::set_spin`] (default 2000; the spinning is
    /// done on the blocking pool). Applies from the next wait.
    pub fn set_spin(&mut self, attempts: u32) {
        match &mut self.sub {
            Some(sub) => sub.set_spin(attempts),
            None => self.spin = Some(attempts),
        }
    }
}

/// On the blocking pool: reads a closed ring (its last messages, then
/// why it closed, or the new ring after a reconnection), going on while
/// that says to wait (for a publisher to come back), for at most one
/// helper's turn.
fn read_closed(sub: &mut ChannelSubscriber) -> Result<Option<ChannelEvent<Vec<u8>>>, ChannelError> {
    let start = std::time::Instant::now();
    loop {
        let found = sub.try_recv(<[u8]>::to_vec);
        if !matches!(found, Ok(None)) || start.elapsed() >= ChannelSubscriber::ASYNC_WAIT {
            return found;
        }
    }
}

/// The result of a finished task, without an executor (polled once with a
/// waker that does nothing); the handle back if it is not finished.
fn finished<T>(mut h: JoinHandle<T>) -> Result<Result<T, tokio::task::JoinError>, JoinHandle<T>> {
    if !h.is_finished() {
        return Err(h);
    }
    struct Noop;
    impl std::task::Wake for Noop {
        fn wake(self: std::sync::Arc<Self>) {}
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Noop));
    let mut cx = std::task::Context::from_waker(&waker);
    match Pin::new(&mut h).poll(&mut cx) {
        Poll::Ready(r) => Ok(r),
        Poll::Pending => Err(h),
    }
}

fn lost() -> ChannelError {
    ChannelError::Io(io::Error::other(
        "the channel reader was lost: the tokio runtime shut down while it waited",
    ))
}
