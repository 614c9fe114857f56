//! Services for async code: calls, [`AsyncService`], and replies that
//! never block the executor.

use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use crate::error::check_subject;
use shmbus_proto::frame::{validate_origin, NameFlags, NameResult, PayloadRef, ReplyStatus};
use shmbus_proto::frame::{Reply as ReplyFrame, Request as RequestFrame};
use shmbus_proto::sys::memfd;

use super::driver::{self, Shared, Waiter};
use super::{AsyncClient, OnDrop};
use crate::connection::State;
use crate::error::{CallError, NameError, RecvError, ReplyError, ServeError};
use crate::loan::Loan;
use crate::service::{cut, timeout_ms, CallSlot, QueuedRequest, Reply, Request, Service};

impl AsyncClient {
    /// Serves `name`, owning it exclusively, as [`Client::serve`] (the
    /// broker's answer is awaited on tokio's blocking pool).
    ///
    /// [`Client::serve`]: crate::Client::serve
    pub async fn serve(&self, name: &str) -> Result<AsyncService, ServeError> {
        self.serve_with(name, NameFlags { do_not_queue: true, ..NameFlags::default() }).await
    }

    /// Serves `name`, asking for it with `flags`, as
    /// [`Client::serve_with`](crate::Client::serve_with).
    pub async fn serve_with(&self, name: &str, flags: NameFlags) -> Result<AsyncService, ServeError> {
        let client = self.client().clone();
        let owned = name.to_owned();
        // Dropped meanwhile: the service made there drops there too, and
        // releases the name.
        let service = driver::blocking(move || client.serve_with(&owned, flags)).await??;
        Ok(AsyncService::new(self.shared.clone(), service))
    }

    /// Calls `name` with `payload` and waits for the one answer, as
    /// [`Client::request`](crate::Client::request). Dropping the future
    /// gives up the call (its answer is dropped when it comes).
    pub async fn request(
        &self,
        name: &str,
        payload: impl AsRef<[u8]>,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        self.call(name, payload.as_ref(), timeout, None).await
    }

    /// Calls with an origin, as
    /// [`Client::request_with_origin`](crate::Client::request_with_origin).
    pub async fn request_with_origin(
        &self,
        name: &str,
        payload: impl AsRef<[u8]>,
        timeout: Duration,
        origin: &str,
    ) -> Result<Reply, CallError> {
        validate_origin(origin)?;
        self.call(name, payload.as_ref(), timeout, Some(origin)).await
    }

    async fn call(
        &self,
        name: &str,
        payload: &[u8],
        timeout: Duration,
        origin: Option<&str>,
    ) -> Result<Reply, CallError> {
        check_subject(name)?;
        let inner = self.shared.inner();
        let call_id = {
            let mut st = inner.state.lock();
            if let Some(d) = &st.closed {
                return Err(CallError::Disconnected(d.clone()));
            }
            st.new_call(timeout)
        };
        // However this ends, the slot goes: a late answer finds none.
        let _slot = OnDrop(|| {
            inner.state.lock().calls.remove(&call_id);
        });
        let sent = Instant::now();
        let sent_on = self.send_request(call_id, name, payload, timeout_ms(timeout), false, origin).await?;
        // If that connection is lost (or was already), so is the answer:
        // the call fails then with `Disconnected`, as a blocking one does,
        // rather than wait out its timeout.
        inner.state.lock().call_sent(call_id, sent_on);
        // The broker answers `Timeout` by then; the grace period covers a
        // broker that never answers.
        let deadline = sent.checked_add(timeout).and_then(|t| t.checked_add(self.client().timeout()));
        let got = driver::wait_for(&self.shared, deadline, |st: &mut State| match st.calls.get(&call_id) {
            Some(CallSlot { answer: Some(_), .. }) => st.calls.remove(&call_id).and_then(|s| s.answer),
            _ => None,
        })
        .await;
        match got {
            Ok(Some(answer)) => answer.map_err(|e| e.named(name)),
            Ok(None) => Err(CallError::Timeout { name: name.to_owned(), timeout }),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends `payload` to `name` with no answer expected, as
    /// [`Client::send`](crate::Client::send): the send's number on this
    /// connection.
    pub async fn send(&self, name: &str, payload: impl AsRef<[u8]>) -> Result<u64, CallError> {
        self.send_from(name, payload.as_ref(), None).await
    }

    /// Sends with an origin (the service reads it with `origin()`), as
    /// [`AsyncClient::request_with_origin`] calls with one.
    pub async fn send_with_origin(
        &self,
        name: &str,
        payload: impl AsRef<[u8]>,
        origin: &str,
    ) -> Result<u64, CallError> {
        validate_origin(origin)?;
        self.send_from(name, payload.as_ref(), Some(origin)).await
    }

    async fn send_from(&self, name: &str, payload: &[u8], origin: Option<&str>) -> Result<u64, CallError> {
        check_subject(name)?;
        let (seq, call_id) = {
            let mut st = self.shared.inner().state.lock();
            if let Some(d) = &st.closed {
                return Err(CallError::Disconnected(d.clone()));
            }
            st.new_send()
        };
        self.send_request(call_id, name, payload, 0, true, origin).await?;
        Ok(seq)
    }

    async fn send_request(
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
        if payload.len() > self.client().memfd_threshold() {
            let fd = memfd::from_bytes("shmbus-request", payload).map_err(CallError::Memfd)?;
            frame.payload = PayloadRef::Memfd { len: payload.len() as u64 };
            return Ok(driver::send_frame(&self.shared, &frame, &[], &[fd.as_fd()], false).await?);
        }
        Ok(driver::send_frame(&self.shared, &frame, payload, &[], false).await?)
    }
}

/// A name this client serves, from [`AsyncClient::serve`]: a
/// [`Stream`](futures_core::Stream) of the [`Request`]s sent to it, which
/// yields the error that ended it, then ends. Answer each with
/// [`Request::reply_async`] (or its siblings). Dropping it releases the
/// name and answers the requests still queued with
/// [`reply_code::UNANSWERED`](crate::reply_code::UNANSWERED), from tokio's
/// blocking pool (so just after the drop).
pub struct AsyncService {
    shared: Arc<Shared>,
    /// Always `Some` but in `drop`.
    service: Option<Service>,
    /// The stream's wait, kept between polls.
    waiter: Waiter,
    done: bool,
}

impl std::fmt::Debug for AsyncService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncService").field("name", &self.name()).field("result", &self.result()).finish()
    }
}

/// The next request queued for `name`, or, once none is and the broker
/// took the name back, why.
fn take(name: &str) -> impl FnMut(&mut State) -> Option<Result<QueuedRequest, String>> + '_ {
    move |st| match st.take_request(name) {
        Some(q) => Some(Ok(q)),
        None => st.services.get(name)?.revoked.clone().map(Err),
    }
}

impl AsyncService {
    fn new(shared: Arc<Shared>, service: Service) -> AsyncService {
        let waiter = Waiter::new(shared.clone());
        AsyncService { shared, service: Some(service), waiter, done: false }
    }

    fn service(&self) -> &Service {
        self.service.as_ref().expect("taken only in drop")
    }

    /// The name served.
    pub fn name(&self) -> &str {
        self.service().name()
    }

    /// What the broker answered when the service asked for its name, as
    /// [`Service::result`].
    pub fn result(&self) -> NameResult {
        self.service().result()
    }

    /// Requests this service turned away, as [`Service::turned_away`].
    pub fn turned_away(&self) -> u64 {
        self.service().turned_away()
    }

    /// Why the broker took the name back, if it did, as
    /// [`Service::revocation`].
    pub fn revocation(&self) -> Option<String> {
        self.service().revocation()
    }

    fn wrap(&self, r: Result<QueuedRequest, String>) -> Result<Request, RecvError> {
        r.map(|q| self.service().wrap(q)).map_err(RecvError::Revoked)
    }

    /// Waits for the next request. Cancel-safe: a request is taken only
    /// by the poll that returns it.
    pub async fn recv(&self) -> Result<Request, RecvError> {
        match driver::wait_for(&self.shared, None, take(self.name())).await? {
            Some(r) => self.wrap(r),
            None => {
                Err(RecvError::Io(std::io::Error::other("a wait without a deadline ended without its value")))
            }
        }
    }

    /// The next request if one is ready, reading what the socket holds
    /// without waiting.
    pub fn try_recv(&self) -> Result<Option<Request>, RecvError> {
        driver::try_now(&self.shared, take(self.name()))?.map(|r| self.wrap(r)).transpose()
    }

    /// Releases the name now, waiting for the broker's answer (on tokio's
    /// blocking pool), as [`Service::release`].
    pub async fn release(mut self) -> Result<NameResult, NameError> {
        let service = self.service.take().expect("taken only here and in drop");
        driver::blocking(move || service.release()).await?
    }
}

impl futures_core::Stream for AsyncService {
    type Item = Result<Request, RecvError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        let name = this.service.as_ref().expect("taken only in drop").name();
        let r = match this.waiter.poll(cx, take(name)) {
            Poll::Ready(Ok(r)) => {
                r.map(|q| this.service.as_ref().expect("held").wrap(q)).map_err(RecvError::Revoked)
            }
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => return Poll::Pending,
        };
        this.done = r.is_err();
        Poll::Ready(Some(r))
    }
}

impl futures_core::FusedStream for AsyncService {
    fn is_terminated(&self) -> bool {
        self.done
    }
}

impl Drop for AsyncService {
    fn drop(&mut self) {
        if let Some(service) = self.service.take() {
            // Its drop releases the name and answers what is queued, with
            // blocking sends.
            driver::off_executor(move || drop(service));
        }
    }
}

/// Replies for async code. Each sends at once when it can (the send lock
/// free, room in the socket: one non-blocking system call, as a blocking
/// reply makes); otherwise the blocking reply runs on tokio's blocking
/// pool, so the executor never waits. A dropped future still answers: the
/// request then drops, and a request dropped unanswered is answered
/// [`reply_code::UNANSWERED`](crate::reply_code::UNANSWERED).
impl Request {
    /// [`Request::reply`] for async code.
    pub async fn reply_async(mut self, payload: impl AsRef<[u8]>) -> Result<(), ReplyError> {
        let payload = payload.as_ref();
        if self.q.no_reply {
            self.answered = true;
            return Ok(());
        }
        if payload.len() > self.memfd_threshold {
            let fd = memfd::from_bytes("shmbus-reply", payload).map_err(ReplyError::Memfd)?;
            return self.reply_fd(fd, payload.len() as u64).await;
        }
        let frame =
            ReplyFrame { serial: self.q.serial, status: ReplyStatus::Ok, payload: PayloadRef::Inline };
        if driver::send_now(&self.inner, Some(self.q.generation), &frame, payload, &[]) {
            self.answered = true;
            return Ok(());
        }
        let payload = payload.to_vec();
        driver::blocking(move || self.reply(&payload)).await?
    }

    /// [`Request::reply_error`] for async code.
    pub async fn reply_error_async(mut self, code: u32, message: &str) -> Result<(), ReplyError> {
        if self.q.no_reply {
            self.answered = true;
            return Ok(());
        }
        let status = ReplyStatus::Error { code, message: cut(message) };
        let frame = ReplyFrame { serial: self.q.serial, status, payload: PayloadRef::Inline };
        if driver::send_now(&self.inner, Some(self.q.generation), &frame, &[], &[]) {
            self.answered = true;
            return Ok(());
        }
        let message = message.to_owned();
        driver::blocking(move || self.reply_error(code, &message)).await?
    }

    /// [`Request::reply_loan`] for async code.
    pub async fn reply_loan_async(mut self, loan: Loan) -> Result<(), ReplyError> {
        if self.q.no_reply {
            self.answered = true;
            return Ok(());
        }
        let (fd, len) = loan.seal().map_err(ReplyError::Memfd)?;
        self.reply_fd(fd, len).await
    }

    /// [`Request::reply_memfd`] for async code.
    pub async fn reply_memfd_async(mut self, fd: impl AsFd) -> Result<(), ReplyError> {
        if self.q.no_reply {
            self.answered = true;
            return Ok(());
        }
        let len = memfd::sealed_len(fd.as_fd())?;
        self.reply_fd(fd.as_fd().try_clone_to_owned()?, len).await
    }

    async fn reply_fd(mut self, fd: std::os::fd::OwnedFd, len: u64) -> Result<(), ReplyError> {
        let frame =
            ReplyFrame { serial: self.q.serial, status: ReplyStatus::Ok, payload: PayloadRef::Memfd { len } };
        if driver::send_now(&self.inner, Some(self.q.generation), &frame, &[], &[fd.as_fd()]) {
            self.answered = true;
            return Ok(());
        }
        driver::blocking(move || self.reply_memfd(fd)).await?
    }
}
