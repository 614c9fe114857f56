//! The event loop: the reactor that moves bytes for the bus core.
//!
//! Model (dbus-broker's): one thread, one edge-triggered `mio::Poll`, every
//! socket non-blocking, no locks. Everything that passes through the broker
//! is serialised by this one hop, which gives a total order. The loop owns
//! the sockets and nothing else: each packet goes to [`Bus::receive`], and
//! what the bus decides comes back as [`Effect`]s.
//!
//! One turn of the loop:
//! 1. wait for events (or the earliest deadline: the bus's Hello and close
//!    deadlines, retries, shutdown, the watchdog);
//! 2. accept, read and hand packets to the bus: each readable connection is
//!    drained with `recvmmsg` up to a budget, then goes to the back of the
//!    line so one fast peer cannot starve the rest;
//! 3. apply effects until none are left: flush a peer's sendable frames
//!    with `sendmmsg` until its queue is empty, its fd credit is spent, or
//!    its socket is full (then a writable event resumes it), small frames
//!    queued together sharing packets (`Batch`, [`frame::pack`]); close
//!    peers the bus has forgotten. Fd credit comes back from an `FdAck`
//!    only once the peer's socket shows every packet read (`SIOCOUTQ`,
//!    [`Reactor::confirm_reads`]).
//!
//! Resource failures are the broker's, not a peer's: `EMFILE` on accept is
//! retried on a timer (never a spin), a packet whose fds the kernel could
//! not install because the broker's fd table is full is reported to the
//! bus as such (the sender gets `BrokerResource`, not a disconnect), and
//! `ETOOMANYREFS` on send is retried shortly.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use tracing::{debug, info, warn};

use shmbus_proto::frame::{
    self, decode_client, encode_head, Attached, Batch, ClientFrame, Doorbell, Goodbye, GoodbyeCode, Kind,
};
use shmbus_proto::link::{shm as link_shm, LinkError, Presence, RecordKind};
use shmbus_proto::sync::Ordering;
use shmbus_proto::sys::socket::{self, OutPacket, RecvBatch, RecvStatus, MAX_BATCH};
use shmbus_proto::sys::{futex, sched};

use super::config::Config;
use super::link::{self, ConnLink, CpuWanted};
use super::signals::{SignalPipe, Signals};
use super::systemd::Notifier;
use crate::bus::driver::Damage;
use crate::bus::peer::{PeerId, PeerMap};
use crate::bus::{Bus, Effect};
use crate::daemon::read_turns::{ReadMark, ReadTurns};

const LISTENER: Token = Token(usize::MAX - 1);
const SIG_STOP: Token = Token(usize::MAX - 2);
const SIG_HUP: Token = Token(usize::MAX - 3);

/// Receive batches per connection per turn before yielding to others.
const READ_BUDGET: usize = 4;
/// Deliveries one uid's connections' packets may cause in one turn before
/// they yield to others: a publish fanning out to thousands of
/// subscriptions counts as thousands, so one peer's fan-out cannot hold up
/// the loop.
const WORK_BUDGET: u64 = 32 * 1024;
/// What one read of one connection may spend of its uid's `WORK_BUDGET`:
/// a quarter, so that in a turn several of a uid's connections are read
/// and a quiet one waits a turn at most behind its busy siblings, not a
/// turn behind each (`ReadTurns::share`).
const READ_QUANTUM: u64 = WORK_BUDGET / 4;
/// What one packet read from a socket counts against that budget, beside
/// the work it causes: a packet costs the broker some deliveries' worth
/// (a receive, a decode, a route), whether or not anyone hears it.
const PACKET_WORK: u64 = 8;
/// Packets per receive batch.
const RECV_SLOTS: usize = 32;
/// Frames asked of a peer's queue per `sendmmsg`, on average per packet:
/// small frames share packets (`Batch`), so one call can carry many more
/// frames than packets.
const FRAMES_PER_PACKET: usize = 16;
/// Retry delay after accept failed for lack of fds.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Retry delay after the kernel refused more fds in flight.
const FLUSH_RETRY: Duration = Duration::from_millis(10);

/// Runs a broker until SIGTERM or SIGINT; returns once every connection has
/// been flushed and closed (or the grace period ran out).
pub fn run(config: Config) -> io::Result<()> {
    let mut broker = Reactor::new(config)?;
    broker.serve()
}

/// One connection's socket, as the reactor holds it.
struct Conn {
    fd: OwnedFd,
    /// Registered for writable events: its socket was full at the last
    /// flush. Cleared once the queue drains.
    wants_write: bool,
    /// Packets received but not yet handed to the bus: the work budget ran
    /// out in the middle of a batch (each packet is checked against it).
    /// Handed over first at its next turn, before any new read.
    pending: std::collections::VecDeque<(Vec<u8>, RecvStatus, Vec<OwnedFd>)>,
    /// The shared-memory transport, once attached (`daemon/link.rs`).
    link: Option<ConnLink>,
    /// Its place in the read-again list: one read budget a turn
    /// (`daemon/read_turns.rs`).
    read_mark: ReadMark,
}

/// Why a flush into a link stopped early.
enum Stop {
    /// The ring has no room for a record of this many bytes.
    Full(usize),
    Corrupt(LinkError),
    Socket(io::Error),
}

struct Reactor {
    poll: Poll,
    listener: Option<OwnedFd>,
    bus: Bus,
    conns: PeerMap<Conn>,
    batch: Option<RecvBatch>,
    /// Connections to read again, and the loop's turns
    /// (`daemon/read_turns.rs`).
    read_again: ReadTurns,
    /// Socket packets handed to the bus so far (see `read_cost`).
    handed: u64,
    /// The last `read_link_ring` found its uid's budget spent (see
    /// `service_links`).
    ring_turned_away: bool,
    accept_retry_at: Option<Instant>,
    flush_retry: Vec<PeerId>,
    flush_retry_at: Option<Instant>,
    stop: SignalPipe,
    hup: SignalPipe,
    shutdown_deadline: Option<Instant>,
    notifier: Notifier,
    policy_path: Option<std::path::PathBuf>,
    /// Linked connections whose ring is read every turn (see
    /// `daemon/link.rs`); the others sleep until their client rings.
    hot: Vec<PeerId>,
    last_poll: Instant,
    poll_every: Duration,
    /// The last turn over the hot rings found no records: the broker spins
    /// with nothing to do, so a poll costs nothing to anyone and is made
    /// sooner (`link::POLL_WHILE_IDLE`).
    idle_turn: bool,
    /// Consecutive turns over hot rings that found nothing.
    quiet_turns: u32,
    /// Linked connections whose sockets were readable this turn, drained
    /// at its end ([`Reactor::drain_link_sockets`]).
    drain_later: Vec<PeerId>,
    /// The last yield ran another process: this CPU is shared with one
    /// that waits, and the next quiet stretch yields at once.
    shared_cpu: bool,
    /// No yields before then: the last one lost the CPU for a whole time
    /// slice ([`link::YIELD_LONG`]).
    no_yield_until: Option<Instant>,
    /// When the last yield ended.
    last_yield: Instant,
    /// Yields in a row that ran no one, since the last that ran someone or
    /// a wake-up we caused: a `Maybe` yield waits
    /// [`link::alone_backoff`] of them after the last.
    alone_yields: u32,
    /// Linked clients with frames from us in their ring they have not read
    /// yet (at most [`link::UNREAD_TRACKED`]; [`ConnLink::unread_listed`]):
    /// those on this CPU can read them only when we yield.
    unread_by: Vec<PeerId>,
    /// More had unread frames than `unread_by` holds: where they run is
    /// unknown until the list empties.
    unread_untracked: bool,
    /// A socket send since the last yield that ran no one may have woken
    /// a process on this CPU (a socket client, a sleeping linked one).
    woke_unknown: bool,
    /// The last [`Reactor::cpu_wanted`] verdict, when it was reached, and
    /// whether something since calls for a new one (see
    /// [`link::CPU_WANTED_FOR`]).
    wanted: CpuWanted,
    wanted_at: Instant,
    wanted_stale: bool,
    doorbell: Vec<u8>,
    /// One packet at a time, for linked connections' sockets.
    link_batch: Option<RecvBatch>,
    /// What a record of any linked connection is copied into, one at a
    /// time: one buffer for all, so a connection that once sent a large
    /// frame leaves nothing of that size behind (one each kept 72 KiB per
    /// connection, 18 MiB for a uid's 256).
    link_buf: Vec<u8>,
}

impl Reactor {
    fn new(mut cfg: Config) -> io::Result<Reactor> {
        let listener = match cfg.listen_fd.take() {
            Some(fd) => {
                // Passed in by a service manager: name it by what it is.
                // But not by a bare file name: a path socket the broker
                // made itself is bound by its name in its directory
                // (`config::listen`), and the path given names it.
                if let Ok(Some(a)) = socket::local_address(fd.as_fd()) {
                    if !matches!(&a, shmbus_proto::Address::Path(p) if p.is_relative()) {
                        cfg.address = a;
                    }
                }
                fd
            }
            None => socket::listen(&cfg.address, 1024)?,
        };
        cfg.bus.address = cfg.address.to_string();
        let poll = Poll::new()?;
        poll.registry().register(&mut SourceFd(&listener.as_raw_fd()), LISTENER, Interest::READABLE)?;
        let Signals { stop, hup } = match cfg.signals.take() {
            Some(s) => s,
            None => Signals::install()?,
        };
        poll.registry().register(&mut SourceFd(&stop.read.as_raw_fd()), SIG_STOP, Interest::READABLE)?;
        poll.registry().register(&mut SourceFd(&hup.read.as_raw_fd()), SIG_HUP, Interest::READABLE)?;
        info!("listening on {}", cfg.address);
        Ok(Reactor {
            poll,
            listener: Some(listener),
            bus: Bus::new(cfg.bus, Instant::now()),
            conns: PeerMap::default(),
            batch: Some(RecvBatch::new(RECV_SLOTS)),
            read_again: ReadTurns::default(),
            handed: 0,
            ring_turned_away: false,
            accept_retry_at: None,
            flush_retry: Vec::new(),
            flush_retry_at: None,
            stop,
            hup,
            shutdown_deadline: None,
            notifier: Notifier::from_env(),
            policy_path: cfg.policy_path,
            hot: Vec::new(),
            last_poll: Instant::now(),
            poll_every: link::POLL_WHILE_SPINNING,
            idle_turn: false,
            doorbell: encode_head(&Doorbell).expect("a doorbell encodes"),
            link_batch: Some(RecvBatch::new(link::SOCKET_SLOTS)),
            link_buf: Vec::with_capacity(256),
            quiet_turns: 0,
            drain_later: Vec::new(),
            shared_cpu: false,
            no_yield_until: None,
            last_yield: Instant::now(),
            alone_yields: 0,
            unread_by: Vec::new(),
            unread_untracked: false,
            woke_unknown: false,
            wanted: CpuWanted::Maybe,
            wanted_at: Instant::now(),
            wanted_stale: true,
        })
    }

    fn serve(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        let status = self.bus.status_line();
        self.notifier.ready(status);
        loop {
            self.read_again.next_turn();
            // While rings are hot the kernel is asked for events only now
            // and then, so a busy link costs no system call per message.
            let spinning = !self.hot.is_empty();
            // One clock read serves a turn that finds nothing (a spinning
            // broker's turns are mostly that, and each read costs 25 ns
            // here: five a turn were 40% of a busy link broker's
            // samples); what did work, or waited, reads it anew.
            let mut now = Instant::now();
            let since = now.saturating_duration_since(self.last_poll);
            let due = since >= self.poll_every || (self.idle_turn && since >= link::POLL_WHILE_IDLE);
            if !spinning || due {
                let timeout = if spinning { Some(Duration::ZERO) } else { self.next_timeout() };
                match self.poll.poll(&mut events, timeout) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
                now = Instant::now();
                self.last_poll = now;
                self.poll_every =
                    if events.is_empty() { link::POLL_WHILE_SPINNING } else { link::POLL_AFTER_EVENTS };
            } else {
                events.clear();
            }
            // Those left to read again first: a connection whose uid's
            // budget another of its connections spent last turn goes ahead
            // of that one's events this turn (else a uid's quiet
            // connection could wait for ever behind its busy one).
            for id in self.read_again.take() {
                if let Some(c) = self.conns.get_mut(&id) {
                    ReadTurns::taken(&mut c.read_mark);
                }
                self.read_conn(id);
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_all(),
                    SIG_STOP => {
                        if self.stop.drain() {
                            self.begin_shutdown();
                        }
                    }
                    SIG_HUP => {
                        if self.hup.drain() {
                            self.reload();
                        }
                    }
                    Token(t) if self.linked(t as PeerId) => {
                        let readable = ev.is_readable() || ev.is_read_closed() || ev.is_error();
                        if ev.is_read_closed() || ev.is_error() {
                            // Gone: once its ring is read to the end (a
                            // packet it sent ahead of a marker it never
                            // wrote must not keep it).
                            if let Some(link) = self.conn_link(t as PeerId) {
                                link.eof = true;
                            }
                        }
                        self.link_socket_event(t as PeerId, readable);
                    }
                    Token(t) => {
                        let id = t as PeerId;
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.read_conn(id);
                        }
                        if ev.is_writable() {
                            self.flush(id);
                        }
                    }
                }
            }
            if !self.hot.is_empty() {
                if !events.is_empty() {
                    now = Instant::now();
                }
                self.idle_turn = self.service_links(now) == 0;
                let yielded = self.spin_turn(self.idle_turn && events.is_empty(), now);
                if !self.idle_turn || yielded {
                    now = Instant::now();
                }
            } else if !events.is_empty() {
                now = Instant::now();
            }
            if self.accept_retry_at.is_some_and(|t| now >= t) {
                self.accept_retry_at = None;
                self.accept_all();
            }
            if self.flush_retry_at.is_some_and(|t| now >= t) {
                self.flush_retry_at = None;
                for id in std::mem::take(&mut self.flush_retry) {
                    self.flush(id);
                }
            }
            self.bus.tick(now);
            self.apply_effects();
            self.drain_link_sockets();
            if self.notifier.is_enabled() {
                // Only under a service manager: a status line costs a
                // format! per turn of the loop.
                if self.shutdown_deadline.is_none() {
                    let status = self.bus.status_line();
                    self.notifier.set_status(status);
                }
                self.notifier.tick(Instant::now());
            }
            if let Some(deadline) = self.shutdown_deadline {
                if self.bus.live() == 0 || Instant::now() >= deadline {
                    let left = self.bus.live();
                    self.bus.close_all();
                    self.apply_effects();
                    info!("shut down ({left} connections cut at the deadline)");
                    return Ok(());
                }
            }
        }
    }

    fn next_timeout(&mut self) -> Option<Duration> {
        if !self.read_again.is_empty() || !self.drain_later.is_empty() {
            return Some(Duration::ZERO);
        }
        let candidates = [
            self.shutdown_deadline,
            self.notifier.next_deadline(),
            self.accept_retry_at,
            self.flush_retry_at,
            self.bus.next_deadline(),
        ];
        let next = candidates.into_iter().flatten().min();
        next.map(|t| t.saturating_duration_since(Instant::now()))
    }

    // ------------------------------------------------------------ accept --

    fn accept_all(&mut self) {
        loop {
            let Some(listener) = &self.listener else { return };
            match socket::accept(listener.as_fd()) {
                Ok(Some(fd)) => self.on_accept(fd),
                Ok(None) => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::CONNABORTED.raw_os_error()) => {}
                Err(e) => {
                    // EMFILE and friends: the listener stays readable but
                    // edge-triggered polling will not say so again; retry
                    // on a timer, never in a loop.
                    if self.accept_retry_at.is_none() {
                        debug!("accept failed: {e}; retrying in {ACCEPT_RETRY:?}");
                    }
                    self.bus.note_broker_short();
                    self.accept_retry_at = Some(Instant::now() + ACCEPT_RETRY);
                    return;
                }
            }
        }
    }

    fn on_accept(&mut self, fd: OwnedFd) {
        let cred = match socket::peer_cred(fd.as_fd()) {
            Ok(c) => c,
            Err(e) => {
                debug!("dropping a connection whose credentials cannot be read: {e}");
                return;
            }
        };
        // Without its groups a deny by group could not hold: no groups, no
        // connection.
        let groups = match socket::peer_groups(fd.as_fd()) {
            Ok(g) => g,
            Err(e) => {
                debug!("dropping a connection whose groups cannot be read: {e}");
                return;
            }
        };
        let command = command_of(cred.pid);
        let id = match self.bus.connect(cred, groups, command, Instant::now()) {
            Ok(id) => id,
            Err((code, reason)) => return refuse(fd, code, &reason),
        };
        if let Err(e) = self.poll.registry().register(
            &mut SourceFd(&fd.as_raw_fd()),
            Token(id as usize),
            Interest::READABLE,
        ) {
            warn!("cannot watch a new connection: {e}");
            self.bus.hangup(id);
            self.bus.take_effects();
            return;
        }
        self.conns.insert(
            id,
            Conn {
                fd,
                wants_write: false,
                pending: Default::default(),
                link: None,
                read_mark: ReadMark::default(),
            },
        );
        // Data may already be waiting; the edge for it may have been missed.
        self.read_later(id);
    }

    // -------------------------------------------------------------- read --

    /// Queues `id` to be read again at the start of the next turn; once.
    fn read_later(&mut self, id: PeerId) {
        if let Some(c) = self.conns.get_mut(&id) {
            self.read_again.later(id, &mut c.read_mark);
        }
    }

    /// `id` spent its read budget in this turn: read again in a later one.
    fn spent(&mut self, id: PeerId) {
        if let Some(c) = self.conns.get_mut(&id) {
            self.read_again.spent(id, &mut c.read_mark);
        }
    }

    fn read_conn(&mut self, id: PeerId) {
        if self.linked(id) {
            return self.link_socket_event(id, true);
        }
        if self.conns.get(&id).is_some_and(|c| !self.read_again.may_read(&c.read_mark)) {
            // Its budget for this turn is spent (a readable event after
            // it): its next read comes in the next turn.
            return self.read_later(id);
        }
        // One budget a turn for all of a uid's connections, not one each:
        // a uid's many connections must not take many turns' worth.
        let uid = self.bus.peer(id).map(|p| p.cred.uid);
        let budget = uid.map_or(READ_QUANTUM, |u| self.read_again.share(u, WORK_BUDGET, READ_QUANTUM));
        if budget == 0 {
            // Not read at all: first in line next turn.
            if let Some(c) = self.conns.get_mut(&id) {
                self.read_again.deferred(id, &mut c.read_mark);
            }
            return;
        }
        let start = (self.bus.work(), self.handed);
        self.read_conn_with(id, budget, start);
        if let Some(u) = uid {
            self.read_again.uid_did(u, self.read_cost(start));
        }
    }

    /// What reading has cost since `start` (the bus's work, packets handed
    /// over): its deliveries and decisions, and [`PACKET_WORK`] a packet,
    /// so that packets that cause no delivery (a publish nobody hears) are
    /// no free ride: a review's uid of 128 connections of those held
    /// another uid's ping 160 ms, where one connection held it 0.3 ms.
    fn read_cost(&self, (work, handed): (u64, u64)) -> u64 {
        self.bus
            .work()
            .wrapping_sub(work)
            .saturating_add(self.handed.wrapping_sub(handed).saturating_mul(PACKET_WORK))
    }

    /// `read_conn`'s reading, with `budget` of work left for it.
    fn read_conn_with(&mut self, id: PeerId, budget: u64, start: (u64, u64)) {
        // What the budget left over last time goes first, in order.
        while let Some((data, status, fds)) = self.conns.get_mut(&id).and_then(|c| c.pending.pop_front()) {
            if self.bus.peer(id).is_none() {
                return;
            }
            if data.is_empty() {
                // End of stream: the client left.
                return self.bus.hangup(id);
            }
            self.hand_over(id, &data, status, fds);
            if self.read_cost(start) >= budget {
                if self.bus.peer(id).is_some() {
                    self.spent(id);
                }
                return;
            }
        }
        let mut batch = self.batch.take().unwrap_or_else(|| RecvBatch::new(RECV_SLOTS));
        let mut drained = false;
        'budget: for _ in 0..READ_BUDGET {
            let Some(conn) = self.conns.get(&id) else {
                drained = true;
                break;
            };
            // Closing and lingering peers are read too: their hang-up and
            // their fd acknowledgements are what ends them.
            if self.bus.peer(id).is_none() {
                drained = true;
                break;
            }
            if self.read_cost(start) >= budget {
                break;
            }
            let n = match batch.recv(conn.fd.as_fd(), true) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(e) => {
                    debug!("client {id}: receive failed: {e}");
                    self.bus.hangup(id);
                    drained = true;
                    break;
                }
            };
            for i in 0..n {
                if self.bus.peer(id).is_none() {
                    drained = true;
                    break 'budget;
                }
                if self.read_cost(start) >= budget {
                    // Spent: the rest of this batch waits for the next turn,
                    // so costly packets cannot take a whole batch's time.
                    let rest: Vec<_> = (i..n)
                        .map(|j| {
                            let (data, status, fds) = batch.packet(j);
                            (data.to_vec(), status, fds)
                        })
                        .collect();
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.pending.extend(rest);
                    }
                    break 'budget;
                }
                let (data, status, fds) = batch.packet(i);
                if data.is_empty() {
                    // End of stream: the client left.
                    self.bus.hangup(id);
                    drained = true;
                    break 'budget;
                }
                self.hand_over(id, data, status, fds);
            }
            if n < RECV_SLOTS {
                drained = true;
                break;
            }
        }
        self.batch = Some(batch);
        if !drained {
            self.spent(id);
        } else {
            let used_share = self.read_cost(start) >= budget;
            if let Some(c) = self.conns.get_mut(&id) {
                ReadTurns::drained(&mut c.read_mark, used_share);
            }
        }
    }

    // ------------------------------------------------------------ output --

    /// Hands one received packet to the bus, damaged or not.
    fn hand_over(&mut self, id: PeerId, data: &[u8], status: RecvStatus, fds: Vec<OwnedFd>) {
        self.handed = self.handed.wrapping_add(1);
        let now = Instant::now();
        if status.truncated {
            self.bus.receive_damaged(id, Damage::Truncated, data, now);
        } else if status.fds_truncated {
            drop(fds);
            let damage = if fd_table_full(conn_fd(&self.conns, id)) {
                Damage::BrokerOutOfFds
            } else {
                Damage::TooManyFds
            };
            self.bus.receive_damaged(id, damage, data, now);
        } else {
            self.bus.receive(id, data, fds, now);
        }
    }

    fn apply_effects(&mut self) {
        loop {
            let effects = self.bus.take_effects();
            if effects.is_empty() {
                return;
            }
            for e in effects {
                match e {
                    Effect::Flush(id) => self.flush(id),
                    Effect::Close(id) => self.close(id),
                    Effect::Attach(id, capacity) => self.attach_link(id, capacity),
                    // `flush` looks first at whether the acknowledged fds
                    // were read.
                    Effect::Acked(id) => self.flush(id),
                    Effect::Shutdown(id) => {
                        // Keep the socket (the fds the peer holds unread are
                        // charged to us until it closes); stop writing.
                        if let Some(c) = self.conns.get(&id) {
                            let _ = rustix::net::shutdown(&c.fd, rustix::net::Shutdown::Write);
                        }
                    }
                }
            }
        }
    }

    fn flush(&mut self, id: PeerId) {
        self.confirm_reads(id);
        if self.linked(id) {
            return self.flush_link(id);
        }
        loop {
            let confirming = self.bus.unconfirmed_fds(id) > 0;
            let Some(conn) = self.conns.get_mut(&id) else { return };
            let frames = self.bus.sendable(id, MAX_BATCH * FRAMES_PER_PACKET);
            if frames.is_empty() {
                // Drained, or waiting for fd credit: stop asking for
                // writability, or every read by the peer would wake us;
                // unless that read is what we wait for (`confirm_reads`).
                want_writable(&self.poll, id, conn, confirming);
                return;
            }
            // Frames without fds that are queued together share packets
            // (`Batch`): one packet for many is most of the speed of a busy
            // connection. A frame with fds, and the Welcome, go alone.
            let sizes = frames.iter().map(|f| {
                let alone = f.fd_count() > 0 || f.head.get(3) == Some(&(Kind::Welcome as u8));
                (f.head.len() + f.payload.as_ref().map_or(0, |p| p.len()), alone)
            });
            let mut plan = frame::pack(sizes);
            plan.truncate(MAX_BATCH);
            let mut batches: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
            let mut at = 0;
            for &n in &plan {
                if n > 1 {
                    let mut entries = Vec::new();
                    for f in &frames[at..at + n] {
                        frame::batch_push(&mut entries, &f.head, f.payload.as_deref().unwrap_or(&[]));
                    }
                    let head =
                        frame::encode_head(&Batch { frames: n as u32 }).expect("a batch header encodes");
                    batches.push((head, entries));
                }
                at += n;
            }
            let fds: Vec<Vec<BorrowedFd<'_>>> = frames
                .iter()
                .map(|f| {
                    let shared = f.shared_fd.iter().map(|s| s.fd.as_fd());
                    shared.chain(f.control_fds.iter().map(|fd| fd.as_fd())).collect()
                })
                .collect();
            let mut packets: Vec<OutPacket<'_>> = Vec::with_capacity(plan.len());
            let (mut at, mut batch) = (0, batches.iter());
            for &n in &plan {
                packets.push(if n > 1 {
                    let (head, entries) = batch.next().expect("one batch per group");
                    OutPacket { head, payload: entries, fds: &[] }
                } else {
                    let f = &frames[at];
                    OutPacket { head: &f.head, payload: f.payload.as_deref().unwrap_or(&[]), fds: &fds[at] }
                });
                at += n;
            }
            let result = socket::send_packets(conn.fd.as_fd(), &packets, true);
            drop(packets);
            drop(fds);
            drop(frames);
            match result {
                // Packets go whole or not at all: the frames of the first
                // `n` went.
                Ok(n) => {
                    if n > 0 {
                        self.woke_someone();
                    }
                    self.bus.sent(id, plan[..n].iter().sum(), Instant::now())
                }
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::TOOMANYREFS.raw_os_error()) => {
                    // The kernel caps the fds this process has in flight in
                    // all its sockets. Not this connection's fault; retry
                    // shortly rather than drop it.
                    self.bus.note_broker_short();
                    self.flush_retry_at = Some(Instant::now() + FLUSH_RETRY);
                    if !self.flush_retry.contains(&id) {
                        self.flush_retry.push(id);
                    }
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Socket full: resume on the writable edge.
                    want_writable(&self.poll, id, conn, true);
                    return;
                }
                Err(e) => {
                    debug!("client {id}: send failed: {e}");
                    self.bus.hangup(id);
                    return;
                }
            }
        }
    }

    /// If `id` acknowledged fds not yet seen read, looks whether its peer
    /// has read every packet sent to it (`SIOCOUTQ`): then their fds are
    /// out of flight, installed in the peer, and the bus gives them back
    /// ([`Bus::fds_delivered`]). An acknowledgement alone is not believed:
    /// a client can ack fds it never took (a linked one sees a marker for
    /// each) and leave them in flight in its socket, charged by the kernel
    /// to the broker's user. Until then writable events stay on: the
    /// kernel signals write space each time the peer reads (once what it
    /// holds unread is at most a quarter of the send buffer), so its last
    /// read brings us back here; a peer that reads nothing wakes nothing.
    fn confirm_reads(&mut self, id: PeerId) {
        if self.bus.unconfirmed_fds(id) == 0 {
            return;
        }
        let Some(conn) = self.conns.get_mut(&id) else { return };
        match socket::unread_by_peer(conn.fd.as_fd()) {
            Ok(0) => self.bus.fds_delivered(id),
            Ok(_) => want_writable(&self.poll, id, conn, true),
            Err(e) => {
                debug!("client {id}: cannot see what it left unread: {e}");
                want_writable(&self.poll, id, conn, true);
            }
        }
    }

    // -------------------------------------------------------------- link --

    fn linked(&self, id: PeerId) -> bool {
        self.conns.get(&id).is_some_and(|c| c.link.is_some())
    }

    fn conn_link(&mut self, id: PeerId) -> Option<&mut ConnLink> {
        self.conns.get_mut(&id).and_then(|c| c.link.as_mut())
    }

    /// The bus allowed `id` a link: make it and send `Attached` on the
    /// socket, or tell the bus why not.
    fn attach_link(&mut self, id: PeerId, capacity: u32) {
        let now = Instant::now();
        // `Attach` came right after `Hello`: the queue holds at most the
        // `Welcome`, which goes first, on the socket.
        self.flush(id);
        if self.bus.peer(id).is_none_or(|p| !p.queue.is_empty()) {
            return self.bus.attach_failed(id, "frames were still waiting to go on the socket", now);
        }
        if self.conns.get(&id).is_some_and(|c| !c.pending.is_empty()) {
            // Packets the client sent after `Attach` without waiting for
            // its answer (§15.1), read already, and left by the work budget
            // for a later turn: they are the socket's, and a link would
            // never read them (their fds would stay here for good). The
            // connection goes on without a link; they are read next turn.
            return self.bus.attach_failed(id, "frames came after Attach before its answer", now);
        }
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let made = match link_shm::create(capacity) {
            Ok(m) => m,
            Err(e) => return self.bus.attach_failed(id, &e.to_string(), now),
        };
        let head = encode_head(&Attached { capacity }).expect("Attached encodes");
        let fds = [made.client_half.as_fd(), made.broker_half_ro.as_fd()];
        let packet = OutPacket { head: &head, payload: &[], fds: &fds };
        if let Err(e) = socket::send_packet(conn.fd.as_fd(), packet, true) {
            return self.bus.attach_failed(id, &format!("sending its fds failed: {e}"), now);
        }
        // Our copies of the client's fds close here; the mappings stay.
        conn.link = Some(ConnLink::new(made.map, now));
        self.woke_someone();
        self.hot.push(id);
        debug!("client {id}: shared-memory transport attached, {capacity} bytes each way");
    }

    /// A socket event on a linked connection: doorbells, packets with fds,
    /// the hang-up, or room to send. The ring is looked at, and sending
    /// tried, whatever it was.
    ///
    /// The ring is read first and the socket drained after this turn's
    /// deliveries: what a doorbell wakes us for is in the ring, and the
    /// receives (one for the doorbell, one to find the socket empty, as
    /// edge-triggered readiness needs) need not delay it (the idle round
    /// trip went from 1.21× the socket's to 1.13×). A marker in the ring
    /// reads its packet from the socket itself.
    fn link_socket_event(&mut self, id: PeerId, readable: bool) {
        let now = Instant::now();
        if readable {
            self.wake_link(id, now);
            self.read_link_ring(id, now, link::WORK_PER_TURN);
            if let Some(link) = self.conn_link(id) {
                if !link.drain_queued {
                    link.drain_queued = true;
                    self.drain_later.push(id);
                }
            }
        }
        self.flush(id);
    }

    /// Drains the sockets of the linked connections that were readable
    /// this turn, and, where that found something (a hang-up, a packet
    /// held for its marker, a doorbell: see `read_link_socket`), acts on
    /// it as it would have had the socket been read first. Until no
    /// connection is queued (acting may queue more); each socket is read
    /// as `read_link_socket` reads it, up to [`link::SOCKET_READS`]
    /// packets, the rest left for its next event or marker as before.
    fn drain_link_sockets(&mut self) {
        while !self.drain_later.is_empty() {
            for id in std::mem::take(&mut self.drain_later) {
                let Some(link) = self.conn_link(id) else { continue };
                link.drain_queued = false;
                if self.read_link_socket(id) {
                    self.read_link_ring(id, Instant::now(), link::WORK_PER_TURN);
                    self.flush(id);
                }
            }
            self.apply_effects();
        }
    }

    /// Makes `id`'s ring hot: its sleep flag down, read every turn.
    fn wake_link(&mut self, id: PeerId, now: Instant) {
        let Some(link) = self.conn_link(id) else { return };
        if link.broken {
            return;
        }
        if link.slept_at.is_some() || link.consumer.sleeping() {
            link.consumer.wake(link.map.mine());
            link.woke(now);
        }
        if !self.hot.contains(&id) {
            self.hot.push(id);
        }
    }

    /// Reads what the socket of a linked connection holds,
    /// [`link::SOCKET_SLOTS`] packets per receive: doorbells are dropped
    /// (and the ring woken, see below), the hang-up noted, and reading
    /// stops once a packet with fds is held, kept until its marker comes
    /// up. Whether it received anything (a packet, the end, an error).
    fn read_link_socket(&mut self, id: PeerId) -> bool {
        let mut batch = self.link_batch.take().unwrap_or_else(|| RecvBatch::new(link::SOCKET_SLOTS));
        let mut violation = None;
        let mut rung = false;
        let mut got = false;
        'reads: for _ in 0..link::SOCKET_READS {
            let Some(conn) = self.conns.get_mut(&id) else { break };
            let Some(link) = conn.link.as_mut() else { break };
            if !link.ahead.is_empty() {
                break;
            }
            let n = match batch.recv(conn.fd.as_fd(), true) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("client {id}: receive failed: {e}");
                    link.eof = true;
                    got = true;
                    break;
                }
            };
            got |= n > 0;
            for i in 0..n {
                let (data, status, fds) = batch.packet(i);
                if data.is_empty() && !status.truncated {
                    // End of stream: the ring is read to its end first.
                    link.eof = true;
                    break 'reads;
                }
                if !status.truncated && !status.fds_truncated && fds.is_empty() {
                    if matches!(decode_client(data), Ok(ClientFrame::Doorbell)) {
                        rung = true;
                        continue;
                    }
                    violation = Some(
                        "a frame without fds on the socket of a connection with a shared-memory link \
                         (they go in the ring)",
                    );
                    break 'reads;
                }
                link.ahead.push_back((data.to_vec(), status, fds.into_iter().map(inert).collect()));
            }
            if n < link::SOCKET_SLOTS {
                // The socket is empty.
                break;
            }
        }
        self.link_batch = Some(batch);
        if let Some(why) = violation {
            self.link_broken(id, why);
            return true;
        }
        if rung {
            // A doorbell taken is a wake-up spent: the client rings once
            // per raise of our flag, so the raise it answered must be
            // lowered (and the ring read, hot, until it sleeps with a new
            // raise), or what the client writes after ringing waits for a
            // doorbell that never comes. The socket is read at the end of
            // the turn of its event (`drain_link_sockets`) and for
            // markers, when `service_links` may have put the ring to sleep
            // again since the event woke it, and the doorbell read then
            // answers that new raise.
            self.wake_link(id, Instant::now());
        }
        got
    }

    /// The client broke the link's rules: its ring is read no more, and
    /// the connection ends with the reason.
    fn link_broken(&mut self, id: PeerId, why: &str) {
        if let Some(link) = self.conn_link(id) {
            link.broken = true;
        }
        self.hot.retain(|&h| h != id);
        self.bus.violation(id, why, Instant::now());
    }

    /// The client lied about how far it read our ring: nothing more can
    /// be written there (its goodbye included); the connection ends.
    fn link_mute(&mut self, id: PeerId, e: LinkError) {
        if let Some(link) = self.conn_link(id) {
            link.mute = true;
        }
        self.link_broken(id, &e.to_string());
    }

    /// Hands the records waiting in `id`'s ring to the bus, up to a turn's
    /// budget; gives the room back and rings a client waiting for it.
    /// Returns how many records there were.
    fn read_link_ring(&mut self, id: PeerId, now: Instant, budget: u64) -> usize {
        // The uid's budget for this turn, shared with its sockets and its
        // other rings (`daemon/read_turns.rs`): a uid's many links buy no
        // more of the loop than one (a review's 200 links held another
        // uid's ping 171-288 ms, where one held it 1.4 ms).
        let uid = self.bus.peer(id).map(|p| p.cred.uid);
        // With nothing left (0) no record is read, but the rest is done: a
        // broken or finished link is still ended, room still given back.
        let uid_left = uid.map_or(u64::MAX, |u| self.read_again.uid_left(u, WORK_BUDGET));
        self.ring_turned_away = uid_left == 0;
        let work_start = self.bus.work();
        let records = self.read_link_ring_with(id, now, (budget, uid_left), work_start);
        if let Some(u) = uid {
            let cost = self.bus.work().wrapping_sub(work_start).saturating_add(records as u64 * PACKET_WORK);
            self.read_again.uid_did(u, cost);
        }
        records
    }

    /// `read_link_ring`'s reading: `budget` of work for this ring (its
    /// share of the turn), and what is left of its uid's, against which
    /// each record costs [`PACKET_WORK`] beside the work it causes, as a
    /// socket packet does.
    fn read_link_ring_with(
        &mut self,
        id: PeerId,
        now: Instant,
        (budget, uid_left): (u64, u64),
        work_start: u64,
    ) -> usize {
        let mut records = 0;
        loop {
            if self.bus.peer(id).is_none() {
                return records;
            }
            // Split borrows: the link in `conns`, the buffer beside it.
            let Some(link) = self.conns.get_mut(&id).and_then(|c| c.link.as_mut()) else { return records };
            if link.broken {
                // Its ring is not read any more, but its hang-up still
                // ends it (a lingering peer waits for nothing else).
                if link.eof {
                    self.bus.hangup(id);
                }
                return records;
            }
            let work = self.bus.work().wrapping_sub(work_start);
            let uid_cost = work.saturating_add(records as u64 * PACKET_WORK);
            if records >= link::RECORDS_PER_TURN || work >= budget || uid_cost >= uid_left {
                break;
            }
            let mut buf = std::mem::take(&mut self.link_buf);
            buf.clear();
            match link.consumer.next(link.map.peer(), link.map.peer_data(), &mut buf) {
                Ok(None) => {
                    self.link_buf = buf;
                    break;
                }
                Ok(Some(RecordKind::Frame)) => {
                    records += 1;
                    if buf.len() > shmbus_proto::limits::MAX_PACKET {
                        // The ring carries up to half its capacity; a frame
                        // is held to what a socket packet may be, as on the
                        // socket (copied up to one byte more: see
                        // `ConnLink::new`).
                        self.bus.receive_damaged(id, Damage::Truncated, &buf, now);
                    } else {
                        self.bus.receive(id, &buf, Vec::new(), now);
                    }
                    self.link_buf = buf;
                }
                Ok(Some(RecordKind::Marker)) => {
                    records += 1;
                    self.link_buf = buf;
                    let mut packet = link.ahead.pop_front();
                    if packet.is_none() {
                        // Sent before the marker was written: it is in the
                        // socket, unless the client lies.
                        self.read_link_socket(id);
                        let link = self.conn_link(id);
                        if link.as_ref().is_none_or(|l| l.broken) {
                            // What it found there broke the rules (a frame
                            // without fds): that ended the connection, and
                            // is the one violation counted.
                            return records;
                        }
                        packet = link.and_then(|l| l.ahead.pop_front());
                    }
                    match packet {
                        Some((data, status, fds)) => self.hand_over(id, &data, status, fds),
                        None => {
                            self.link_broken(
                                id,
                                "a marker in the shared-memory ring with no packet on the socket",
                            );
                            return records;
                        }
                    }
                }
                Err(e) => {
                    self.link_buf = buf;
                    self.link_broken(id, &e.to_string());
                    return records;
                }
            }
        }
        let Some(link) = self.conns.get_mut(&id).and_then(|c| c.link.as_mut()) else { return records };
        link.consumer.commit(link.map.mine());
        if link.consumer.must_ring_room(link.map.peer()) {
            let room = &link.map.mine().room.v;
            // Release: pairs with the client's Acquire load of `room`
            // before it sleeps on the word.
            room.fetch_add(1, Ordering::Release);
            if futex::wake_all(room).is_ok_and(|n| n > 0) {
                // `woke_someone`, with `link` (in `conns`) still borrowed.
                self.woke_unknown = true;
                self.wanted_stale = true;
            }
        }
        if records > 0 {
            link.records_at(now);
        }
        let ended = link.eof && link.consumer.is_empty(link.map.peer()).unwrap_or(true);
        if ended {
            // The client left and everything it wrote before is read.
            self.hot.retain(|&h| h != id);
            self.bus.hangup(id);
        }
        records
    }

    /// After a turn over the hot rings: a turn that found nothing may give
    /// the CPU to whoever else is runnable here (on a machine with fewer
    /// CPUs than busy processes, the client that must run next may be
    /// waiting for this very CPU), as [`CpuWanted`] says:
    /// - `Known` (a linked client here has frames to read, or runs its
    ///   own code): at once;
    /// - `Maybe`: after [`link::PURE_SPIN_TURNS`] quiet turns, or at once
    ///   when the last yield ran someone else (it took
    ///   [`link::YIELD_ALONE`] or more): the process that shares this CPU
    ///   is most likely the one that answers what we just delivered;
    ///   and after yields in a row that ran no one, not before
    ///   [`link::alone_backoff`] has passed since the last;
    /// - `No`: only every [`link::YIELD_PROBE`].
    ///
    /// (The rings' windows bound the spin, yields and all.) The verdict
    /// is kept for [`link::CPU_WANTED_FOR`], or until a turn writes into a
    /// ring or we yield. Whether it yielded. `now`: the turn's clock.
    fn spin_turn(&mut self, quiet: bool, now: Instant) -> bool {
        if !quiet {
            self.quiet_turns = 0;
            return false;
        }
        self.quiet_turns = self.quiet_turns.saturating_add(1);
        if self.no_yield_until.is_some_and(|t| now < t) {
            return false;
        }
        if self.wanted_stale || now.saturating_duration_since(self.wanted_at) >= link::CPU_WANTED_FOR {
            self.wanted = self.cpu_wanted();
            self.wanted_at = now;
            self.wanted_stale = false;
        }
        let give = match self.wanted {
            CpuWanted::Known => true,
            CpuWanted::Maybe => {
                (self.shared_cpu || self.quiet_turns > link::PURE_SPIN_TURNS)
                    && now.saturating_duration_since(self.last_yield)
                        >= link::alone_backoff(self.alone_yields)
            }
            CpuWanted::No => now.saturating_duration_since(self.last_yield) >= link::YIELD_PROBE,
        };
        if !give {
            return false;
        }
        // How long the yield takes tells whether anyone else ran.
        let before = Instant::now();
        sched::yield_cpu();
        let after = Instant::now();
        let took = after.saturating_duration_since(before);
        self.last_yield = after;
        self.wanted_stale = true;
        self.shared_cpu = took >= link::YIELD_ALONE;
        if self.shared_cpu {
            self.alone_yields = 0;
        } else {
            // No one was waiting for this CPU.
            self.woke_unknown = false;
            self.alone_yields = self.alone_yields.saturating_add(1);
        }
        if took >= link::YIELD_LONG {
            // A CPU-bound process shares this CPU, and each yield gives
            // it a whole slice: spin for our own share instead.
            self.no_yield_until = Some(before + took + link::YIELD_BAN);
        }
        true
    }

    /// We may just have woken a process whose CPU we cannot know (a socket
    /// send, a futex wake): the next quiet turn decides afresh, and
    /// yields as if we did not know where the clients run until a yield
    /// finds no one.
    fn woke_someone(&mut self) {
        self.woke_unknown = true;
        self.wanted_stale = true;
        self.alone_yields = 0;
    }

    /// Whether a process on this CPU waits for it ([`CpuWanted`]), as far
    /// as the `presence` words of the clients we wrote to and of those
    /// that write to us tell. A socket send since the last yield that ran
    /// no one, or more unread rings than we follow, leave it open. (A lie
    /// changes only when we yield, which the spin windows and the yield
    /// ban bound.)
    fn cpu_wanted(&mut self) -> CpuWanted {
        let here = sched::current_cpu();
        let mut wanted =
            if self.woke_unknown || self.unread_untracked { CpuWanted::Maybe } else { CpuWanted::No };
        let mut i = 0;
        while i < self.unread_by.len() {
            let id = self.unread_by[i];
            let verdict = match self.conns.get_mut(&id).and_then(|c| c.link.as_mut()) {
                Some(link) if !link.mute => {
                    let said = Presence::of(link.map.peer());
                    let (producer, peer) = (&link.producer, link.map.peer());
                    let v = link::reader_wants(here, said, link.rang, || producer.unread(peer));
                    if v.is_none() {
                        link.unread_listed = false;
                        link.rang = false;
                    }
                    v
                }
                _ => None,
            };
            match verdict {
                None => {
                    self.unread_by.swap_remove(i);
                }
                Some(v) => {
                    wanted = wanted.max(v);
                    i += 1;
                }
            }
        }
        if self.unread_by.is_empty() {
            self.unread_untracked = false;
        }
        let mut dense = false;
        for &id in &self.hot {
            if let Some(link) = self.conns.get(&id).and_then(|c| c.link.as_ref()) {
                wanted = wanted.max(link::writer_wants(here, Presence::of(link.map.peer())));
                dense |= link.gap <= link::DENSE_GAP;
            }
        }
        if !dense {
            // Spinning without yields pays only within a dense exchange
            // (records µs apart): after a lone wake-up our window is short,
            // and the processes the doorbells woke may be here whatever
            // they said before they slept (the idle round trip was 1.25×
            // the socket's with `No` there, 1.1× without).
            wanted = wanted.max(CpuWanted::Maybe);
        }
        wanted
    }

    /// One turn over the hot rings: read each; put to sleep those quiet
    /// for their spin window (flag raised, looked at once more). Returns
    /// how many records there were.
    fn service_links(&mut self, now: Instant) -> usize {
        let mut total = 0;
        let mut i = 0;
        let mut shares = link::TurnShares::new(now);
        // The first ring turned away for its uid's spent budget: it goes
        // first next turn (else, in a quick turn that does not rotate the
        // list, the same first rings of a busy uid could take its budget
        // every turn, and its rings behind them never be read).
        let mut first_turned_away = None;
        while i < self.hot.len() {
            let id = self.hot[i];
            self.ring_turned_away = false;
            let got = self.read_link_ring(id, now, shares.budget());
            if self.ring_turned_away && first_turned_away.is_none() {
                first_turned_away = Some(i);
            }
            total += got;
            shares.read(i, got, Instant::now);
            let mut broken = None;
            let keep = match self.conn_link(id) {
                None => false,
                Some(link) if link.broken => false,
                Some(_) if got > 0 => true,
                Some(link) if now.saturating_duration_since(link.active_at) < link.window() => true,
                Some(link) => match link.consumer.prepare_sleep(link.map.mine(), link.map.peer()) {
                    Ok(true) => {
                        link.slept(now);
                        false
                    }
                    Ok(false) => true,
                    Err(e) => {
                        broken = Some(e);
                        false
                    }
                },
            };
            if let Some(e) = broken {
                self.link_broken(id, &e.to_string());
            }
            match self.hot.get(i) {
                Some(&h) if h == id && !keep => {
                    self.hot.swap_remove(i);
                }
                Some(&h) if h == id => i += 1,
                // Removed meanwhile (closed, broken): look at whatever
                // took its place.
                _ => {}
            }
        }
        let by = match (shares.rotation(self.hot.len()), first_turned_away) {
            (0, Some(i)) => i.min(self.hot.len()),
            (by, _) => by,
        };
        self.hot.rotate_left(by);
        total
    }

    /// Moves `id`'s sendable frames into its ring (frames with fds on the
    /// socket, a marker in the ring); rings the client if it sleeps.
    fn flush_link(&mut self, id: PeerId) {
        let now = Instant::now();
        let mut wrote = false;
        loop {
            let Some(conn) = self.conns.get_mut(&id) else { return };
            let Some(link) = conn.link.as_mut() else { return };
            if link.mute {
                return;
            }
            link.producer.end_wait(link.map.mine());
            // Walked in place: a `Vec` of them per flush was an 8 KiB
            // allocation whose frees made glibc trim and grow the heap,
            // 300 `brk` calls a second at 2M messages a second.
            let total = self.bus.sendable_count(id, MAX_BATCH * FRAMES_PER_PACKET);
            let Some(peer) = self.bus.peer(id).filter(|_| total > 0) else {
                let confirming = self.bus.unconfirmed_fds(id) > 0;
                want_writable(&self.poll, id, conn, confirming);
                break;
            };
            let (mut sent, mut stop) = (0, None);
            for f in peer.queue.front(total) {
                let payload = f.payload.as_deref().unwrap_or(&[]);
                if f.fd_count() > 0 {
                    // Room for the marker first: a packet sent must get it.
                    match link.producer.has_room(link.map.peer(), 0) {
                        Ok(true) => {}
                        Ok(false) => {
                            stop = Some(Stop::Full(0));
                            break;
                        }
                        Err(e) => {
                            stop = Some(Stop::Corrupt(e));
                            break;
                        }
                    }
                    let fds: Vec<BorrowedFd<'_>> = f
                        .shared_fd
                        .iter()
                        .map(|s| s.fd.as_fd())
                        .chain(f.control_fds.iter().map(|fd| fd.as_fd()))
                        .collect();
                    let packet = OutPacket { head: &f.head, payload, fds: &fds };
                    if let Err(e) = socket::send_packet(conn.fd.as_fd(), packet, true) {
                        stop = Some(Stop::Socket(e));
                        break;
                    }
                    let marked =
                        link.producer.try_push(link.map.peer(), link.map.my_data(), RecordKind::Marker, &[]);
                    debug_assert!(matches!(marked, Ok(true)), "room was checked");
                } else {
                    let parts: [&[u8]; 2] = [&f.head, payload];
                    match link.producer.try_push(
                        link.map.peer(),
                        link.map.my_data(),
                        RecordKind::Frame,
                        &parts,
                    ) {
                        Ok(true) => {}
                        Ok(false) => {
                            stop = Some(Stop::Full(f.head.len() + payload.len()));
                            break;
                        }
                        Err(e) => {
                            stop = Some(Stop::Corrupt(e));
                            break;
                        }
                    }
                }
                sent += 1;
            }
            link.producer.publish(link.map.mine());
            if sent > 0 {
                wrote = true;
                self.bus.sent(id, sent, now);
            }
            match stop {
                None if sent == total => {}
                None => break,
                Some(Stop::Full(len)) => {
                    let Some(link) = self.conn_link(id) else { return };
                    match link.producer.prepare_wait(link.map.mine(), link.map.peer(), len) {
                        // The client rings once it has read the ring down.
                        Ok(true) => break,
                        // Room came meanwhile.
                        Ok(false) => {}
                        Err(e) => return self.link_mute(id, e),
                    }
                }
                Some(Stop::Corrupt(e)) => return self.link_mute(id, e),
                Some(Stop::Socket(e)) => {
                    if e.raw_os_error() == Some(rustix::io::Errno::TOOMANYREFS.raw_os_error()) {
                        self.bus.note_broker_short();
                        self.flush_retry_at = Some(Instant::now() + FLUSH_RETRY);
                        if !self.flush_retry.contains(&id) {
                            self.flush_retry.push(id);
                        }
                    } else if e.kind() == io::ErrorKind::WouldBlock {
                        let Some(conn) = self.conns.get_mut(&id) else { return };
                        want_writable(&self.poll, id, conn, true);
                    } else {
                        debug!("client {id}: send failed: {e}");
                        self.bus.hangup(id);
                        return;
                    }
                    break;
                }
            }
        }
        if wrote {
            let Some(conn) = self.conns.get_mut(&id) else { return };
            let Some(link) = conn.link.as_mut() else { return };
            if link.producer.must_ring(link.map.peer()) {
                // A full socket already holds news for the client; a
                // doorbell that does not fit is not needed.
                let packet = OutPacket { head: &self.doorbell, payload: &[], fds: &[] };
                let _ = socket::send_packet(conn.fd.as_fd(), packet, true);
                // It slept: the kernel wakes it on a CPU of its choosing.
                link.rang = true;
                self.alone_yields = 0;
            }
            self.wanted_stale = true;
            // A client that answers quickly: its ring is hot until the
            // answer comes or its window runs out. A ring put to sleep
            // left `hot` then (`service_links`); woken here, not by the
            // client, so its spin window does not adapt (`woke`).
            if link.delivered(now) && link.slept_at.is_some() && !link.broken && !link.eof {
                link.slept_at = None;
                link.consumer.wake(link.map.mine());
                debug_assert!(!self.hot.contains(&id), "a ring put to sleep left `hot`");
                self.hot.push(id);
            }
            let Some(link) = self.conns.get_mut(&id).and_then(|c| c.link.as_mut()) else { return };
            if !link.unread_listed {
                if self.unread_by.len() < link::UNREAD_TRACKED {
                    link.unread_listed = true;
                    self.unread_by.push(id);
                } else {
                    self.unread_untracked = true;
                }
            }
        }
    }

    /// `SIGHUP`: reads the policy file again. A file that fails to load
    /// leaves the rules in force; a good one is applied at once, and the
    /// bus ends what it no longer allows.
    fn reload(&mut self) {
        let Some(path) = self.policy_path.clone() else {
            info!("SIGHUP: no policy file was given; nothing to reload");
            return;
        };
        self.notifier.reloading();
        match super::policy_file::load(&path) {
            Ok(rules) => {
                let count = rules.rule_count();
                let done = self.bus.reload_policy(Some(rules), Instant::now());
                info!(
                    "policy reloaded from {}: {count} rules; ended {} subscriptions, {} names, {} channels",
                    path.display(),
                    done.subscriptions,
                    done.names,
                    done.channels
                );
                self.apply_effects();
            }
            Err(e) => warn!("policy not reloaded, the old one stays in force: {e}"),
        }
        self.notifier.reloaded();
    }

    /// The bus has forgotten `id`: close its socket.
    fn close(&mut self, id: PeerId) {
        let Some(conn) = self.conns.remove(&id) else { return };
        self.hot.retain(|&h| h != id);
        if let Some(link) = &conn.link {
            // Tells the client's senders at their next send, without a
            // system call, that nobody will read their ring any more (see
            // `shmbus_proto::link::layout::CLOSED`).
            link.map.mark_closed();
        }
        let _ = self.poll.registry().deregister(&mut SourceFd(&conn.fd.as_raw_fd()));
        // Unread input would make the peer's next read fail with
        // ECONNRESET before it sees our goodbye; discard it first.
        discard_input(&conn.fd);
        debug!("client {id} closed");
        // `conn` drops here: its socket goes with it.
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        info!("shutting down: flushing {} connections", self.bus.live());
        self.notifier.stopping();
        if let Some(l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&l.as_raw_fd()));
        }
        let now = Instant::now();
        self.shutdown_deadline = Some(now + self.bus.config().close_grace);
        self.bus.shutdown(now);
    }
}

/// Asks for writable events on `conn`'s socket (its socket was full, or
/// fds it acknowledged wait to be seen read: `Reactor::confirm_reads`) or
/// stops asking (its queue drained, or waits for fd credit: every read by
/// the peer would wake us otherwise); a change only.
fn want_writable(poll: &Poll, id: PeerId, conn: &mut Conn, on: bool) {
    if conn.wants_write == on {
        return;
    }
    conn.wants_write = on;
    let interest = if on { Interest::READABLE | Interest::WRITABLE } else { Interest::READABLE };
    let _ = poll.registry().reregister(&mut SourceFd(&conn.fd.as_raw_fd()), Token(id as usize), interest);
}

fn conn_fd(conns: &PeerMap<Conn>, id: PeerId) -> Option<BorrowedFd<'_>> {
    conns.get(&id).map(|c| c.fd.as_fd())
}

/// Whether this process's fd table is full: a `MSG_CTRUNC` is then the
/// broker's shortage, not the sender's excess. Probed by duplicating an fd
/// we hold (closed again at once).
fn fd_table_full(probe: Option<BorrowedFd<'_>>) -> bool {
    let Some(fd) = probe else { return false };
    match rustix::io::fcntl_dupfd_cloexec(fd, 0) {
        Ok(dup) => {
            drop(dup);
            false
        }
        Err(e) => e == rustix::io::Errno::MFILE || e == rustix::io::Errno::NFILE,
    }
}

/// What the broker holds of an fd read ahead of its marker (which a
/// hostile client may never write): the fd itself if holding it keeps
/// nothing else open (a memfd, any file of pages), else, when the bus
/// could only refuse it as not a memfd, a stand-in that it refuses the
/// same way (an eventfd). Held as it came, a client's own end of its
/// connection (or an io_uring holding it) kept that end open inside the
/// broker after the client was gone: the hang-up never came, and the
/// connection, its link and their charges lived on. If no stand-in can be
/// made (the broker is out of fds), the fd is kept.
fn inert(fd: OwnedFd) -> OwnedFd {
    use shmbus_proto::sys::memfd::{self, MemfdError};
    if memfd::holds_only_pages(fd.as_fd())
        || !matches!(memfd::sealed_len(fd.as_fd()), Err(MemfdError::NotMemfd))
    {
        return fd;
    }
    rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap_or(fd)
}

/// Tells a refused peer why, then closes it.
fn refuse(fd: OwnedFd, code: GoodbyeCode, reason: &str) {
    if let Ok(head) = encode_head(&Goodbye { code, reason }) {
        let _ = socket::send_packet(fd.as_fd(), OutPacket { head: &head, payload: &[], fds: &[] }, true);
    }
    discard_input(&fd);
}

fn discard_input(fd: &OwnedFd) {
    let mut batch = RecvBatch::new(1);
    for _ in 0..64 {
        match batch.recv(fd.as_fd(), true) {
            Ok(n) if n > 0 && !batch.packet(0).0.is_empty() => {}
            _ => return,
        }
    }
}

/// Best-effort command name of `pid`, for logs and introspection. Raw:
/// whoever shows it escapes it.
fn command_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.strip_suffix('\n').unwrap_or(&s).to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}
