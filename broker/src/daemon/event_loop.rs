//! The event loop.
//!
//! Model (dbus-broker's): one thread, one edge-triggered `mio::Poll`, every
//! socket non-blocking, no locks. Everything that passes through the broker
//! is serialised by this one hop, which gives a total order: frames from one
//! connection are handled in arrival order, and each target's queue is
//! FIFO, so every subscriber sees each publisher's messages in the order
//! they were sent.
//!
//! One turn of the loop:
//! 1. wait for events (or a deadline);
//! 2. accept, read and handle frames: each readable connection is drained
//!    with `recvmmsg` up to a budget, then goes to the back of the line so
//!    one fast peer cannot starve the rest;
//! 3. flush every connection that gained output, with `sendmmsg`, until
//!    its queue is empty or its socket is full (then a writable event
//!    resumes it);
//! 4. close connections whose goodbye went out or whose deadline passed.
//!
//! The broker never blocks on a client and never trusts one: every byte is
//! decoded by the panic-free codec, every fd is an `OwnedFd` from the
//! moment it arrives and is dropped (closed) unless it is wanted, and a
//! misbehaving peer gets a `Goodbye` with the reason and is closed, with
//! one log line, while everyone else goes on.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing::{debug, info, warn};

use shmbus_proto::frame::{
    decode_client, encode_head, Body, ClientFrame, ClientInfo, Deliver, ErrorCode, Goodbye, GoodbyeCode,
    Kind, Limits, Op, OpError, PayloadRef, Pong, QueryEnd, QueryItem, QueryItemBody, QueryKind, Sender,
    Stats, Subscribed, TopicInfo, Welcome, PROTOCOL_VERSION,
};
use shmbus_proto::frame::{
    ChannelGranted, ChannelInfo, ChannelOverflow, ChannelReader as ChannelReaderFrame, ChannelRole,
};
use shmbus_proto::limits::{MAX_CLIENT_NAME, MAX_INLINE_PAYLOAD, MAX_PACKET};
use shmbus_proto::ring::shm::{create_ring, join_reader};
use shmbus_proto::ring::Geometry;
use shmbus_proto::subject::{validate_pattern, validate_subject};
use shmbus_proto::sys::memfd::{self, MemfdError};
use shmbus_proto::sys::socket::{self, OutPacket, RecvBatch, MAX_BATCH};

use super::channels::{Channel, ChannelReader};
use super::config::Config;
use super::conn::{command_of, Conn, ConnState};
use super::signals::SignalPipe;
use super::systemd::Notifier;
use crate::bus::queue::{offer, settle_gap, Offer, OutFrame, OutQueue, SharedFd, SubState};
use crate::bus::quota::{ConnectionCounts, Quotas};
use crate::bus::router::{Router, SubKey};

const LISTENER: Token = Token(usize::MAX - 1);
const SIG_STOP: Token = Token(usize::MAX - 2);
const SIG_HUP: Token = Token(usize::MAX - 3);

/// Receive batches per connection per turn before yielding to others.
const READ_BUDGET: usize = 4;
/// Packets per receive batch.
const RECV_SLOTS: usize = 32;
/// Retry delay after accept failed for lack of fds.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Retry delay after the kernel refused more fds in flight.
const FLUSH_RETRY: Duration = Duration::from_millis(10);
/// Byte budget for subscription patterns listed in one `ClientInfo`.
const INFO_PATTERN_BUDGET: usize = 32 * 1024;

/// Runs a broker until SIGTERM or SIGINT; returns once every connection has
/// been flushed and closed (or the grace period ran out).
pub fn run(config: Config) -> io::Result<()> {
    let mut broker = Broker::new(config)?;
    broker.serve()
}

#[derive(Default)]
struct Counters {
    msgs_in: u64,
    msgs_out: u64,
    bytes_in: u64,
    bytes_out: u64,
    dropped: u64,
    gap_notices: u64,
    accepted: u64,
    refused: u64,
    protocol_errors: u64,
    slow_disconnects: u64,
}

struct Broker {
    poll: Poll,
    listener: Option<OwnedFd>,
    address: String,
    cfg: Config,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    live: usize,
    router: Router,
    quotas: Quotas,
    connections: ConnectionCounts,
    channels: HashMap<u64, Channel>,
    channel_by_topic: HashMap<String, u64>,
    next_channel_id: u64,
    next_id: u64,
    started: Instant,
    counters: Counters,
    batch: Option<RecvBatch>,
    matches: Vec<SubKey>,
    dirty: Vec<usize>,
    read_again: Vec<usize>,
    closing: Vec<usize>,
    accept_retry_at: Option<Instant>,
    flush_retry: Vec<usize>,
    flush_retry_at: Option<Instant>,
    stop: SignalPipe,
    hup: SignalPipe,
    shutdown_deadline: Option<Instant>,
    notifier: Notifier,
}

impl Broker {
    fn new(mut cfg: Config) -> io::Result<Broker> {
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
        let poll = Poll::new()?;
        poll.registry().register(&mut SourceFd(&listener.as_raw_fd()), LISTENER, Interest::READABLE)?;
        let stop = SignalPipe::new(&[SIGTERM, SIGINT])?;
        let hup = SignalPipe::new(&[SIGHUP])?;
        poll.registry().register(&mut SourceFd(&stop.read.as_raw_fd()), SIG_STOP, Interest::READABLE)?;
        poll.registry().register(&mut SourceFd(&hup.read.as_raw_fd()), SIG_HUP, Interest::READABLE)?;
        info!("listening on {}", cfg.address);
        let quota = cfg.quota;
        let max_connections = cfg.max_connections_per_uid;
        Ok(Broker {
            poll,
            listener: Some(listener),
            address: cfg.address.to_string(),
            cfg,
            conns: Vec::new(),
            free: Vec::new(),
            live: 0,
            router: Router::new(),
            quotas: Quotas::new(quota),
            connections: ConnectionCounts::new(max_connections),
            channels: HashMap::new(),
            channel_by_topic: HashMap::new(),
            next_channel_id: 1,
            next_id: 1,
            started: Instant::now(),
            counters: Counters::default(),
            batch: Some(RecvBatch::new(RECV_SLOTS)),
            matches: Vec::new(),
            dirty: Vec::new(),
            read_again: Vec::new(),
            closing: Vec::new(),
            accept_retry_at: None,
            flush_retry: Vec::new(),
            flush_retry_at: None,
            stop,
            hup,
            shutdown_deadline: None,
            notifier: Notifier::from_env(),
        })
    }

    fn status_line(&self) -> String {
        format!(
            "{} clients, {} subscriptions on {} patterns; {} messages in, {} dropped",
            self.live,
            self.router.len(),
            self.router.pattern_count(),
            self.counters.msgs_in,
            self.counters.dropped
        )
    }

    fn serve(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        let status = self.status_line();
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
                            info!("SIGHUP: there is no configuration to reload");
                        }
                    }
                    Token(slot) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.read_conn(slot);
                        }
                        if ev.is_writable() {
                            self.mark_dirty(slot);
                        }
                    }
                }
            }
            if self.accept_retry_at.is_some_and(|t| Instant::now() >= t) {
                self.accept_retry_at = None;
                self.accept_all();
            }
            for slot in std::mem::take(&mut self.read_again) {
                self.read_conn(slot);
            }
            if self.flush_retry_at.is_some_and(|t| Instant::now() >= t) {
                self.flush_retry_at = None;
                for slot in std::mem::take(&mut self.flush_retry) {
                    self.mark_dirty(slot);
                }
            }
            self.flush_dirty();
            self.reap_closing();
            if self.notifier.is_enabled() {
                // Only under a service manager: a status line costs a
                // format! per turn of the loop.
                if self.shutdown_deadline.is_none() {
                    let status = self.status_line();
                    self.notifier.set_status(status);
                }
                self.notifier.tick(Instant::now());
            }
            if let Some(deadline) = self.shutdown_deadline {
                if self.live == 0 || Instant::now() >= deadline {
                    let left = self.live;
                    for slot in 0..self.conns.len() {
                        self.close(slot);
                    }
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
        let now = Instant::now();
        let mut next: Option<Instant> = self.shutdown_deadline;
        if let Some(t) = self.notifier.next_deadline() {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(t) = self.accept_retry_at {
            consider(t);
        }
        if let Some(t) = self.flush_retry_at {
            consider(t);
        }
        for &slot in &self.closing {
            if let Some(Some(c)) = self.conns.get(slot) {
                if let ConnState::Closing { deadline } = c.state {
                    consider(deadline);
                }
            }
        }
        next.map(|t| t.saturating_duration_since(now))
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
                    // edge-triggered polling will not say so again; retry.
                    warn!("accept failed: {e}; retrying in {ACCEPT_RETRY:?}");
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
                warn!("dropping a connection whose credentials cannot be read: {e}");
                return;
            }
        };
        let command = command_of(cred.pid);
        let admitted = self.cfg.policy.admit(&cred).map_err(|r| (GoodbyeCode::Denied, r)).and_then(|()| {
            self.connections
                .open(cred.uid)
                .map_err(|r| (GoodbyeCode::LimitExceeded, format!("limit exceeded: {r}")))
        });
        if let Err((code, reason)) = admitted {
            self.counters.refused += 1;
            warn!("refused connection from uid {} (pid {}, comm {}): {reason}", cred.uid, cred.pid, command);
            refuse(fd, code, &reason);
            return;
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        if let Err(e) =
            self.poll.registry().register(&mut SourceFd(&fd.as_raw_fd()), Token(slot), Interest::READABLE)
        {
            warn!("cannot watch a new connection: {e}");
            self.free.push(slot);
            self.connections.close(cred.uid);
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.counters.accepted += 1;
        self.live += 1;
        let conn = Conn {
            id,
            fd,
            cred,
            command,
            name: String::new(),
            state: ConnState::AwaitHello,
            subs: Default::default(),
            queue: OutQueue::new(self.cfg.queue),
            owes_gaps: false,
            dirty: false,
            wants_write: false,
            published: 0,
            msgs_out: 0,
            dropped: 0,
            connected_at: Instant::now(),
        };
        debug!("{} connected", conn.who());
        self.conns[slot] = Some(conn);
        // Data may already be waiting; the edge for it may have been missed.
        self.read_again.push(slot);
    }

    // -------------------------------------------------------------- read --

    fn conn(&mut self, slot: usize) -> Option<&mut Conn> {
        self.conns.get_mut(slot).and_then(Option::as_mut)
    }

    fn read_conn(&mut self, slot: usize) {
        let mut batch = self.batch.take().unwrap_or_else(|| RecvBatch::new(RECV_SLOTS));
        let mut drained = false;
        for _ in 0..READ_BUDGET {
            let Some(conn) = self.conn(slot) else {
                drained = true;
                break;
            };
            if conn.is_closing() {
                drained = true;
                break;
            }
            let n = match batch.recv(conn.fd.as_fd(), true) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(e) => {
                    debug!("{}: receive failed: {e}", conn.who());
                    self.close(slot);
                    drained = true;
                    break;
                }
            };
            for i in 0..n {
                let alive = self.conn(slot).is_some_and(|c| !c.is_closing());
                if !alive {
                    break;
                }
                let (data, status, fds) = batch.packet(i);
                if data.is_empty() {
                    // End of stream: the client left.
                    if let Some(c) = self.conn(slot) {
                        debug!("{} disconnected", c.who());
                    }
                    self.close(slot);
                    break;
                }
                if status.truncated {
                    self.violation(slot, &format!("packet larger than {MAX_PACKET} bytes"));
                } else if status.fds_truncated {
                    self.violation(slot, "more fds than one packet may carry");
                } else {
                    self.handle_packet(slot, data, fds);
                }
            }
            if n < RECV_SLOTS {
                drained = true;
                break;
            }
        }
        self.batch = Some(batch);
        if !drained {
            self.read_again.push(slot);
        }
    }

    fn handle_packet(&mut self, slot: usize, data: &[u8], fds: Vec<OwnedFd>) {
        let frame = match decode_client(data) {
            Ok(f) => f,
            Err(e) => return self.violation(slot, &e.to_string()),
        };
        let Some(conn) = self.conn(slot) else { return };
        let state = conn.state;
        if !fds.is_empty() {
            // Fds are closed when `fds` drops, whatever happens below.
            let declared =
                matches!(&frame, ClientFrame::Publish(p, _) if matches!(p.payload, PayloadRef::Memfd { .. }));
            if !declared {
                let what = frame_name(&frame);
                return self.violation(slot, &format!("unexpected fd attached to a {what} frame"));
            }
        }
        match (state, frame) {
            (ConnState::AwaitHello, ClientFrame::Hello(h)) => {
                if h.version != u16::from(PROTOCOL_VERSION) {
                    let reason = format!(
                        "protocol version {} is not supported (broker speaks {PROTOCOL_VERSION})",
                        h.version
                    );
                    self.counters.protocol_errors += 1;
                    return self.begin_close(slot, GoodbyeCode::VersionMismatch, &reason);
                }
                if h.name.len() > MAX_CLIENT_NAME {
                    return self.violation(slot, "client name too long");
                }
                let limits = Limits {
                    max_packet: MAX_PACKET as u32,
                    max_inline_payload: MAX_INLINE_PAYLOAD as u32,
                    queue_bytes: self.cfg.queue.bytes,
                    queue_frames: self.cfg.queue.frames,
                    max_subscriptions: self.cfg.max_subscriptions,
                };
                let conn = self.conns[slot].as_mut().expect("checked above");
                conn.name = h.name.to_owned();
                conn.state = ConnState::Ready;
                let welcome = Welcome { client_id: conn.id, limits };
                debug!("{} said hello as {:?}", conn.who(), conn.name);
                self.control(slot, &welcome);
            }
            (ConnState::AwaitHello, f) => {
                let what = frame_name(&f);
                self.violation(slot, &format!("{what} frame before Hello"))
            }
            (_, ClientFrame::Hello(_)) => self.violation(slot, "second Hello"),
            (_, ClientFrame::Subscribe(s)) => self.subscribe(slot, s.sub_id, s.pattern, s.overflow),
            (_, ClientFrame::Unsubscribe(u)) => self.unsubscribe(slot, u.sub_id),
            (_, ClientFrame::Publish(p, payload)) => self.publish(slot, p.topic, p.payload, payload, fds),
            (_, ClientFrame::Ping(p)) => {
                self.control(slot, &Pong { token: p.token });
            }
            (_, ClientFrame::Query(q)) => self.query(slot, q.req_id, q.what),
            (_, ClientFrame::ChannelOpen(o)) => self.channel_open(slot, o.req_id, o.topic, o.role),
            (_, ClientFrame::ChannelClose(c)) => self.channel_close(slot, c.channel_id),
        }
    }

    // ---------------------------------------------------------- channels --

    fn channel_open(&mut self, slot: usize, req_id: u32, topic: &str, role: ChannelRole) {
        let op = Op::ChannelOpen { req_id };
        if let Err(e) = validate_subject(topic) {
            let msg = format!("invalid channel subject {topic:?}: {e}");
            return self.op_error(slot, op, ErrorCode::InvalidSubject, &msg);
        }
        let Some(conn) = self.conn(slot) else { return };
        let (client_id, uid) = (conn.id, conn.cred.uid);
        match role {
            ChannelRole::Publish { slot_size, slot_count, overflow } => {
                if let Some(ch) = self.channel_by_topic.get(topic).and_then(|id| self.channels.get(id)) {
                    let msg =
                        format!("channel {topic} already has a publisher (client {})", ch.publisher_client);
                    return self.op_error(slot, op, ErrorCode::ChannelBusy, &msg);
                }
                let geometry = Geometry { slot_size, slot_count };
                if let Err(e) = geometry.validate() {
                    let msg = format!("cannot create the ring: {e}");
                    return self.op_error(slot, op, ErrorCode::Unsupported, &msg);
                }
                // The ring's pages are allocated up front: they count
                // against the publisher's uid like queued payloads do.
                let charge = match self.quotas.charge(uid, (geometry.total_len() + 4096) as u64) {
                    Ok(c) => c,
                    Err(e) => return self.op_error(slot, op, ErrorCode::LimitExceeded, &e.to_string()),
                };
                let (ring, signal, map) = match create_ring(geometry, overflow == ChannelOverflow::Block) {
                    Ok(r) => r,
                    Err(e) => {
                        return self.op_error(
                            slot,
                            op,
                            ErrorCode::Unsupported,
                            &format!("cannot create the ring: {e}"),
                        )
                    }
                };
                let id = self.next_channel_id;
                self.next_channel_id += 1;
                let (ring, signal) = (Rc::new(ring), Rc::new(signal));
                let granted =
                    ChannelGranted { req_id, channel_id: id, reader_id: 0, slot_size, slot_count, overflow };
                self.control_with_fds(slot, &granted, vec![ring.clone(), signal.clone()]);
                debug!("channel {id} on {topic} opened by client {client_id}");
                self.channel_by_topic.insert(topic.to_owned(), id);
                self.channels.insert(
                    id,
                    Channel {
                        id,
                        topic: topic.to_owned(),
                        geometry,
                        overflow,
                        ring_fd: ring,
                        signal_fd: signal,
                        map,
                        publisher_slot: slot,
                        publisher_client: client_id,
                        readers: Default::default(),
                        next_reader: 1,
                        charge,
                    },
                );
            }
            ChannelRole::Subscribe => {
                if !self.channel_by_topic.contains_key(topic) {
                    let msg = format!("no channel on {topic}: a publisher must open it first");
                    return self.op_error(slot, op, ErrorCode::NoSuchChannel, &msg);
                }
                // The cursor page counts against the reader's uid.
                let charge = match self.quotas.charge(uid, 4096) {
                    Ok(c) => c,
                    Err(e) => return self.op_error(slot, op, ErrorCode::LimitExceeded, &e.to_string()),
                };
                let Some(ch) = self.channel_by_topic.get(topic).and_then(|id| self.channels.get_mut(id))
                else {
                    return;
                };
                // A late joiner starts at the head, read after the publisher
                // is told (see `protocol::join`); nothing fails after that.
                let fds = memfd::reopen_read_only(ch.ring_fd.as_fd())
                    .map_err(|e| e.to_string())
                    .and_then(|r| join_reader(&ch.map).map(|c| (c, r)).map_err(|e| e.to_string()));
                let ((generation, cursor_rw, cursor_ro), ring_ro) = match fds {
                    Ok(f) => f,
                    Err(e) => {
                        return self.op_error(slot, op, ErrorCode::Unsupported, &format!("cannot join: {e}"))
                    }
                };
                let reader_id = ch.next_reader;
                // Wrapping, never 0 (the publisher's id): a peer may join and
                // leave any number of times.
                ch.next_reader = ch.next_reader.wrapping_add(1).max(1);
                ch.readers.insert(reader_id, ChannelReader { slot, charge });
                let g = ch.geometry;
                let granted = ChannelGranted {
                    req_id,
                    channel_id: ch.id,
                    reader_id,
                    slot_size: g.slot_size,
                    slot_count: g.slot_count,
                    overflow: ch.overflow,
                };
                let joined = ChannelReaderFrame { channel_id: ch.id, reader_id, joined: true, generation };
                let (publisher, signal) = (ch.publisher_slot, ch.signal_fd.clone());
                self.control_with_fds(slot, &granted, vec![Rc::new(ring_ro), signal, Rc::new(cursor_rw)]);
                self.control_with_fds(publisher, &joined, vec![Rc::new(cursor_ro)]);
            }
        }
    }

    fn channel_close(&mut self, slot: usize, channel_id: u64) {
        let Some(ch) = self.channels.get_mut(&channel_id) else { return };
        if ch.publisher_slot == slot {
            return self.close_channel(channel_id);
        }
        let leaving: Vec<u32> =
            ch.readers.iter().filter(|(_, r)| r.slot == slot).map(|(id, _)| *id).collect();
        let mut news = Vec::new();
        for id in leaving {
            ch.readers.remove(&id);
            news.push(ChannelReaderFrame {
                channel_id,
                reader_id: id,
                joined: false,
                generation: ch.bump_members(),
            });
        }
        let publisher = ch.publisher_slot;
        for left in news {
            self.control(publisher, &left);
        }
    }

    /// The publisher left: mark the ring closed and wake every reader.
    fn close_channel(&mut self, channel_id: u64) {
        if let Some(ch) = self.channels.remove(&channel_id) {
            self.channel_by_topic.remove(&ch.topic);
            ch.map.close();
            debug!("channel {channel_id} on {} closed", ch.topic);
        }
    }

    /// A connection is going: close what it published, leave what it read.
    fn leave_channels(&mut self, slot: usize) {
        let ids: Vec<u64> = self.channels.keys().copied().collect();
        for id in ids {
            self.channel_close(slot, id);
        }
    }

    // ------------------------------------------------------------ frames --

    fn subscribe(
        &mut self,
        slot: usize,
        sub_id: u32,
        pattern: &str,
        overflow: shmbus_proto::frame::Overflow,
    ) {
        let max = self.cfg.max_subscriptions as usize;
        let Some(conn) = self.conn(slot) else { return };
        let op = Op::Subscribe { sub_id };
        let refusal = if let Err(e) = validate_pattern(pattern) {
            Some((ErrorCode::InvalidSubject, format!("invalid pattern {pattern:?}: {e}")))
        } else if conn.subs.contains_key(&sub_id) {
            Some((ErrorCode::DuplicateSubscription, format!("subscription id {sub_id} is in use")))
        } else if conn.subs.len() >= max {
            Some((ErrorCode::LimitExceeded, format!("at most {max} subscriptions per connection")))
        } else {
            None
        };
        if let Some((code, message)) = refusal {
            return self.op_error(slot, op, code, &message);
        }
        conn.subs.insert(sub_id, SubState { pattern: pattern.into(), overflow, missed: 0 });
        self.router.insert(pattern, (slot, sub_id));
        self.control(slot, &Subscribed { sub_id });
    }

    fn unsubscribe(&mut self, slot: usize, sub_id: u32) {
        let Some(conn) = self.conn(slot) else { return };
        match conn.subs.remove(&sub_id) {
            Some(sub) => {
                let owed = sub.missed;
                self.router.remove(&sub.pattern, (slot, sub_id));
                if owed > 0 {
                    // The subscription is gone but its loss is still owed:
                    // report it before the acknowledgement.
                    let gap = shmbus_proto::frame::Gap { sub_id, missed: owed };
                    self.control(slot, &gap);
                    self.counters.gap_notices += 1;
                }
                self.control(slot, &Subscribed { sub_id });
            }
            None => self.op_error(
                slot,
                Op::Unsubscribe { sub_id },
                ErrorCode::UnknownSubscription,
                &format!("no subscription with id {sub_id}"),
            ),
        }
    }

    fn publish(
        &mut self,
        slot: usize,
        topic: &str,
        payload_ref: PayloadRef,
        payload: &[u8],
        mut fds: Vec<OwnedFd>,
    ) {
        let Some(conn) = self.conn(slot) else { return };
        conn.published += 1;
        let seq = conn.published;
        let sender =
            Sender { client_id: conn.id, uid: conn.cred.uid, gid: conn.cred.gid, pid: conn.cred.pid };
        self.counters.msgs_in += 1;
        let op = Op::Publish { seq };
        // Every refusal below drops `fds`, closing them.
        let shared = match payload_ref {
            PayloadRef::Inline => {
                self.counters.bytes_in += payload.len() as u64;
                None
            }
            PayloadRef::Memfd { len } => {
                self.counters.bytes_in += len;
                if fds.len() != 1 {
                    let msg = format!("a memfd publish carries exactly 1 fd; {} were attached", fds.len());
                    return self.op_error(slot, op, ErrorCode::WrongFdCount, &msg);
                }
                if !payload.is_empty() {
                    let msg = "a memfd publish carries no inline bytes";
                    return self.op_error(slot, op, ErrorCode::Unsupported, msg);
                }
                let fd = fds.pop().expect("one fd, checked above");
                if let Err(e) = memfd::check_sealed(fd.as_fd(), len) {
                    let code = match e {
                        MemfdError::NotMemfd => ErrorCode::NotMemfd,
                        MemfdError::NotSealed => ErrorCode::NotSealed,
                        MemfdError::SizeMismatch { .. } => ErrorCode::SizeMismatch,
                        MemfdError::Io(_) | MemfdError::Unmappable(_) => ErrorCode::FdRefused,
                    };
                    return self.op_error(slot, op, code, &format!("fd refused: {e}"));
                }
                let charge = match self.quotas.charge(sender.uid, len) {
                    Ok(c) => c,
                    Err(e) => return self.op_error(slot, op, ErrorCode::LimitExceeded, &e.to_string()),
                };
                Some(Rc::new(SharedFd { fd, len, charge }))
            }
        };
        if let Err(e) = validate_subject(topic) {
            return self.op_error(
                slot,
                op,
                ErrorCode::InvalidSubject,
                &format!("invalid subject {topic:?}: {e}"),
            );
        }
        if payload.len() > MAX_INLINE_PAYLOAD {
            return self.op_error(slot, op, ErrorCode::PayloadTooLarge, "inline payload too large");
        }
        let mut matches = std::mem::take(&mut self.matches);
        matches.clear();
        self.router.matches(topic, &mut matches);
        if !matches.is_empty() {
            let inline: Option<Arc<[u8]>> = (!payload.is_empty()).then(|| Arc::from(payload));
            for &(target, sub_id) in &matches {
                self.deliver(target, sub_id, topic, sender, seq, payload_ref, &inline, &shared);
            }
        }
        self.matches = matches;
        // If nobody matched (or every queue dropped it), `shared` goes here:
        // the fd is closed and the charge released.
    }

    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        target: usize,
        sub_id: u32,
        topic: &str,
        sender: Sender,
        seq: u64,
        payload_ref: PayloadRef,
        inline: &Option<Arc<[u8]>>,
        shared: &Option<Rc<SharedFd>>,
    ) {
        let d = Deliver { sub_id, topic, sender, seq, payload: payload_ref };
        let Ok(head) = encode_head(&d) else { return };
        let frame =
            OutFrame { head, payload: inline.clone(), shared_fd: shared.clone(), control_fds: Vec::new() };
        let Some(conn) = self.conns.get_mut(target).and_then(Option::as_mut) else { return };
        if conn.is_closing() {
            return;
        }
        let Some(sub) = conn.subs.get_mut(&sub_id) else { return };
        match offer(&mut conn.queue, sub_id, sub, frame) {
            Offer::Queued { gap_sent } => {
                if gap_sent {
                    self.counters.gap_notices += 1;
                }
                self.mark_dirty(target);
            }
            Offer::Dropped => {
                conn.dropped += 1;
                conn.owes_gaps = true;
                self.counters.dropped += 1;
            }
            Offer::Disconnect => {
                let reason = format!(
                    "slow consumer: subscription {sub_id} ({}) fell behind with {} frames ({} bytes) queued",
                    sub.pattern,
                    conn.queue.len(),
                    conn.queue.bytes()
                );
                warn!("disconnecting {}: {reason}", conn.who());
                self.counters.slow_disconnects += 1;
                self.begin_close(target, GoodbyeCode::SlowConsumer, &reason);
            }
        }
    }

    fn query(&mut self, slot: usize, req_id: u32, what: QueryKind) {
        let items: Vec<QueryItemBody> = match what {
            QueryKind::Stats => vec![QueryItemBody::Stats(self.stats())],
            QueryKind::Topics => {
                let mut t: Vec<TopicInfo> = self
                    .router
                    .patterns()
                    .map(|(p, n)| TopicInfo { pattern: p.to_owned(), subscribers: n })
                    .collect();
                t.sort_by(|a, b| a.pattern.cmp(&b.pattern));
                t.into_iter().map(QueryItemBody::Topic).collect()
            }
            QueryKind::Channels => {
                let mut c: Vec<ChannelInfo> = self.channels.values().map(Channel::info).collect();
                c.sort_by_key(|c| c.id);
                c.into_iter().map(QueryItemBody::Channel).collect()
            }
            QueryKind::Clients => self
                .conns
                .iter()
                .flatten()
                .filter(|c| !c.is_closing())
                .map(|c| QueryItemBody::Client(client_info(c)))
                .collect(),
        };
        for item in items {
            if !self.control(slot, &QueryItem { req_id, item }) {
                return;
            }
        }
        self.control(slot, &QueryEnd { req_id });
    }

    fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            address: self.address.clone(),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            clients: self.live as u32,
            subscriptions: self.router.len() as u32,
            patterns: self.router.pattern_count() as u32,
            msgs_in: c.msgs_in,
            msgs_out: c.msgs_out,
            bytes_in: c.bytes_in,
            bytes_out: c.bytes_out,
            dropped: c.dropped,
            gap_notices: c.gap_notices,
            connections_accepted: c.accepted,
            connections_refused: c.refused,
            protocol_errors: c.protocol_errors,
            slow_disconnects: c.slow_disconnects,
        }
    }

    /// Queues a control frame. Returns false (and starts closing the
    /// connection) if the client has let its queue reach the hard bound.
    fn control<B: Body>(&mut self, slot: usize, body: &B) -> bool {
        let Ok(head) = encode_head(body) else { return false };
        let Some(conn) = self.conn(slot) else { return false };
        if conn.is_closing() {
            return false;
        }
        if conn.queue.push_control(OutFrame::control(head)).is_err() {
            let reason = format!(
                "not reading its replies: {} frames ({} bytes) queued",
                conn.queue.len(),
                conn.queue.bytes()
            );
            warn!("disconnecting {}: {reason}", conn.who());
            self.begin_close(slot, GoodbyeCode::LimitExceeded, &reason);
            return false;
        }
        self.mark_dirty(slot);
        true
    }

    /// Queues a control frame with fds beside it.
    fn control_with_fds<B: Body>(&mut self, slot: usize, body: &B, fds: Vec<Rc<OwnedFd>>) -> bool {
        let Ok(head) = encode_head(body) else { return false };
        let Some(conn) = self.conn(slot) else { return false };
        if conn.is_closing() {
            return false;
        }
        let frame = OutFrame { head, payload: None, shared_fd: None, control_fds: fds };
        if conn.queue.push_control(frame).is_err() {
            let reason = format!("not reading its replies: {} frames queued", conn.queue.len());
            warn!("disconnecting {}: {reason}", conn.who());
            self.begin_close(slot, GoodbyeCode::LimitExceeded, &reason);
            return false;
        }
        self.mark_dirty(slot);
        true
    }

    fn op_error(&mut self, slot: usize, op: Op, code: ErrorCode, message: &str) {
        if let Some(c) = self.conn(slot) {
            debug!("{}: {op:?} refused: {message}", c.who());
        }
        self.control(slot, &OpError { op, code, message });
    }

    // ------------------------------------------------------------- close --

    fn violation(&mut self, slot: usize, reason: &str) {
        self.counters.protocol_errors += 1;
        if let Some(c) = self.conn(slot) {
            warn!("disconnecting {}: protocol violation: {reason}", c.who());
        }
        self.begin_close(slot, GoodbyeCode::ProtocolViolation, &format!("protocol violation: {reason}"));
    }

    /// Takes the connection out of routing, queues a goodbye as its last
    /// frame, and lets the flush close it.
    fn begin_close(&mut self, slot: usize, code: GoodbyeCode, reason: &str) {
        let deadline = Instant::now() + self.cfg.close_grace;
        if self.conn(slot).is_none_or(|c| c.is_closing()) {
            return;
        }
        self.leave_channels(slot);
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else { return };
        for (sub_id, sub) in conn.subs.drain() {
            self.router.remove(&sub.pattern, (slot, sub_id));
        }
        conn.state = ConnState::Closing { deadline };
        if let Ok(head) = encode_head(&Goodbye { code, reason }) {
            conn.queue.push_final(OutFrame::control(head));
        }
        self.closing.push(slot);
        self.mark_dirty(slot);
    }

    fn close(&mut self, slot: usize) {
        if self.conn(slot).is_some() {
            self.leave_channels(slot);
        }
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::take) else { return };
        for (sub_id, sub) in &conn.subs {
            self.router.remove(&sub.pattern, (slot, *sub_id));
        }
        let _ = self.poll.registry().deregister(&mut SourceFd(&conn.fd.as_raw_fd()));
        // Unread input would make the peer's next read fail with
        // ECONNRESET before it sees our goodbye; discard it first.
        discard_input(&conn.fd);
        debug!("{} closed", conn.who());
        self.live -= 1;
        self.connections.close(conn.cred.uid);
        self.free.push(slot);
        // `conn` drops here: its socket and anything queued go with it.
    }

    fn reap_closing(&mut self) {
        if self.closing.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut keep = Vec::new();
        for slot in std::mem::take(&mut self.closing) {
            // A slot whose connection is gone (or was reused by a live one)
            // simply leaves the list.
            let Some(conn) = self.conns.get(slot).and_then(Option::as_ref) else { continue };
            if let ConnState::Closing { deadline } = conn.state {
                if conn.queue.is_empty() || now >= deadline {
                    self.close(slot);
                } else {
                    keep.push(slot);
                }
            }
        }
        self.closing = keep;
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        info!("shutting down: flushing {} connections", self.live);
        self.notifier.stopping();
        if let Some(l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&l.as_raw_fd()));
        }
        self.shutdown_deadline = Some(Instant::now() + self.cfg.close_grace);
        for slot in 0..self.conns.len() {
            self.begin_close(slot, GoodbyeCode::Shutdown, "the broker is shutting down");
        }
    }

    // ------------------------------------------------------------- flush --

    fn mark_dirty(&mut self, slot: usize) {
        if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(slot);
            }
        }
    }

    fn flush_dirty(&mut self) {
        while !self.dirty.is_empty() {
            for slot in std::mem::take(&mut self.dirty) {
                if let Some(c) = self.conn(slot) {
                    c.dirty = false;
                }
                self.flush(slot);
            }
        }
    }

    fn flush(&mut self, slot: usize) {
        loop {
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else { return };
            if conn.owes_gaps && !conn.is_closing() {
                let mut still_owed = false;
                for (&sub_id, sub) in conn.subs.iter_mut() {
                    if settle_gap(&mut conn.queue, sub_id, sub) {
                        self.counters.gap_notices += 1;
                    }
                    still_owed |= sub.missed > 0;
                }
                conn.owes_gaps = still_owed;
            }
            if conn.queue.is_empty() {
                if conn.is_closing() {
                    self.close(slot);
                } else if conn.wants_write {
                    // Drained: stop asking for writability, or every read by
                    // the peer would wake the loop for nothing.
                    conn.wants_write = false;
                    let _ = self.poll.registry().reregister(
                        &mut SourceFd(&conn.fd.as_raw_fd()),
                        Token(slot),
                        Interest::READABLE,
                    );
                }
                return;
            }
            let frames: Vec<&OutFrame> = conn.queue.front(MAX_BATCH).collect();
            let fds: Vec<Vec<BorrowedFd<'_>>> = frames
                .iter()
                .map(|f| {
                    let shared = f.shared_fd.iter().map(|s| s.fd.as_fd());
                    shared.chain(f.control_fds.iter().map(|fd| fd.as_fd())).collect()
                })
                .collect();
            let packets: Vec<OutPacket<'_>> = frames
                .iter()
                .zip(&fds)
                .map(|(f, fd)| OutPacket {
                    head: &f.head,
                    payload: f.payload.as_deref().unwrap_or(&[]),
                    fds: fd,
                })
                .collect();
            match socket::send_packets(conn.fd.as_fd(), &packets, true) {
                Ok(n) => {
                    let mut bytes = 0;
                    let mut delivered = 0;
                    for f in &frames[..n] {
                        if f.head.get(3) == Some(&(Kind::Deliver as u8)) {
                            delivered += 1;
                            bytes += f.payload.as_ref().map_or(0, |p| p.len()) as u64;
                            bytes += f.shared_fd.as_ref().map_or(0, |s| s.len);
                        }
                    }
                    drop(packets);
                    drop(fds);
                    drop(frames);
                    conn.msgs_out += delivered;
                    self.counters.msgs_out += delivered;
                    self.counters.bytes_out += bytes;
                    conn.queue.consume(n);
                }
                Err(e) if e.raw_os_error() == Some(rustix::io::Errno::TOOMANYREFS.raw_os_error()) => {
                    // The kernel caps the fds this process has in flight in
                    // all its sockets (RLIMIT_NOFILE): some subscriber is not
                    // reading its memfds. Not this connection's fault; retry
                    // shortly rather than drop it.
                    drop(packets);
                    drop(fds);
                    drop(frames);
                    self.flush_retry_at = Some(Instant::now() + FLUSH_RETRY);
                    self.flush_retry.push(slot);
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Socket full: resume on the writable edge.
                    if !conn.wants_write {
                        conn.wants_write = true;
                        let _ = self.poll.registry().reregister(
                            &mut SourceFd(&conn.fd.as_raw_fd()),
                            Token(slot),
                            Interest::READABLE | Interest::WRITABLE,
                        );
                    }
                    return;
                }
                Err(e) => {
                    drop(packets);
                    drop(fds);
                    drop(frames);
                    debug!("{}: send failed: {e}", conn.who());
                    self.close(slot);
                    return;
                }
            }
        }
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

fn client_info(c: &Conn) -> ClientInfo {
    let mut subscriptions: Vec<String> = Vec::new();
    let mut budget = INFO_PATTERN_BUDGET;
    let mut pats: Vec<&str> = c.subs.values().map(|s| &*s.pattern).collect();
    pats.sort_unstable();
    for p in pats {
        if p.len() > budget {
            break;
        }
        budget -= p.len();
        subscriptions.push(p.to_owned());
    }
    ClientInfo {
        id: c.id,
        name: c.name.clone(),
        pid: c.cred.pid,
        uid: c.cred.uid,
        gid: c.cred.gid,
        command: c.command.clone(),
        subscriptions,
        subscription_count: c.subs.len() as u32,
        queued_bytes: c.queue.bytes(),
        queued_frames: c.queue.len() as u32,
        msgs_in: c.published,
        msgs_out: c.msgs_out,
        dropped: c.dropped,
        connected_ms: c.connected_at.elapsed().as_millis() as u64,
    }
}

fn frame_name(f: &ClientFrame<'_>) -> &'static str {
    match f {
        ClientFrame::Hello(_) => "Hello",
        ClientFrame::Subscribe(_) => "Subscribe",
        ClientFrame::Unsubscribe(_) => "Unsubscribe",
        ClientFrame::Publish(..) => "Publish",
        ClientFrame::Ping(_) => "Ping",
        ClientFrame::Query(_) => "Query",
        ClientFrame::ChannelOpen(_) => "ChannelOpen",
        ClientFrame::ChannelClose(_) => "ChannelClose",
    }
}
