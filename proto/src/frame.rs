//! Frames: the one unit of the wire protocol, and its codec.
//!
//! One SOCK_SEQPACKET packet carries one frame:
//!
//! ```text
//! +-------+-----+------+----------+----------------------+------------------+
//! | magic | ver | kind | body_len | body (postcard)      | payload (opaque) |
//! | u16le | u8  | u8   | u32le    | body_len bytes       | rest of packet   |
//! +-------+-----+------+----------+----------------------+------------------+
//! ```
//!
//! The kind byte picks the body type, so an unknown kind is recognised before
//! any decoding. Only the message kinds (`Publish`, `Deliver`, `Request`,
//! `Reply`, `Serve`, `Answer`) may carry payload bytes after the body; for
//! every other kind the body must end exactly at the end of the packet. A
//! body must decode to its type using every one of its bytes. Fds ride
//! beside the packet in SCM_RIGHTS and are declared in the body (a
//! `PayloadRef::Memfd`, a channel grant); this module never sees them.
//! `docs/PROTOCOL.md` describes the whole protocol.
//!
//! A `Batch` frame (broker to client only) carries several frames in its
//! payload, each behind a u32le length, so a busy connection costs the
//! kernel one packet for many frames. A batched frame is a whole frame as
//! it would travel alone; it never declares fds (fds belong to a packet,
//! and a frame with fds travels alone) and is never itself a `Batch`.
//! [`batched`] walks the entries and checks both.
//!
//! Compatibility rule (postcard is not self-describing): enum variants and
//! frame kinds are only ever appended; a changed body shape needs a new kind
//! or a new protocol version. The version is checked in every header and in
//! `Hello`.
//!
//! The codec does no I/O and never panics on input: every slice index is
//! checked, and postcard's own errors come back as [`DecodeError`]. The
//! property tests at the bottom feed it arbitrary bytes.

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_ORIGIN_LEN, MAX_PACKET};

mod hand;

/// First two bytes of every frame (little-endian "SB" as in shmbus).
pub const MAGIC: u16 = 0x4253;
/// Wire protocol version, in every header and in `Hello`.
pub const PROTOCOL_VERSION: u8 = 6;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 8;

/// What a frame is. Client-to-broker kinds are below 64, broker-to-client
/// kinds from 64 up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Subscribe = 2,
    Unsubscribe = 3,
    Publish = 4,
    Ping = 5,
    Query = 6,
    ChannelOpen = 7,
    ChannelClose = 8,
    FdAck = 9,
    NameRequest = 10,
    NameRelease = 11,
    GetNameOwner = 12,
    Request = 13,
    Reply = 14,
    Monitor = 15,
    PolicyCheck = 16,
    Attach = 17,
    /// Both directions: "look at the shared-memory link" (see `link`).
    Doorbell = 18,
    Welcome = 64,
    Goodbye = 65,
    Deliver = 66,
    Gap = 67,
    Subscribed = 68,
    Pong = 69,
    QueryItem = 70,
    QueryEnd = 71,
    OpError = 72,
    ChannelGranted = 73,
    ChannelReader = 74,
    NameReply = 75,
    NameOwner = 76,
    Serve = 77,
    Answer = 78,
    Batch = 79,
    Revoked = 80,
    Attached = 81,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        use Kind::*;
        Some(match b {
            1 => Hello,
            2 => Subscribe,
            3 => Unsubscribe,
            4 => Publish,
            5 => Ping,
            6 => Query,
            7 => ChannelOpen,
            8 => ChannelClose,
            9 => FdAck,
            10 => NameRequest,
            11 => NameRelease,
            12 => GetNameOwner,
            13 => Request,
            14 => Reply,
            15 => Monitor,
            16 => PolicyCheck,
            17 => Attach,
            18 => Doorbell,
            64 => Welcome,
            65 => Goodbye,
            66 => Deliver,
            67 => Gap,
            68 => Subscribed,
            69 => Pong,
            70 => QueryItem,
            71 => QueryEnd,
            72 => OpError,
            73 => ChannelGranted,
            74 => ChannelReader,
            75 => NameReply,
            76 => NameOwner,
            77 => Serve,
            78 => Answer,
            79 => Batch,
            80 => Revoked,
            81 => Attached,
            _ => return None,
        })
    }

    fn carries_payload(self) -> bool {
        matches!(
            self,
            Kind::Publish
                | Kind::Deliver
                | Kind::Request
                | Kind::Reply
                | Kind::Serve
                | Kind::Answer
                | Kind::Batch
        )
    }
}

/// A frame body, tied to its kind.
pub trait Body: Serialize {
    const KIND: Kind;

    /// Appends the body's postcard bytes to `out` without serde, for the
    /// bodies [`hand`] writes; `false`: serde must.
    fn encode_by_hand(&self, _out: &mut Vec<u8>) -> bool {
        false
    }
}

// The two bodies of every message: see `hand`.
impl Body for Publish<'_> {
    const KIND: Kind = Kind::Publish;

    fn encode_by_hand(&self, out: &mut Vec<u8>) -> bool {
        hand::encode_publish(out, self);
        true
    }
}

impl Body for Deliver<'_> {
    const KIND: Kind = Kind::Deliver;

    fn encode_by_hand(&self, out: &mut Vec<u8>) -> bool {
        hand::encode_deliver(out, self);
        true
    }
}

macro_rules! body {
    ($($t:ident $(<$l:lifetime>)? => $k:ident),* $(,)?) => {
        $(impl $(<$l>)? Body for $t $(<$l>)? { const KIND: Kind = Kind::$k; })*
    };
}

// ---------------------------------------------------------------- bodies --

/// First frame from a client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello<'a> {
    pub version: u16,
    pub name: &'a str,
}

/// The broker's limits for this connection, announced in `Welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_packet: u32,
    pub max_inline_payload: u32,
    pub queue_bytes: u64,
    pub queue_frames: u32,
    pub max_subscriptions: u32,
    /// Fds the broker sends this connection before it waits for an
    /// [`FdAck`]: the client must acknowledge the fds it has taken from
    /// its socket, at the latest when half of this many are unacknowledged.
    pub fd_window: u32,
    /// Most tokens in a subject or pattern.
    pub max_depth: u32,
}

/// Handshake accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub client_id: u64,
    pub limits: Limits,
}

/// Why the broker is closing the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GoodbyeCode {
    /// Policy refused this peer's credentials.
    Denied,
    /// The peer sent something that is not valid protocol.
    ProtocolViolation,
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// A subscription with the `Disconnect` overflow policy fell behind.
    SlowConsumer,
    /// The broker is shutting down.
    Shutdown,
    /// A resource limit of the connection was exceeded.
    LimitExceeded,
    /// The peer did not say `Hello` within the broker's deadline.
    HelloTimeout,
}

/// Last frame before the broker closes a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye<'a> {
    pub code: GoodbyeCode,
    pub reason: &'a str,
}

/// What happens when a subscriber's outgoing queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Overflow {
    /// Drop the message, count it, and send a `Gap` with the count once the
    /// queue has room again, in the place the messages were lost.
    #[default]
    Gap,
    /// Flush what is queued, then disconnect with `SlowConsumer`.
    Disconnect,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribe<'a> {
    pub sub_id: u32,
    pub pattern: &'a str,
    pub overflow: Overflow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unsubscribe {
    pub sub_id: u32,
}

/// Acknowledges a `Subscribe`: from here on, every publish the broker
/// routes that matches reaches this subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribed {
    pub sub_id: u32,
}

/// Where a publish's payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadRef {
    /// The payload is the rest of the packet.
    Inline,
    /// The payload is a sealed memfd of `len` bytes in SCM_RIGHTS (fd 0).
    Memfd { len: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish<'a> {
    pub topic: &'a str,
    /// Where the message comes from, as its publisher claims it (a bridge
    /// names the host and sender it forwards for). Text of at most
    /// [`MAX_ORIGIN_LEN`] bytes without control characters; the broker
    /// passes it on in `Deliver` as is. `sender` stays the broker's word.
    #[serde(borrow)]
    pub origin: Option<&'a str>,
    pub payload: PayloadRef,
}

/// Why an `origin` is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OriginError {
    #[error("an origin may not be empty (leave it out instead)")]
    Empty,
    #[error("an origin is at most {MAX_ORIGIN_LEN} bytes; this one has {0}")]
    TooLong(usize),
    #[error("an origin may not hold control characters")]
    Control,
}

/// Checks an `origin` (of `Publish` or `Request`): 1 to [`MAX_ORIGIN_LEN`]
/// bytes, no control characters. Receivers still print it escaped
/// ([`crate::text::escape`]): it is the publisher's claim, not the broker's.
pub fn validate_origin(origin: &str) -> Result<(), OriginError> {
    if origin.is_empty() {
        return Err(OriginError::Empty);
    }
    if origin.len() > MAX_ORIGIN_LEN {
        return Err(OriginError::TooLong(origin.len()));
    }
    if origin.chars().any(char::is_control) {
        return Err(OriginError::Control);
    }
    Ok(())
}

/// Who sent a message, as the broker saw it from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sender {
    pub client_id: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A message routed to one subscription. `seq` is the sender's publish
/// count on its connection (1 for its first publish), stamped by the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deliver<'a> {
    pub sub_id: u32,
    pub topic: &'a str,
    pub sender: Sender,
    pub seq: u64,
    /// The publisher's `Publish::origin`, unchanged.
    #[serde(borrow)]
    pub origin: Option<&'a str>,
    pub payload: PayloadRef,
}

/// `missed` messages for `sub_id` were dropped at this point in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    pub sub_id: u32,
    pub missed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ping {
    pub token: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    pub token: u64,
}

/// Introspection request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryKind {
    Clients,
    Topics,
    Stats,
    Channels,
    Names,
}

/// Asks for one page of an introspection answer. The broker answers with
/// at most one page of `QueryItem`s, then a `QueryEnd` whose `next`, when
/// set, is the `after` of the next page: answers are paced by the asker's
/// reading, and each page costs the broker a bounded amount of work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Query<'a> {
    pub req_id: u32,
    pub what: QueryKind,
    /// Resume after this key (a `next` from the previous page); `None`
    /// for the first page.
    pub after: Option<&'a str>,
}

/// One connected client, as introspection shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    pub id: u64,
    pub name: String,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub command: String,
    /// Patterns, possibly cut short to fit a frame; see `subscription_count`.
    pub subscriptions: Vec<String>,
    pub subscription_count: u32,
    pub queued_bytes: u64,
    pub queued_frames: u32,
    pub msgs_in: u64,
    pub msgs_out: u64,
    pub dropped: u64,
    pub connected_ms: u64,
}

/// One subscribed pattern and how many subscriptions hold it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicInfo {
    pub pattern: String,
    pub subscribers: u32,
}

/// Broker-wide counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    pub version: String,
    pub address: String,
    pub uptime_ms: u64,
    pub clients: u32,
    pub subscriptions: u32,
    pub patterns: u32,
    pub msgs_in: u64,
    pub msgs_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Deliveries dropped because a queue was full (all reported as gaps).
    pub dropped: u64,
    pub gap_notices: u64,
    pub connections_accepted: u64,
    pub connections_refused: u64,
    pub protocol_errors: u64,
    pub slow_disconnects: u64,
    /// Operations refused by a per-uid quota.
    pub quota_refusals: u64,
    /// Log lines about refusals left out by the log rate limit.
    pub log_suppressed: u64,
    /// Operations refused because the broker itself ran short (fds, memory).
    pub broker_resource_errors: u64,
    /// Connections closed for not saying Hello in time.
    pub hello_timeouts: u64,
    pub names: u32,
    pub pending_requests: u32,
    /// Requests that reached a service.
    pub requests: u64,
    /// Replies refused for having no slot (late, second, wrong id).
    pub replies_refused: u64,
    /// Replies whose caller had gone: dropped, and counted here.
    pub replies_dropped: u64,
    /// Requests answered `Timeout` by the broker.
    pub request_timeouts: u64,
    /// Operations the policy file refused.
    pub policy_denials: u64,
}

/// One ring channel, as introspection shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    pub id: u64,
    pub topic: String,
    /// Client id of the publisher.
    pub publisher: u64,
    pub readers: u32,
    pub slot_size: u32,
    pub slot_count: u32,
    pub overflow: ChannelOverflow,
    /// Messages published (the ring's head, as the publisher wrote it).
    pub published: u64,
    /// Messages readers found overwritten or torn, all readers together.
    pub overruns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryItemBody {
    Client(ClientInfo),
    Topic(TopicInfo),
    Stats(Stats),
    Channel(ChannelInfo),
    Name(NameInfo),
    /// The answer to a `PolicyCheck`.
    Verdict(PolicyVerdict),
}

/// What the running broker's policy says of one action, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyVerdict {
    pub allowed: bool,
    /// The rule that decided, as a person reads it ("rule 2 (line 9):
    /// allow publish sensors.>", "no rule allows it", ...).
    pub explanation: String,
}

/// Asks the broker how its policy decides `action` (`publish`,
/// `subscribe`, `own`, ..., as in the policy file) on `subject` for a peer
/// with `uid` and groups `gids` (the primary gid first; empty: the uid's
/// own number). Answered with one `QueryItem { Verdict }` and a
/// `QueryEnd`, or an `OpError` for `Op::Query { req_id }` (needs the
/// `introspect` right).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyCheck<'a> {
    pub req_id: u32,
    pub uid: u32,
    pub gids: Vec<u32>,
    pub action: &'a str,
    pub subject: &'a str,
}

/// Starts a monitor: every event the broker sees whose subject matches one
/// of `patterns` (all events when empty), delivered as `Deliver` frames on
/// `sub_id` whose payload is a [`MonitorEvent`] and whose `sender` is who
/// caused it. Needs the `monitor` right. Answered like `Subscribe`; ended
/// with `Unsubscribe`. A monitor that falls behind gets `Gap`s; the bus
/// never waits for it. `full`: whole inline payloads rather than the
/// first [`MONITOR_EXCERPT`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Monitor<'a> {
    pub sub_id: u32,
    #[serde(borrow)]
    pub patterns: Vec<&'a str>,
    pub full: bool,
}

/// Bytes of a payload a monitor sees unless it asked for `full`.
pub const MONITOR_EXCERPT: usize = 256;

/// What a monitor event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MonitorKind {
    /// A publish; the subject is its topic, the receivers its subscribers.
    Publish,
    /// A request; the subject is the name, the receiver the service.
    Request,
    /// An answer to a call (reply, error, timeout, ...); the subject is
    /// the name, the receiver the caller; `detail` names the outcome.
    Answer,
    /// A refusal (`OpError`) sent to a client; `detail` says what.
    Error,
    Connect,
    Disconnect,
    /// A subscription made; the subject is its pattern.
    Subscribe,
    Unsubscribe,
    /// A name's primary owner changed; the subject is the name.
    NameChange,
}

/// The payload of a monitor's `Deliver`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorEvent {
    pub kind: MonitorKind,
    /// Client ids that received it (subscribers, the service, the caller).
    pub receivers: Vec<u64>,
    /// A word on it: the outcome of an answer, the error, a client's name.
    pub detail: String,
    /// The whole payload's length.
    pub payload_len: u64,
    /// The payload travelled as a memfd (the broker never maps those, so
    /// `payload` is empty).
    pub memfd: bool,
    /// The inline payload, or its first [`MONITOR_EXCERPT`] bytes.
    pub payload: Vec<u8>,
}

impl MonitorEvent {
    /// The payload bytes of the event (postcard).
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Reads an event's payload. Never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<MonitorEvent, DecodeError> {
        body(Kind::Deliver, bytes)
    }
}

/// What the broker ended because a reloaded policy no longer allows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Revocation<'a> {
    /// The subscription (or monitor) `sub_id`: nothing more comes on it.
    Subscription { sub_id: u32 },
    /// The name, owned or queued for: released.
    Name { name: &'a str },
    /// The ring channel: closed for every member, since a ring a peer has
    /// mapped cannot be taken back from it; whoever may still use the
    /// topic opens it again (and gets a new ring).
    Channel { channel_id: u64 },
}

/// A notice that something was ended by a policy reload; the connection
/// goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked<'a> {
    #[serde(borrow)]
    pub what: Revocation<'a>,
    pub reason: &'a str,
}

body! {
    PolicyCheck<'a> => PolicyCheck, Monitor<'a> => Monitor, Revoked<'a> => Revoked,
}

/// Asks for the shared-memory transport (`link`): the client's first frame
/// after `Welcome`, and only then. `capacity`: bytes per direction, 0 for
/// the broker's default. Answered by `Attached`, or an `OpError` for
/// `Op::Attach` (the connection then goes on over the socket alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attach {
    pub capacity: u32,
}

/// The shared-memory transport is set up: two fds, a read-write one to the
/// client half and a read-only one to the broker half, each
/// `link::layout::half_len(capacity)` bytes. Every frame after this one
/// travels in the rings, except frames with fds, which stay on the socket
/// with a marker in the ring at their place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attached {
    pub capacity: u32,
}

/// Either direction, on the socket of a connection with a link: the other
/// side's ring has news (records, or room) and it had said it sleeps. No
/// content; any number of them may be merged or dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Doorbell;

body! { Attach => Attach, Attached => Attached, Doorbell => Doorbell }

/// One item of an introspection answer; a `QueryEnd` follows the last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryItem {
    pub req_id: u32,
    pub item: QueryItemBody,
}

/// Ends one page of an answer. `next` is set when there is more: send the
/// same query again with `after: next`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryEnd {
    pub req_id: u32,
    pub next: Option<String>,
}

/// The client has taken `fds` more fds from its socket (memfd payloads and
/// channel grants). The broker keeps at most `Limits::fd_window` fds
/// unacknowledged per connection, and a per-uid total, so fds it sends
/// never pile up unread in sockets, where the kernel charges them to the
/// broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdAck {
    pub fds: u32,
}

/// Which operation an `OpError` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Subscribe {
        sub_id: u32,
    },
    Unsubscribe {
        sub_id: u32,
    },
    /// `seq` is the publish count on the connection, as in `Deliver`.
    Publish {
        seq: u64,
    },
    Query {
        req_id: u32,
    },
    ChannelOpen {
        req_id: u32,
    },
    ChannelClose {
        channel_id: u64,
        reader_id: u32,
    },
    Name {
        req_id: u32,
    },
    Reply {
        serial: u64,
    },
    Attach,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    InvalidSubject,
    Denied,
    LimitExceeded,
    /// An fd was attached that the broker does not accept.
    FdRefused,
    PayloadTooLarge,
    UnknownSubscription,
    DuplicateSubscription,
    Unsupported,
    /// The attached fd is not a memfd.
    NotMemfd,
    /// The memfd lacks one of the required seals.
    NotSealed,
    /// The memfd's size is not the declared length.
    SizeMismatch,
    /// More (or fewer) fds were attached than the frame declares.
    WrongFdCount,
    /// The channel already has a publisher.
    ChannelBusy,
    /// No channel (with a publisher) on that topic.
    NoSuchChannel,
    /// The broker itself ran short of a resource (file descriptors,
    /// memory): not the sender's fault; it may retry later.
    BrokerResource,
    /// A reply for which no reply slot exists: never asked, answered
    /// already, timed out, or its caller left.
    NoSuchRequest,
    /// The name is reserved (`$SYS.>`), or may not be owned by this peer.
    ReservedName,
    /// An `origin` longer than [`MAX_ORIGIN_LEN`] bytes, empty, or holding
    /// a control character.
    InvalidOrigin,
}

/// A refused operation. The connection stays usable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpError<'a> {
    pub op: Op,
    pub code: ErrorCode,
    pub message: &'a str,
}

/// What happens when a ring channel's publisher laps a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ChannelOverflow {
    /// Overwrite the oldest slot; readers detect it and count what they missed.
    #[default]
    Overwrite,
    /// Wait for the slowest live reader.
    Block,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChannelRole {
    Publish { slot_size: u32, slot_count: u32, overflow: ChannelOverflow },
    Subscribe,
}

/// Asks for a ring channel on `topic`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelOpen<'a> {
    pub req_id: u32,
    pub topic: &'a str,
    pub role: ChannelRole,
}

/// Gives back one handle on a channel: `reader_id` 0 is the publisher's
/// (which closes the channel), any other is that reader's (which leaves
/// the reader set). Other handles the connection holds stay open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelClose {
    pub channel_id: u64,
    pub reader_id: u32,
}

/// A channel opened. Fds beside it: for the publisher, the ring
/// (read-write) and the signal page; for a reader, the ring (read-only),
/// the signal page, and its own cursor page (read-write).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelGranted {
    pub req_id: u32,
    pub channel_id: u64,
    /// 0 for the publisher.
    pub reader_id: u32,
    pub slot_size: u32,
    pub slot_count: u32,
    pub overflow: ChannelOverflow,
}

/// To a publisher: a reader joined (its cursor page, read-only, beside
/// this frame) or left. The broker coalesces this news: it holds at most
/// one untold change per reader and sends it as the publisher's queue has
/// room, and a reader that joins and leaves before the publisher was told
/// is never mentioned, so reader churn cannot flood a publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelReader {
    pub channel_id: u64,
    pub reader_id: u32,
    pub joined: bool,
    /// The signal page's `members` value after this change.
    pub generation: u32,
}

// ----------------------------------------------------------- services --

/// How a client asks for a name: D-Bus's flags, and NATS-style sharing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NameFlags {
    /// (Owner side) another asker with `replace_existing` may take the name.
    pub allow_replacement: bool,
    /// (Asker side) take the name from an owner that allows replacement.
    pub replace_existing: bool,
    /// Do not wait in the name's queue if it is taken.
    pub do_not_queue: bool,
    /// Share the name with every other client that asks with `shared`:
    /// requests are spread among them (a queue group with a name).
    pub shared: bool,
}

/// Asks to own `name` (a subject without wildcards, not under `$SYS`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRequest<'a> {
    pub req_id: u32,
    pub name: &'a str,
    pub flags: NameFlags,
}

/// Gives up `name`, or leaves its queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameRelease<'a> {
    pub req_id: u32,
    pub name: &'a str,
}

/// Asks who owns `name`; answered with `NameOwner`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetNameOwner<'a> {
    pub req_id: u32,
    pub name: &'a str,
}

/// What became of a `NameRequest` or `NameRelease` (D-Bus's codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NameResult {
    /// The asker owns the name now (or shares it).
    PrimaryOwner,
    /// The name is taken; the asker waits in its queue.
    InQueue,
    /// The name is taken and the asker said `do_not_queue` (or could not
    /// replace the owner).
    Exists,
    /// The asker already owns it.
    AlreadyOwner,
    /// Released (or left the queue).
    Released,
    /// Nobody owns the name.
    NonExistent,
    /// The asker neither owns it nor waits for it.
    NotOwner,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameReply {
    pub req_id: u32,
    pub result: NameResult,
}

/// Answers `GetNameOwner`: the primary owner's client id, if any, and how
/// many clients share the name (1 when exclusive, 0 when unowned).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameOwner {
    pub req_id: u32,
    pub owner: Option<u64>,
    pub members: u32,
}

/// The payload of a message on `$SYS.name.<name>`, published by the broker
/// (client id 0) whenever a name's primary owner changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameOwnerChanged {
    pub name: String,
    pub old_owner: Option<u64>,
    pub new_owner: Option<u64>,
}

impl NameOwnerChanged {
    /// The payload bytes of the event (postcard).
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Reads an event's payload. Never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<NameOwnerChanged, DecodeError> {
        body(Kind::Deliver, bytes)
    }
}

/// A request to the owner of `name`. Payload as in `Publish`. The broker
/// answers with exactly one `Answer` carrying `call_id`; with `no_reply`, it
/// answers only a request it could not deliver (so the loss is reported).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request<'a> {
    pub call_id: u64,
    pub name: &'a str,
    /// The broker answers `Timeout` after this many milliseconds.
    pub timeout_ms: u32,
    /// Fire and forget: no answer, no reply slot.
    pub no_reply: bool,
    /// Where the request comes from, as the caller claims it; as
    /// `Publish::origin`.
    #[serde(borrow)]
    pub origin: Option<&'a str>,
    pub payload: PayloadRef,
}

/// A request, delivered to the service that owns its name. `serial` names
/// the broker's reply slot; the service answers with `Reply { serial }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Serve<'a> {
    pub serial: u64,
    pub name: &'a str,
    pub sender: Sender,
    /// The request's timeout: the broker answers the caller `Timeout` this
    /// many milliseconds after it queued the request for the service.
    pub timeout_ms: u32,
    pub no_reply: bool,
    /// The caller's `Request::origin`, unchanged.
    #[serde(borrow)]
    pub origin: Option<&'a str>,
    pub payload: PayloadRef,
}

/// What a service answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReplyStatus<'a> {
    Ok,
    /// An application error, passed to the caller as is.
    Error {
        code: u32,
        message: &'a str,
    },
}

/// A service's answer to `Serve { serial }`. Payload as in `Publish`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply<'a> {
    pub serial: u64,
    #[serde(borrow)]
    pub status: ReplyStatus<'a>,
    pub payload: PayloadRef,
}

/// How a request ended: exactly one of these reaches the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome<'a> {
    /// The service replied; the payload is its reply.
    Reply,
    /// The service answered with an application error.
    AppError { code: u32, message: &'a str },
    /// Nobody owns the name.
    NoResponder,
    /// The service went away with the request unanswered.
    ResponderGone,
    /// The deadline passed.
    Timeout,
    /// Policy does not let the caller call this name.
    Denied { message: &'a str },
    /// A limit refused it (the caller's pending requests, the service's
    /// queue); the message names it.
    LimitExceeded { message: &'a str },
    /// The request itself was refused (bad name, bad fd); the message says why.
    Invalid { message: &'a str },
}

impl<'a> Outcome<'a> {
    /// The same outcome, its message (if it has one) cut to `max` bytes
    /// at a character boundary.
    pub fn clipped(self, max: usize) -> Outcome<'a> {
        use crate::text::clip;
        match self {
            Outcome::AppError { code, message } => Outcome::AppError { code, message: clip(message, max) },
            Outcome::Denied { message } => Outcome::Denied { message: clip(message, max) },
            Outcome::LimitExceeded { message } => Outcome::LimitExceeded { message: clip(message, max) },
            Outcome::Invalid { message } => Outcome::Invalid { message: clip(message, max) },
            other => other,
        }
    }
}

/// The one answer to a `Request { call_id }`. `responder` is the service,
/// as the broker saw it, when it replied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer<'a> {
    pub call_id: u64,
    #[serde(borrow)]
    pub outcome: Outcome<'a>,
    pub responder: Option<Sender>,
    pub payload: PayloadRef,
}

/// One name, as introspection shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameInfo {
    pub name: String,
    /// Client ids: the owner first (or every member of a shared name),
    /// not the queue (that is `queued`). The two lists hold at most
    /// [`MAX_NAME_INFO_IDS`](crate::limits::MAX_NAME_INFO_IDS) ids
    /// together, owners first; the counts say how many there are in all.
    pub owners: Vec<u64>,
    pub queued: Vec<u64>,
    pub shared: bool,
    pub allow_replacement: bool,
    /// Owners (members of a shared name) in all, listed or not.
    pub owner_count: u32,
    /// Queued clients in all, listed or not.
    pub queued_count: u32,
}

/// Several broker-to-client frames in one packet. The payload is
/// `frames` entries, each a u32le length and then that many bytes: one
/// whole frame (header, body, payload) as it would travel alone, which
/// declares no fds and is not a `Batch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub frames: u32,
}

/// Bytes an entry of a `Batch` adds to its frame: the length prefix.
pub const BATCH_ENTRY_OVERHEAD: usize = 4;

/// Appends one frame (`head`, then `payload`) to a `Batch` payload.
pub fn batch_push(out: &mut Vec<u8>, head: &[u8], payload: &[u8]) {
    out.extend_from_slice(&((head.len() + payload.len()) as u32).to_le_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(payload);
}

body! { Batch => Batch }

/// Room for entries in one `Batch` packet: the packet limit less its
/// header and the longest body (`frames` as a postcard varint, 5 bytes).
pub const BATCH_ROOM: usize = MAX_PACKET - HEADER_LEN - 5;

/// How queued frames go out: consecutive frames that may share a packet
/// are packed into `Batch`es of at most [`BATCH_ROOM`] bytes. `frames`
/// gives each frame's length and whether it must travel alone (it has fds
/// beside it, or it is the `Welcome`). Returns each packet's number of
/// frames, in order; 1 means the frame goes alone, not in a `Batch`.
/// Packing never waits for more: it only groups what is already queued.
pub fn pack(frames: impl IntoIterator<Item = (usize, bool)>) -> Vec<usize> {
    let mut packets = Vec::new();
    // The open group: frames in it, bytes as entries.
    let (mut open, mut bytes) = (0usize, 0usize);
    for (len, alone) in frames {
        let entry = BATCH_ENTRY_OVERHEAD + len;
        if alone || open > 0 && bytes + entry > BATCH_ROOM {
            if open > 0 {
                packets.push(open);
            }
            (open, bytes) = (0, 0);
        }
        if alone {
            packets.push(1);
        } else {
            open += 1;
            bytes += entry;
        }
    }
    if open > 0 {
        packets.push(open);
    }
    packets
}

body! {
    NameRequest<'a> => NameRequest, NameRelease<'a> => NameRelease, GetNameOwner<'a> => GetNameOwner,
    Request<'a> => Request, Reply<'a> => Reply, NameReply => NameReply, NameOwner => NameOwner,
    Serve<'a> => Serve, Answer<'a> => Answer,
}

body! {
    ChannelOpen<'a> => ChannelOpen, ChannelClose => ChannelClose,
    ChannelGranted => ChannelGranted, ChannelReader => ChannelReader,
}

body! {
    Hello<'a> => Hello, Subscribe<'a> => Subscribe, Unsubscribe => Unsubscribe,
    Ping => Ping, Query<'a> => Query, FdAck => FdAck,
    Welcome => Welcome, Goodbye<'a> => Goodbye, Gap => Gap,
    Subscribed => Subscribed, Pong => Pong, QueryItem => QueryItem, QueryEnd => QueryEnd,
    OpError<'a> => OpError,
}

// ----------------------------------------------------------------- codec --

/// Why a packet is not a valid frame. Every variant ends the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    TooShort(usize),
    #[error("packet of {0} bytes is larger than the {MAX_PACKET}-byte limit")]
    TooLong(usize),
    #[error("bad magic {0:#06x}")]
    BadMagic(u16),
    #[error("protocol version {0} is not supported (this side speaks {PROTOCOL_VERSION})")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame kind {0:?} is not valid in this direction")]
    WrongDirection(Kind),
    #[error("body length {body_len} runs past the end of a {packet_len}-byte packet")]
    BodyLength { body_len: u32, packet_len: usize },
    #[error("frame kind {0:?} carries unexpected payload bytes")]
    UnexpectedPayload(Kind),
    #[error("malformed {kind:?} body: {detail}")]
    Body { kind: Kind, detail: String },
    #[error("malformed batch: {0}")]
    Batch(&'static str),
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("frame of {0} bytes is larger than the {MAX_PACKET}-byte limit")]
    TooLong(usize),
    #[error("cannot encode body: {0}")]
    Body(String),
}

/// Encodes header and body into `out` (cleared first). A payload, if any,
/// goes right after, either appended by the caller or as a second iovec.
pub fn encode_head_into<B: Body>(out: &mut Vec<u8>, body: &B) -> Result<(), EncodeError> {
    out.clear();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(PROTOCOL_VERSION);
    out.push(B::KIND as u8);
    out.extend_from_slice(&[0; 4]);
    let mut buf = std::mem::take(out);
    if !body.encode_by_hand(&mut buf) {
        buf = postcard::to_extend(body, buf).map_err(|e| EncodeError::Body(e.to_string()))?;
    }
    let body_len = buf.len() - HEADER_LEN;
    if buf.len() > MAX_PACKET {
        return Err(EncodeError::TooLong(buf.len()));
    }
    buf[4..8].copy_from_slice(&(body_len as u32).to_le_bytes());
    *out = buf;
    Ok(())
}

/// Encodes header and body into a new buffer.
pub fn encode_head<B: Body>(body: &B) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(64);
    encode_head_into(&mut out, body)?;
    Ok(out)
}

/// Encodes a whole frame, payload included, into one buffer, which holds
/// no more than the frame: the broker queues such buffers and charges
/// their capacity. (Sized for a head of 64 bytes; a longer one, a long
/// subject say, costs one exact reallocation, where letting `Vec` grow
/// doubled the buffer, twice the payload held for nothing.)
pub fn encode_frame<B: Body>(body: &B, payload: &[u8]) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(frame_capacity(payload.len()));
    encode_frame_into(&mut out, body, payload)?;
    Ok(out)
}

/// The capacity [`encode_frame`] gives a frame's buffer for `payload`
/// bytes: room for a head of 64 bytes and the payload.
pub fn frame_capacity(payload: usize) -> usize {
    64 + payload
}

/// [`encode_frame`] into `out` (cleared first), which grows only if it
/// has too little room: a buffer that held an earlier frame is reused.
pub fn encode_frame_into<B: Body>(out: &mut Vec<u8>, body: &B, payload: &[u8]) -> Result<(), EncodeError> {
    encode_head_into(out, body)?;
    if out.len() + payload.len() > MAX_PACKET {
        return Err(EncodeError::TooLong(out.len() + payload.len()));
    }
    out.reserve_exact(payload.len());
    out.extend_from_slice(payload);
    Ok(())
}

/// A packet split into its parts, checked but not yet decoded.
struct Raw<'a> {
    kind: Kind,
    body: &'a [u8],
    payload: &'a [u8],
}

fn split(packet: &[u8]) -> Result<Raw<'_>, DecodeError> {
    if packet.len() > MAX_PACKET {
        return Err(DecodeError::TooLong(packet.len()));
    }
    let Some((header, rest)) = packet.split_first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::TooShort(packet.len()));
    };
    let magic = u16::from_le_bytes([header[0], header[1]]);
    if magic != MAGIC {
        return Err(DecodeError::BadMagic(magic));
    }
    if header[2] != PROTOCOL_VERSION {
        return Err(DecodeError::Version(header[2]));
    }
    let kind = Kind::from_u8(header[3]).ok_or(DecodeError::UnknownKind(header[3]))?;
    let body_len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let (body, payload) = rest
        .split_at_checked(body_len as usize)
        .ok_or(DecodeError::BodyLength { body_len, packet_len: packet.len() })?;
    if !payload.is_empty() && !kind.carries_payload() {
        return Err(DecodeError::UnexpectedPayload(kind));
    }
    Ok(Raw { kind, body, payload })
}

fn body<'a, T: Deserialize<'a>>(kind: Kind, bytes: &'a [u8]) -> Result<T, DecodeError> {
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(DecodeError::Body { kind, detail: format!("{} trailing bytes", rest.len()) }),
        Err(e) => Err(DecodeError::Body { kind, detail: e.to_string() }),
    }
}

/// A decoded client-to-broker frame. Borrowed from the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame<'a> {
    Hello(Hello<'a>),
    Subscribe(Subscribe<'a>),
    Unsubscribe(Unsubscribe),
    Publish(Publish<'a>, &'a [u8]),
    Ping(Ping),
    Query(Query<'a>),
    ChannelOpen(ChannelOpen<'a>),
    ChannelClose(ChannelClose),
    FdAck(FdAck),
    NameRequest(NameRequest<'a>),
    NameRelease(NameRelease<'a>),
    GetNameOwner(GetNameOwner<'a>),
    Request(Request<'a>, &'a [u8]),
    Reply(Reply<'a>, &'a [u8]),
    Monitor(Monitor<'a>),
    PolicyCheck(PolicyCheck<'a>),
    Attach(Attach),
    Doorbell,
}

/// Decodes a packet a client sent. Never panics.
pub fn decode_client(packet: &[u8]) -> Result<ClientFrame<'_>, DecodeError> {
    let Raw { kind, body: b, payload } = split(packet)?;
    Ok(match kind {
        Kind::Hello => ClientFrame::Hello(body(kind, b)?),
        Kind::Subscribe => ClientFrame::Subscribe(body(kind, b)?),
        Kind::Unsubscribe => ClientFrame::Unsubscribe(body(kind, b)?),
        Kind::Publish => {
            ClientFrame::Publish(hand::decode_publish(b).map_or_else(|| body(kind, b), Ok)?, payload)
        }
        Kind::Ping => ClientFrame::Ping(body(kind, b)?),
        Kind::Query => ClientFrame::Query(body(kind, b)?),
        Kind::ChannelOpen => ClientFrame::ChannelOpen(body(kind, b)?),
        Kind::ChannelClose => ClientFrame::ChannelClose(body(kind, b)?),
        Kind::FdAck => ClientFrame::FdAck(body(kind, b)?),
        Kind::NameRequest => ClientFrame::NameRequest(body(kind, b)?),
        Kind::NameRelease => ClientFrame::NameRelease(body(kind, b)?),
        Kind::GetNameOwner => ClientFrame::GetNameOwner(body(kind, b)?),
        Kind::Request => ClientFrame::Request(body(kind, b)?, payload),
        Kind::Reply => ClientFrame::Reply(body(kind, b)?, payload),
        Kind::Monitor => ClientFrame::Monitor(body(kind, b)?),
        Kind::PolicyCheck => ClientFrame::PolicyCheck(body(kind, b)?),
        Kind::Attach => ClientFrame::Attach(body(kind, b)?),
        Kind::Doorbell => {
            let Doorbell = body(kind, b)?;
            ClientFrame::Doorbell
        }
        other => return Err(DecodeError::WrongDirection(other)),
    })
}

/// A decoded broker-to-client frame. Borrowed from the packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerFrame<'a> {
    Welcome(Welcome),
    Goodbye(Goodbye<'a>),
    Deliver(Deliver<'a>, &'a [u8]),
    Gap(Gap),
    Subscribed(Subscribed),
    Pong(Pong),
    /// Boxed: an item is 240 bytes, and every frame (a `Deliver` is 104)
    /// would be moved at that size.
    QueryItem(Box<QueryItem>),
    QueryEnd(QueryEnd),
    OpError(OpError<'a>),
    ChannelGranted(ChannelGranted),
    ChannelReader(ChannelReader),
    NameReply(NameReply),
    NameOwner(NameOwner),
    Serve(Serve<'a>, &'a [u8]),
    Answer(Answer<'a>, &'a [u8]),
    Batch(Batch, &'a [u8]),
    Revoked(Revoked<'a>),
    Attached(Attached),
    Doorbell,
}

/// Decodes a packet the broker sent. Never panics.
pub fn decode_broker(packet: &[u8]) -> Result<BrokerFrame<'_>, DecodeError> {
    let Raw { kind, body: b, payload } = split(packet)?;
    Ok(match kind {
        Kind::Welcome => BrokerFrame::Welcome(body(kind, b)?),
        Kind::Goodbye => BrokerFrame::Goodbye(body(kind, b)?),
        Kind::Deliver => {
            BrokerFrame::Deliver(hand::decode_deliver(b).map_or_else(|| body(kind, b), Ok)?, payload)
        }
        Kind::Gap => BrokerFrame::Gap(body(kind, b)?),
        Kind::Subscribed => BrokerFrame::Subscribed(body(kind, b)?),
        Kind::Pong => BrokerFrame::Pong(body(kind, b)?),
        Kind::QueryItem => BrokerFrame::QueryItem(Box::new(body(kind, b)?)),
        Kind::QueryEnd => BrokerFrame::QueryEnd(body(kind, b)?),
        Kind::OpError => BrokerFrame::OpError(body(kind, b)?),
        Kind::ChannelGranted => BrokerFrame::ChannelGranted(body(kind, b)?),
        Kind::ChannelReader => BrokerFrame::ChannelReader(body(kind, b)?),
        Kind::NameReply => BrokerFrame::NameReply(body(kind, b)?),
        Kind::NameOwner => BrokerFrame::NameOwner(body(kind, b)?),
        Kind::Serve => BrokerFrame::Serve(body(kind, b)?, payload),
        Kind::Answer => BrokerFrame::Answer(body(kind, b)?, payload),
        Kind::Batch => BrokerFrame::Batch(body(kind, b)?, payload),
        Kind::Revoked => BrokerFrame::Revoked(body(kind, b)?),
        Kind::Attached => BrokerFrame::Attached(body(kind, b)?),
        Kind::Doorbell => {
            let Doorbell = body(kind, b)?;
            BrokerFrame::Doorbell
        }
        other => return Err(DecodeError::WrongDirection(other)),
    })
}

/// The entries of a `Batch`, split but not decoded: each entry's length
/// fits, the entries fill the payload exactly and number `batch.frames`.
/// Never panics.
pub fn batch_entries(batch: Batch, mut payload: &[u8]) -> Result<Vec<&[u8]>, DecodeError> {
    let mut entries = Vec::new();
    while !payload.is_empty() {
        let Some((len, rest)) = payload.split_first_chunk::<BATCH_ENTRY_OVERHEAD>() else {
            return Err(DecodeError::Batch("an entry's length is cut short"));
        };
        let Some((entry, rest)) = rest.split_at_checked(u32::from_le_bytes(*len) as usize) else {
            return Err(DecodeError::Batch("an entry runs past the end of the batch"));
        };
        if entries.len() as u64 >= u64::from(batch.frames) {
            return Err(DecodeError::Batch("more entries than the batch declares"));
        }
        entries.push(entry);
        payload = rest;
    }
    if entries.len() as u64 != u64::from(batch.frames) {
        return Err(DecodeError::Batch("fewer entries than the batch declares"));
    }
    Ok(entries)
}

/// The frames of a `Batch`, decoded and checked: the entries as
/// [`batch_entries`] splits them, each a valid frame that is not a
/// `Batch` and declares no fds. All or nothing: a damaged batch is one
/// error, before any of its frames is handled. Never panics.
pub fn batched(batch: Batch, payload: &[u8]) -> Result<Vec<BrokerFrame<'_>>, DecodeError> {
    let entries = batch_entries(batch, payload)?;
    let mut frames = Vec::with_capacity(entries.len());
    for entry in entries {
        let frame = decode_broker(entry)?;
        if matches!(frame, BrokerFrame::Batch(..)) {
            return Err(DecodeError::Batch("a batch inside a batch"));
        }
        if declares_fds(&frame) {
            return Err(DecodeError::Batch("a batched frame declares fds"));
        }
        frames.push(frame);
    }
    Ok(frames)
}

/// Whether a broker frame has fds beside it: a payload by memfd, a
/// channel grant, a reader's join.
pub fn declares_fds(frame: &BrokerFrame<'_>) -> bool {
    match frame {
        BrokerFrame::Deliver(d, _) => matches!(d.payload, PayloadRef::Memfd { .. }),
        BrokerFrame::Serve(r, _) => matches!(r.payload, PayloadRef::Memfd { .. }),
        BrokerFrame::Answer(a, _) => matches!(a.payload, PayloadRef::Memfd { .. }),
        BrokerFrame::ChannelGranted(_) => true,
        BrokerFrame::ChannelReader(r) => r.joined,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn publish_roundtrip() {
        let p = Publish { topic: "a.b", origin: None, payload: PayloadRef::Inline };
        let bytes = encode_frame(&p, b"hello").unwrap();
        assert_eq!(decode_client(&bytes).unwrap(), ClientFrame::Publish(p, b"hello"));
    }

    #[test]
    fn deliver_roundtrip() {
        let d = Deliver {
            sub_id: 7,
            topic: "x.y",
            sender: Sender { client_id: 1, uid: 2, gid: 3, pid: 4 },
            seq: 99,
            origin: None,
            payload: PayloadRef::Inline,
        };
        let bytes = encode_frame(&d, &[1, 2, 3]).unwrap();
        assert_eq!(decode_broker(&bytes).unwrap(), BrokerFrame::Deliver(d, &[1, 2, 3][..]));
    }

    /// The broker queues a lone receiver's delivery as one buffer and
    /// charges its capacity: a long head must not double it.
    #[test]
    fn a_whole_frames_buffer_is_no_bigger_than_the_frame() {
        let topic = "t".repeat(200);
        let d = Deliver {
            sub_id: 7,
            topic: &topic,
            sender: Sender { client_id: 1, uid: 2, gid: 3, pid: 4 },
            seq: 99,
            origin: None,
            payload: PayloadRef::Inline,
        };
        for len in [4096, 60_000] {
            let bytes = encode_frame(&d, &vec![1; len]).unwrap();
            assert!(bytes.len() > 64 + len);
            assert!(bytes.capacity() <= bytes.len() + 64, "{} for {}", bytes.capacity(), bytes.len());
        }
    }

    #[test]
    fn rejects_each_kind_of_damage() {
        let good = encode_head(&Ping { token: 5 }).unwrap();
        assert_eq!(decode_client(&good).unwrap(), ClientFrame::Ping(Ping { token: 5 }));
        assert_eq!(decode_client(&good[..3]), Err(DecodeError::TooShort(3)));
        let mut bad = good.clone();
        bad[0] ^= 0xff;
        assert!(matches!(decode_client(&bad), Err(DecodeError::BadMagic(_))));
        let mut bad = good.clone();
        bad[2] = 9;
        assert_eq!(decode_client(&bad), Err(DecodeError::Version(9)));
        let mut bad = good.clone();
        bad[3] = 200;
        assert_eq!(decode_client(&bad), Err(DecodeError::UnknownKind(200)));
        let mut bad = good.clone();
        bad[4] = 200;
        assert!(matches!(decode_client(&bad), Err(DecodeError::BodyLength { .. })));
        let mut bad = good.clone();
        bad.push(0);
        assert_eq!(decode_client(&bad), Err(DecodeError::UnexpectedPayload(Kind::Ping)));
        let pong = encode_head(&Pong { token: 1 }).unwrap();
        assert_eq!(decode_client(&pong), Err(DecodeError::WrongDirection(Kind::Pong)));
        // A body with a trailing byte inside body_len is refused too.
        let mut bad = good.clone();
        bad.push(0);
        bad[4] += 1;
        assert!(matches!(decode_client(&bad), Err(DecodeError::Body { .. })));
        let huge = vec![0u8; MAX_PACKET + 1];
        assert_eq!(decode_client(&huge), Err(DecodeError::TooLong(MAX_PACKET + 1)));
    }

    #[test]
    fn oversize_encode_is_refused() {
        let p = Publish { topic: "a", origin: None, payload: PayloadRef::Inline };
        assert!(matches!(encode_frame(&p, &vec![0; MAX_PACKET]), Err(EncodeError::TooLong(_))));
    }

    fn pong(token: u64) -> Vec<u8> {
        encode_head(&Pong { token }).unwrap()
    }

    fn batch_of(entries: &[Vec<u8>], frames: u32) -> Vec<u8> {
        let mut payload = Vec::new();
        for e in entries {
            batch_push(&mut payload, e, &[]);
        }
        encode_frame(&Batch { frames }, &payload).unwrap()
    }

    #[test]
    fn packing_groups_what_may_share_a_packet() {
        let small = (100, false);
        assert_eq!(pack([]), Vec::<usize>::new());
        assert_eq!(pack([small]), vec![1]);
        assert_eq!(pack([small; 5]), vec![5]);
        // Frames with fds split the run and go alone.
        assert_eq!(pack([small, small, (50, true), small, (50, true), (50, true)]), vec![2, 1, 1, 1, 1]);
        // Full packets: an entry that would pass the room starts the next.
        let big = (BATCH_ROOM / 2 - BATCH_ENTRY_OVERHEAD, false);
        assert_eq!(pack([big, big, big]), vec![2, 1]);
        assert_eq!(pack([big, big, (1, false)]), vec![2, 1]);
        // A frame as big as a packet goes alone, in a batch of one.
        let whole = (MAX_PACKET, false);
        assert_eq!(pack([small, whole, small]), vec![1, 1, 1]);
    }

    proptest! {
        #[test]
        fn packing_keeps_every_frame_in_order_and_inside_a_packet(
            frames in proptest::collection::vec((0usize..MAX_PACKET - 64, any::<bool>()), 0..64),
        ) {
            let packets = pack(frames.iter().copied());
            prop_assert_eq!(packets.iter().sum::<usize>(), frames.len());
            let mut at = 0;
            for n in packets {
                let group = &frames[at..at + n];
                prop_assert!(n >= 1);
                if n > 1 {
                    prop_assert!(group.iter().all(|&(_, alone)| !alone));
                    let bytes: usize = group.iter().map(|&(len, _)| len + BATCH_ENTRY_OVERHEAD).sum();
                    prop_assert!(bytes <= BATCH_ROOM);
                }
                at += n;
            }
        }
    }

    #[test]
    fn a_batch_yields_its_frames_in_order() {
        let d = Deliver {
            sub_id: 1,
            topic: "a",
            sender: Sender { client_id: 1, uid: 2, gid: 3, pid: 4 },
            seq: 5,
            origin: None,
            payload: PayloadRef::Inline,
        };
        let mut payload = Vec::new();
        batch_push(&mut payload, &pong(1), &[]);
        batch_push(&mut payload, &encode_head(&d).unwrap(), b"xyz");
        batch_push(&mut payload, &pong(2), &[]);
        let packet = encode_frame(&Batch { frames: 3 }, &payload).unwrap();
        let BrokerFrame::Batch(b, p) = decode_broker(&packet).unwrap() else { panic!("not a batch") };
        assert_eq!(
            batched(b, p).unwrap(),
            vec![
                BrokerFrame::Pong(Pong { token: 1 }),
                BrokerFrame::Deliver(d, &b"xyz"[..]),
                BrokerFrame::Pong(Pong { token: 2 })
            ]
        );
    }

    /// The examples of PROTOCOL.md §4 and its table, as bytes: a changed
    /// encoding fails here until the page shows it.
    #[test]
    fn frames_are_the_bytes_protocol_md_shows() {
        let hex = |bytes: Vec<u8>| bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ");
        let doc = include_str!("../../docs/PROTOCOL.md");
        let shown = |h: &str| assert!(doc.contains(h), "PROTOCOL.md does not show {h}");
        let publish = Publish { topic: "a.b", origin: None, payload: PayloadRef::Inline };
        let bytes = hex(encode_frame(&publish, b"hi").unwrap());
        assert_eq!(bytes, "53 42 06 04 06 00 00 00 03 61 2e 62 00 00 68 69");
        shown("53 42 06 04 06 00 00 00   kind 4 (Publish), body_len 6");
        let memfd = Publish { topic: "a.b", origin: None, payload: PayloadRef::Memfd { len: 1_000_000 } };
        assert_eq!(hex(encode_head(&memfd).unwrap()), "53 42 06 04 09 00 00 00 03 61 2e 62 00 01 c0 84 3d");
        shown("53 42 06 04 09 00 00 00   kind 4, body_len 9");
        let deliver = Deliver {
            sub_id: 1,
            topic: "a.b",
            sender: Sender { client_id: 3, uid: 1000, gid: 1000, pid: 4242 },
            seq: 1,
            origin: Some("h1"),
            payload: PayloadRef::Inline,
        };
        assert_eq!(
            hex(encode_frame(&deliver, b"hi").unwrap()),
            "53 42 06 42 12 00 00 00 01 03 61 2e 62 03 e8 07 e8 07 92 21 01 01 02 68 31 00 68 69"
        );
        shown("53 42 06 42 12 00 00 00   kind 66 (Deliver), body_len 18");
        shown("01 02 68 31               origin: Some(\"h1\")");
        let request = Request {
            call_id: 1,
            name: "svc",
            timeout_ms: 1000,
            no_reply: false,
            origin: None,
            payload: PayloadRef::Inline,
        };
        let bytes = hex(encode_frame(&request, b"q").unwrap());
        assert_eq!(bytes, "53 42 06 0d 0a 00 00 00 01 03 73 76 63 e8 07 00 00 00 71");
        shown("`53 42 06 0d 0a 00 00 00  01 03 73 76 63 e8 07 00 00 00 71`");
    }

    #[test]
    fn origins_are_short_printable_text() {
        assert_eq!(validate_origin("nats:host1 uid=1000 pid=42"), Ok(()));
        assert_eq!(validate_origin("héllo ✓"), Ok(()));
        assert_eq!(validate_origin(""), Err(OriginError::Empty));
        assert_eq!(validate_origin(&"a".repeat(MAX_ORIGIN_LEN)), Ok(()));
        assert_eq!(validate_origin(&"a".repeat(MAX_ORIGIN_LEN + 1)), Err(OriginError::TooLong(257)));
        assert_eq!(validate_origin("a\nforged log line"), Err(OriginError::Control));
        assert_eq!(validate_origin("\u{1b}[31m"), Err(OriginError::Control));
    }

    #[test]
    fn a_batch_is_the_bytes_protocol_md_shows() {
        let packet = batch_of(&[pong(1), pong(2)], 2);
        #[rustfmt::skip]
        let documented = [
            0x53, 0x42, 6, 0x4f, 1, 0, 0, 0, 2,
            9, 0, 0, 0, 0x53, 0x42, 6, 0x45, 1, 0, 0, 0, 1,
            9, 0, 0, 0, 0x53, 0x42, 6, 0x45, 1, 0, 0, 0, 2,
        ];
        assert_eq!(packet, documented);
    }

    #[test]
    fn a_damaged_batch_is_refused_whole() {
        let two = [pong(1), pong(2)];
        let check = |packet: &[u8]| {
            let BrokerFrame::Batch(b, p) = decode_broker(packet).unwrap() else { panic!("not a batch") };
            batched(b, p).map(|f| f.len())
        };
        assert_eq!(check(&batch_of(&two, 2)), Ok(2));
        assert!(matches!(check(&batch_of(&two, 3)), Err(DecodeError::Batch(_))));
        assert!(matches!(check(&batch_of(&two, 1)), Err(DecodeError::Batch(_))));
        // An entry cut short, a length past the end, a damaged entry.
        let mut cut = batch_of(&two, 2);
        cut.truncate(cut.len() - 1);
        assert!(check(&cut).is_err());
        let mut long = batch_of(&two, 2);
        let at = long.len() - pong(2).len() - 4;
        long[at] = 0xff;
        assert!(matches!(check(&long), Err(DecodeError::Batch(_))));
        let mut bad = batch_of(&two, 2);
        let last = bad.len() - pong(2).len();
        bad[last] ^= 0xff;
        assert!(matches!(check(&bad), Err(DecodeError::BadMagic(_))));
        // A batch inside a batch, a batched frame with fds.
        assert!(matches!(check(&batch_of(&[batch_of(&two, 2)], 1)), Err(DecodeError::Batch(_))));
        let memfd = Deliver {
            sub_id: 1,
            topic: "a",
            sender: Sender { client_id: 1, uid: 2, gid: 3, pid: 4 },
            seq: 5,
            origin: None,
            payload: PayloadRef::Memfd { len: 10 },
        };
        let with_fd = [encode_head(&memfd).unwrap()];
        assert_eq!(check(&batch_of(&with_fd, 1)), Err(DecodeError::Batch("a batched frame declares fds")));
        // A client may not send one.
        assert_eq!(decode_client(&batch_of(&two, 2)), Err(DecodeError::WrongDirection(Kind::Batch)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn batches_never_panic(frames in any::<u32>(), payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = batched(Batch { frames }, &payload);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_client(&bytes);
            let _ = decode_broker(&bytes);
        }

        #[test]
        fn decoders_never_panic_behind_a_valid_header(
            kind in any::<u8>(),
            body in proptest::collection::vec(any::<u8>(), 0..256),
            extra in 0u32..8,
        ) {
            let mut p = Vec::new();
            p.extend_from_slice(&MAGIC.to_le_bytes());
            p.push(PROTOCOL_VERSION);
            p.push(kind);
            p.extend_from_slice(&(body.len() as u32).saturating_sub(extra).to_le_bytes());
            p.extend_from_slice(&body);
            let _ = decode_client(&p);
            let _ = decode_broker(&p);
        }

        #[test]
        fn subscribe_roundtrips(sub_id in any::<u32>(), pattern in "[a-z*>.]{1,40}") {
            let s = Subscribe { sub_id, pattern: &pattern, overflow: Overflow::Disconnect };
            let bytes = encode_head(&s).unwrap();
            prop_assert_eq!(decode_client(&bytes).unwrap(), ClientFrame::Subscribe(s));
        }
    }
}
