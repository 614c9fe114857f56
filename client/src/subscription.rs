//! `Subscription`: one pattern's stream of events.

use std::sync::Arc;
use std::time::{Duration, Instant};

use shmbus_proto::frame::Unsubscribe;

use crate::connection::{Inner, State};
use crate::error::RecvError;
use crate::message::Event;

/// A live subscription. Dropping it unsubscribes.
pub struct Subscription {
    inner: Arc<Inner>,
    id: u32,
    pattern: String,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("id", &self.id).field("pattern", &self.pattern).finish()
    }
}

impl Subscription {
    pub(crate) fn new(inner: Arc<Inner>, id: u32, pattern: String) -> Subscription {
        Subscription { inner, id, pattern }
    }

    /// The pattern subscribed to, as given.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The subscription id on the wire.
    #[cfg(test)]
    pub(crate) fn id(&self) -> u32 {
        self.id
    }

    fn take(&self) -> impl FnMut(&mut State) -> Option<Result<Event, RecvError>> + '_ {
        move |st| st.take_or_revoked(self.id).map(|r| r.map(|(_, ev)| ev).map_err(RecvError::Revoked))
    }

    /// Why the broker ended this subscription, if it did (a policy reload
    /// no longer allows it). Events it delivered before are still taken
    /// first; after them every receive fails with [`RecvError::Revoked`].
    pub fn revocation(&self) -> Option<String> {
        self.inner.state.lock().revocation(self.id)
    }

    /// Waits up to `timeout` (`None`: forever) for the next event on any of
    /// `subs`, which must share one `Client`. Events come in the order the
    /// broker sent them. Returns the index of the subscription and the event.
    /// A revoked subscription, once its events are taken, makes this fail
    /// with [`RecvError::Revoked`] where its notice arrived, every time:
    /// find it with [`Subscription::revocation`] and leave it out.
    pub fn recv_any(
        subs: &[&Subscription],
        timeout: Option<Duration>,
    ) -> Result<Option<(usize, Event)>, RecvError> {
        let Some(first) = subs.first() else { return Ok(None) };
        if subs.iter().any(|s| !Arc::ptr_eq(&s.inner, &first.inner)) {
            return Err(RecvError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "recv_any needs subscriptions of one client",
            )));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        first
            .inner
            .wait_for(deadline, |st| {
                let next = subs
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| st.peek_arrival(s.id).map(|a| (a, i)))
                    .min()?;
                st.take_or_revoked(subs[next.1].id).map(|r| r.map(|(_, ev)| (next.1, ev)))
            })?
            .transpose()
            .map_err(RecvError::Revoked)
    }

    /// Waits for the next event.
    pub fn recv(&self) -> Result<Event, RecvError> {
        self.inner.wait_for(None, self.take())?.expect("no deadline")
    }

    /// Waits up to `timeout` for the next event; `Ok(None)` if none came.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Event>, RecvError> {
        // One already here is taken without reading the clock (a stream's
        // reader takes most of its messages so).
        if let Some(got) = self.inner.ready(self.take()) {
            return got.map(Some);
        }
        match Instant::now().checked_add(timeout) {
            Some(deadline) => self.inner.wait_for(Some(deadline), self.take())?.transpose(),
            None => self.recv().map(Some),
        }
    }

    /// The next event if one is ready, reading what the socket holds
    /// without waiting.
    pub fn try_recv(&self) -> Result<Option<Event>, RecvError> {
        self.inner.wait_for(Some(Instant::now()), self.take())?.transpose()
    }

    /// Events until the connection ends or the broker revokes the
    /// subscription. The iterator yields the error that ended it, then
    /// stops.
    pub fn iter(&self) -> Iter<'_> {
        Iter { sub: self, done: false }
    }
}

/// The events of a [`Subscription`], from [`Subscription::iter`]: each
/// waits for the next one; after an error, it ends.
pub struct Iter<'a> {
    sub: &'a Subscription,
    done: bool,
}

impl Iterator for Iter<'_> {
    type Item = Result<Event, RecvError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.sub.recv();
        self.done = r.is_err();
        Some(r)
    }
}

impl<'a> IntoIterator for &'a Subscription {
    type Item = Result<Event, RecvError>;
    type IntoIter = Iter<'a>;
    fn into_iter(self) -> Iter<'a> {
        self.iter()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        {
            let mut st = self.inner.state.lock();
            let revoked = st.revocation(self.id).is_some();
            // Its queue goes now (closing any fds in it).
            st.remove_sub(self.id);
            if revoked {
                // The broker forgot it already, and sends nothing more
                // under its id: nothing to unsubscribe, nothing owed, so
                // the id is free now.
                return;
            }
            // Its id stays in use until the broker answers the
            // unsubscribe, since deliveries sent before it may still
            // arrive.
            st.sub_ids.owe(self.id);
        }
        // Best effort: if the connection is gone, so is the subscription.
        // Not across a reconnection: a subscription dropped meanwhile is
        // not renewed, so there is nothing to unsubscribe.
        if self.inner.send_once(&Unsubscribe { sub_id: self.id }).is_err() {
            // Nothing was sent (a packet goes whole or not at all).
            self.inner.state.lock().sub_ids.answered(self.id);
        }
    }
}
