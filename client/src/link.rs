//! The client side of the shared-memory transport (see
//! `shmbus_proto::link` for the rings themselves).
//!
//! Model. A connection that attached at its handshake has, beside its
//! socket, a pair of rings: the broker writes every frame for us into the
//! broker half, we write every frame for it into the client half. A frame
//! with fds still travels on the socket, and a *marker* record holds its
//! place in the ring. So the ring is the one ordered stream of frames, and
//! the socket carries only what memory cannot: fds, doorbells, and the end
//! of the connection (EOF). Readiness stays the socket's: a sleeping side
//! raises its `consumer_sleep` flag, and the other side rings it with a
//! `Doorbell` packet, once per raise, so `Client::as_fd` and the tokio
//! driver go on waiting for the socket as before.
//!
//! Reading ([`LinkRx`], under the connection's `reader` lock, where the
//! socket-only reader keeps its batch):
//! - records are read in order, up to a batch, copied out of the shared
//!   memory, given back (`commit`) before they are dispatched, and the
//!   broker is rung for room if it waits for it;
//! - a marker takes the front of the FIFO of socket packets read ahead of
//!   their markers (reading the socket if it is empty: the broker sends the
//!   packet before it writes the marker, so it is there). A marker with no
//!   packet, or more than [`FIFO_MAX`] packets waiting for markers, is the
//!   broker breaking the protocol, and so is a corrupt ring: the
//!   connection is closed with the reason, never a panic;
//! - an empty ring: spin a little (adaptively, no system call but
//!   `sched_yield`s, so that on a machine with fewer CPUs than busy
//!   processes the one that writes next can run: at once when we sent
//!   something since the last read, since then we wait for an answer that
//!   others must run to make; past the first 2 µs otherwise; a wait for
//!   an answer keeps a window of its own, up to 200 µs but no longer than
//!   we were away since the last read, as long as answers keep coming
//!   within it), then raise
//!   the flag and look again (`prepare_sleep`, the store-buffering pair of
//!   the broker's `must_ring`), then wait for the socket. While a read
//!   waits, our half's `presence` says so, with our CPU, and says we run
//!   again once it returns: a broker spinning on our CPU then yields it
//!   to us only when it has written something for us. The flag is
//!   lowered (`wake`) whenever a doorbell may have been spent on it: the
//!   socket was found readable, or a doorbell was read. Otherwise it stays
//!   up across reads, so a busy reader costs the broker one doorbell per
//!   sleep, not one per record. Invariant: whenever a read returns
//!   "nothing" the flag is up, so the socket becomes readable when
//!   anything comes (the contract of `AsFd` and of the async driver);
//! - EOF (or a reset) on the socket ends the connection only once the ring
//!   is drained: the broker writes its last records (its `Goodbye`) before
//!   it closes.
//!
//! Sending ([`LinkTx`], under the `swap` lock's [`Wire`], so a frame goes
//! whole to one connection and a reconnection replaces the link with the
//! socket): a frame is a record; a frame with fds is its socket packet
//! then a marker (room for the marker is made sure of *before* the packet
//! goes, so the two are never split). After publishing, the broker is rung
//! if it sleeps. A full ring is waited out on the `room` futex word of the
//! broker half (spinning a few µs first), in naps of [`ROOM_NAP`] between
//! which the connection is checked, so a dead broker cannot hang a sender.
//!
//! Everything the broker's memory says is checked by the proto layer's
//! functions; what they reject becomes a closed connection here.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use shmbus_proto::frame::{decode_broker, encode_head, BrokerFrame, Doorbell, GoodbyeCode};
use shmbus_proto::link::shm::LinkMap;
use shmbus_proto::link::{Consumer, LinkError, Presence, Producer, RecordKind};
use shmbus_proto::sys::socket::{self, OutPacket, RecvBatch, RecvStatus};
use shmbus_proto::sys::{futex, sched};

use crate::connection::Inner;
use crate::error::Disconnect;

/// Which transport a connection uses (see [`crate::Client::transport`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Every frame is a packet on the connection's socket.
    Socket,
    /// Frames travel in a pair of shared-memory rings; the socket carries
    /// fds and doorbells only.
    SharedMemory,
}

/// What the handshake made of the link.
#[derive(Debug)]
pub(crate) enum Attachment {
    Linked(LinkMap),
    /// Socket only, and why (turned off, or declined by the broker).
    SocketOnly(String),
}

/// Socket packets read ahead of their markers at most; more is a broker
/// that sends packets without markers.
pub(crate) const FIFO_MAX: usize = 1024;
/// Records one read dispatches at most (as many as a socket batch), and
/// bytes: then the others get their turn and acks go out.
const RECORDS_PER_READ: usize = 64;
const BYTES_PER_READ: usize = 1 << 20;
/// Socket packets one receive takes on a link (doorbells, fd frames).
const SOCKET_SLOTS: usize = 4;
/// The reader's spin before it sleeps: where it starts, its bounds, and
/// how it moves: when records came after the spin ran out, within
/// `SPIN_MAX` of the start of the wait, the spin grows to one and a half
/// times that wait (so the next one is caught spinning); when they came
/// later, or not at all, it halves. (Halving at every spin that ran out,
/// and doubling at every short sleep, kept it at a few µs: in a busy
/// request/answer exchange every wait was a sleep, a round trip of 40 µs
/// instead of 10.)
const SPIN_START: Duration = Duration::from_micros(20);
const SPIN_MAX: Duration = Duration::from_micros(40);
const SPIN_STEP: Duration = Duration::from_micros(2);
/// The same for a reader waiting for an answer (see [`PURE_SPIN`]), which
/// keeps a window of its own: an answer that takes longer than a stream's
/// window but comes within this is caught spinning, where a sleep would
/// cost a doorbell from the broker and a wake-up here (on a VM, often of
/// a halted vCPU: an idle round trip went from 1.0× the socket's to 0.8×).
/// The spin costs this process's CPU up to the answer, never more than
/// this per wait, and only while answers keep coming within it; and past
/// [`SPIN_MAX`] never more than the process spent away from the link since
/// its last read (see [`answer_bound`]). Whether such a long spin pays at
/// all is learnt by trying ([`LongSpinTrial`]): on two VMs of 2 vCPUs
/// (AMD EPYC; Intel Xeon, kernel 6.18) the spinning side kept a CPU busy,
/// so the scheduler woke the next process of the exchange on the other,
/// halted, vCPU, and the idle round trip was 1.3-1.5× the socket's on the
/// one and 2.2× on the other, against 0.8-0.9× and 0.6-0.75× sleeping at
/// once. On a third (Intel, earlier) the long spin had won, 0.7× to 1.0×.
const ANSWER_SPIN_MAX: Duration = Duration::from_micros(200);
/// One long wait for an answer in this many tries the spin that is not
/// the better one now (see [`LongSpinTrial`]), so a change is seen. Each
/// such try costs more than its own round trip: on the Intel VM, where
/// sleeping at once won, trying the long spin one wait in 8 (in both A
/// and its echo) took the idle round trip from 0.6-0.75× the socket's to
/// 0.9×; one in 32 kept it at 0.6-0.75×.
const TRIAL_EVERY: u32 = 32;
/// Waits of each spin timed before either is preferred, and kept.
const TRIAL_FIRST: u32 = 4;
const TRIAL_KEPT: usize = 8;
/// Within this of the last records, a reader that found the ring empty
/// after its spin naps for [`NAP`] (one timed wait, its flag down, so the
/// broker rings no doorbell) before it sleeps for real: under sustained
/// load a pause costs the reader one system call and the broker none,
/// where a sleep costs the reader two and the broker one.
const STREAM: Duration = Duration::from_millis(1);
const NAP: Duration = Duration::from_micros(200);
/// Records one read must have found for the reader to call it a stream.
const STREAM_BATCH: usize = 16;
/// The reader's spin yields its CPU after this long, unless it waits for
/// an answer (it sent since its last read): then at once. A stream's
/// reader that drains its ring waits a fraction of a µs for the next
/// records, and yielding then would cost a system call per few messages;
/// a conversation's reader waits for the broker and the other side to
/// run, and on a machine with fewer CPUs than busy processes one of them
/// may be waiting for this very CPU (with the broker's own yields, the
/// busy round trip on 2 CPUs went from 10 µs to 5).
const PURE_SPIN: Duration = Duration::from_micros(2);
/// Polls between two looks at the clock while spinning: each poll waits a
/// `spin_loop` hint (a `pause`, 25 ns here, up to 140 cycles on some
/// CPUs), and 32 of them made the first yield come a µs late.
const POLLS_PER_CHECK: u32 = 4;
/// A `sched_yield` that came back sooner than this ran no one else: a
/// system call takes a fraction of this, a switch to another process and
/// back (its poll and its own yield) more (480 ns and 2–3 µs here).
const YIELD_ALONE: Duration = Duration::from_micros(1);
const YIELD_BACKOFF: Duration = Duration::from_micros(8);
const YIELD_SPACING: Duration = Duration::from_micros(4);
/// Sends between two refreshes of the CPU a sender's `presence` gives.
const PRESENCE_EVERY: u32 = 256;
/// A sender's spin on a full ring before it sleeps on the futex.
const ROOM_SPIN: Duration = Duration::from_micros(5);
/// A sender waiting for room looks at the connection this often.
pub(crate) const ROOM_NAP: Duration = Duration::from_millis(50);
/// A sender asks the kernel whether the broker hung up at most this often
/// (a record in a dead broker's ring fails nowhere, where a packet on its
/// socket fails with `EPIPE`): so at most this long's worth of sends go
/// into the ring of a broker that is gone without anyone knowing, as
/// packets do into the socket buffer of one that is going. Timed by the
/// coarse clock ([`sched::coarse_now`]), which lags by up to a tick: so
/// the check comes within this and one tick.
const ALIVE_CHECK: Duration = Duration::from_millis(10);

/// The `Doorbell` packet, encoded once.
pub(crate) fn doorbell() -> &'static [u8] {
    static HEAD: OnceLock<Vec<u8>> = OnceLock::new();
    HEAD.get_or_init(|| encode_head(&Doorbell).expect("a doorbell encodes"))
}

fn is_doorbell(data: &[u8]) -> bool {
    matches!(decode_broker(data), Ok(BrokerFrame::Doorbell))
}

/// Whether the other end of `fd` is gone (hangup or error), without
/// waiting.
fn hung_up(fd: BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags};
    let mut fds = [PollFd::new(&fd, PollFlags::empty())];
    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    match rustix::event::poll(&mut fds, Some(&zero)) {
        Ok(_) => fds[0].revents().intersects(PollFlags::HUP | PollFlags::ERR),
        Err(_) => false,
    }
}

// ------------------------------------------------------------ sending --

/// What a send that may not wait found full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// The socket's buffer: wait until it is writable.
    Socket,
    /// The ring: wait until the broker has read some of it.
    Ring,
}

/// The sending side of a link: the client half's ring. Used only with
/// `swap` held.
#[derive(Debug)]
pub(crate) struct LinkTx {
    map: Arc<LinkMap>,
    producer: Producer,
    /// Shared with the reader: the broker is known to be gone.
    gone: Arc<AtomicBool>,
    /// When to ask the kernel again whether it is (see [`ALIVE_CHECK`]),
    /// on the coarse clock.
    next_check: Duration,
    /// Sends since our `presence` was last said here.
    unsaid: u32,
}

/// The transport as senders see it, under the connection's `swap` lock.
#[derive(Debug, Default)]
pub(crate) struct Wire {
    /// `None`: socket only.
    pub link: Option<LinkTx>,
}

/// One connection's way out, for one send: its socket, and its link if it
/// has one.
pub(crate) struct Port<'a> {
    pub fd: BorrowedFd<'a>,
    pub link: Option<&'a mut LinkTx>,
    pub inner: &'a Inner,
}

impl Port<'_> {
    /// Sends `packets` in order, as many as go (at least one), waiting for
    /// room if `wait`; not waiting, finding no room for the first one is
    /// `Ok(Err(_))`. Socket only: exactly the socket send it always was.
    pub fn send(&mut self, packets: &[OutPacket<'_>], wait: bool) -> io::Result<Result<usize, Full>> {
        let Some(tx) = self.link.as_deref_mut() else {
            return match socket::send_packets(self.fd, packets, !wait) {
                Ok(n) if n > 0 || packets.is_empty() => Ok(Ok(n)),
                Ok(_) => Ok(Err(Full::Socket)),
                Err(e) if !wait && e.kind() == io::ErrorKind::WouldBlock => Ok(Err(Full::Socket)),
                Err(e) => Err(e),
            };
        };
        let sent = tx.send(self.fd, self.inner, packets, wait);
        // Whatever was written goes out, even if a later packet failed.
        tx.publish_and_ring(self.fd);
        sent
    }
}

impl LinkTx {
    fn new(map: Arc<LinkMap>, gone: Arc<AtomicBool>) -> LinkTx {
        let producer = Producer::new(map.capacity());
        LinkTx { map, producer, gone, next_check: sched::coarse_now(), unsaid: PRESENCE_EVERY }
    }

    /// Fails (`BrokenPipe`, as the socket would) once the broker is known
    /// to be gone, so the frame goes to the next connection instead.
    fn check_alive(&mut self, fd: BorrowedFd<'_>) -> io::Result<()> {
        // Relaxed: a hint (the socket is the truth), set by the reader on
        // EOF, by a doorbell that failed, or below.
        if !self.gone.load(Ordering::Relaxed) && self.map.peer_closed() {
            // The broker closed the connection (it marks its half so):
            // known with one load, where the hang-up check below waits
            // its turn.
            // Relaxed: as above.
            self.gone.store(true, Ordering::Relaxed);
        }
        if !self.gone.load(Ordering::Relaxed) {
            let now = sched::coarse_now();
            if now < self.next_check {
                return Ok(());
            }
            self.next_check = now + ALIVE_CHECK;
            if !hung_up(fd) {
                return Ok(());
            }
            // Relaxed: as above.
            self.gone.store(true, Ordering::Relaxed);
        }
        Err(io::Error::from(io::ErrorKind::BrokenPipe))
    }

    fn send(
        &mut self,
        fd: BorrowedFd<'_>,
        inner: &Inner,
        packets: &[OutPacket<'_>],
        wait: bool,
    ) -> io::Result<Result<usize, Full>> {
        self.check_alive(fd)?;
        self.say_running();
        let mut n = 0;
        for p in packets {
            // A frame with fds takes a marker (no bytes) in the ring.
            let len = if p.fds.is_empty() { p.head.len() + p.payload.len() } else { 0 };
            if !self.has_room(inner, len)? {
                if n > 0 {
                    break;
                }
                // The broker makes room only for what it can see.
                self.publish_and_ring(fd);
                if !wait {
                    self.check_alive(fd)?;
                    connection_ended(inner)?;
                    return Ok(Err(Full::Ring));
                }
                self.wait_room(fd, inner, len)?;
            }
            if p.fds.is_empty() {
                self.push(inner, RecordKind::Frame, &[p.head, p.payload])?;
            } else {
                if n > 0 {
                    // Alone: what the ring holds is published before the
                    // socket send, which may wait.
                    break;
                }
                match socket::send_packet(fd, *p, !wait) {
                    Err(e) if !wait && e.kind() == io::ErrorKind::WouldBlock => return Ok(Err(Full::Socket)),
                    r => r?,
                }
                // Room for it was made sure of above, and only we write.
                self.push(inner, RecordKind::Marker, &[])?;
            }
            n += 1;
        }
        Ok(Ok(n))
    }

    /// A sender runs its own code: our `presence` says so, with its CPU,
    /// when it said nothing yet or that another thread waits in a read
    /// (the broker would take us all for waiting), and every
    /// [`PRESENCE_EVERY`] sends, in case we moved. One load of our own
    /// word otherwise.
    fn say_running(&mut self) {
        self.unsaid = self.unsaid.saturating_add(1);
        let mine = self.map.mine();
        if self.unsaid >= PRESENCE_EVERY || matches!(Presence::of(mine), Presence::Waiting { .. }) {
            self.unsaid = 0;
            Presence::Running { cpu: sched::current_cpu() }.announce(mine);
        }
    }

    fn has_room(&mut self, inner: &Inner, len: usize) -> io::Result<bool> {
        self.producer.has_room(self.map.peer(), len).map_err(|e| link_failed(inner, e))
    }

    fn push(&mut self, inner: &Inner, kind: RecordKind, parts: &[&[u8]]) -> io::Result<()> {
        match self.producer.try_push(self.map.peer(), self.map.my_data(), kind, parts) {
            Ok(true) => Ok(()),
            Ok(false) => Err(io::Error::other("no room in the shared-memory link after room was found")),
            Err(e) => Err(link_failed(inner, e)),
        }
    }

    /// Makes what was written visible, and rings the broker if it sleeps
    /// (not waiting: a full socket means the broker has packets to read,
    /// and it looks at the ring then).
    fn publish_and_ring(&mut self, fd: BorrowedFd<'_>) {
        self.producer.publish(self.map.mine());
        if self.producer.must_ring(self.map.peer()) {
            let bell = OutPacket { head: doorbell(), payload: &[], fds: &[] };
            match socket::send_packet(fd, bell, true) {
                // The broker took it: it was alive, as the hang-up check
                // in `check_alive` would have asked (a system call saved
                // on each send of a sparse exchange, which rings each time).
                Ok(_) => self.next_check = sched::coarse_now() + ALIVE_CHECK,
                Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => {
                    // Relaxed: a hint, see `check_alive`.
                    self.gone.store(true, Ordering::Relaxed);
                }
                Err(_) => {}
            }
        }
    }

    /// Waits until a record of `len` bytes fits, or the connection ends.
    fn wait_room(&mut self, fd: BorrowedFd<'_>, inner: &Inner, len: usize) -> io::Result<()> {
        let spin_until = Instant::now() + ROOM_SPIN;
        loop {
            if self.has_room(inner, len)? {
                return Ok(());
            }
            if Instant::now() < spin_until {
                std::hint::spin_loop();
                continue;
            }
            // At most every ALIVE_CHECK: a system call before each sleep
            // would cost one per half ring under sustained load.
            self.check_alive(fd)?;
            connection_ended(inner)?;
            let (mine, peer) = (self.map.mine(), self.map.peer());
            // Acquire: pairs with the broker's bump of `room` after it gave
            // room back; only the futex's expected value: the room itself
            // is read again (Acquire on `head`) in `prepare_wait`.
            let r = peer.room.v.load(Ordering::Acquire);
            let sleep = self.producer.prepare_wait(mine, peer, len).map_err(|e| link_failed(inner, e))?;
            if sleep {
                futex::wait(&peer.room.v, r, Some(ROOM_NAP))?;
            }
            self.producer.end_wait(mine);
        }
    }
}

/// Whether a sender should stop waiting for room: the connection was
/// closed or lost (by the reader, say). (Whether the broker hung up is
/// [`LinkTx::check_alive`]'s.)
fn connection_ended(inner: &Inner) -> io::Result<()> {
    let st = inner.state.lock();
    if st.closed.is_some() || st.lost.is_some() {
        return Err(io::Error::new(io::ErrorKind::NotConnected, "the connection to the broker ended"));
    }
    Ok(())
}

/// A send refused by the link: too large for it (cannot happen with the
/// packet limit, but said), or the broker's memory makes no sense (the
/// connection is closed for it).
fn link_failed(inner: &Inner, e: LinkError) -> io::Error {
    match e {
        LinkError::TooLarge { .. } => io::Error::new(io::ErrorKind::InvalidInput, e.to_string()),
        LinkError::Corrupt(_) => {
            inner.close(
                Some(GoodbyeCode::ProtocolViolation),
                format!("the broker broke the shared-memory link: {e}"),
            );
            give_up(inner.fd.as_fd());
            io::Error::new(io::ErrorKind::NotConnected, e.to_string())
        }
    }
}

// ------------------------------------------------------------ reading --

/// A socket packet taken ahead of its marker.
struct Packet {
    data: Vec<u8>,
    status: RecvStatus,
    fds: Vec<OwnedFd>,
}

/// One frame of a read, in order.
enum Item {
    /// Bytes `start..end` of the read's buffer.
    Ring(usize, usize),
    Socket(Packet),
}

/// What went wrong on a link read.
enum Broken {
    Io(io::Error),
    /// The broker broke the protocol: the connection closes, with this.
    Violation(String),
}

/// A close for breaking the protocol.
fn violation(reason: String) -> Disconnect {
    Disconnect { code: Some(GoodbyeCode::ProtocolViolation), reason }
}

impl From<LinkError> for Broken {
    fn from(e: LinkError) -> Broken {
        Broken::Violation(format!("the broker broke the shared-memory link: {e}"))
    }
}

/// The reading side of a link, kept with the reader (`reader` lock).
pub(crate) struct LinkRx {
    map: Arc<LinkMap>,
    consumer: Consumer,
    fifo: VecDeque<Packet>,
    batch: Option<RecvBatch>,
    /// The bytes of this read's records, and the read's frames.
    buf: Vec<u8>,
    items: Vec<Item>,
    /// The adaptive spin windows: a stream's reader's, and a reader's
    /// waiting for an answer (see [`ANSWER_SPIN_MAX`]).
    spin: Duration,
    answer_spin: Duration,
    /// Whether a long wait for an answer spins up to `answer_spin` or
    /// sleeps at once.
    long_spin: LongSpinTrial,
    /// Our own ring's published end at the last read: when it moved, we
    /// sent since, and the wait is for an answer (see [`PURE_SPIN`]).
    sent_seen: u64,
    /// When records last came: within [`STREAM`] of it, an empty ring is
    /// a pause in a stream, and the reader naps instead of sleeping.
    last_data: Instant,
    /// Records the last read took: a nap is for a stream (a read that
    /// found many), never for a request and its answer, which a nap would
    /// only delay.
    last_batch: usize,
    /// The socket said EOF (or was reset more than once).
    eof: bool,
    /// The end was dispatched: the ring was read to its end and the
    /// close followed. Nothing more comes on this link.
    ended: bool,
    resets: u32,
    /// Shared with the sender: the broker is known to be gone.
    gone: Arc<AtomicBool>,
    /// The CPU we said we wait on (our half's `presence`), while a read
    /// waits.
    waiting_on: Option<u32>,
}

impl LinkRx {
    fn new(map: Arc<LinkMap>, gone: Arc<AtomicBool>) -> LinkRx {
        let consumer = Consumer::new(map.capacity());
        LinkRx {
            map,
            consumer,
            fifo: VecDeque::new(),
            batch: None,
            buf: Vec::new(),
            items: Vec::new(),
            spin: SPIN_START,
            answer_spin: SPIN_START,
            long_spin: LongSpinTrial::default(),
            sent_seen: 0,
            last_data: Instant::now(),
            last_batch: 0,
            eof: false,
            ended: false,
            resets: 0,
            gone,
            waiting_on: None,
        }
    }

    /// Whether this link's end was read: everything the broker wrote,
    /// then its close.
    pub(crate) fn ended(&self) -> bool {
        self.ended
    }

    /// The spin window for a wait (for an answer or not, if known) and
    /// its bound.
    fn window(&mut self, answer: Option<bool>) -> (&mut Duration, Duration) {
        if answer == Some(true) {
            (&mut self.answer_spin, ANSWER_SPIN_MAX)
        } else {
            (&mut self.spin, SPIN_MAX)
        }
    }
}

/// Both sides of a new connection's link, or none and why not.
pub(crate) fn split(a: Attachment) -> (Wire, Option<LinkRx>, Option<String>) {
    match a {
        Attachment::Linked(map) => {
            let map = Arc::new(map);
            let gone = Arc::new(AtomicBool::new(false));
            let wire = Wire { link: Some(LinkTx::new(map.clone(), gone.clone())) };
            (wire, Some(LinkRx::new(map, gone)), None)
        }
        Attachment::SocketOnly(why) => (Wire { link: None }, None, Some(why)),
    }
}

impl Inner {
    /// `read_once` on a connection with a link: reads one batch of
    /// records, waiting up to `timeout` (`None`: forever; zero: not at
    /// all) for one. Whether anything was dispatched (or the connection
    /// closed). Returning `false`, the flag is up (see the essay).
    pub(crate) fn read_link(&self, rx: &mut LinkRx, timeout: Option<Duration>) -> io::Result<bool> {
        let read = self.wait_link(rx, timeout);
        if rx.waiting_on.take().is_some() {
            // Back to the app's code: the broker yields its CPU for us
            // again if it shares it with us. Where we run now: a sleep
            // may have ended on another CPU.
            Presence::Running { cpu: sched::current_cpu() }.announce(rx.map.mine());
        }
        read
    }

    fn wait_link(&self, rx: &mut LinkRx, timeout: Option<Duration>) -> io::Result<bool> {
        let start = Instant::now();
        let deadline = timeout.and_then(|t| start.checked_add(t));
        let nonblocking = timeout == Some(Duration::ZERO);
        let mut slept: Option<Instant> = None;
        let (mut drained, mut spun, mut napped) = (false, false, false);
        // Whether this wait is for an answer: decided at its first look
        // that found nothing; and the bound of this wait's window.
        let mut answer: Option<bool> = None;
        let mut bound = SPIN_MAX;
        // A long wait for an answer: which spin it tries (and is timed).
        let mut trial: Option<Spin> = None;
        loop {
            let broken = self.take_records(rx);
            if !rx.items.is_empty() || broken.is_some() {
                // Found without waiting: the clock read at the start will
                // do (each read costs 25 ns here, and a busy exchange
                // reads at every message).
                rx.last_data =
                    if spun || napped || drained || slept.is_some() { Instant::now() } else { start };
                rx.last_batch = rx.items.len();
                if let (Some(spin), false) = (trial, rx.items.is_empty()) {
                    rx.long_spin.timed(spin, start.elapsed());
                }
                if !rx.items.is_empty() && slept.is_some() && trial != Some(Spin::Sleep) {
                    // The spin ran out before the records came: a spin as
                    // long as this wait (and a half) would have caught
                    // them, if that is short enough to be worth it; if not,
                    // spin less next time. (Not after a sleep tried
                    // in place of the long one: it says nothing of the
                    // long one's window.)
                    let waited = start.elapsed();
                    let (window, max) = rx.window(answer);
                    *window = adapt(*window, waited, max.min(bound));
                }
                return self.finish(rx, broken);
            }
            if rx.eof {
                // Relaxed: a hint for senders, see `LinkTx::check_alive`.
                rx.gone.store(true, Ordering::Relaxed);
                // Drained to the end: what the socket still holds (a
                // goodbye sent there, say) in order, then the close.
                rx.items.extend(rx.fifo.drain(..).map(Item::Socket));
                let reason = if rx.resets > 2 {
                    "connection reset by the broker"
                } else {
                    "the broker closed the connection"
                };
                self.dispatch_link(rx, Some(Disconnect { code: None, reason: reason.into() }));
                rx.ended = true;
                return Ok(true);
            }
            if nonblocking && !drained {
                // Whoever waits for readiness next (the async driver, an
                // app's poll) needs the socket empty, and an EOF seen.
                drained = true;
                if let Err(b) = self.drain_socket(rx) {
                    return self.finish(rx, Some(b));
                }
                continue;
            }
            let (mine, peer) = (rx.map.mine(), rx.map.peer());
            if !nonblocking && rx.waiting_on.is_none() {
                // A broker spinning on this CPU need not yield to us until
                // it has written something for us.
                let cpu = sched::current_cpu();
                Presence::Waiting { cpu }.announce(mine);
                rx.waiting_on = Some(cpu);
            }
            if !nonblocking && answer.is_none() {
                // Relaxed: our own position, which only this process
                // writes (under `swap`); a stale value only picks the
                // other spin once. A reader that took a stream's batch
                // last time reads a stream, whatever it sends.
                let sent = mine.tail.v.load(Ordering::Relaxed);
                answer = Some(sent != rx.sent_seen && rx.last_batch < STREAM_BATCH);
                rx.sent_seen = sent;
                if answer == Some(true) {
                    bound = answer_bound(start.saturating_duration_since(rx.last_data));
                    if bound > SPIN_MAX {
                        let spin = rx.long_spin.pick();
                        trial = Some(spin);
                        if spin == Spin::Sleep {
                            bound = Duration::ZERO;
                        }
                    }
                }
            }
            let window = if answer == Some(true) { rx.answer_spin.min(bound) } else { rx.spin };
            if !nonblocking && !spun && !window.is_zero() {
                spun = true;
                let left = deadline.map_or(window, |d| d.saturating_duration_since(Instant::now()));
                match spin(&mut rx.consumer, peer, start, window.min(left), answer == Some(true)) {
                    Ok(true) => continue,
                    // How long the wait turns out to be decides (above).
                    Ok(false) => {}
                    Err(e) => return self.finish(rx, Some(e.into())),
                }
            }
            if !nonblocking && !napped && rx.last_batch >= STREAM_BATCH && rx.last_data.elapsed() < STREAM {
                // A pause in a stream: a timed nap, no doorbell asked for.
                napped = true;
                let left = deadline.map_or(NAP, |d| d.saturating_duration_since(Instant::now()).min(NAP));
                if !left.is_zero() {
                    // Nothing taken stays unacknowledged while we wait.
                    self.ack_everything();
                    if socket::wait_readable(self.fd.as_fd(), Some(left))? {
                        if let Err(b) = self.drain_socket(rx) {
                            return self.finish(rx, Some(b));
                        }
                    }
                    continue;
                }
            }
            match rx.consumer.prepare_sleep(mine, peer) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => return self.finish(rx, Some(e.into())),
            }
            // Nothing taken stays unacknowledged while we wait.
            self.ack_everything();
            if nonblocking {
                return Ok(false);
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left == Some(Duration::ZERO) {
                return Ok(false);
            }
            slept = Some(Instant::now());
            if left.is_none() {
                // No deadline: sleep in the receive itself.
                let got = self.read_socket(rx, true);
                rx.consumer.wake(rx.map.mine());
                if let Err(b) = got {
                    return self.finish(rx, Some(b));
                }
                continue;
            }
            if !socket::wait_readable(self.fd.as_fd(), left)? {
                // Nothing came at all: a long wait; spin less.
                let window = rx.window(answer).0;
                *window = shrink(*window);
                return Ok(false);
            }
            // A doorbell may be spent on this raise: the next sleep raises
            // the flag anew.
            rx.consumer.wake(mine);
            if let Err(b) = self.drain_socket(rx) {
                return self.finish(rx, Some(b));
            }
        }
    }

    /// Ends a read that has frames or trouble: the frames are dispatched
    /// either way; then a violation closes the connection, an i/o error
    /// goes to the caller.
    fn finish(&self, rx: &mut LinkRx, broken: Option<Broken>) -> io::Result<bool> {
        match broken {
            None => self.dispatch_link(rx, None),
            Some(Broken::Violation(why)) => self.dispatch_link(rx, Some(violation(why))),
            Some(Broken::Io(e)) => {
                self.dispatch_link(rx, None);
                return Err(e);
            }
        }
        Ok(true)
    }

    /// Reads up to a batch of records into `rx.items` (markers resolved to
    /// their socket packets), gives them back to the broker, and rings it
    /// for room if it waits. What stopped the read early, if anything.
    fn take_records(&self, rx: &mut LinkRx) -> Option<Broken> {
        rx.buf.clear();
        rx.items.clear();
        let mut broken = None;
        while rx.items.len() < RECORDS_PER_READ && rx.buf.len() < BYTES_PER_READ {
            let start = rx.buf.len();
            match rx.consumer.next(rx.map.peer(), rx.map.peer_data(), &mut rx.buf) {
                Err(e) => {
                    broken = Some(e.into());
                    break;
                }
                Ok(None) => break,
                Ok(Some(RecordKind::Frame)) if rx.buf.len() == start => {
                    broken = Some(Broken::Violation(
                        "the broker wrote an empty frame in the shared-memory link".into(),
                    ));
                    break;
                }
                Ok(Some(RecordKind::Frame)) => rx.items.push(Item::Ring(start, rx.buf.len())),
                Ok(Some(RecordKind::Marker)) => {
                    // A marker carries nothing; bytes a broker put in one
                    // are not read as a frame.
                    rx.buf.truncate(start);
                    if rx.fifo.is_empty() {
                        if let Err(b) = self.drain_socket(rx) {
                            broken = Some(b);
                            break;
                        }
                    }
                    match rx.fifo.pop_front() {
                        Some(p) => rx.items.push(Item::Socket(p)),
                        None => {
                            broken = Some(Broken::Violation(
                                "the broker's shared-memory link announced a frame with fds that is not on the socket"
                                    .into(),
                            ));
                            break;
                        }
                    }
                }
            }
        }
        if !rx.items.is_empty() {
            let (mine, peer) = (rx.map.mine(), rx.map.peer());
            rx.consumer.commit(mine);
            if rx.consumer.must_ring_room(peer) {
                // Straight to the socket, without `swap`: we hold `reader`,
                // and a reconnection needs it to replace the socket. Not
                // waiting: a full socket means the broker has packets to
                // read, and it looks at the ring then.
                let bell = OutPacket { head: doorbell(), payload: &[], fds: &[] };
                let _ = socket::send_packet(self.fd.as_fd(), bell, true);
            }
        }
        broken
    }

    /// Takes whatever the socket holds, without waiting: doorbells are
    /// dropped (and the flag lowered: one may have been spent on it),
    /// other packets wait in the FIFO for their markers, EOF is noted.
    fn drain_socket(&self, rx: &mut LinkRx) -> Result<(), Broken> {
        self.read_socket(rx, false)
    }

    /// [`Inner::drain_socket`], but the first receive waits for a packet
    /// (a doorbell, a frame with fds, the end): one system call to sleep
    /// and wake, where waiting for readiness first takes two.
    fn read_socket(&self, rx: &mut LinkRx, mut block: bool) -> Result<(), Broken> {
        let batch = rx.batch.get_or_insert_with(|| RecvBatch::new(SOCKET_SLOTS));
        while !rx.eof {
            let n = match batch.recv(self.fd.as_fd(), !block) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && block => {
                    // A receive timeout set on the socket ran out: look
                    // again from the top.
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The broker closed while our data was unread: reported
                // once, and what it sent before is still readable.
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    rx.resets += 1;
                    if rx.resets > 2 {
                        rx.eof = true;
                    }
                    continue;
                }
                Err(e) => return Err(Broken::Io(e)),
            };
            block = false;
            for i in 0..n {
                let (data, status, fds) = batch.packet(i);
                if data.is_empty() {
                    rx.eof = true;
                    break;
                }
                if fds.is_empty() && !status.truncated && is_doorbell(data) {
                    rx.consumer.wake(rx.map.mine());
                    continue;
                }
                if rx.fifo.len() >= FIFO_MAX {
                    return Err(Broken::Violation(format!(
                        "the broker sent more than {FIFO_MAX} packets on the socket of a shared-memory link \
                         without their markers"
                    )));
                }
                rx.fifo.push_back(Packet { data: data.to_vec(), status, fds });
            }
            if n < SOCKET_SLOTS {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Dispatches the read's frames in order, then closes the connection
    /// with `close` if given (unless a frame closed it first).
    fn dispatch_link(&self, rx: &mut LinkRx, close: Option<Disconnect>) {
        let short_of_fds = rx.items.iter().any(|i| matches!(i, Item::Socket(p) if p.status.fds_truncated))
            && self.fd_table_full();
        let mut st = self.state.lock();
        for item in rx.items.drain(..) {
            if st.closed.is_some() {
                break;
            }
            match item {
                Item::Ring(a, b) => {
                    self.deliver(&mut st, &rx.buf[a..b], RecvStatus::default(), Vec::new(), false)
                }
                Item::Socket(p) => self.deliver(&mut st, &p.data, p.status, p.fds, short_of_fds),
            }
        }
        let broken = close.as_ref().is_some_and(|d| d.code == Some(GoodbyeCode::ProtocolViolation));
        if let Some(d) = close {
            st.closed.get_or_insert(d);
        }
        self.dispatched(&mut st);
        if st.closed.is_some() || st.lost.is_some() {
            // This connection is over (a goodbye in the ring, say): its
            // senders fail from now on, as they would on a socket the
            // broker closed, instead of writing into a ring nobody reads.
            // Relaxed: a hint, see `LinkTx::check_alive`.
            rx.gone.store(true, Ordering::Relaxed);
        }
        drop(st);
        if broken {
            give_up(self.fd.as_fd());
        }
    }
}

/// The broker broke the link: we close our side (PROTOCOL §15.8), so it
/// lets go of the connection at once. The socket stays ours (its number
/// may be taken by a reconnection, which a broken broker never gets: a
/// violation is not a loss to come back from).
fn give_up(fd: BorrowedFd<'_>) {
    let _ = rustix::net::shutdown(fd, rustix::net::Shutdown::Both);
}

/// A spin window (bounded by `max`) after a wait of `waited` that
/// outlasted it: one and a half times the wait, if that is short enough to
/// be worth it; halved if not.
fn adapt(window: Duration, waited: Duration, max: Duration) -> Duration {
    if waited < max {
        (waited + waited / 2 + SPIN_STEP).clamp(window.min(max), max)
    } else {
        shrink(window)
    }
}

/// The bound of a wait for an answer's spin window, given how long the
/// process was away from the link since its last read (the end of that
/// read, to the start of this wait): [`ANSWER_SPIN_MAX`] for a process
/// that was away at least that long (an idle conversation's side, the
/// case the wide window is for), down to a stream's [`SPIN_MAX`] for one
/// that turns straight round. So past `SPIN_MAX` the spin takes at most
/// half of the process's time. Without it, a process that publishes
/// something for each message it takes (a relay, a bridge, an echo) looks
/// like one waiting for answers, and when the messages came every 40 to
/// 200 µs it spun all the time between them: an echo at 6,700 messages a
/// second used a whole CPU, where it used 8% with the stream's window.
fn answer_bound(away: Duration) -> Duration {
    away.clamp(SPIN_MAX, ANSWER_SPIN_MAX)
}

/// The two spins a long wait for an answer may take (see
/// [`LongSpinTrial`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spin {
    /// Up to the answer window ([`ANSWER_SPIN_MAX`]), then sleep.
    Long,
    /// None: sleep at once (the doorbell wakes it).
    Sleep,
}

/// Whether spinning long for an answer makes it come sooner, learnt by
/// timing both. A side of an idle conversation that spins for the answer
/// saves its own wake-up, but keeps a CPU busy meanwhile, and on a
/// machine with fewer CPUs than the processes of the exchange that can
/// delay the answer more than the wake-up would have: the scheduler
/// sends the next process to another CPU, which may be a halted vCPU that
/// takes tens of µs to wake, where one going to sleep would have been
/// followed on its own CPU. Which one wins depends on the machine (see
/// [`ANSWER_SPIN_MAX`]), so each wait's time to its answer is kept for the
/// spin it took (the last [`TRIAL_KEPT`] of each): first each spin [`TRIAL_FIRST`]
/// times in turn, then the one with the lower median, and one wait in
/// [`TRIAL_EVERY`] the other, so a change is seen. Medians, so a rare late
/// answer weighs no more than any other slow one. The long spin must be a
/// tenth faster to be taken: it costs a CPU while it lasts. (A wait that
/// ends without records, a timeout say, is not timed.) No I/O:
/// unit-tested alone.
#[derive(Debug, Default)]
struct LongSpinTrial {
    /// The last waits (µs) of each, long spin then sleep, in rings of
    /// [`TRIAL_KEPT`]; where each ring's next goes; and how many each has
    /// had (saturating: past a ring's length it only says "full").
    waits: [[u32; TRIAL_KEPT]; 2],
    next: [usize; 2],
    timed: [u32; 2],
    picks: u32,
}

impl LongSpinTrial {
    fn pick(&mut self) -> Spin {
        self.picks = self.picks.wrapping_add(1);
        if self.timed.iter().any(|&n| n < TRIAL_FIRST) {
            return if self.timed[0] <= self.timed[1] { Spin::Long } else { Spin::Sleep };
        }
        let best = if u64::from(self.median(Spin::Long)) * 10 < u64::from(self.median(Spin::Sleep)) * 9 {
            Spin::Long
        } else {
            Spin::Sleep
        };
        match (self.picks.is_multiple_of(TRIAL_EVERY), best) {
            (false, b) => b,
            (true, Spin::Long) => Spin::Sleep,
            (true, Spin::Sleep) => Spin::Long,
        }
    }

    /// A wait that took `spin` found its answer after `waited`.
    fn timed(&mut self, spin: Spin, waited: Duration) {
        let i = spin as usize;
        let us = u32::try_from(waited.as_micros()).unwrap_or(u32::MAX);
        self.waits[i][self.next[i]] = us;
        self.next[i] = (self.next[i] + 1) % TRIAL_KEPT;
        self.timed[i] = self.timed[i].saturating_add(1);
    }

    fn median(&self, spin: Spin) -> u32 {
        let i = spin as usize;
        let n = (self.timed[i] as usize).min(TRIAL_KEPT);
        let mut kept = self.waits[i];
        let kept = &mut kept[..n];
        kept.sort_unstable();
        kept.get(n / 2).copied().unwrap_or(0)
    }
}

/// A spin window halved (zero once it is too short to catch anything).
fn shrink(spin: Duration) -> Duration {
    let half = spin / 2;
    if half < SPIN_STEP / 2 {
        Duration::ZERO
    } else {
        half
    }
}

/// Busy-checks the ring until `limit` after `start` (when the wait began:
/// the clock read it was given), giving the CPU to whoever else
/// is runnable here between looks (with fewer CPUs than busy processes,
/// the one that writes next may be waiting for this one): whether a
/// record came.
///
/// Waiting for an answer (`answer`), it yields between all looks. Reading
/// a stream, it spins [`PURE_SPIN`] without system calls first, then
/// yields at most every [`YIELD_SPACING`] of its own running (yielding at
/// every look, a stream's reader made 2–5 system calls per 1,000
/// messages), and a yield that came back within [`YIELD_ALONE`] gave the
/// CPU to no one, so the next waits [`YIELD_BACKOFF`], polling meanwhile;
/// never for the whole spin: a process woken on this CPU meanwhile would
/// wait for the spin to end. (A reader waiting for an answer alone on its
/// CPU so yields uselessly, one system call per look, for at most its
/// spin window.)
fn spin(
    consumer: &mut Consumer,
    peer: &shmbus_proto::link::layout::HalfHeader,
    start: Instant,
    limit: Duration,
    answer: bool,
) -> Result<bool, LinkError> {
    let until = start + limit;
    let mut next_yield = if answer { start } else { start + PURE_SPIN };
    loop {
        for _ in 0..POLLS_PER_CHECK {
            if !consumer.is_empty(peer)? {
                return Ok(true);
            }
            std::hint::spin_loop();
        }
        let now = Instant::now();
        if now >= until {
            return Ok(false);
        }
        if now >= next_yield {
            sched::yield_cpu();
            if !answer {
                let after = Instant::now();
                let alone = after - now < YIELD_ALONE;
                next_yield = after + if alone { YIELD_BACKOFF } else { YIELD_SPACING };
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The link against a fake broker: a socket pair and a real pair of
    //! memfd halves, the broker's side driven by hand with the proto
    //! layer's producer and consumer.

    use super::*;

    /// Picks `n` spins, each timed as `long` or `short` says; how many
    /// were long.
    fn trial_run(t: &mut LongSpinTrial, n: u32, long: u64, short: u64) -> u32 {
        let mut longs = 0;
        for _ in 0..n {
            let spin = t.pick();
            let us = if spin == Spin::Long { long } else { short };
            longs += u32::from(spin == Spin::Long);
            t.timed(spin, Duration::from_micros(us));
        }
        longs
    }

    #[test]
    fn a_long_spin_for_an_answer_is_kept_only_while_it_makes_answers_come_sooner() {
        // Any 4 × TRIAL_EVERY picks in a row hold 4 tries of the spin that
        // is not the better one.
        let run = 4 * TRIAL_EVERY;
        // First each in turn.
        let mut t = LongSpinTrial::default();
        assert_eq!(trial_run(&mut t, 2 * TRIAL_FIRST, 70, 100), TRIAL_FIRST);
        // Long clearly faster (the earlier Intel VM): long, but for a try
        // of sleeping at once one wait in TRIAL_EVERY.
        assert_eq!(trial_run(&mut t, run, 70, 100), run - 4);
        // The machine changes (the later VMs): the long spin's own waits
        // show it within a few of them, and sleeping at once is kept.
        let longs = trial_run(&mut t, run, 135, 90);
        assert!((4..=4 + TRIAL_KEPT as u32).contains(&longs), "{longs} long spins");
        assert_eq!(trial_run(&mut t, run, 135, 90), 4);
        // And back again, once the tries of the long spin fill its record.
        trial_run(&mut t, TRIAL_KEPT as u32 * TRIAL_EVERY, 70, 100);
        assert_eq!(trial_run(&mut t, run, 70, 100), run - 4);
        // A tie, or a long spin less than a tenth faster: sleeping at once,
        // which costs no CPU while it waits.
        let mut t = LongSpinTrial::default();
        trial_run(&mut t, 2 * TRIAL_FIRST, 95, 100);
        assert_eq!(trial_run(&mut t, run, 95, 100), 4);
        // A rare late answer does not outweigh many: medians.
        let mut t = LongSpinTrial::default();
        trial_run(&mut t, 2 * TRIAL_FIRST, 70, 100);
        t.timed(Spin::Long, Duration::from_secs(1));
        t.timed(Spin::Long, Duration::from_secs(1));
        assert_eq!(trial_run(&mut t, run, 70, 100), run - 4);
        // Past u32::MAX waits the count stays full, the ring still turns
        // (the long spin turns slow and is dropped), and the picks wrap.
        t.timed = [u32::MAX; 2];
        t.picks = u32::MAX - 1;
        trial_run(&mut t, run, 135, 90);
        assert_eq!(trial_run(&mut t, run, 135, 90), 4);
    }

    #[test]
    fn an_answer_keeps_its_own_wider_spin_window() {
        let us = Duration::from_micros;
        // An answer that came 100 µs into the wait: the answer window
        // grows to catch the next one spinning; a stream's would not.
        assert_eq!(adapt(SPIN_START, us(100), ANSWER_SPIN_MAX), us(152));
        assert_eq!(adapt(SPIN_START, us(100), SPIN_MAX), us(10));
        // Never past its bound, and halved by a wait beyond it.
        assert_eq!(adapt(us(150), us(190), ANSWER_SPIN_MAX), ANSWER_SPIN_MAX);
        assert_eq!(adapt(us(150), us(250), ANSWER_SPIN_MAX), us(75));
        // The two windows are kept apart: a stream's long waits shrink
        // only its own.
        let link = shm::create(DEFAULT_CAPACITY).unwrap();
        let map =
            shm::attach(DEFAULT_CAPACITY, link.client_half.as_fd(), link.broker_half_ro.as_fd()).unwrap();
        let mut rx = LinkRx::new(Arc::new(map), Arc::new(AtomicBool::new(false)));
        *rx.window(Some(true)).0 = us(150);
        let (w, max) = rx.window(None);
        assert_eq!(max, SPIN_MAX);
        *w = shrink(*w);
        assert_eq!((rx.spin, rx.answer_spin), (SPIN_START / 2, us(150)));
        assert_eq!(rx.window(Some(false)).1, SPIN_MAX);
    }
    use crate::connection::State;
    use crate::error::RecvError;
    use crate::message::Event;
    use shmbus_proto::frame::{
        decode_client, Body, ClientFrame, Deliver, Goodbye, Limits, PayloadRef, Publish, Sender,
    };
    use shmbus_proto::link::layout::DEFAULT_CAPACITY;
    use shmbus_proto::link::shm::{self, NewLink};
    use shmbus_proto::sys::memfd;
    use shmbus_proto::sys::socket::PeerCred;

    const SENDER: Sender = Sender { client_id: 2, uid: 0, gid: 0, pid: 2 };
    const PATIENCE: Duration = Duration::from_secs(20);

    /// The broker's end: its socket, both halves (its own writable), its
    /// producer (to the client) and consumer (from the client).
    pub(crate) struct FakeBroker {
        pub fd: OwnedFd,
        pub link: NewLink,
        pub producer: Producer,
        pub consumer: Consumer,
    }

    pub(crate) fn limits(window: u32) -> Limits {
        Limits {
            max_packet: 65536,
            max_inline_payload: 65536,
            queue_bytes: 1 << 20,
            queue_frames: 1024,
            max_subscriptions: 100,
            fd_window: window,
            max_depth: 32,
        }
    }

    /// A connection with a link (fd window `window`), and its broker.
    pub(crate) fn linked_inner(window: u32) -> (Inner, FakeBroker) {
        let (ours, theirs) = socket::pair().unwrap();
        let cred = PeerCred { pid: 1, uid: 0, gid: 0 };
        let inner = Inner::new(ours, 1, limits(window), cred, "test".into(), 1024);
        let link = shm::create(DEFAULT_CAPACITY).unwrap();
        let map =
            shm::attach(DEFAULT_CAPACITY, link.client_half.as_fd(), link.broker_half_ro.as_fd()).unwrap();
        inner.attach(Attachment::Linked(map));
        let broker = FakeBroker {
            fd: theirs,
            link,
            producer: Producer::new(DEFAULT_CAPACITY),
            consumer: Consumer::new(DEFAULT_CAPACITY),
        };
        (inner, broker)
    }

    pub(crate) fn deliver(sub_id: u32, seq: u64) -> Deliver<'static> {
        Deliver { sub_id, topic: "t.x", sender: SENDER, seq, origin: None, payload: PayloadRef::Inline }
    }

    impl FakeBroker {
        fn map(&self) -> &LinkMap {
            &self.link.map
        }

        /// Writes a frame into the ring (not yet published).
        pub fn push<B: Body>(&mut self, body: &B, payload: &[u8]) {
            let head = encode_head(body).unwrap();
            let map = &self.link.map;
            assert!(self
                .producer
                .try_push(map.peer(), map.my_data(), RecordKind::Frame, &[&head, payload])
                .unwrap());
        }

        /// Publishes what was written, and rings the client if it sleeps.
        pub fn publish(&mut self) {
            let map = &self.link.map;
            self.producer.publish(map.mine());
            if self.producer.must_ring(map.peer()) {
                let bell = OutPacket { head: doorbell(), payload: &[], fds: &[] };
                socket::send_packet(self.fd.as_fd(), bell, false).unwrap();
            }
        }

        pub fn write<B: Body>(&mut self, body: &B, payload: &[u8]) {
            self.push(body, payload);
            self.publish();
        }

        /// A frame with fds: its packet on the socket, then its marker.
        pub fn write_with_fds<B: Body>(&mut self, body: &B, fds: &[BorrowedFd<'_>]) {
            self.send_socket(body, fds);
            let map = &self.link.map;
            assert!(self.producer.try_push(map.peer(), map.my_data(), RecordKind::Marker, &[]).unwrap());
            self.publish();
        }

        pub fn send_socket<B: Body>(&self, body: &B, fds: &[BorrowedFd<'_>]) {
            let head = encode_head(body).unwrap();
            socket::send_packet(self.fd.as_fd(), OutPacket { head: &head, payload: &[], fds }, false)
                .unwrap();
        }

        /// What came on the socket (without waiting): decoded frames, as
        /// text, with their fd counts.
        pub fn socket_packets(&self) -> Vec<(String, usize)> {
            let mut batch = RecvBatch::new(8);
            let mut out = Vec::new();
            loop {
                match batch.recv(self.fd.as_fd(), true) {
                    Ok(n) => {
                        for i in 0..n {
                            let (data, _, fds) = batch.packet(i);
                            if data.is_empty() {
                                // End of stream: what came before it.
                                return out;
                            }
                            out.push((describe(data), fds.len()));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
                    Err(e) => panic!("{e}"),
                }
            }
        }

        pub fn doorbells(&self) -> usize {
            let packets = self.socket_packets();
            assert!(packets.iter().all(|(p, _)| p == "doorbell"), "{packets:?}");
            packets.len()
        }

        /// The client's records so far (read and given back), as text;
        /// a marker is "marker".
        pub fn records(&mut self) -> Vec<String> {
            let mut out = Vec::new();
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let map = &self.link.map;
                match self.consumer.next(map.peer(), map.peer_data(), &mut buf).unwrap() {
                    None => break,
                    Some(RecordKind::Marker) => out.push("marker".to_owned()),
                    Some(RecordKind::Frame) => out.push(describe(&buf)),
                }
            }
            self.consumer.commit(self.link.map.mine());
            out
        }

        /// Gives room back as the real broker does: commit, and if the
        /// client waits for it, bump `room` and wake it.
        pub fn make_room(&mut self) -> bool {
            let map = &self.link.map;
            self.consumer.commit(map.mine());
            if self.consumer.must_ring_room(map.peer()) {
                // Release: pairs with the client's Acquire load of `room`.
                map.mine().room.v.fetch_add(1, Ordering::Release);
                futex::wake_all(&map.mine().room.v).unwrap();
                return true;
            }
            false
        }
    }

    fn describe(data: &[u8]) -> String {
        match decode_client(data) {
            Ok(ClientFrame::Doorbell) => "doorbell".into(),
            Ok(ClientFrame::Publish(p, payload)) => format!("publish {} {}", p.topic, payload.len()),
            Ok(ClientFrame::FdAck(a)) => format!("ack {}", a.fds),
            Ok(other) => format!("{other:?}"),
            Err(e) => format!("undecodable: {e}"),
        }
    }

    /// The next event of subscription `id`, reading as needed.
    fn take(inner: &Inner, id: u32) -> Event {
        let deadline = Some(Instant::now() + PATIENCE);
        inner.wait_for(deadline, |st| st.take_event(id)).unwrap().expect("an event in time").1
    }

    fn seq(e: Event) -> u64 {
        match e {
            Event::Message(m) => m.seq(),
            other => panic!("{other:?}"),
        }
    }

    /// Reads for a moment, taking nothing.
    fn read_a_moment(inner: &Inner) -> Result<(), RecvError> {
        inner.wait_for(Some(Instant::now() + Duration::from_millis(20)), |_| None::<()>).map(drop)
    }

    fn publish(inner: &Inner, topic: &str, payload: &[u8]) -> Result<u64, RecvError> {
        inner.send(&Publish { topic, origin: None, payload: PayloadRef::Inline }, payload)
    }

    fn closed(inner: &Inner) -> Disconnect {
        inner.state.lock().closed.clone().expect("closed")
    }

    #[test]
    fn frames_in_the_ring_are_dispatched_in_order() {
        let (inner, mut broker) = linked_inner(8);
        assert_eq!(inner.transport(), Transport::SharedMemory);
        inner.state.lock().add_sub(1, Vec::new());
        // Enough to go round the ring a few times, read as they come.
        let payload = vec![7u8; 3000];
        let writer = std::thread::spawn(move || {
            for s in 1..=1000 {
                let map = &broker.link.map;
                let head = encode_head(&deliver(1, s)).unwrap();
                while !broker
                    .producer
                    .try_push(map.peer(), map.my_data(), RecordKind::Frame, &[&head, &payload])
                    .unwrap()
                {
                    std::thread::sleep(Duration::from_micros(100));
                }
                broker.publish();
            }
            broker
        });
        for s in 1..=1000 {
            match take(&inner, 1) {
                Event::Message(m) => {
                    assert_eq!(m.seq(), s);
                    assert_eq!(m.payload().len(), 3000);
                }
                other => panic!("{other:?}"),
            }
        }
        let broker = writer.join().unwrap();
        // Nothing went on the socket but doorbells.
        broker.doorbells();
        assert!(inner.state.lock().closed.is_none());
    }

    /// A relay (it publishes something for each message it takes) is not
    /// waiting for answers, though it sent since its last read: with a
    /// message every 150 µs, within the answer's window, it must not spin
    /// all the time between them (with dc1e7b5 it did: an echo at 6,700
    /// messages a second used a whole CPU). A few tries, since a loaded
    /// machine may stretch any one of them.
    #[test]
    fn a_relay_does_not_spin_away_the_time_between_its_messages() {
        let mut tries = Vec::new();
        for _ in 0..3 {
            let (used, wall) = relay_cpu();
            if used < wall / 2 {
                return;
            }
            tries.push((used, wall));
        }
        panic!("the relay used (CPU, wall): {tries:?}");
    }

    /// The CPU a relay's thread used, and the time it took, for messages
    /// 150 µs apart.
    fn relay_cpu() -> (Duration, Duration) {
        const ROUNDS: u64 = 400;
        const MEASURED_FROM: u64 = 50;
        const EVERY: Duration = Duration::from_micros(150);
        let (inner, mut broker) = linked_inner(8);
        inner.state.lock().add_sub(1, Vec::new());
        let writer = std::thread::spawn(move || {
            // Paced by the clock, not by sleeps (which come late).
            let mut next = Instant::now();
            for s in 1..=ROUNDS {
                next += EVERY;
                while Instant::now() < next {
                    std::hint::spin_loop();
                }
                broker.write(&deliver(1, s), b"m");
                // What the relay published, taken as the broker would.
                broker.records();
            }
            broker
        });
        let cpu = || {
            let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
            Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
        };
        let (mut wall, mut used) = (Instant::now(), cpu());
        for s in 1..=ROUNDS {
            if s == MEASURED_FROM {
                (wall, used) = (Instant::now(), cpu());
            }
            assert_eq!(seq(take(&inner, 1)), s);
            publish(&inner, "relayed", b"m").unwrap();
        }
        let (wall, used) = (wall.elapsed(), cpu() - used);
        writer.join().unwrap();
        (used, wall)
    }

    #[test]
    fn a_marker_takes_its_socket_packet_with_fds_in_order_between_ring_frames() {
        let (inner, mut broker) = linked_inner(2);
        inner.state.lock().add_sub(1, Vec::new());
        broker.write(&deliver(1, 1), b"one");
        let memfd = memfd::from_bytes("test", b"two").unwrap();
        let d = Deliver { payload: PayloadRef::Memfd { len: 3 }, ..deliver(1, 2) };
        broker.write_with_fds(&d, &[memfd.as_fd()]);
        broker.write(&deliver(1, 3), b"three");
        let payloads: Vec<Vec<u8>> = (1..=3)
            .map(|s| match take(&inner, 1) {
                Event::Message(m) => {
                    assert_eq!(m.seq(), s);
                    m.payload().to_vec()
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(payloads, [&b"one"[..], b"two", b"three"]);

        // A packet read ahead of its marker (the client found the ring
        // empty and drained the socket) waits for it.
        let memfd = memfd::from_bytes("test", b"four").unwrap();
        let d = Deliver { payload: PayloadRef::Memfd { len: 4 }, ..deliver(1, 4) };
        broker.send_socket(&d, &[memfd.as_fd()]);
        assert!(inner.wait_for(Some(Instant::now()), |st| st.take_event(1)).unwrap().is_none());
        let map = &broker.link.map;
        assert!(broker.producer.try_push(map.peer(), map.my_data(), RecordKind::Marker, &[]).unwrap());
        broker.push(&deliver(1, 5), b"five");
        broker.publish();
        assert_eq!(seq(take(&inner, 1)), 4);
        assert_eq!(seq(take(&inner, 1)), 5);

        // Fds on the socket are counted for acks as ever (window 2: one
        // is half), and the acks go in the ring.
        read_a_moment(&inner).unwrap();
        assert_eq!(broker.records(), ["ack 1", "ack 1"]);
        assert!(inner.state.lock().closed.is_none());
    }

    #[test]
    fn a_sleeping_broker_is_rung_once_and_a_waking_one_never() {
        let (inner, mut broker) = linked_inner(8);
        publish(&inner, "a.b", b"1").unwrap();
        assert_eq!(broker.doorbells(), 0, "the broker is not asleep");
        // The broker goes to sleep: one doorbell, however many follow.
        let map = &broker.link.map;
        assert!(!broker.consumer.prepare_sleep(map.mine(), map.peer()).unwrap(), "a record waits");
        assert_eq!(broker.records(), ["publish a.b 1"]);
        let map = &broker.link.map;
        assert!(broker.consumer.prepare_sleep(map.mine(), map.peer()).unwrap());
        publish(&inner, "a.b", b"2").unwrap();
        publish(&inner, "a.b", b"3").unwrap();
        assert_eq!(broker.doorbells(), 1);
        assert_eq!(broker.records(), ["publish a.b 1", "publish a.b 1"]);
        // Awake again: no doorbell.
        broker.consumer.wake(broker.link.map.mine());
        publish(&inner, "a.b", b"4").unwrap();
        assert_eq!(broker.doorbells(), 0);
        assert_eq!(broker.records(), ["publish a.b 1"]);
    }

    #[test]
    fn a_reader_with_nothing_to_read_says_it_sleeps_and_is_woken_by_the_socket() {
        let (inner, mut broker) = linked_inner(8);
        inner.state.lock().add_sub(1, Vec::new());
        // A read that does not wait leaves the flag up: the broker rings.
        assert!(inner.wait_for(Some(Instant::now()), |st| st.take_event(1)).unwrap().is_none());
        let map = &broker.link.map;
        assert_eq!(map.peer().consumer_sleep.v.load(Ordering::Relaxed) & 1, 1);
        broker.write(&deliver(1, 1), b"");
        let map = &broker.link.map;
        assert!(socket::wait_readable(inner.fd.as_fd(), Some(Duration::ZERO)).unwrap(), "rung");
        assert_eq!(seq(take(&inner, 1)), 1);
        // A reader blocked on the socket is woken by the doorbell.
        let inner = Arc::new(inner);
        let waiting = {
            let inner = inner.clone();
            std::thread::spawn(move || seq(take(&inner, 1)))
        };
        while map.peer().consumer_sleep.v.load(Ordering::Relaxed) & 1 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        broker.write(&deliver(1, 2), b"");
        assert_eq!(waiting.join().unwrap(), 2);
    }

    #[test]
    fn a_broker_waiting_for_room_is_rung_once_the_ring_is_read_down_to_half() {
        let (inner, mut broker) = linked_inner(8);
        inner.state.lock().add_sub(1, Vec::new());
        let payload = vec![1u8; 4000];
        let mut n = 0;
        loop {
            let map = &broker.link.map;
            let head = encode_head(&deliver(1, n + 1)).unwrap();
            if !broker
                .producer
                .try_push(map.peer(), map.my_data(), RecordKind::Frame, &[&head, &payload])
                .unwrap()
            {
                break;
            }
            n += 1;
        }
        broker.publish();
        let map = &broker.link.map;
        assert!(broker.producer.prepare_wait(map.mine(), map.peer(), 4100).unwrap());
        for s in 1..=n {
            assert_eq!(seq(take(&inner, 1)), s);
        }
        assert_eq!(broker.doorbells(), 1);
    }

    #[test]
    fn a_full_ring_waits_and_resumes_when_the_broker_makes_room() {
        let (inner, mut broker) = linked_inner(8);
        let inner = Arc::new(inner);
        let payload = vec![3u8; 10_000];
        let total = 3 * DEFAULT_CAPACITY as usize / payload.len();
        let publisher = {
            let inner = inner.clone();
            std::thread::spawn(move || {
                for _ in 0..total {
                    publish(&inner, "big", &payload).unwrap();
                }
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(!publisher.is_finished(), "the ring cannot hold them all");
        let map = &broker.link.map;
        assert_eq!(map.peer().producer_wait.v.load(Ordering::Relaxed) & 1, 1, "the sender says it waits");
        let mut got = 0;
        let mut rung = 0;
        let deadline = Instant::now() + PATIENCE;
        while got < total {
            assert!(Instant::now() < deadline, "{got} of {total}");
            // Reads a few at a time, giving room back as it goes.
            let mut buf = Vec::new();
            for _ in 0..4 {
                buf.clear();
                let map = &broker.link.map;
                match broker.consumer.next(map.peer(), map.peer_data(), &mut buf).unwrap() {
                    Some(RecordKind::Frame) => {
                        assert_eq!(describe(&buf), "publish big 10000");
                        got += 1;
                    }
                    Some(RecordKind::Marker) => panic!("a marker"),
                    None => std::thread::sleep(Duration::from_millis(1)),
                }
            }
            rung += usize::from(broker.make_room());
        }
        publisher.join().unwrap();
        assert!(rung >= 1);
        assert_eq!(broker.doorbells(), 0, "no doorbell: the room is a futex word");
    }

    #[test]
    fn a_frame_with_fds_goes_on_the_socket_and_a_marker_keeps_its_place() {
        let (inner, mut broker) = linked_inner(8);
        publish(&inner, "a", b"before").unwrap();
        let fd = memfd::from_bytes("test", b"xyz").unwrap();
        {
            let mut s = inner.lock_send();
            let body = Publish { topic: "a", origin: None, payload: PayloadRef::Memfd { len: 3 } };
            inner.send_locked_with_fds(&mut s, &body, &[], &[fd.as_fd()]).unwrap();
        }
        publish(&inner, "a", b"after").unwrap();
        assert_eq!(broker.socket_packets(), [("publish a 0".to_owned(), 1)]);
        assert_eq!(broker.records(), ["publish a 6", "marker", "publish a 5"]);
    }

    #[test]
    fn records_left_in_the_ring_at_eof_are_delivered_before_the_close() {
        let (inner, mut broker) = linked_inner(8);
        inner.state.lock().add_sub(1, Vec::new());
        for s in 1..=3 {
            broker.push(&deliver(1, s), b"x");
        }
        broker.publish();
        let FakeBroker { fd, link, .. } = broker;
        drop(fd);
        for s in 1..=3 {
            assert_eq!(seq(take(&inner, 1)), s);
        }
        match inner.wait_for(Some(Instant::now() + PATIENCE), |st| st.take_event(1)) {
            Err(RecvError::Disconnected(d)) => assert_eq!(d.reason, "the broker closed the connection"),
            other => panic!("{other:?}"),
        }
        // A send now fails as it would on the socket.
        assert!(matches!(publish(&inner, "a", b""), Err(RecvError::Disconnected(_))));
        drop(link);
    }

    #[test]
    fn a_goodbye_in_the_ring_gives_the_reason() {
        let (inner, mut broker) = linked_inner(8);
        inner.state.lock().add_sub(1, Vec::new());
        broker.push(&deliver(1, 1), b"x");
        let bye = Goodbye { code: GoodbyeCode::Denied, reason: "go away" };
        broker.push(&bye, b"");
        broker.publish();
        drop(broker);
        assert_eq!(seq(take(&inner, 1)), 1);
        assert!(inner.wait_for(Some(Instant::now() + PATIENCE), |st| st.take_event(1)).is_err());
        assert_eq!(closed(&inner).reason, "go away");
    }

    #[test]
    fn a_dead_broker_fails_a_send_instead_of_taking_it() {
        let (inner, broker) = linked_inner(8);
        publish(&inner, "a", b"").unwrap();
        drop(broker);
        // The check comes within ALIVE_CHECK and a tick of the coarse
        // clock (at most 10 ms).
        std::thread::sleep(ALIVE_CHECK + Duration::from_millis(10));
        assert!(matches!(publish(&inner, "a", b""), Err(RecvError::Disconnected(_))));
    }

    #[test]
    fn a_corrupt_ring_closes_the_connection_with_a_reason() {
        let (inner, broker) = linked_inner(8);
        inner.state.lock().add_sub(1, Vec::new());
        // The broker's write position jumps more than the ring ahead.
        broker.map().mine().tail.v.store(u64::from(DEFAULT_CAPACITY) + 8, Ordering::Release);
        let got = inner.wait_for(Some(Instant::now() + PATIENCE), |st| st.take_event(1));
        assert!(matches!(got, Err(RecvError::Disconnected(_))), "{got:?}");
        let d = closed(&inner);
        assert_eq!(d.code, Some(GoodbyeCode::ProtocolViolation));
        assert!(d.reason.contains("shared-memory link"), "{}", d.reason);
        // And our side is closed, so the broker lets go.
        assert!(broker.socket_packets().iter().all(|(p, _)| p == "doorbell"));
        assert!(hung_up(broker.fd.as_fd()));

        // A record of a kind that cannot be.
        let (inner, broker) = linked_inner(8);
        broker.map().my_data()[0].store(9 << 32 | 8, Ordering::Relaxed);
        broker.map().mine().tail.v.store(16, Ordering::Release);
        assert!(read_a_moment(&inner).is_err());
        assert!(closed(&inner).reason.contains("unknown kind"), "{:?}", closed(&inner));

        // A reader position past what was written, seen by a sender.
        let (inner, broker) = linked_inner(8);
        broker.map().mine().head.v.store(1 << 40, Ordering::Release);
        // Fills the ring until the sender looks at the broker's position.
        let big = vec![0u8; 60_000];
        let failed = (0..100).find_map(|_| publish(&inner, "a", &big).err());
        assert!(matches!(failed, Some(RecvError::Disconnected(_))), "{failed:?}");
        assert_eq!(closed(&inner).code, Some(GoodbyeCode::ProtocolViolation));
    }

    #[test]
    fn a_marker_without_its_packet_is_a_violation() {
        let (inner, mut broker) = linked_inner(8);
        let map = &broker.link.map;
        assert!(broker.producer.try_push(map.peer(), map.my_data(), RecordKind::Marker, &[]).unwrap());
        broker.publish();
        assert!(read_a_moment(&inner).is_err());
        let d = closed(&inner);
        assert_eq!(d.code, Some(GoodbyeCode::ProtocolViolation));
        assert!(d.reason.contains("not on the socket"), "{}", d.reason);
    }

    #[test]
    fn packets_without_markers_are_bounded() {
        let (inner, broker) = linked_inner(8);
        inner.state.lock().add_sub(1, Vec::new());
        let sender = std::thread::spawn(move || {
            for s in 0..=FIFO_MAX as u64 {
                broker.send_socket(&deliver(1, s), &[]);
            }
            broker
        });
        let got = inner.wait_for(Some(Instant::now() + PATIENCE), |st| st.take_event(1));
        assert!(matches!(got, Err(RecvError::Disconnected(_))), "{got:?}");
        assert!(closed(&inner).reason.contains("without their markers"), "{:?}", closed(&inner));
        drop(sender.join().unwrap());
    }

    #[test]
    fn socket_only_when_not_attached() {
        let (ours, _theirs) = socket::pair().unwrap();
        let inner = Inner::new(ours, 1, limits(8), PeerCred { pid: 1, uid: 0, gid: 0 }, "t".into(), 16);
        assert_eq!(inner.transport(), Transport::Socket);
        inner.attach(Attachment::SocketOnly("declined".into()));
        assert_eq!(inner.transport(), Transport::Socket);
        assert_eq!(inner.transport_note().as_deref(), Some("declined"));
        let _ = State::default();
    }
}
