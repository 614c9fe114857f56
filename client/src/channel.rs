//! Ring channels: hot streams through shared memory, with the broker out
//! of the data path.
//!
//! A `ChannelPublisher` writes into a lock-free broadcast ring the broker
//! created for it; each `ChannelSubscriber` reads the ring through a
//! read-only mapping, copying each message out (atomic word loads) into a
//! buffer of its own before it checks the slot's seqlock and hands the copy
//! to the caller. While both are busy no system call is made: a reader that
//! runs dry spins briefly, then registers as a waiter and sleeps on a futex
//! in the shared signal page, and the publisher calls `FUTEX_WAKE` only
//! when someone waits. A sleeping reader looks at its broker socket each
//! time it has found nothing for `MAX_SLEEP` (20 ms), so a dead broker is
//! an error, not a hang.
//!
//! Overflow: `Overwrite` never blocks the publisher; a reader it laps finds
//! out (by sequence numbers, and by re-checking each slot's seqlock after
//! copying it) and is told how many it missed. `Block` makes the publisher
//! wait for the slowest live reader's cursor; the broker tells the
//! publisher when readers join and leave (and a word in the ring header
//! that only the broker writes says when there is news), so a reader that
//! dies never holds it up, and one that joins late loses nothing.
//!
//! Everything read from shared memory is bounds-checked against the
//! geometry the broker announced; a hostile publisher can make a reader
//! report misses or corruption, never read out of bounds or panic.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use shmbus_proto::frame::{ChannelClose, ChannelOpen, ChannelOverflow, ChannelRole, ErrorCode};
use shmbus_proto::ring::protocol::{self, RingView};
use shmbus_proto::ring::shm::{CursorMap, RingMap, RingMapError};
use shmbus_proto::ring::{Geometry, ReadOutcome, ReaderState, WriterState};
use shmbus_proto::subject::{validate_subject, SubjectError};
use shmbus_proto::sync::Ordering;
use shmbus_proto::sys::futex;

use crate::client::Client;
use crate::connection::Grant;
use crate::error::{Disconnect, ErrorKind, RecvError};

/// How a publisher wants its ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelConfig {
    /// Largest message, in bytes.
    pub slot_size: u32,
    /// Messages the ring holds.
    pub slot_count: u32,
    pub overflow: ChannelOverflow,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig { slot_size: 1024, slot_count: 1024, overflow: ChannelOverflow::Overwrite }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("invalid channel subject: {0}")]
    InvalidSubject(#[from] SubjectError),
    #[error("the broker refused: {}", crate::error::Refusal(*code, message))]
    Refused { code: ErrorCode, message: String },
    #[error("message of {len} bytes does not fit a {slot_size}-byte slot")]
    TooLarge { len: usize, slot_size: u32 },
    #[error("cannot map the channel: {0}")]
    Map(#[from] RingMapError),
    #[error("the broker sent a malformed channel grant")]
    BadGrant,
    #[error("the channel is closed (its publisher closed or died)")]
    Closed,
    #[error("the ring holds data no honest publisher writes ({0}); skipped")]
    Corrupt(&'static str),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Disconnected(Disconnect),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl ChannelError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ChannelError::InvalidSubject(_) | ChannelError::TooLarge { .. } => ErrorKind::InvalidInput,
            ChannelError::Refused { code: ErrorCode::BrokerResource, .. } => ErrorKind::Unavailable,
            ChannelError::Refused { .. } => ErrorKind::Denied,
            ChannelError::Map(_) | ChannelError::Io(_) => ErrorKind::Io,
            ChannelError::BadGrant | ChannelError::Corrupt(_) => ErrorKind::Protocol,
            ChannelError::Closed | ChannelError::Disconnected(_) => ErrorKind::Disconnected,
            ChannelError::Timeout(_) => ErrorKind::Timeout,
        }
    }
}

impl From<RecvError> for ChannelError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Disconnected(d) => ChannelError::Disconnected(d),
            RecvError::Io(e) => ChannelError::Io(e),
        }
    }
}

/// What a subscriber gets.
#[derive(Debug, PartialEq, Eq)]
pub enum ChannelEvent<R> {
    /// Message `seq` (the publisher's count), and what the read closure
    /// made of its bytes.
    Message { seq: u64, value: R },
    /// This many messages were overwritten before they could be read.
    Missed(u64),
}

fn open(client: &Client, topic: &str, role: ChannelRole) -> Result<Grant, ChannelError> {
    validate_subject(topic)?;
    let inner = &client.inner;
    let req_id = {
        let mut st = inner.state.lock();
        let id = st.next_channel_id()?;
        st.awaiting_grant.insert(id);
        id
    };
    let result = (|| {
        inner.send(&ChannelOpen { req_id, topic, role }, &[])?;
        let deadline = Instant::now() + client.timeout();
        match inner.wait_for(Some(deadline), |st| st.grants.remove(&req_id))? {
            Some(Ok(grant)) => Ok(grant),
            Some(Err((code, message))) => Err(ChannelError::Refused { code, message }),
            None => Err(ChannelError::Timeout(client.timeout())),
        }
    })();
    let mut st = inner.state.lock();
    st.awaiting_grant.remove(&req_id);
    st.grants.remove(&req_id);
    result
}

/// Writes one ring channel.
pub struct ChannelPublisher {
    client: Client,
    channel_id: u64,
    map: RingMap,
    state: WriterState,
    block: bool,
    readers: Vec<(u32, CursorMap)>,
    /// The last reader-membership generation applied.
    applied: u32,
    /// Times it read its socket for news of readers.
    news_checks: u64,
}

impl std::fmt::Debug for ChannelPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelPublisher")
            .field("channel_id", &self.channel_id)
            .field("next", &self.state.next)
            .finish()
    }
}

/// Longest single sleep of a waiter: a bound on any missed wake-up, and
/// how long a reader finds nothing before it looks at its broker socket.
const MAX_SLEEP: Duration = Duration::from_millis(20);
/// Longest single sleep of a block-mode publisher waiting for room.
const PUBLISHER_SLEEP: Duration = Duration::from_millis(2);
/// Reads attempted before a reader goes to sleep.
const SPIN: u32 = 2000;

impl ChannelPublisher {
    pub(crate) fn open(client: &Client, topic: &str, config: ChannelConfig) -> Result<Self, ChannelError> {
        let role = ChannelRole::Publish {
            slot_size: config.slot_size,
            slot_count: config.slot_count,
            overflow: config.overflow,
        };
        let grant = open(client, topic, role)?;
        let g = grant.frame;
        let mapped = <[OwnedFd; 2]>::try_from(grant.fds).map_err(|_| ChannelError::BadGrant).and_then(
            |[ring, signal]| {
                let geometry = Geometry { slot_size: g.slot_size, slot_count: g.slot_count };
                Ok(RingMap::map(ring.as_fd(), signal.as_fd(), geometry, true)?)
            },
        );
        let map = match mapped {
            Ok(m) => m,
            Err(e) => {
                // Give the channel back rather than hold it open unusable.
                client.inner.state.lock().reader_events.remove(&g.channel_id);
                let _ = client.inner.send(&ChannelClose { channel_id: g.channel_id, reader_id: 0 }, &[]);
                return Err(e);
            }
        };
        Ok(ChannelPublisher {
            client: client.clone(),
            channel_id: g.channel_id,
            map,
            state: WriterState::default(),
            block: g.overflow == ChannelOverflow::Block,
            readers: Vec::new(),
            applied: 0,
            news_checks: 0,
        })
    }

    pub fn slot_size(&self) -> usize {
        self.map.geometry().slot_size as usize
    }

    /// Messages published so far.
    pub fn published(&self) -> u64 {
        self.state.next
    }

    /// Readers this publisher waits for (block mode).
    pub fn readers(&self) -> usize {
        self.readers.len()
    }

    /// Applies readers joining and leaving, reading what the broker sent.
    fn pump(&mut self) -> Result<(), ChannelError> {
        self.news_checks += 1;
        let inner = &self.client.inner;
        let _ = inner.wait_for(Some(Instant::now()), |_| None::<()>);
        let events: Vec<_> = {
            let mut st = inner.state.lock();
            if let Some(d) = &st.closed {
                return Err(ChannelError::Disconnected(d.clone()));
            }
            st.reader_events.get_mut(&self.channel_id).map(|q| q.drain(..).collect()).unwrap_or_default()
        };
        // Every piece of news is applied, even after one fails: a lost
        // leave would keep a dead reader in the set for ever.
        let mut failed = None;
        for ev in events {
            self.applied = ev.generation;
            if ev.joined {
                if let Some(fd) = ev.cursor {
                    match CursorMap::map(fd.as_fd(), false) {
                        Ok(c) => self.readers.push((ev.reader_id, c)),
                        Err(e) => failed = failed.or(Some(e)),
                    }
                }
            } else {
                self.readers.retain(|(id, _)| *id != ev.reader_id);
            }
        }
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Reads the broker's news about readers joining and leaving now.
    /// Publishing does this by itself; this is for waiting on a reader.
    pub fn update_readers(&mut self) -> Result<(), ChannelError> {
        self.pump()
    }

    /// How many times this publisher has read its socket for news of
    /// readers (for tests: a steady stream should not).
    #[doc(hidden)]
    pub fn news_checks(&self) -> u64 {
        self.news_checks
    }

    /// Applies the broker's news of readers if the ring header says there
    /// is some; in block mode, waits for it, so that a reader who joined
    /// (and whose start the broker read after telling us) is never lapped
    /// before we know its cursor (see `protocol::join`). In a steady
    /// stream this is one load and no system call.
    fn catch_up(&mut self) -> Result<(), ChannelError> {
        let target = protocol::members(&self.map);
        if target == self.applied {
            return Ok(());
        }
        self.pump()?;
        if !self.block {
            return Ok(());
        }
        let deadline = Instant::now() + self.client.timeout();
        while !protocol::caught_up(self.applied, target) {
            let now = Instant::now();
            if now >= deadline {
                return Err(ChannelError::Timeout(self.client.timeout()));
            }
            let id = self.channel_id;
            self.client.inner.wait_for(Some(deadline.min(now + PUBLISHER_SLEEP)), |st| {
                st.reader_events.get(&id).is_some_and(|q| !q.is_empty()).then_some(())
            })?;
            self.pump()?;
        }
        Ok(())
    }

    /// Block mode: waits until the next slot is free of every live reader.
    fn wait_for_room(&mut self) -> Result<(), ChannelError> {
        self.catch_up()?;
        if !self.block {
            return Ok(());
        }
        let count = self.map.geometry().slot_count;
        loop {
            if protocol::slot_free(&self.state, count, self.readers.iter().map(|(_, c)| c.cursor())) {
                return Ok(());
            }
            let cursors = self.readers.iter().map(|(_, c)| c.cursor());
            let slept = match protocol::prepare_publisher_wait(&self.map, &self.state, cursors) {
                Some(seen) => futex::wait(&self.map.signal().progress, seen, Some(PUBLISHER_SLEEP)),
                None => Ok(()),
            };
            protocol::end_publisher_wait(&self.map);
            slept?;
            // A reader may have left (or joined).
            self.catch_up()?;
        }
    }

    fn wake_readers(&self) {
        protocol::bump_wake(&self.map);
        let _ = futex::wake_all(&self.map.signal().wake);
    }

    /// Publishes `bytes` (at most the slot size).
    pub fn publish(&mut self, bytes: &[u8]) -> Result<(), ChannelError> {
        let slot_size = self.map.geometry().slot_size;
        if bytes.len() > slot_size as usize {
            return Err(ChannelError::TooLarge { len: bytes.len(), slot_size });
        }
        self.wait_for_room()?;
        if protocol::publish(&mut self.map, &mut self.state, bytes) {
            self.wake_readers();
        }
        Ok(())
    }

    /// The next slot, to write in place; [`ChannelLoan::send`] publishes it.
    pub fn loan(&mut self) -> Result<ChannelLoan<'_>, ChannelError> {
        self.wait_for_room()?;
        let index = protocol::begin_write(&self.map, &self.state);
        Ok(ChannelLoan { publisher: self, index, sent: false })
    }

    /// The ring's mapping, for tests that play a hostile publisher.
    #[doc(hidden)]
    pub fn ring_map_mut(&mut self) -> &mut shmbus_proto::ring::shm::RingMap {
        &mut self.map
    }
}

impl Drop for ChannelPublisher {
    fn drop(&mut self) {
        self.map.close();
        // Forget the channel's news, and any cursor fds still queued in it.
        self.client.inner.state.lock().reader_events.remove(&self.channel_id);
        let _ = self.client.inner.send(&ChannelClose { channel_id: self.channel_id, reader_id: 0 }, &[]);
    }
}

/// A slot being written in place. Dropping it unsent publishes nothing.
pub struct ChannelLoan<'a> {
    publisher: &'a mut ChannelPublisher,
    index: usize,
    sent: bool,
}

impl ChannelLoan<'_> {
    /// Publishes the first `len` bytes of the slot.
    pub fn send(mut self, len: usize) -> Result<(), ChannelError> {
        let slot_size = self.publisher.map.geometry().slot_size;
        if len > slot_size as usize {
            return Err(ChannelError::TooLarge { len, slot_size });
        }
        self.sent = true;
        let p = &mut *self.publisher;
        if protocol::commit(&p.map, &mut p.state, self.index, len as u32) {
            p.wake_readers();
        }
        Ok(())
    }
}

impl std::ops::Deref for ChannelLoan<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.publisher.map.slot_data(self.index)
    }
}

impl std::ops::DerefMut for ChannelLoan<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.publisher.map.slot_data_mut(self.index)
    }
}

impl Drop for ChannelLoan<'_> {
    fn drop(&mut self) {
        if !self.sent {
            // Not sent: head never moved, and the slot stays marked as being
            // written, so a reader that wanted the message it held before
            // (overwrite mode) counts that one missed, never reads it torn.
            protocol::abandon_write(&self.publisher.map, &self.publisher.state, self.index);
        }
    }
}

/// Reads one ring channel.
pub struct ChannelSubscriber {
    client: Client,
    ring_fd: OwnedFd,
    signal_fd: OwnedFd,
    channel_id: u64,
    reader_id: u32,
    map: RingMap,
    cursor: CursorMap,
    state: ReaderState,
    block: bool,
    spin: u32,
    /// Where each message is copied (checked, then handed to the caller).
    buf: Vec<u8>,
}

impl std::fmt::Debug for ChannelSubscriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSubscriber")
            .field("channel_id", &self.channel_id)
            .field("reader_id", &self.reader_id)
            .field("next", &self.state.next)
            .finish()
    }
}

impl ChannelSubscriber {
    pub(crate) fn open(client: &Client, topic: &str) -> Result<Self, ChannelError> {
        let grant = open(client, topic, ChannelRole::Subscribe)?;
        let g = grant.frame;
        let mapped = <[OwnedFd; 3]>::try_from(grant.fds).map_err(|_| ChannelError::BadGrant).and_then(
            |[ring, signal, cursor]| {
                let geometry = Geometry { slot_size: g.slot_size, slot_count: g.slot_count };
                let map = RingMap::map(ring.as_fd(), signal.as_fd(), geometry, false)?;
                let cursor = CursorMap::map(cursor.as_fd(), true)?;
                Ok((ring, signal, map, cursor))
            },
        );
        let (ring, signal, map, cursor) = match mapped {
            Ok(m) => m,
            Err(e) => {
                // Leave the cursor set, so a block-mode publisher does not
                // wait for a reader that never came.
                let close = ChannelClose { channel_id: g.channel_id, reader_id: g.reader_id };
                let _ = client.inner.send(&close, &[]);
                return Err(e);
            }
        };
        // A late joiner starts where the broker put its cursor: the head
        // when it joined.
        // Acquire: pairs with the broker's Release store in `join_reader`.
        let next = cursor.cursor().next.load(Ordering::Acquire);
        Ok(ChannelSubscriber {
            client: client.clone(),
            ring_fd: ring,
            signal_fd: signal,
            channel_id: g.channel_id,
            reader_id: g.reader_id,
            map,
            cursor,
            state: ReaderState { next },
            block: g.overflow == ChannelOverflow::Block,
            spin: SPIN,
            buf: vec![0; g.slot_size as usize],
        })
    }

    /// How many read attempts `recv` makes before it sleeps on the futex
    /// (default 2000, a few microseconds). 0 sleeps at once; `u32::MAX`
    /// busy-polls.
    pub fn set_spin(&mut self, attempts: u32) {
        self.spin = attempts;
    }

    /// The sequence number of the next message this reader will look at.
    pub fn position(&self) -> u64 {
        self.state.next
    }

    fn advance(&mut self) {
        if self.block && protocol::advance(&self.map, self.cursor.cursor(), &self.state) {
            protocol::bump_progress(&self.map);
            let _ = futex::wake_all(&self.map.signal().progress);
        }
    }

    /// Reads the next message with `read`, if there is one.
    ///
    /// The message is first copied out of shared memory into this reader's
    /// own buffer (a hostile or lapping publisher may be writing the slot at
    /// that very moment), then the slot's seqlock is checked, and only a
    /// copy that passed is handed to `read`: the bytes `read` sees are this
    /// message's and cannot change while it looks at them. A message
    /// overwritten while being copied is counted as missed and `read` is
    /// not called. Corruption is reported as an error and skipped.
    pub fn try_recv<R>(
        &mut self,
        read: impl FnMut(&[u8]) -> R,
    ) -> Result<Option<ChannelEvent<R>>, ChannelError> {
        let mut read = read;
        match protocol::try_read(&self.map, &mut self.state, &mut self.buf, &mut read) {
            ReadOutcome::Empty => {
                if self.map.is_closed() {
                    // One more look: the last messages before the close.
                    return match protocol::try_read(&self.map, &mut self.state, &mut self.buf, &mut read) {
                        ReadOutcome::Empty => Err(ChannelError::Closed),
                        other => self.outcome(other),
                    };
                }
                Ok(None)
            }
            other => self.outcome(other),
        }
    }

    fn outcome<R>(&mut self, o: ReadOutcome<R>) -> Result<Option<ChannelEvent<R>>, ChannelError> {
        self.advance();
        match o {
            ReadOutcome::Empty => Ok(None),
            ReadOutcome::Message { seq, value } => Ok(Some(ChannelEvent::Message { seq, value })),
            ReadOutcome::Missed(k) => {
                // Relaxed: a statistic for introspection; pairs with nothing.
                self.map.signal().overruns.fetch_add(k, Ordering::Relaxed);
                Ok(Some(ChannelEvent::Missed(k)))
            }
            ReadOutcome::Corrupt(what) => Err(ChannelError::Corrupt(what)),
        }
    }

    /// Waits for the next message (spinning briefly, then sleeping on the
    /// futex) and reads it with `read`, as [`ChannelSubscriber::try_recv`]
    /// does. Fails with [`ChannelError::Disconnected`] if the broker goes
    /// away while it waits (checked after every 20 ms without a message).
    pub fn recv<R>(&mut self, read: impl FnMut(&[u8]) -> R) -> Result<ChannelEvent<R>, ChannelError> {
        let mut read = read;
        loop {
            if let Some(ev) = self.recv_timeout(Duration::from_secs(3600), &mut read)? {
                return Ok(ev);
            }
        }
    }

    /// [`ChannelSubscriber::recv`], giving up after `timeout` (`Ok(None)`).
    pub fn recv_timeout<R>(
        &mut self,
        timeout: Duration,
        read: impl FnMut(&[u8]) -> R,
    ) -> Result<Option<ChannelEvent<R>>, ChannelError> {
        let mut read = read;
        let deadline = Instant::now() + timeout;
        for i in 0..self.spin {
            if let Some(ev) = self.try_recv(&mut read)? {
                return Ok(Some(ev));
            }
            std::hint::spin_loop();
            if i % 1024 == 1023 && Instant::now() >= deadline {
                return Ok(None);
            }
        }
        let mut idle_since = Instant::now();
        loop {
            if let Some(ev) = self.try_recv(&mut read)? {
                return Ok(Some(ev));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.sleep(left.min(MAX_SLEEP))?;
            // Nothing for a while: is the broker still there? (A publisher
            // that died after its broker leaves the ring open for ever.)
            if idle_since.elapsed() >= MAX_SLEEP {
                self.check_broker()?;
                idle_since = Instant::now();
            }
        }
    }

    /// Sleeps until the publisher may have published (or `max` passes).
    fn sleep(&self, max: Duration) -> Result<(), ChannelError> {
        let slept = match protocol::prepare_sleep(&self.map, &self.state) {
            Some(seen) => futex::wait(&self.map.signal().wake, seen, Some(max)),
            None => Ok(()),
        };
        protocol::end_sleep(&self.map);
        Ok(slept?)
    }

    /// Fails if the connection to the broker has ended (reading whatever
    /// it holds, without blocking).
    fn check_broker(&self) -> Result<(), ChannelError> {
        match self.client.inner.wait_for(Some(Instant::now()), |st| st.closed.clone())? {
            Some(d) => Err(ChannelError::Disconnected(d)),
            None => Ok(()),
        }
    }

    /// Like `try_recv`, copying the message out.
    pub fn try_recv_vec(&mut self) -> Result<Option<ChannelEvent<Vec<u8>>>, ChannelError> {
        self.try_recv(<[u8]>::to_vec)
    }

    /// Like `recv_timeout`, copying the message out.
    pub fn recv_vec_timeout(
        &mut self,
        timeout: Duration,
    ) -> Result<Option<ChannelEvent<Vec<u8>>>, ChannelError> {
        self.recv_timeout(timeout, <[u8]>::to_vec)
    }

    /// The ring fd this reader was given, for tests of its permissions.
    #[doc(hidden)]
    pub fn ring_fd_for_tests(&self) -> BorrowedFd<'_> {
        self.ring_fd.as_fd()
    }

    /// The signal page fd this reader was given (writable: readers must
    /// register as waiters), for tests that play a hostile reader.
    #[doc(hidden)]
    pub fn signal_fd_for_tests(&self) -> BorrowedFd<'_> {
        self.signal_fd.as_fd()
    }
}

impl Drop for ChannelSubscriber {
    fn drop(&mut self) {
        let close = ChannelClose { channel_id: self.channel_id, reader_id: self.reader_id };
        let _ = self.client.inner.send(&close, &[]);
    }
}
