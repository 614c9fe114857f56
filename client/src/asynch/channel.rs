//! `AsyncChannelSubscriber`: a ring channel reader for async code.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use tokio::task::JoinHandle;

use crate::channel::{ChannelError, ChannelEvent, ChannelSubscriber};

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
pub struct AsyncChannelSubscriber {
    /// `None` while a helper waits with it, or once it is lost.
    sub: Option<ChannelSubscriber>,
    /// The helper waiting on the blocking pool, which hands the reader
    /// back when done.
    waiting: Option<JoinHandle<(ChannelSubscriber, Result<(), ChannelError>)>>,
}

impl std::fmt::Debug for AsyncChannelSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncChannelSubscriber")
            .field("reader", &self.sub)
            .field("waiting", &self.waiting.is_some())
            .finish()
    }
}

impl From<ChannelSubscriber> for AsyncChannelSubscriber {
    fn from(sub: ChannelSubscriber) -> Self {
        AsyncChannelSubscriber::new(sub)
    }
}

impl AsyncChannelSubscriber {
    /// Reads `sub` from async code (within a tokio runtime).
    pub fn new(sub: ChannelSubscriber) -> AsyncChannelSubscriber {
        AsyncChannelSubscriber { sub: Some(sub), waiting: None }
    }

    /// Takes the reader back from the helper, if one waits with it.
    async fn settle(&mut self) -> Result<&mut ChannelSubscriber, ChannelError> {
        if let Some(h) = self.waiting.as_mut() {
            // Cancel-safe: dropped here, the handle stays, and the next
            // call takes the reader back.
            let joined = h.await;
            self.waiting = None;
            match joined {
                Ok((sub, waited)) => {
                    self.sub = Some(sub);
                    waited?;
                }
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => return Err(lost()),
            }
        }
        self.sub.as_mut().ok_or_else(lost)
    }

    /// Waits for the next message and reads it with `read`, as
    /// [`ChannelSubscriber::recv`] does (`read` gets a checked private
    /// copy). Cancel-safe.
    pub async fn recv<R>(&mut self, read: impl FnMut(&[u8]) -> R) -> Result<ChannelEvent<R>, ChannelError> {
        let mut read = read;
        loop {
            if let Some(ev) = self.settle().await?.try_recv(&mut read)? {
                return Ok(ev);
            }
            let sub = self.sub.take().expect("settled");
            self.waiting = Some(tokio::task::spawn_blocking(move || {
                let waited = sub.wait_ready(ChannelSubscriber::ASYNC_WAIT);
                (sub, waited)
            }));
        }
    }

    /// [`AsyncChannelSubscriber::recv`], copying the message out.
    pub async fn recv_vec(&mut self) -> Result<ChannelEvent<Vec<u8>>, ChannelError> {
        self.recv(<[u8]>::to_vec).await
    }

    /// The next message if there is one, without waiting, as
    /// [`ChannelSubscriber::try_recv`]. `Ok(None)` too while a cancelled
    /// `recv`'s helper still waits (the next `recv` takes it back).
    pub fn try_recv<R>(
        &mut self,
        read: impl FnMut(&[u8]) -> R,
    ) -> Result<Option<ChannelEvent<R>>, ChannelError> {
        if let Some(h) = &self.waiting {
            if !h.is_finished() {
                return Ok(None);
            }
            let h = self.waiting.take().expect("checked");
            let joined = futures_now(h);
            match joined {
                Some(Ok((sub, waited))) => {
                    self.sub = Some(sub);
                    waited?;
                }
                Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Some(Err(_)) | None => return Err(lost()),
            }
        }
        self.sub.as_mut().ok_or_else(lost)?.try_recv(read)
    }

    /// How many read attempts a wait spins before it sleeps on the futex,
    /// as [`ChannelSubscriber::set_spin`] (default 2000). Applies once no
    /// helper waits.
    pub fn set_spin(&mut self, attempts: u32) {
        if let Some(sub) = &mut self.sub {
            sub.set_spin(attempts);
        }
    }

    /// The reader back, for the blocking API (once a waiting helper is
    /// done).
    pub async fn into_blocking(mut self) -> Result<ChannelSubscriber, ChannelError> {
        self.settle().await?;
        Ok(self.sub.take().expect("settled"))
    }
}

/// The result of a finished task, without an executor: polls it once
/// with a waker that does nothing.
fn futures_now<T>(mut h: JoinHandle<T>) -> Option<Result<T, tokio::task::JoinError>> {
    struct Noop;
    impl std::task::Wake for Noop {
        fn wake(self: std::sync::Arc<Self>) {}
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Noop));
    let mut cx = std::task::Context::from_waker(&waker);
    match Pin::new(&mut h).poll(&mut cx) {
        Poll::Ready(r) => Some(r),
        Poll::Pending => None,
    }
}

fn lost() -> ChannelError {
    ChannelError::Io(io::Error::other(
        "the channel reader was lost: the tokio runtime shut down while it waited",
    ))
}
