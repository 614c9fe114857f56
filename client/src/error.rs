//! Errors, one enum per operation, each with a [`ErrorKind`] so callers
//! can branch on the class without matching every variant.

use std::fmt;
use std::io;

use shmbus_proto::address::AddressError;
use shmbus_proto::frame::{ErrorCode, GoodbyeCode, OriginError};
use shmbus_proto::subject::SubjectError;
use shmbus_proto::sys::memfd::MemfdError;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disconnect {
    /// The broker's reason code, when it sent a goodbye.
    pub code: Option<GoodbyeCode>,
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

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("bad bus address: {0}")]
    Address(#[from] AddressError),
    /// Connecting to the address failed; the message says what to do.
    #[error("{}", UnreachableText(address, source))]
    Unreachable { address: String, source: io::Error },
    #[error("refusing to trust the broker at {address}: it runs as uid {uid} (pid {pid}), not root or our own uid")]
    UntrustedBroker { address: String, uid: u32, pid: u32 },
    #[error("the broker refused the connection: {0}")]
    Refused(Disconnect),
    #[error("no answer to the handshake within {0:?}")]
    Timeout(std::time::Duration),
    #[error("protocol error during the handshake: {0}")]
    Protocol(String),
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

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("invalid subject: {0}")]
    InvalidSubject(#[from] SubjectError),
    #[error("invalid origin: {0}")]
    InvalidOrigin(#[from] OriginError),
    #[error("the payload fd is refused: {0}")]
    Fd(#[from] MemfdError),
    #[error("cannot put the payload in a memfd: {0}")]
    Memfd(io::Error),
    #[error("payload of {len} bytes is over the {max}-byte inline limit")]
    PayloadTooLarge { len: usize, max: usize },
    #[error("cannot encode the value: {0}")]
    Encode(String),
    #[error("{0}")]
    Disconnected(Disconnect),
    #[error("send failed: {0}")]
    Io(#[from] io::Error),
}

impl PublishError {
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

#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("invalid pattern: {0}")]
    InvalidPattern(#[from] SubjectError),
    #[error("the broker refused the subscription: {}", Refusal(*code, message))]
    Refused { code: ErrorCode, message: String },
    #[error("no acknowledgement within {0:?}")]
    Timeout(std::time::Duration),
    #[error("{0}")]
    Disconnected(Disconnect),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl SubscribeError {
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

#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("{0}")]
    Disconnected(Disconnect),
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
    Malformed { seq: u64, detail: String },
    /// The broker ended the monitor because a reloaded policy no longer
    /// gives this client the `monitor` right; the string is its reason.
    /// Every receive fails with this once the events before it are taken.
    #[error("the monitor was revoked by the broker: {0}")]
    Revoked(String),
    #[error("{0}")]
    Disconnected(Disconnect),
    #[error("receive failed: {0}")]
    Io(#[from] io::Error),
}

impl MonitorError {
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

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the broker refused: {}", Refusal(*code, message))]
    Refused { code: ErrorCode, message: String },
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("{0}")]
    Disconnected(Disconnect),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl RequestError {
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
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("{} publish(es) refused; first: {}", .0.len(), .0[0])]
    Refused(Vec<PublishRefused>),
    /// Fire-and-forget sends the broker could not deliver, in the order
    /// sent. When publishes were refused too, one flush reports those and
    /// the next one these.
    #[error("{} send(s) refused; first: {}", .0.len(), .0[0])]
    SendsRefused(Vec<SendRefused>),
    #[error(transparent)]
    Request(#[from] RequestError),
}

impl FlushError {
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

#[derive(Debug, thiserror::Error)]
pub enum LoanError {
    #[error("cannot create a memfd: {0}")]
    Create(io::Error),
    #[error("cannot map the memfd: {0}")]
    Map(io::Error),
}

impl LoanError {
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
    #[error("invalid name: {0}")]
    InvalidName(#[from] SubjectError),
    #[error("the broker refused: {}", Refusal(*code, message))]
    Refused { code: ErrorCode, message: String },
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("{0}")]
    Disconnected(Disconnect),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl NameError {
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
    #[error("invalid name: {0}")]
    InvalidName(#[from] SubjectError),
    #[error("the broker refused: {}", Refusal(*code, message))]
    Refused { code: ErrorCode, message: String },
    /// Another client owns the name, and the flags said not to wait for it
    /// (or it could not be replaced). A shared name asked for as
    /// exclusive, or the other way round, is this too.
    #[error("the name {name} is taken")]
    Exists { name: String },
    /// This client already serves the name (one `Service` per name per
    /// connection).
    #[error("this client already serves {name}")]
    AlreadyServed { name: String },
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    #[error("{0}")]
    Disconnected(Disconnect),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl ServeError {
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
    #[error("invalid name: {0}")]
    InvalidName(#[from] SubjectError),
    #[error("invalid origin: {0}")]
    InvalidOrigin(#[from] OriginError),
    /// Nobody owns the name.
    #[error("no responder{}", For(name))]
    NoResponder { name: String },
    /// The service went away (disconnected, crashed) with the request
    /// unanswered.
    #[error("the service{} went away without answering", Of(name))]
    ResponderGone { name: String },
    /// No answer within the call's timeout. The broker enforces it and
    /// answers this; the client gives up on its own only if the broker has
    /// not answered a grace period later (the connection's timeout).
    #[error("no answer{} within {timeout:?}", From_(name))]
    Timeout { name: String, timeout: std::time::Duration },
    /// The broker's policy does not let this client call the name.
    #[error("call{} denied: {message}", To(name))]
    Denied { name: String, message: String },
    /// A limit refused the call: this uid's pending requests, the
    /// service's queue in the broker, or the service's own queue (a
    /// service replies [`reply_code::OVERLOADED`](crate::reply_code::OVERLOADED)).
    #[error("call{} refused, a limit was reached: {message}", To(name))]
    LimitExceeded { name: String, message: String },
    /// The service answered with an application error.
    #[error("the service{} answered error {code}: {message}", Of(name))]
    App { name: String, code: u32, message: String },
    /// The broker refused the request or the service's reply as malformed
    /// (a bad name, a bad fd).
    #[error("call{} refused as invalid: {message}", To(name))]
    Invalid { name: String, message: String },
    /// The payload could not be put in a memfd.
    #[error("cannot put the payload in a memfd: {0}")]
    Memfd(io::Error),
    /// The answer was already taken from this [`crate::PendingCall`].
    #[error("the answer to this call was already taken")]
    AlreadyTaken,
    #[error("{0}")]
    Disconnected(Disconnect),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

impl CallError {
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
    #[error("the payload fd is refused: {0}")]
    Fd(#[from] MemfdError),
    #[error("cannot put the payload in a memfd: {0}")]
    Memfd(io::Error),
    #[error("{0}")]
    Disconnected(Disconnect),
    #[error("send failed: {0}")]
    Io(#[from] io::Error),
}

impl ReplyError {
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
