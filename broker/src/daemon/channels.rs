//! Ring channels, as the broker holds them.
//!
//! Model: the broker is the control plane of a channel and steps out of
//! its data path. It creates the ring and signal memfds (sealed against
//! resizing), hands the publisher read-write fds, each reader a read-only
//! ring fd plus a cursor page it alone writes, and tells the publisher
//! (for block mode) whenever a reader joins or leaves, so a dead reader
//! never holds the publisher up. When the publisher leaves or dies the
//! broker marks the ring closed and wakes every reader: "channel closed",
//! never a hang. One publisher per channel; readers need a channel that
//! has one.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::rc::Rc;

use shmbus_proto::frame::{ChannelInfo, ChannelOverflow};
use shmbus_proto::ring::layout::Signal;
use shmbus_proto::ring::protocol::{self, RingView};
use shmbus_proto::ring::shm::RingMap;
use shmbus_proto::ring::Geometry;
use shmbus_proto::sync::Ordering;

use crate::bus::quota::Charge;

#[derive(Debug)]
pub struct ChannelReader {
    /// Broker slot of the reader's connection.
    pub slot: usize,
    /// The reader's cursor page, charged to the reader's uid.
    pub charge: Charge,
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
    /// Broker slot and client id of the publisher's connection.
    pub publisher_slot: usize,
    pub publisher_client: u64,
    pub readers: BTreeMap<u32, ChannelReader>,
    pub next_reader: u32,
    /// The ring's memory, charged to the publisher's uid while it exists.
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

    /// Records a reader leaving in the ring header, for the publisher;
    /// returns the new generation to send it with the news.
    pub fn bump_members(&self) -> u32 {
        protocol::announce(&self.map)
    }

    pub fn info(&self) -> ChannelInfo {
        ChannelInfo {
            id: self.id,
            topic: self.topic.clone(),
            publisher: self.publisher_client,
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
