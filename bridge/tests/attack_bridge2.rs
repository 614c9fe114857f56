//! Attacks on the bridge, second pass: bytes on NATS that its client
//! cannot parse, and calls that loop between hosts.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

#[test]
#[ignore = "the harness's broker role, not a test"]
fn broker_process() {
    common::broker_process();
}

/// A raw NATS connection, speaking the text protocol itself: it can send
/// what no client library would (header blocks and subjects that are not
/// what a NATS client expects).
struct Raw(TcpStream);

impl Raw {
    fn connect(nats: &Nats) -> Raw {
        let s = TcpStream::connect(("127.0.0.1", nats.port)).expect("connect to nats-server");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut r = Raw(s);
        r.read_until(b"INFO");
        r.0.write_all(
            b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true,\"protocol\":1}\r\n",
        )
        .unwrap();
        r.ping();
        r
    }

    /// Reads until `what` was seen (bounded by the read timeout).
    fn read_until(&mut self, what: &[u8]) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(what.len()).any(|w| w == what) {
            let n = self.0.read(&mut buf).expect("read from nats-server");
            assert!(n > 0, "nats-server closed the raw connection: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// PING, and waits for the PONG: what was sent before has been taken.
    fn ping(&mut self) {
        self.0.write_all(b"PING\r\n").unwrap();
        self.read_until(b"PONG");
    }

    /// An HPUB with `header` as the header block, as is.
    fn hpub(&mut self, subject: &[u8], header: &[u8], payload: &[u8]) {
        let mut op = Vec::new();
        op.extend_from_slice(b"HPUB ");
        op.extend_from_slice(subject);
        op.extend_from_slice(format!(" {} {}\r\n", header.len(), header.len() + payload.len()).as_bytes());
        op.extend_from_slice(header);
        op.extend_from_slice(payload);
        op.extend_from_slice(b"\r\n");
        self.0.write_all(&op).unwrap();
        self.ping();
    }

    fn publish(&mut self, subject: &[u8], payload: &[u8]) {
        let mut op = Vec::new();
        op.extend_from_slice(b"PUB ");
        op.extend_from_slice(subject);
        op.extend_from_slice(format!(" {}\r\n", payload.len()).as_bytes());
        op.extend_from_slice(payload);
        op.extend_from_slice(b"\r\n");
        self.0.write_all(&op).unwrap();
        self.ping();
    }
}

const IMPORT_CFG: &str = r#"
import = ["t.>"]
export = ["e.>"]
"#;

/// A plain NATS publisher's bytes that the server passes on but the
/// bridge's NATS client cannot parse (a header line without a colon, a
/// header name with a space, a header block that is not UTF-8, a status
/// that is not a number, a subject that is not UTF-8). Each is dropped
/// and counted where it can be; none may cut the bridge off NATS: a cut
/// loses whatever was on the wire for every subscription and call, and
/// any NATS publisher could repeat it forever.
///
/// Fails (each of the five cuts the connection: async-nats 0.50 returns a
/// read error for a message it cannot parse, and reconnects): not fixable
/// in the bridge's own code, which never sees the bytes. Run by hand with
/// `--ignored`.
#[test]
#[ignore = "known defect in async-nats: a message it cannot parse cuts the connection"]
fn unparsable_nats_messages_do_not_cut_the_bridge_off_nats() {
    let nats = Nats::start(None);
    let broker = Broker::start("rawhdr");
    let b = Bridge::start("rawB", &broker, &nats, IMPORT_CFG);
    let c = broker.client();
    let sub = c.subscribe("t.>").unwrap();
    let mut raw = Raw::connect(&nats);
    raw.publish(b"t.ok", b"first");
    assert_eq!(next_message(&sub, "a plain message").topic(), "t.ok");
    let mut before = b.status().nats.reconnects;
    let hostile: [(&[u8], &[u8]); 5] = [
        (b"t.h1", b"NATS/1.0\r\nno colon here\r\n\r\n"),
        (b"t.h2", b"NATS/1.0\r\nBad Name: x\r\n\r\n"),
        (b"t.h3", b"NATS/1.0\r\nX-A: \xff\xfe\r\n\r\n"),
        (b"t.h4", b"NATS/1.0 abc\r\n\r\n"),
        (b"t.\xff", b"NATS/1.0\r\nX-A: b\r\n\r\n"),
    ];
    let mut cut = Vec::new();
    for (i, (subject, header)) in hostile.iter().enumerate() {
        raw.hpub(subject, header, b"evil");
        // What a plain publisher sends next crosses (after the bridge
        // came back, if it was cut off).
        let start = Instant::now();
        loop {
            raw.publish(b"t.ok", format!("after {i}").as_bytes());
            if let Ok(Some(shmbus::Event::Message(m))) = sub.recv_timeout(Duration::from_millis(200)) {
                if m.topic() == "t.ok" {
                    break;
                }
            }
            assert!(start.elapsed() < PATIENCE, "nothing crossed after hostile message {i}:\n{}", b.log());
        }
        drain(&sub, Duration::from_millis(100));
        let s = b.status();
        if s.nats.reconnects != before {
            cut.push(format!(
                "{:?}: reconnects {before} -> {}",
                String::from_utf8_lossy(header),
                s.nats.reconnects
            ));
            before = s.nats.reconnects;
        }
    }
    assert!(cut.is_empty(), "a NATS publisher's bytes cut the bridge off NATS: {cut:?}\n{}", b.log());
}

/// A stalled local broker (stopped) and a NATS flood of large
/// fire-and-forget publishes on an exported service name: each becomes a
/// local send, which waits for the broker. The bridge must keep its memory
/// bounded as it does for imported messages (and count what it cannot
/// pass on). Before the fix, the task that reads the exported names' NATS
/// subscription made each send itself and waited for the broker, so NATS
/// buffered 1,024 messages of up to `max_payload` for it: 706 MiB here.
#[test]
fn a_stalled_broker_and_a_flood_of_sends_to_an_exported_service_cost_bounded_memory() {
    let nats = Nats::start(None);
    let broker = Broker::start("stallsend");
    let b = Bridge::start("sendB", &broker, &nats, "services_export = [\"svc.>\"]\nimport = [\"t.>\"]\n");
    let c = broker.client();
    let svc = c.serve("svc.fire").unwrap();
    let before = b.status().nats_to_local;
    let broker_pid = broker.pid();
    signal(broker_pid, "STOP");
    struct Cont(Option<u32>);
    impl Drop for Cont {
        fn drop(&mut self) {
            if let Some(p) = self.0.take() {
                let _ = std::process::Command::new("kill").args(["-CONT", &p.to_string()]).status();
            }
        }
    }
    let mut cont = Cont(Some(broker_pid));
    const N: u64 = 1200;
    let big = bytes::Bytes::from(vec![9u8; 512 * 1024]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = nats.url();
    rt.block_on(async {
        let nc = async_nats::connect(url).await.unwrap();
        for _ in 0..N {
            nc.publish("svc.fire", big.clone()).await.unwrap();
        }
        nc.flush().await.unwrap();
    });
    let start = Instant::now();
    let mut last = 0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let rss = b.rss();
        if rss == last || start.elapsed() > PATIENCE {
            break;
        }
        last = rss;
    }
    let rss = b.rss();
    if let Some(p) = cont.0.take() {
        signal(p, "CONT");
    }
    assert!(rss < 220 << 20, "the bridge holds {} MiB for a stalled broker", rss >> 20);
    // Every send is passed on to the broker or counted as not.
    let calls = |n: &shmbus_bridge::stats::DirStatus| n.calls_ok + n.calls_failed.values().sum::<u64>();
    let s = b.wait_status("every send accounted for", |s| calls(&s.nats_to_local) - calls(&before) >= N);
    assert_eq!(calls(&s.nats_to_local) - calls(&before), N, "{s:?}");
    drop(svc);
}

/// Resumes a stopped process on drop (a failed test must not leave it
/// stopped for the others).
struct Cont(Option<u32>);

impl Drop for Cont {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::process::Command::new("kill").args(["-CONT", &p.to_string()]).status();
        }
    }
}

/// SIGTERM with the local broker stopped, while NATS floods the bridge
/// with messages to import (its local writer waits on the broker): the
/// bridge exits by itself, 0, in bounded time.
#[test]
fn sigterm_with_a_stalled_broker_exits_in_bounded_time() {
    let nats = Nats::start(None);
    let broker = Broker::start("termstall");
    let mut b = Bridge::start("termB", &broker, &nats, IMPORT_CFG);
    let _sub = broker.client().subscribe("t.>").unwrap();
    let _cont = Cont(Some(broker.pid()));
    signal(broker.pid(), "STOP");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let payload = bytes::Bytes::from(vec![1u8; 64 * 1024]);
    rt.block_on(async {
        let nc = async_nats::connect(nats.url()).await.unwrap();
        for _ in 0..2000 {
            nc.publish("t.flood", payload.clone()).await.unwrap();
        }
        nc.flush().await.unwrap();
    });
    std::thread::sleep(Duration::from_millis(500));
    signal(b.pid(), "TERM");
    let st = b.wait_exit(Duration::from_secs(15));
    assert!(st.is_some(), "the bridge still runs 15 s after SIGTERM with its broker stopped");
    assert_eq!(st.unwrap().code(), Some(0), "{st:?}");
}

/// SIGTERM with NATS stopped (its socket open: no disconnection seen)
/// while a local publisher floods an exported subject: the bridge exits by
/// itself, 0, in bounded time.
#[test]
fn sigterm_with_a_stalled_nats_exits_in_bounded_time() {
    let nats = Nats::start(None);
    let broker = Broker::start("termnats");
    let mut b = Bridge::start("termN", &broker, &nats, IMPORT_CFG);
    let _cont = Cont(Some(nats.pid()));
    signal(nats.pid(), "STOP");
    let c = broker.client();
    let payload = vec![2u8; 64 * 1024];
    for _ in 0..3000 {
        c.publish("e.flood", &payload).unwrap();
    }
    signal(b.pid(), "TERM");
    let st = b.wait_exit(Duration::from_secs(15));
    assert!(st.is_some(), "the bridge still runs 15 s after SIGTERM with NATS stopped");
    assert_eq!(st.unwrap().code(), Some(0), "{st:?}");
}

/// A local fire-and-forget send to an imported name crosses as one: the
/// far service sees a request that expects no reply (as a NATS publish on
/// an exported name is a local send), and the bridge does not hold one of
/// its `max_inflight_requests` permits waiting for an answer nobody reads.
/// Here B may have 2 calls in flight; 6 sends to a far service that
/// answers nothing it need not answer must not make B refuse a real call.
#[test]
fn a_local_send_to_an_imported_name_crosses_as_a_send() {
    let nats = Nats::start(None);
    let broker_a = Broker::start("send-a");
    let broker_b = Broker::start("send-b");
    let a = Bridge::start(
        "sendA",
        &broker_a,
        &nats,
        "services_export = [\"svc.>\"]\nrequest_timeout_ms = 4000\n",
    );
    let b = Bridge::start(
        "sendB",
        &broker_b,
        &nats,
        "services_import = [\"svc.log\", \"svc.echo\"]\nmax_inflight_requests = 2\nrequest_timeout_ms = 4000\n",
    );
    let ca = broker_a.client();
    let log = ca.serve("svc.log").unwrap();
    let echo = ca.serve("svc.echo").unwrap();
    let cb = broker_b.client();
    // The path is up: a call crosses.
    let echoer = std::thread::spawn(move || {
        let start = Instant::now();
        let mut n = 0;
        while n < 2 && start.elapsed() < PATIENCE {
            if let Ok(Some(r)) = echo.recv_timeout(Duration::from_millis(100)) {
                r.reply(b"pong").unwrap();
                n += 1;
            }
        }
    });
    assert_eq!(cb.request("svc.echo", b"ping", Duration::from_secs(10)).unwrap().payload(), b"pong");
    const SENDS: usize = 6;
    for i in 0..SENDS {
        cb.send("svc.log", format!("line {i}")).unwrap();
    }
    // The far service gets each one, as a send; it answers none (a
    // request it holds unanswered keeps the bridge's call in flight).
    let mut held = Vec::new();
    let mut expecting = 0;
    let start = Instant::now();
    while held.len() < SENDS && start.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(r)) = log.recv_timeout(Duration::from_millis(100)) {
            if r.expects_reply() {
                expecting += 1;
            }
            held.push(r);
        }
    }
    let reached = held.len();
    // Meanwhile a real call from B still crosses.
    let call = cb.request("svc.echo", b"ping", Duration::from_secs(10));
    drop(held);
    echoer.join().unwrap();
    let sb = b.status();
    assert_eq!(reached, SENDS, "{reached} of {SENDS} sends reached the far service: {sb:?}");
    assert_eq!(
        expecting, 0,
        "{expecting} of {SENDS} sends reached the far service as requests expecting a reply"
    );
    assert_eq!(call.expect("a call while sends are in flight").payload(), b"pong");
    let sb = b.wait_status("the sends counted", |s| s.local_to_nats.calls_ok >= (SENDS + 2) as u64);
    assert_eq!(sb.local_to_nats.calls_failed.values().sum::<u64>(), 0, "{sb:?}");
    drop(a);
}

/// Two bridges of distinct names on one broker and one NATS (as allowed:
/// only a second bridge of the same name is refused), X exporting `t.>`
/// and Y importing it. A local publish goes out through X, comes back in
/// through Y (its `Shmbus-Bridge` is X's, not Y's; Y's own NATS connection
/// did not send it), is published locally by Y, whose client id is not
/// X's, so X exports it again: forever. One publish must be seen once.
#[test]
fn two_bridges_on_one_broker_do_not_loop_a_message() {
    let nats = Nats::start(None);
    let broker = Broker::start("twobr");
    let x = Bridge::start("brX", &broker, &nats, "export = [\"t.>\"]\n");
    let y = Bridge::start("brY", &broker, &nats, "import = [\"t.>\"]\n");
    let c = broker.client();
    let sub = c.subscribe("t.>").unwrap();
    c.publish("t.one", b"x").unwrap();
    // For 2 s (a loop never goes quiet, so no drain until quiet).
    let mut got = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        if let Ok(Some(shmbus::Event::Message(_))) = sub.recv_timeout(Duration::from_millis(100)) {
            got += 1;
        }
    }
    let (sx, sy) = (x.status(), y.status());
    // The original, and at most once more through X and Y (the copy Y
    // imports).
    assert!(got <= 2, "one publish was seen {got} times in 2 s: X {sx:?}\nY {sy:?}");
    assert!(sx.local_to_nats.forwarded <= 1, "X exported it {} times", sx.local_to_nats.forwarded);
}

/// The same for a call: Y imports `svc.b`, X exports `svc.>`, on one
/// broker and one NATS, and nobody serves `svc.b`. A call goes out through
/// Y, X calls `svc.b` locally, whose owner is Y, which calls NATS again...
/// until the caller's timeout runs out, each hop holding a permit on X and
/// on Y. One call must cross once.
#[test]
fn two_bridges_on_one_broker_do_not_loop_a_call() {
    let nats = Nats::start(None);
    let broker = Broker::start("twocall");
    let x =
        Bridge::start("clX", &broker, &nats, "services_export = [\"svc.>\"]\nrequest_timeout_ms = 3000\n");
    let y =
        Bridge::start("clY", &broker, &nats, "services_import = [\"svc.b\"]\nrequest_timeout_ms = 3000\n");
    let c = broker.client();
    let r = c.request("svc.b", b"ping", Duration::from_secs(10));
    assert!(matches!(r, Err(shmbus::CallError::App { .. })), "{r:?}");
    // Let any bouncing run out.
    std::thread::sleep(Duration::from_millis(3500));
    let (sx, sy) = (x.status(), y.status());
    let calls = |d: &shmbus_bridge::stats::DirStatus| d.calls_ok + d.calls_failed.values().sum::<u64>();
    assert!(
        calls(&sx.nats_to_local) <= 1 && calls(&sy.local_to_nats) <= 1,
        "one call crossed {} times through X and {} times through Y: X {sx:?}\nY {sy:?}",
        calls(&sx.nats_to_local),
        calls(&sy.local_to_nats)
    );
}

/// The same for a fire-and-forget send (which carries no origin): Y
/// imports `svc.b`, X exports `svc.>`, on one broker and one NATS. One
/// send must cross once.
#[test]
fn two_bridges_on_one_broker_do_not_loop_a_send() {
    let nats = Nats::start(None);
    let broker = Broker::start("twosend");
    let x = Bridge::start("snX", &broker, &nats, "services_export = [\"svc.>\"]\n");
    let y = Bridge::start("snY", &broker, &nats, "services_import = [\"svc.b\"]\n");
    let c = broker.client();
    c.send("svc.b", b"once").unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    let (sx, sy) = (x.status(), y.status());
    let calls = |d: &shmbus_bridge::stats::DirStatus| d.calls_ok + d.calls_failed.values().sum::<u64>();
    assert!(
        calls(&sx.nats_to_local) <= 1 && calls(&sy.local_to_nats) <= 1,
        "one send crossed {} times through X and {} times through Y: X {sx:?}\nY {sy:?}",
        calls(&sx.nats_to_local),
        calls(&sy.local_to_nats)
    );
    assert_eq!(sx.nats_to_local.loops_suppressed, 1, "{sx:?}");
}
