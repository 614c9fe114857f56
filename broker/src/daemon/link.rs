//! One connection's shared-memory transport, as the reactor drives it
//! (the layout and algorithm are `shmbus_proto::link`; who may have one
//! and what it costs is `bus/link.rs`).
//!
//! Model: the client's ring is read in the loop like a socket, but with
//! no system call: while a connection is *hot* (records came within its
//! spin window), the reactor looks at its ring every turn and polls the
//! kernel only now and then ([`POLL_WHILE_SPINNING`]); once every hot ring
//! has been quiet for its window, the reactor raises each one's sleep flag
//! and blocks in `epoll` like any idle broker, costing nothing until a
//! client rings (a `Doorbell` packet on its socket). While it spins, it
//! gives its CPU away only to someone who needs it: each client says in
//! its half which CPU it runs on and whether it is only waiting for us
//! (`presence`), so a broker sharing a CPU with a client that merely waits
//! spins on, and one sharing it with a client that has frames to read
//! yields at once ([`CpuWanted`]). Frames to the client
//! go into the broker's ring; when it is full they wait in the bus's queue
//! for that peer, where the overflow policy applies as it does for a full
//! socket, and the client rings once it has read the ring down to half.
//!
//! Invariants:
//! - The client's half is hostile memory. Every record is copied out
//!   before it is decoded; every position is checked against the capacity
//!   agreed at `Attach`, never the one in memory; nothing here ever waits
//!   on a word the client writes. A lie ends the connection with a reason.
//! - Frames with fds go on the socket, alone, and a marker record holds
//!   their place: the broker sends the packet before it writes the
//!   marker, and checks the ring has room for the marker before it sends.
//!   The client does the same the other way, so a marker always finds its
//!   packet already in the socket. The socket is read one packet at a
//!   time, and no further once a packet with fds is held whose marker has
//!   not come up ([`ConnLink::ahead`]): a client can make the broker hold
//!   at most one packet's fds (4) it has not asked for yet; the rest wait
//!   in the kernel, charged to the sender.
//! - On the socket of a linked connection a client may send only
//!   doorbells and frames with fds; anything else is a protocol violation.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use shmbus_proto::link::shm::LinkMap;
use shmbus_proto::link::{Consumer, Presence, Producer};
use shmbus_proto::sys::socket::RecvStatus;

/// How often the reactor asks the kernel for events while it spins on hot
/// rings: often enough that socket-only clients and sleeping rings wait at
/// most this long behind a busy one, rarely enough to stay far below one
/// system call per thousand messages at millions of messages a second.
pub const POLL_WHILE_SPINNING: Duration = Duration::from_micros(1000);
/// The same, while the hot rings are all empty: the broker spins with
/// nothing to do, so a poll costs no one anything; without this, a client
/// keeping its ring hot with a record every ~80 µs made every socket
/// client's round trip wait up to `POLL_WHILE_SPINNING` (p50 40 µs → 680 µs).
pub const POLL_WHILE_IDLE: Duration = Duration::from_micros(5);
/// The same, right after a poll that found events: more may follow soon.
pub const POLL_AFTER_EVENTS: Duration = Duration::from_micros(50);
/// Bounds of a ring's spin window: how long it stays hot after its last
/// record. Adaptive: doubled when the client rang soon after the ring was
/// put to sleep (sleeping there cost a doorbell and a wake-up for nothing),
/// halved when it slept long.
pub const MIN_SPIN: Duration = Duration::from_micros(10);
pub const START_SPIN: Duration = Duration::from_micros(50);
pub const MAX_SPIN: Duration = Duration::from_micros(400);
/// Spinning pays only for a dense stream: when records come further apart
/// than this on average (a sleep and a doorbell cost about this much), the
/// ring sleeps as soon as it is empty. Without this rule a client that
/// trickles one record per few hundred µs would keep the broker spinning
/// on a whole CPU for it.
pub const DENSE_GAP: Duration = Duration::from_micros(100);
/// A client that writes a record within this of the broker writing into
/// its ring, on average, is *answering*: after each delivery its ring
/// stays hot for twice its answer time (at least [`MIN_SPIN`], at most
/// twice this), so the broker catches the answer spinning instead of
/// sleeping between the hops of a conversation. Without it, once a
/// request/answer exchange's records came further apart than
/// [`DENSE_GAP`] (a preemption, a few slow hops), every ring got
/// [`MIN_SPIN`], the broker slept at every hop, and each hop cost a
/// doorbell and the wake-up of a halted vCPU: the busy round trip
/// settled at 210-240 µs for whole runs (pinned apart, 3 runs in 13),
/// where it is 5 µs. A client that trickles without being answered (or
/// answers slowly) gets nothing from this.
pub const ANSWER_GAP: Duration = DENSE_GAP;

/// Quiet turns over the hot rings spun before the broker starts giving its
/// CPU away (`sched_yield`) between turns, until the windows run out: on a
/// machine with fewer CPUs than busy processes, the client that writes
/// next may be waiting for this very CPU. (256 pure turns then 16 yields
/// kept a busy exchange's clients waiting for the broker's spin to end:
/// its round trip's p99 was 150 µs, now 15.) A quiet turn takes about
/// 100 ns, and a busy stream's records come far closer than 8 of them.
pub const PURE_SPIN_TURNS: u32 = 8;
/// A `sched_yield` that came back sooner than this ran no one else (a
/// system call alone takes 0.5 µs here, a switch and back 2–3 µs).
pub const YIELD_ALONE: Duration = Duration::from_micros(1);
/// A yield that took this long gave the CPU to a process that kept it for
/// a time slice (a CPU-bound one: a client answers or sleeps in µs); the
/// broker then yields no more for [`YIELD_BAN`]. Yielding to CPU hogs at
/// every quiet turn made a socket client's round trip 2.7 ms (from 60 µs)
/// while a linked client trickled.
pub const YIELD_LONG: Duration = Duration::from_micros(100);
pub const YIELD_BAN: Duration = Duration::from_millis(10);
/// While no process we know of waits for this CPU (every linked client
/// says it runs elsewhere, or waits for us with nothing to read), the
/// broker still yields this often, for the ones it cannot see.
pub const YIELD_PROBE: Duration = Duration::from_micros(50);
/// After a `Maybe` yield that ran no one, the next waits this long, and
/// twice as long after each further one in a row, up to
/// [`ALONE_BACKOFF_MAX`] (see [`alone_backoff`]).
pub const ALONE_BACKOFF_START: Duration = Duration::from_micros(1);
pub const ALONE_BACKOFF_MAX: Duration = Duration::from_micros(16);

/// How long after the last yield a `Maybe` yield waits, when the last
/// `alone` yields in a row ran no one: none after none, then
/// [`ALONE_BACKOFF_START`] doubled each time, up to [`ALONE_BACKOFF_MAX`].
/// A yield that runs no one says no process waits for this CPU now; the
/// ones that may come (a client we rang, woken where the kernel likes) are
/// looked for less and less often while none comes. Without it, a broker
/// waiting out a publisher's wake-up with a subscriber's unread frames
/// behind it yielded at every quiet turn: 1.8 to 3 `sched_yield`s per
/// 1,000 messages at 4.4-4.7M msgs/s (`diag-link-tp --size 16`), 1,971 of
/// 1,998 counted in one run running no one. A yield that runs
/// someone, and a wake-up we cause, start again from none.
pub fn alone_backoff(alone: u32) -> Duration {
    match alone {
        0 => Duration::ZERO,
        n => ALONE_BACKOFF_START.saturating_mul(1 << (n - 1).min(16)).min(ALONE_BACKOFF_MAX),
    }
}

/// Linked clients whose unread frames the broker follows at most; past
/// that it yields as if it did not know where they run.
pub const UNREAD_TRACKED: usize = 64;
/// How long a verdict of [`CpuWanted`] stands while nothing happens: each
/// look loads the `presence` words, and the lines the clients write, so a
/// look per quiet turn (100 ns) made each client's next store a cache
/// miss (the busy round trip went from 5.0 to 5.15 µs). A turn that
/// wrote into a ring, and a yield, ask again at once.
pub const CPU_WANTED_FOR: Duration = Duration::from_micros(5);

/// Whether a process on the broker's CPU waits for it, from what the
/// linked clients say about themselves ([`Presence`]). On a machine with
/// fewer CPUs than busy processes, one on the broker's CPU runs only when
/// the broker yields; one elsewhere, or one waiting for the broker with
/// nothing to read, needs nothing from it, and yielding to it gave a busy
/// round trip 2 extra context switches (9.6 µs instead of 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CpuWanted {
    /// No one we know of: yield only every [`YIELD_PROBE`], for those we
    /// cannot see (socket clients, other processes).
    No,
    /// Someone may: yield after a short pure spin, as without the words.
    Maybe,
    /// A client on this CPU has frames to read, or runs its own code:
    /// yield at once.
    Known,
}

/// A client with frames from us it had not read when last looked at, as
/// the broker on CPU `here` sees it: `None` once it no longer matters
/// (it read them, or it runs elsewhere and needs nothing from this CPU).
/// `unread` loads its read position; only called when its CPU may be
/// ours, so a client elsewhere costs no load of that line. `rang`: it
/// slept and was rung since, so the kernel wakes it on a CPU of its
/// choosing, whatever it said.
pub fn reader_wants(
    here: u32,
    said: Presence,
    rang: bool,
    unread: impl FnOnce() -> bool,
) -> Option<CpuWanted> {
    let verdict = match said {
        Presence::Waiting { cpu } | Presence::Running { cpu } if !rang && cpu != here => return None,
        Presence::Waiting { .. } | Presence::Running { .. } if !rang => CpuWanted::Known,
        _ => CpuWanted::Maybe,
    };
    unread().then_some(verdict)
}

/// A hot client (one that writes to us) as the broker on CPU `here` sees
/// it: one running its own code here may be about to write.
pub fn writer_wants(here: u32, said: Presence) -> CpuWanted {
    match said {
        Presence::Running { cpu } if cpu == here => CpuWanted::Known,
        Presence::Unknown => CpuWanted::Maybe,
        _ => CpuWanted::No,
    }
}
/// Records read from one ring per turn before the next connection's turn.
pub const RECORDS_PER_TURN: usize = 256;
/// Deliveries one ring's records may cause per turn: a stream fanned out
/// to many subscribers counts once per subscriber. (With the socket's
/// budget, 32 Ki, two publishers fanning out to 70 subscribers made turns
/// of several ms, and a socket client's round trip waited for them: p99
/// 16 ms, 25 ms at p50 in a debug build.)
pub const WORK_PER_TURN: u64 = 512;
/// How long one turn over the hot rings may run at full shares: past it,
/// each ring left gets [`WORK_LATE`] (enough for a conversation's record,
/// little for a fan-out), so the loop gets back to the kernel's events
/// and the frames it owes sockets; the next turn starts after the ring
/// that ran this one long.
pub const TURN_TIME: Duration = Duration::from_micros(200);
pub const WORK_LATE: u64 = 64;

/// One turn's shares over the hot rings, in their order: [`WORK_PER_TURN`]
/// each until the turn has run [`TURN_TIME`], [`WORK_LATE`] each after;
/// and where the next turn starts.
pub struct TurnShares {
    started: Instant,
    /// The ring after which the shares were cut, if the turn ran long.
    ran_long_at: Option<usize>,
}

impl TurnShares {
    pub fn new(started: Instant) -> TurnShares {
        TurnShares { started, ran_long_at: None }
    }

    /// The deliveries the next ring may cause.
    pub fn budget(&self) -> u64 {
        if self.ran_long_at.is_some() {
            WORK_LATE
        } else {
            WORK_PER_TURN
        }
    }

    /// The ring at `i` gave `got` records; `now` reads the clock (only
    /// after a ring that had records, at full shares).
    pub fn read(&mut self, i: usize, got: usize, now: impl FnOnce() -> Instant) {
        if got > 0 && self.ran_long_at.is_none() && now().saturating_duration_since(self.started) >= TURN_TIME
        {
            // Fan-outs to many: the rings after this one get a small share
            // each, enough for a conversation's record, and the loop gets
            // back to the kernel's events and the sockets' frames.
            self.ran_long_at = Some(i);
        }
    }

    /// How far to rotate the `len` hot rings so that the next turn starts
    /// after the ring that ran this one long: the long ones take turns at
    /// the full share. (Rotating by one kept the same one ahead: of two
    /// heavy publishers, the second got its full share one turn in ten.)
    /// An index shifted by a ring removed meanwhile only moves who goes
    /// first.
    pub fn rotation(&self, len: usize) -> usize {
        match self.ran_long_at {
            Some(at) if len > 1 => (at + 1) % len,
            _ => 0,
        }
    }
}
/// Socket packets read from a linked connection per event, at most:
/// doorbells come at most once per time the broker's ring went to sleep,
/// so more is a client ringing for nothing; the rest waits for the next
/// event or marker.
pub const SOCKET_READS: usize = 64;
/// Packets one receive from a linked socket takes at most: one, so that a
/// client can make the broker hold at most one packet's fds (4) ahead of
/// their marker. (Two saved a receive per doorbell, but let a client park
/// 8 fds per connection in the broker, 2,048 for a uid's 256 connections.)
pub const SOCKET_SLOTS: usize = 1;

/// A received packet: bytes, how it arrived, its fds.
pub type Packet = (Vec<u8>, RecvStatus, Vec<OwnedFd>);

pub struct ConnLink {
    pub map: LinkMap,
    /// Broker → client: our ring.
    pub producer: Producer,
    /// Client → broker: its ring.
    pub consumer: Consumer,
    /// Packets with fds read from the socket before their markers (at
    /// most [`SOCKET_SLOTS`]).
    pub ahead: VecDeque<Packet>,
    /// The client hung up; the ring is read to its end first.
    pub eof: bool,
    /// The last time a turn found records.
    pub last_record: Instant,
    /// The last time records came or the ring was woken: its spin window
    /// runs from here.
    pub active_at: Instant,
    /// When the ring was put to sleep; `None` while hot.
    pub slept_at: Option<Instant>,
    pub spin: Duration,
    /// Average time between the turns that found records (a moving
    /// average, 1/8 per turn).
    pub gap: Duration,
    /// The client broke the link's rules: its ring is never read again.
    pub broken: bool,
    /// The client lied about our ring: it is never written again.
    pub mute: bool,
    /// Its socket waits in the reactor's `drain_later` (at most once).
    pub drain_queued: bool,
    /// It is in the reactor's `unread_by` (at most once).
    pub unread_listed: bool,
    /// We rang it since it last read everything: it slept, and runs
    /// wherever the kernel wakes it.
    pub rang: bool,
    /// When we first wrote into its ring since its last record: an
    /// answer may be on its way.
    pub delivered_at: Option<Instant>,
    /// The ring went to sleep this long after that delivery, before an
    /// answer came: the answer took at least this (the time it was read
    /// at counts our own wake-up too).
    pub slept_awaiting: Option<Duration>,
    /// Average time from our writing into its ring to its next record (a
    /// moving average, 1/8 per answer; an answer missing for
    /// `2 * ANSWER_GAP` counts as that long).
    pub answer: Duration,
}

impl ConnLink {
    pub fn new(map: LinkMap, now: Instant) -> ConnLink {
        let capacity = map.capacity();
        let mut consumer = Consumer::new(capacity);
        // A frame is held to what a socket packet may be; one longer is
        // seen as longer from one byte more, without copying the rest (up
        // to half the ring, 8 MiB at 16 MiB) out of the client's half.
        consumer.truncate_frames(shmbus_proto::limits::MAX_PACKET + 1);
        ConnLink {
            map,
            producer: Producer::new(capacity),
            consumer,
            ahead: VecDeque::new(),
            eof: false,
            last_record: now,
            active_at: now,
            slept_at: None,
            spin: START_SPIN,
            gap: Duration::ZERO,
            broken: false,
            mute: false,
            drain_queued: false,
            unread_listed: false,
            rang: false,
            delivered_at: None,
            slept_awaiting: None,
            answer: Duration::ZERO,
        }
    }

    /// A turn found records: the average gap moves toward the time since
    /// the last one.
    /// One long gap (a preemption, a client that paused) counts as at most
    /// twice [`DENSE_GAP`], so it does not make a dense stream look sparse
    /// and its ring sleep between records, which makes the next gaps
    /// longer still; a sparse stream is still seen as one after a few.
    pub fn records_at(&mut self, now: Instant) {
        let gap = now.saturating_duration_since(self.last_record).min(DENSE_GAP * 2);
        self.gap = (self.gap * 7 + gap) / 8;
        self.last_record = now;
        self.active_at = now;
        if let Some(at) = self.delivered_at.take() {
            // A delivery made later in the turn that `now` began (another
            // ring's records): the answer is timed by the clock.
            let took = match self.slept_awaiting.take() {
                Some(floor) => floor,
                None if at > now => Instant::now().saturating_duration_since(at),
                None => now.saturating_duration_since(at),
            };
            self.answered(took);
        }
    }

    /// The client took `took` to write after we wrote to it (clamped, as
    /// a gap is, so one preemption does not undo a conversation).
    fn answered(&mut self, took: Duration) {
        self.answer = (self.answer * 7 + took.min(ANSWER_GAP * 2)) / 8;
    }

    /// Whether its records follow ours within [`ANSWER_GAP`] on average.
    pub fn answers(&self) -> bool {
        self.answer <= ANSWER_GAP
    }

    /// We wrote frames into its ring: an answer may follow. Whether the
    /// ring should stay hot for it: the client answers quickly, and this
    /// is the first delivery since its last record (so a client is waited
    /// for at most one window per record it writes, however many frames
    /// it is sent); its window then runs from now. An answer still
    /// missing after `2 * ANSWER_GAP` counts as that slow, so a client
    /// that only reads stops being waited for after a few.
    pub fn delivered(&mut self, now: Instant) -> bool {
        match self.delivered_at {
            None => {
                self.delivered_at = Some(now);
                self.slept_awaiting = None;
                if self.answers() {
                    self.active_at = now;
                    return true;
                }
            }
            Some(at) if now.saturating_duration_since(at) >= ANSWER_GAP * 2 => {
                self.answered(ANSWER_GAP * 2);
                self.delivered_at = Some(now);
                self.slept_awaiting = None;
            }
            Some(_) => {}
        }
        false
    }

    /// How long an empty ring stays hot: its adaptive window for a dense
    /// stream; twice its answer time while an answer is due from a
    /// client that answers quickly; the least otherwise.
    pub fn window(&self) -> Duration {
        if self.gap <= DENSE_GAP {
            self.spin
        } else if self.delivered_at.is_some() && self.answers() {
            (self.answer * 2).clamp(MIN_SPIN, ANSWER_GAP * 2)
        } else {
            MIN_SPIN
        }
    }

    /// The ring goes to sleep: from now the client rings.
    pub fn slept(&mut self, now: Instant) {
        self.slept_at = Some(now);
        if let Some(at) = self.delivered_at {
            self.slept_awaiting.get_or_insert(now.saturating_duration_since(at));
        }
    }

    /// The ring is hot again (a doorbell or other socket event): adapts
    /// the spin window to how long it slept.
    pub fn woke(&mut self, now: Instant) {
        if let Some(at) = self.slept_at.take() {
            let slept = now.saturating_duration_since(at);
            self.spin = if slept < self.spin * 4 {
                (self.spin * 2).min(MAX_SPIN)
            } else {
                (self.spin / 2).max(MIN_SPIN)
            };
        }
        self.active_at = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shmbus_proto::link::shm;

    fn link(now: Instant) -> ConnLink {
        ConnLink::new(shm::create(256 * 1024).expect("a link").map, now)
    }

    #[test]
    fn yields_that_run_no_one_come_ever_further_apart_up_to_a_bound() {
        let us = Duration::from_micros;
        let waits: Vec<_> = (0..7).map(alone_backoff).collect();
        assert_eq!(waits, [us(0), us(1), us(2), us(4), us(8), us(16), us(16)]);
        assert_eq!(alone_backoff(u32::MAX), ALONE_BACKOFF_MAX);
    }

    /// Where a reader of ours runs decides: here, it must be given the
    /// CPU; elsewhere it is dropped without its position being loaded;
    /// woken from sleep or silent, perhaps; read up, dropped.
    #[test]
    fn a_reader_wants_this_cpu_only_when_it_is_here_or_may_be() {
        let here = 1;
        let waiting = |cpu| Presence::Waiting { cpu };
        let never = || -> bool { panic!("the position of a reader elsewhere is not loaded") };
        assert_eq!(reader_wants(here, waiting(1), false, || true), Some(CpuWanted::Known));
        assert_eq!(reader_wants(here, Presence::Running { cpu: 1 }, false, || true), Some(CpuWanted::Known));
        assert_eq!(reader_wants(here, waiting(0), false, never), None);
        assert_eq!(reader_wants(here, waiting(0), true, || true), Some(CpuWanted::Maybe));
        assert_eq!(reader_wants(here, Presence::Unknown, false, || true), Some(CpuWanted::Maybe));
        assert_eq!(reader_wants(here, waiting(1), false, || false), None);
        assert_eq!(reader_wants(here, Presence::Unknown, true, || false), None);
    }

    /// A writer here that runs its own code may be about to write; one
    /// waiting for us, or elsewhere, needs nothing; a silent one, perhaps.
    #[test]
    fn a_writer_wants_this_cpu_only_when_it_runs_here() {
        assert_eq!(writer_wants(1, Presence::Running { cpu: 1 }), CpuWanted::Known);
        assert_eq!(writer_wants(1, Presence::Running { cpu: 0 }), CpuWanted::No);
        assert_eq!(writer_wants(1, Presence::Waiting { cpu: 1 }), CpuWanted::No);
        assert_eq!(writer_wants(1, Presence::Unknown), CpuWanted::Maybe);
    }

    /// Two rings whose full share takes longer than a turn, among eight
    /// light ones: over 20 turns each gets its full share half the time,
    /// and every light ring is read every turn.
    #[test]
    fn heavy_rings_take_turns_at_the_full_share() {
        let us = Duration::from_micros;
        let mut hot: Vec<&str> = vec!["h1", "h2", "l1", "l2", "l3", "l4", "l5", "l6", "l7", "l8"];
        let (mut full_h1, mut full_h2) = (0, 0);
        let mut clock = Instant::now();
        for _ in 0..20 {
            let mut shares = TurnShares::new(clock);
            let mut lights = 0;
            for (i, ring) in hot.iter().enumerate() {
                let budget = shares.budget();
                let heavy = ring.starts_with('h');
                clock += match (heavy, budget == WORK_PER_TURN) {
                    (true, true) => us(250),
                    (true, false) => us(30),
                    (false, _) => us(1),
                };
                match *ring {
                    "h1" if budget == WORK_PER_TURN => full_h1 += 1,
                    "h2" if budget == WORK_PER_TURN => full_h2 += 1,
                    _ if !heavy => lights += 1,
                    _ => {}
                }
                shares.read(i, 1, || clock);
            }
            assert_eq!(lights, 8, "every light ring is read every turn");
            let by = shares.rotation(hot.len());
            hot.rotate_left(by);
        }
        assert_eq!((full_h1, full_h2), (10, 10), "the two heavy rings alternate at the full share");
    }

    /// A turn that stays short keeps full shares and its order.
    #[test]
    fn a_short_turn_keeps_full_shares_and_its_order() {
        let t0 = Instant::now();
        let mut shares = TurnShares::new(t0);
        for i in 0..4 {
            assert_eq!(shares.budget(), WORK_PER_TURN);
            shares.read(i, 3, || t0 + Duration::from_micros(10 * i as u64));
        }
        shares.read(4, 0, || panic!("a ring without records does not read the clock"));
        assert_eq!(shares.rotation(5), 0);
    }

    /// A sparse client that answers our frames in 20 µs is waited for
    /// after each delivery, twice that long; one that never answers is
    /// waited for no more after a few deliveries; a trickle we never
    /// write to gets the least window.
    #[test]
    fn only_a_client_that_answers_quickly_is_waited_for() {
        let us = Duration::from_micros;
        let t0 = Instant::now();
        let mut answerer = link(t0);
        let mut t = t0;
        for _ in 0..32 {
            t += us(500);
            assert!(answerer.delivered(t));
            t += us(20);
            answerer.records_at(t);
        }
        assert_eq!(answerer.window(), MIN_SPIN, "sparse, with no answer due: the least window");
        assert!(answerer.delivered(t + us(500)));
        let w = answerer.window();
        assert!(w >= us(39) && w <= us(41), "twice its answer time, 20 µs: {w:?}");
        assert_eq!(answerer.active_at, t + us(500), "the window runs from the delivery");
        assert!(!answerer.delivered(t + us(550)), "more frames before an answer renew nothing");
        assert_eq!(answerer.active_at, t + us(500));

        // An answer read after the ring slept is timed to the sleep (a
        // lower bound), not to our own wake-up.
        let mut woken = link(t0);
        assert!(woken.delivered(t0 + us(100)));
        woken.slept(t0 + us(140));
        woken.woke(t0 + us(400));
        woken.records_at(t0 + us(400));
        assert_eq!(woken.answer, us(40) / 8, "one answer of at least 40 µs, averaged in");

        let mut reader = link(t0);
        let mut t = t0;
        let mut waited = 0;
        for _ in 0..32 {
            t += us(300);
            waited += usize::from(reader.delivered(t));
        }
        assert_eq!(waited, 1, "a client that never answers is waited for once, not at each delivery");
        assert!(!reader.delivered(t + us(300)));
        assert!(reader.active_at < t, "its window is no longer renewed by deliveries");

        let mut trickler = link(t0);
        let mut t = t0;
        for _ in 0..32 {
            t += us(200);
            trickler.records_at(t);
        }
        assert_eq!(trickler.window(), MIN_SPIN, "a sparse stream we never answer: the least window");
    }

    /// A dense stream keeps its ring hot across one long pause (a
    /// preemption): only a run of long gaps makes it sparse. (Averaged
    /// unclamped, one 800 µs gap slept a ring that got a record every
    /// 10 µs, and the exchange collapsed into doorbells.)
    #[test]
    fn one_long_gap_does_not_make_a_dense_stream_sparse() {
        let t0 = Instant::now();
        let mut l = link(t0);
        let mut t = t0;
        for _ in 0..64 {
            t += Duration::from_micros(10);
            l.records_at(t);
        }
        assert_eq!(l.window(), START_SPIN, "dense: its adaptive window");
        t += Duration::from_micros(800);
        l.records_at(t);
        assert_eq!(l.window(), START_SPIN, "one 800 µs gap: still dense");
        for _ in 0..16 {
            t += Duration::from_millis(1);
            l.records_at(t);
        }
        assert_eq!(l.window(), MIN_SPIN, "a run of 1 ms gaps: sparse");
    }
}
