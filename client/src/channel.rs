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
//!
//! Across a reconnection (the broker restarted): the ring needs no broker,
//! so while the broker is away both ends go on with it. Once the client
//! has made its connection again, a publisher opens its channel anew on
//! the new broker at its next publish (a new ring; dropping the old one
//! closes it), and a reader that finds its ring closed, or sits idle,
//! opens the topic again once its publisher is back, telling the caller
//! with [`ChannelEvent::Reconnected`] (messages in between are missed, and
//! how many cannot be known). A reader waits for the publisher up to the
//! client's timeout after the reconnection, then ends as `Closed`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::error::check_subject;
use shmbus_proto::frame::{ChannelClose, ChannelOpen, ChannelOverflow, ChannelRole, ErrorCode};
use shmbus_proto::ring::layout::ENDED_CLOSED;
use shmbus_proto::ring::protocol::{self, RingView};
use shmbus_proto::ring::shm::{CursorMap, RingMap, RingMapError};
use shmbus_proto::ring::{Geometry, ReadOutcome, ReaderState, WriterState};
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
    /// What happens when the ring is full: overwrite the oldest message
    /// (readers that fall behind are told how many they missed), or block
    /// the publisher until the slowest reader has read it.
    pub overflow: ChannelOverflow,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig { slot_size: 1024, slot_count: 1024, overflow: ChannelOverflow::Overwrite }
    }
}

/// Why a ring channel operation failed: opening a [`ChannelPublisher`] or
/// [`ChannelSubscriber`], publishing, or reading.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The topic is not a valid subject. Nothing was sent.
    #[error("invalid channel subject: {0}")]
    InvalidSubject(#[from] crate::error::BadSubject),
    /// The broker would not open the channel: e.g. [`ErrorCode::ChannelBusy`]
    /// (it already has a publisher), [`ErrorCode::NoSuchChannel`] (no
    /// publisher to read from yet; retry once there is one), its policy,
    /// or a quota.
    #[error("the broker refused: {}", crate::error::Refusal(*code, message))]
    Refused {
        /// The broker's reason.
        code: ErrorCode,
        /// The broker's own words; may be empty.
        message: String,
    },
    /// The message is longer than the ring's slots; nothing was published.
    #[error("message of {len} bytes does not fit a {slot_size}-byte slot")]
    TooLarge {
        /// The message's length, in bytes.
        len: usize,
        /// The ring's slot size, in bytes.
        slot_size: u32,
    },
    /// The ring the broker granted could not be mapped (a bad geometry, a
    /// memfd of the wrong size or unsealed, out of address space). The
    /// channel is given back.
    #[error("cannot map the channel: {0}")]
    Map(#[from] RingMapError),
    /// The broker's grant came with the wrong number of fds. The channel
    /// is given back.
    #[error("the broker sent a malformed channel grant")]
    BadGrant,
    /// The ring is closed and the broker gave no policy reason: its
    /// publisher closed it or died (a reader sees this once it has read
    /// every message before the close). Nothing more will come on this
    /// handle; open the topic again for a new ring.
    #[error("the channel is closed (its publisher closed or died)")]
    Closed,
    /// The broker closed the channel for every member because a reloaded
    /// policy no longer allows this client (or another member) to use it;
    /// the string is the broker's reason. Whoever may still use the topic
    /// can open it again (and gets a new ring).
    #[error("the channel was closed by the broker: {0}")]
    Revoked(String),
    /// A slot held data no honest publisher writes (the string says
    /// what); the slot is skipped, and reading may go on.
    #[error("the ring holds data no honest publisher writes ({0}); skipped")]
    Corrupt(&'static str),
    /// No answer from the broker within the client's timeout (the
    /// duration): to an open, or, in block mode, to news of a reader that
    /// joined. Retrying may succeed.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The connection to the broker ended for good; the
    /// [`Disconnect`] says why.
    #[error("{0}")]
    Disconnected(Disconnect),
    /// An operating-system error (on the connection, waiting on the
    /// ring's futex), or every channel request id of this connection in
    /// use.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

impl ChannelError {
    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ChannelError::InvalidSubject(_) | ChannelError::TooLarge { .. } => ErrorKind::InvalidInput,
            // As every other refusal: `Denied` (by policy, or a `$SYS`
            // topic) is `Denied`, a quota `LimitExceeded`, a shortage in
            // the broker `Unavailable`.
            ChannelError::Refused { code, .. } => crate::error::code_kind(*code),
            ChannelError::Map(_) | ChannelError::Io(_) => ErrorKind::Io,
            ChannelError::BadGrant | ChannelError::Corrupt(_) => ErrorKind::Protocol,
            ChannelError::Closed | ChannelError::Disconnected(_) => ErrorKind::Disconnected,
            ChannelError::Revoked(_) => ErrorKind::Denied,
            ChannelError::Timeout(_) => ErrorKind::Timeout,
        }
    }
}

impl From<RecvError> for ChannelError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Disconnected(d) => ChannelError::Disconnected(d),
            RecvError::Io(e) => ChannelError::Io(e),
            RecvError::Revoked(r) => ChannelError::Revoked(r),
        }
    }
}

/// What a subscriber gets.
#[derive(Debug, PartialEq, Eq)]
pub enum ChannelEvent<R> {
    /// Message `seq` (the publisher's count), and what the read closure
    /// made of its bytes.
    Message {
        /// The message's sequence number.
        seq: u64,
        /// What the read closure returned for it.
        value: R,
    },
    /// This many messages were overwritten before they could be read.
    Missed(u64),
    /// The connection to the broker was made again and the channel opened
    /// anew (its publisher came back): what was published in between was
    /// missed, and how much cannot be known.
    Reconnected,
}

/// Gives a handle back to the broker that granted it (connection
/// `generation`), never to another.
fn give_back(client: &Client, generation: u64, channel_id: u64, reader_id: u32) {
    if let Ok(head) = shmbus_proto::frame::encode_head(&ChannelClose { channel_id, reader_id }) {
        let _ = client.inner.send_frame_on(generation, &head, &[], &[]);
    }
}

/// What a reader does after a reconnection (see `ChannelSubscriber::follow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Follow {
    Stay,
    Waiting,
    Moved,
}

fn open(client: &Client, topic: &str, role: ChannelRole) -> Result<Grant, ChannelError> {
    check_subject(topic)?;
    let inner = &client.inner;
    let req_id = {
        let mut st = inner.state.lock();
        let id = st.next_channel_id()?;
        st.awaiting_grant.insert(id);
        id
    };
    let result = (|| {
        let sent_on = inner.send(&ChannelOpen { req_id, topic, role }, &[])?;
        let deadline = Instant::now() + client.timeout();
        match inner.wait_answer(Some(deadline), sent_on, |st| st.grants.remove(&req_id))? {
            Some(Ok(grant)) => Ok(grant),
            Some(Err((code, message))) => Err(ChannelError::Refused { code, message }),
            None => Err(ChannelError::Timeout(client.timeout())),
        }
    })();
    let mut st = inner.state.lock();
    st.awaiting_grant.remove(&req_id);
    if let Some(Ok(late)) = st.grants.remove(&req_id) {
        // Granted, and then the wait failed: the handle is not kept.
        st.release_channel(late.frame.channel_id);
    }
    result
}

/// What became of a ring this client saw closed: the broker's reason if
/// it revoked the channel, else `None` (its publisher closed it or died).
///
/// The broker marks the ring closed and queues its `Revoked` notice in one
/// step, so the notice may not have reached our socket yet when the mark
/// is seen. A ping settles it: its `Pong` comes after every frame queued
/// before the ping was handled, notice included. One round trip, once per
/// closed handle.
fn closure_reason(client: &Client, channel_id: u64) -> Option<String> {
    let known = |c: &Client| c.inner.state.lock().revoked_channels.get(&channel_id).cloned();
    if let Some(reason) = known(client) {
        return Some(reason);
    }
    // A failed ping (the broker gone) leaves no notice to wait for.
    let _ = client.ping();
    known(client)
}

/// The error for a handle on a closed ring: [`ChannelError::Revoked`] if
/// the broker revoked it, else [`ChannelError::Closed`]. `closure` caches
/// what [`closure_reason`] found.
fn closed_error(client: &Client, channel_id: u64, closure: &mut Option<Option<String>>) -> ChannelError {
    match closure.get_or_insert_with(|| closure_reason(client, channel_id)) {
        Some(reason) => ChannelError::Revoked(reason.clone()),
        None => ChannelError::Closed,
    }
}

/// Writes one ring channel.
pub struct ChannelPublisher {
    client: Client,
    topic: String,
    config: ChannelConfig,
    /// The connection generation it was opened on (see the module notes).
    generation: u64,
    channel_id: u64,
    map: RingMap,
    state: WriterState,
    block: bool,
    readers: Vec<(u32, CursorMap)>,
    /// The last reader-membership generation applied.
    applied: u32,
    /// Times it read its socket for news of readers.
    news_checks: u64,
    /// Once the ring is seen closed (only the broker closes it under a
    /// live publisher: a revocation): the broker's reason, if it gave one.
    closure: Option<Option<String>>,
    /// Replaced after a reconnection: its handle belonged to the old
    /// broker, and the new one may use the same ids for others.
    stale: bool,
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
        // The grant's own: a reconnection during the open must not leave
        // this handle believing it belongs to an older broker.
        let generation = grant.generation;
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
                let mut st = client.inner.state.lock();
                st.reader_events.remove(&g.channel_id);
                st.release_channel(g.channel_id);
                drop(st);
                give_back(client, generation, g.channel_id, 0);
                return Err(e);
            }
        };
        Ok(ChannelPublisher {
            client: client.clone(),
            topic: topic.to_owned(),
            config,
            generation,
            channel_id: g.channel_id,
            map,
            state: WriterState::default(),
            block: g.overflow == ChannelOverflow::Block,
            readers: Vec::new(),
            applied: 0,
            news_checks: 0,
            closure: None,
            stale: false,
        })
    }

    /// The ring's slot size: the largest message it takes, in bytes (as
    /// the broker granted it).
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

    /// Fails if the ring was closed under us: the broker revoked the
    /// channel ([`ChannelError::Revoked`]). One load, no system call,
    /// while it is open.
    fn check_open(&mut self) -> Result<(), ChannelError> {
        if !self.map.is_closed() {
            return Ok(());
        }
        Err(closed_error(&self.client, self.channel_id, &mut self.closure))
    }

    /// Block mode: waits until the next slot is free of every live reader.
    /// Either mode: fails if the ring was closed.
    fn wait_for_room(&mut self) -> Result<(), ChannelError> {
        // Relaxed: a hint; `open` asks the connection itself.
        if self.client.inner.generation.load(Ordering::Relaxed) != self.generation {
            // The connection was made again: open the channel on the new
            // broker. The old ring closes as this one drops, and its
            // readers follow.
            let new = ChannelPublisher::open(&self.client, &self.topic, self.config)?;
            std::mem::replace(self, new).stale = true;
        }
        self.check_open()?;
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
            // Readers stop for good once the ring is closed.
            self.check_open()?;
            // A reader may have left (or joined).
            self.catch_up()?;
        }
    }

    fn wake_readers(&self) {
        protocol::bump_wake(&self.map);
        let _ = futex::wake_all(&self.map.signal().wake);
    }

    /// Publishes `bytes` (at most the slot size). Fails with
    /// [`ChannelError::Revoked`] once the broker closed the channel by
    /// policy.
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
        // Relaxed: a hint; a handle of an older connection has nothing to
        // give back to the broker of this one, which may use its ids.
        if self.stale || self.generation != self.client.inner.generation.load(Ordering::Relaxed) {
            // Its ids are the old broker's; the new one may have given
            // them to its successor.
            self.client.inner.state.lock().release_channel(self.channel_id);
            return;
        }
        {
            // Forget the channel's news, and any cursor fds still queued in it.
            let mut st = self.client.inner.state.lock();
            st.reader_events.remove(&self.channel_id);
            st.release_channel(self.channel_id);
        }
        let _ = self.client.inner.send_once(&ChannelClose { channel_id: self.channel_id, reader_id: 0 });
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
    topic: String,
    /// The connection generation it was opened on.
    generation: u64,
    /// Since when it has waited for its publisher to come back after a
    /// reconnection.
    following_since: Option<Instant>,
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
    /// Once the ring is seen closed and drained: the broker's reason if it
    /// revoked the channel, `None` if its publisher closed it.
    closure: Option<Option<String>>,
    /// Replaced after a reconnection (as a publisher's `stale`).
    stale: bool,
    /// Once the broker ended the channel as closed (`ENDED_CLOSED` in our
    /// cursor page): how many more reads (messages, missed runs) we take.
    reads_left: Option<u64>,
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
        let generation = grant.generation;
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
                client.inner.state.lock().release_channel(g.channel_id);
                let _ = close;
                give_back(client, generation, g.channel_id, g.reader_id);
                return Err(e);
            }
        };
        // A late joiner starts where the broker put its cursor: the head
        // when it joined.
        // Acquire: pairs with the broker's Release store in `join_reader`.
        let next = cursor.cursor().next.load(Ordering::Acquire);
        Ok(ChannelSubscriber {
            client: client.clone(),
            topic: topic.to_owned(),
            generation,
            following_since: None,
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
            closure: None,
            stale: false,
            reads_left: None,
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
    ///
    /// Once the ring is closed and every message before the close is read:
    /// [`ChannelError::Closed`], or [`ChannelError::Revoked`] with the
    /// broker's reason if it closed the channel by policy (the first time,
    /// this costs one round trip to the broker to be sure of it).
    pub fn try_recv<R>(
        &mut self,
        read: impl FnMut(&[u8]) -> R,
    ) -> Result<Option<ChannelEvent<R>>, ChannelError> {
        let mut read = read;
        if self.ended_here() {
            // The broker ended the channel and what it lets us read is
            // read: the end, whatever the ring (its publisher's to write)
            // says.
            return match self.follow()? {
                Follow::Moved => Ok(Some(ChannelEvent::Reconnected)),
                Follow::Waiting => Ok(None),
                Follow::Stay => Err(closed_error(&self.client, self.channel_id, &mut self.closure)),
            };
        }
        match protocol::try_read(&self.map, &mut self.state, &mut self.buf, &mut read) {
            ReadOutcome::Empty => {
                if self.map.is_closed() || self.cursor.ended().0 != 0 {
                    // One more look: the last messages before the close.
                    return match protocol::try_read(&self.map, &mut self.state, &mut self.buf, &mut read) {
                        ReadOutcome::Empty => match self.follow()? {
                            Follow::Moved => Ok(Some(ChannelEvent::Reconnected)),
                            Follow::Waiting => Ok(None),
                            Follow::Stay => {
                                Err(closed_error(&self.client, self.channel_id, &mut self.closure))
                            }
                        },
                        other => self.outcome(other),
                    };
                }
                Ok(None)
            }
            other => self.outcome(other),
        }
    }

    /// Whether the broker ended the channel (in our cursor page, which its
    /// publisher cannot write) and we may read no more: at once if it was
    /// revoked; if it was closed, once every message before the head at
    /// the close is read, or `slot_count + 1` reads after we first saw it
    /// (all an honest publisher can have left in the ring; a publisher
    /// that left but still writes its ring, or lied about its head, adds
    /// no more than that).
    fn ended_here(&mut self) -> bool {
        match self.cursor.ended() {
            (0, _) => false,
            (ENDED_CLOSED, end_at) => {
                let reads = u64::from(self.map.geometry().slot_count) + 1;
                self.state.next >= end_at || *self.reads_left.get_or_insert(reads) == 0
            }
            // Revoked, or a value no broker writes (our own page: only we
            // could have put it there).
            _ => true,
        }
    }

    fn outcome<R>(&mut self, o: ReadOutcome<R>) -> Result<Option<ChannelEvent<R>>, ChannelError> {
        self.advance();
        if let Some(left) = &mut self.reads_left {
            *left = left.saturating_sub(1);
        }
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
                // Made again meanwhile: the publisher may have moved.
                if self.client.inner.generation.load(Ordering::Relaxed) != self.generation
                    && self.follow()? == Follow::Moved
                {
                    return Ok(Some(ChannelEvent::Reconnected));
                }
                idle_since = Instant::now();
            }
        }
    }

    /// Sleeps until the publisher may have published (or `max` passes).
    fn sleep(&self, max: Duration) -> Result<(), ChannelError> {
        let slept = match protocol::prepare_sleep(&self.map, &self.state) {
            // The broker ends a channel in our cursor page before it bumps
            // `wake`: a bump `seen` holds comes with the end (the Acquire
            // in `prepare_sleep` pairs with its Release), and one it does
            // not hold fails the wait. (`closed` in the ring, which
            // `prepare_sleep` looks at, the publisher may have put back.)
            Some(_) if self.cursor.ended().0 != 0 => Ok(()),
            Some(seen) => futex::wait(&self.map.signal().wake, seen, Some(max)),
            None => Ok(()),
        };
        protocol::end_sleep(&self.map);
        Ok(slept?)
    }

    /// Fails if the connection to the broker has ended (reading whatever
    /// it holds, without blocking; while it is lost, waiting up to
    /// `MAX_SLEEP` so that a reconnection attempt can be made).
    fn check_broker(&self) -> Result<(), ChannelError> {
        match self.client.inner.wait_for(Some(self.poke_deadline()), |st| st.closed.clone())? {
            Some(d) => Err(ChannelError::Disconnected(d)),
            None => Ok(()),
        }
    }

    /// How long a look at the connection may take: nothing while it is
    /// well (a reader's wake-ups must not wait on it), `MAX_SLEEP` while
    /// it is lost (room for a reconnection attempt's handshake).
    fn poke_deadline(&self) -> Instant {
        if self.client.inner.state.lock().lost.is_some() {
            Instant::now() + MAX_SLEEP
        } else {
            Instant::now()
        }
    }

    /// After a reconnection, opens the topic again on the new broker if
    /// its publisher is back ([`Follow::Moved`]: this reader now reads the
    /// new ring), else says to wait ([`Follow::Waiting`]), up to the
    /// client's timeout; without a reconnection, or past that, stays.
    fn follow(&mut self) -> Result<Follow, ChannelError> {
        if self.client.inner.redial.is_none() {
            return Ok(Follow::Stay);
        }
        // Read what the socket holds: a lost connection is noticed (and
        // made again) here.
        let _ = self.client.inner.wait_for(Some(self.poke_deadline()), |_| None::<()>);
        let lost = self.client.inner.state.lock().lost.is_some();
        let moved = self.client.inner.generation.load(Ordering::Relaxed) != self.generation;
        if !moved && !lost {
            return Ok(Follow::Stay);
        }
        let since = *self.following_since.get_or_insert_with(Instant::now);
        if !moved {
            // Still being made again: wait for it, as for the publisher.
            return Ok(if since.elapsed() < self.client.timeout() { Follow::Waiting } else { Follow::Stay });
        }
        match ChannelSubscriber::open(&self.client, &self.topic) {
            Ok(mut new) => {
                new.spin = self.spin;
                std::mem::replace(self, new).stale = true;
                Ok(Follow::Moved)
            }
            Err(ChannelError::Refused { code: ErrorCode::NoSuchChannel, .. })
                if since.elapsed() < self.client.timeout() =>
            {
                Ok(Follow::Waiting)
            }
            Err(ChannelError::Refused { code: ErrorCode::NoSuchChannel, .. }) => {
                // The publisher did not come back: this ring's end is the end.
                self.generation = self.client.inner.generation.load(Ordering::Relaxed);
                Ok(Follow::Stay)
            }
            Err(e) => Err(e),
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
        self.client.inner.state.lock().release_channel(self.channel_id);
        // As the publisher's: never a close for another broker's ids.
        if self.stale || self.generation != self.client.inner.generation.load(Ordering::Relaxed) {
            return;
        }
        let close = ChannelClose { channel_id: self.channel_id, reader_id: self.reader_id };
        let _ = self.client.inner.send_once(&close);
    }
}

/// For the tokio driver (`crate::asynch`): a futex cannot be awaited, so
/// an async reader waits on a blocking thread, without reading there (a
/// cancelled wait then loses nothing); and what a read may wait for (a
/// closed ring: the broker's reason, or its publisher back after a
/// reconnection) is read there too.
#[cfg(feature = "tokio")]
impl ChannelSubscriber {
    /// Whether a read would find something: a message, or the close.
    fn ready(&self) -> bool {
        use shmbus_proto::ring::protocol::RingView;
        // Acquire: pairs with the publisher's Release store of `head`.
        self.map.header().head.load(Ordering::Acquire) > self.state.next
            || self.map.is_closed()
            || self.cursor.ended().0 != 0
    }

    /// Whether a read may wait for the broker: the ring is closed, or the
    /// broker ended the channel (a read then asks why, or follows a
    /// reconnection).
    pub(crate) fn read_may_block(&self) -> bool {
        self.map.is_closed() || self.cursor.ended().0 != 0
    }

    /// Waits (spinning as [`ChannelSubscriber::set_spin`] says, then on
    /// the futex) until a read would find something, or `max` passes;
    /// reads nothing. A wait for nothing then does what an idle `recv`
    /// does: fails if the connection to the broker has ended, and follows
    /// a reconnection (`Some(Reconnected)`: this reader moved to the new
    /// ring).
    pub(crate) fn wait_ready(
        &mut self,
        max: Duration,
    ) -> Result<Option<ChannelEvent<Vec<u8>>>, ChannelError> {
        let start = Instant::now();
        for i in 0..self.spin {
            if self.ready() {
                return Ok(None);
            }
            std::hint::spin_loop();
            if i % 1024 == 1023 && start.elapsed() >= max {
                return Ok(None);
            }
        }
        let left = max.saturating_sub(start.elapsed());
        if !left.is_zero() {
            self.sleep(left)?;
        }
        if !self.ready() && start.elapsed() >= max {
            self.check_broker()?;
            // Made again meanwhile: the publisher may have moved.
            if self.client.inner.generation.load(Ordering::Relaxed) != self.generation
                && self.follow()? == Follow::Moved
            {
                return Ok(Some(ChannelEvent::Reconnected));
            }
        }
        Ok(None)
    }

    /// The longest a blocking helper waits before it hands the reader back.
    pub(crate) const ASYNC_WAIT: Duration = MAX_SLEEP;
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::sync::mpsc;
    use std::sync::Arc;

    use shmbus_proto::frame::{
        decode_client, encode_head, Body, ChannelGranted, ClientFrame, Limits, Pong, Revocation, Revoked,
    };
    use shmbus_proto::ring::shm::{create_ring, join_reader};
    use shmbus_proto::sys::memfd;
    use shmbus_proto::sys::socket::{self, OutPacket, PeerCred, RecvBatch};

    use super::*;
    use crate::connection::Inner;

    /// What the test tells its fake broker to do with channel `id`.
    enum Order {
        /// Close the ring and send a `Revoked` notice with this reason.
        Revoke(u64, &'static str),
        /// Close the ring with no notice (as when its publisher's
        /// connection ends).
        Close(u64),
    }

    /// A broker that opens rings (channel ids from 1, one per topic, as
    /// publisher or reader), answers pings, and closes a ring when told.
    fn ring_broker(fd: OwnedFd, orders: mpsc::Receiver<Order>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut rings: Vec<(String, OwnedFd, OwnedFd, RingMap)> = Vec::new();
            let mut batch = RecvBatch::new(8);
            let send = |body: &dyn Fn() -> Vec<u8>, fds: &[BorrowedFd<'_>]| {
                let head = body();
                let _ = socket::send_packet(fd.as_fd(), OutPacket { head: &head, payload: &[], fds }, false);
            };
            fn head<B: Body>(b: &B) -> Vec<u8> {
                encode_head(b).unwrap()
            }
            loop {
                while let Ok(order) = orders.try_recv() {
                    let (id, reason) = match order {
                        Order::Revoke(id, reason) => (id, Some(reason)),
                        Order::Close(id) => (id, None),
                    };
                    rings[id as usize - 1].3.close();
                    if let Some(reason) = reason {
                        let r = Revoked { what: Revocation::Channel { channel_id: id }, reason };
                        send(&|| head(&r), &[]);
                    }
                }
                match socket::wait_readable(fd.as_fd(), Some(Duration::from_millis(5))) {
                    Ok(true) => {}
                    Ok(false) => continue,
                    Err(_) => return,
                }
                let Ok(n) = batch.recv(fd.as_fd(), true) else { continue };
                for i in 0..n {
                    let (data, _, _) = batch.packet(i);
                    if data.is_empty() {
                        return;
                    }
                    match decode_client(data).unwrap() {
                        ClientFrame::Ping(p) => send(&|| head(&Pong { token: p.token }), &[]),
                        ClientFrame::ChannelOpen(o) => {
                            let g = Geometry { slot_size: 64, slot_count: 8 };
                            let grant = |channel_id, reader_id| ChannelGranted {
                                req_id: o.req_id,
                                channel_id,
                                reader_id,
                                slot_size: g.slot_size,
                                slot_count: g.slot_count,
                                overflow: ChannelOverflow::Overwrite,
                            };
                            match o.role {
                                ChannelRole::Publish { .. } => {
                                    let (ring, signal, map) = create_ring(g, false).unwrap();
                                    rings.push((o.topic.to_owned(), ring, signal, map));
                                    let (_, ring, signal, _) = rings.last().unwrap();
                                    let id = rings.len() as u64;
                                    send(&|| head(&grant(id, 0)), &[ring.as_fd(), signal.as_fd()]);
                                }
                                ChannelRole::Subscribe => {
                                    let at = rings.iter().position(|r| r.0 == o.topic).unwrap();
                                    let (_, ring, signal, map) = &rings[at];
                                    let (_, cursor, _, _) = join_reader(map).unwrap();
                                    let ro = memfd::reopen_read_only(ring.as_fd()).unwrap();
                                    let fds = [ro.as_fd(), signal.as_fd(), cursor.as_fd()];
                                    send(&|| head(&grant(at as u64 + 1, 1)), &fds);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        })
    }

    fn client_with_ring_broker() -> (Client, mpsc::Sender<Order>, std::thread::JoinHandle<()>) {
        let (ours, theirs) = socket::pair().unwrap();
        let (tx, rx) = mpsc::channel();
        let broker = ring_broker(theirs, rx);
        let limits = Limits {
            max_packet: 65536,
            max_inline_payload: 65536,
            queue_bytes: 1 << 20,
            queue_frames: 1024,
            max_subscriptions: 100,
            fd_window: 64,
            max_depth: 32,
        };
        let inner = Inner::new(ours, 1, limits, PeerCred { pid: 1, uid: 0, gid: 0 }, "test".into(), 16);
        (Client::for_tests(Arc::new(inner)), tx, broker)
    }

    #[test]
    fn a_revoked_channel_fails_its_publisher_and_ends_its_reader_with_the_reason() {
        let (client, orders, broker) = client_with_ring_broker();
        let mut publisher = client.channel_publisher("cam", ChannelConfig::default()).unwrap();
        let mut reader = client.channel_subscriber("cam").unwrap();
        publisher.publish(b"before").unwrap();
        let reason = "policy reloaded: channel closed for every member: denied by policy: channel-read cam";
        orders.send(Order::Revoke(1, reason)).unwrap();
        // What was published before the close is still read; then the
        // reader learns why it ended, every time.
        let got = reader.recv_vec_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(got, Some(ChannelEvent::Message { seq: 0, value: b"before".to_vec() }));
        let deadline = Instant::now() + Duration::from_secs(20);
        let e = loop {
            match reader.try_recv_vec() {
                Ok(None) => {
                    assert!(Instant::now() < deadline, "the close was never seen");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Ok(Some(other)) => panic!("{other:?}"),
                Err(e) => break e,
            }
        };
        assert!(matches!(&e, ChannelError::Revoked(r) if r == reason), "{e}");
        assert_eq!(e.kind(), ErrorKind::Denied);
        assert!(matches!(reader.try_recv_vec(), Err(ChannelError::Revoked(_))));
        // The publisher too.
        let e = publisher.publish(b"after").unwrap_err();
        assert!(matches!(&e, ChannelError::Revoked(r) if r == reason), "{e}");
        assert!(matches!(publisher.loan(), Err(ChannelError::Revoked(_))));
        assert!(client.inner.state.lock().revoked_channels.contains_key(&1));
        // With the last handle, the channel is forgotten.
        drop(publisher);
        assert!(client.inner.state.lock().revoked_channels.contains_key(&1));
        drop(reader);
        assert!(client.inner.state.lock().revoked_channels.is_empty());
        assert!(client.inner.state.lock().held_channels.is_empty());

        // A ring closed with no notice (its publisher went away) is just
        // closed.
        let mut publisher = client.channel_publisher("cam2", ChannelConfig::default()).unwrap();
        let mut reader = client.channel_subscriber("cam2").unwrap();
        orders.send(Order::Close(2)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match reader.try_recv_vec() {
                Ok(None) => {
                    assert!(Instant::now() < deadline, "the close was never seen");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(ChannelError::Closed) => break,
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(publisher.publish(b"x"), Err(ChannelError::Closed)));
        drop((publisher, reader, client));
        broker.join().unwrap();
    }
}
