//! Clients that live through a broker restart: the broker is stopped
//! (SIGTERM, and SIGKILL) and started again on the same address, and the
//! clients of the old one reconnect by themselves. Subscribers see one
//! `Reconnected` and then messages again, names come back to their
//! owners, a call in flight fails with `Disconnected`, and publishes made
//! while the broker is away wait for it. Also: `--no-reconnect` and
//! `ReconnectPolicy::never` end as before, and a socket-activated broker
//! restarted behind a held socket is never refused.

mod common;

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use rustix::process::Signal;
use shmbus::{CallError, Client, ErrorKind, Event, ReconnectPolicy};

/// The next event that is not a message: `Reconnected` expected.
fn expect_reconnected(sub: &shmbus::Subscription) {
    match sub.recv_timeout(PATIENCE).unwrap() {
        Some(Event::Reconnected) => {}
        other => panic!("expected Reconnected, got {other:?}"),
    }
}

/// A service on `name` in a thread of this process: echoes, except that
/// a payload "hang" is held, never answered.
fn serve_echo(c: &Client, name: &str) -> std::thread::JoinHandle<()> {
    let service = c.serve(name).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for req in &service {
            let Ok(req) = req else { return };
            if req.payload() == b"hang" {
                held.push(req);
                continue;
            }
            let echo = req.payload().to_vec();
            let _ = req.reply(&echo);
        }
    })
}

/// Waits (bounded) until `name` is owned by `owner` (whose id changes
/// when it reconnects).
fn wait_owner(c: &Client, name: &str, owner: &Client) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if c.name_owner(name).ok().flatten() == Some(owner.id()) {
            return;
        }
        assert!(Instant::now() < deadline, "{name} never came back to client {}", owner.id());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn survive_a_restart(signal: Signal) {
    let mut b = Broker::start(&format!("reconnect-{signal:?}"));
    let subscriber = b.client();
    let sub = subscriber.subscribe("r.>").unwrap();
    let server = b.client();
    let _service = serve_echo(&server, "svc.r");
    let caller = b.client();
    assert_eq!(caller.request("svc.r", b"before", PATIENCE).unwrap().payload(), b"before");
    let in_flight = caller.request_async("svc.r", b"hang", Duration::from_secs(60)).unwrap();
    caller.ping().unwrap();

    b.restart(signal);

    // The call whose answer was due on the old connection fails, distinctly.
    match in_flight.wait() {
        Err(CallError::Disconnected(d)) => assert!(d.reason.contains("lost"), "{d:?}"),
        other => panic!("a call in flight must fail with Disconnected, got {other:?}"),
    }
    // The subscriber is told, then gets messages again.
    expect_reconnected(&sub);
    caller.publish("r.after", b"1").unwrap();
    caller.flush().unwrap();
    assert_eq!(next_message(&sub).payload(), b"1");
    // The name came back to its owner (a new client id on the new broker).
    wait_owner(&caller, "svc.r", &server);
    assert_eq!(caller.request("svc.r", b"after", PATIENCE).unwrap().payload(), b"after");
}

#[test]
fn clients_survive_a_broker_stopped_with_sigterm() {
    survive_a_restart(Signal::TERM);
}

#[test]
fn clients_survive_a_broker_killed_with_sigkill() {
    survive_a_restart(Signal::KILL);
}

/// A publish made while the broker is away waits for it (up to the
/// client's timeout), and is delivered once it is back.
#[test]
fn a_publish_during_the_outage_waits_for_the_broker() {
    let mut b = Broker::start("reconnect-outage");
    let subscriber = b.client();
    let sub = subscriber.subscribe("o.>").unwrap();
    let publisher = b.options().timeout(PATIENCE).connect().unwrap();
    // Stop the broker, and start it again a little later, from a thread.
    let addr = b.address.clone();
    if let Some(mut c) = b.child.take() {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    let (tx, rx) = mpsc::channel();
    let restarter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let mut cmd = Command::new(SHMBUSD);
        cmd.arg("--address").arg(&addr).stdin(Stdio::null());
        tx.send(spawn_guarded(cmd)).unwrap();
    });
    let start = Instant::now();
    publisher.publish("o.late", b"waited").expect("the publish waits for the broker to come back");
    assert!(start.elapsed() >= Duration::from_millis(200), "it cannot have gone before the broker was back");
    let _broker = rx.recv_timeout(PATIENCE).unwrap();
    restarter.join().unwrap();
    expect_reconnected(&sub);
    // The subscription is renewed before or after that publish went; both
    // are fine, but nothing published after the renewal is lost.
    publisher.flush().unwrap();
    publisher.publish("o.next", b"2").unwrap();
    publisher.flush().unwrap();
    let mut got = Vec::new();
    while got.last().map(Vec::as_slice) != Some(&b"2"[..]) {
        got.push(next_message(&sub).payload().to_vec());
    }
}

/// With a broker that does not come back, a publish fails after the
/// client's timeout, with a clear error; `ReconnectPolicy::never` ends at
/// once, as before reconnection existed.
#[test]
fn without_a_broker_publishes_fail_in_time_and_never_means_never() {
    let mut b = Broker::start("reconnect-gone");
    let patient = b.options().timeout(Duration::from_millis(400)).connect().unwrap();
    let quitter = b.options().reconnect(ReconnectPolicy::never()).connect().unwrap();
    let sub = quitter.subscribe("q.>").unwrap();
    if let Some(mut c) = b.child.take() {
        c.kill().unwrap();
        c.wait().unwrap();
    }
    let start = Instant::now();
    let e = loop {
        // The first publish may still reach the socket buffer of the dead
        // connection; a later one finds it gone.
        match patient.publish("q.x", b"1") {
            Ok(()) => assert!(start.elapsed() < PATIENCE, "publishes never failed"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}");
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "it waited for the broker first: {:?}",
        start.elapsed()
    );
    match sub.recv_timeout(PATIENCE) {
        Err(e) => assert_eq!(e.kind(), ErrorKind::Disconnected, "{e}"),
        other => panic!("never reconnects, so the subscription ends: {other:?}"),
    }
}

/// `shmbusctl sub` keeps going across a restart and says so on stderr;
/// with `--no-reconnect` it exits as before.
#[test]
fn ctl_sub_keeps_going_across_a_restart_unless_told_not_to() {
    let mut b = Broker::start("reconnect-ctl");
    let spawn = |extra: &[&str]| {
        let mut cmd = Command::new(SHMBUSCTL);
        cmd.args(["--address", &b.address, "sub", "c.>"]).args(extra);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        spawn_guarded(cmd)
    };
    let mut keeps = spawn(&[]);
    let mut quits = spawn(&["--no-reconnect"]);
    let probe = b.client();
    wait_subscribers(&probe, "c.>", 2);
    drop(probe);
    b.restart(Signal::TERM);
    let probe = b.client();
    wait_subscribers(&probe, "c.>", 1);
    probe.publish("c.x", b"hello").unwrap();
    probe.flush().unwrap();
    // The one that quit did, with a reason.
    let status = wait_timeout(quits.0.as_mut().unwrap(), PATIENCE).expect("--no-reconnect exits");
    assert!(!status.success());
    // The one that kept going printed the message, and a notice.
    let child = keeps.0.as_mut().unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let line = rx.recv_timeout(PATIENCE).expect("the message after the restart");
    assert!(line.contains("hello"), "{line}");
    let _ = child.kill();
    let out = keeps.wait_output();
    assert!(stderr(&out).contains("reconnected"), "{}", stderr(&out));
}

// ------------------------------------------------ socket activation --

const HOLDER: &str = "SHMBUS_HOLDER_ADDR";
const SAY: &str = "HOLDER:";

/// Not a test on its own: a stand-in for systemd that holds the
/// listening socket (as fd 3) and starts `shmbusd` on it, socket-activated,
/// again and again: it reads `restart` lines on stdin, each stopping the
/// broker with SIGTERM and starting a new one on the same socket.
#[test]
#[ignore = "helper process body, spawned by the other tests"]
fn socket_holder_process() {
    use std::os::fd::AsRawFd;
    let addr = std::env::var(HOLDER).expect("set by the parent");
    let listener = shmbus_proto::sys::socket::listen(&shmbus::Address::parse(&addr).unwrap(), 128).unwrap();
    // The socket goes to each broker as fd 3, as systemd passes it: the
    // shell puts it there (`exec 3<&N`, a dup2), whatever this process
    // inherited as fd 3 (a `time -o` file, a make jobserver pipe), and
    // closes the number it had.
    rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::empty()).unwrap();
    let n = listener.as_raw_fd();
    let script = if n == 3 {
        "export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=bus; exec \"$0\"".to_owned()
    } else {
        format!("exec 3<&{n} {n}<&-; export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=bus; exec \"$0\"")
    };
    let start = || {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script, SHMBUSD]).stdin(Stdio::null());
        cmd.spawn().unwrap()
    };
    let mut broker = start();
    println!("{SAY}started {}", broker.id());
    for line in std::io::stdin().lock().lines() {
        if line.unwrap() == "restart" {
            let pid = rustix::process::Pid::from_raw(broker.id() as i32).unwrap();
            rustix::process::kill_process(pid, Signal::TERM).unwrap();
            broker.wait().unwrap();
            broker = start();
            println!("{SAY}restarted {}", broker.id());
        }
    }
    let _ = broker.kill();
    let _ = broker.wait();
}

/// A broker restarted behind a socket that something else holds (systemd
/// does this with `shmbus.socket`): clients are never refused; they
/// reconnect, and go on.
#[test]
fn a_socket_activated_restart_is_never_a_refusal() {
    let addr = unique_address("reconnect-activated");
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new(exe);
    cmd.args(["--exact", "socket_holder_process", "--ignored", "--nocapture", "--test-threads=1"])
        .env(HOLDER, &addr)
        .stdin(Stdio::piped());
    let mut holder = Helper::spawn(&mut cmd, SAY);
    let mut stdin = holder.child.0.as_mut().unwrap().stdin.take().unwrap();
    holder.expect("started");
    let connect = || Client::options().address(shmbus::Address::parse(&addr).unwrap()).connect().unwrap();
    let subscriber = connect();
    let sub = subscriber.subscribe("a.>").unwrap();
    let publisher = connect();
    writeln!(stdin, "restart").unwrap();
    stdin.flush().unwrap();
    holder.expect("restarted");
    expect_reconnected(&sub);
    publisher.publish("a.x", b"after").unwrap();
    publisher.flush().unwrap();
    assert_eq!(next_message(&sub).payload(), b"after");
    // A client that connects while the broker restarts waits in the held
    // socket's backlog rather than being refused.
    writeln!(stdin, "restart").unwrap();
    stdin.flush().unwrap();
    let late = connect();
    holder.expect("restarted");
    // Connected, not refused; it then goes on with the new broker (a
    // ping racing the old broker's shutdown could have lost its answer).
    late.ping().unwrap();
    // The holder stops its broker when its stdin ends; it is waited for
    // (bounded) so that it does: killed at once by the guard, it left its
    // broker running after the test.
    drop(stdin);
    let out = holder.child.wait_output();
    assert!(out.status.success(), "the holder ended badly: {}", String::from_utf8_lossy(&out.stderr));
}

/// Ring channels need no broker while it is away; once it is back, the
/// publisher opens its channel again at its next publish, and the reader
/// follows it to the new ring, told by `ChannelEvent::Reconnected`.
#[test]
fn channel_handles_open_again_once_their_publisher_is_back() {
    use shmbus::{ChannelConfig, ChannelEvent};
    let mut b = Broker::start("reconnect-channel");
    let pc = b.client();
    let rc = b.client();
    let mut publisher = pc.channel_publisher("cam", ChannelConfig::default()).unwrap();
    let mut reader = rc.channel_subscriber("cam").unwrap();
    publisher.publish(b"before").unwrap();
    assert!(matches!(
        reader.recv_vec_timeout(PATIENCE).unwrap(),
        Some(ChannelEvent::Message { value, .. }) if value == b"before"
    ));
    b.restart(Signal::TERM);
    pc.ping().unwrap();
    // Reopens on the new broker (and closes the old ring).
    publisher.publish(b"on the new ring").unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        match reader.recv_vec_timeout(Duration::from_millis(100)).unwrap() {
            Some(ChannelEvent::Reconnected) => break,
            Some(ChannelEvent::Message { .. }) | Some(ChannelEvent::Missed(_)) | None => {
                assert!(Instant::now() < deadline, "the reader never followed its publisher")
            }
        }
    }
    publisher.publish(b"again").unwrap();
    assert!(matches!(
        reader.recv_vec_timeout(PATIENCE).unwrap(),
        Some(ChannelEvent::Message { value, .. }) if value == b"again"
    ));
    let info = pc.channels().unwrap();
    assert_eq!(info.len(), 1, "the new broker knows the channel: {info:?}");
    assert_eq!(info[0].readers, 1);
}

/// An app that only polls (an event loop calling `try_recv`, never
/// blocking in the library) reconnects too.
#[test]
fn a_client_that_only_polls_reconnects() {
    let mut b = Broker::start("reconnect-poll");
    let c = b.client();
    let sub = c.subscribe("p.>").unwrap();
    b.restart(Signal::TERM);
    let deadline = Instant::now() + PATIENCE;
    loop {
        match sub.try_recv().unwrap() {
            Some(Event::Reconnected) => break,
            Some(other) => panic!("{other:?}"),
            None => {
                assert!(Instant::now() < deadline, "a polling client never reconnected");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    let p = b.client();
    p.publish("p.x", b"polled").unwrap();
    p.flush().unwrap();
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(Event::Message(m)) = sub.try_recv().unwrap() {
            assert_eq!(m.payload(), b"polled");
            break;
        }
        assert!(Instant::now() < deadline, "the renewed subscription got nothing");
        std::thread::sleep(Duration::from_millis(10));
    }
}
