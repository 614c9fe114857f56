//! `AsyncSubscription`: one pattern's stream of events, for async code.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use shmbus_proto::frame::Unsubscribe;

use super::driver::{self, Shared, Waiter};
use crate::connection::{Inner, State};
use crate::error::RecvError;
use crate::message::Event;

/// A live subscription, from [`AsyncClient::subscribe`]: a
/// [`Stream`](futures_core::Stream) of events that yields the error that
/// ended it (the connection closed, the broker revoked it), then ends.
/// Dropping it unsubscribes.
///
/// [`AsyncClient::subscribe`]: super::AsyncClient::subscribe
pub struct AsyncSubscription {
    shared: Arc<Shared>,
    id: u32,
    pattern: String,
    /// The stream's wait, kept between polls.
    waiter: Waiter,
    done: bool,
}

impl std::fmt::Debug for AsyncSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncSubscription").field("id", &self.id).field("pattern", &self.pattern).finish()
    }
}

fn take(id: u32) -> impl FnMut(&mut State) -> Option<Result<Event, RecvError>> {
    move |st| st.take_or_revoked(id).map(|r| r.map(|(_, ev)| ev).map_err(RecvError::Revoked))
}

impl AsyncSubscription {
    pub(crate) fn new(shared: Arc<Shared>, id: u32, pattern: String) -> AsyncSubscription {
        let waiter = Waiter::new(shared.clone());
        AsyncSubscription { shared, id, pattern, waiter, done: false }
    }

    /// The subscription id on the wire.
    #[cfg(test)]
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    /// The pattern subscribed to, as given.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Why the broker ended this subscription, if it did, as
    /// [`Subscription::revocation`](crate::Subscription::revocation).
    pub fn revocation(&self) -> Option<String> {
        self.shared.inner().state.lock().revocation(self.id)
    }

    /// Waits for the next event. Cancel-safe: an event is taken only by
    /// the poll that returns it. Wrap it in `tokio::time::timeout` to
    /// bound the wait.
    pub async fn recv(&self) -> Result<Event, RecvError> {
        driver::wait_for(&self.shared, None, take(self.id)).await?.transpose()?.ok_or_else(no_value)
    }

    /// The next event if one is ready, reading what the socket holds
    /// without waiting.
    pub fn try_recv(&self) -> Result<Option<Event>, RecvError> {
        driver::try_now(&self.shared, take(self.id))?.transpose()
    }
}

fn no_value() -> RecvError {
    RecvError::Io(std::io::Error::other("a wait without a deadline ended without its value"))
}

impl futures_core::Stream for AsyncSubscription {
    type Item = Result<Event, RecvError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let r = match this.waiter.poll(cx, take(this.id)) {
            Poll::Ready(Ok(r)) => r,
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => return Poll::Pending,
        };
        this.done = r.is_err();
        Poll::Ready(Some(r))
    }
}

impl futures_core::FusedStream for AsyncSubscription {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

impl Drop for AsyncSubscription {
    fn drop(&mut self) {
        // As `Subscription`'s drop.
        let inner = self.shared.inner();
        {
            let mut st = inner.state.lock();
            let revoked = st.revocation(self.id).is_some();
            // Its queue goes now (closing any fds in it).
            st.remove_sub(self.id);
            if revoked {
                // The broker forgot it already: nothing to unsubscribe,
                // nothing owed.
                return;
            }
            // Its id stays in use until the broker answers the unsubscribe.
            st.sub_ids.owe(self.id);
        }
        unsubscribe(inner, self.id);
    }
}

/// Sends `Unsubscribe` for `id` (whose answer is owed already): at once if
/// it can go without waiting, else from the blocking pool. Not across a
/// reconnection: a subscription dropped meanwhile is not renewed.
fn unsubscribe(inner: &Arc<Inner>, id: u32) {
    if driver::send_now(inner, None, &Unsubscribe { sub_id: id }, &[], &[]) {
        return;
    }
    let inner = inner.clone();
    driver::off_executor(move || {
        if inner.send_once(&Unsubscribe { sub_id: id }).is_err() {
            // Nothing was sent (a packet goes whole or not at all).
            inner.state.lock().sub_ids.answered(id);
        }
    });
}

/// A subscription being made: whatever ends its future before the
/// broker's answer is taken (a timeout, or the future dropped) takes it
/// back as this drops.
pub(crate) struct Opening {
    shared: Arc<Shared>,
    id: u32,
    stage: Stage,
}

#[derive(PartialEq, Eq)]
enum Stage {
    /// The `Subscribe` has not gone (yet).
    Unsent,
    /// It went, and the answer is not taken.
    Sent,
    /// The answer (or the error) is taken: only the local state is left
    /// to clean up.
    Answered,
    /// It is live, and an `AsyncSubscription` owns it.
    Done,
}

impl Opening {
    pub fn new(shared: Arc<Shared>, id: u32) -> Opening {
        Opening { shared, id, stage: Stage::Unsent }
    }

    pub fn sent(&mut self) {
        self.stage = Stage::Sent;
    }

    pub fn answered(&mut self) {
        self.stage = Stage::Answered;
    }

    pub fn done(&mut self) {
        self.stage = Stage::Done;
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if self.stage == Stage::Done {
            return;
        }
        let inner = self.shared.inner();
        let id = self.id;
        let mut st = inner.state.lock();
        st.remove_sub(id);
        st.awaiting_ack.remove(&id);
        st.acks.remove(&id);
        match self.stage {
            // Nothing was sent (a packet goes whole or not at all): no
            // answer will come.
            Stage::Unsent => {
                st.sub_ids.answered(id);
            }
            Stage::Sent => {
                // The broker may still make it (or has): take it back, and
                // keep its id until the broker has answered both (in one
                // go, so the id is never free between).
                st.sub_ids.owe(id);
                drop(st);
                unsubscribe(inner, id);
            }
            Stage::Answered | Stage::Done => {}
        }
    }
}
