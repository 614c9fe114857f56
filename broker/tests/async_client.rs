//! The async client (`shmbus` with the `tokio` feature) end to end, on a
//! real broker: pub/sub and streams, memfd payloads, calls to an async
//! service, ring channels, cancellation of every kind of future, and the
//! blocking API on the same connection. Every wait is bounded.

mod common;

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use common::*;
use futures_core::Stream;
use shmbus::{
    reply_code, AsyncClient, CallError, ChannelConfig, ChannelEvent, ChannelOverflow, ErrorKind, Event,
    ReconnectPolicy, RecvError,
};

/// `fut`, or a panic naming `what` once [`PATIENCE`] passes.
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(PATIENCE, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: nothing within {PATIENCE:?}"),
    }
}

/// The next item of a stream.
async fn next<S: Stream + Unpin>(s: &mut S) -> Option<S::Item> {
    poll_fn(|cx| Pin::new(&mut *s).poll_next(cx)).await
}

async fn connect(b: &Broker) -> AsyncClient {
    bounded("connect", b.options().name("async-test").connect_async()).await.expect("connect")
}

fn message(ev: Event) -> shmbus::Message {
    match ev {
        Event::Message(m) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

/// The number of subscribers the broker counts on `pattern`.
fn subscribers(c: &shmbus::Client, pattern: &str) -> u32 {
    c.topics().unwrap().into_iter().find(|t| t.pattern == pattern).map_or(0, |t| t.subscribers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe_with_recv_and_as_a_stream() {
    let b = Broker::start("async-pubsub");
    let publisher = connect(&b).await;
    let subscriber = connect(&b).await;
    let sub = bounded("subscribe", subscriber.subscribe("a.*")).await.unwrap();
    let mut stream = bounded("subscribe", subscriber.subscribe("a.>")).await.unwrap();
    for i in 0..100u32 {
        publisher.publish(&format!("a.{i}"), &i.to_le_bytes()).await.unwrap();
    }
    publisher.publish_many((100..200u32).map(|_| ("a.many", &b"m"[..]))).await.unwrap();
    bounded("flush", publisher.flush()).await.unwrap();
    for i in 0..100u32 {
        let m = message(bounded("recv", sub.recv()).await.unwrap());
        assert_eq!((m.topic(), m.payload()), (format!("a.{i}").as_str(), &i.to_le_bytes()[..]));
        assert_eq!(m.sender().client_id, publisher.id());
        let m = message(bounded("next", next(&mut stream)).await.unwrap().unwrap());
        assert_eq!(m.topic(), format!("a.{i}"));
    }
    for _ in 100..200 {
        let m = message(bounded("recv", sub.recv()).await.unwrap());
        assert_eq!((m.topic(), m.payload()), ("a.many", &b"m"[..]));
        let m = message(bounded("next", next(&mut stream)).await.unwrap().unwrap());
        assert_eq!(m.topic(), "a.many");
    }
    assert!(sub.try_recv().unwrap().is_none());
    assert_eq!(sub.pattern(), "a.*");
    // Dropping unsubscribes.
    assert_eq!(subscribers(subscriber.blocking(), "a.*"), 1);
    drop(sub);
    subscriber.flush().await.unwrap();
    assert_eq!(subscribers(subscriber.blocking(), "a.*"), 0);
    assert_eq!(subscribers(subscriber.blocking(), "a.>"), 1);
}

#[tokio::test]
async fn a_single_threaded_runtime_serves_and_calls_itself() {
    let b = Broker::start("async-self");
    let c = connect(&b).await;
    let sub = c.subscribe("self.x").await.unwrap();
    c.publish("self.x", b"hello").await.unwrap();
    assert_eq!(message(bounded("recv", sub.recv()).await.unwrap()).payload(), b"hello");
    let mut service = bounded("serve", c.serve("self.echo")).await.unwrap();
    let server = tokio::spawn(async move {
        while let Some(r) = next(&mut service).await {
            let r = r.unwrap();
            let answer = [b"echo: ", r.payload()].concat();
            r.reply_async(&answer).await.unwrap();
        }
    });
    for i in 0..20 {
        let reply =
            bounded("call", c.request("self.echo", format!("{i}").as_bytes(), PATIENCE)).await.unwrap();
        assert_eq!(reply.payload(), format!("echo: {i}").as_bytes());
        assert_eq!(reply.responder().client_id, c.id());
    }
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memfd_payloads_travel_both_ways() {
    let b = Broker::start("async-memfd");
    let c = connect(&b).await;
    let sub = c.subscribe("big.>").await.unwrap();
    // Above the default threshold (the 64 KiB inline limit): a memfd.
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    c.publish("big.copy", &big).await.unwrap();
    let mut loan = c.loan(100_000).unwrap();
    loan.fill(7);
    c.publish_loan("big.loan", loan).await.unwrap();
    let m = message(bounded("recv", sub.recv()).await.unwrap());
    assert!(m.is_memfd());
    assert_eq!(m.payload(), &big[..]);
    let m = message(bounded("recv", sub.recv()).await.unwrap());
    assert!(m.is_memfd() && m.len() == 100_000 && m.payload().iter().all(|&x| x == 7));
    // Passed on as it came, by fd.
    c.publish_fd("big.again", m.into_fd().unwrap()).await.unwrap();
    assert_eq!(message(bounded("recv", sub.recv()).await.unwrap()).len(), 100_000);

    // A request and its reply by memfd.
    let mut service = c.serve("big.service").await.unwrap();
    let server = tokio::spawn(async move {
        let r = next(&mut service).await.unwrap().unwrap();
        assert!(r.is_memfd());
        let mut reversed = r.payload().to_vec();
        reversed.reverse();
        r.reply_async(&reversed).await.unwrap();
        service
    });
    let reply = bounded("call", c.request("big.service", &big, PATIENCE)).await.unwrap();
    assert!(reply.is_memfd());
    let mut expect = big.clone();
    expect.reverse();
    assert_eq!(reply.payload(), &expect[..]);
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_memfds_to_an_async_subscriber_never_stall_on_the_fd_window() {
    let b = Broker::start("async-fdacks");
    let publisher = connect(&b).await;
    let c = connect(&b).await;
    let sub = c.subscribe("fds.x").await.unwrap();
    let payload = vec![1u8; 70_000];
    let total = 600u64;
    let (mut got, mut missed) = (0u64, 0u64);
    let mut sent = 0;
    // In rounds (the broker's queue holds 256 fds per connection): what
    // each brings must arrive, acknowledged, before the next.
    while sent < total {
        for _ in 0..100 {
            publisher.publish("fds.x", &payload).await.unwrap();
            sent += 1;
        }
        publisher.flush().await.unwrap();
        while got + missed < sent {
            match bounded("recv", sub.recv()).await.unwrap() {
                Event::Message(m) => {
                    assert_eq!(m.len(), payload.len());
                    got += 1;
                }
                Event::Gap { missed: k } => missed += k,
                Event::Reconnected => panic!("no restart here"),
            }
        }
    }
    assert_eq!(got + missed, total);
    assert!(got >= total / 2, "{got} delivered, {missed} missed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_an_async_service_get_every_kind_of_answer() {
    let b = Broker::start("async-calls");
    let caller = connect(&b).await;
    let server = connect(&b).await;
    let mut service = bounded("serve", server.serve("calc")).await.unwrap();
    assert_eq!(service.name(), "calc");
    let task = tokio::spawn(async move {
        while let Some(r) = next(&mut service).await {
            let r = r.unwrap();
            match r.payload() {
                b"fail" => r.reply_error_async(42, "no such thing").await.unwrap(),
                b"drop" => drop(r),
                p => {
                    let n: u64 = std::str::from_utf8(p).unwrap().parse().unwrap();
                    r.reply_async((n * 2).to_string().as_bytes()).await.unwrap();
                }
            }
        }
    });
    // Many in flight at once, from tasks of one client.
    let caller = Arc::new(caller);
    let mut calls = Vec::new();
    for i in 0..64u64 {
        let c = caller.clone();
        calls.push(tokio::spawn(async move {
            let reply = c.request("calc", i.to_string().as_bytes(), PATIENCE).await.unwrap();
            assert_eq!(reply.payload(), (i * 2).to_string().as_bytes());
        }));
    }
    for call in calls {
        bounded("calls", call).await.unwrap();
    }
    match bounded("call", caller.request("calc", b"fail", PATIENCE)).await {
        Err(CallError::App { name, code: 42, message }) => {
            assert_eq!((name.as_str(), message.as_str()), ("calc", "no such thing"))
        }
        other => panic!("{other:?}"),
    }
    match bounded("call", caller.request("calc", b"drop", PATIENCE)).await {
        Err(CallError::App { code, .. }) => assert_eq!(code, reply_code::UNANSWERED),
        other => panic!("{other:?}"),
    }
    match bounded("call", caller.request("nobody.home", b"?", PATIENCE)).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::NoResponder, "{e}"),
        Ok(r) => panic!("{r:?}"),
    }
    // Fire and forget.
    assert_eq!(caller.send("calc", b"5").await.unwrap(), 1);
    caller.flush().await.unwrap();
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loaned_reply_and_a_dropped_service() {
    let b = Broker::start("async-loan-reply");
    let caller = connect(&b).await;
    let server = connect(&b).await;
    let mut service = server.serve("loaner").await.unwrap();
    let loans = server.clone();
    let task = tokio::spawn(async move {
        let r = next(&mut service).await.unwrap().unwrap();
        let mut loan = loans.loan(4096).unwrap();
        loan.fill(9);
        r.reply_loan_async(loan).await.unwrap();
        // Dropped with a request queued: it is answered UNANSWERED, and
        // the name released.
        let queued = loop {
            if let Some(r) = service.try_recv().unwrap() {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        drop(queued);
        // Dropped: the name is released.
        drop(service);
    });
    let reply = bounded("call", caller.request("loaner", b"", PATIENCE)).await.unwrap();
    assert!(reply.is_memfd() && reply.payload() == [9u8; 4096]);
    match bounded("call", caller.request("loaner", b"", PATIENCE)).await {
        Err(CallError::App { code, .. }) => assert_eq!(code, reply_code::UNANSWERED),
        other => panic!("{other:?}"),
    }
    bounded("service task", task).await.unwrap();
    let deadline = Instant::now() + PATIENCE;
    while caller.blocking().name_owner("loaner").unwrap().is_some() {
        assert!(Instant::now() < deadline, "the name was never released");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_channels_read_from_async_code() {
    let b = Broker::start("async-ring");
    let c = connect(&b).await;
    let cfg = ChannelConfig { slot_size: 64, slot_count: 16, overflow: ChannelOverflow::Block };
    let blocking = c.blocking().clone();
    let mut publisher =
        tokio::task::spawn_blocking(move || blocking.channel_publisher("ring.x", cfg).unwrap())
            .await
            .unwrap();
    let mut reader = bounded("join", c.channel_subscriber("ring.x")).await.unwrap();
    assert!(reader.try_recv_vec().unwrap().is_none());
    // Already there.
    publisher.publish(b"one").unwrap();
    assert_eq!(
        bounded("recv", reader.recv_vec()).await.unwrap(),
        ChannelEvent::Message { seq: 0, value: b"one".to_vec() }
    );
    // Published while the reader sleeps.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let writer = std::thread::spawn(move || {
        for i in 2..=200u64 {
            if i % 50 == 0 {
                std::thread::sleep(Duration::from_millis(30));
            }
            publisher.publish(&i.to_le_bytes()).unwrap();
        }
        rx.recv().unwrap();
        publisher
    });
    for i in 2..=200u64 {
        match bounded("recv", reader.recv(|b| b.to_vec())).await.unwrap() {
            ChannelEvent::Message { seq, value } => {
                assert_eq!((seq, value), (i - 1, i.to_le_bytes().to_vec()))
            }
            other => panic!("{other:?}"),
        }
    }
    // A recv dropped while it waits loses nothing.
    for _ in 0..3 {
        assert!(tokio::time::timeout(Duration::from_millis(30), reader.recv_vec()).await.is_err());
    }
    tx.send(()).unwrap();
    let mut publisher = writer.join().unwrap();
    publisher.publish(b"last").unwrap();
    assert_eq!(
        bounded("recv", reader.recv_vec()).await.unwrap(),
        ChannelEvent::Message { seq: 200, value: b"last".to_vec() }
    );
    // The publisher goes: the reader ends.
    drop(publisher);
    let end = bounded("recv", reader.recv_vec()).await.unwrap_err();
    assert_eq!(end.kind(), ErrorKind::Disconnected, "{end}");
}

/// Polls `fut` once (so it sends what it sends first), then drops it.
async fn poll_once_and_drop<F: Future>(fut: F) -> Option<F::Output> {
    let mut fut = pin!(fut);
    poll_fn(|cx| {
        Poll::Ready(match fut.as_mut().poll(cx) {
            Poll::Ready(v) => Some(v),
            Poll::Pending => None,
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_subscribe_is_taken_back_and_the_connection_goes_on() {
    let b = Broker::start("async-cancel-sub");
    let c = connect(&b).await;
    let probe = b.client();
    for _ in 0..50 {
        // Sent, not yet answered, dropped (or answered at once, and the
        // subscription dropped: the same for the broker).
        let _ = poll_once_and_drop(c.subscribe("cancel.me")).await;
    }
    c.flush().await.unwrap();
    assert_eq!(subscribers(&probe, "cancel.me"), 0, "every subscription taken back");
    // Dropped before it could send (the first poll never came).
    drop(c.subscribe("cancel.never"));
    // Ids were handed back: thousands more subscriptions work, and deliver.
    let sub = c.subscribe("cancel.me").await.unwrap();
    c.publish("cancel.me", b"still here").await.unwrap();
    assert_eq!(message(bounded("recv", sub.recv()).await.unwrap()).payload(), b"still here");
    assert!(sub.try_recv().unwrap().is_none(), "no stray copy from a taken-back subscription");
    assert_eq!(subscribers(&probe, "cancel.me"), 1);
    // Dropped by a timeout while waiting.
    for _ in 0..20 {
        let _ = tokio::time::timeout(Duration::from_micros(1), c.subscribe("cancel.late")).await;
    }
    c.flush().await.unwrap();
    assert_eq!(subscribers(&probe, "cancel.late"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_call_gives_up_its_slot_and_a_late_answer_is_dropped() {
    let b = Broker::start("async-cancel-call");
    let caller = connect(&b).await;
    let server = connect(&b).await;
    let mut service = server.serve("slow").await.unwrap();
    let held = tokio::spawn(async move {
        // Holds the first request, answers the rest at once.
        let first = next(&mut service).await.unwrap().unwrap();
        let mut rest = Vec::new();
        for _ in 0..2 {
            let r = next(&mut service).await.unwrap().unwrap();
            rest.push(r.payload().to_vec());
            r.reply_async(b"quick").await.unwrap();
        }
        first.reply_async(b"late").await.unwrap();
        (rest, service)
    });
    // Given up by a timeout, and by a plain drop after sending.
    assert!(tokio::time::timeout(Duration::from_millis(50), caller.request("slow", b"1", PATIENCE))
        .await
        .is_err());
    let _ = poll_once_and_drop(caller.request("slow", b"2", PATIENCE)).await;
    let reply = bounded("call", caller.request("slow", b"3", PATIENCE)).await.unwrap();
    assert_eq!(reply.payload(), b"quick");
    let (rest, _service) = bounded("service", held).await.unwrap();
    assert_eq!(rest, [b"2".to_vec(), b"3".to_vec()]);
    // The late answer to the first found no one, and changed nothing.
    caller.flush().await.unwrap();
    let sub = caller.subscribe("after").await.unwrap();
    caller.publish("after", b"ok").await.unwrap();
    assert_eq!(message(bounded("recv", sub.recv()).await.unwrap()).payload(), b"ok");
    // A dropped ping, likewise.
    let _ = poll_once_and_drop(caller.ping()).await;
    bounded("ping", caller.ping()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_wait_hands_the_socket_over() {
    let b = Broker::start("async-cancel-wait");
    let c = connect(&b).await;
    let publisher = connect(&b).await;
    let a = Arc::new(c.subscribe("w.a").await.unwrap());
    let gone = c.subscribe("w.gone").await.unwrap();
    let stream_gone = c.subscribe("w.stream").await.unwrap();
    for round in 0..20u32 {
        // A waits; then others wait after it (so they hold the reactor's
        // waker), and are dropped: by abort, by a timeout, and a stream
        // dropped mid-wait.
        let waiting = {
            let a = a.clone();
            tokio::spawn(async move { a.recv().await })
        };
        tokio::time::sleep(Duration::from_millis(2)).await;
        let aborted = tokio::spawn({
            let c = c.clone();
            async move {
                let s = c.subscribe("w.never").await.unwrap();
                s.recv().await
            }
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
        aborted.abort();
        assert!(tokio::time::timeout(Duration::from_millis(2), gone.recv()).await.is_err());
        publisher.publish("w.a", &round.to_le_bytes()).await.unwrap();
        let got = bounded("the waiter of w.a", waiting).await.unwrap().unwrap();
        assert_eq!(message(got).payload(), round.to_le_bytes());
    }
    // A stream dropped mid-wait.
    let mut stream_gone = stream_gone;
    assert!(tokio::time::timeout(Duration::from_millis(5), next(&mut stream_gone)).await.is_err());
    let waiting = {
        let a = a.clone();
        tokio::spawn(async move { a.recv().await })
    };
    tokio::time::sleep(Duration::from_millis(2)).await;
    drop(stream_gone);
    publisher.publish("w.a", b"end").await.unwrap();
    assert_eq!(message(bounded("after the stream", waiting).await.unwrap().unwrap()).payload(), b"end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_and_threads_share_one_connection() {
    let b = Broker::start("async-mixed");
    let c = connect(&b).await;
    let blocking = c.blocking().clone();
    let publisher = connect(&b).await;
    // A thread blocks in recv on its subscription while tasks wait on theirs:
    // whoever reads delivers to everyone.
    let thread_sub = blocking.subscribe("mix.thread").unwrap();
    let thread = std::thread::spawn(move || {
        (0..100)
            .map(|_| match thread_sub.recv_timeout(PATIENCE).unwrap().expect("a message in time") {
                Event::Message(m) => u32::from_le_bytes(m.payload().try_into().unwrap()),
                other => panic!("{other:?}"),
            })
            .collect::<Vec<_>>()
    });
    let mut tasks = Vec::new();
    for t in 0..4 {
        let sub = c.subscribe(&format!("mix.task{t}")).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for _ in 0..100 {
                let m = message(sub.recv().await.unwrap());
                got.push(u32::from_le_bytes(m.payload().try_into().unwrap()));
            }
            got
        }));
    }
    for i in 0..100u32 {
        publisher.publish("mix.thread", &i.to_le_bytes()).await.unwrap();
        for t in 0..4 {
            publisher.publish(&format!("mix.task{t}"), &i.to_le_bytes()).await.unwrap();
        }
    }
    let want: Vec<u32> = (0..100).collect();
    for t in tasks {
        assert_eq!(bounded("task", t).await.unwrap(), want);
    }
    assert_eq!(tokio::task::spawn_blocking(move || thread.join().unwrap()).await.unwrap(), want);
    // The blocking API on the same connection, from a thread, while a task
    // awaits its own answers.
    let from_thread = {
        let blocking = blocking.clone();
        tokio::task::spawn_blocking(move || {
            let s = blocking.subscribe("mix.back").unwrap();
            blocking.publish("mix.back", b"x").unwrap();
            blocking.ping().unwrap();
            s.recv_timeout(PATIENCE).unwrap().is_some()
        })
    };
    for _ in 0..10 {
        bounded("ping", c.ping()).await.unwrap();
    }
    assert!(bounded("thread", from_thread).await.unwrap());
    // And an async client made from a blocking one.
    let wrapped = AsyncClient::from_blocking(b.client()).unwrap();
    bounded("ping", wrapped.ping()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_publishes_waits_for_room_without_blocking() {
    let b = Broker::start("async-flood");
    let subscriber = connect(&b).await;
    let sub = subscriber.subscribe("flood.x").await.unwrap();
    let c = connect(&b).await;
    // Four tasks publish at once: some find the socket full, and wait.
    let per_task = 20_000u32;
    let mut tasks = Vec::new();
    for t in 0..4u32 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let payload = vec![t as u8; 512];
            for _ in 0..per_task {
                c.publish("flood.x", &payload).await.unwrap();
            }
        }));
    }
    let mut seen = 0u64;
    let counter = tokio::spawn(async move {
        while seen < 4 * u64::from(per_task) {
            match sub.recv().await.unwrap() {
                Event::Message(_) => seen += 1,
                Event::Gap { missed } => seen += missed,
                Event::Reconnected => panic!(),
            }
        }
        seen
    });
    for t in tasks {
        bounded("publisher", t).await.unwrap();
    }
    bounded("flush", c.flush()).await.unwrap();
    assert_eq!(bounded("subscriber", counter).await.unwrap(), 4 * u64::from(per_task));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_connection_ends_streams_and_fails_calls() {
    let mut b = Broker::start("async-closed");
    let c =
        bounded("connect", b.options().reconnect(ReconnectPolicy::never()).connect_async()).await.unwrap();
    let mut sub = c.subscribe("end.x").await.unwrap();
    let waiting = {
        let c = c.clone();
        tokio::spawn(async move { c.subscribe("end.y").await.unwrap().recv().await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    b.terminate();
    match bounded("stream", next(&mut sub)).await {
        Some(Err(RecvError::Disconnected(_))) => {}
        other => panic!("{other:?}"),
    }
    assert!(bounded("stream end", next(&mut sub)).await.is_none());
    match bounded("recv", waiting).await.unwrap() {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}"),
        Ok(ev) => panic!("{ev:?}"),
    }
    match bounded("call", c.request("end.nobody", b"", PATIENCE)).await {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}"),
        Ok(r) => panic!("{r:?}"),
    }
    assert!(bounded("publish", c.publish("end.x", b"")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_subscriber_survives_a_broker_restart() {
    let mut b = Broker::start("async-restart");
    let c = connect(&b).await;
    let sub = c.subscribe("again.x").await.unwrap();
    let waiting = tokio::spawn(async move {
        let mut events = Vec::new();
        loop {
            match sub.recv().await.unwrap() {
                Event::Message(m) => {
                    events.push(format!("{:?}", std::str::from_utf8(m.payload()).unwrap()));
                    if m.payload() == b"after" {
                        return events;
                    }
                }
                other => events.push(format!("{other:?}")),
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    b.restart(rustix::process::Signal::TERM);
    // Publishes from a new client until the renewed subscription gets one.
    let p = connect(&b).await;
    let deadline = Instant::now() + PATIENCE;
    while !waiting.is_finished() {
        assert!(Instant::now() < deadline, "the subscription was not renewed");
        p.publish("again.x", b"after").await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let events = waiting.await.unwrap();
    assert_eq!(events.first().map(String::as_str), Some("Reconnected"), "{events:?}");
    bounded("ping", c.ping()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_channel_reader_follows_its_publisher_across_a_restart() {
    let mut b = Broker::start("async-ring-restart");
    let pc = b.client();
    let c = connect(&b).await;
    let publisher_client = pc.clone();
    let mut publisher = tokio::task::spawn_blocking(move || {
        publisher_client.channel_publisher("cam", ChannelConfig::default()).unwrap()
    })
    .await
    .unwrap();
    let mut reader = bounded("join", c.channel_subscriber("cam")).await.unwrap();
    publisher.publish(b"before").unwrap();
    let ev = bounded("recv", reader.recv_vec()).await.unwrap();
    assert!(matches!(ev, ChannelEvent::Message { ref value, .. } if value == b"before"), "{ev:?}");
    // (A reader that waits through the restart itself ends as `Closed`,
    // blocking or async alike: it finds the old ring closed before the
    // client has noticed the loss. Here it reads after, as in
    // `reconnect.rs`.)
    let restarted = tokio::task::spawn_blocking(move || {
        b.restart(rustix::process::Signal::TERM);
        pc.ping().unwrap();
        // Reopens on the new broker (and closes the old ring).
        publisher.publish(b"on the new ring").unwrap();
        (b, pc, publisher)
    });
    let (_b, pc, mut publisher) = bounded("restart", restarted).await.unwrap();
    bounded("the reader following", async {
        loop {
            match reader.recv_vec().await.unwrap() {
                ChannelEvent::Reconnected => break,
                ChannelEvent::Message { .. } | ChannelEvent::Missed(_) => {}
            }
        }
    })
    .await;
    publisher.publish(b"again").unwrap();
    let ev = bounded("recv", reader.recv_vec()).await.unwrap();
    assert!(matches!(ev, ChannelEvent::Message { ref value, .. } if value == b"again"), "{ev:?}");
    let info = pc.channels().unwrap();
    assert_eq!((info.len(), info[0].readers), (1, 1), "{info:?}");
}
