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
//!    peers the bus has forgotten.
//!
//! Resource failures are the broker's, not a peer's: `EMFILE` on accept is
//! retried on a timer (never a spin), a packet whose fds the kernel could
//! not install because the broker's fd table is full is reported to the
//! bus as such (the sender gets `BrokerResource`, not a disconnect), and
//! `ETOOMANYREFS` on send is retried shortly.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing::{debug, info, warn};

use shmbus_proto::frame::{self, encode_head, Batch, Goodbye, GoodbyeCode, Kind};
use shmbus_proto::sys::socket::{self, OutPacket, RecvBatch, RecvStatus, MAX_BATCH};

use super::config::Config;
use super::signals::SignalPipe;
use super::systemd::Notifier;
use crate::bus::driver::Damage;
use crate::bus::peer::PeerId;
use crate::bus::{Bus, Effect};

const LISTENER: Token = Token(usize::MAX - 1);
const SIG_STOP: Token = Token(usize::MAX - 2);
const SIG_HUP: Token = Token(usize::MAX - 3);

/// Receive batches per connection per turn before yielding to others.
const READ_BUDGET: usize = 4;
/// Deliveries one connection's packets may cause in one turn before it
/// yields to others: a publish fanning out to thousands of subscriptions
/// counts as thousands, so one peer's fan-out cannot hold up the loop.
const WORK_BUDGET: u64 = 32 * 1024;
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
}

struct Reactor {
    poll: Poll,
    listener: Option<OwnedFd>,
    bus: Bus,
    conns: HashMap<PeerId, Conn>,
    batch: Option<RecvBatch>,
    read_again: Vec<PeerId>,
    accept_retry_at: Option<Instant>,
    flush_retry: Vec<PeerId>,
    flush_retry_at: Option<Instant>,
    stop: SignalPipe,
    hup: SignalPipe,
    shutdown_deadline: Option<Instant>,
    notifier: Notifier,
    policy_path: Option<std::path::PathBuf>,
}

impl Reactor {
    fn new(mut cfg: Config) -> io::Result<Reactor> {
        let listener = match cfg.listen_fd.take() {
            Some(fd) => {
                // Passed in by a service manager: name it by what it is.
                if let Ok(Some(a)) = socket::local_address(fd.as_fd()) {
                    cfg.address = a;
                }
                fd
            }
            None => socket::listen(&cfg.address, 1024)?,
        };
        cfg.bus.address = cfg.address.to_string();
        let poll = Poll::new()?;
        poll.registry().register(&mut SourceFd(&listener.as_raw_fd()), LISTENER, Interest::READABLE)?;
        let stop = SignalPipe::new(&[SIGTERM, SIGINT])?;
        let hup = SignalPipe::new(&[SIGHUP])?;
        poll.registry().register(&mut SourceFd(&stop.read.as_raw_fd()), SIG_STOP, Interest::READABLE)?;
        poll.registry().register(&mut SourceFd(&hup.read.as_raw_fd()), SIG_HUP, Interest::READABLE)?;
        info!("listening on {}", cfg.address);
        Ok(Reactor {
            poll,
            listener: Some(listener),
            bus: Bus::new(cfg.bus, Instant::now()),
            conns: HashMap::new(),
            batch: Some(RecvBatch::new(RECV_SLOTS)),
            read_again: Vec::new(),
            accept_retry_at: None,
            flush_retry: Vec::new(),
            flush_retry_at: None,
            stop,
            hup,
            shutdown_deadline: None,
            notifier: Notifier::from_env(),
            policy_path: cfg.policy_path,
        })
    }

    fn serve(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        let status = self.bus.status_line();
        self.notifier.ready(status);
        loop {
            let timeout = self.next_timeout();
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
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
            let now = Instant::now();
            if self.accept_retry_at.is_some_and(|t| now >= t) {
                self.accept_retry_at = None;
                self.accept_all();
            }
            for id in std::mem::take(&mut self.read_again) {
                self.read_conn(id);
            }
            if self.flush_retry_at.is_some_and(|t| now >= t) {
                self.flush_retry_at = None;
                for id in std::mem::take(&mut self.flush_retry) {
                    self.flush(id);
                }
            }
            self.bus.tick(Instant::now());
            self.apply_effects();
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

    fn next_timeout(&self) -> Option<Duration> {
        if !self.read_again.is_empty() {
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
        self.conns.insert(id, Conn { fd, wants_write: false, pending: Default::default() });
        // Data may already be waiting; the edge for it may have been missed.
        self.read_again.push(id);
    }

    // -------------------------------------------------------------- read --

    fn read_conn(&mut self, id: PeerId) {
        let work_start = self.bus.work();
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
            if self.bus.work().wrapping_sub(work_start) >= WORK_BUDGET {
                if self.bus.peer(id).is_some() {
                    self.read_again.push(id);
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
            if self.bus.work().wrapping_sub(work_start) >= WORK_BUDGET {
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
                if self.bus.work().wrapping_sub(work_start) >= WORK_BUDGET {
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
            self.read_again.push(id);
        }
    }

    // ------------------------------------------------------------ output --

    /// Hands one received packet to the bus, damaged or not.
    fn hand_over(&mut self, id: PeerId, data: &[u8], status: RecvStatus, fds: Vec<OwnedFd>) {
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
        loop {
            let Some(conn) = self.conns.get_mut(&id) else { return };
            let frames = self.bus.sendable(id, MAX_BATCH * FRAMES_PER_PACKET);
            if frames.is_empty() {
                // Drained, or waiting for fd credit: stop asking for
                // writability, or every read by the peer would wake us.
                if conn.wants_write {
                    conn.wants_write = false;
                    let _ = self.poll.registry().reregister(
                        &mut SourceFd(&conn.fd.as_raw_fd()),
                        Token(id as usize),
                        Interest::READABLE,
                    );
                }
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
                Ok(n) => self.bus.sent(id, plan[..n].iter().sum(), Instant::now()),
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
                    if !conn.wants_write {
                        conn.wants_write = true;
                        let _ = self.poll.registry().reregister(
                            &mut SourceFd(&conn.fd.as_raw_fd()),
                            Token(id as usize),
                            Interest::READABLE | Interest::WRITABLE,
                        );
                    }
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

fn conn_fd(conns: &HashMap<PeerId, Conn>, id: PeerId) -> Option<BorrowedFd<'_>> {
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
