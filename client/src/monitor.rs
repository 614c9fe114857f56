//! `Monitor`: an administrator's view of what passes through the broker.
//!
//! A monitor is a subscription the broker feeds itself: each event it sees
//! (a publish, a request, an answer, a refusal, a connect or disconnect, a
//! subscription or a name change) whose subject matches the monitor's
//! patterns arrives as an ordinary delivery on the monitor's subscription
//! id, whose payload is a postcard `MonitorEvent` and whose sender is who
//! caused it. So a monitor shares the subscription machinery: its id, its
//! bounded queue, its gaps, its revocation, and its unsubscribe on drop.
//! This module only reads the events back into [`BusEvent`]s.

use std::time::Duration;

use shmbus_proto::frame::{MonitorEvent, MonitorKind};

use crate::error::MonitorError;
use crate::message::{Event, Message, Sender};
use crate::subscription::Subscription;

/// One event the broker saw, as a monitor receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusEvent {
    /// What happened: a publish, a request, an answer, a subscription, a
    /// connection, a refusal...
    pub kind: MonitorKind,
    /// The topic of a publish, the name of a request, answer or name
    /// change, the pattern of a subscription; empty for events without
    /// one (connect, disconnect, most refusals).
    pub subject: String,
    /// Who caused it, as the broker stamped it: the publisher, the caller,
    /// the service that answered (the broker itself, client id 0, for an
    /// answer it gave), the client that connected.
    pub sender: Sender,
    /// Client ids it reached: a publish's subscribers, a request's
    /// service, an answer's caller.
    pub receivers: Vec<u64>,
    /// A word from the broker: an answer's outcome, a refusal, a client's
    /// name. Text from the broker, which may quote a client: escape it
    /// before showing it.
    pub detail: String,
    /// The whole payload's length, in bytes.
    pub payload_len: u64,
    /// The payload travelled as a memfd: the broker never maps those, so
    /// [`BusEvent::payload`] is empty.
    pub memfd: bool,
    /// The inline payload, or its first 256 bytes unless the monitor asked
    /// for whole payloads (see [`BusEvent::payload_is_cut`]).
    pub payload: Vec<u8>,
    /// The monitor's own count of the events the broker offered monitors:
    /// it grows with every event; a jump is not a loss (other monitors'
    /// events count too), a [`MonitorItem::Gap`] is.
    pub seq: u64,
}

impl BusEvent {
    /// Whether [`BusEvent::payload`] holds less than the whole inline
    /// payload (the broker cut it to its excerpt).
    pub fn payload_is_cut(&self) -> bool {
        !self.memfd && (self.payload.len() as u64) < self.payload_len
    }

    /// Reads a monitor's delivery back into the event it carries.
    fn from_message(m: &Message) -> Result<BusEvent, MonitorError> {
        let malformed = |detail: String| MonitorError::Malformed { seq: m.seq(), detail };
        let bytes = m.try_payload().map_err(|e| malformed(format!("its payload cannot be mapped: {e}")))?;
        let e = MonitorEvent::from_bytes(bytes).map_err(|e| malformed(e.to_string()))?;
        Ok(BusEvent {
            kind: e.kind,
            subject: m.topic().to_owned(),
            sender: m.sender(),
            receivers: e.receivers,
            detail: e.detail,
            payload_len: e.payload_len,
            memfd: e.memfd,
            payload: e.payload,
            seq: m.seq(),
        })
    }
}

/// What a [`Monitor`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonitorItem {
    /// An event the broker saw.
    Event(BusEvent),
    /// `missed` events were lost at this point because the monitor fell
    /// behind (in the broker's queue, or this process's).
    Gap {
        /// How many events were lost.
        missed: u64,
    },
    /// The connection was lost and made again, and the monitor renewed:
    /// events in between were not seen.
    Reconnected,
}

/// A live monitor, from [`crate::Client::monitor`]. Dropping it stops it.
pub struct Monitor {
    sub: Subscription,
    patterns: Vec<String>,
    full: bool,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor").field("patterns", &self.patterns).field("full", &self.full).finish()
    }
}

impl Monitor {
    pub(crate) fn new(sub: Subscription, patterns: Vec<String>, full: bool) -> Monitor {
        Monitor { sub, patterns, full }
    }

    /// The patterns it watches (empty: everything).
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether it receives whole inline payloads rather than excerpts.
    pub fn full(&self) -> bool {
        self.full
    }

    /// Why the broker ended this monitor, if it did (a policy reload took
    /// the `monitor` right away). The events before it are still taken
    /// first; then every receive fails with [`MonitorError::Revoked`].
    pub fn revocation(&self) -> Option<String> {
        self.sub.revocation()
    }

    fn item(ev: Event) -> Result<MonitorItem, MonitorError> {
        match ev {
            Event::Message(m) => BusEvent::from_message(&m).map(MonitorItem::Event),
            Event::Gap { missed } => Ok(MonitorItem::Gap { missed }),
            Event::Reconnected => Ok(MonitorItem::Reconnected),
        }
    }

    /// Waits for the next event. An event that cannot be read is an error
    /// ([`MonitorError::Malformed`]) that loses only that event.
    pub fn recv(&self) -> Result<MonitorItem, MonitorError> {
        Monitor::item(self.sub.recv()?)
    }

    /// Waits up to `timeout` for the next event; `Ok(None)` if none came.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<MonitorItem>, MonitorError> {
        self.sub.recv_timeout(timeout)?.map(Monitor::item).transpose()
    }

    /// The next event if one is ready, reading what the socket holds
    /// without waiting.
    pub fn try_recv(&self) -> Result<Option<MonitorItem>, MonitorError> {
        self.sub.try_recv()?.map(Monitor::item).transpose()
    }

    /// Events until the monitor ends (the connection ends, or the broker
    /// revokes it): the iterator yields the error that ended it, then
    /// stops. A malformed event is yielded as an error too, and the
    /// iterator goes on after it (see [`MonitorError::ends_monitor`]).
    pub fn iter(&self) -> MonitorIter<'_> {
        MonitorIter { monitor: self, done: false }
    }
}

/// The items of a [`Monitor`], until it ends.
pub struct MonitorIter<'a> {
    monitor: &'a Monitor,
    done: bool,
}

impl Iterator for MonitorIter<'_> {
    type Item = Result<MonitorItem, MonitorError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.monitor.recv();
        self.done = r.as_ref().is_err_and(MonitorError::ends_monitor);
        Some(r)
    }
}

impl<'a> IntoIterator for &'a Monitor {
    type Item = Result<MonitorItem, MonitorError>;
    type IntoIter = MonitorIter<'a>;
    fn into_iter(self) -> MonitorIter<'a> {
        self.iter()
    }
}
