//! Ring channels, as the bus holds them, and their membership news.
//!
//! Model: the broker is the control plane of a channel and steps out of
//! its data path. It creates the ring and signal memfds (sealed against
//! resizing), hands the publisher read-write fds, each reader a read-only
//! ring fd plus a cursor page it alone writes, and tells the publisher
//! (for block mode) which readers joined or left, so a dead reader never
//! holds the publisher up. When the publisher leaves or dies the broker
//! marks the ring closed and wakes every reader: "channel closed", never a
//! hang. One publisher per channel; readers need a channel that has one.
//!
//! Membership news is coalesced, not queued per event. Each change moves the
//! ring header's `members` generation at once (`protocol::announce`,
//! `protocol::join`: block mode's safety needs the publisher to see a join
//! before it can lap the new reader, see there), and is kept in the
//! channel's `untold` list, in order, at most one per reader: a reader
//! that joins and leaves before the publisher was told is dropped from the
//! list (its cursor fd simply closed). The publisher is told as its queue
//! has room, at most `NEWS_IN_FLIGHT` frames at a time, so churn costs an
//! idle publisher a bounded handful of frames. Each frame carries the
//! generation up to which the publisher is then fully told — the
//! generation just before the next untold change, or the current one when
//! none is left — and when every untold change was cancelled, one frame
//! for reader 0 (nobody) brings the publisher's generation up to date, so
//! it never waits for news that will not come.
//!
//! Accounting: a channel's ring pages and the channel itself are charged to
//! the publisher's uid; a reader handle and its cursor page to the
//! reader's uid; readers per channel are capped. Every handle is named by
//! (channel id, reader id; 0 for the publisher), so `ChannelClose` gives
//! back exactly one.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::time::Instant;

use tracing::debug;

use shmbus_proto::frame::{
    ChannelGranted, ChannelInfo, ChannelOverflow, ChannelReader as ChannelReaderFrame, ChannelRole,
    ErrorCode, Op,
};
use shmbus_proto::ring::layout::Signal;
use shmbus_proto::ring::layout::{ENDED_CLOSED, ENDED_REVOKED};
use shmbus_proto::ring::protocol;
use shmbus_proto::ring::protocol::RingView;
use shmbus_proto::ring::shm::{create_ring, join_reader, CursorMap, RingMap};
use shmbus_proto::ring::Geometry;
use shmbus_proto::subject::validate_subject;
use shmbus_proto::sync::Ordering;
use shmbus_proto::sys::memfd;
use shmbus_proto::text::quote;

use super::peer::PeerId;
use super::quota::{charge_usage, Charge, Resource};
use super::rules::Action;
use super::Bus;

/// Why the broker ends a channel ([`Bus::close_channel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Its publisher gave it back or left: readers take what was published
    /// before (at most one ring's worth of reads), then end.
    PublisherLeft,
    /// A reloaded policy took it away: readers end at once.
    Revoked,
}

/// Bytes of one cursor page, and of the signal page beside a ring.
const PAGE: u64 = 4096;
/// Membership frames queued for one publisher at once; further news
/// stays coalesced in its channel until these are sent.
const NEWS_IN_FLIGHT: u32 = 16;

#[derive(Debug)]
pub struct ChannelReader {
    pub peer: PeerId,
    /// The reader handle and its cursor page, charged to the reader's uid.
    pub charge: Charge,
    /// The broker's read-write mapping of the reader's cursor page: where
    /// it ends the channel for the reader ([`CursorMap::end`]), out of the
    /// publisher's reach.
    pub cursor: CursorMap,
}

/// A membership change the publisher has not been told of yet.
#[derive(Debug)]
enum Untold {
    /// Joined: the publisher's read-only view of the reader's cursor.
    Joined(OwnedFd),
    Left,
}

#[derive(Debug)]
pub struct Channel {
    pub id: u64,
    pub topic: String,
    pub geometry: Geometry,
    pub overflow: ChannelOverflow,
    pub ring_fd: Rc<OwnedFd>,
    pub signal_fd: Rc<OwnedFd>,
    /// The broker's own read-write mapping: to read the head for late
    /// joiners and introspection, and to mark the ring closed.
    pub map: RingMap,
    pub publisher: PeerId,
    pub readers: BTreeMap<u32, ChannelReader>,
    next_reader: u32,
    /// Changes not yet told, in the order they happened: (reader id,
    /// change, the generation right after it), by sequence number.
    untold: BTreeMap<u64, (u32, Untold, u32)>,
    /// The sequence number of each reader's untold join.
    untold_join: HashMap<u32, u64>,
    next_change: u64,
    /// The generation of the latest change, and of the latest told frame.
    announced: u32,
    told: u32,
    /// The ring's memory and the channel, charged to the publisher's uid.
    pub charge: Charge,
}

impl Channel {
    fn signal(&self) -> &Signal {
        self.map.signal()
    }

    /// Where a reader joining now starts: the current head.
    pub fn head(&self) -> u64 {
        // Acquire: pairs with the publisher's Release store of `head`.
        self.map.header().head.load(Ordering::Acquire)
    }

    /// Records a change not yet told to the publisher.
    fn record(&mut self, reader_id: u32, news: Untold, generation: u32) {
        self.next_change += 1;
        if matches!(news, Untold::Joined(_)) {
            self.untold_join.insert(reader_id, self.next_change);
        }
        self.untold.insert(self.next_change, (reader_id, news, generation));
        self.announced = generation;
    }

    pub fn info(&self) -> ChannelInfo {
        ChannelInfo {
            id: self.id,
            topic: self.topic.clone(),
            publisher: self.publisher,
            readers: self.readers.len() as u32,
            slot_size: self.geometry.slot_size,
            slot_count: self.geometry.slot_count,
            overflow: self.overflow,
            published: self.head(),
            // Relaxed: a statistic; pairs with nothing.
            overruns: self.signal().overruns.load(Ordering::Relaxed),
        }
    }
}

/// Every channel, by id and by topic.
#[derive(Debug, Default)]
pub struct Channels {
    pub by_id: BTreeMap<u64, Channel>,
    by_topic: HashMap<String, u64>,
    next_id: u64,
}

impl Bus {
    pub(crate) fn channel_open(
        &mut self,
        id: PeerId,
        req_id: u32,
        topic: &str,
        role: ChannelRole,
        now: Instant,
    ) {
        let op = Op::ChannelOpen { req_id };
        if let Err(e) = validate_subject(topic) {
            let msg = format!("invalid channel subject {}: {e}", quote(topic));
            return self.op_error(id, op, ErrorCode::InvalidSubject, &msg, now);
        }
        if topic.split('.').next() == Some(super::service::SYS_PREFIX) {
            let msg = format!("subjects under {} are the broker's", super::service::SYS_PREFIX);
            return self.op_error(id, op, ErrorCode::Denied, &msg, now);
        }
        let action = match role {
            ChannelRole::Publish { .. } => Action::ChannelPublish,
            ChannelRole::Subscribe => Action::ChannelRead,
        };
        if let Some(p) = self.peers.get(&id) {
            self.work = self.work.wrapping_add(p.access.pattern_cost(action));
        }
        let denied = self.peers.get(&id).and_then(|p| p.access.check_pattern(action, topic).err());
        if let Some(msg) = denied {
            self.denial(id, &msg);
            return self.op_error(id, op, ErrorCode::Denied, &msg, now);
        }
        match role {
            ChannelRole::Publish { slot_size, slot_count, overflow } => {
                self.open_publisher(id, req_id, topic, Geometry { slot_size, slot_count }, overflow, now)
            }
            ChannelRole::Subscribe => self.join_reader(id, req_id, topic, now),
        }
    }

    fn open_publisher(
        &mut self,
        id: PeerId,
        req_id: u32,
        topic: &str,
        geometry: Geometry,
        overflow: ChannelOverflow,
        now: Instant,
    ) {
        let op = Op::ChannelOpen { req_id };
        if let Some(ch) = self.channels.by_topic.get(topic).and_then(|c| self.channels.by_id.get(c)) {
            let msg = format!("channel {topic} already has a publisher (client {})", ch.publisher);
            return self.op_error(id, op, ErrorCode::ChannelBusy, &msg, now);
        }
        if let Err(e) = geometry.validate() {
            let msg = format!("cannot create the ring: {e}");
            return self.op_error(id, op, ErrorCode::Unsupported, &msg, now);
        }
        let Some(p) = self.peers.get(&id) else { return };
        // The ring's pages are allocated up front: they count against the
        // publisher's uid, and so do the two fds its grant carries.
        let amounts = [(Resource::Channels, 1), (Resource::RingBytes, geometry.total_len() as u64 + PAGE)];
        let charge = match charge_usage(&p.usage, &amounts) {
            Ok(c) => c,
            Err(e) => return self.quota_refusal(id, op, &e, now),
        };
        if let Err(e) = p.usage.check(Resource::QueuedFds, 2) {
            return self.quota_refusal(id, op, &e, now);
        }
        let (ring, signal, map) = match create_ring(geometry, overflow == ChannelOverflow::Block) {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("the broker cannot create the ring: {e}");
                return self.op_error(id, op, ErrorCode::BrokerResource, &msg, now);
            }
        };
        let channel_id = self.channels.next_id.max(1);
        self.channels.next_id = channel_id + 1;
        let (ring, signal) = (Rc::new(ring), Rc::new(signal));
        let granted = ChannelGranted {
            req_id,
            channel_id,
            reader_id: 0,
            slot_size: geometry.slot_size,
            slot_count: geometry.slot_count,
            overflow,
        };
        if !self.control_with_fds(id, &granted, vec![ring.clone(), signal.clone()], now) {
            return;
        }
        debug!("channel {channel_id} on {topic} opened by client {id}");
        self.channels.by_topic.insert(topic.to_owned(), channel_id);
        self.channels.by_id.insert(
            channel_id,
            Channel {
                id: channel_id,
                topic: topic.to_owned(),
                geometry,
                overflow,
                ring_fd: ring,
                signal_fd: signal,
                map,
                publisher: id,
                readers: BTreeMap::new(),
                next_reader: 1,
                untold: BTreeMap::new(),
                untold_join: HashMap::new(),
                next_change: 0,
                announced: 0,
                told: 0,
                charge,
            },
        );
        if let Some(p) = self.peers.get_mut(&id) {
            p.channels.push((channel_id, 0));
        }
    }

    fn join_reader(&mut self, id: PeerId, req_id: u32, topic: &str, now: Instant) {
        let op = Op::ChannelOpen { req_id };
        let max_readers = self.cfg.max_readers_per_channel;
        let Some(channel_id) = self.channels.by_topic.get(topic).copied() else {
            let msg = format!("no channel on {topic}: a publisher must open it first");
            return self.op_error(id, op, ErrorCode::NoSuchChannel, &msg, now);
        };
        let Some(ch) = self.channels.by_id.get(&channel_id) else { return };
        if ch.readers.len() >= max_readers as usize {
            let msg = format!(
                "channel {topic} already has {} readers (limit {max_readers}; raise it with \
                 --max-readers-per-channel)",
                ch.readers.len()
            );
            return self.op_error(id, op, ErrorCode::LimitExceeded, &msg, now);
        }
        let Some(p) = self.peers.get(&id) else { return };
        let uid = p.cred.uid;
        let per_uid = self.cfg.max_readers_per_channel_per_uid;
        let mine = ch
            .readers
            .values()
            .filter(|r| self.peers.get(&r.peer).is_some_and(|q| q.cred.uid == uid))
            .count();
        if mine >= per_uid as usize {
            let msg = format!(
                "uid {uid} already has {mine} readers on channel {topic} (limit {per_uid}; raise it with \
                 --max-readers-per-channel-per-uid)"
            );
            return self.op_error(id, op, ErrorCode::LimitExceeded, &msg, now);
        }
        let charge =
            match charge_usage(&p.usage, &[(Resource::ChannelReaders, 1), (Resource::RingBytes, PAGE)]) {
                Ok(c) => c,
                Err(e) => return self.quota_refusal(id, op, &e, now),
            };
        // The grant carries three fds, queued for the reader's uid.
        if let Err(e) = p.usage.check(Resource::QueuedFds, 3) {
            return self.quota_refusal(id, op, &e, now);
        }
        // A late joiner starts at the head, read after the join is
        // announced (`protocol::join`); nothing can fail after that.
        let fds = memfd::reopen_read_only(ch.ring_fd.as_fd())
            .map_err(|e| e.to_string())
            .and_then(|r| join_reader(&ch.map).map(|c| (c, r)).map_err(|e| e.to_string()));
        let ((generation, cursor_rw, cursor_ro, cursor), ring_ro) = match fds {
            Ok(f) => f,
            Err(e) => {
                let msg = format!("the broker cannot set up the reader: {e}");
                return self.op_error(id, op, ErrorCode::BrokerResource, &msg, now);
            }
        };
        let Some(ch) = self.channels.by_id.get_mut(&channel_id) else { return };
        let reader_id = ch.next_reader;
        // Wrapping, never 0 (the publisher's id), never one in use: a peer
        // may join and leave any number of times.
        loop {
            ch.next_reader = ch.next_reader.wrapping_add(1).max(1);
            if !ch.readers.contains_key(&ch.next_reader) {
                break;
            }
        }
        let g = ch.geometry;
        let granted = ChannelGranted {
            req_id,
            channel_id,
            reader_id,
            slot_size: g.slot_size,
            slot_count: g.slot_count,
            overflow: ch.overflow,
        };
        let signal = ch.signal_fd.clone();
        // The join is announced already: record it whatever happens next.
        ch.readers.insert(reader_id, ChannelReader { peer: id, charge, cursor });
        ch.record(reader_id, Untold::Joined(cursor_ro), generation);
        let publisher = ch.publisher;
        if let Some(p) = self.peers.get_mut(&id) {
            p.channels.push((channel_id, reader_id));
        }
        if !self.control_with_fds(id, &granted, vec![Rc::new(ring_ro), signal, Rc::new(cursor_rw)], now) {
            // The reader is being cut off: it leaves again at once.
            if let Some(p) = self.peers.get_mut(&id) {
                p.channels.retain(|h| *h != (channel_id, reader_id));
            }
            self.release_handle(id, channel_id, reader_id);
            return;
        }
        self.tell_channel_news(publisher, now);
    }

    /// `ChannelClose`: the peer gives back one handle.
    pub(crate) fn channel_close(&mut self, id: PeerId, channel_id: u64, reader_id: u32, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let Some(i) = p.channels.iter().position(|h| *h == (channel_id, reader_id)) else {
            // Not a handle of this peer: perhaps the channel closed while
            // the request was on its way. Nothing to give back.
            debug!("{}: ChannelClose for a handle it does not hold ({channel_id}, {reader_id})", p.who());
            return;
        };
        p.channels.swap_remove(i);
        self.release_handle(id, channel_id, reader_id);
        let _ = now;
    }

    /// Gives back one handle, already taken off the peer's list.
    pub(crate) fn release_handle(&mut self, id: PeerId, channel_id: u64, reader_id: u32) {
        let Some(ch) = self.channels.by_id.get_mut(&channel_id) else { return };
        if reader_id == 0 {
            if ch.publisher == id {
                self.close_channel(channel_id, Ending::PublisherLeft);
            }
            return;
        }
        if ch.readers.get(&reader_id).is_none_or(|r| r.peer != id) {
            return;
        }
        ch.readers.remove(&reader_id);
        let generation = protocol::announce(&ch.map);
        match ch.untold_join.remove(&reader_id) {
            // The publisher never heard of it: say nothing (its cursor fd
            // closes here).
            Some(seq) => {
                ch.untold.remove(&seq);
                ch.announced = generation;
            }
            None => ch.record(reader_id, Untold::Left, generation),
        }
        let publisher = ch.publisher;
        // No `now` is needed to queue news: only a hard-bound overflow
        // would need one, and news waits for room instead.
        self.tell_channel_news(publisher, self.now_hint());
    }

    /// The publisher left, or the channel was revoked: end it in every
    /// reader's cursor page (which the publisher cannot write, unlike the
    /// ring's `closed` word), mark the ring closed and wake every reader.
    pub(crate) fn close_channel(&mut self, channel_id: u64, why: Ending) {
        let Some(ch) = self.channels.by_id.remove(&channel_id) else { return };
        self.channels.by_topic.remove(&ch.topic);
        let how = match why {
            Ending::PublisherLeft => ENDED_CLOSED,
            Ending::Revoked => ENDED_REVOKED,
        };
        // The head a publisher wrote: readers read up to it, and take at
        // most a ring's worth more reads whatever it says (`ENDED_CLOSED`).
        let end_at = ch.head();
        for r in ch.readers.values() {
            r.cursor.end(how, end_at);
        }
        // After the cursors: its wake-up orders them for woken readers.
        ch.map.close();
        for (reader_id, r) in &ch.readers {
            if let Some(p) = self.peers.get_mut(&r.peer) {
                p.channels.retain(|h| *h != (channel_id, *reader_id));
            }
        }
        debug!("channel {channel_id} on {} closed", ch.topic);
        // `ch` drops: charges released, untold cursor fds closed.
    }

    /// Queues the membership news of every channel `publisher` publishes,
    /// as far as its queue has room; the rest waits for the next flush.
    pub(crate) fn tell_channel_news(&mut self, publisher: PeerId, now: Instant) {
        let Some(p) = self.peers.get(&publisher) else { return };
        if p.is_closing() {
            return;
        }
        let mine: Vec<u64> = p.channels.iter().filter(|h| h.1 == 0).map(|h| h.0).collect();
        for channel_id in mine {
            while let Some(ch) = self.channels.by_id.get_mut(&channel_id) {
                let Some(p) = self.peers.get(&publisher) else { return };
                // News travels as control frames, but only under the soft
                // bound: a publisher that does not read is not cut off for
                // what others did, its news just waits.
                if p.news_queued >= NEWS_IN_FLIGHT || !p.queue.data_room(64, 1) {
                    return;
                }
                let (reader_id, joined, fds, generation) = match ch.untold.pop_first() {
                    Some((_, (reader_id, news, _))) => {
                        // Told up to just before the next untold change.
                        let generation = match ch.untold.first_key_value() {
                            Some((_, next)) => next.2.wrapping_sub(1),
                            None => ch.announced,
                        };
                        match news {
                            Untold::Joined(cursor) => {
                                ch.untold_join.remove(&reader_id);
                                (reader_id, true, vec![Rc::new(cursor)], generation)
                            }
                            Untold::Left => (reader_id, false, Vec::new(), generation),
                        }
                    }
                    // Every untold change was cancelled: bring the
                    // publisher's generation up to date (reader 0 is nobody).
                    None if ch.told != ch.announced => (0, false, Vec::new(), ch.announced),
                    None => break,
                };
                ch.told = generation;
                let frame = ChannelReaderFrame { channel_id, reader_id, joined, generation };
                if !self.control_with_fds(publisher, &frame, fds, now) {
                    return;
                }
                if let Some(p) = self.peers.get_mut(&publisher) {
                    p.news_queued += 1;
                }
            }
        }
    }
}
