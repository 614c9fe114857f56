//! The bus core: every decision the broker makes, and no I/O.
//!
//! Model (dbus-broker's split): the daemon above owns sockets, the poll
//! loop, timers and signals; this layer owns peers, subscriptions and
//! routing, delivery and overflow, channels, introspection, admission and
//! per-uid accounting. The daemon hands it what arrived (a new peer's
//! credentials, a packet with its fds, a hang-up, the time) and takes back
//! [`Effect`]s: a peer whose queue has frames to send, a peer to close.
//! Frames to send wait in each peer's queue; the daemon asks for the
//! sendable prefix ([`Bus::sendable`]) and reports what went out
//! ([`Bus::sent`]). The bus never reads a clock: time comes in as `now`.
//! The only system calls below this line are fd-metadata checks on
//! received memfds and the creation of ring memfds (`shmbus_proto`'s
//! `memfd` and `ring::shm`), never a socket.
//!
//! Where a frame is decided, by file:
//! - `driver.rs`: the handshake, subscriptions, pings, fd acknowledgements,
//!   and what a malformed or truncated packet costs its sender;
//! - `publish.rs`: publishes, their checks, routing and delivery;
//! - `channel.rs`: ring channels and their membership news;
//! - `service.rs`: names, requests and their one answer (`name.rs` holds
//!   the name registry);
//! - `introspect.rs`: paged answers to `Query`;
//! - `monitor.rs`: monitors, an administrator's view of the traffic;
//! - `access.rs`: the policy file applied per peer (`rules.rs` parses and
//!   compiles it), and its reload;
//! - `router.rs`, `queue.rs`, `quota.rs`, `policy.rs`: the mechanisms.
//!
//! Invariants: peer ids are never reused and every registry keys on them;
//! everything a peer makes the broker hold is charged to a uid
//! (`quota.rs`); a refusal leaves the connection usable and names the
//! limit; counters count what was accepted, saturating.

pub mod access;
pub mod channel;
pub mod driver;
pub mod introspect;
pub mod link;
pub mod monitor;
pub mod name;
pub mod peer;
pub mod policy;
pub mod publish;
pub mod queue;
pub mod quota;
pub mod ratelimit;
pub mod router;
pub mod rules;
pub mod service;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use shmbus_proto::frame::{encode_head, Body, ErrorCode, Goodbye, GoodbyeCode, Op, OpError, Sender, Stats};
use shmbus_proto::limits::MAX_ERROR_MESSAGE;
use shmbus_proto::sys::socket::PeerCred;

use channel::Channels;
use peer::{Peer, PeerId, PeerState, SubMap};
use policy::Policy;
use queue::{OutFrame, QueueLimits};
use quota::{Accounts, Resource, UidLimits};
use ratelimit::RateLimit;
use router::Router;
use rules::{Action, Rules};

pub use peer::PeerId as Id;

/// A subscription, as the router names it: the peer and its client-chosen
/// subscription id.
pub type SubKey = (PeerId, u32);

/// What the daemon must do after the bus has decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The peer's queue holds frames that may be sent.
    Flush(PeerId),
    /// The bus has forgotten the peer: close its socket.
    Close(PeerId),
    /// The peer lingers (see `peer.rs`): shut its socket down for writing,
    /// keep it open and readable.
    Shutdown(PeerId),
    /// The peer may have the shared-memory transport, with this capacity:
    /// make it and send `Attached` (or report [`Bus::attach_failed`]).
    Attach(PeerId, u32),
    /// The peer acknowledged fds (`FdAck`): they count as given back only
    /// once its socket shows every packet sent to it read; tell
    /// [`Bus::fds_delivered`] when it does.
    Acked(PeerId),
}

/// What the bus is told at start.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub address: String,
    /// Admission by uid, when no policy file is given.
    pub policy: Policy,
    /// The policy file, compiled; `None`: admission is the only gate.
    pub rules: Option<Rules>,
    pub queue: QueueLimits,
    pub uid_limits: UidLimits,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: u32,
    /// Fds sent to one connection before the broker waits for an ack.
    pub fd_window: u32,
    pub max_readers_per_channel: u32,
    /// Readers one uid may have on one channel (its share of the above,
    /// so one uid cannot take every reader slot of another's channel).
    pub max_readers_per_channel_per_uid: u32,
    pub hello_timeout: Duration,
    /// Longest a request may wait for its answer.
    pub max_request_timeout: Duration,
    /// How the broker stamps what it publishes itself (client id 0).
    pub broker: Sender,
    /// How long a closing connection may take to flush its queue.
    pub close_grace: Duration,
    /// Bytes per direction of a shared-memory link when the client asks
    /// for the default; `None`: no links (`--no-shared-memory`).
    pub link_capacity: Option<u32>,
}

impl BusConfig {
    pub fn new(address: String, broker_uid: u32) -> BusConfig {
        use shmbus_proto::limits as l;
        BusConfig {
            address,
            policy: Policy::new(broker_uid),
            rules: None,
            queue: QueueLimits {
                bytes: l::DEFAULT_QUEUE_BYTES,
                frames: l::DEFAULT_QUEUE_FRAMES,
                fds: l::DEFAULT_QUEUE_FDS,
            },
            uid_limits: UidLimits::default(),
            max_subscriptions: l::DEFAULT_MAX_SUBSCRIPTIONS,
            fd_window: l::DEFAULT_FD_WINDOW,
            max_readers_per_channel: l::DEFAULT_MAX_READERS_PER_CHANNEL,
            max_readers_per_channel_per_uid: l::DEFAULT_MAX_READERS_PER_CHANNEL_PER_UID,
            hello_timeout: Duration::from_millis(l::DEFAULT_HELLO_TIMEOUT_MS),
            max_request_timeout: Duration::from_millis(l::DEFAULT_MAX_REQUEST_TIMEOUT_MS),
            broker: Sender {
                client_id: 0,
                uid: broker_uid,
                gid: rustix::process::getgid().as_raw(),
                pid: rustix::process::getpid().as_raw_nonzero().get() as u32,
            },
            close_grace: Duration::from_secs(2),
            link_capacity: Some(shmbus_proto::link::layout::DEFAULT_CAPACITY),
        }
    }
}

/// Broker-wide counters: of what was accepted, saturating.
#[derive(Debug, Default)]
pub struct Counters {
    pub msgs_in: u64,
    pub msgs_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dropped: u64,
    pub gap_notices: u64,
    pub accepted: u64,
    pub refused: u64,
    pub protocol_errors: u64,
    pub slow_disconnects: u64,
    pub quota_refusals: u64,
    pub broker_resource_errors: u64,
    pub hello_timeouts: u64,
    pub requests: u64,
    pub replies_refused: u64,
    pub replies_dropped: u64,
    pub request_timeouts: u64,
    /// Operations the policy file refused.
    pub policy_denials: u64,
}

/// Adds saturating: a counter sticks at its maximum rather than wrap.
/// Uids with a log rate of their own at once (past it, limiters whose
/// window is over are forgotten; a uid that finds no room then shares
/// only the wide rate).
const UID_LOG_LIMITERS: usize = 4096;

pub fn bump(c: &mut u64, by: u64) {
    *c = c.saturating_add(by);
}

pub struct Bus {
    cfg: BusConfig,
    peers: BTreeMap<PeerId, Peer>,
    next_peer: PeerId,
    router: Router<SubKey>,
    accounts: Accounts,
    channels: Channels,
    names: name::Names,
    replies: service::Replies,
    monitors: monitor::Monitors,
    /// Messages the broker published itself (name events).
    broker_seq: u64,
    counters: Counters,
    effects: Vec<Effect>,
    hello_deadlines: VecDeque<(Instant, PeerId)>,
    close_deadlines: VecDeque<(Instant, PeerId)>,
    /// Peers whose sending waits for their uid's unacknowledged-fd room.
    stalled: HashMap<u32, Vec<PeerId>>,
    started: Instant,
    /// All log lines a peer can cause, together (see `warn_limited`).
    log: RateLimit,
    /// Each uid's own rate of them, and the lines those left out.
    uid_log: HashMap<u32, RateLimit>,
    uid_log_suppressed: u64,
    matches: Vec<SubKey>,
    /// Buffers of sent deliveries, for the next ones ([`FrameBuffers`]).
    buffers: queue::FrameBuffers,
    /// Deliveries attempted so far (wrapping): the daemon's measure of
    /// work, to bound one peer's share of a loop turn.
    work: u64,
    /// `shutdown` began: no more answers for calls in flight.
    shutting_down: bool,
}

impl Bus {
    pub fn new(cfg: BusConfig, now: Instant) -> Bus {
        let accounts = Accounts::new(cfg.uid_limits);
        Bus {
            cfg,
            peers: BTreeMap::new(),
            next_peer: 1,
            router: Router::new(),
            accounts,
            channels: Channels::default(),
            names: name::Names::default(),
            replies: service::Replies::default(),
            monitors: monitor::Monitors::default(),
            broker_seq: 0,
            counters: Counters::default(),
            effects: Vec::new(),
            hello_deadlines: VecDeque::new(),
            close_deadlines: VecDeque::new(),
            stalled: HashMap::new(),
            started: now,
            log: RateLimit::new(200, Duration::from_secs(10)),
            uid_log: HashMap::new(),
            uid_log_suppressed: 0,
            matches: Vec::new(),
            buffers: queue::FrameBuffers::default(),
            work: 0,
            shutting_down: false,
        }
    }

    /// Deliveries attempted so far (wrapping).
    pub fn work(&self) -> u64 {
        self.work
    }

    pub fn config(&self) -> &BusConfig {
        &self.cfg
    }

    /// Connections the bus holds, closing ones included.
    pub fn live(&self) -> usize {
        self.peers.len()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn peer(&self, id: PeerId) -> Option<&Peer> {
        self.peers.get(&id)
    }

    /// What uid `uid` holds of `r` (for tests and introspection).
    pub fn held(&self, uid: u32, r: Resource) -> u64 {
        self.accounts.held(uid, r)
    }

    pub fn status_line(&self) -> String {
        format!(
            "{} clients, {} subscriptions on {} patterns; {} messages in, {} dropped",
            self.peers.len(),
            self.router.len(),
            self.router.pattern_count(),
            self.counters.msgs_in,
            self.counters.dropped
        )
    }

    /// Logs a refusal or a disconnect at a bounded rate: each uid's lines
    /// at their own (`uid`: whose peer caused it), all of them together at
    /// a wider one. So one uid's flood of refusals cannot keep another's
    /// out of the log (a hostile review hid a policy denial of one uid
    /// behind 50 of another's), nor fill the disk.
    fn warn_limited(&mut self, uid: Option<u32>, line: impl FnOnce() -> String) {
        if let Some(suppressed) = self.log_gate(uid) {
            let line = line();
            if suppressed > 0 {
                warn!("{line} ({suppressed} similar lines suppressed)");
            } else {
                warn!("{line}");
            }
        }
    }

    /// Whether a line of `uid`'s may be written now (see `warn_limited`);
    /// if so, how many lines left out before it no written line has
    /// reported yet. A line its uid's limiter lets through but the wide
    /// one does not passes on the count it carried to the wide one's next
    /// line: every line left out is reported by a later one. No I/O.
    fn log_gate(&mut self, uid: Option<u32>) -> Option<u64> {
        let now = self.now_hint();
        let own = match uid {
            Some(u) => {
                if self.uid_log.len() >= UID_LOG_LIMITERS && !self.uid_log.contains_key(&u) {
                    // Bounded: forget the limiters whose window is over.
                    self.uid_log.retain(|_, l| !l.idle_since(now));
                }
                if self.uid_log.len() >= UID_LOG_LIMITERS && !self.uid_log.contains_key(&u) {
                    // Still full: this uid shares the wide rate alone.
                    Some(0)
                } else {
                    self.uid_log
                        .entry(u)
                        .or_insert_with(|| RateLimit::new(20, Duration::from_secs(10)))
                        .allow(now)
                }
            }
            None => Some(0),
        };
        let Some(own_suppressed) = own else {
            // Said with this uid's next line that passes.
            bump(&mut self.uid_log_suppressed, 1);
            return None;
        };
        match self.log.allow(now) {
            Some(suppressed) => Some(suppressed.saturating_add(own_suppressed)),
            None => {
                // Counted already (in `uid_log_suppressed`): only said later.
                self.log.carry(own_suppressed);
                None
            }
        }
    }

    /// The rate limiter's clock: the latest `now` the daemon gave.
    fn now_hint(&self) -> Instant {
        self.log.last_seen().unwrap_or(self.started)
    }

    /// Drains the effects decided so far.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        let effects = std::mem::take(&mut self.effects);
        for e in &effects {
            if let Effect::Flush(id) = e {
                if let Some(p) = self.peers.get_mut(id) {
                    p.dirty = false;
                }
            }
        }
        effects
    }

    fn mark_dirty(&mut self, id: PeerId) {
        if let Some(p) = self.peers.get_mut(&id) {
            if !p.dirty {
                p.dirty = true;
                self.effects.push(Effect::Flush(id));
            }
        }
    }

    // ------------------------------------------------------------- peers --

    /// A connection arrived with these credentials: admit it, or say why
    /// not (the daemon sends the goodbye and closes).
    /// `groups`: every group the kernel reported for it (`SO_PEERGROUPS`).
    pub fn connect(
        &mut self,
        cred: PeerCred,
        groups: Vec<u32>,
        command: String,
        now: Instant,
    ) -> Result<PeerId, (GoodbyeCode, String)> {
        self.log.see(now);
        let mut groups = groups;
        if !groups.contains(&cred.gid) {
            groups.insert(0, cred.gid);
        }
        let access = self.access_for(&cred, &groups);
        let admission = match &self.cfg.rules {
            None => self.cfg.policy.admit(&cred),
            Some(_) => access
                .check(Action::Connect, "")
                .map_err(|e| {
                    format!(
                        "access denied: uid {} may not connect to this bus ({e}); the broker's policy file needs \
                         a rule that allows `connect` for it",
                        cred.uid
                    )
                }),
        };
        let admitted = admission.map_err(|r| (GoodbyeCode::Denied, r)).and_then(|()| {
            self.accounts
                .charge(cred.uid, &[(Resource::Connections, 1)])
                .map_err(|e| (GoodbyeCode::LimitExceeded, format!("limit exceeded: {e}")))
        });
        let connection = match admitted {
            Ok(c) => c,
            Err((code, reason)) => {
                bump(&mut self.counters.refused, 1);
                let comm = shmbus_proto::text::escape(&command).into_owned();
                self.warn_limited(Some(cred.uid), || {
                    format!(
                        "refused connection from uid {} (pid {}, comm {comm}): {reason}",
                        cred.uid, cred.pid
                    )
                });
                self.accounts.sweep();
                return Err((code, reason));
            }
        };
        let id = self.next_peer;
        self.next_peer += 1;
        bump(&mut self.counters.accepted, 1);
        let usage = self.accounts.usage(cred.uid);
        let peer = Peer {
            id,
            cred,
            groups,
            access,
            command,
            name: String::new(),
            state: PeerState::AwaitHello,
            link: peer::LinkPhase::Closed,
            subs: SubMap::default(),
            queue: queue::OutQueue::new(self.cfg.queue, usage.clone()),
            channels: Vec::new(),
            owes_gaps: false,
            dirty: false,
            published: 0,
            msgs_out: 0,
            dropped: 0,
            news_queued: 0,
            names: Vec::new(),
            calls_in: Default::default(),
            calls_out: Default::default(),
            unacked_fds: 0,
            acked_fds: 0,
            last_route: Default::default(),
            connected_at: now,
            usage,
            _connection: connection,
        };
        debug!("{} connected", peer.who());
        self.peers.insert(id, peer);
        self.hello_deadlines.push_back((now + self.cfg.hello_timeout, id));
        Ok(id)
    }

    /// The peer hung up or its socket failed: forget it now.
    pub fn hangup(&mut self, id: PeerId) {
        if let Some(p) = self.peers.get(&id) {
            debug!("{} disconnected", p.who());
        }
        self.remove(id);
    }

    /// Forgets a peer and everything it holds; tells the daemon to close.
    fn remove(&mut self, id: PeerId) {
        self.detach(id);
        if let Some(p) = self.peers.remove(&id) {
            let (uid, freed) = (p.cred.uid, p.unacked_fds + p.acked_fds);
            drop(p);
            self.effects.push(Effect::Close(id));
            if freed > 0 {
                self.wake_stalled(uid);
            }
        }
        self.accounts.sweep();
    }

    /// Room for `uid`'s unacknowledged fds grew: flush its connections
    /// that waited for it.
    pub(crate) fn wake_stalled(&mut self, uid: u32) {
        for waiting in self.stalled.remove(&uid).unwrap_or_default() {
            self.mark_dirty(waiting);
        }
    }

    /// A closing peer's queue is done (flushed, or its deadline passed):
    /// end it, or let it linger while fds sent to it are unacknowledged or
    /// not yet seen read.
    fn finish_close(&mut self, id: PeerId) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        if p.unacked_fds == 0 && p.acked_fds == 0 {
            return self.remove(id);
        }
        // Whatever is still queued will not be sent.
        p.queue.keep_last_only();
        p.queue.consume(1);
        if p.state != PeerState::Lingering {
            p.state = PeerState::Lingering;
            debug!(
                "{} lingers with {} fds unacknowledged, {} not yet seen read",
                p.who(),
                p.unacked_fds,
                p.acked_fds
            );
            self.effects.push(Effect::Shutdown(id));
        }
    }

    /// Takes the peer out of routing and gives back its channel handles.
    fn detach(&mut self, id: PeerId) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let said_hello = p.state != PeerState::AwaitHello;
        let subs: Vec<(u32, Box<str>)> = p.subs.drain().map(|(sid, s)| (sid, s.state.pattern)).collect();
        self.monitors.remove_peer(id);
        let handles = std::mem::take(&mut p.channels);
        for (sid, pattern) in subs {
            self.router.remove(&pattern, (id, sid));
        }
        for (channel_id, reader_id) in handles {
            self.release_handle(id, channel_id, reader_id);
        }
        let now = self.now_hint();
        self.leave_services(id, now);
        if said_hello && !self.monitors.is_empty() {
            let seen = monitor::Seen {
                kind: shmbus_proto::frame::MonitorKind::Disconnect,
                subject: "",
                sender: self.stamp(id),
                receivers: Vec::new(),
                detail: self.peers.get(&id).map(Peer::who).unwrap_or_default(),
                payload_ref: shmbus_proto::frame::PayloadRef::Inline,
                payload: &[],
            };
            self.monitor_event(seen, now);
        }
    }

    /// Takes the peer out of routing, queues a goodbye as its last frame,
    /// and lets the flush (or the grace deadline) end it.
    pub(crate) fn begin_close(&mut self, id: PeerId, code: GoodbyeCode, reason: &str, now: Instant) {
        if self.peers.get(&id).is_none_or(Peer::is_closing) {
            return;
        }
        self.detach(id);
        let Some(p) = self.peers.get_mut(&id) else { return };
        p.state = PeerState::Closing;
        let reason = shmbus_proto::text::clip(reason, MAX_ERROR_MESSAGE);
        if let Ok(head) = encode_head(&Goodbye { code, reason }) {
            p.queue.push_final(OutFrame::control(head));
        }
        self.close_deadlines.push_back((now + self.cfg.close_grace, id));
        self.mark_dirty(id);
    }

    /// Ends a peer that broke the protocol.
    pub(crate) fn violation(&mut self, id: PeerId, reason: &str, now: Instant) {
        bump(&mut self.counters.protocol_errors, 1);
        if let Some(p) = self.peers.get(&id) {
            let who = p.who();
            let uid = p.cred.uid;
            self.warn_limited(Some(uid), || format!("disconnecting {who}: protocol violation: {reason}"));
        }
        self.begin_close(id, GoodbyeCode::ProtocolViolation, &format!("protocol violation: {reason}"), now);
    }

    /// Starts the shutdown: every peer gets a goodbye.
    pub fn shutdown(&mut self, now: Instant) {
        // Every caller goes too: a call in flight ends with the caller's
        // connection (the client says `Disconnected`), not with a
        // `ResponderGone` for a service that did not go anywhere.
        self.shutting_down = true;
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.begin_close(id, GoodbyeCode::Shutdown, "the broker is shutting down", now);
        }
    }

    /// Forgets every peer at once (the shutdown deadline passed).
    pub fn close_all(&mut self) {
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for id in ids {
            self.remove(id);
        }
    }

    // ------------------------------------------------------------ timers --

    /// The earliest time `tick` has work. The deadlines of peers that no
    /// longer wait for one (a Hello came, a close finished, the peer left)
    /// are dropped from the queues' fronts first, so such a deadline wakes
    /// no one: after a burst of short connections (a CLI's, say) an idle
    /// broker had woken once for each, a Hello timeout later.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.forget_passed_deadlines();
        let h = self.hello_deadlines.front().map(|d| d.0);
        let c = self.close_deadlines.front().map(|d| d.0);
        [h, c, self.replies.next_deadline()].into_iter().flatten().min()
    }

    /// Drops the fronts of the deadline queues whose peers no longer wait
    /// (O(1) amortised: each entry is dropped once, here or in `tick`).
    fn forget_passed_deadlines(&mut self) {
        let peers = &self.peers;
        let waits = |id: &PeerId, state: PeerState| peers.get(id).is_some_and(|p| p.state == state);
        while self.hello_deadlines.front().is_some_and(|(_, id)| !waits(id, PeerState::AwaitHello)) {
            self.hello_deadlines.pop_front();
        }
        while self.close_deadlines.front().is_some_and(|(_, id)| !waits(id, PeerState::Closing)) {
            self.close_deadlines.pop_front();
        }
    }

    /// Ends peers whose Hello or closing deadline passed. Deadlines are
    /// pushed in time order (one constant timeout each), so each queue is
    /// sorted and this is O(expired).
    pub fn tick(&mut self, now: Instant) {
        self.log.see(now);
        self.expire_requests(now);
        while let Some(&(t, id)) = self.hello_deadlines.front() {
            if t > now {
                break;
            }
            self.hello_deadlines.pop_front();
            if self.peers.get(&id).is_some_and(|p| p.state == PeerState::AwaitHello) {
                bump(&mut self.counters.hello_timeouts, 1);
                let ms = self.cfg.hello_timeout.as_millis();
                if let Some(p) = self.peers.get(&id) {
                    let who = p.who();
                    let uid = p.cred.uid;
                    self.warn_limited(Some(uid), || format!("disconnecting {who}: no Hello within {ms} ms"));
                }
                let reason = format!("no Hello within {ms} ms (the broker's --hello-timeout-ms)");
                self.begin_close(id, GoodbyeCode::HelloTimeout, &reason, now);
            }
        }
        while let Some(&(t, id)) = self.close_deadlines.front() {
            if t > now {
                break;
            }
            self.close_deadlines.pop_front();
            if self.peers.get(&id).is_some_and(|p| p.state == PeerState::Closing) {
                self.finish_close(id);
            }
        }
    }

    // ------------------------------------------------------------ output --

    /// Queues a control frame. Returns false (and starts closing the peer)
    /// if the peer has let its queue reach the hard bound.
    pub(crate) fn control<B: Body>(&mut self, id: PeerId, body: &B, now: Instant) -> bool {
        self.control_with_fds(id, body, Vec::new(), now)
    }

    /// Queues a control frame with fds beside it.
    pub(crate) fn control_with_fds<B: Body>(
        &mut self,
        id: PeerId,
        body: &B,
        fds: Vec<Rc<std::os::fd::OwnedFd>>,
        now: Instant,
    ) -> bool {
        let head = match encode_head(body) {
            Ok(head) => head,
            Err(e) => {
                // Every message the broker writes is cut to fit (see
                // `op_error`): this is a bug, and it is said so.
                self.warn_limited(self.peers.get(&id).map(|p| p.cred.uid), || {
                    format!("client {id}: a control frame was not sent: {e}")
                });
                return false;
            }
        };
        let Some(p) = self.peers.get_mut(&id) else { return false };
        if p.is_closing() {
            return false;
        }
        let frame = OutFrame { head, payload: None, shared_fd: None, control_fds: fds };
        if p.queue.push_control(frame).is_err() {
            let reason = format!(
                "not reading its replies: {} frames ({} bytes) queued for it, {} bytes for its uid",
                p.queue.len(),
                p.queue.bytes(),
                p.usage.held(Resource::QueuedBytes)
            );
            let who = p.who();
            let uid = p.cred.uid;
            self.warn_limited(Some(uid), || format!("disconnecting {who}: {reason}"));
            self.begin_close(id, GoodbyeCode::LimitExceeded, &reason, now);
            return false;
        }
        self.mark_dirty(id);
        true
    }

    /// Queues a caller's answer, fds and all, as a control frame: an
    /// answer is never dropped; a caller that does not read its answers
    /// reaches the hard bound and is cut off.
    pub(crate) fn push_answer(&mut self, id: PeerId, frame: OutFrame, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        if p.is_closing() {
            return;
        }
        if p.queue.push_control(frame).is_err() {
            let reason = format!(
                "not reading its answers: {} frames ({} bytes) queued",
                p.queue.len(),
                p.queue.bytes()
            );
            let who = p.who();
            let uid = p.cred.uid;
            self.warn_limited(Some(uid), || format!("disconnecting {who}: {reason}"));
            self.begin_close(id, GoodbyeCode::LimitExceeded, &reason, now);
            return;
        }
        self.mark_dirty(id);
    }

    pub(crate) fn op_error(&mut self, id: PeerId, op: Op, code: ErrorCode, message: &str, now: Instant) {
        // Refusals quote what was refused (`text::quote` bounds that);
        // cut all the same, so no refusal outgrows its packet.
        let message = shmbus_proto::text::clip(message, MAX_ERROR_MESSAGE);
        if let Some(p) = self.peers.get(&id) {
            debug!("{}: {op:?} refused: {}", p.who(), shmbus_proto::text::escape(message));
        }
        self.control(id, &OpError { op, code, message }, now);
        if !self.monitors.is_empty() {
            let seen = monitor::Seen {
                kind: shmbus_proto::frame::MonitorKind::Error,
                subject: "",
                sender: self.stamp(id),
                receivers: vec![id],
                detail: format!("{op:?} refused: {code:?}: {}", shmbus_proto::text::escape(message)),
                payload_ref: shmbus_proto::frame::PayloadRef::Inline,
                payload: &[],
            };
            self.monitor_event(seen, now);
        }
    }

    /// A refusal by quota: counted, logged at a bounded rate, reported.
    pub(crate) fn quota_refusal(&mut self, id: PeerId, op: Op, e: &quota::QuotaError, now: Instant) {
        bump(&mut self.counters.quota_refusals, 1);
        if let Some(p) = self.peers.get(&id) {
            let who = p.who();
            let uid = p.cred.uid;
            self.warn_limited(Some(uid), || format!("{who}: {op:?} refused: {e}"));
        }
        self.op_error(id, op, ErrorCode::LimitExceeded, &e.to_string(), now);
    }

    /// The frames at the front of the peer's queue that may go now: up to
    /// `max`, stopping before a frame whose fds the peer's window or its
    /// uid's unacknowledged-fd room cannot take.
    pub fn sendable(&mut self, id: PeerId, max: usize) -> Vec<&OutFrame> {
        let n = self.sendable_count(id, max);
        match self.peers.get(&id) {
            Some(p) => p.queue.front(n).collect(),
            None => Vec::new(),
        }
    }

    /// How many frames at the front of `id`'s queue may go now (see
    /// [`Bus::sendable`], which collects them; this lets a caller walk
    /// them in place, `peer(id).queue.front(n)`, with no allocation per
    /// flush).
    pub fn sendable_count(&mut self, id: PeerId, max: usize) -> usize {
        let window = u64::from(self.cfg.fd_window);
        let Some(p) = self.peers.get(&id) else { return 0 };
        let mut own = window.saturating_sub(p.unacked_fds + p.acked_fds);
        let mut uid = p.usage.room(Resource::UnackedFds);
        let mut n = 0;
        let mut stalled_on_uid = false;
        for f in p.queue.front(max) {
            let fds = f.fd_count() as u64;
            if fds > own {
                break;
            }
            if fds > uid {
                stalled_on_uid = true;
                break;
            }
            own -= fds;
            uid -= fds;
            n += 1;
        }
        if stalled_on_uid {
            let waiting = self.stalled.entry(p.cred.uid).or_default();
            if !waiting.contains(&id) {
                waiting.push(id);
            }
        }
        n
    }

    /// The first `n` frames of the peer's queue went out.
    pub fn sent(&mut self, id: PeerId, n: usize, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let (mut delivered, mut bytes, mut fds, mut news) = (0u64, 0u64, 0u64, 0u32);
        for f in p.queue.front(n) {
            fds += f.fd_count() as u64;
            news += u32::from(f.head.get(3) == Some(&(shmbus_proto::frame::Kind::ChannelReader as u8)));
            if f.head.get(3) == Some(&(shmbus_proto::frame::Kind::Deliver as u8)) {
                delivered += 1;
                bytes = bytes.saturating_add(f.inline_len() as u64);
                bytes = bytes.saturating_add(f.shared_fd.as_ref().map_or(0, |s| s.len));
            }
        }
        p.queue.consume_into(n, &mut self.buffers);
        p.news_queued = p.news_queued.saturating_sub(news);
        p.unacked_fds += fds;
        p.usage.add(Resource::UnackedFds, fds);
        p.msgs_out += delivered;
        bump(&mut self.counters.msgs_out, delivered);
        bump(&mut self.counters.bytes_out, bytes);
        self.after_output(id, now);
    }

    /// After frames left: settle owed gaps, tell channel news, and end a
    /// closing peer whose queue is empty.
    fn after_output(&mut self, id: PeerId, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        if p.owes_gaps && !p.is_closing() {
            let mut still_owed = false;
            let mut settled = 0;
            for (&sub_id, sub) in p.subs.iter_mut() {
                if queue::settle_gap(&mut p.queue, sub_id, &mut sub.state) {
                    settled += 1;
                }
                still_owed |= sub.state.missed > 0;
            }
            p.owes_gaps = still_owed;
            bump(&mut self.counters.gap_notices, settled);
        }
        self.tell_channel_news(id, now);
        let Some(p) = self.peers.get(&id) else { return };
        if p.state == PeerState::Closing && p.queue.is_empty() {
            self.finish_close(id);
        }
    }

    /// Fds the peer acknowledged whose packets are not yet seen read: while
    /// there are some, the daemon watches its socket for the peer's reads
    /// and calls [`Bus::fds_delivered`] once every packet sent is read.
    pub fn unconfirmed_fds(&self, id: PeerId) -> u64 {
        self.peers.get(&id).map_or(0, |p| p.acked_fds)
    }

    /// The daemon saw the peer's socket hold nothing it was sent (every
    /// packet read, its fds out of flight): the fds it acknowledged so far
    /// are given back to its window and its uid. Ends a lingering peer
    /// that has nothing else out.
    pub fn fds_delivered(&mut self, id: PeerId) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        let fds = std::mem::take(&mut p.acked_fds);
        if fds == 0 {
            return;
        }
        p.usage.sub(Resource::UnackedFds, fds);
        let uid = p.cred.uid;
        if p.state == PeerState::Lingering && p.unacked_fds == 0 {
            // It gave back everything: nothing keeps it any more.
            self.remove(id);
        } else if !p.queue.is_empty() {
            self.mark_dirty(id);
        }
        // Room for this uid may unblock its other connections.
        self.wake_stalled(uid);
    }

    /// Whether the peer has frames queued (sendable or not).
    pub fn has_output(&self, id: PeerId) -> bool {
        self.peers.get(&id).is_some_and(|p| !p.queue.is_empty())
    }

    /// The daemon could not send to this peer for lack of kernel room for
    /// fds in flight: count it.
    pub fn note_broker_short(&mut self) {
        bump(&mut self.counters.broker_resource_errors, 1);
    }

    pub fn stats(&self, now: Instant) -> Stats {
        let c = &self.counters;
        Stats {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            address: self.cfg.address.clone(),
            uptime_ms: now.saturating_duration_since(self.started).as_millis() as u64,
            clients: self.peers.len() as u32,
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
            quota_refusals: c.quota_refusals,
            log_suppressed: self.log.suppressed_total().saturating_add(self.uid_log_suppressed),
            broker_resource_errors: c.broker_resource_errors,
            hello_timeouts: c.hello_timeouts,
            names: self.names.len() as u32,
            pending_requests: self.replies.len() as u32,
            requests: c.requests,
            replies_refused: c.replies_refused,
            replies_dropped: c.replies_dropped,
            request_timeouts: c.request_timeouts,
            policy_denials: c.policy_denials,
        }
    }
}

#[cfg(test)]
mod tests;
