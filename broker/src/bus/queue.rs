//! A connection's outgoing queue, and what happens when it is full.
//!
//! Model: the broker never blocks on a client. Every frame for a connection
//! is appended here and flushed when the socket is writable. The queue has
//! two bounds:
//! - the *soft* bound (`queue_bytes`, `queue_frames`) limits data frames
//!   (deliveries). A delivery that does not fit is not queued; the
//!   subscription's [`Overflow`] policy decides what the subscriber learns:
//!   a `Gap` frame with the exact count, placed where the messages went
//!   missing, or a disconnect once what is queued has been flushed;
//! - the *hard* bound (twice the soft one) also limits control frames
//!   (replies, gap notices, errors). A client that keeps asking without ever
//!   reading its answers reaches it and is disconnected, so no peer can grow
//!   the broker's memory without bound.
//!
//! Both bounds hold twice: per connection, and per uid across all of that
//! uid's connections (`Resource::QueuedBytes`, `Resource::QueuedFds`): the
//! queue adds what it holds to its uid's [`Usage`] and takes it back as
//! frames leave, and when it is dropped.
//!
//! Invariant, per subscription: the frames it is sent are the messages
//! routed to it, in routing order, with every run of dropped messages
//! replaced by exactly one `Gap { missed: n }` — never a silent hole. Gaps
//! are owed in `missed` until the queue has data room again; then the gap
//! goes first, ahead of the next delivery.
//!
//! No I/O here: the event loop hands this module frames and takes batches.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;

use crate::bus::quota::{Resource, Usage};

use shmbus_proto::frame::{encode_head, Gap, Overflow, HEADER_LEN};

/// A sealed memfd payload held by the broker: the very fd the publisher
/// sent, forwarded to every subscriber. It is closed when the last queue
/// holding it lets go. Each queue holding it charges its own uid for it
/// (`Resource::MemfdBytes`, `Resource::MemfdFds`): the receiver that does
/// not read is what keeps it in the broker, so a publisher's budget cannot
/// be pinned by another uid's idle subscribers.
#[derive(Debug)]
pub struct SharedFd {
    pub fd: OwnedFd,
    pub len: u64,
}

/// What one queued frame costs beyond its bytes: the `OutFrame` itself, its
/// slot in the queue and the head's allocation rounding. Counted so that a
/// flood of tiny frames is bounded like a flood of large ones.
pub const FRAME_OVERHEAD: usize = std::mem::size_of::<OutFrame>() + 48;

/// Buffers of frames that were sent, kept for the next frames to be
/// encoded into: a stream's deliveries then cost no allocation and no
/// free each (glibc's allocator was about 8% of a busy broker's samples,
/// most of it its slow path: a turn encodes up to hundreds of frames
/// before the first is sent, more than its per-thread cache holds).
///
/// A buffer is taken only for a frame a new buffer would be given just as
/// much for ([`FrameBuffers::take`]): a queue charges what its frames'
/// buffers hold, so a reused one charges exactly what a new one would,
/// and one peer's traffic cannot make another's deliveries cost it more.
/// At most [`FrameBuffers::KEEP`] buffers of at most
/// [`FrameBuffers::LARGEST`] bytes are kept (the broker's own, 1.1 MiB at
/// most, charged to no one). With 256 kept, a busy broker still allocated: a turn
/// encodes up to 256 records' deliveries per ring before any is sent, and
/// more wait while a subscriber's ring is full.
#[derive(Debug, Default)]
pub struct FrameBuffers {
    free: Vec<Vec<u8>>,
}

impl FrameBuffers {
    pub const KEEP: usize = 1024;
    pub const LARGEST: usize = 1024 + 64;

    /// An empty buffer for a frame a new buffer would be given `capacity`
    /// bytes for: a kept one of exactly that capacity, or a new one. (The
    /// last one kept is looked at, and dropped if it differs: a stream's
    /// frames are alike.)
    pub fn take(&mut self, capacity: usize) -> Vec<u8> {
        match self.free.pop() {
            Some(mut b) if b.capacity() == capacity => {
                b.clear();
                b
            }
            _ => Vec::with_capacity(capacity),
        }
    }

    /// Keeps `buf` for a later frame, if there is room and it is small.
    pub fn give(&mut self, buf: Vec<u8>) {
        if self.free.len() < Self::KEEP && (1..=Self::LARGEST).contains(&buf.capacity()) {
            self.free.push(buf);
        }
    }

    /// Buffers kept.
    pub fn kept(&self) -> usize {
        self.free.len()
    }
}

/// One frame waiting to be sent: an encoded head, and a payload shared by
/// every subscriber it fans out to (inline bytes, or a memfd).
#[derive(Debug, Clone)]
pub struct OutFrame {
    pub head: Vec<u8>,
    pub payload: Option<Arc<[u8]>>,
    pub shared_fd: Option<Rc<SharedFd>>,
    /// Fds of a control frame (a ring channel's memfds).
    pub control_fds: Vec<Rc<OwnedFd>>,
}

impl OutFrame {
    pub fn control(head: Vec<u8>) -> OutFrame {
        OutFrame { head, payload: None, shared_fd: None, control_fds: Vec::new() }
    }

    /// Bytes this frame costs the queue: head, inline payload (shared
    /// between receivers, but charged to each, an upper bound) and
    /// [`FRAME_OVERHEAD`]. A memfd payload's bytes are charged apart, as
    /// `MemfdBytes`.
    pub fn cost(&self) -> usize {
        self.head.capacity() + self.payload.as_ref().map_or(0, |p| p.len()) + FRAME_OVERHEAD
    }

    /// Bytes of inline payload this frame carries: the shared `payload`,
    /// or what follows the body in `head` (a frame encoded whole, as a
    /// lone receiver's delivery is), as the header's body length says.
    pub fn inline_len(&self) -> usize {
        let body = match self.head.get(4..HEADER_LEN) {
            Some(&[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]) as usize,
            _ => 0,
        };
        let trailing = self.head.len().saturating_sub(HEADER_LEN.saturating_add(body));
        trailing + self.payload.as_ref().map_or(0, |p| p.len())
    }

    /// The memfd payload's length, if this frame carries one.
    pub fn memfd_len(&self) -> Option<u64> {
        self.shared_fd.as_ref().map(|s| s.len)
    }

    /// Fds that ride beside this frame.
    pub fn fd_count(&self) -> usize {
        usize::from(self.shared_fd.is_some()) + self.control_fds.len()
    }
}

/// Bounds of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    pub bytes: u64,
    pub frames: u32,
    /// Memfd payloads queued at once: a subscriber that does not read may
    /// pin this many of them, and no more (beyond, its overflow policy
    /// applies as for any other message).
    pub fds: u32,
}

/// The hard bound is this many times the soft one.
const HARD_FACTOR: u64 = 2;

/// The hard bound was hit: the connection must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overfull;

#[derive(Debug)]
pub struct OutQueue {
    frames: VecDeque<OutFrame>,
    bytes: u64,
    /// Memfd payloads queued (the per-connection `fds` bound).
    memfds: u32,
    /// Every fd queued, payloads and control fds alike.
    fds: u64,
    /// Bytes of the memfd payloads queued.
    memfd_bytes: u64,
    limits: QueueLimits,
    usage: Rc<Usage>,
}

impl OutQueue {
    pub fn new(limits: QueueLimits, usage: Rc<Usage>) -> OutQueue {
        OutQueue { frames: VecDeque::new(), bytes: 0, memfds: 0, fds: 0, memfd_bytes: 0, limits, usage }
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether a data frame costing `cost` bytes with `fds` fds fits under
    /// the soft bounds, the connection's and its uid's.
    pub fn data_room(&self, cost: usize, fds: usize) -> bool {
        self.bytes + cost as u64 <= self.limits.bytes
            && (self.frames.len() as u64) < u64::from(self.limits.frames)
            && self.usage.fits(Resource::QueuedBytes, cost as u64)
            && self.usage.fits(Resource::QueuedFds, fds as u64)
    }

    /// Whether a delivery fits: its bytes and fds, and a memfd payload of
    /// `memfd` bytes under the queue's and the uid's payload bounds. Cheap
    /// enough to ask before a delivery is even encoded.
    pub fn delivery_room(&self, cost: usize, fds: usize, memfd: Option<u64>) -> bool {
        self.data_room(cost, fds) && memfd.is_none_or(|len| self.memfd_room(len))
    }

    /// Whether one more memfd of `len` bytes fits this queue's and its
    /// uid's memfd bounds (an answer's too: a control frame, but its memfd
    /// holds memory like a delivery's).
    pub fn memfd_room(&self, len: u64) -> bool {
        self.memfds < self.limits.fds
            && self.usage.fits(Resource::MemfdBytes, len)
            && self.usage.fits(Resource::MemfdFds, 1)
    }

    fn frame_room(&self, f: &OutFrame) -> bool {
        self.delivery_room(f.cost(), f.fd_count(), f.memfd_len())
    }

    /// Whether a control frame of `len` bytes and `fds` fds fits under the
    /// hard bounds.
    pub fn control_room(&self, cost: usize, fds: usize) -> bool {
        let hard_bytes = self.limits.bytes.saturating_mul(HARD_FACTOR);
        let hard_frames = u64::from(self.limits.frames).saturating_mul(HARD_FACTOR);
        let uid_bytes = self.usage.limit(Resource::QueuedBytes).saturating_mul(HARD_FACTOR);
        let uid_fds = self.usage.limit(Resource::QueuedFds).saturating_mul(HARD_FACTOR);
        self.bytes + cost as u64 <= hard_bytes
            && (self.frames.len() as u64) < hard_frames
            && self.usage.held(Resource::QueuedBytes).saturating_add(cost as u64) <= uid_bytes
            && self.usage.held(Resource::QueuedFds).saturating_add(fds as u64) <= uid_fds
    }

    fn push(&mut self, f: OutFrame) {
        self.charge(&f, true);
        self.frames.push_back(f);
    }

    /// Adds (or takes back) what `f` costs this queue and its uid.
    fn charge(&mut self, f: &OutFrame, add: bool) {
        let (cost, fds) = (f.cost() as u64, f.fd_count() as u64);
        let memfd = f.memfd_len();
        let charges = [
            (Resource::QueuedBytes, cost),
            (Resource::QueuedFds, fds),
            (Resource::MemfdBytes, memfd.unwrap_or(0)),
            (Resource::MemfdFds, u64::from(memfd.is_some())),
        ];
        // Saturating: a memfd's length is a peer's (bounded by
        // `MAX_MEMFD_PAYLOAD`, and sums of such must not wrap all the same).
        if add {
            self.bytes = self.bytes.saturating_add(cost);
            self.memfds += u32::from(memfd.is_some());
            self.fds += fds;
            self.memfd_bytes = self.memfd_bytes.saturating_add(memfd.unwrap_or(0));
            charges.iter().for_each(|&(r, a)| self.usage.add(r, a));
        } else {
            self.bytes = self.bytes.saturating_sub(cost);
            self.memfds -= u32::from(memfd.is_some());
            self.fds -= fds;
            self.memfd_bytes = self.memfd_bytes.saturating_sub(memfd.unwrap_or(0));
            charges.iter().for_each(|&(r, a)| self.usage.sub(r, a));
        }
    }

    /// Queues a control frame, up to the hard bound.
    pub fn push_control(&mut self, f: OutFrame) -> Result<(), Overfull> {
        if !self.control_room(f.cost(), f.fd_count()) {
            return Err(Overfull);
        }
        self.push(f);
        Ok(())
    }

    /// Queues a final frame (a goodbye) whatever the bounds: it is the
    /// last frame this queue will ever take.
    pub fn push_final(&mut self, f: OutFrame) {
        self.push(f);
    }

    /// The frames at the front, oldest first, for one send batch.
    pub fn front(&self, max: usize) -> impl Iterator<Item = &OutFrame> {
        self.frames.iter().take(max)
    }

    /// Forgets the first `n` frames, which were sent.
    pub fn consume(&mut self, n: usize) {
        for _ in 0..n.min(self.frames.len()) {
            if let Some(f) = self.frames.pop_front() {
                self.charge(&f, false);
            }
        }
    }

    /// [`OutQueue::consume`], giving the frames' buffers to `buffers`.
    pub fn consume_into(&mut self, n: usize, buffers: &mut FrameBuffers) {
        for _ in 0..n.min(self.frames.len()) {
            if let Some(f) = self.frames.pop_front() {
                self.charge(&f, false);
                buffers.give(f.head);
            }
        }
    }

    /// Takes out every queued frame `pick` chooses (what a revocation
    /// ends), releasing what each cost; returns them, in order.
    pub fn take_where(&mut self, mut pick: impl FnMut(&OutFrame) -> bool) -> Vec<OutFrame> {
        let mut taken = Vec::new();
        let mut kept = VecDeque::with_capacity(self.frames.len());
        for f in std::mem::take(&mut self.frames) {
            if pick(&f) {
                self.charge(&f, false);
                taken.push(f);
            } else {
                kept.push_back(f);
            }
        }
        self.frames = kept;
        taken
    }

    /// Drops every frame but the last (the goodbye of a closing peer that
    /// can no longer take what is queued).
    pub fn keep_last_only(&mut self) {
        while self.frames.len() > 1 {
            self.consume(1);
        }
    }
}

impl Drop for OutQueue {
    fn drop(&mut self) {
        self.usage.sub(Resource::QueuedBytes, self.bytes);
        self.usage.sub(Resource::QueuedFds, self.fds);
        self.usage.sub(Resource::MemfdBytes, self.memfd_bytes);
        self.usage.sub(Resource::MemfdFds, u64::from(self.memfds));
    }
}

/// A subscription's delivery state.
#[derive(Debug, Clone)]
pub struct SubState {
    pub pattern: Box<str>,
    pub overflow: Overflow,
    /// Messages dropped and not yet reported in a `Gap`.
    pub missed: u64,
}

/// What became of one offered delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Queued. `gap_sent` says whether a gap notice went just before it.
    Queued { gap_sent: bool },
    /// Dropped and counted in the subscription's `missed`.
    Dropped,
    /// Did not fit, and the subscription's policy is to disconnect.
    Disconnect,
}

fn gap_frame(sub_id: u32, missed: u64) -> OutFrame {
    // A Gap body is a few varints; encoding cannot fail.
    OutFrame::control(encode_head(&Gap { sub_id, missed }).unwrap_or_default())
}

/// What a delivery that does not fit becomes, by the subscription's
/// policy.
pub fn refuse(sub: &mut SubState) -> Offer {
    match sub.overflow {
        Overflow::Gap => {
            sub.missed = sub.missed.saturating_add(1);
            Offer::Dropped
        }
        Overflow::Disconnect => Offer::Disconnect,
    }
}

/// Offers a delivery for subscription `sub_id`.
pub fn offer(queue: &mut OutQueue, sub_id: u32, sub: &mut SubState, frame: OutFrame) -> Offer {
    if !queue.frame_room(&frame) {
        return refuse(sub);
    }
    let gap_sent = sub.missed > 0;
    if gap_sent {
        queue.push(gap_frame(sub_id, sub.missed));
        sub.missed = 0;
    }
    queue.push(frame);
    Offer::Queued { gap_sent }
}

/// Queues the gap notice owed to `sub_id`, if any and if there is data room
/// for it. Returns whether one was queued.
pub fn settle_gap(queue: &mut OutQueue, sub_id: u32, sub: &mut SubState) -> bool {
    if sub.missed == 0 {
        return false;
    }
    let f = gap_frame(sub_id, sub.missed);
    // An empty queue always takes its gap notice: otherwise a peer whose
    // deliveries were dropped for its uid's bound, not its own, might
    // never be told.
    if !queue.is_empty() && !queue.data_room(f.cost(), 0) {
        return false;
    }
    queue.push(f);
    sub.missed = 0;
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::quota::{Accounts, UidLimits};
    use shmbus_proto::frame::{decode_broker, BrokerFrame};

    #[test]
    fn frame_buffers_give_back_only_what_a_new_frame_would_hold() {
        let mut pool = FrameBuffers::default();
        let fresh = pool.take(80);
        assert_eq!(fresh.capacity(), 80);
        let at = fresh.as_ptr();
        pool.give(fresh);
        // Reused, emptied, for a frame of the same size.
        let mut again = pool.take(80);
        assert_eq!((again.as_ptr(), again.len()), (at, 0));
        again.extend_from_slice(b"dirty");
        pool.give(again);
        // Not for a smaller frame: it would charge 80 for 76.
        assert_eq!(pool.take(76).capacity(), 76);
        assert_eq!(pool.kept(), 0, "the unfit buffer was dropped");
        // Not for a larger one (it would grow).
        pool.give(Vec::with_capacity(80));
        assert!(pool.take(100).capacity() >= 100);
        // Nothing empty, nothing large, and no more than KEEP.
        pool.give(Vec::new());
        pool.give(Vec::with_capacity(FrameBuffers::LARGEST + 1));
        assert_eq!(pool.kept(), 0);
        for _ in 0..FrameBuffers::KEEP + 10 {
            pool.give(Vec::with_capacity(80));
        }
        assert_eq!(pool.kept(), FrameBuffers::KEEP);
    }

    fn queue(limits: QueueLimits) -> OutQueue {
        OutQueue::new(limits, Accounts::new(UidLimits::default()).usage(0))
    }

    fn data(n: u8) -> OutFrame {
        OutFrame { head: vec![n; 10], payload: None, shared_fd: None, control_fds: Vec::new() }
    }

    fn sub(overflow: Overflow) -> SubState {
        SubState { pattern: "a".into(), overflow, missed: 0 }
    }

    #[test]
    fn gap_counts_exactly_and_sits_where_the_loss_was() {
        let mut q = queue(QueueLimits { bytes: 1 << 20, frames: 3, fds: 1 });
        let mut s = sub(Overflow::Gap);
        for i in 0..3 {
            assert_eq!(offer(&mut q, 9, &mut s, data(i)), Offer::Queued { gap_sent: false });
        }
        for i in 3..10 {
            assert_eq!(offer(&mut q, 9, &mut s, data(i)), Offer::Dropped);
        }
        assert_eq!(s.missed, 7);
        q.consume(3);
        assert_eq!(offer(&mut q, 9, &mut s, data(10)), Offer::Queued { gap_sent: true });
        let frames: Vec<_> = q.front(10).cloned().collect();
        assert_eq!(frames.len(), 2);
        match decode_broker(&frames[0].head).unwrap() {
            BrokerFrame::Gap(g) => assert_eq!((g.sub_id, g.missed), (9, 7)),
            other => panic!("expected a gap, got {other:?}"),
        }
        assert_eq!(frames[1].head[0], 10);
        assert_eq!(s.missed, 0);
    }

    #[test]
    fn settle_gap_waits_for_room() {
        let mut q = queue(QueueLimits { bytes: 1 << 20, frames: 1, fds: 1 });
        let mut s = sub(Overflow::Gap);
        offer(&mut q, 1, &mut s, data(0));
        offer(&mut q, 1, &mut s, data(1));
        assert!(!settle_gap(&mut q, 1, &mut s));
        q.consume(1);
        assert!(settle_gap(&mut q, 1, &mut s));
        assert!(!settle_gap(&mut q, 1, &mut s));
        let gap: Vec<_> = q.front(10).collect();
        match decode_broker(&gap[0].head).unwrap() {
            BrokerFrame::Gap(g) => assert_eq!((g.sub_id, g.missed), (1, 1)),
            other => panic!("expected a gap, got {other:?}"),
        }
    }

    #[test]
    fn the_uid_bound_holds_across_queues() {
        let mut accounts =
            Accounts::new(UidLimits::default().with(Resource::QueuedBytes, 2 * unit() + unit() / 2));
        let limits = QueueLimits { bytes: 1 << 20, frames: 100, fds: 4 };
        let (mut a, mut b) =
            (OutQueue::new(limits, accounts.usage(5)), OutQueue::new(limits, accounts.usage(5)));
        let mut other = OutQueue::new(limits, accounts.usage(6));
        let (mut sa, mut sb, mut so) = (sub(Overflow::Gap), sub(Overflow::Gap), sub(Overflow::Gap));
        assert_eq!(offer(&mut a, 1, &mut sa, data(0)), Offer::Queued { gap_sent: false });
        assert_eq!(offer(&mut b, 1, &mut sb, data(1)), Offer::Queued { gap_sent: false });
        // Two frames' worth of 2.5 held by uid 5: a third fits neither queue.
        assert_eq!(offer(&mut a, 1, &mut sa, data(2)), Offer::Dropped);
        assert_eq!(offer(&mut b, 1, &mut sb, data(3)), Offer::Dropped);
        // Another uid is not affected.
        assert_eq!(offer(&mut other, 1, &mut so, data(4)), Offer::Queued { gap_sent: false });
        assert_eq!(accounts.held(5, Resource::QueuedBytes), 2 * unit());
        drop(b);
        assert_eq!(accounts.held(5, Resource::QueuedBytes), unit());
        a.consume(1);
        assert_eq!(accounts.held(5, Resource::QueuedBytes), 0);
        assert_eq!(accounts.held(6, Resource::QueuedBytes), unit());
    }

    /// What one test frame costs a queue.
    fn unit() -> u64 {
        data(0).cost() as u64
    }

    #[test]
    fn disconnect_policy() {
        let mut q = queue(QueueLimits { bytes: unit() + unit() / 2, frames: 100, fds: 1 });
        let mut s = sub(Overflow::Disconnect);
        assert_eq!(offer(&mut q, 1, &mut s, data(0)), Offer::Queued { gap_sent: false });
        assert_eq!(offer(&mut q, 1, &mut s, data(1)), Offer::Disconnect);
    }

    #[test]
    fn memfd_frames_have_their_own_bound() {
        // The receiver (uid 7) is charged for the payloads in its queue.
        let mut quotas = Accounts::new(UidLimits::default().with(Resource::MemfdBytes, 1000));
        let limits = QueueLimits { bytes: 1 << 20, frames: 100, fds: 2 };
        let mut q = OutQueue::new(limits, quotas.usage(7));
        let mut s = sub(Overflow::Gap);
        let fd_frame = |len: u64| {
            let shared =
                Rc::new(SharedFd { fd: shmbus_proto::sys::memfd::from_bytes("t", b"x").unwrap(), len });
            OutFrame { head: vec![0; 10], payload: None, shared_fd: Some(shared), control_fds: Vec::new() }
        };
        assert_eq!(offer(&mut q, 1, &mut s, fd_frame(1)), Offer::Queued { gap_sent: false });
        assert_eq!(offer(&mut q, 1, &mut s, fd_frame(1)), Offer::Queued { gap_sent: false });
        assert_eq!(offer(&mut q, 1, &mut s, fd_frame(1)), Offer::Dropped, "the queue's fd bound");
        // Inline frames still fit.
        assert_eq!(offer(&mut q, 1, &mut s, data(1)), Offer::Queued { gap_sent: true });
        assert_eq!((quotas.held(7, Resource::MemfdFds), quotas.held(7, Resource::MemfdBytes)), (2, 2));
        q.consume(4);
        assert_eq!(quotas.held(7, Resource::MemfdFds), 0);
        // The uid's payload-byte bound, across queues.
        let mut other = OutQueue::new(limits, quotas.usage(7));
        assert_eq!(offer(&mut q, 1, &mut s, fd_frame(600)), Offer::Queued { gap_sent: false });
        assert_eq!(
            offer(&mut other, 1, &mut s, fd_frame(600)),
            Offer::Dropped,
            "uid 7 would hold 1200 bytes"
        );
        drop(q);
        assert_eq!(quotas.held(7, Resource::MemfdBytes), 0, "released when the queue goes");
    }

    #[test]
    fn control_frames_stop_at_the_hard_bound() {
        let mut q = queue(QueueLimits { bytes: 10 * unit(), frames: 100, fds: 1 });
        let mut pushed = 0;
        while q.push_control(data(0)).is_ok() {
            pushed += 1;
        }
        assert_eq!(pushed, 20);
        assert_eq!(q.bytes(), 20 * unit());
        q.consume(5);
        assert_eq!(q.bytes(), 15 * unit());
    }
}
