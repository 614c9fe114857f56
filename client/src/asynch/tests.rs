//! The async driver against a fake broker on a socket pair: waiting for
//! room, handing the reactor's waker over, acknowledging fds before
//! waiting, and taking back a cancelled subscribe.

use std::future::{poll_fn, Future};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use shmbus_proto::frame::{
    decode_client, encode_head, Body, ClientFrame, Deliver, PayloadRef, Sender, Subscribed,
};
use shmbus_proto::sys::memfd;
use shmbus_proto::sys::socket::{self, OutPacket, PeerCred, RecvBatch};

use super::{AsyncClient, AsyncSubscription};
use crate::client::Client;
use crate::connection::Inner;
use crate::message::Event;

const PATIENCE: Duration = Duration::from_secs(20);
const SENDER: Sender = Sender { client_id: 2, uid: 0, gid: 0, pid: 2 };

/// An async client on one end of a socket pair (fd window `window`), and
/// the other end, for the test to play the broker.
fn connected(window: u32) -> (AsyncClient, OwnedFd) {
    let (ours, broker) = socket::pair().unwrap();
    let limits = crate::link::tests::limits(window);
    let cred = PeerCred { pid: 1, uid: 0, gid: 0 };
    let inner = Inner::new(ours, 1, limits, cred, "test".into(), 1024);
    (AsyncClient::from_blocking(Client::for_tests(Arc::new(inner))).unwrap(), broker)
}

/// A subscription the broker acknowledged, made without the broker.
fn live_subscription(c: &AsyncClient, pattern: &str) -> AsyncSubscription {
    let id = {
        let mut st = c.shared.inner().state.lock();
        let id = st.new_sub_id().unwrap();
        st.add_sub(id, Vec::new());
        st.sub_ids.answered(id);
        id
    };
    AsyncSubscription::new(c.shared.clone(), id, pattern.to_owned())
}

fn broker_sends<B: Body>(broker: &OwnedFd, body: &B, payload: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
    let head = encode_head(body).unwrap();
    socket::send_packet(broker.as_fd(), OutPacket { head: &head, payload, fds }, false).unwrap();
}

fn deliver(broker: &OwnedFd, sub_id: u32, seq: u64, payload: &[u8]) {
    let d = Deliver { sub_id, topic: "t.x", sender: SENDER, seq, origin: None, payload: PayloadRef::Inline };
    broker_sends(broker, &d, payload, &[]);
}

/// What the client sent, shortly, reading without waiting.
fn client_sent(broker: &OwnedFd) -> Vec<String> {
    let mut batch = RecvBatch::new(64);
    let mut out = Vec::new();
    loop {
        match batch.recv(broker.as_fd(), true) {
            Ok(n) => {
                for i in 0..n {
                    let (data, _, _) = batch.packet(i);
                    out.push(match decode_client(data).unwrap() {
                        ClientFrame::Subscribe(s) => format!("subscribe {}", s.sub_id),
                        ClientFrame::Unsubscribe(u) => format!("unsubscribe {}", u.sub_id),
                        ClientFrame::FdAck(a) => format!("ack {}", a.fds),
                        ClientFrame::Publish(..) => "publish".into(),
                        other => format!("{other:?}"),
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return out,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Polls `fut` once: its output, if it is done.
async fn poll_once<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    poll_fn(|cx| {
        Poll::Ready(match std::pin::Pin::new(&mut *fut).poll(cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        })
    })
    .await
}

#[tokio::test]
async fn a_publish_waits_for_room_in_the_socket_without_blocking() {
    let (c, broker) = connected(8);
    let payload = vec![5u8; 8192];
    // Fill the socket until a publish has to wait.
    let mut sent = 0;
    let pending = loop {
        let mut fut = Box::pin(c.publish("t.x", &payload));
        match poll_once(&mut fut).await {
            Some(r) => {
                r.unwrap();
                sent += 1;
                assert!(sent < 100_000, "the socket never filled");
            }
            None => break fut,
        }
    };
    assert!(sent > 0);
    // The executor is free meanwhile: another task runs.
    assert_eq!(tokio::spawn(async { 7 }).await.unwrap(), 7);
    // The broker reads: the publish goes.
    let reader = std::thread::spawn(move || {
        let mut n = 0;
        let mut batch = RecvBatch::new(64);
        while n < sent + 1 {
            n += batch.recv(broker.as_fd(), false).unwrap();
        }
        n
    });
    tokio::time::timeout(PATIENCE, pending).await.expect("woken once there was room").unwrap();
    assert_eq!(reader.join().unwrap(), sent + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_stops_hands_the_socket_to_the_others() {
    let (c, broker) = connected(8);
    let a = Arc::new(live_subscription(&c, "a"));
    let b = live_subscription(&c, "b");
    for round in 0..10u64 {
        // A waits on the socket; B waits after it, so the reactor wakes
        // only B; B is dropped, then a message for A comes.
        let waiting = tokio::spawn({
            let a = a.clone();
            async move { a.recv().await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        {
            let mut recv = Box::pin(b.recv());
            assert!(poll_once(&mut recv).await.is_none());
        }
        deliver(&broker, a.id(), round, b"for a");
        let ev = tokio::time::timeout(PATIENCE, waiting).await.expect("A was handed the socket").unwrap();
        assert_eq!(ev.unwrap().message().map(|m| m.seq()), Some(round));
        // B's turn to end by getting its value, A waiting behind it.
        let waiting = tokio::spawn({
            let a = a.clone();
            async move { a.recv().await }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let mut recv = Box::pin(b.recv());
        assert!(poll_once(&mut recv).await.is_none());
        deliver(&broker, b.id(), round, b"for b");
        assert!(tokio::time::timeout(PATIENCE, recv).await.unwrap().is_ok());
        deliver(&broker, a.id(), 100 + round, b"for a");
        let ev = tokio::time::timeout(PATIENCE, waiting).await.expect("A after B got its own").unwrap();
        assert_eq!(ev.unwrap().message().map(|m| m.seq()), Some(100 + round));
    }
}

#[tokio::test]
async fn every_fd_taken_is_acknowledged_before_a_task_waits() {
    let (c, broker) = connected(8);
    let sub = live_subscription(&c, "m");
    for seq in 0..3 {
        let fd = memfd::from_bytes("test", b"abc").unwrap();
        let d = Deliver {
            sub_id: sub.id(),
            topic: "t.x",
            sender: SENDER,
            seq,
            origin: None,
            payload: PayloadRef::Memfd { len: 3 },
        };
        broker_sends(&broker, &d, &[], &[fd.as_fd()]);
    }
    for _ in 0..3 {
        assert!(tokio::time::timeout(PATIENCE, sub.recv()).await.unwrap().unwrap().message().is_some());
    }
    // 3 is below the threshold (half the window): no ack until someone
    // waits; a task waiting for more sends it.
    assert!(tokio::time::timeout(Duration::from_millis(20), sub.recv()).await.is_err());
    assert_eq!(client_sent(&broker), ["ack 3"]);
}

#[tokio::test]
async fn a_cancelled_subscribe_is_taken_back_and_its_id_kept_until_answered() {
    let (c, broker) = connected(8);
    {
        let mut fut = pin!(c.subscribe("a.b"));
        let mut fut = fut.as_mut();
        assert!(poll_once(&mut fut).await.is_none(), "waits for the broker");
    }
    assert_eq!(client_sent(&broker), ["subscribe 1", "unsubscribe 1"]);
    {
        let st = c.shared.inner().state.lock();
        assert!(st.subs.is_empty() && st.awaiting_ack.is_empty());
        assert!(st.sub_ids.owes(1), "both answers owed");
    }
    // The broker answers both; the id is free again only then.
    broker_sends(&broker, &Subscribed { sub_id: 1 }, &[], &[]);
    broker_sends(&broker, &Subscribed { sub_id: 1 }, &[], &[]);
    let _ = super::driver::try_now(&c.shared, |_| None::<()>);
    assert!(!c.shared.inner().state.lock().sub_ids.owes(1));
    // A subscription made now gets no stray answer.
    let mut fut = Box::pin(c.subscribe("c.d"));
    assert!(poll_once(&mut fut).await.is_none());
    let sent = client_sent(&broker);
    let id: u32 = sent[sent.len() - 1].strip_prefix("subscribe ").unwrap().parse().unwrap();
    broker_sends(&broker, &Subscribed { sub_id: id }, &[], &[]);
    let sub = tokio::time::timeout(PATIENCE, fut).await.unwrap().unwrap();
    deliver(&broker, id, 9, b"x");
    match tokio::time::timeout(PATIENCE, sub.recv()).await.unwrap().unwrap() {
        Event::Message(m) => assert_eq!(m.payload(), b"x"),
        other => panic!("{other:?}"),
    }
}

/// A connection lost right after a ping went out (before its waiter
/// looks): the waiter fails with `Disconnected` at once, instead of
/// waiting out its timeout for a pong that cannot come. (The waiter used
/// to read the loss count after the send, so a loss in between was
/// already counted, and it waited out the deadline: `Ok(None)`.)
#[tokio::test]
async fn an_answer_lost_between_its_send_and_its_wait_fails_as_disconnected() {
    let (c, broker) = connected(8);
    let inner = c.shared.inner();
    let token = inner.state.lock().new_ping();
    let sent_on = super::driver::send_frame(&c.shared, &shmbus_proto::frame::Ping { token }, &[], &[], false)
        .await
        .unwrap();
    assert_eq!(
        client_sent(&broker),
        [format!("{:?}", ClientFrame::Ping(shmbus_proto::frame::Ping { token }))]
    );
    inner.state.lock().connection_lost(crate::error::Disconnect { code: None, reason: "reset".into() });
    let started = std::time::Instant::now();
    let came = |st: &mut crate::core::State| (st.pings.get(&token) == Some(&true)).then_some(());
    let waited = super::driver::wait_answer(&c.shared, Some(started + PATIENCE), sent_on, came).await;
    assert!(
        matches!(&waited, Err(crate::error::RecvError::Disconnected(d)) if d.reason.contains("reset")),
        "{waited:?} after {:?}",
        started.elapsed()
    );
}

// ------------------------------------------------- shared-memory link --

/// An async client whose connection has a shared-memory link, and its
/// fake broker.
fn linked(window: u32) -> (AsyncClient, crate::link::tests::FakeBroker) {
    let (inner, broker) = crate::link::tests::linked_inner(window);
    (AsyncClient::from_blocking(Client::for_tests(Arc::new(inner))).unwrap(), broker)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_waiting_on_a_linked_connection_is_woken_by_the_doorbell() {
    use crate::link::tests::deliver;
    let (c, mut broker) = linked(8);
    assert_eq!(c.transport(), crate::Transport::SharedMemory);
    let sub = Arc::new(live_subscription(&c, "a"));
    // In the ring before anyone waits: read without the socket readable.
    broker.write(&deliver(sub.id(), 1), b"");
    let ev = tokio::time::timeout(PATIENCE, sub.recv()).await.unwrap().unwrap();
    assert_eq!(ev.message().map(|m| m.seq()), Some(1));
    for seq in 2..50 {
        let waiting = tokio::spawn({
            let sub = sub.clone();
            async move { sub.recv().await }
        });
        // Once the task sleeps (its flag raised), the broker's frame
        // rings the socket and the reactor wakes it.
        if seq % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        broker.write(&deliver(sub.id(), seq), b"");
        let ev = tokio::time::timeout(PATIENCE, waiting).await.expect("woken").unwrap().unwrap();
        assert_eq!(ev.message().map(|m| m.seq()), Some(seq));
    }
    // Nothing but the broker's doorbells and our ring records: the socket
    // holds no frame of ours.
    assert_eq!(client_sent(&broker.fd), Vec::<String>::new());
}

/// A waker that notes it was woken.
struct Noted(std::sync::atomic::AtomicBool);

impl std::task::Wake for Noted {
    fn wake(self: Arc<Self>) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Noted {
    fn woken(&self) -> bool {
        self.0.swap(false, std::sync::atomic::Ordering::SeqCst)
    }
}

/// The hang of a flooded bridge: a task that takes the socket's readiness
/// (the reactor woke it) while another task's quiet look at the ring is
/// under way waits for that reader to wake it; the quiet read, having
/// looked before the frame came, finds nothing, and must wake it all the
/// same, or no one reads again (the reactor wakes only a task that found
/// the socket not ready, and the broker rings once per sleep).
#[tokio::test]
// The reader lock stands for another task's read in progress while the
// reactor turns (one thread: nothing else takes it).
#[allow(clippy::await_holding_lock)]
async fn a_task_deferring_to_a_quiet_read_that_finds_nothing_is_woken() {
    use crate::link::tests::deliver;
    let (c, mut broker) = linked(8);
    let sub = live_subscription(&c, "a");
    let inner = c.shared.inner().clone();
    let noted = Arc::new(Noted(std::sync::atomic::AtomicBool::new(false)));
    let waker = std::task::Waker::from(noted.clone());
    let mut cx = std::task::Context::from_waker(&waker);
    // The task waits: the ring is empty, its flag up, the reactor has it.
    let mut fut = Box::pin(sub.recv());
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    // Another task's quiet read is under way (it found the ring empty)
    // when the broker writes and rings.
    let quiet = inner.reader.lock();
    broker.write(&deliver(sub.id(), 1), b"");
    let deadline = std::time::Instant::now() + PATIENCE;
    while !noted.woken() {
        assert!(std::time::Instant::now() < deadline, "the reactor never saw the doorbell");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The task takes the readiness and finds the reader busy.
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    // The quiet read ends with nothing.
    drop(quiet);
    assert!(!inner.after_quiet_read(Ok(false)).unwrap());
    assert!(noted.woken(), "the task that deferred to the reader was not woken");
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(ev)) => assert_eq!(ev.message().map(|m| m.seq()), Some(1)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_publish_waits_for_room_in_the_ring_without_blocking() {
    let (c, mut broker) = linked(8);
    // Inline (below the tests' memfd threshold): records in the ring.
    let payload = vec![5u8; 1000];
    let mut sent = 0;
    let pending = loop {
        let mut fut = Box::pin(c.publish("t.x", &payload));
        match poll_once(&mut fut).await {
            Some(r) => {
                r.unwrap();
                sent += 1;
                assert!(sent < 100_000, "the ring never filled");
            }
            None => break fut,
        }
    };
    assert!(sent > 0);
    assert_eq!(tokio::spawn(async { 7 }).await.unwrap(), 7);
    // The broker reads the ring: the publish goes.
    let reader = std::thread::spawn(move || {
        let mut n = 0;
        let deadline = std::time::Instant::now() + PATIENCE;
        while n < sent + 1 {
            assert!(std::time::Instant::now() < deadline);
            let got = broker.records();
            assert!(got.iter().all(|r| r == "publish t.x 1000"), "{got:?}");
            n += got.len();
            std::thread::sleep(Duration::from_millis(1));
        }
        n
    });
    tokio::time::timeout(PATIENCE, pending).await.expect("tried again once there was room").unwrap();
    assert_eq!(reader.join().unwrap(), sent + 1);
}

#[tokio::test]
async fn publish_many_on_a_link_fills_the_ring_in_order() {
    let (c, mut broker) = linked(8);
    let topics: Vec<String> = (0..200).map(|i| format!("t.{i}")).collect();
    c.publish_many(topics.iter().map(|t| (t.as_str(), &b"x"[..]))).await.unwrap();
    let got = broker.records();
    let want: Vec<String> = topics.iter().map(|t| format!("publish {t} 1")).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn a_task_waiting_on_a_quiet_link_sleeps() {
    use crate::link::tests::deliver;
    let (c, mut broker) = linked(8);
    let sub = live_subscription(&c, "a");
    let mut polls = 0u32;
    let mut recv = Box::pin(sub.recv());
    let waiting = poll_fn(|cx| {
        polls += 1;
        recv.as_mut().poll(cx)
    });
    // Nothing comes for a while: the task is polled a few times, not in a
    // loop.
    assert!(tokio::time::timeout(Duration::from_millis(200), waiting).await.is_err());
    assert!(polls < 10, "polled {polls} times while nothing came");
    broker.write(&deliver(sub.id(), 1), b"");
    let ev = tokio::time::timeout(PATIENCE, sub.recv()).await.unwrap().unwrap();
    assert_eq!(ev.message().map(|m| m.seq()), Some(1));
}
