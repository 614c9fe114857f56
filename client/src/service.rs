//! Services: names, calls and their one answer.
//!
//! A *name* (`thermo.kitchen`) is owned by one client at a time, or shared
//! by several (the broker spreads requests among them). A *call* goes to
//! the name's owner through the broker, which keeps a reply slot for it
//! and sends the caller exactly one answer: the reply, the service's
//! application error, or the broker's own (no responder, responder gone,
//! timeout, denied, limit exceeded, invalid).
//!
//! ```no_run
//! use std::time::Duration;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // The service:
//! let client = shmbus::Client::connect()?;
//! let service = client.serve("thermo.kitchen")?;
//! for request in &service {
//!     let request = request?;
//!     let answer = format!("21.5 for pid {}", request.sender().pid);
//!     request.reply(answer.as_bytes())?;
//! }
//! // A caller, elsewhere:
//! let reply = client.request("thermo.kitchen", b"temp?", Duration::from_secs(1))?;
//! println!("{:?}", reply.payload());
//! # Ok(())
//! # }
//! ```
//!
//! On this side:
//! - Calls: a call's id is a u64 counter that never wraps, so a late
//!   answer (for a call given up locally) can never be taken for a newer
//!   call's; it finds no slot and is dropped, closing its memfd. Fire and
//!   forget sends have ids with the top bit set (bit 63 | their number),
//!   so the broker's refusal of one is told apart from a call's answer and
//!   reported by [`Client::flush`]. Waiting is bounded by the call's own
//!   timeout, which the broker enforces, plus a grace period (the
//!   connection's timeout) in case the broker never answers.
//! - Serving: requests for a name are queued per [`Service`], bounded in
//!   requests, bytes and fds like a subscription's queue (the same
//!   [`crate::ConnectOptions`] bounds, counted in the connection's totals
//!   too). A request past a bound is answered at once with
//!   [`reply_code::OVERLOADED`], which its caller sees as
//!   [`CallError::LimitExceeded`] (a fire-and-forget one is dropped and
//!   counted in [`Service::turned_away`]). A request for a name this
//!   client owns but does not serve is answered [`reply_code::NOT_SERVED`].
//!   These answers are sent by whoever reads the socket next, or by the
//!   holder of the send lock as it lets go, like fd acknowledgements: the
//!   reader never waits for the send lock.
//! - Exactly one answer from this side too: a [`Request`] dropped without
//!   an answer (or whose reply could not be sent) is answered
//!   [`reply_code::UNANSWERED`], and so are the requests still queued when
//!   a [`Service`] is dropped. A service that dies outright leaves its
//!   callers to the broker, which answers `ResponderGone`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::error::check_subject;
use shmbus_proto::frame::{
    validate_origin, Answer, ErrorCode, GetNameOwner, NameFlags, NameInfo, NameRelease, NameRequest,
    NameResult, Outcome, PayloadRef, QueryItemBody, QueryKind, Reply as ReplyFrame, ReplyStatus,
    Request as RequestFrame, Sender, Serve,
};
use shmbus_proto::sys::memfd::{self, MemfdError};
use shmbus_proto::sys::mmap::MappedRo;

use crate::client::Client;
use crate::connection::{Charge, Inner, State};
use crate::error::{CallError, NameError, RecvError, ReplyError, RequestError, SendRefused, ServeError};
use crate::loan::Loan;

/// Application error codes this library answers with on a service's
/// behalf. Codes from [`reply_code::RESERVED`] up are the library's; an
/// application should use codes below it.
pub mod reply_code {
    /// The first code reserved for the library.
    pub const RESERVED: u32 = 0xFFFF_0000;
    /// The service did not answer: its [`Request`](crate::Request) was
    /// dropped unanswered, its reply could not be sent, or its
    /// [`Service`](crate::Service) was dropped with the request queued.
    pub const UNANSWERED: u32 = 0xFFFF_0001;
    /// The service's queue in its own process was full, or the request's
    /// memfd could not be received. A caller sees
    /// [`CallError::LimitExceeded`](crate::CallError::LimitExceeded).
    pub const OVERLOADED: u32 = 0xFFFF_0002;
    /// The client owns the name but has no [`Service`](crate::Service)
    /// for it (it asked with `request_name` only, or its service was
    /// dropped and the name not yet released).
    pub const NOT_SERVED: u32 = 0xFFFF_0003;
}

/// Longest application error message sent; longer ones are cut (at a
/// character boundary), so a reply always fits a frame (the broker
/// refuses a longer one).
pub const MAX_ERROR_MESSAGE: usize = shmbus_proto::limits::MAX_ERROR_MESSAGE;

/// Bit 63 of a call id: a fire-and-forget send (bits 0..63: its number).
pub(crate) const SEND_BIT: u64 = 1 << 63;

/// Builders for [`NameFlags`] (a plain struct of the wire protocol; its
/// fields may be set directly too).
///
/// ```
/// use shmbus::{NameFlags, NameFlagsExt};
/// let flags = NameFlags::exclusive().allow_replacement();
/// assert!(flags.allow_replacement && !flags.shared);
/// ```
pub trait NameFlagsExt: Sized {
    /// Exclusive ownership; if the name is taken, wait in its queue.
    fn exclusive() -> Self;
    /// Shared ownership: every client that asks with `shared` serves the
    /// name, and requests are spread among them.
    fn shared() -> Self;
    /// (Owner side) another asker with `replace_existing` may take it.
    fn allow_replacement(self) -> Self;
    /// (Asker side) take the name from an owner that allows it.
    fn replace_existing(self) -> Self;
    /// Do not wait in the queue if the name is taken.
    fn do_not_queue(self) -> Self;
}

impl NameFlagsExt for NameFlags {
    fn exclusive() -> Self {
        NameFlags::default()
    }

    fn shared() -> Self {
        NameFlags { shared: true, ..NameFlags::default() }
    }

    fn allow_replacement(self) -> Self {
        NameFlags { allow_replacement: true, ..self }
    }

    fn replace_existing(self) -> Self {
        NameFlags { replace_existing: true, ..self }
    }

    fn do_not_queue(self) -> Self {
        NameFlags { do_not_queue: true, ..self }
    }
}

/// Who owns a name, from [`Client::name_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameStatus {
    /// The primary owner's client id (of a shared name, its
    /// longest-standing member), if anyone owns it.
    pub owner: Option<u64>,
    /// How many clients share it (1 when exclusive, 0 when unowned).
    pub members: u32,
}

// ------------------------------------------------------------ payloads --

/// A payload that came inline, or as a sealed memfd (checked on arrival,
/// mapped read-only on first read).
#[derive(Debug)]
pub(crate) enum Payload {
    Inline(Vec<u8>),
    Memfd { fd: OwnedFd, len: u64, map: OnceLock<Result<MappedRo, MemfdError>> },
}

impl Payload {
    pub fn memfd(fd: OwnedFd, len: u64) -> Payload {
        Payload::Memfd { fd, len, map: OnceLock::new() }
    }

    fn bytes(&self) -> Result<&[u8], MemfdError> {
        match self {
            Payload::Inline(v) => Ok(v),
            Payload::Memfd { fd, len, map } => map
                .get_or_init(|| MappedRo::map_sealed(fd.as_fd(), *len, false))
                .as_ref()
                .map(MappedRo::as_slice)
                .map_err(Clone::clone),
        }
    }

    fn len(&self) -> usize {
        match self {
            Payload::Inline(v) => v.len(),
            Payload::Memfd { len, .. } => *len as usize,
        }
    }

    fn is_memfd(&self) -> bool {
        matches!(self, Payload::Memfd { .. })
    }

    fn into_vec(self) -> Result<Vec<u8>, MemfdError> {
        match self {
            Payload::Inline(v) => Ok(v),
            m => m.bytes().map(<[u8]>::to_vec),
        }
    }

    fn into_fd(self) -> io::Result<OwnedFd> {
        match self {
            Payload::Inline(v) => memfd::from_bytes("shmbus-payload", &v),
            Payload::Memfd { fd, .. } => Ok(fd),
        }
    }

    /// What it holds of this process, for the queue bounds.
    fn charge(&self, name_len: usize) -> Charge {
        Charge::of(name_len, self.is_memfd(), self.len())
    }
}

/// The answer to a call: the service's reply.
#[derive(Debug)]
pub struct Reply {
    responder: Sender,
    payload: Payload,
}

impl Reply {
    /// The service that replied, stamped by the broker from `SO_PEERCRED`.
    pub fn responder(&self) -> Sender {
        self.responder
    }

    /// The payload bytes, however they travelled (a memfd is mapped
    /// read-only on the first call).
    ///
    /// # Panics
    /// If mapping the memfd fails (out of address space); see
    /// [`Reply::try_payload`].
    pub fn payload(&self) -> &[u8] {
        self.try_payload().unwrap_or_else(|e| panic!("cannot map a memfd payload: {e}"))
    }

    /// [`Reply::payload`], reporting a failed mapping instead of panicking.
    pub fn try_payload(&self) -> Result<&[u8], MemfdError> {
        self.payload.bytes()
    }

    /// Payload length in bytes, without mapping anything.
    pub fn len(&self) -> usize {
        self.payload.len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the payload arrived as a sealed memfd.
    pub fn is_memfd(&self) -> bool {
        self.payload.is_memfd()
    }

    /// The payload as owned bytes (copied out of a memfd).
    pub fn into_payload(self) -> Result<Vec<u8>, MemfdError> {
        self.payload.into_vec()
    }

    /// The payload as a sealed memfd, without mapping it (an inline one is
    /// copied into a new memfd).
    pub fn into_fd(self) -> io::Result<OwnedFd> {
        self.payload.into_fd()
    }

    /// Decodes a postcard payload.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, postcard::Error> {
        postcard::from_bytes(self.try_payload().map_err(|_| postcard::Error::DeserializeUnexpectedEnd)?)
    }
}

/// What the broker's `Outcome` means to the caller: the reply, or the
/// error (with no name yet; see [`CallError::named`]). `payload` is
/// `Err` when the answer's memfd was lost (our fd table was full) or
/// failed its check.
pub(crate) fn outcome_result(
    outcome: &Outcome<'_>,
    responder: Option<Sender>,
    payload: Result<Payload, ()>,
    timeout: Duration,
) -> Result<Reply, CallError> {
    let name = String::new();
    Err(match outcome {
        Outcome::Reply => {
            let payload = payload.map_err(|()| {
                CallError::Io(io::Error::other(
                    "the reply's memfd was lost: this process's fd table is full, or the fd failed its \
                     seal and size check",
                ))
            })?;
            let responder = responder.unwrap_or(Sender { client_id: 0, uid: 0, gid: 0, pid: 0 });
            return Ok(Reply { responder, payload });
        }
        Outcome::AppError { code, message } if *code == reply_code::OVERLOADED => {
            CallError::LimitExceeded { name, message: (*message).to_owned() }
        }
        Outcome::AppError { code, message } => {
            CallError::App { name, code: *code, message: (*message).to_owned() }
        }
        Outcome::NoResponder => CallError::NoResponder { name },
        Outcome::ResponderGone => CallError::ResponderGone { name },
        Outcome::Timeout => CallError::Timeout { name, timeout },
        Outcome::Denied { message } => CallError::Denied { name, message: (*message).to_owned() },
        Outcome::LimitExceeded { message } => {
            CallError::LimitExceeded { name, message: (*message).to_owned() }
        }
        Outcome::Invalid { message } => CallError::Invalid { name, message: (*message).to_owned() },
    })
}

// ------------------------------------------------- connection state --

/// A call waiting for its answer.
#[derive(Debug)]
pub(crate) struct CallSlot {
    pub timeout: Duration,
    pub answer: Option<Result<Reply, CallError>>,
    /// The connection generation its request went on, once sent: if that
    /// connection is lost, so is the answer.
    pub sent_on: Option<u64>,
}

/// What the broker answered to a name operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NameAnswer {
    Result(NameResult),
    Owner(NameStatus),
    Refused(ErrorCode, String),
}

/// A request as it waits in its service's queue (no `Drop`: it is
/// answered, if need be, by whoever takes it out, outside the state lock).
#[derive(Debug)]
pub(crate) struct QueuedRequest {
    pub(crate) serial: u64,
    sender: Sender,
    timeout: Duration,
    received: Instant,
    pub(crate) no_reply: bool,
    origin: Option<String>,
    payload: Payload,
    charge: Charge,
    /// The connection generation it came on: its reply goes on that one
    /// or nowhere.
    pub(crate) generation: u64,
}

/// One service's queue.
#[derive(Debug, Default)]
pub(crate) struct ServiceQueue {
    requests: VecDeque<QueuedRequest>,
    charge: Charge,
    /// Requests answered `OVERLOADED` (or dropped, if fire-and-forget)
    /// because a bound was reached or their memfd was lost.
    turned_away: u64,
    /// The broker released the name by policy: why. The requests queued
    /// before are still served; then the service's receive fails.
    pub(crate) revoked: Option<String>,
}

impl ServiceQueue {
    /// Drops every queued request (their memfds close); returns what they
    /// held, for the connection's totals.
    pub(crate) fn drain_requests(&mut self) -> Charge {
        self.requests.clear();
        std::mem::take(&mut self.charge)
    }
}

/// A name the broker took back from this client because a reloaded
/// policy no longer lets it own the name (or wait for it): see
/// [`Client::revoked_names`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedName {
    /// The name taken back.
    pub name: String,
    /// The broker's reason (it names the policy rule).
    pub reason: String,
}

/// Most revoked names [`Client::revoked_names`] remembers (the oldest go
/// first): a broker could otherwise grow the list without end.
pub(crate) const MAX_REVOKED_NAMES: usize = 256;

/// An answer the library sends on a service's behalf, from the reader
/// (see the module notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AutoReply {
    pub serial: u64,
    pub code: u32,
    pub message: &'static str,
}

impl State {
    /// A new name-operation id, with an empty slot for its answer.
    pub fn new_name_op(&mut self) -> Option<u32> {
        let ops = &self.name_ops;
        let id = self.name_ids.alloc(|id| ops.contains_key(&id))?;
        self.name_ops.insert(id, None);
        Some(id)
    }

    /// A new call id, with a slot for its answer.
    pub fn new_call(&mut self, timeout: Duration) -> u64 {
        self.last_call = (self.last_call + 1) & !SEND_BIT;
        self.calls.insert(self.last_call, CallSlot { timeout, answer: None, sent_on: None });
        self.last_call
    }

    /// Call `call_id`'s request went on connection `generation`: if that
    /// one is lost already, so is its answer.
    pub fn call_sent(&mut self, call_id: u64, generation: u64) {
        let gone = self.lost.clone().filter(|_| self.generation == generation).or_else(|| {
            (self.generation != generation).then(|| crate::error::Disconnect {
                code: None,
                reason: "the connection to the broker was lost".into(),
            })
        });
        if let Some(slot) = self.calls.get_mut(&call_id) {
            slot.sent_on = Some(generation);
            if let (Some(d), None) = (gone, &slot.answer) {
                slot.answer = Some(Err(CallError::Disconnected(d)));
            }
        }
    }

    /// The number and call id of a new fire-and-forget send.
    pub fn new_send(&mut self) -> (u64, u64) {
        self.sends = (self.sends + 1) & !SEND_BIT;
        (self.sends, SEND_BIT | self.sends)
    }

    /// The broker released `name` by policy: its service, if any, ends
    /// after its queued requests, and the name is listed as revoked.
    pub fn on_name_revoked(&mut self, name: &str, reason: &str) {
        self.held_names.remove(name);
        if let Some(q) = self.services.get_mut(name) {
            q.revoked = Some(reason.to_owned());
        }
        self.revoked_names.retain(|r| r.name != name);
        if self.revoked_names.len() >= MAX_REVOKED_NAMES {
            self.revoked_names.pop_front();
        }
        self.revoked_names.push_back(RevokedName { name: name.to_owned(), reason: reason.to_owned() });
    }

    /// `name` was granted again (owned or queued for): no longer revoked.
    fn on_name_granted(&mut self, name: &str) {
        self.revoked_names.retain(|r| r.name != name);
        if let Some(q) = self.services.get_mut(name) {
            q.revoked = None;
        }
    }

    pub fn on_name_answer(&mut self, req_id: u32, answer: NameAnswer) {
        self.name_ids.answered(req_id);
        if let Some(name) = self.name_requests.remove(&req_id) {
            match &answer {
                NameAnswer::Result(
                    NameResult::PrimaryOwner | NameResult::InQueue | NameResult::AlreadyOwner,
                ) => self.on_name_granted(&name),
                // Asked for again after a reconnection, and not given
                // back (taken meanwhile, or refused): as good as revoked,
                // and said so.
                other if self.held_names.contains_key(&name) && !self.name_ops.contains_key(&req_id) => {
                    let why = format!("not given back after reconnecting: {other:?}");
                    self.on_name_revoked(&name, &why);
                }
                _ => {}
            }
        }
        if let Some(slot @ None) = self.name_ops.get_mut(&req_id) {
            *slot = Some(answer);
        }
    }

    /// An `Answer`: to a call someone waits for, or a refused send; any
    /// other is dropped here (with its memfd, closing it).
    pub fn on_answer(&mut self, a: &Answer<'_>, inline: &[u8], fd: Option<Result<(OwnedFd, u64), ()>>) {
        let payload = || match fd {
            None => Ok(Payload::Inline(inline.to_vec())),
            Some(Ok((fd, len))) => Ok(Payload::memfd(fd, len)),
            Some(Err(())) => Err(()),
        };
        if a.call_id & SEND_BIT != 0 {
            let seq = a.call_id & !SEND_BIT;
            // Only a send this client made (numbered 1 up to `sends`): a
            // broker that answers others is not heard.
            if !matches!(a.outcome, Outcome::Reply) && (1..=self.sends).contains(&seq) {
                if let Err(error) = outcome_result(&a.outcome, None, Err(()), Duration::ZERO) {
                    if self.refused_sends.len() < crate::error::MAX_REFUSALS {
                        self.refused_sends.push(SendRefused { seq, error });
                    } else {
                        self.refused_sends_more = self.refused_sends_more.saturating_add(1);
                    }
                }
            }
            return;
        }
        let Some(slot) = self.calls.get_mut(&a.call_id) else { return };
        if slot.answer.is_some() {
            // A second answer to one call: the first stands.
            return;
        }
        let payload = if matches!(a.outcome, Outcome::Reply) { payload() } else { Err(()) };
        slot.answer = Some(outcome_result(&a.outcome, a.responder, payload, slot.timeout));
    }

    /// A `Serve`: queued for its service if it fits, else answered on the
    /// service's behalf (or, fire-and-forget, dropped and counted).
    pub fn on_serve(&mut self, s: &Serve<'_>, inline: &[u8], fd: Option<Result<(OwnedFd, u64), ()>>) {
        let (bounds, total) = (self.bounds, self.queued);
        let Some(q) = self.services.get_mut(s.name) else {
            if !s.no_reply {
                self.auto_replies.push(AutoReply {
                    serial: s.serial,
                    code: reply_code::NOT_SERVED,
                    message: "this client owns the name but does not serve it",
                });
            }
            return;
        };
        let payload = match fd {
            None => Payload::Inline(inline.to_vec()),
            Some(Ok((fd, len))) => Payload::memfd(fd, len),
            Some(Err(())) => {
                q.turned_away = q.turned_away.saturating_add(1);
                if !s.no_reply {
                    self.auto_replies.push(AutoReply {
                        serial: s.serial,
                        code: reply_code::OVERLOADED,
                        message: "the service could not receive the request's memfd",
                    });
                }
                return;
            }
        };
        let charge = payload.charge(s.name.len() + s.origin.map_or(0, str::len));
        let fits = q.requests.len() < bounds.messages
            && q.charge.fits(charge, bounds.bytes, bounds.fds)
            && total.fits(charge, bounds.total_bytes, bounds.total_fds);
        if !fits {
            // `payload` drops here, closing its memfd.
            q.turned_away = q.turned_away.saturating_add(1);
            if !s.no_reply {
                self.auto_replies.push(AutoReply {
                    serial: s.serial,
                    code: reply_code::OVERLOADED,
                    message: "the service's queue is full",
                });
            }
            return;
        }
        q.requests.push_back(QueuedRequest {
            serial: s.serial,
            sender: s.sender,
            timeout: Duration::from_millis(u64::from(s.timeout_ms)),
            received: Instant::now(),
            no_reply: s.no_reply,
            origin: s.origin.map(str::to_owned),
            payload,
            charge,
            generation: self.generation,
        });
        q.charge.add(charge);
        self.queued.add(charge);
    }

    /// The next request queued for `name`, releasing what it held.
    pub(crate) fn take_request(&mut self, name: &str) -> Option<QueuedRequest> {
        let q = self.services.get_mut(name)?;
        let r = q.requests.pop_front()?;
        q.charge.sub(r.charge);
        self.queued.sub(r.charge);
        Some(r)
    }

    /// Ends the queue of `name`; returns what it held, to be answered.
    fn remove_service(&mut self, name: &str) -> VecDeque<QueuedRequest> {
        match self.services.remove(name) {
            Some(q) => {
                self.queued.sub(q.charge);
                q.requests
            }
            None => VecDeque::new(),
        }
    }
}

// ---------------------------------------------------------- sending --

/// Sends `Reply { serial }` with `status` and the payload inline or as
/// `fd` (a sealed memfd of `len` bytes).
/// Sends a reply on the connection its request came on (`generation`)
/// only: on another, its serial would name another caller's request.
fn send_reply(
    inner: &Inner,
    generation: u64,
    serial: u64,
    status: ReplyStatus<'_>,
    inline: &[u8],
    fd: Option<(BorrowedFd<'_>, u64)>,
) -> Result<(), RecvError> {
    let (payload, fds): (_, Vec<BorrowedFd<'_>>) = match fd {
        None => (PayloadRef::Inline, Vec::new()),
        Some((fd, len)) => (PayloadRef::Memfd { len }, vec![fd]),
    };
    let body = ReplyFrame { serial, status, payload };
    let head = shmbus_proto::frame::encode_head(&body)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let inline = if fds.is_empty() { inline } else { &[] };
    inner.send_frame_on(generation, &head, inline, &fds)
}

/// Answers queued requests that will not be served (fire-and-forget ones
/// need nothing). Never call with the state lock held.
fn answer_unserved(inner: &Inner, queued: VecDeque<QueuedRequest>, message: &str) {
    for r in queued.into_iter().filter(|r| !r.no_reply) {
        let status = ReplyStatus::Error { code: reply_code::UNANSWERED, message };
        // A failure means the connection is gone: the broker answers.
        let _ = send_reply(inner, r.generation, r.serial, status, &[], None);
    }
}

/// `message`, cut to [`MAX_ERROR_MESSAGE`] bytes at a character boundary.
pub(crate) fn cut(message: &str) -> &str {
    shmbus_proto::text::clip(message, MAX_ERROR_MESSAGE)
}

/// A timeout as the wire carries it: whole milliseconds, rounded up, at
/// least 1 (0 would mean the broker's maximum), at most `u32::MAX`.
pub(crate) fn timeout_ms(timeout: Duration) -> u32 {
    let ms = timeout.as_nanos().div_ceil(1_000_000).max(1);
    u32::try_from(ms).unwrap_or(u32::MAX)
}

// -------------------------------------------------------------- calls --

/// A call in flight, from [`Client::request_async`]: keep many, then
/// collect their answers. Dropping it gives up the call (its answer is
/// dropped when it comes).
pub struct PendingCall {
    inner: Arc<Inner>,
    call_id: u64,
    name: String,
    timeout: Duration,
    /// When this side stops waiting for the broker's answer: the timeout
    /// plus a grace period (`None`: past what the clock can say; the
    /// broker answers by its maximum anyway).
    deadline: Option<Instant>,
    taken: bool,
}

impl std::fmt::Debug for PendingCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingCall")
            .field("call_id", &self.call_id)
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .field("taken", &self.taken)
            .finish()
    }
}

impl PendingCall {
    /// The name called.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The call's id on the wire.
    pub fn call_id(&self) -> u64 {
        self.call_id
    }

    /// Waits for the answer (at most the call's timeout and a grace
    /// period: the broker answers `Timeout` when the timeout passes).
    pub fn wait(mut self) -> Result<Reply, CallError> {
        match self.take(None)? {
            Some(r) => Ok(r),
            None => Err(CallError::Timeout { name: self.name.clone(), timeout: self.timeout }),
        }
    }

    /// Waits up to `timeout` for the answer: `Ok(None)` if it has not come
    /// yet (the call goes on). Once it returned the answer, or an error,
    /// the call is over: calling again fails with
    /// [`CallError::AlreadyTaken`].
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<Reply>, CallError> {
        self.take(Instant::now().checked_add(timeout))
    }

    /// The answer if it has come (reading what the socket holds, without
    /// waiting); `Ok(None)` if not yet. As [`PendingCall::wait_timeout`].
    pub fn try_get(&mut self) -> Result<Option<Reply>, CallError> {
        self.take(Some(Instant::now()))
    }

    /// Waits until `until` (`None`: no limit but the call's own).
    fn take(&mut self, until: Option<Instant>) -> Result<Option<Reply>, CallError> {
        if self.taken {
            return Err(CallError::AlreadyTaken);
        }
        let id = self.call_id;
        let deadline = match (until, self.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let got = self.inner.wait_for(deadline, |st| match st.calls.get(&id) {
            Some(CallSlot { answer: Some(_), .. }) => st.calls.remove(&id).and_then(|s| s.answer),
            _ => None,
        });
        let end = |this: &mut PendingCall| {
            this.taken = true;
            this.inner.state.lock().calls.remove(&this.call_id);
        };
        match got {
            Ok(Some(answer)) => {
                self.taken = true;
                answer.map(Some).map_err(|e| e.named(&self.name))
            }
            Ok(None) if self.deadline.is_some_and(|d| Instant::now() >= d) => {
                end(self);
                Err(CallError::Timeout { name: self.name.clone(), timeout: self.timeout })
            }
            Ok(None) => Ok(None),
            Err(e) => {
                end(self);
                Err(e.into())
            }
        }
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        if !self.taken {
            // Its answer, when it comes, finds no slot and is dropped.
            self.inner.state.lock().calls.remove(&self.call_id);
        }
    }
}

// ----------------------------------------------------------- serving --

/// A request to a name this client serves. Answer it with one of the
/// `reply*` methods, which consume it. Dropped unanswered, it is answered
/// [`reply_code::UNANSWERED`] (the caller sees [`CallError::App`] with that
/// code), so a caller never waits for a request that was lost here. A
/// fire-and-forget request ([`Request::expects_reply`] is false) needs no
/// answer; replying to one does nothing.
pub struct Request {
    pub(crate) inner: Arc<Inner>,
    name: Arc<str>,
    pub(crate) memfd_threshold: usize,
    pub(crate) q: QueuedRequest,
    pub(crate) answered: bool,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("name", &self.name)
            .field("serial", &self.q.serial)
            .field("sender", &self.q.sender)
            .field("len", &self.q.payload.len())
            .field("expects_reply", &!self.q.no_reply)
            .finish()
    }
}

impl Request {
    /// The caller, stamped by the broker from `SO_PEERCRED`: it cannot be
    /// forged.
    pub fn sender(&self) -> crate::Sender {
        self.q.sender
    }

    /// Where the request comes from, as the caller claims it (see
    /// [`Client::request_with_origin`]): `shmbus-bridge` names the remote
    /// host and caller here. The broker does not vouch for it, unlike
    /// [`Request::sender`].
    pub fn origin(&self) -> Option<&str> {
        self.q.origin.as_deref()
    }

    /// The name called.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The broker's id of this request (its reply slot).
    pub fn serial(&self) -> u64 {
        self.q.serial
    }

    /// The request's timeout: the broker answers the caller `Timeout`
    /// this long after it queued the request for this service, and then
    /// refuses a reply.
    pub fn timeout(&self) -> Duration {
        self.q.timeout
    }

    /// About when the broker stops waiting for the reply: [`Request::timeout`]
    /// after this process read the request (so a little later than the
    /// broker's own deadline).
    pub fn deadline(&self) -> Instant {
        self.q.received + self.q.timeout
    }

    /// Whether the caller waits for an answer (false for
    /// [`Client::send`]).
    pub fn expects_reply(&self) -> bool {
        !self.q.no_reply
    }

    /// The payload bytes, however they travelled (a memfd is mapped
    /// read-only on the first call).
    ///
    /// # Panics
    /// If mapping the memfd fails (out of address space); see
    /// [`Request::try_payload`].
    pub fn payload(&self) -> &[u8] {
        self.try_payload().unwrap_or_else(|e| panic!("cannot map a memfd payload: {e}"))
    }

    /// [`Request::payload`], reporting a failed mapping instead of
    /// panicking.
    pub fn try_payload(&self) -> Result<&[u8], MemfdError> {
        self.q.payload.bytes()
    }

    /// Payload length in bytes, without mapping anything.
    pub fn len(&self) -> usize {
        self.q.payload.len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the payload arrived as a sealed memfd.
    pub fn is_memfd(&self) -> bool {
        self.q.payload.is_memfd()
    }

    /// Decodes a postcard payload.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, postcard::Error> {
        postcard::from_bytes(self.try_payload().map_err(|_| postcard::Error::DeserializeUnexpectedEnd)?)
    }

    /// Replies with `payload`: inline up to the connection's memfd
    /// threshold, above it copied once into a sealed memfd.
    pub fn reply(mut self, payload: impl AsRef<[u8]>) -> Result<(), ReplyError> {
        let payload = payload.as_ref();
        if self.q.no_reply {
            self.answered = true;
            return Ok(());
        }
        if payload.len() > self.memfd_threshold {
            let fd = memfd::from_bytes("shmbus-reply", payload).map_err(ReplyError::Memfd)?;
            return self.finish(ReplyStatus::Ok, Some((fd.as_fd(), payload.len() as u64)));
        }
        let serial = self.q.serial;
        send_reply(&self.inner, self.q.generation, serial, ReplyStatus::Ok, payload, None)?;
        self.answered = true;
        Ok(())
    }

    /// Replies with a sealed memfd the caller holds (shrink, grow, write
    /// and seal seals; e.g. a [`crate::Message::into_fd`]). The caller
    /// keeps its fd.
    pub fn reply_memfd(mut self, fd: impl AsFd) -> Result<(), ReplyError> {
        if self.q.no_reply {
            self.answered = true;
            return Ok(());
        }
        let len = memfd::sealed_len(fd.as_fd())?;
        self.finish(ReplyStatus::Ok, Some((fd.as_fd(), len)))
    }

    /// Seals the loan and replies with it: the caller maps these very
    /// pages (see [`Client::loan`]).
    pub fn reply_loan(mut self, loan: Loan) -> Result<(), ReplyError> {
        if self.q.no_reply {
            self.answered = true;
            return Ok(());
        }
        let (fd, len) = loan.seal().map_err(ReplyError::Memfd)?;
        self.finish(ReplyStatus::Ok, Some((fd.as_fd(), len)))
    }

    /// Answers with an application error: the caller gets
    /// [`CallError::App`] with `code` and `message` (cut to
    /// [`MAX_ERROR_MESSAGE`] bytes). Codes from [`reply_code::RESERVED`]
    /// up are the library's own.
    pub fn reply_error(mut self, code: u32, message: &str) -> Result<(), ReplyError> {
        if self.q.no_reply {
            self.answered = true;
            return Ok(());
        }
        self.finish(ReplyStatus::Error { code, message: cut(message) }, None)
    }

    fn finish(
        &mut self,
        status: ReplyStatus<'_>,
        fd: Option<(BorrowedFd<'_>, u64)>,
    ) -> Result<(), ReplyError> {
        send_reply(&self.inner, self.q.generation, self.q.serial, status, &[], fd)?;
        self.answered = true;
        Ok(())
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.answered && !self.q.no_reply {
            let status = ReplyStatus::Error {
                code: reply_code::UNANSWERED,
                message: "the service dropped the request without answering it",
            };
            // A failure means the connection is gone: the broker answers.
            let _ = send_reply(&self.inner, self.q.generation, self.q.serial, status, &[], None);
        }
    }
}

/// A name this client serves, from [`Client::serve`]: yields the
/// [`Request`]s sent to it. Dropping it releases the name, and answers
/// the requests still queued with [`reply_code::UNANSWERED`].
pub struct Service {
    client: Client,
    name: Arc<str>,
    result: NameResult,
    /// Released by [`Service::release`]: nothing left for `drop` to do.
    released: bool,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("name", &self.name).field("result", &self.result).finish()
    }
}

impl Service {
    /// The name served.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What the broker answered when the service asked for its name:
    /// [`NameResult::PrimaryOwner`] (requests come), [`NameResult::InQueue`]
    /// (they come once the name is handed over), or
    /// [`NameResult::AlreadyOwner`].
    pub fn result(&self) -> NameResult {
        self.result
    }

    /// Requests this service turned away: answered
    /// [`reply_code::OVERLOADED`] (or dropped, if fire-and-forget) because
    /// its queue was full or their memfd could not be received.
    pub fn turned_away(&self) -> u64 {
        self.client.inner.state.lock().services.get(&*self.name).map_or(0, |q| q.turned_away)
    }

    pub(crate) fn wrap(&self, q: QueuedRequest) -> Request {
        Request {
            inner: self.client.inner.clone(),
            name: self.name.clone(),
            memfd_threshold: self.client.memfd_threshold(),
            q,
            answered: false,
        }
    }

    /// The next request, or, once none is queued and the broker released
    /// the name by policy, [`RecvError::Revoked`].
    fn next(&self, deadline: Option<Instant>) -> Result<Option<Request>, RecvError> {
        let name = &*self.name;
        let got = self.client.inner.wait_for(deadline, |st| match st.take_request(name) {
            Some(q) => Some(Ok(q)),
            None => st.services.get(name)?.revoked.clone().map(Err),
        })?;
        match got {
            Some(Ok(q)) => Ok(Some(self.wrap(q))),
            Some(Err(reason)) => Err(RecvError::Revoked(reason)),
            None => Ok(None),
        }
    }

    /// Why the broker took the name back, if it did (a policy reload no
    /// longer lets this client own it). The requests queued before are
    /// still received; then receiving fails with [`RecvError::Revoked`].
    pub fn revocation(&self) -> Option<String> {
        self.client.inner.state.lock().services.get(&*self.name)?.revoked.clone()
    }

    /// Waits for the next request.
    pub fn recv(&self) -> Result<Request, RecvError> {
        Ok(self.next(None)?.expect("no deadline"))
    }

    /// Waits up to `timeout` for the next request; `Ok(None)` if none came.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Request>, RecvError> {
        match Instant::now().checked_add(timeout) {
            Some(deadline) => self.next(Some(deadline)),
            None => self.recv().map(Some),
        }
    }

    /// The next request if one is ready, reading what the socket holds
    /// without waiting.
    pub fn try_recv(&self) -> Result<Option<Request>, RecvError> {
        self.next(Some(Instant::now()))
    }

    /// Requests until the connection ends or the broker takes the name
    /// back ([`RecvError::Revoked`]). The iterator yields the error that
    /// ended it, then stops.
    pub fn iter(&self) -> Incoming<'_> {
        Incoming { service: self, done: false }
    }

    /// Releases the name now, waiting for the broker's answer (dropping
    /// the service does the same without waiting). Requests still queued
    /// are answered [`reply_code::UNANSWERED`].
    pub fn release(mut self) -> Result<NameResult, NameError> {
        self.released = true;
        let queued = self.client.inner.state.lock().remove_service(&self.name);
        let result = self.client.release_name(&self.name);
        answer_unserved(&self.client.inner, queued, "the service stopped before answering");
        result
    }
}

/// The requests of a [`Service`], until the connection ends.
pub struct Incoming<'a> {
    service: &'a Service,
    done: bool,
}

impl Iterator for Incoming<'_> {
    type Item = Result<Request, RecvError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let r = self.service.recv();
        self.done = r.is_err();
        Some(r)
    }
}

impl<'a> IntoIterator for &'a Service {
    type Item = Result<Request, RecvError>;
    type IntoIter = Incoming<'a>;
    fn into_iter(self) -> Incoming<'a> {
        self.iter()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let inner = &self.client.inner;
        let queued = inner.state.lock().remove_service(&self.name);
        release_quietly(inner, &self.name);
        answer_unserved(inner, queued, "the service stopped before answering");
    }
}

/// Sends `NameRelease` without waiting for the answer (its id stays in use
/// until the answer comes).
fn release_quietly(inner: &Inner, name: &str) {
    let req_id = {
        let mut st = inner.state.lock();
        st.held_names.remove(name);
        let Some(req_id) = st.name_ids.alloc(|_| false) else { return };
        req_id
    };
    // Not across a reconnection: a name let go meanwhile is not asked for
    // again, so there is nothing to release.
    if inner.send_once(&NameRelease { req_id, name }).is_err() {
        // Nothing was sent: no answer will come.
        inner.state.lock().name_ids.answered(req_id);
    }
}

// ------------------------------------------------------------ client --

impl Client {
    /// Sends one name operation built by `send` (given its id) and waits
    /// for the broker's answer: `Ok(None)` on timeout.
    fn name_op(
        &self,
        send: impl FnOnce(u32) -> Result<u64, RecvError>,
    ) -> Result<Option<NameAnswer>, RecvError> {
        let req_id = {
            let mut st = self.inner.state.lock();
            if let Some(d) = &st.closed {
                return Err(RecvError::Disconnected(d.clone()));
            }
            st.new_name_op().ok_or_else(|| io::Error::other("every name request id is in use"))?
        };
        let sent_on = match send(req_id) {
            Ok(g) => g,
            Err(e) => {
                let mut st = self.inner.state.lock();
                st.name_ops.remove(&req_id);
                st.name_requests.remove(&req_id);
                // Nothing was sent: no answer will come.
                st.name_ids.answered(req_id);
                return Err(e);
            }
        };
        let deadline = Instant::now() + self.timeout();
        let got = self.inner.wait_answer(Some(deadline), sent_on, |st| match st.name_ops.get(&req_id) {
            Some(Some(_)) => st.name_ops.remove(&req_id).flatten(),
            _ => None,
        });
        // On a timeout or an error the slot goes; the id stays in use
        // until the answer comes.
        self.inner.state.lock().name_ops.remove(&req_id);
        got
    }

    /// Asks the broker for `name` (a subject without wildcards, not under
    /// `$SYS`; names under `shmbus.` are for root and the broker's uid).
    /// What became of it is the result: [`NameResult::PrimaryOwner`],
    /// [`NameResult::InQueue`] (it is handed over when the owner lets go),
    /// [`NameResult::Exists`] (taken, and `do_not_queue` or a shared and
    /// exclusive mismatch), or [`NameResult::AlreadyOwner`] (the flags are
    /// updated). Owning a name does not answer its requests: see
    /// [`Client::serve`]; requests to a name owned without a [`Service`]
    /// are answered [`reply_code::NOT_SERVED`].
    ///
    /// If the broker does not answer in time, the request is taken back
    /// (a release is sent) and `Timeout` returned.
    pub fn request_name(&self, name: &str, flags: NameFlags) -> Result<NameResult, NameError> {
        check_subject(name)?;
        let answer = self.name_op(|req_id| {
            // Named, so that a grant clears the name's revocation as it
            // arrives, in order with a revocation after it.
            self.inner.state.lock().name_requests.insert(req_id, name.to_owned());
            self.inner.send(&NameRequest { req_id, name, flags }, &[])
        })?;
        match answer {
            Some(NameAnswer::Result(r)) => {
                if matches!(r, NameResult::PrimaryOwner | NameResult::InQueue | NameResult::AlreadyOwner) {
                    // Asked for again after a reconnection.
                    self.inner.state.lock().held_names.insert(name.to_owned(), flags);
                }
                Ok(r)
            }
            Some(NameAnswer::Refused(code, message)) => Err(NameError::Refused { code, message }),
            Some(NameAnswer::Owner(_)) => Err(unexpected_answer()),
            None => {
                release_quietly(&self.inner, name);
                Err(NameError::Timeout(self.timeout()))
            }
        }
    }

    /// Gives up `name`, or leaves its queue: [`NameResult::Released`],
    /// [`NameResult::NotOwner`] or [`NameResult::NonExistent`]. A
    /// [`Service`] on the name stays, and gets no more requests.
    pub fn release_name(&self, name: &str) -> Result<NameResult, NameError> {
        check_subject(name)?;
        self.inner.state.lock().held_names.remove(name);
        let answer = self.name_op(|req_id| self.inner.send(&NameRelease { req_id, name }, &[]))?;
        match answer {
            Some(NameAnswer::Result(r)) => Ok(r),
            Some(NameAnswer::Refused(code, message)) => Err(NameError::Refused { code, message }),
            Some(NameAnswer::Owner(_)) => Err(unexpected_answer()),
            None => Err(NameError::Timeout(self.timeout())),
        }
    }

    /// The client id of `name`'s primary owner, if anyone owns it.
    pub fn name_owner(&self, name: &str) -> Result<Option<u64>, RequestError> {
        Ok(self.name_status(name)?.owner)
    }

    /// Who owns `name`, and how many share it.
    pub fn name_status(&self, name: &str) -> Result<NameStatus, RequestError> {
        check_subject(name)
            .map_err(|e| RequestError::Refused { code: ErrorCode::InvalidSubject, message: e.to_string() })?;
        let answer = self.name_op(|req_id| self.inner.send(&GetNameOwner { req_id, name }, &[]))?;
        match answer {
            Some(NameAnswer::Owner(s)) => Ok(s),
            Some(NameAnswer::Refused(code, message)) => Err(RequestError::Refused { code, message }),
            Some(NameAnswer::Result(_)) => Err(RequestError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                "the broker answered a name query with a name result",
            ))),
            None => Err(RequestError::Timeout(self.timeout())),
        }
    }

    /// Every name on the broker, with owners, queue and flags (every page;
    /// see [`Client::names_page`]).
    pub fn names(&self) -> Result<Vec<NameInfo>, RequestError> {
        self.query_items(QueryKind::Names, pick_name)
    }

    /// One page of the names: as [`Client::clients_page`].
    pub fn names_page(&self, after: Option<&str>) -> Result<(Vec<NameInfo>, Option<String>), RequestError> {
        self.query_items_page(QueryKind::Names, after, pick_name)
    }

    /// Serves `name`, owning it exclusively: fails with
    /// [`ServeError::Exists`] if another client owns it (it does not wait
    /// in the queue; see [`Client::serve_with`]).
    pub fn serve(&self, name: &str) -> Result<Service, ServeError> {
        self.serve_with(name, NameFlags { do_not_queue: true, ..NameFlags::default() })
    }

    /// Serves `name`, asking for it with `flags`: shared
    /// ([`NameFlagsExt::shared`]), exclusive and willing to queue (then
    /// [`Service::result`] is [`NameResult::InQueue`] and requests come
    /// once the name is handed over), allowing replacement... One
    /// [`Service`] per name per connection.
    pub fn serve_with(&self, name: &str, flags: NameFlags) -> Result<Service, ServeError> {
        check_subject(name)?;
        {
            let mut st = self.inner.state.lock();
            if let Some(d) = &st.closed {
                return Err(ServeError::Disconnected(d.clone()));
            }
            if st.services.contains_key(name) {
                return Err(ServeError::AlreadyServed { name: name.to_owned() });
            }
            // Queued from now on: requests may arrive right behind the
            // broker's answer, before we see it.
            st.services.insert(name.to_owned(), ServiceQueue::default());
        }
        let unserve = || {
            let queued = self.inner.state.lock().remove_service(name);
            answer_unserved(&self.inner, queued, "the service did not start");
        };
        match self.request_name(name, flags) {
            Ok(result @ (NameResult::PrimaryOwner | NameResult::AlreadyOwner | NameResult::InQueue)) => {
                Ok(Service { client: self.clone(), name: name.into(), result, released: false })
            }
            Ok(NameResult::Exists) => {
                unserve();
                Err(ServeError::Exists { name: name.to_owned() })
            }
            Ok(_) => {
                unserve();
                Err(ServeError::Io(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the broker answered a name request with a release's result",
                )))
            }
            Err(e) => {
                unserve();
                Err(e.into())
            }
        }
    }

    /// Calls `name` with `payload` and waits for the one answer: the
    /// service's reply, or why there is none ([`CallError`]). The broker
    /// answers [`CallError::Timeout`] once `timeout` passes (rounded up to
    /// whole milliseconds, and at most the broker's maximum, 60 s by
    /// default). Payloads above the memfd threshold go as a sealed memfd.
    pub fn request(
        &self,
        name: &str,
        payload: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        self.request_async(name, payload, timeout)?.wait()
    }

    /// Calls as [`Client::request`] does, with an origin the service reads
    /// with [`Request::origin`]: where the call comes from, as this client
    /// claims it (1 to 256 bytes, no control characters).
    pub fn request_with_origin(
        &self,
        name: &str,
        payload: impl AsRef<[u8]>,
        timeout: Duration,
        origin: &str,
    ) -> Result<Reply, CallError> {
        validate_origin(origin)?;
        self.call(name, payload.as_ref(), timeout, Some(origin))?.wait()
    }

    /// Sends the call and returns at once with a handle on its answer, so
    /// many can be in flight (up to this uid's pending-request quota in
    /// the broker, 4096 by default; past it calls are answered
    /// [`CallError::LimitExceeded`]).
    pub fn request_async(
        &self,
        name: &str,
        payload: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<PendingCall, CallError> {
        self.call(name, payload.as_ref(), timeout, None)
    }

    fn call(
        &self,
        name: &str,
        payload: &[u8],
        timeout: Duration,
        origin: Option<&str>,
    ) -> Result<PendingCall, CallError> {
        check_subject(name)?;
        let call_id = {
            let mut st = self.inner.state.lock();
            if let Some(d) = &st.closed {
                return Err(CallError::Disconnected(d.clone()));
            }
            st.new_call(timeout)
        };
        let sent = Instant::now();
        let sent_on = match self.send_request(call_id, name, payload, timeout_ms(timeout), false, origin) {
            Ok(g) => g,
            Err(e) => {
                self.inner.state.lock().calls.remove(&call_id);
                return Err(e);
            }
        };
        self.inner.state.lock().call_sent(call_id, sent_on);
        Ok(PendingCall {
            inner: self.inner.clone(),
            call_id,
            name: name.to_owned(),
            timeout,
            deadline: sent.checked_add(timeout).and_then(|t| t.checked_add(self.timeout())),
            taken: false,
        })
    }

    /// Sends `payload` to `name` with no answer expected (fire and forget;
    /// the service sees [`Request::expects_reply`] false). Returns the
    /// send's number on this connection (1 for the first). A send the
    /// broker could not deliver (no responder, a full queue) comes back
    /// from [`Client::flush`] as a [`SendRefused`] with that number.
    pub fn send(&self, name: &str, payload: impl AsRef<[u8]>) -> Result<u64, CallError> {
        let payload = payload.as_ref();
        check_subject(name)?;
        let (seq, call_id) = {
            let mut st = self.inner.state.lock();
            if let Some(d) = &st.closed {
                return Err(CallError::Disconnected(d.clone()));
            }
            st.new_send()
        };
        self.send_request(call_id, name, payload, 0, true, None)?;
        Ok(seq)
    }

    fn send_request(
        &self,
        call_id: u64,
        name: &str,
        payload: &[u8],
        timeout_ms: u32,
        no_reply: bool,
        origin: Option<&str>,
    ) -> Result<u64, CallError> {
        let mut frame =
            RequestFrame { call_id, name, timeout_ms, no_reply, origin, payload: PayloadRef::Inline };
        if payload.len() > self.memfd_threshold() {
            let fd = memfd::from_bytes("shmbus-request", payload).map_err(CallError::Memfd)?;
            frame.payload = PayloadRef::Memfd { len: payload.len() as u64 };
            let mut s = self.inner.lock_send();
            return Ok(self.inner.send_locked_with_fds(&mut s, &frame, &[], &[fd.as_fd()])?);
        }
        Ok(self.inner.send(&frame, payload)?)
    }

    /// Names the broker took back from this client because a reloaded
    /// policy no longer lets it own them (or wait in their queue), oldest
    /// first: those owned with [`Client::request_name`] as well as those a
    /// [`Service`] served (whose receive then fails with
    /// [`RecvError::Revoked`]). A name is listed until it is granted
    /// again; at most the last 256 are kept.
    pub fn revoked_names(&self) -> Vec<RevokedName> {
        self.inner.state.lock().revoked_names.iter().cloned().collect()
    }

    /// Replies the broker refused on this connection so far (a reply
    /// after the caller's deadline, say: the broker had already answered
    /// it `Timeout`).
    pub fn refused_replies(&self) -> u64 {
        self.inner.state.lock().refused_replies
    }
}

fn unexpected_answer() -> NameError {
    NameError::Io(io::Error::new(
        io::ErrorKind::InvalidData,
        "the broker answered a name request with a name query's answer",
    ))
}

fn pick_name(i: QueryItemBody) -> Option<NameInfo> {
    match i {
        QueryItemBody::Name(x) => Some(x),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn timeouts_round_up_to_whole_milliseconds_and_never_mean_the_maximum() {
        assert_eq!(timeout_ms(Duration::ZERO), 1, "0 would be the broker's maximum");
        assert_eq!(timeout_ms(Duration::from_nanos(1)), 1);
        assert_eq!(timeout_ms(Duration::from_micros(1500)), 2);
        assert_eq!(timeout_ms(Duration::from_secs(3)), 3000);
        assert_eq!(timeout_ms(Duration::from_secs(u64::MAX)), u32::MAX);
    }

    #[test]
    fn long_error_messages_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_ERROR_MESSAGE);
        let c = cut(&long);
        assert!(c.len() <= MAX_ERROR_MESSAGE && c.len() >= MAX_ERROR_MESSAGE - 1);
        assert!(c.chars().all(|ch| ch == 'é'));
        assert_eq!(cut("short"), "short");
    }

    #[test]
    fn every_outcome_maps_to_its_error() {
        let t = Duration::from_millis(7);
        let err = |o: Outcome<'_>| outcome_result(&o, None, Err(()), t).unwrap_err().named("svc.a");
        assert!(matches!(err(Outcome::NoResponder), CallError::NoResponder { name } if name == "svc.a"));
        assert!(matches!(err(Outcome::ResponderGone), CallError::ResponderGone { .. }));
        assert!(matches!(err(Outcome::Timeout), CallError::Timeout { timeout, .. } if timeout == t));
        assert!(
            matches!(err(Outcome::Denied { message: "no" }), CallError::Denied { message, .. } if message == "no")
        );
        assert!(matches!(
            err(Outcome::LimitExceeded { message: "quota" }),
            CallError::LimitExceeded { message, .. } if message == "quota"
        ));
        assert!(matches!(err(Outcome::Invalid { message: "bad" }), CallError::Invalid { .. }));
        assert!(matches!(
            err(Outcome::AppError { code: 42, message: "nope" }),
            CallError::App { code: 42, message, .. } if message == "nope"
        ));
        // A service's own queue overflowing is a limit, as the broker's is.
        assert!(matches!(
            err(Outcome::AppError { code: reply_code::OVERLOADED, message: "full" }),
            CallError::LimitExceeded { .. }
        ));
        assert_eq!(err(Outcome::NoResponder).to_string(), "no responder for svc.a");
        // A refused send's answer has no name, and says so gracefully.
        let e = outcome_result(&Outcome::NoResponder, None, Err(()), t).unwrap_err();
        assert_eq!(e.to_string(), "no responder");
        // A reply whose memfd was lost is an error, not an empty reply.
        assert!(matches!(outcome_result(&Outcome::Reply, None, Err(()), t), Err(CallError::Io(_))));
        let who = Sender { client_id: 3, uid: 1, gid: 2, pid: 4 };
        let r = outcome_result(&Outcome::Reply, Some(who), Ok(Payload::Inline(b"hi".to_vec())), t).unwrap();
        assert_eq!((r.responder(), r.payload()), (who, &b"hi"[..]));
    }

    // ------------------------------------------- the state, no socket --

    use crate::connection::LocalBounds;
    use shmbus_proto::frame::Limits;
    use shmbus_proto::sys::socket::{self, OutPacket, PeerCred, RecvBatch};

    const WHO: Sender = Sender { client_id: 2, uid: 0, gid: 0, pid: 2 };

    const WIDE: LocalBounds = LocalBounds {
        messages: 1 << 20,
        bytes: 1 << 40,
        fds: 1 << 20,
        total_bytes: 1 << 40,
        total_fds: 1 << 20,
    };

    fn serving(bounds: LocalBounds, names: &[&str]) -> State {
        let mut st = State { bounds, ..State::default() };
        for n in names {
            st.services.insert((*n).to_owned(), ServiceQueue::default());
        }
        st
    }

    fn serve_frame(name: &str, serial: u64, no_reply: bool, payload: PayloadRef) -> Serve<'_> {
        Serve { serial, name, sender: WHO, timeout_ms: 1000, no_reply, origin: None, payload }
    }

    /// Open fds of this process whose memfd is named `name`.
    fn memfds_named(name: &str) -> usize {
        let needle = format!("/memfd:{name} ");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|t| t.to_string_lossy().starts_with(&needle))
            .count()
    }

    fn overloaded(serial: u64, message: &'static str) -> AutoReply {
        AutoReply { serial, code: reply_code::OVERLOADED, message }
    }

    #[test]
    fn a_full_service_queue_answers_overloaded_and_drops_a_fire_and_forget_request() {
        let bounds = LocalBounds { messages: 2, ..WIDE };
        let mut st = serving(bounds, &["svc"]);
        for serial in 1..=3 {
            st.on_serve(&serve_frame("svc", serial, false, PayloadRef::Inline), b"abc", None);
        }
        st.on_serve(&serve_frame("svc", 4, true, PayloadRef::Inline), b"abc", None);
        assert_eq!(st.auto_replies, [overloaded(3, "the service's queue is full")]);
        assert_eq!(st.services["svc"].turned_away, 2);
        assert_eq!(st.queued, Charge { bytes: 2 * Charge::of(3, false, 3).bytes, fds: 0 });
        // Taking one makes room for one.
        let r = st.take_request("svc").unwrap();
        assert_eq!((r.serial, r.payload.bytes().unwrap()), (1, &b"abc"[..]));
        st.on_serve(&serve_frame("svc", 5, false, PayloadRef::Inline), b"xyz", None);
        assert_eq!(st.auto_replies.len(), 1);
        let left: Vec<u64> = std::iter::from_fn(|| st.take_request("svc")).map(|r| r.serial).collect();
        assert_eq!(left, [2, 5]);
        assert_eq!(st.queued, Charge::default(), "everything taken is released");
    }

    #[test]
    fn service_queues_count_in_the_connection_totals_and_close_dropped_memfds() {
        let name = format!("svc-bounds-{}", std::process::id());
        let bounds = LocalBounds { total_fds: 2, ..WIDE };
        let mut st = serving(bounds, &["a", "b"]);
        // A subscription's memfd holds one of the two.
        st.queued.add(Charge { bytes: 0, fds: 1 });
        let memfd = |len| Some(Ok((memfd::from_bytes(&name, &vec![7u8; len]).unwrap(), len as u64)));
        st.on_serve(&serve_frame("a", 1, false, PayloadRef::Memfd { len: 5 }), &[], memfd(5));
        st.on_serve(&serve_frame("b", 2, false, PayloadRef::Memfd { len: 6 }), &[], memfd(6));
        assert_eq!(memfds_named(&name), 1, "the second did not fit, and is closed");
        assert_eq!(st.auto_replies, [overloaded(2, "the service's queue is full")]);
        // A memfd that failed its check (or was lost) is turned away too.
        st.on_serve(&serve_frame("b", 3, false, PayloadRef::Memfd { len: 6 }), &[], Some(Err(())));
        assert_eq!(st.auto_replies[1], overloaded(3, "the service could not receive the request's memfd"));
        assert_eq!(st.services["b"].turned_away, 2);
        // Ending a service gives back what its queue held.
        let queued = st.remove_service("a");
        assert_eq!(queued.len(), 1);
        assert_eq!(st.queued, Charge { bytes: 0, fds: 1 });
        let r = queued.into_iter().next().unwrap();
        assert!(r.payload.is_memfd());
        assert_eq!(r.payload.bytes().unwrap(), [7u8; 5]);
        drop(r);
        assert_eq!(memfds_named(&name), 0);
    }

    #[test]
    fn a_request_for_a_name_not_served_is_answered_unless_fire_and_forget() {
        let mut st = serving(WIDE, &["svc"]);
        st.on_serve(&serve_frame("other", 1, false, PayloadRef::Inline), b"", None);
        st.on_serve(&serve_frame("other", 2, true, PayloadRef::Inline), b"", None);
        assert_eq!(
            st.auto_replies,
            [AutoReply {
                serial: 1,
                code: reply_code::NOT_SERVED,
                message: "this client owns the name but does not serve it"
            }]
        );
        assert!(st.services["svc"].requests.is_empty());
    }

    fn answer(call_id: u64, outcome: Outcome<'_>, payload: PayloadRef) -> Answer<'_> {
        Answer { call_id, outcome, responder: Some(WHO), payload }
    }

    #[test]
    fn answers_reach_their_call_once_and_late_ones_are_dropped_with_their_memfd() {
        let name = format!("svc-answers-{}", std::process::id());
        let mut st = State::default();
        let t = Duration::from_secs(1);
        let a = st.new_call(t);
        let b = st.new_call(t);
        assert_ne!(a, b);
        // An answer for a call nobody waits for (given up, or never made).
        st.calls.remove(&a);
        let fd = memfd::from_bytes(&name, b"late").unwrap();
        st.on_answer(&answer(a, Outcome::Reply, PayloadRef::Memfd { len: 4 }), &[], Some(Ok((fd, 4))));
        assert_eq!(memfds_named(&name), 0, "dropped, and its fd closed");
        assert!(!st.calls.contains_key(&a));
        // A reply; a second answer to the same call changes nothing.
        st.on_answer(&answer(b, Outcome::Reply, PayloadRef::Inline), b"first", None);
        st.on_answer(&answer(b, Outcome::NoResponder, PayloadRef::Inline), b"", None);
        let got = st.calls.remove(&b).unwrap().answer.unwrap().unwrap();
        assert_eq!((got.payload(), got.responder()), (&b"first"[..], WHO));
        // Ids never collide, and never look like a send's.
        st.last_call = SEND_BIT - 2;
        let c = st.new_call(t);
        let d = st.new_call(t);
        assert_eq!(c, SEND_BIT - 1);
        assert!(d & SEND_BIT == 0 && d != c);
        assert!(st.refused_sends.is_empty(), "no send was involved");
    }

    #[test]
    fn a_refused_send_is_kept_for_flush_by_its_number() {
        let mut st = State::default();
        let (seq, call_id) = st.new_send();
        assert_eq!((seq, call_id), (1, SEND_BIT | 1));
        let (seq2, call_id2) = st.new_send();
        st.on_answer(&answer(call_id2, Outcome::NoResponder, PayloadRef::Inline), b"", None);
        // A send is never answered with a reply; if it were, nothing to report.
        st.on_answer(&answer(call_id, Outcome::Reply, PayloadRef::Inline), b"", None);
        assert_eq!(st.refused_sends.len(), 1);
        assert_eq!(st.refused_sends[0].seq, seq2);
        assert!(matches!(st.refused_sends[0].error, CallError::NoResponder { .. }));
        assert!(st.calls.is_empty());
    }

    #[test]
    fn a_name_answer_fills_only_a_waiting_slot_and_frees_its_id() {
        let mut st = State::default();
        let id = st.new_name_op().unwrap();
        st.on_name_answer(id, NameAnswer::Result(NameResult::PrimaryOwner));
        assert_eq!(st.name_ops[&id], Some(NameAnswer::Result(NameResult::PrimaryOwner)));
        // One that timed out: its slot is gone, its id kept until answered.
        let late = st.new_name_op().unwrap();
        st.name_ops.remove(&late);
        st.name_ids.set_next(late);
        let other = st.new_name_op().unwrap();
        assert_ne!(other, late);
        st.on_name_answer(late, NameAnswer::Refused(ErrorCode::LimitExceeded, "quota".into()));
        assert_eq!(st.name_ops[&other], None, "the late answer is not the new op's");
        st.name_ids.set_next(late);
        assert_eq!(st.new_name_op(), Some(late), "answered: free again");
    }

    // ------------------------------------------- on a socket pair --

    fn connected() -> (Arc<Inner>, OwnedFd) {
        let (ours, broker) = socket::pair().unwrap();
        let limits = Limits {
            max_packet: 65536,
            max_inline_payload: 65536,
            queue_bytes: 1 << 20,
            queue_frames: 1024,
            max_subscriptions: 100,
            fd_window: 64,
            max_depth: 32,
        };
        let cred = PeerCred { pid: 1, uid: 0, gid: 0 };
        let bounds = LocalBounds { messages: 1, ..LocalBounds::default() };
        (
            Arc::new(Inner::with_bounds(
                ours,
                1,
                limits,
                cred,
                "test".into(),
                bounds,
                None,
                Duration::from_secs(5),
            )),
            broker,
        )
    }

    fn broker_sends(broker: &OwnedFd, serve: &Serve<'_>, payload: &[u8], fd: Option<BorrowedFd<'_>>) {
        let head = shmbus_proto::frame::encode_head(serve).unwrap();
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        socket::send_packet(broker.as_fd(), OutPacket { head: &head, payload, fds: &fds }, false).unwrap();
    }

    /// What the client sent the broker, shortly: replies as
    /// (serial, Ok(payload) or Err(code)), fd acks as their count.
    #[derive(Debug, PartialEq, Eq)]
    enum Sent {
        Reply(u64, Result<Vec<u8>, u32>),
        Ack(u32),
        Release(String),
    }

    fn sent(broker: &OwnedFd) -> Vec<Sent> {
        use shmbus_proto::frame::{decode_client, ClientFrame};
        let mut batch = RecvBatch::new(8);
        let mut out = Vec::new();
        loop {
            match batch.recv(broker.as_fd(), true) {
                Ok(n) => {
                    for i in 0..n {
                        let (data, _, _) = batch.packet(i);
                        match decode_client(data).unwrap() {
                            ClientFrame::Reply(r, p) => out.push(Sent::Reply(
                                r.serial,
                                match r.status {
                                    ReplyStatus::Ok => Ok(p.to_vec()),
                                    ReplyStatus::Error { code, .. } => Err(code),
                                },
                            )),
                            ClientFrame::FdAck(a) => out.push(Sent::Ack(a.fds)),
                            ClientFrame::NameRelease(r) => out.push(Sent::Release(r.name.to_owned())),
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn read_a_while(inner: &Inner) {
        let got = inner.wait_for(Some(Instant::now() + Duration::from_millis(20)), |_| None::<()>).unwrap();
        assert!(got.is_none());
    }

    #[test]
    fn the_reader_answers_for_the_service_and_a_holder_of_send_does_when_it_lets_go() {
        let (inner, broker) = connected();
        inner.state.lock().services.insert("svc".into(), ServiceQueue::default());
        broker_sends(&broker, &serve_frame("svc", 1, false, PayloadRef::Inline), b"one", None);
        broker_sends(&broker, &serve_frame("svc", 2, false, PayloadRef::Inline), b"two", None);
        read_a_while(&inner);
        assert_eq!(
            sent(&broker),
            [Sent::Reply(2, Err(reply_code::OVERLOADED))],
            "queue of 1: #2 turned away"
        );
        // With `send` held elsewhere, the reader leaves it to the holder.
        let guard = inner.lock_send();
        broker_sends(&broker, &serve_frame("svc", 3, false, PayloadRef::Inline), b"three", None);
        read_a_while(&inner);
        assert_eq!(sent(&broker), []);
        drop(guard);
        assert_eq!(sent(&broker), [Sent::Reply(3, Err(reply_code::OVERLOADED))]);
        // A memfd request counts against the fd window like a delivery.
        let fd = memfd::from_bytes("svc-test", b"four").unwrap();
        inner.state.lock().take_request("svc").unwrap();
        broker_sends(
            &broker,
            &serve_frame("svc", 4, false, PayloadRef::Memfd { len: 4 }),
            &[],
            Some(fd.as_fd()),
        );
        read_a_while(&inner);
        assert_eq!(sent(&broker), [Sent::Ack(1)]);
        let q = inner.state.lock().take_request("svc").unwrap();
        assert!(q.payload.is_memfd());
        assert!(inner.state.lock().closed.is_none());
    }

    #[test]
    fn a_request_dropped_unanswered_is_answered_and_a_dropped_service_releases_its_name() {
        let (inner, broker) = connected();
        let client = Client::for_tests(inner.clone());
        inner.state.lock().services.insert("svc".into(), ServiceQueue::default());
        let service =
            Service { client, name: "svc".into(), result: NameResult::PrimaryOwner, released: false };
        broker_sends(&broker, &serve_frame("svc", 1, false, PayloadRef::Inline), b"one", None);
        let req = service.recv_timeout(Duration::from_secs(20)).unwrap().expect("the request");
        assert_eq!((req.name(), req.payload(), req.sender()), ("svc", &b"one"[..], WHO));
        drop(req);
        assert_eq!(sent(&broker), [Sent::Reply(1, Err(reply_code::UNANSWERED))]);
        // Answered: no second answer when it drops.
        broker_sends(&broker, &serve_frame("svc", 2, false, PayloadRef::Inline), b"two", None);
        service.recv_timeout(Duration::from_secs(20)).unwrap().expect("the request").reply(b"ok").unwrap();
        assert_eq!(sent(&broker), [Sent::Reply(2, Ok(b"ok".to_vec()))]);
        // Fire and forget: no answer, either way.
        broker_sends(&broker, &serve_frame("svc", 3, true, PayloadRef::Inline), b"three", None);
        let req = service.recv_timeout(Duration::from_secs(20)).unwrap().expect("the request");
        assert!(!req.expects_reply());
        drop(req);
        assert_eq!(sent(&broker), []);
        // Queued when the service drops: answered, and the name released.
        broker_sends(&broker, &serve_frame("svc", 4, false, PayloadRef::Inline), b"four", None);
        read_a_while(&inner);
        drop(service);
        assert_eq!(sent(&broker), [Sent::Release("svc".into()), Sent::Reply(4, Err(reply_code::UNANSWERED))]);
        assert!(inner.state.lock().services.is_empty());
    }

    #[test]
    fn a_revoked_name_ends_its_service_after_the_queued_requests_and_is_listed() {
        use shmbus_proto::frame::{Revocation, Revoked};
        let (inner, broker) = connected();
        let client = Client::for_tests(inner.clone());
        inner.state.lock().services.insert("svc".into(), ServiceQueue::default());
        let service = Service {
            client: client.clone(),
            name: "svc".into(),
            result: NameResult::PrimaryOwner,
            released: false,
        };
        let revoked = |name| {
            let reason = format!("policy reloaded: denied by policy: own {name}: no rule allows it");
            let head = shmbus_proto::frame::encode_head(&Revoked {
                what: Revocation::Name { name },
                reason: &reason,
            })
            .unwrap();
            socket::send_packet(broker.as_fd(), OutPacket { head: &head, payload: &[], fds: &[] }, false)
                .unwrap();
            reason
        };
        // A request queued before the notice is still served; then the
        // service says why it ends, every time.
        broker_sends(&broker, &serve_frame("svc", 1, false, PayloadRef::Inline), b"one", None);
        let svc_reason = revoked("svc");
        let plain_reason = revoked("plain.name");
        let req = service.recv_timeout(Duration::from_secs(20)).unwrap().expect("the queued request");
        req.reply(b"ok").unwrap();
        let e = service.recv().unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Denied);
        assert!(matches!(&e, RecvError::Revoked(r) if *r == svc_reason), "{e}");
        assert!(matches!(service.try_recv(), Err(RecvError::Revoked(_))));
        assert!(matches!(service.recv_timeout(Duration::from_secs(20)), Err(RecvError::Revoked(_))));
        let mut it = service.iter();
        assert!(matches!(it.next(), Some(Err(RecvError::Revoked(_)))));
        assert!(it.next().is_none());
        assert_eq!(service.revocation(), Some(svc_reason.clone()));
        // Both names are listed, the one owned without a service too.
        let listed: Vec<(String, String)> =
            client.revoked_names().into_iter().map(|r| (r.name, r.reason)).collect();
        assert_eq!(listed, [("svc".to_owned(), svc_reason), ("plain.name".to_owned(), plain_reason)]);
        // A name granted again is no longer revoked (the grant is matched
        // to its request as it arrives).
        {
            let mut st = inner.state.lock();
            let id = st.new_name_op().unwrap();
            st.name_requests.insert(id, "svc".into());
            st.on_name_answer(id, NameAnswer::Result(NameResult::PrimaryOwner));
        }
        assert_eq!(service.revocation(), None);
        assert_eq!(client.revoked_names().len(), 1);
        assert_eq!(sent(&broker), [Sent::Reply(1, Ok(b"ok".to_vec()))]);
    }

    #[test]
    fn revoked_names_are_bounded() {
        let mut st = State::default();
        for i in 0..MAX_REVOKED_NAMES + 10 {
            st.on_name_revoked(&format!("n.{i}"), "r");
        }
        // Revoked twice: listed once, as the latest.
        st.on_name_revoked("n.20", "again");
        assert_eq!(st.revoked_names.len(), MAX_REVOKED_NAMES);
        assert_eq!(
            st.revoked_names.front().map(|r| r.name.as_str()),
            Some("n.10"),
            "its old place is not counted twice"
        );
        assert_eq!(
            st.revoked_names.back().map(|r| (r.name.as_str(), r.reason.as_str())),
            Some(("n.20", "again"))
        );
    }

    #[test]
    fn handles_may_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Service>();
        send_sync::<Request>();
        send_sync::<Reply>();
        send_sync::<PendingCall>();
        send_sync::<CallError>();
    }

    #[test]
    fn a_call_with_a_timeout_past_the_clock_waits_for_the_broker() {
        let (inner, broker) = connected();
        let client = Client::for_tests(inner.clone());
        let mut call = client.request_async("svc", b"q", Duration::MAX).unwrap();
        assert!(call.deadline.is_none());
        assert!(call.try_get().unwrap().is_none());
        drop(broker);
        assert!(matches!(call.wait_timeout(Duration::MAX), Err(CallError::Disconnected(_))));
        assert!(matches!(call.try_get(), Err(CallError::AlreadyTaken)));
        assert!(inner.state.lock().calls.is_empty());
    }

    #[test]
    fn name_flags_build_up() {
        let f = NameFlags::shared().do_not_queue();
        assert!(f.shared && f.do_not_queue && !f.allow_replacement && !f.replace_existing);
        let f = NameFlags::exclusive().allow_replacement().replace_existing();
        assert!(!f.shared && f.allow_replacement && f.replace_existing && !f.do_not_queue);
    }
}
