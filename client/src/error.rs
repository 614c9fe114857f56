//! Errors, one enum per operation, each with a [`ErrorKind`] so callers
//! can branch on the class without matching every variant.

use std::fmt;
use std::io;

use shmbus_proto::address::AddressError;
use shmbus_proto::frame::{ErrorCode, GoodbyeCode, OriginError};
use shmbus_proto::subject::{validate_pattern, validate_subject, SubjectError};
use shmbus_proto::sys::memfd::MemfdError;

/// A subject, pattern or name that is not valid, and why: the text as
/// given, so an error message repeats it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{subject:?}: {reason}")]
pub struct BadSubject {
    /// The subject, pattern or name as the caller gave it.
    pub subject: String,
    /// What is wrong with it.
    pub reason: SubjectError,
}

/// [`validate_subject`], with the subject in the error.
pub(crate) fn check_subject(subject: &str) -> Result<(), BadSubject> {
    validate_subject(subject).map_err(|reason| BadSubject { subject: subject.to_owned(), reason })
}

/// [`validate_pattern`], with the pattern in the error.
pub(crate) fn check_pattern(pattern: &str) -> Result<(), BadSubject> {
    validate_pattern(pattern).map_err(|reason| BadSubject { subject: pattern.to_owned(), reason })
}

/// The class of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller passed something invalid (a subject, a size).
    InvalidInput,
    /// The broker's policy, or ours about the broker, said no.
    Denied,
    /// A limit was reached.
    LimitExceeded,
    /// The connection is gone.
    Disconnected,
    /// No broker could be reached at the address: nothing listens there,
    /// there is no socket file, or its permissions do not admit this user.
    Unreachable,
    /// A deadline passed.
    Timeout,
    /// The broker ran short of a resource of its own (file descriptors,
    /// memory). Not the caller's doing: retrying later may succeed.
    Unavailable,
    /// The peer broke the protocol.
    Protocol,
    /// An operating-system error.
    Io,
    /// No service answers the name: nobody owns it, or its owner went
    /// away with the request unanswered.
    NoResponder,
    /// The service answered with an application error.
    Application,
}

/// Why the connection ended, as far as we know.
///
/// An error carrying one means the connection is gone: closed for good
/// (reconnection off with [`ReconnectPolicy::never`](crate::ReconnectPolicy::never),
/// the policy gave up, or the broker said not to come back), or lost
/// while the operation waited (a request whose answer was due on it, a
/// send that waited out the client's timeout for a reconnection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// The broker's reason code, when it sent a goodbye.
    pub code: Option<GoodbyeCode>,
    /// The broker's words from its goodbye, or this client's account of
    /// how the connection ended (a reset, giving up on reconnecting).
    pub reason: String,
}

impl fmt::Display for Disconnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "disconnected by the broker: {}: {}", goodbye_text(code), self.reason),
            None => write!(f, "disconnected: {}", self.reason),
        }
    }
}

impl Disconnect {
    fn kind(&self) -> ErrorKind {
        match self.code {
            Some(GoodbyeCode::Denied) => ErrorKind::Denied,
            Some(GoodbyeCode::ProtocolViolation | GoodbyeCode::VersionMismatch) => ErrorKind::Protocol,
            Some(GoodbyeCode::LimitExceeded | GoodbyeCode::SlowConsumer) => ErrorKind::LimitExceeded,
            Some(GoodbyeCode::HelloTimeout) => ErrorKind::Timeout,
            Some(GoodbyeCode::Shutdown) | None => ErrorKind::Disconnected,
        }
    }
}

/// Why the broker said goodbye, for people.
fn goodbye_text(code: GoodbyeCode) -> &'static str {
    match code {
        GoodbyeCode::Denied => "the broker's policy does not admit this client",
        GoodbyeCode::ProtocolViolation => "the broker says this client broke the protocol",
        GoodbyeCode::VersionMismatch => "the broker speaks another protocol version",
        GoodbyeCode::SlowConsumer => "a subscription with the Disconnect overflow policy fell too far behind",
        GoodbyeCode::Shutdown => "the broker is shutting down",
        GoodbyeCode::LimitExceeded => "a resource limit of the connection was exceeded",
        GoodbyeCode::HelloTimeout => "this client did not say Hello within the broker's deadline",
    }
}

/// What an [`ErrorCode`] means, for people.
pub(crate) fn code_text(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::InvalidSubject => "invalid subject or pattern",
        ErrorCode::Denied => "denied by the broker's policy",
        ErrorCode::LimitExceeded => "a limit or quota was reached",
        ErrorCode::FdRefused => "the attached fd is refused",
        ErrorCode::PayloadTooLarge => "the payload is too large",
        ErrorCode::UnknownSubscription => "no such subscription",
        ErrorCode::DuplicateSubscription => "that subscription id is already in use",
        ErrorCode::Unsupported => "not supported by this broker",
        ErrorCode::NotMemfd => "the attached fd is not a memfd",
        ErrorCode::NotSealed => "the memfd lacks a required seal",
        ErrorCode::SizeMismatch => "the memfd's size is not the declared length",
        ErrorCode::WrongFdCount => "wrong number of fds attached",
        ErrorCode::ChannelBusy => "the channel already has a publisher",
        ErrorCode::NoSuchChannel => "no channel with a publisher on that topic",
        ErrorCode::BrokerResource => {
            "the broker ran short of file descriptors or memory; not your fault, retry later"
        }
        ErrorCode::NoSuchRequest => {
            "no request waits for that reply (answered, timed out, or its caller left)"
        }
        ErrorCode::ReservedName => "that name is reserved",
        ErrorCode::InvalidOrigin => "invalid origin (1 to 256 bytes, no control characters)",
    }
}

/// A refusal as people read it: what the code means, then the broker's
/// own words when it gave some.
pub(crate) struct Refusal<'a>(pub ErrorCode, pub &'a str);

impl fmt::Display for Refusal<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(code_text(self.0))?;
        if !self.1.is_empty() {
            write!(f, " ({})", self.1)?;
        }
        Ok(())
    }
}

pub(crate) fn code_kind(code: ErrorCode) -> ErrorKind {
    match code {
        ErrorCode::InvalidSubject | ErrorCode::PayloadTooLarge | ErrorCode::InvalidOrigin => {
            ErrorKind::InvalidInput
        }
        ErrorCode::Denied
        | ErrorCode::FdRefused
        | ErrorCode::NotMemfd
        | ErrorCode::NotSealed
        | ErrorCode::SizeMismatch
        | ErrorCode::WrongFdCount => ErrorKind::Denied,
        ErrorCode::LimitExceeded => ErrorKind::LimitExceeded,
        ErrorCode::BrokerResource => ErrorKind::Unavailable,
        ErrorCode::UnknownSubscription
        | ErrorCode::DuplicateSubscription
        | ErrorCode::Unsupported
        | ErrorCode::ChannelBusy
        | ErrorCode::NoSuchChannel
        | ErrorCode::NoSuchRequest => ErrorKind::InvalidInput,
        ErrorCode::ReservedName => ErrorKind::Denied,
    }
}

/// Why connecting ([`Client::connect`](crate::Client::connect) and the
/// other ways to connect) gave no [`Client`](crate::Client).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The bus address (the one given, or `$SHMBUS_ADDRESS`) is not a
    /// valid address. Fix it: retrying does not help.
    #[error("bad bus address: {0}")]
    Address(#[from] AddressError),
    /// Connecting to the address failed (nothing listens there, no socket
    /// file, no permission); the message says what to do. Retrying helps
    /// once a broker listens there.
    #[error("{}", UnreachableText(address, source))]
    Unreachable {
        /// The address, as written.
        address: String,
        /// What connecting to it failed with.
        source: io::Error,
    },
    /// The process listening at the address runs as a uid this client
    /// does not trust (not root, not our own, not one added with
    /// [`ConnectOptions::trust_broker_uid`](crate::ConnectOptions::trust_broker_uid));
    /// nothing was sent to it. Retrying does not help while it holds the
    /// address.
    #[error("refusing to trust the broker at {address}: it runs as uid {uid} (pid {pid}), not root or our own uid")]
    UntrustedBroker {
        /// The address, as written.
        address: String,
        /// The uid the listening process runs as.
        uid: u32,
        /// Its pid.
        pid: u32,
    },
    /// The broker said goodbye during the handshake (its policy does not
    /// admit this client, another protocol version, shutting down...);
    /// [`Disconnect::code`] says which. Retrying helps when the cause
    /// passes (a broker shutting down, a connection limit), not for a
    /// refusal by policy or a version mismatch.
    #[error("the broker refused the connection: {0}")]
    Refused(Disconnect),
    /// The broker did not finish the handshake within the connection's
    /// timeout (the duration). A busy broker may answer a later try.
    #[error("no answer to the handshake within {0:?}")]
    Timeout(std::time::Duration),
    /// The broker's side of the handshake made no sense (an unexpected or
    /// malformed frame, an unusable shared-memory link); the string says
    /// what. Likely a mismatched broker: retrying rarely helps.
    #[error("protocol error during the handshake: {0}")]
    Protocol(String),
    /// An operating-system error while reading the broker's credentials
    /// or its handshake.
    #[error("i/o error during the handshake: {0}")]
    Io(#[from] io::Error),
}

/// Why a connect failed, and what to do about it, for people.
struct UnreachableText<'a>(&'a str, &'a io::Error);

impl fmt::Display for UnreachableText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let UnreachableText(address, e) = *self;
        let start = format!("start one with `shmbusd --address {address}`, or give the client the bus's address (--address, $SHMBUS_ADDRESS)");
        let is_abstract = address.starts_with('@');
        match e.kind() {
            io::ErrorKind::ConnectionRefused if is_abstract => {
                write!(f, "no broker listens at {address} (connection refused): {start}")
            }
            io::ErrorKind::ConnectionRefused => write!(
                f,
                "the socket file {address} exists but no broker listens on it (connection refused; a broker that \
                 stopped leaves it behind): {start}"
            ),
            io::ErrorKind::NotFound => {
                write!(f, "there is no socket file {address} (no such file or directory): {start}")?;
                if !address.contains('/') {
                    write!(f, ". An abstract address, as the default ones are, starts with '@': did you mean @{address}?")?;
                }
                Ok(())
            }
            io::ErrorKind::PermissionDenied => write!(
                f,
                "permission denied connecting to {address}: the socket file's mode or group does not admit \
                 this user (the broker sets them with --socket-mode and --socket-group)"
            ),
            _ => write!(f, "cannot reach the bus at {address}: {e}"),
        }
    }
}

impl ConnectError {
    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ConnectError::Address(_) => ErrorKind::InvalidInput,
            ConnectError::Unreachable { .. } => ErrorKind::Unreachable,
            ConnectError::UntrustedBroker { .. } => ErrorKind::Denied,
            ConnectError::Refused(d) => d.kind(),
            ConnectError::Timeout(_) => ErrorKind::Timeout,
            ConnectError::Protocol(_) => ErrorKind::Protocol,
            ConnectError::Io(_) => ErrorKind::Io,
        }
    }
}

/// Why a publish ([`Client::publish`](crate::Client::publish) and its
/// kin) failed on this side. A refusal by the broker comes later, from
/// [`Client::flush`](crate::Client::flush) as a [`PublishRefused`].
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The topic is not a valid subject. Nothing was sent.
    #[error("invalid subject: {0}")]
    InvalidSubject(#[from] BadSubject),
    /// The origin is not 1 to 256 bytes without control characters.
    /// Nothing was sent.
    #[error("invalid origin: {0}")]
    InvalidOrigin(#[from] OriginError),
    /// The fd passed to [`Client::publish_fd`](crate::Client::publish_fd)
    /// is not a memfd with the required seals. Nothing was sent.
    #[error("the payload fd is refused: {0}")]
    Fd(#[from] MemfdError),
    /// Creating, filling or sealing the memfd for a large payload (or
    /// sealing a [`Loan`](crate::Loan)) failed, e.g. out of memory or fds.
    /// Nothing was sent.
    #[error("cannot put the payload in a memfd: {0}")]
    Memfd(io::Error),
    /// A payload for a path that only sends inline
    /// ([`Client::publish_many`](crate::Client::publish_many)) is over the
    /// broker's inline limit; publish it alone, which uses a memfd.
    #[error("payload of {len} bytes is over the {max}-byte inline limit")]
    PayloadTooLarge {
        /// The payload's length, in bytes.
        len: usize,
        /// The broker's inline limit, in bytes.
        max: usize,
    },
    /// [`Client::publish_value`](crate::Client::publish_value) could not
    /// encode the value with postcard; the string says why.
    #[error("cannot encode the value: {0}")]
    Encode(String),
    /// The connection to the broker ended; the [`Disconnect`] says why.
    /// With reconnection on (the default) a later try may succeed once the
    /// client has reconnected; if it is closed for good (see
    /// [`Disconnect`]), connect anew.
    #[error("{0}")]
    Disconnected(Disconnect),
    /// Sending failed with an operating-system error other than a lost
    /// connection.
    #[error("send failed: {0}")]
    Io(#[from] io::Error),
}

impl PublishError {
    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PublishError::InvalidSubject(_)
            | PublishError::InvalidOrigin(_)
            | PublishError::PayloadTooLarge { .. }
            | PublishError::Encode(_)
            | PublishError::Fd(_) => ErrorKind::InvalidInput,
            PublishError::Memfd(_) => ErrorKind::Io,
            PublishError::Disconnected(d) => d.kind(),
            PublishError::Io(_) => ErrorKind::Io,
        }
    }
}

/// Why a subscription ([`Client::subscribe`](crate::Client::subscribe),
/// [`Client::monitor`](crate::Client::monitor)) was not made.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// The pattern is not a valid subject pattern. Nothing was sent.
    #[error("invalid pattern: {0}")]
    InvalidPattern(#[from] BadSubject),
    /// The broker refused the subscription (its policy, a quota; or every
    /// subscription id of this connection is in use). Retrying helps only
    /// for a passing shortage (`code` [`ErrorCode::BrokerResource`], or a
    /// limit since freed).
    #[error("the broker refused the subscription: {}", Refusal(*code, message))]
    Refused {
        /// The broker's reason.
        code: ErrorCode,
        /// The broker's own words; may be empty.
        message: String,
    },
    /// The broker did not acknowledge within the client's timeout (the
    /// duration). The subscription is taken back, so retrying is safe.
    #[error("no acknowledgement within {0:?}")]
    Timeout(std::time::Duration),
    /// The connection to the broker ended; the [`Disconnect`] says why.
    /// With reconnection on (the default) a later try may succeed once the
    /// client has reconnected; if it is closed for good (see
    /// [`Disconnect`]), connect anew.
    #[error("{0}")]
    Disconnected(Disconnect),
    /// An operating-system error on the connection (or a subscribe frame
    /// that could not be encoded).
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl SubscribeError {
    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SubscribeError::InvalidPattern(_) => ErrorKind::InvalidInput,
            SubscribeError::Refused { code, .. } => code_kind(*code),
            SubscribeError::Timeout(_) => ErrorKind::Timeout,
            SubscribeError::Disconnected(d) => d.kind(),
            SubscribeError::Io(_) => ErrorKind::Io,
        }
    }
}

/// Why a receive (from a [`Subscription`](crate::Subscription) or a
/// [`Service`](crate::Service)) yielded nothing. The handle's iterator
/// (and stream, in the async API) stops after yielding one.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    /// The connection to the broker ended for good (reconnection off, the
    /// policy gave up, or the broker said not to come back); the
    /// [`Disconnect`] says why. Connect anew.
    #[error("{0}")]
    Disconnected(Disconnect),
    /// Reading the connection failed with an operating-system error other
    /// than a lost connection.
    #[error("receive failed: {0}")]
    Io(#[from] io::Error),
    /// The broker ended this subscription (or the name this service
    /// served) because a reloaded policy no longer allows it; the string
    /// is the broker's reason. Whatever came before is taken first; then
    /// every receive fails with this, and nothing more will come.
    #[error("revoked by the broker: {0}")]
    Revoked(String),
}

impl RecvError {
    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RecvError::Disconnected(d) => d.kind(),
            RecvError::Io(_) => ErrorKind::Io,
            RecvError::Revoked(_) => ErrorKind::Denied,
        }
    }
}

/// Why a [`crate::Monitor`] yielded no item.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// The broker sent an event this client cannot read (its payload is
    /// not a monitor event). Only this one event is lost: the monitor goes
    /// on, and its iterator does not end here.
    #[error("monitor event #{seq} cannot be read: {detail}")]
    Malformed {
        /// The event's number, as [`BusEvent::seq`](crate::BusEvent::seq).
        seq: u64,
        /// What is wrong with it.
        detail: String,
    },
    /// The broker ended the monitor because a reloaded policy no longer
    /// gives this client the `monitor` right; the string is its reason.
    /// Every receive fails with this once the events before it are taken.
    #[error("the monitor was revoked by the broker: {0}")]
    Revoked(String),
    /// The connection to the broker ended for good; the [`Disconnect`]
    /// says why. Connect anew and start another monitor.
    #[error("{0}")]
    Disconnected(Disconnect),
    /// Reading the connection failed with an operating-system error other
    /// than a lost connection.
    #[error("receive failed: {0}")]
    Io(#[from] io::Error),
}

impl MonitorError {
    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            MonitorError::Malformed { .. } => ErrorKind::Protocol,
            MonitorError::Revoked(_) => ErrorKind::Denied,
            MonitorError::Disconnected(d) => d.kind(),
            MonitorError::Io(_) => ErrorKind::Io,
        }
    }

    /// Whether the monitor is over: every error but a malformed event.
    pub fn ends_monitor(&self) -> bool {
        !matches!(self, MonitorError::Malformed { .. })
    }
}

impl From<RecvError> for MonitorError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Disconnected(d) => MonitorError::Disconnected(d),
            RecvError::Io(e) => MonitorError::Io(e),
            RecvError::Revoked(r) => MonitorError::Revoked(r),
        }
    }
}

/// A revocation where the operation cannot meet one (sending, waiting for
/// an answer: only a subscription's or a service's receive is ever told
/// of one), as an i/o error rather than a panic.
pub(crate) fn stray_revocation(reason: String) -> io::Error {
    io::Error::other(format!("revoked by the broker: {reason}"))
}

/// Why a question to the broker (a ping, [`Client::flush`](crate::Client::flush),
/// an introspection query such as [`Client::clients`](crate::Client::clients),
/// a name query, a policy check) got no answer.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The broker refused the question (e.g. [`ErrorCode::Denied`] without
    /// the `introspect` right), or this client could not ask it (every
    /// request id in use, an invalid name) or make sense of the answer.
    #[error("the broker refused: {}", Refusal(*code, message))]
    Refused {
        /// The reason.
        code: ErrorCode,
        /// The broker's (or this client's) own words; may be empty.
        message: String,
    },
    /// No answer within the client's timeout (the duration); a busy broker
    /// may answer a later try.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The connection to the broker ended; the [`Disconnect`] says why.
    /// With reconnection on (the default) a later try may succeed once the
    /// client has reconnected; if it is closed for good (see
    /// [`Disconnect`]), connect anew.
    #[error("{0}")]
    Disconnected(Disconnect),
    /// An operating-system error on the connection other than a lost
    /// connection.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl RequestError {
    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RequestError::Refused { code, .. } => code_kind(*code),
            RequestError::Timeout(_) => ErrorKind::Timeout,
            RequestError::Disconnected(d) => d.kind(),
            RequestError::Io(_) => ErrorKind::Io,
        }
    }
}

/// A publish the broker refused after it was sent (publishing does not
/// wait for the broker; [`crate::Client::flush`] collects these).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("publish #{seq} refused: {}", Refusal(*code, message))]
pub struct PublishRefused {
    /// The publish's number on this connection (1 for the first).
    pub seq: u64,
    /// The broker's reason.
    pub code: ErrorCode,
    /// The broker's own words; may be empty.
    pub message: String,
}

/// Refusals a flush reports: the first [`MAX_REFUSALS`] since the last
/// flush, in the order sent (as a slice: `r[0]`, `r.len()`, `r.iter()`),
/// and how many more there were. The client keeps no more than that for
/// a flush that may never come (an app that only sends); the rest are
/// counted, not kept, and not lost silently.
#[derive(Debug, Clone)]
pub struct Refusals<T> {
    /// The first [`MAX_REFUSALS`], in the order sent.
    pub kept: Vec<T>,
    /// Refusals past the first [`MAX_REFUSALS`], counted only.
    pub more: u64,
}

/// The most refusals of each kind the client keeps between two flushes.
pub const MAX_REFUSALS: usize = 4096;

impl<T> Refusals<T> {
    /// All refusals, kept and counted.
    pub fn total(&self) -> u64 {
        self.kept.len() as u64 + self.more
    }
}

impl<T> std::ops::Deref for Refusals<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.kept
    }
}

/// What [`Client::flush`](crate::Client::flush) reports: refusals of
/// what was sent without waiting, or why the flush itself failed.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// Publishes the broker refused since the last flush, in the order
    /// sent (never empty). They are not retried: publish them again if
    /// the cause is gone.
    #[error("{} publish(es) refused; first: {}", .0.total(), .0[0])]
    Refused(Refusals<PublishRefused>),
    /// Fire-and-forget sends the broker could not deliver, in the order
    /// sent. When publishes were refused too, one flush reports those and
    /// the next one these.
    #[error("{} send(s) refused; first: {}", .0.total(), .0[0])]
    SendsRefused(Refusals<SendRefused>),
    /// The flush's own round trip to the broker failed; refusals, if any,
    /// stay for the next flush.
    #[error(transparent)]
    Request(#[from] RequestError),
}

impl FlushError {
    /// The class of the error (for a list of refusals, that of the
    /// first).
    pub fn kind(&self) -> ErrorKind {
        match self {
            FlushError::Refused(r) => code_kind(r[0].code),
            FlushError::SendsRefused(r) => r[0].error.kind(),
            FlushError::Request(e) => e.kind(),
        }
    }
}

impl From<RecvError> for PublishError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Disconnected(d) => PublishError::Disconnected(d),
            RecvError::Io(e) => PublishError::Io(e),
            RecvError::Revoked(r) => PublishError::Io(stray_revocation(r)),
        }
    }
}

impl From<RecvError> for RequestError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Disconnected(d) => RequestError::Disconnected(d),
            RecvError::Io(e) => RequestError::Io(e),
            RecvError::Revoked(r) => RequestError::Io(stray_revocation(r)),
        }
    }
}

impl From<RecvError> for SubscribeError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Disconnected(d) => SubscribeError::Disconnected(d),
            RecvError::Io(e) => SubscribeError::Io(e),
            RecvError::Revoked(r) => SubscribeError::Io(stray_revocation(r)),
        }
    }
}

/// Why [`Client::loan`](crate::Client::loan) gave no [`Loan`](crate::Loan).
#[derive(Debug, thiserror::Error)]
pub enum LoanError {
    /// Creating or sizing the memfd failed (out of memory, out of fds,
    /// a size the system refuses).
    #[error("cannot create a memfd: {0}")]
    Create(io::Error),
    /// Mapping the memfd into this process failed (out of address space).
    #[error("cannot map the memfd: {0}")]
    Map(io::Error),
}

impl LoanError {
    /// The class of the error: always [`ErrorKind::Io`].
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Io
    }
}

/// Why a name operation ([`crate::Client::request_name`],
/// [`crate::Client::release_name`]) failed. What became of the name (owned,
/// queued, taken by another) is not an error: it is the `Ok`
/// [`NameResult`](crate::NameResult).
#[derive(Debug, thiserror::Error)]
pub enum NameError {
    /// The name is not a valid subject. Nothing was sent.
    #[error("invalid name: {0}")]
    InvalidName(#[from] BadSubject),
    /// The broker refused the operation: its policy, a reserved name, a
    /// quota. Retrying helps only for a passing shortage.
    #[error("the broker refused: {}", Refusal(*code, message))]
    Refused {
        /// The broker's reason.
        code: ErrorCode,
        /// The broker's own words; may be empty.
        message: String,
    },
    /// No answer within the client's timeout (the duration). A name
    /// request that timed out is taken back, so retrying is safe.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The connection to the broker ended; the [`Disconnect`] says why.
    /// With reconnection on (the default) a later try may succeed once the
    /// client has reconnected; if it is closed for good (see
    /// [`Disconnect`]), connect anew.
    #[error("{0}")]
    Disconnected(Disconnect),
    /// An operating-system error on the connection, or an answer from the
    /// broker that does not fit the question.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl NameError {
    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            NameError::InvalidName(_) => ErrorKind::InvalidInput,
            NameError::Refused { code, .. } => code_kind(*code),
            NameError::Timeout(_) => ErrorKind::Timeout,
            NameError::Disconnected(d) => d.kind(),
            NameError::Io(_) => ErrorKind::Io,
        }
    }
}

impl From<RecvError> for NameError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Disconnected(d) => NameError::Disconnected(d),
            RecvError::Io(e) => NameError::Io(e),
            RecvError::Revoked(r) => NameError::Io(stray_revocation(r)),
        }
    }
}

/// Why [`crate::Client::serve`] gave no [`crate::Service`].
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The name is not a valid subject. Nothing was sent.
    #[error("invalid name: {0}")]
    InvalidName(#[from] BadSubject),
    /// The broker refused the name: its policy, a reserved name, a quota.
    /// Retrying helps only for a passing shortage.
    #[error("the broker refused: {}", Refusal(*code, message))]
    Refused {
        /// The broker's reason.
        code: ErrorCode,
        /// The broker's own words; may be empty.
        message: String,
    },
    /// Another client owns the name, and the flags said not to wait for it
    /// (or it could not be replaced). A shared name asked for as
    /// exclusive, or the other way round, is this too.
    #[error("the name {name} is taken")]
    Exists {
        /// The name asked for.
        name: String,
    },
    /// This client already serves the name (one `Service` per name per
    /// connection).
    #[error("this client already serves {name}")]
    AlreadyServed {
        /// The name asked for.
        name: String,
    },
    /// No answer within the client's timeout (the duration). The request
    /// for the name is taken back, so retrying is safe.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The connection to the broker ended; the [`Disconnect`] says why.
    /// With reconnection on (the default) a later try may succeed once the
    /// client has reconnected; if it is closed for good (see
    /// [`Disconnect`]), connect anew.
    #[error("{0}")]
    Disconnected(Disconnect),
    /// An operating-system error on the connection, or an answer from the
    /// broker that does not fit the question.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl ServeError {
    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ServeError::InvalidName(_) | ServeError::AlreadyServed { .. } => ErrorKind::InvalidInput,
            ServeError::Refused { code, .. } => code_kind(*code),
            ServeError::Exists { .. } => ErrorKind::Denied,
            ServeError::Timeout(_) => ErrorKind::Timeout,
            ServeError::Disconnected(d) => d.kind(),
            ServeError::Io(_) => ErrorKind::Io,
        }
    }
}

impl From<NameError> for ServeError {
    fn from(e: NameError) -> Self {
        match e {
            NameError::InvalidName(e) => ServeError::InvalidName(e),
            NameError::Refused { code, message } => ServeError::Refused { code, message },
            NameError::Timeout(t) => ServeError::Timeout(t),
            NameError::Disconnected(d) => ServeError::Disconnected(d),
            NameError::Io(e) => ServeError::Io(e),
        }
    }
}

/// " for NAME", " of NAME", ...: nothing when the name is not known
/// (a refused send's answer does not repeat it).
macro_rules! name_phrase {
    ($($t:ident => $word:literal),*) => {$(
        struct $t<'a>(&'a str);
        impl fmt::Display for $t<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                if self.0.is_empty() { Ok(()) } else { write!(f, concat!(" ", $word, " {}"), self.0) }
            }
        }
    )*};
}
name_phrase!(For => "for", Of => "of", From_ => "from", To => "to");

/// How a call ([`crate::Client::request`]) ended when it did not end with
/// a reply: one variant per outcome the broker reports, then what can go
/// wrong on this side.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The service name is not a valid subject. Nothing was sent.
    #[error("invalid name: {0}")]
    InvalidName(#[from] BadSubject),
    /// The origin is not 1 to 256 bytes without control characters.
    /// Nothing was sent.
    #[error("invalid origin: {0}")]
    InvalidOrigin(#[from] OriginError),
    /// Nobody owns the name.
    #[error("no responder{}", For(name))]
    NoResponder {
        /// The service name called (empty in a [`SendRefused`]).
        name: String,
    },
    /// The service went away (disconnected, crashed) with the request
    /// unanswered.
    #[error("the service{} went away without answering", Of(name))]
    ResponderGone {
        /// The service name called.
        name: String,
    },
    /// No answer within the call's timeout. The broker enforces it and
    /// answers this; the client gives up on its own only if the broker has
    /// not answered a grace period later (the connection's timeout).
    #[error("no answer{} within {timeout:?}", From_(name))]
    Timeout {
        /// The service name called.
        name: String,
        /// The call's timeout.
        timeout: std::time::Duration,
    },
    /// The broker's policy does not let this client call the name.
    #[error("call{} denied: {message}", To(name))]
    Denied {
        /// The service name called (empty in a [`SendRefused`]).
        name: String,
        /// The broker's words; may be empty.
        message: String,
    },
    /// A limit refused the call: this uid's pending requests, the
    /// service's queue in the broker, or the service's own queue (a
    /// service replies [`reply_code::OVERLOADED`](crate::reply_code::OVERLOADED)).
    #[error("call{} refused, a limit was reached: {message}", To(name))]
    LimitExceeded {
        /// The service name called (empty in a [`SendRefused`]).
        name: String,
        /// The broker's or the service's words; may be empty.
        message: String,
    },
    /// The service answered with an application error.
    #[error("the service{} answered error {code}: {message}", Of(name))]
    App {
        /// The service name called.
        name: String,
        /// The service's error code (see [`reply_code`](crate::reply_code)
        /// for the codes the library itself uses).
        code: u32,
        /// The service's message.
        message: String,
    },
    /// The broker refused the request or the service's reply as malformed
    /// (a bad name, a bad fd).
    #[error("call{} refused as invalid: {message}", To(name))]
    Invalid {
        /// The service name called (empty in a [`SendRefused`]).
        name: String,
        /// The broker's words; may be empty.
        message: String,
    },
    /// The payload could not be put in a memfd.
    #[error("cannot put the payload in a memfd: {0}")]
    Memfd(io::Error),
    /// The answer was already taken from this [`crate::PendingCall`].
    #[error("the answer to this call was already taken")]
    AlreadyTaken,
    /// The connection to the broker ended, or was lost while the answer
    /// was due (a call is never sent again behind the caller's back); the
    /// [`Disconnect`] says why. The service may or may not have handled
    /// the request: retry only what is safe to repeat.
    #[error("{0}")]
    Disconnected(Disconnect),
    /// An operating-system error on the connection other than a lost
    /// connection.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl CallError {
    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CallError::InvalidName(_)
            | CallError::InvalidOrigin(_)
            | CallError::Invalid { .. }
            | CallError::AlreadyTaken => ErrorKind::InvalidInput,
            CallError::NoResponder { .. } | CallError::ResponderGone { .. } => ErrorKind::NoResponder,
            CallError::Timeout { .. } => ErrorKind::Timeout,
            CallError::Denied { .. } => ErrorKind::Denied,
            CallError::LimitExceeded { .. } => ErrorKind::LimitExceeded,
            CallError::App { .. } => ErrorKind::Application,
            CallError::Memfd(_) | CallError::Io(_) => ErrorKind::Io,
            CallError::Disconnected(d) => d.kind(),
        }
    }
}

impl CallError {
    /// Fills in the name of the call where the broker's answer left it
    /// out.
    pub(crate) fn named(mut self, call: &str) -> CallError {
        match &mut self {
            CallError::NoResponder { name }
            | CallError::ResponderGone { name }
            | CallError::Timeout { name, .. }
            | CallError::Denied { name, .. }
            | CallError::LimitExceeded { name, .. }
            | CallError::App { name, .. }
            | CallError::Invalid { name, .. }
                if name.is_empty() =>
            {
                call.clone_into(name)
            }
            _ => {}
        }
        self
    }
}

impl From<RecvError> for CallError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Disconnected(d) => CallError::Disconnected(d),
            RecvError::Io(e) => CallError::Io(e),
            RecvError::Revoked(r) => CallError::Io(stray_revocation(r)),
        }
    }
}

/// A fire-and-forget [`crate::Client::send`] the broker could not deliver
/// (sending does not wait for the broker; [`crate::Client::flush`]
/// collects these).
#[derive(Debug, thiserror::Error)]
#[error("send #{seq} refused: {error}")]
pub struct SendRefused {
    /// The number `send` returned (1 for the first send on this
    /// connection).
    pub seq: u64,
    /// Why: [`CallError::NoResponder`], [`CallError::LimitExceeded`],
    /// [`CallError::Denied`] or [`CallError::Invalid`]. The broker does
    /// not repeat the name in its answer, so `name` in it is empty.
    pub error: CallError,
}

/// Why a [`crate::Request`] could not be answered. The request is then
/// answered with an error instead (see [`crate::Request`]), so its caller
/// still gets exactly one answer.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    /// The fd given as the reply's payload is not a memfd with the
    /// required seals.
    #[error("the payload fd is refused: {0}")]
    Fd(#[from] MemfdError),
    /// Creating, filling or sealing the memfd for a large reply (or
    /// sealing a [`Loan`](crate::Loan)) failed, e.g. out of memory or fds.
    #[error("cannot put the payload in a memfd: {0}")]
    Memfd(io::Error),
    /// The connection to the broker ended; the [`Disconnect`] says why.
    /// The broker answers the caller itself then.
    #[error("{0}")]
    Disconnected(Disconnect),
    /// Sending failed with an operating-system error other than a lost
    /// connection.
    #[error("send failed: {0}")]
    Io(#[from] io::Error),
}

impl ReplyError {
    /// The class of the error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ReplyError::Fd(_) => ErrorKind::InvalidInput,
            ReplyError::Memfd(_) | ReplyError::Io(_) => ErrorKind::Io,
            ReplyError::Disconnected(d) => d.kind(),
        }
    }
}

impl From<RecvError> for ReplyError {
    fn from(e: RecvError) -> Self {
        match e {
            RecvError::Disconnected(d) => ReplyError::Disconnected(d),
            RecvError::Io(e) => ReplyError::Io(e),
            RecvError::Revoked(r) => ReplyError::Io(stray_revocation(r)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_shortage_says_whose_fault_it_is() {
        let e = RequestError::Refused { code: ErrorCode::BrokerResource, message: "EMFILE".into() };
        assert_eq!(
            e.to_string(),
            "the broker refused: the broker ran short of file descriptors or memory; \
             not your fault, retry later (EMFILE)"
        );
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        let e = SubscribeError::Refused { code: ErrorCode::Denied, message: String::new() };
        assert_eq!(e.to_string(), "the broker refused the subscription: denied by the broker's policy");
    }

    #[test]
    fn subject_errors_repeat_the_subject() {
        let e = PublishError::from(check_subject("a..b").unwrap_err());
        assert_eq!(
            e.to_string(),
            "invalid subject: \"a..b\": subject has an empty token (leading, trailing or doubled '.')"
        );
        let e = SubscribeError::from(check_pattern("a.>.b").unwrap_err());
        assert!(e.to_string().contains("\"a.>.b\""), "{e}");
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn an_unreachable_bus_says_what_to_do() {
        let e = |address: &str, kind: io::ErrorKind| ConnectError::Unreachable {
            address: address.into(),
            source: io::Error::from(kind),
        };
        let refused = e("@nope", io::ErrorKind::ConnectionRefused);
        assert_eq!(refused.kind(), ErrorKind::Unreachable);
        let text = refused.to_string();
        assert!(text.starts_with("no broker listens at @nope"), "{text}");
        assert!(text.contains("shmbusd --address @nope"), "{text}");
        let text = e("nope", io::ErrorKind::NotFound).to_string();
        assert!(text.contains("no socket file nope") && text.contains("did you mean @nope?"), "{text}");
        let text = e("/run/x.sock", io::ErrorKind::NotFound).to_string();
        assert!(!text.contains("did you mean"), "{text}");
        let text = e("/run/x.sock", io::ErrorKind::PermissionDenied).to_string();
        assert!(text.contains("--socket-mode"), "{text}");
    }

    #[test]
    fn a_late_hello_is_a_timeout() {
        let d = Disconnect { code: Some(GoodbyeCode::HelloTimeout), reason: "no Hello in 5s".into() };
        assert_eq!(ConnectError::Refused(d.clone()).kind(), ErrorKind::Timeout);
        assert_eq!(
            d.to_string(),
            "disconnected by the broker: this client did not say Hello within the broker's deadline: \
             no Hello in 5s"
        );
    }
}
