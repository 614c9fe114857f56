//! `Client`: connecting, publishing, subscribing, introspecting.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{check_pattern, check_subject, Refusals};
use shmbus_proto::frame::{
    decode_broker, encode_head, Attach, BrokerFrame, ClientInfo, Hello, Limits, Monitor as MonitorFrame, Op,
    Overflow, PayloadRef, Ping, PolicyCheck, PolicyVerdict, Publish, Query, QueryItemBody, QueryKind, Stats,
    Subscribe, TopicInfo, PROTOCOL_VERSION,
};
use shmbus_proto::frame::{encode_head_into, validate_origin};
use shmbus_proto::sys::socket::{self, OutPacket, PeerCred, RecvBatch, MAX_BATCH};
use shmbus_proto::Address;

use crate::channel::{ChannelConfig, ChannelError, ChannelPublisher, ChannelSubscriber};
use crate::connection::{Dialed, Inner, LocalBounds, QuerySlot, Redial, State};
use crate::error::{
    ConnectError, Disconnect, FlushError, LoanError, PublishError, RecvError, RequestError, SubscribeError,
};
use crate::link::{Attachment, Transport};
use crate::loan::Loan;
use crate::monitor::Monitor;
use crate::subscription::Subscription;
use shmbus_proto::frame::ChannelInfo;
use shmbus_proto::frame::{ErrorCode, GoodbyeCode, Unsubscribe};
use shmbus_proto::sys::memfd;

/// How long to wait for the broker's answer to a handshake, subscribe or
/// query unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default bound of each subscription's in-process queue, in messages
/// (see [`ConnectOptions::local_queue`] and the bounds in bytes and fds
/// beside it).
pub const DEFAULT_LOCAL_QUEUE: usize = 65_536;

/// Payloads larger than this go by sealed memfd instead of inline, unless
/// set otherwise with [`ConnectOptions::memfd_threshold`]. Chosen from the
/// `payload` benchmark (see the README): up to the 64 KiB inline limit, one
/// copy through the socket beat creating, filling, sealing, checking and
/// mapping a memfd at every size measured, in every run (end to end,
/// 29–50 µs against 69–95 µs at 4 KiB; 52–67 µs against 96–131 µs at
/// 64 KiB), so the memfd path starts where inline ends.
pub const DEFAULT_MEMFD_THRESHOLD: usize = shmbus_proto::limits::MAX_INLINE_PAYLOAD;

/// Which broker uids this client trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Trust {
    /// Root and our own uid (the default).
    RootOrSelf,
    /// Root, our own uid, and these.
    Also(BTreeSet<u32>),
    /// Anyone: only for tests and tools that know what they are doing.
    Anyone,
}

/// What a client does when its connection to the broker is lost (the
/// broker restarted, shut down, or cut it off as too slow): make it again,
/// with exponential backoff from `initial_delay` up to `max_delay`, at most
/// `max_attempts` times in a row (`None`: until it succeeds). The default:
/// 50 ms doubling to 2 s, forever. A goodbye that says not to come back
/// (a protocol violation, a refusal) ends the connection all the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// The wait after the first failed attempt; it doubles after each.
    pub initial_delay: Duration,
    /// The longest wait between attempts.
    pub max_delay: Duration,
    /// Attempts in a row before giving up (`Some(0)`: never reconnect;
    /// `None`: no limit).
    pub max_attempts: Option<u32>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            initial_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
            max_attempts: None,
        }
    }
}

impl ReconnectPolicy {
    /// Never reconnect: a lost connection is closed for good, and every
    /// operation then fails with `Disconnected` (the behaviour before
    /// reconnection existed).
    pub fn never() -> ReconnectPolicy {
        ReconnectPolicy { max_attempts: Some(0), ..ReconnectPolicy::default() }
    }

    /// The wait after failed attempt `n` (0-based).
    pub(crate) fn delay(&self, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n.min(20)).unwrap_or(u32::MAX);
        self.initial_delay.saturating_mul(factor).min(self.max_delay)
    }
}

/// How to connect. `Client::connect*` cover the usual cases.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    address: Option<Address>,
    system: bool,
    name: Option<String>,
    trust: Trust,
    timeout: Duration,
    local: LocalBounds,
    memfd_threshold: usize,
    reconnect: ReconnectPolicy,
    shared_memory: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            address: None,
            system: false,
            name: None,
            trust: Trust::RootOrSelf,
            timeout: DEFAULT_TIMEOUT,
            local: LocalBounds::default(),
            memfd_threshold: DEFAULT_MEMFD_THRESHOLD,
            reconnect: ReconnectPolicy::default(),
            shared_memory: true,
        }
    }
}

impl ConnectOptions {
    /// Default of [`ConnectOptions::local_queue_bytes`]: 64 MiB.
    pub const DEFAULT_LOCAL_QUEUE_BYTES: usize = 64 << 20;
    /// Default of [`ConnectOptions::local_queue_fds`]: 256, as many memfd
    /// payloads as the broker queues for one connection by default.
    pub const DEFAULT_LOCAL_QUEUE_FDS: usize = 256;
    /// Default of [`ConnectOptions::local_total_bytes`]: 256 MiB.
    pub const DEFAULT_LOCAL_TOTAL_BYTES: usize = 256 << 20;
    /// Default of [`ConnectOptions::local_total_fds`]: 512, half the usual
    /// soft limit of open files (1024).
    pub const DEFAULT_LOCAL_TOTAL_FDS: usize = 512;

    /// The defaults: `$SHMBUS_ADDRESS` or the user bus, trusting a broker
    /// run by root or this user, [`DEFAULT_TIMEOUT`], reconnecting, and
    /// the shared-memory transport when the broker offers it.
    pub fn new() -> ConnectOptions {
        ConnectOptions::default()
    }

    /// Connect here instead of `$SHMBUS_ADDRESS` or the user bus.
    pub fn address(mut self, address: Address) -> Self {
        self.address = Some(address);
        self
    }

    /// Connect to the system bus, `@shmbus`.
    pub fn system(mut self) -> Self {
        self.system = true;
        self
    }

    /// The name shown in introspection (default: the program's name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Also trust a broker running as `uid`.
    pub fn trust_broker_uid(mut self, uid: u32) -> Self {
        match &mut self.trust {
            Trust::Also(set) => {
                set.insert(uid);
            }
            Trust::RootOrSelf => self.trust = Trust::Also([uid].into()),
            Trust::Anyone => {}
        }
        self
    }

    /// Trust whatever process listens at the address. A squatter on an
    /// abstract name could then read everything this client sends.
    pub fn trust_any_broker(mut self) -> Self {
        self.trust = Trust::Anyone;
        self
    }

    /// What to do when the connection is lost (default: reconnect, see
    /// [`ReconnectPolicy`]; [`ReconnectPolicy::never`] to end with it).
    ///
    /// While the connection is being made again, operations wait (a send
    /// up to the client's timeout, then it fails with `Disconnected`;
    /// nothing is dropped silently). Once it is made, every subscription
    /// is renewed and gets one [`Event::Reconnected`](crate::Event) (what
    /// was published in between is missed, and how much cannot be known),
    /// names owned or queued for are asked for again, and a channel handle
    /// opens its channel again where its publisher is back. A request or
    /// query whose answer was due on the lost connection fails with
    /// `Disconnected`; none is sent again behind the caller's back.
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// Deadline for the handshake and for acknowledged requests.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// `publish` sends payloads larger than this many bytes as a sealed
    /// memfd (never more than the broker's inline limit, 64 KiB).
    pub fn memfd_threshold(mut self, bytes: usize) -> Self {
        self.memfd_threshold = bytes;
        self
    }

    /// Bound of each subscription's in-process queue, in messages
    /// (default [`DEFAULT_LOCAL_QUEUE`]).
    ///
    /// The in-process queues hold what this connection has read from the
    /// broker and the app has not yet taken (a subscription that is not
    /// read while others are). They are bounded per subscription in
    /// messages, bytes and fds, and across all subscriptions in bytes and
    /// fds. A message that would pass any bound is dropped as it arrives
    /// (a memfd payload's fd is closed there and then), counted, and
    /// reported to its subscription as an [`Event::Gap`] where it went
    /// missing, like a gap in the broker's queue.
    ///
    /// [`Event::Gap`]: crate::Event::Gap
    pub fn local_queue(mut self, messages: usize) -> Self {
        self.local.messages = messages.max(1);
        self
    }

    /// Bound of each subscription's in-process queue, in bytes (default
    /// [`ConnectOptions::DEFAULT_LOCAL_QUEUE_BYTES`]). A queued message
    /// counts its topic, its payload if it came inline, and 128 bytes of
    /// bookkeeping; a memfd payload counts in fds, not bytes (its pages
    /// are charged to the publisher that filled them). A message larger
    /// than the bound is always dropped, as a gap.
    pub fn local_queue_bytes(mut self, bytes: usize) -> Self {
        self.local.bytes = bytes;
        self
    }

    /// Bound of each subscription's in-process queue, in fds, that is in
    /// memfd payloads (default [`ConnectOptions::DEFAULT_LOCAL_QUEUE_FDS`]).
    /// 0 turns every memfd payload into a gap.
    pub fn local_queue_fds(mut self, fds: usize) -> Self {
        self.local.fds = fds;
        self
    }

    /// Bound of all this connection's in-process queues together, in bytes
    /// as [`ConnectOptions::local_queue_bytes`] counts them (default
    /// [`ConnectOptions::DEFAULT_LOCAL_TOTAL_BYTES`]).
    pub fn local_total_bytes(mut self, bytes: usize) -> Self {
        self.local.total_bytes = bytes;
        self
    }

    /// Bound of all this connection's in-process queues together, in fds
    /// (default [`ConnectOptions::DEFAULT_LOCAL_TOTAL_FDS`]).
    pub fn local_total_fds(mut self, fds: usize) -> Self {
        self.local.total_fds = fds;
        self
    }

    /// Whether to ask the broker for the shared-memory transport (default
    /// on): frames then travel in a pair of shared-memory rings instead of
    /// a system call each (see [`Client::transport`]). A broker that
    /// declines leaves the connection on its socket alone. The environment
    /// variable `SHMBUS_TRANSPORT=socket` turns it off whatever this says
    /// (`shm`, or unset, leaves it to this).
    pub fn shared_memory(mut self, on: bool) -> Self {
        self.shared_memory = on;
        self
    }

    /// `Ok`: ask for the link; `Err`: why not.
    fn link_wanted(&self) -> Result<(), String> {
        if !self.shared_memory {
            return Err("shared memory turned off by ConnectOptions::shared_memory(false)".into());
        }
        if !transport_env_allows_link(std::env::var_os(TRANSPORT_ENV).as_deref()) {
            return Err(format!("shared memory turned off by {TRANSPORT_ENV}=socket"));
        }
        Ok(())
    }

    fn resolve(&self) -> Result<Address, ConnectError> {
        if let Some(a) = &self.address {
            return Ok(a.clone());
        }
        if self.system {
            return Ok(Address::system());
        }
        Ok(Address::default_user()?)
    }

    /// Connects with these options: checks the broker's credentials,
    /// says hello, and sets up the shared-memory link if wanted. A broker
    /// that is shutting down is tried again until the timeout, when
    /// reconnection is on.
    pub fn connect(self) -> Result<Client, ConnectError> {
        // A broker that is shutting down (being restarted behind its
        // socket) is not a refusal to give up on, when reconnecting is on.
        let deadline = Instant::now() + self.timeout;
        let d = loop {
            match self.dial() {
                Err(ConnectError::Refused(d))
                    if d.code == Some(GoodbyeCode::Shutdown)
                        && self.reconnect.max_attempts != Some(0)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(self.reconnect.initial_delay);
                }
                r => break r?,
            }
        };
        let shown = self.resolve()?.to_string();
        let redial = (self.reconnect.max_attempts != Some(0)).then(|| {
            let opts = self.clone();
            Redial { dial: Box::new(move |deadline| opts.dial_until(deadline)), policy: self.reconnect }
        });
        let limits = d.limits;
        let inner =
            Inner::with_bounds(d.fd, d.client_id, limits, d.broker, shown, self.local, redial, self.timeout);
        inner.attach(d.link);
        let memfd_threshold = self.memfd_threshold.min(limits.max_inline_payload as usize);
        Ok(Client { inner: Arc::new(inner), timeout: self.timeout, memfd_threshold })
    }

    /// Connects, checks the broker's credentials and says hello: a
    /// connection, or why not.
    pub(crate) fn dial(&self) -> Result<Dialed, ConnectError> {
        self.dial_until(None)
    }

    /// [`ConnectOptions::dial`], its handshake waiting no later than
    /// `deadline` (nor longer than the client's timeout).
    pub(crate) fn dial_until(&self, deadline: Option<Instant>) -> Result<Dialed, ConnectError> {
        let wait = match deadline {
            None => self.timeout,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now()).min(self.timeout);
                if left.is_zero() {
                    return Err(ConnectError::Timeout(Duration::ZERO));
                }
                left
            }
        };
        let address = self.resolve()?;
        let shown = address.to_string();
        let fd = socket::connect(&address)
            .map_err(|source| ConnectError::Unreachable { address: shown.clone(), source })?;
        let broker = socket::peer_cred(fd.as_fd())?;
        let me = rustix::process::getuid().as_raw();
        let trusted = match &self.trust {
            Trust::Anyone => true,
            Trust::RootOrSelf => broker.uid == 0 || broker.uid == me,
            Trust::Also(set) => broker.uid == 0 || broker.uid == me || set.contains(&broker.uid),
        };
        if !trusted {
            return Err(ConnectError::UntrustedBroker { address: shown, uid: broker.uid, pid: broker.pid });
        }
        let name = self.name.clone().unwrap_or_else(program_name);
        let hello = Hello { version: u16::from(PROTOCOL_VERSION), name: &name };
        let head = encode_head(&hello).map_err(|e| ConnectError::Protocol(e.to_string()))?;
        // The broker may refuse before reading our hello and close; its
        // goodbye is still waiting for us, so a failed send is not the end.
        let _ = socket::send_packet(fd.as_fd(), OutPacket { head: &head, payload: &[], fds: &[] }, false);
        let (client_id, limits, link) = handshake(&fd, wait, self.link_wanted())?;
        Ok(Dialed { fd, broker, client_id, limits, link })
    }
}

/// The environment variable that may turn the shared-memory transport off
/// for every client of a process: `socket` turns it off, `shm` (or unset)
/// leaves it to [`ConnectOptions::shared_memory`].
pub const TRANSPORT_ENV: &str = "SHMBUS_TRANSPORT";

/// Whether `$SHMBUS_TRANSPORT` (its value, if set) lets a client ask for
/// the link: anything but `socket` does (an unknown value is no reason to
/// lose the faster transport).
fn transport_env_allows_link(value: Option<&std::ffi::OsStr>) -> bool {
    !matches!(value, Some(v) if v == "socket")
}

/// Encodes the next batch of `publish_many` (blocking or async): up to
/// `MAX_BATCH` inline publishes from `iter`, each head in `heads` and its
/// payload in `payloads` (cleared first). On a bad message, the batch holds
/// those before it and the error says why; nothing is sent here.
pub(crate) fn fill_publish_batch<'t, 'a>(
    iter: &mut impl Iterator<Item = (&'t str, &'a [u8])>,
    max: usize,
    heads: &mut Vec<Vec<u8>>,
    payloads: &mut Vec<&'a [u8]>,
) -> Result<(), PublishError> {
    payloads.clear();
    for (topic, payload) in iter {
        check_subject(topic)?;
        if payload.len() > max {
            return Err(PublishError::PayloadTooLarge { len: payload.len(), max });
        }
        if heads.len() <= payloads.len() {
            heads.push(Vec::with_capacity(64));
        }
        let body = Publish { topic, origin: None, payload: PayloadRef::Inline };
        encode_head_into(&mut heads[payloads.len()], &body)
            .map_err(|e| PublishError::Encode(e.to_string()))?;
        payloads.push(payload);
        if payloads.len() == MAX_BATCH {
            break;
        }
    }
    Ok(())
}

/// The broker's side of the handshake: its `Welcome` (or refusal) to our
/// `Hello`, then, if `link` is `Ok`, our `Attach` and its answer: the link
/// set up, or declined (the connection then goes on over the socket).
fn handshake(
    fd: &std::os::fd::OwnedFd,
    timeout: Duration,
    link: Result<(), String>,
) -> Result<(u64, Limits, Attachment), ConnectError> {
    let deadline = Instant::now() + timeout;
    let mut batch = RecvBatch::new(1);
    next_packet(fd, &mut batch, deadline, timeout)?;
    let (data, _, fds) = batch.packet(0);
    if !fds.is_empty() {
        return Err(ConnectError::Protocol("the broker sent an fd in its handshake".into()));
    }
    if data.is_empty() {
        return Err(ConnectError::Protocol("the broker closed the connection without a word".into()));
    }
    let (client_id, limits) = match decode_broker(data) {
        Ok(BrokerFrame::Welcome(w)) => (w.client_id, w.limits),
        Ok(BrokerFrame::Goodbye(g)) => {
            return Err(ConnectError::Refused(Disconnect { code: Some(g.code), reason: g.reason.to_owned() }))
        }
        Ok(other) => return Err(ConnectError::Protocol(format!("unexpected first frame {other:?}"))),
        Err(e) => return Err(ConnectError::Protocol(e.to_string())),
    };
    let link = match link {
        Ok(()) => attach(fd, &mut batch, deadline, timeout)?,
        Err(why) => Attachment::SocketOnly(why),
    };
    Ok((client_id, limits, link))
}

/// Asks for the shared-memory link (`Attach`, our very next frame after
/// `Hello`) and maps what `Attached` carries. The broker's `OpError` for
/// it is a decline, not a failure; anything else fails the handshake (the
/// broker may already have switched to the link, so there is no going on
/// over the socket then).
fn attach(
    fd: &std::os::fd::OwnedFd,
    batch: &mut RecvBatch,
    deadline: Instant,
    timeout: Duration,
) -> Result<Attachment, ConnectError> {
    let head = encode_head(&Attach { capacity: 0 }).map_err(|e| ConnectError::Protocol(e.to_string()))?;
    // A failed send is not the end: the broker's goodbye may be waiting.
    let _ = socket::send_packet(fd.as_fd(), OutPacket { head: &head, payload: &[], fds: &[] }, false);
    next_packet(fd, batch, deadline, timeout)?;
    let (data, status, fds) = batch.packet(0);
    if data.is_empty() {
        return Err(ConnectError::Protocol("the broker closed the connection during the handshake".into()));
    }
    if status.truncated || status.fds_truncated {
        return Err(ConnectError::Protocol(
            "the broker's answer to Attach came truncated (is this process out of fds?)".into(),
        ));
    }
    match decode_broker(data) {
        Ok(BrokerFrame::Attached(a)) => {
            let [mine, theirs] = &fds[..] else {
                return Err(ConnectError::Protocol(format!("Attached came with {} fds, not 2", fds.len())));
            };
            // The fds close here; the mappings keep the memory.
            match shmbus_proto::link::shm::attach(a.capacity, mine.as_fd(), theirs.as_fd()) {
                Ok(map) => Ok(Attachment::Linked(map)),
                Err(e) => Err(ConnectError::Protocol(format!(
                    "the broker's shared-memory link cannot be used: {e}"
                ))),
            }
        }
        Ok(BrokerFrame::OpError(e)) if e.op == Op::Attach && fds.is_empty() => Ok(Attachment::SocketOnly(
            format!("the broker declined the shared-memory link ({:?}): {}", e.code, e.message),
        )),
        Ok(BrokerFrame::Goodbye(g)) => {
            Err(ConnectError::Refused(Disconnect { code: Some(g.code), reason: g.reason.to_owned() }))
        }
        Ok(other) => Err(ConnectError::Protocol(format!("unexpected answer to Attach: {other:?}"))),
        Err(e) => Err(ConnectError::Protocol(e.to_string())),
    }
}

/// Waits (until `deadline`) for the broker's next handshake packet, into
/// `batch`'s one slot.
fn next_packet(
    fd: &std::os::fd::OwnedFd,
    batch: &mut RecvBatch,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), ConnectError> {
    let mut resets = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !socket::wait_readable(fd.as_fd(), Some(left))? {
            return Err(ConnectError::Timeout(timeout));
        }
        match batch.recv(fd.as_fd(), true) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && resets < 2 => resets += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

fn program_name() -> String {
    std::env::args()
        .next()
        .and_then(|a| std::path::Path::new(&a).file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "shmbus-client".to_owned())
}

/// A connection to a shmbus broker. Cheap to clone; clones share the
/// connection. Every method may be called from any thread.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
    timeout: Duration,
    memfd_threshold: usize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("Client");
        d.field("address", &self.inner.address).field("client_id", &self.id());
        d.field("transport", &self.transport());
        if let Some(why) = self.inner.transport_note() {
            d.field("socket_only_because", &why);
        }
        d.finish()
    }
}

impl Client {
    /// Connects to `$SHMBUS_ADDRESS`, else to the user bus `@shmbus.<uid>`.
    pub fn connect() -> Result<Client, ConnectError> {
        ConnectOptions::new().connect()
    }

    /// Connects to `address` (`@name` or a path).
    pub fn connect_to(address: &str) -> Result<Client, ConnectError> {
        ConnectOptions::new().address(Address::parse(address)?).connect()
    }

    /// Connects to the system bus, `@shmbus`.
    pub fn system() -> Result<Client, ConnectError> {
        ConnectOptions::new().system().connect()
    }

    /// Options for anything else.
    pub fn options() -> ConnectOptions {
        ConnectOptions::new()
    }

    /// Which transport the connection uses now: the shared-memory link,
    /// or the socket alone (turned off, or declined by the broker; see
    /// [`ConnectOptions::shared_memory`]). May change when the client
    /// reconnects (to a broker that decides otherwise).
    pub fn transport(&self) -> Transport {
        self.inner.transport()
    }

    /// The deadline for acknowledged requests.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A client on a connection made by a test (timeout 5 s, memfd
    /// threshold 1 KiB).
    #[cfg(test)]
    pub(crate) fn for_tests(inner: Arc<Inner>) -> Client {
        Client { inner, timeout: Duration::from_secs(5), memfd_threshold: 1024 }
    }

    /// Payloads larger than this go by memfd.
    pub(crate) fn memfd_threshold(&self) -> usize {
        self.memfd_threshold
    }

    /// Opens a ring channel on `topic` as its (only) publisher.
    pub fn channel_publisher(
        &self,
        topic: &str,
        config: ChannelConfig,
    ) -> Result<ChannelPublisher, ChannelError> {
        ChannelPublisher::open(self, topic, config)
    }

    /// Joins the ring channel on `topic` as a reader, starting at its
    /// current head.
    pub fn channel_subscriber(&self, topic: &str) -> Result<ChannelSubscriber, ChannelError> {
        ChannelSubscriber::open(self, topic)
    }

    /// Every ring channel on the broker (every page; see
    /// [`Client::channels_page`]).
    pub fn channels(&self) -> Result<Vec<ChannelInfo>, RequestError> {
        self.query_items(QueryKind::Channels, pick_channel)
    }

    /// Our id on the bus, as stamped on what we send.
    pub fn id(&self) -> u64 {
        // Relaxed: a plain value, changed only by a reconnection.
        self.inner.client_id.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The limits the broker announced.
    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// The broker's credentials, as the kernel reports them.
    pub fn broker_cred(&self) -> PeerCred {
        *self.inner.broker.lock()
    }

    /// Publishes `payload` to `topic`. Up to the memfd threshold it goes
    /// inline; above, it is copied once into a sealed memfd that every
    /// subscriber then maps (any size). Returns once the frame is handed to
    /// the kernel; a refusal by the broker comes back from [`Client::flush`].
    pub fn publish(&self, topic: &str, payload: impl AsRef<[u8]>) -> Result<(), PublishError> {
        self.publish_from(topic, payload.as_ref(), None)
    }

    /// Publishes as [`Client::publish`] does, with an origin: a short text
    /// (1 to 256 bytes, no control characters) saying where the message
    /// comes from, which subscribers read with [`crate::Message::origin`].
    /// The broker still stamps [`crate::Message::sender`] with this
    /// client's credentials; the origin is this client's claim beside it
    /// (`shmbus-bridge` names the remote host and sender there).
    pub fn publish_with_origin(
        &self,
        topic: &str,
        payload: impl AsRef<[u8]>,
        origin: &str,
    ) -> Result<(), PublishError> {
        validate_origin(origin)?;
        self.publish_from(topic, payload.as_ref(), Some(origin))
    }

    fn publish_from(&self, topic: &str, payload: &[u8], origin: Option<&str>) -> Result<(), PublishError> {
        if payload.len() > self.memfd_threshold {
            check_subject(topic)?;
            let fd = memfd::from_bytes("shmbus-payload", payload).map_err(PublishError::Memfd)?;
            return self.send_memfd(topic, fd.as_fd(), payload.len() as u64, origin);
        }
        let mut s = self.inner.lock_send_for(topic)?;
        let max = self.inner.limits.max_inline_payload as usize;
        if payload.len() > max {
            return Err(PublishError::PayloadTooLarge { len: payload.len(), max });
        }
        let body = Publish { topic, origin, payload: PayloadRef::Inline };
        self.inner.send_locked(&mut s, &body, payload)?;
        s.published += 1;
        Ok(())
    }

    /// A writable shared-memory buffer of `len` bytes to fill in place and
    /// send with [`Client::publish_loan`], without a copy.
    pub fn loan(&self, len: usize) -> Result<Loan, LoanError> {
        Loan::new(len)
    }

    /// Seals the loan and publishes it: subscribers map these very pages.
    pub fn publish_loan(&self, topic: &str, loan: Loan) -> Result<(), PublishError> {
        check_subject(topic)?;
        let (fd, len) = loan.seal().map_err(PublishError::Memfd)?;
        self.send_memfd(topic, fd.as_fd(), len, None)
    }

    /// Publishes a memfd the caller already holds, which must carry the
    /// shrink, grow, write and seal seals (e.g. from [`Message::into_fd`]).
    /// The caller keeps its fd.
    ///
    /// [`Message::into_fd`]: crate::Message::into_fd
    pub fn publish_fd(&self, topic: &str, fd: impl AsFd) -> Result<(), PublishError> {
        check_subject(topic)?;
        let len = memfd::sealed_len(fd.as_fd())?;
        self.send_memfd(topic, fd.as_fd(), len, None)
    }

    fn send_memfd(
        &self,
        topic: &str,
        fd: BorrowedFd<'_>,
        len: u64,
        origin: Option<&str>,
    ) -> Result<(), PublishError> {
        let mut s = self.inner.lock_send();
        let body = Publish { topic, origin, payload: PayloadRef::Memfd { len } };
        self.inner.send_locked_with_fds(&mut s, &body, &[], &[fd])?;
        s.published += 1;
        Ok(())
    }

    /// Publishes several messages with as few system calls as possible
    /// (`sendmmsg`, up to 64 frames per call; on the shared-memory link,
    /// up to 64 records and at most one doorbell). Same semantics as calling
    /// [`Client::publish`] for each, in order; on an error, the messages
    /// before the failing one have been sent.
    pub fn publish_many<'a, P: AsRef<[u8]> + ?Sized + 'a>(
        &self,
        messages: impl IntoIterator<Item = (&'a str, &'a P)>,
    ) -> Result<(), PublishError> {
        let max = self.inner.limits.max_inline_payload as usize;
        let mut s = self.inner.lock_send();
        let mut heads = std::mem::take(&mut s.heads);
        let mut payloads: Vec<&[u8]> = Vec::with_capacity(MAX_BATCH);
        let mut result = Ok(());
        let mut iter = messages.into_iter().map(|(topic, payload)| (topic, payload.as_ref())).peekable();
        while iter.peek().is_some() && result.is_ok() {
            result = fill_publish_batch(&mut iter, max, &mut heads, &mut payloads);
            let packets: Vec<OutPacket<'_>> = heads
                .iter()
                .zip(&payloads)
                .map(|(h, p)| OutPacket { head: h, payload: p, fds: &[] })
                .collect();
            let mut sent = 0;
            while sent < packets.len() {
                match self.inner.on_port(None, |port| port.send(&packets[sent..], true)) {
                    Ok((n, _)) => {
                        // Waiting, at least one went.
                        let n = n.unwrap_or(0);
                        sent += n;
                        s.published += n as u64;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    // Lost: the rest goes on the next connection, once made.
                    Err(e) if self.inner.recover(&e) => {}
                    Err(e) => {
                        result = Err(self.inner.send_error(e).into());
                        break;
                    }
                }
            }
        }
        s.heads = heads;
        result
    }

    /// Publishes `value` encoded with postcard; read it back with
    /// [`crate::Message::decode`].
    pub fn publish_value<T: Serialize + ?Sized>(&self, topic: &str, value: &T) -> Result<(), PublishError> {
        let bytes = postcard::to_allocvec(value).map_err(|e| PublishError::Encode(e.to_string()))?;
        self.publish(topic, &bytes)
    }

    /// Subscribes to `pattern` (`*` one token, `>` the rest), with gap
    /// notices when the subscriber falls behind. Returns once the broker
    /// has the subscription: every later publish that matches reaches it.
    pub fn subscribe(&self, pattern: &str) -> Result<Subscription, SubscribeError> {
        self.subscribe_with(pattern, Overflow::Gap)
    }

    /// Subscribes with an explicit overflow policy.
    pub fn subscribe_with(&self, pattern: &str, overflow: Overflow) -> Result<Subscription, SubscribeError> {
        check_pattern(pattern)?;
        self.open_subscription(pattern.to_owned(), |sub_id| {
            encode_head(&Subscribe { sub_id, pattern, overflow })
        })
    }

    /// Watches what passes through the broker: every publish, request,
    /// answer, refusal, connect and disconnect, subscription and name
    /// change whose subject matches one of `patterns` (all of them when
    /// `patterns` is empty; events without a subject, such as connects,
    /// only then). Needs the broker's `monitor` right (a refusal is
    /// [`SubscribeError::Refused`] with [`ErrorCode::Denied`], of kind
    /// [`crate::ErrorKind::Denied`]). Payloads come cut to their first 256
    /// bytes unless `full`; memfd payloads only as their length.
    ///
    /// Returns once the broker has the monitor: every later event reaches
    /// it. A monitor that falls behind loses events, reported as
    /// [`MonitorItem::Gap`](crate::MonitorItem::Gap); the bus never waits
    /// for it. Dropping it stops it.
    pub fn monitor(&self, patterns: &[&str], full: bool) -> Result<Monitor, SubscribeError> {
        for p in patterns {
            check_pattern(p)?;
        }
        let sub = self.open_subscription(patterns.join(" "), |sub_id| {
            encode_head(&MonitorFrame { sub_id, patterns: patterns.to_vec(), full })
        })?;
        Ok(Monitor::new(sub, patterns.iter().map(|&p| p.to_owned()).collect(), full))
    }

    /// Makes a subscription (or a monitor, which the broker answers the
    /// same way): a fresh id, its queue, the frame `frame` encodes for that
    /// id (kept, to renew the subscription after a reconnection), and the
    /// broker's answer. `label` is what [`Subscription::pattern`] says.
    fn open_subscription(
        &self,
        label: String,
        frame: impl FnOnce(u32) -> Result<Vec<u8>, shmbus_proto::frame::EncodeError>,
    ) -> Result<Subscription, SubscribeError> {
        let (sub_id, head) = {
            let mut st = self.inner.state.lock();
            if let Some(d) = &st.closed {
                return Err(SubscribeError::Disconnected(d.clone()));
            }
            let Some(id) = st.new_sub_id() else {
                return Err(SubscribeError::Refused {
                    code: ErrorCode::LimitExceeded,
                    message: "every subscription id is in use".into(),
                });
            };
            let head = match frame(id) {
                Ok(h) => h,
                Err(e) => {
                    st.sub_ids.answered(id);
                    return Err(SubscribeError::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        e.to_string(),
                    )));
                }
            };
            st.add_sub(id, head.clone());
            st.awaiting_ack.insert(id);
            (id, head)
        };
        let cleanup = |st: &mut State| {
            st.remove_sub(sub_id);
            st.awaiting_ack.remove(&sub_id);
            st.acks.remove(&sub_id);
        };
        let sent_on = match self.inner.send_frame(&head) {
            Ok(g) => g,
            Err(e) => {
                let mut st = self.inner.state.lock();
                cleanup(&mut st);
                // Nothing was sent (a packet goes whole or not at all).
                st.sub_ids.answered(sub_id);
                return Err(e.into());
            }
        };
        let deadline = Instant::now() + self.timeout;
        match self.inner.wait_answer(Some(deadline), sent_on, |st| st.acks.remove(&sub_id)) {
            Ok(Some(Ok(()))) => Ok(Subscription::new(self.inner.clone(), sub_id, label)),
            Ok(Some(Err((code, message)))) => {
                cleanup(&mut self.inner.state.lock());
                Err(SubscribeError::Refused { code, message })
            }
            Ok(None) => {
                {
                    // The broker may still make the subscription: take it
                    // back, and keep its id until the broker has answered
                    // both (in one go, so the id is never free between).
                    let mut st = self.inner.state.lock();
                    cleanup(&mut st);
                    st.sub_ids.owe(sub_id);
                }
                if self.inner.send(&Unsubscribe { sub_id }, &[]).is_err() {
                    self.inner.state.lock().sub_ids.answered(sub_id);
                }
                Err(SubscribeError::Timeout(self.timeout))
            }
            Err(e) => {
                cleanup(&mut self.inner.state.lock());
                Err(e.into())
            }
        }
    }

    /// Round trip to the broker; returns how long it took.
    pub fn ping(&self) -> Result<Duration, RequestError> {
        let token = self.inner.state.lock().new_ping();
        let start = Instant::now();
        let result = (|| {
            let sent_on = self.inner.send(&Ping { token }, &[])?;
            let deadline = start + self.timeout;
            let came = |st: &mut State| {
                if st.pings.get(&token) == Some(&true) {
                    st.pings.remove(&token);
                    Some(())
                } else {
                    None
                }
            };
            match self.inner.wait_answer(Some(deadline), sent_on, came)? {
                Some(()) => Ok(start.elapsed()),
                None => Err(RequestError::Timeout(self.timeout)),
            }
        })();
        self.inner.state.lock().pings.remove(&token);
        result
    }

    /// Waits until the broker has handled everything sent so far, and
    /// returns the publishes it refused since the last flush, if any; else
    /// the fire-and-forget sends ([`Client::send`]) it refused, if any
    /// (those of publishes and sends both refused are reported by the next
    /// flush).
    pub fn flush(&self) -> Result<(), FlushError> {
        self.ping()?;
        let mut st = self.inner.state.lock();
        let refused = std::mem::take(&mut st.refused_publishes);
        if !refused.is_empty() {
            let more = std::mem::take(&mut st.refused_publishes_more);
            return Err(FlushError::Refused(Refusals { kept: refused, more }));
        }
        let sends = std::mem::take(&mut st.refused_sends);
        if !sends.is_empty() {
            let more = std::mem::take(&mut st.refused_sends_more);
            return Err(FlushError::SendsRefused(Refusals { kept: sends, more }));
        }
        Ok(())
    }

    /// One page of the answer to `what`, resuming after `after` (`None`
    /// for the first page). Returns the page's items and the `after` of
    /// the next page, if there is one.
    fn query_page(
        &self,
        what: QueryKind,
        after: Option<&str>,
    ) -> Result<(Vec<QueryItemBody>, Option<String>), RequestError> {
        self.query_with(|req_id| self.inner.send(&Query { req_id, what, after }, &[]))
    }

    /// Sends the frame `send` builds under a new query id, and collects
    /// the answer the broker gives it as one page of a `Query`'s: its
    /// items, and the `after` of the next page.
    fn query_with(
        &self,
        send: impl FnOnce(u32) -> Result<u64, RecvError>,
    ) -> Result<(Vec<QueryItemBody>, Option<String>), RequestError> {
        let req_id = self.inner.state.lock().new_query().ok_or_else(|| RequestError::Refused {
            code: ErrorCode::LimitExceeded,
            message: "every request id is in use".into(),
        })?;
        let result = (|| {
            let sent_on = match send(req_id) {
                Ok(g) => g,
                Err(e) => {
                    // Nothing was sent: no answer will come.
                    self.inner.state.lock().query_ids.answered(req_id);
                    return Err(e.into());
                }
            };
            let deadline = Instant::now() + self.timeout;
            let done = self.inner.wait_answer(Some(deadline), sent_on, |st| {
                if st.queries.get(&req_id).is_some_and(|q| q.done) {
                    st.queries.remove(&req_id)
                } else {
                    None
                }
            })?;
            match done {
                None => Err(RequestError::Timeout(self.timeout)),
                Some(QuerySlot { error: Some((code, message)), .. }) => {
                    Err(RequestError::Refused { code, message })
                }
                Some(slot) => Ok((slot.items, slot.next)),
            }
        })();
        self.inner.state.lock().queries.remove(&req_id);
        result
    }

    /// The items of one kind in one page of the answer to `what`.
    pub(crate) fn query_items_page<T>(
        &self,
        what: QueryKind,
        after: Option<&str>,
        pick: impl FnMut(QueryItemBody) -> Option<T>,
    ) -> Result<(Vec<T>, Option<String>), RequestError> {
        let (items, next) = self.query_page(what, after)?;
        Ok((items.into_iter().filter_map(pick).collect(), next))
    }

    /// The items of one kind in the whole answer to `what`, every page.
    pub(crate) fn query_items<T>(
        &self,
        what: QueryKind,
        mut pick: impl FnMut(QueryItemBody) -> Option<T>,
    ) -> Result<Vec<T>, RequestError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (items, next) = self.query_items_page(what, after.as_deref(), &mut pick)?;
            all.extend(items);
            match next {
                None => return Ok(all),
                // A broker that names the page it just gave would have us
                // ask for it forever.
                Some(next) if after.as_deref() == Some(next.as_str()) => {
                    return Err(RequestError::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "the broker answered the same introspection page twice",
                    )))
                }
                Some(next) => after = Some(next),
            }
        }
    }

    /// Every client connected to the broker (every page; see
    /// [`Client::clients_page`] to take them a page at a time).
    pub fn clients(&self) -> Result<Vec<ClientInfo>, RequestError> {
        self.query_items(QueryKind::Clients, pick_client)
    }

    /// One page of the connected clients, after the client `after` (the
    /// `next` of the previous page; `None` for the first). Returns the
    /// page and the `after` of the next page, `None` at the end. Each page
    /// is one bounded answer from the broker: walking a big bus this way
    /// never holds more than a page.
    ///
    /// ```no_run
    /// # let client = shmbus::Client::connect()?;
    /// let mut after = None;
    /// loop {
    ///     let (page, next) = client.clients_page(after.as_deref())?;
    ///     for c in page {
    ///         println!("{} {}", c.id, c.name);
    ///     }
    ///     match next {
    ///         Some(n) => after = Some(n),
    ///         None => break,
    ///     }
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn clients_page(
        &self,
        after: Option<&str>,
    ) -> Result<(Vec<ClientInfo>, Option<String>), RequestError> {
        self.query_items_page(QueryKind::Clients, after, pick_client)
    }

    /// Every subscribed pattern, with its subscriber count (every page;
    /// see [`Client::topics_page`]).
    pub fn topics(&self) -> Result<Vec<TopicInfo>, RequestError> {
        self.query_items(QueryKind::Topics, pick_topic)
    }

    /// One page of the subscribed patterns: as [`Client::clients_page`].
    pub fn topics_page(&self, after: Option<&str>) -> Result<(Vec<TopicInfo>, Option<String>), RequestError> {
        self.query_items_page(QueryKind::Topics, after, pick_topic)
    }

    /// One page of the ring channels: as [`Client::clients_page`].
    pub fn channels_page(
        &self,
        after: Option<&str>,
    ) -> Result<(Vec<ChannelInfo>, Option<String>), RequestError> {
        self.query_items_page(QueryKind::Channels, after, pick_channel)
    }

    /// The broker's counters.
    pub fn stats(&self) -> Result<Stats, RequestError> {
        self.query_items(QueryKind::Stats, |i| match i {
            QueryItemBody::Stats(s) => Some(s),
            _ => None,
        })?
        .into_iter()
        .next()
        .ok_or_else(|| RequestError::Refused {
            code: shmbus_proto::frame::ErrorCode::Unsupported,
            message: "the broker answered without stats".into(),
        })
    }
}

impl Client {
    /// What the broker's policy decides for a peer of `uid` and groups
    /// `gids` (the primary gid first; empty: the gid numbered like the
    /// uid) doing `action` on `subject`, and why. `action` is one of the
    /// policy file's words: `connect`, `publish`, `subscribe`, `own`,
    /// `call`, `channel-publish`, `channel-read`, `monitor`, `introspect`;
    /// `subject` is a subject or pattern for those that take one, else
    /// empty. Without a policy file the broker allows everything it
    /// admits, and says so.
    ///
    /// Needs the broker's `introspect` right: else [`RequestError::Refused`]
    /// with [`ErrorCode::Denied`]. An unknown action is refused with
    /// [`ErrorCode::Unsupported`], a bad subject with
    /// [`ErrorCode::InvalidSubject`].
    pub fn policy_check(
        &self,
        uid: u32,
        gids: &[u32],
        action: &str,
        subject: &str,
    ) -> Result<PolicyVerdict, RequestError> {
        let (items, _) = self.query_with(|req_id| {
            let check = PolicyCheck { req_id, uid, gids: gids.to_vec(), action, subject };
            self.inner.send(&check, &[])
        })?;
        items
            .into_iter()
            .find_map(|i| match i {
                QueryItemBody::Verdict(v) => Some(v),
                _ => None,
            })
            .ok_or_else(|| RequestError::Refused {
                code: ErrorCode::Unsupported,
                message: "the broker answered the policy check without a verdict".into(),
            })
    }
}

fn pick_client(i: QueryItemBody) -> Option<ClientInfo> {
    match i {
        QueryItemBody::Client(x) => Some(x),
        _ => None,
    }
}

fn pick_topic(i: QueryItemBody) -> Option<TopicInfo> {
    match i {
        QueryItemBody::Topic(x) => Some(x),
        _ => None,
    }
}

fn pick_channel(i: QueryItemBody) -> Option<ChannelInfo> {
    match i {
        QueryItemBody::Channel(x) => Some(x),
        _ => None,
    }
}

impl AsFd for Client {
    /// The connection's socket: readable when frames are waiting. Poll it
    /// in your own loop, then drain subscriptions with `try_recv`. (On the
    /// shared-memory transport frames wait in memory, not in the socket;
    /// a `try_recv` that finds nothing tells the broker so, and the broker
    /// then makes the socket readable when the next frame comes.)
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }
}

impl AsRawFd for Client {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shmbus_proto::frame::{decode_client, ClientFrame, QueryEnd, QueryItem};
    use std::os::fd::OwnedFd;

    /// A broker that answers topic queries from `topics`, `page` at a
    /// time (keyed by pattern), until the client hangs up. With `stuck`,
    /// it names the first page as the next one, forever.
    fn fake_broker(
        fd: OwnedFd,
        topics: Vec<&'static str>,
        page: usize,
        stuck: bool,
    ) -> std::thread::JoinHandle<usize> {
        std::thread::spawn(move || {
            let mut batch = RecvBatch::new(4);
            let mut queries = 0;
            loop {
                let n = batch.recv(fd.as_fd(), false).unwrap();
                for i in 0..n {
                    let (data, _, _) = batch.packet(i);
                    if data.is_empty() {
                        return queries;
                    }
                    let ClientFrame::Query(q) = decode_client(data).unwrap() else { continue };
                    queries += 1;
                    let start = q.after.map_or(0, |a| topics.iter().position(|t| *t == a).unwrap() + 1);
                    let end = (start + page).min(topics.len());
                    let send = |head: Vec<u8>| {
                        socket::send_packet(
                            fd.as_fd(),
                            OutPacket { head: &head, payload: &[], fds: &[] },
                            false,
                        )
                        .unwrap()
                    };
                    for t in &topics[start..end] {
                        let item =
                            QueryItemBody::Topic(TopicInfo { pattern: (*t).to_owned(), subscribers: 1 });
                        send(encode_head(&QueryItem { req_id: q.req_id, item }).unwrap());
                    }
                    let next = match (stuck, end < topics.len()) {
                        (true, _) => Some(topics[page - 1].to_owned()),
                        (false, true) => Some(topics[end - 1].to_owned()),
                        (false, false) => None,
                    };
                    send(encode_head(&QueryEnd { req_id: q.req_id, next }).unwrap());
                }
            }
        })
    }

    fn client_on(fd: OwnedFd) -> Client {
        let limits = Limits {
            max_packet: 65536,
            max_inline_payload: 65536,
            queue_bytes: 1 << 20,
            queue_frames: 1024,
            max_subscriptions: 100,
            fd_window: 64,
            max_depth: 32,
        };
        let inner = Inner::new(fd, 1, limits, PeerCred { pid: 1, uid: 0, gid: 0 }, "test".into(), 16);
        Client { inner: Arc::new(inner), timeout: Duration::from_secs(5), memfd_threshold: 1024 }
    }

    const TOPICS: [&str; 5] = ["a", "b.c", "d.>", "e.*", "f"];

    #[test]
    fn whole_answers_gather_every_page() {
        let (ours, theirs) = socket::pair().unwrap();
        let broker = fake_broker(theirs, TOPICS.to_vec(), 2, false);
        let client = client_on(ours);
        let all: Vec<String> = client.topics().unwrap().into_iter().map(|t| t.pattern).collect();
        assert_eq!(all, TOPICS);
        drop(client);
        assert_eq!(broker.join().unwrap(), 3, "pages of 2, 2 and 1");
    }

    #[test]
    fn pages_come_one_at_a_time() {
        let (ours, theirs) = socket::pair().unwrap();
        let broker = fake_broker(theirs, TOPICS.to_vec(), 3, false);
        let client = client_on(ours);
        let (first, next) = client.topics_page(None).unwrap();
        assert_eq!(first.iter().map(|t| t.pattern.as_str()).collect::<Vec<_>>(), ["a", "b.c", "d.>"]);
        assert_eq!(next.as_deref(), Some("d.>"));
        let (second, next) = client.topics_page(next.as_deref()).unwrap();
        assert_eq!(second.iter().map(|t| t.pattern.as_str()).collect::<Vec<_>>(), ["e.*", "f"]);
        assert_eq!(next, None);
        drop(client);
        assert_eq!(broker.join().unwrap(), 2);
    }

    #[test]
    fn a_broker_that_repeats_a_page_is_an_error_not_a_loop() {
        let (ours, theirs) = socket::pair().unwrap();
        let broker = fake_broker(theirs, TOPICS.to_vec(), 2, true);
        let client = client_on(ours);
        let err = client.topics().unwrap_err();
        assert!(matches!(&err, RequestError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData), "{err}");
        drop(client);
        assert_eq!(broker.join().unwrap(), 2);
    }

    /// A broker that keeps subscriptions as the real one does (a live id
    /// subscribed again is refused as a duplicate), delivers one message
    /// naming its pattern to each new subscription, and answers pings.
    fn subscribing_broker(fd: OwnedFd) -> std::thread::JoinHandle<()> {
        use shmbus_proto::frame::{
            Deliver, ErrorCode, Op, OpError, Pong, Sender, Subscribed, Unsubscribe as Unsub,
        };
        std::thread::spawn(move || {
            let mut batch = RecvBatch::new(4);
            let mut live = std::collections::HashSet::new();
            let send = |head: Vec<u8>, payload: &[u8]| {
                let _ = socket::send_packet(fd.as_fd(), OutPacket { head: &head, payload, fds: &[] }, false);
            };
            loop {
                let Ok(n) = batch.recv(fd.as_fd(), false) else { return };
                for i in 0..n {
                    let (data, _, _) = batch.packet(i);
                    if data.is_empty() {
                        return;
                    }
                    match decode_client(data).unwrap() {
                        ClientFrame::Subscribe(s) if !live.insert(s.sub_id) => {
                            let op = Op::Subscribe { sub_id: s.sub_id };
                            let code = ErrorCode::DuplicateSubscription;
                            send(encode_head(&OpError { op, code, message: "in use" }).unwrap(), &[]);
                        }
                        ClientFrame::Subscribe(s) => {
                            send(encode_head(&Subscribed { sub_id: s.sub_id }).unwrap(), &[]);
                            let sender = Sender { client_id: 9, uid: 0, gid: 0, pid: 9 };
                            let d = Deliver {
                                sub_id: s.sub_id,
                                topic: s.pattern,
                                sender,
                                seq: 1,
                                origin: None,
                                payload: PayloadRef::Inline,
                            };
                            send(encode_head(&d).unwrap(), s.pattern.as_bytes());
                        }
                        ClientFrame::Unsubscribe(Unsub { sub_id }) => {
                            live.remove(&sub_id);
                            send(encode_head(&Subscribed { sub_id }).unwrap(), &[]);
                        }
                        ClientFrame::Ping(p) => send(encode_head(&Pong { token: p.token }).unwrap(), &[]),
                        _ => {}
                    }
                }
            }
        })
    }

    fn pattern_of(sub: &Subscription) -> String {
        match sub.recv_timeout(Duration::from_secs(5)).unwrap() {
            Some(crate::Event::Message(m)) => String::from_utf8(m.into_payload()).unwrap(),
            other => panic!("{}: {other:?}", sub.pattern()),
        }
    }

    /// Ids are u32 and wrap; a new subscription after the wrap must not
    /// take the id of a live one (whose queue it would clobber, and which
    /// the broker would refuse as a duplicate).
    #[test]
    fn ids_that_wrap_never_clobber_a_live_subscription() {
        let (ours, theirs) = socket::pair().unwrap();
        let broker = subscribing_broker(theirs);
        let client = client_on(ours);
        let a = client.subscribe("a").unwrap();
        // As if 2^32 - 2 ids had been used since.
        client.inner.state.lock().sub_ids.set_next(u32::MAX);
        let b = client.subscribe("b").unwrap();
        let c = client.subscribe("c").expect("a free id after the wrap");
        let d = client.subscribe("d").expect("another");
        client.ping().unwrap();
        let ids = [a.id(), b.id(), c.id(), d.id()];
        assert_eq!(ids.iter().collect::<std::collections::HashSet<_>>().len(), 4, "{ids:?}");
        assert!(ids.iter().all(|&id| id != 0), "{ids:?}");
        for s in [&a, &b, &c, &d] {
            assert_eq!(pattern_of(s), s.pattern(), "each queue holds its own message");
        }
        // A dropped subscription's id comes back once the broker answered.
        let freed = b.id();
        drop(b);
        client.ping().unwrap();
        client.inner.state.lock().sub_ids.set_next(freed);
        let e = client.subscribe("e").unwrap();
        assert_eq!(e.id(), freed);
        assert_eq!(pattern_of(&e), "e");
        drop((a, c, d, e, client));
        broker.join().unwrap();
    }

    /// A subscribe that times out is taken back (the broker may still make
    /// it), and its id is not handed out again until the broker answered
    /// both the subscribe and the unsubscribe.
    #[test]
    fn a_subscribe_that_timed_out_is_taken_back_and_its_id_kept_until_answered() {
        use shmbus_proto::frame::{Pong, Subscribed};
        let (ours, theirs) = socket::pair().unwrap();
        // Answers a subscribe only once its unsubscribe came (late), then
        // both, in order; answers pings.
        let broker = std::thread::spawn(move || {
            let mut batch = RecvBatch::new(4);
            let mut frames = Vec::new();
            let send = |head: Vec<u8>| {
                let _ = socket::send_packet(
                    theirs.as_fd(),
                    OutPacket { head: &head, payload: &[], fds: &[] },
                    false,
                );
            };
            loop {
                let Ok(n) = batch.recv(theirs.as_fd(), false) else { return frames };
                for i in 0..n {
                    let (data, _, _) = batch.packet(i);
                    if data.is_empty() {
                        return frames;
                    }
                    match decode_client(data).unwrap() {
                        ClientFrame::Subscribe(s) => frames.push(format!("sub {}", s.sub_id)),
                        ClientFrame::Unsubscribe(u) => {
                            frames.push(format!("unsub {}", u.sub_id));
                            send(encode_head(&Subscribed { sub_id: u.sub_id }).unwrap());
                            send(encode_head(&Subscribed { sub_id: u.sub_id }).unwrap());
                        }
                        ClientFrame::Ping(p) => send(encode_head(&Pong { token: p.token }).unwrap()),
                        _ => {}
                    }
                }
            }
        });
        let mut client = client_on(ours);
        client.timeout = Duration::from_millis(50);
        let err = client.subscribe("a").unwrap_err();
        assert!(matches!(err, SubscribeError::Timeout(_)), "{err}");
        let id = 1;
        assert!(client.inner.state.lock().sub_ids.owes(id), "answers still owed");
        client.timeout = Duration::from_secs(5);
        client.ping().unwrap();
        {
            let st = client.inner.state.lock();
            assert!(!st.sub_ids.owes(id), "both answered");
            assert!(st.subs.is_empty() && st.acks.is_empty() && st.awaiting_ack.is_empty());
        }
        drop(client);
        assert_eq!(broker.join().unwrap(), ["sub 1", "unsub 1"]);
    }

    /// What a fake broker does with the frame after `Hello`.
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum OnAttach {
        /// Expect `Attach`, and set the link up.
        Link,
        /// Expect `Attach`, and decline it.
        Decline,
        /// Answer `Attach` with a frame that is neither.
        Garble,
    }

    fn unique_address() -> String {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("@shmbus-client-test-{}-{n}", std::process::id())
    }

    /// A broker for one connection: welcomes it, does `on` with what comes
    /// next, then answers pings (in the link's ring, or on the socket)
    /// until the client hangs up. Returns the frames it saw after `Hello`.
    fn handshake_broker(on: OnAttach) -> (String, std::thread::JoinHandle<Vec<String>>) {
        use shmbus_proto::frame::{Attached, ErrorCode, OpError, Pong, Welcome};
        use shmbus_proto::link::{layout::DEFAULT_CAPACITY, shm, Consumer, Producer, RecordKind};
        let addr = unique_address();
        let listener = socket::listen(&Address::parse(&addr).unwrap(), 4).unwrap();
        let broker = std::thread::spawn(move || {
            socket::set_nonblocking(listener.as_fd(), false).unwrap();
            let fd = rustix::net::accept(&listener).unwrap();
            let mut batch = RecvBatch::new(4);
            let mut seen = Vec::new();
            let send = |head: &[u8], fds: &[BorrowedFd<'_>]| {
                socket::send_packet(fd.as_fd(), OutPacket { head, payload: &[], fds }, false).unwrap();
            };
            batch.recv(fd.as_fd(), false).unwrap();
            assert!(matches!(decode_client(batch.packet(0).0), Ok(ClientFrame::Hello(_))));
            let limits = Limits {
                max_packet: 73728,
                max_inline_payload: 65536,
                queue_bytes: 1 << 20,
                queue_frames: 100,
                max_subscriptions: 10,
                fd_window: 128,
                max_depth: 32,
            };
            send(&encode_head(&Welcome { client_id: 7, limits }).unwrap(), &[]);
            let mut link: Option<(shm::LinkMap, Producer, Consumer)> = None;
            loop {
                let n = if link.is_some() {
                    match batch.recv(fd.as_fd(), true) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                        Err(_) => return seen,
                    }
                } else {
                    match batch.recv(fd.as_fd(), false) {
                        Ok(n) => n,
                        Err(_) => return seen,
                    }
                };
                let mut frames: Vec<Vec<u8>> = Vec::new();
                for i in 0..n {
                    let data = batch.packet(i).0;
                    if data.is_empty() {
                        return seen;
                    }
                    frames.push(data.to_vec());
                }
                if let Some((map, _, consumer)) = &mut link {
                    let mut buf = Vec::new();
                    while consumer.next(map.peer(), map.peer_data(), &mut buf).unwrap()
                        == Some(RecordKind::Frame)
                    {
                        frames.push(std::mem::take(&mut buf));
                    }
                    consumer.commit(map.mine());
                    if frames.is_empty() {
                        std::thread::sleep(Duration::from_millis(1));
                        continue;
                    }
                }
                for data in frames {
                    let frame = decode_client(&data).unwrap();
                    seen.push(match &frame {
                        ClientFrame::Attach(a) => format!("attach {}", a.capacity),
                        ClientFrame::Ping(_) => "ping".to_owned(),
                        ClientFrame::Doorbell => "doorbell".to_owned(),
                        other => format!("{other:?}"),
                    });
                    match frame {
                        ClientFrame::Attach(_) => match on {
                            OnAttach::Link => {
                                let made = shm::create(DEFAULT_CAPACITY).unwrap();
                                let fds = [made.client_half.as_fd(), made.broker_half_ro.as_fd()];
                                send(&encode_head(&Attached { capacity: DEFAULT_CAPACITY }).unwrap(), &fds);
                                let producer = Producer::new(DEFAULT_CAPACITY);
                                let consumer = Consumer::new(DEFAULT_CAPACITY);
                                link = Some((made.map, producer, consumer));
                            }
                            OnAttach::Decline => {
                                let e = OpError {
                                    op: Op::Attach,
                                    code: ErrorCode::LimitExceeded,
                                    message: "no room",
                                };
                                send(&encode_head(&e).unwrap(), &[]);
                            }
                            OnAttach::Garble => send(&encode_head(&Pong { token: 1 }).unwrap(), &[]),
                        },
                        ClientFrame::Ping(p) => {
                            let head = encode_head(&Pong { token: p.token }).unwrap();
                            match &mut link {
                                Some((map, producer, _)) => {
                                    assert!(producer
                                        .try_push(map.peer(), map.my_data(), RecordKind::Frame, &[&head])
                                        .unwrap());
                                    producer.publish(map.mine());
                                    if producer.must_ring(map.peer()) {
                                        send(crate::link::doorbell(), &[]);
                                    }
                                }
                                None => send(&head, &[]),
                            }
                        }
                        _ => {}
                    }
                }
            }
        });
        (addr, broker)
    }

    /// Whether `$SHMBUS_TRANSPORT` lets these tests ask for the link.
    fn link_allowed() -> bool {
        transport_env_allows_link(std::env::var_os(TRANSPORT_ENV).as_deref())
    }

    fn options(addr: &str) -> ConnectOptions {
        Client::options().address(Address::parse(addr).unwrap()).reconnect(crate::ReconnectPolicy::never())
    }

    #[test]
    fn the_link_is_asked_for_after_hello_and_used() {
        if !link_allowed() {
            return;
        }
        let (addr, broker) = handshake_broker(OnAttach::Link);
        let c = options(&addr).connect().unwrap();
        assert_eq!(c.transport(), Transport::SharedMemory);
        assert!(format!("{c:?}").contains("SharedMemory"));
        for _ in 0..3 {
            c.ping().unwrap();
        }
        drop(c);
        let seen = broker.join().unwrap();
        assert_eq!(seen[0], "attach 0");
        assert_eq!(seen.iter().filter(|s| *s == "ping").count(), 3, "{seen:?}");
    }

    #[test]
    fn a_declined_link_leaves_the_socket_and_says_why() {
        if !link_allowed() {
            return;
        }
        let (addr, broker) = handshake_broker(OnAttach::Decline);
        let c = options(&addr).connect().unwrap();
        assert_eq!(c.transport(), Transport::Socket);
        let why = c.inner.transport_note().unwrap();
        assert!(why.contains("declined") && why.contains("no room"), "{why}");
        c.ping().unwrap();
        drop(c);
        assert_eq!(broker.join().unwrap(), ["attach 0", "ping"]);
    }

    #[test]
    fn a_link_turned_off_is_not_asked_for() {
        let (addr, broker) = handshake_broker(OnAttach::Link);
        let c = options(&addr).shared_memory(false).connect().unwrap();
        assert_eq!(c.transport(), Transport::Socket);
        assert!(c.inner.transport_note().unwrap().contains("shared_memory(false)"));
        c.ping().unwrap();
        drop(c);
        assert_eq!(broker.join().unwrap(), ["ping"]);
    }

    #[test]
    fn any_other_answer_to_attach_fails_the_handshake() {
        if !link_allowed() {
            return;
        }
        let (addr, broker) = handshake_broker(OnAttach::Garble);
        match options(&addr).connect() {
            Err(ConnectError::Protocol(why)) => assert!(why.contains("Attach"), "{why}"),
            other => panic!("{other:?}"),
        }
        broker.join().unwrap();
    }

    #[test]
    fn only_shmbus_transport_socket_turns_the_link_off() {
        use std::ffi::OsStr;
        assert!(transport_env_allows_link(None));
        assert!(transport_env_allows_link(Some(OsStr::new("shm"))));
        assert!(transport_env_allows_link(Some(OsStr::new(""))));
        assert!(!transport_env_allows_link(Some(OsStr::new("socket"))));
    }
}
