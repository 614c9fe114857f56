//! Attack review 7: the client library's own memory under refusals it is
//! told about but never asked for.
//!
//! `Client::send` is fire and forget; a send the broker could not deliver
//! comes back from `flush` as `FlushError::SendsRefused`. The client keeps
//! every such refusal (`State::refused_sends`, a `Vec` with no bound) until
//! the app calls `flush`. An app that only sends (the point of fire and
//! forget) to a name nobody serves grows without bound: one entry, with
//! the name as a `String`, per send, for ever. (`State::refused_publishes`
//! is the same for publishes the broker refuses.) Everything else the
//! client keeps for the app is bounded (subscription queues, requests,
//! `revoked_names` at `MAX_REVOKED_NAMES`).
//!
//! Fixed: each list keeps the first `MAX_REFUSALS` (4,096) between two
//! flushes and counts the rest (`Refusals::more`, reported by the flush),
//! and a refusal of a send this client never made is not heard.
//!
//! A hostile broker did not even need the sends: `State::on_answer`
//! keeps a refusal for any `Answer` whose call id has `SEND_BIT` set,
//! whether or not this client ever sent that number, and `apply` one for
//! any `OpError { Op::Publish }`; so a broker (or whoever took its
//! address) grows a client's memory at the speed of its socket.

mod common;

use common::*;
use shmbus::{Client, FlushError};

/// How many refusals a client may keep for a `flush` nobody calls: a
/// generous bound (the library's other lists of this kind keep far fewer).
const BOUND: usize = 4096;

const NOBODY: &str = "a7.nobody.serves.this";

/// Sends `n` fire-and-forget requests to a name nobody serves, letting
/// the client read the broker's answers as it goes (a ping every 500, as
/// any other use of the connection would), and returns how many refusals
/// the client kept for the next `flush`.
fn refusals_kept(c: &Client, n: usize) -> usize {
    refusals(c, n).0
}

/// [`refusals_kept`], and how many the flush reported in all.
fn refusals(c: &Client, n: usize) -> (usize, u64) {
    for i in 0..n {
        c.send(NOBODY, b"x").expect("send");
        if i % 500 == 499 {
            c.ping().expect("ping");
        }
    }
    match c.flush() {
        Ok(()) => (0, 0),
        Err(FlushError::SendsRefused(v)) => (v.len(), v.total()),
        Err(e) => panic!("flush: {e}"),
    }
}

/// Control: the refusals of a few sends are all reported, so the
/// mechanism the next test relies on works.
#[test]
fn control_a_few_refused_sends_are_each_reported_by_flush() {
    let b = Broker::start("a7-refused-few");
    let c = b.client();
    assert_eq!(refusals_kept(&c, 100), 100);
    // Taken by that flush: nothing left.
    assert!(c.flush().is_ok());
}

/// DEFECT: the client keeps one refusal per fire-and-forget send for a
/// `flush` that may never come; memory grows with every send.
#[test]
fn refused_fire_and_forget_sends_are_kept_within_a_bound() {
    let b = Broker::start("a7-refused-many");
    let c = b.client();
    let n = 20_000;
    let (kept, total) = bounded("sends", {
        let c = c.clone();
        move || refusals(&c, n)
    });
    // None lost silently: those not kept are counted.
    assert_eq!(total, n as u64, "the flush reported {total} refusals of {n}");
    assert!(
        kept <= BOUND,
        "the client kept {kept} refusals of {n} fire-and-forget sends for a flush nobody called: \
         State::refused_sends has no bound (each entry a SendRefused with the name as a String)"
    );
}

/// A fake broker: welcomes one client (socket transport), then answers
/// the first `Ping` it reads by sending `answers` fire-and-forget refusals
/// (`Answer { call_id: SEND_BIT | i, NoResponder }`) for sends the client
/// never made, then the `Pong`; then stays until the client hangs up.
fn refusing_broker(answers: u64) -> (String, std::thread::JoinHandle<()>) {
    use shmbus_proto::frame::{
        decode_client, encode_head, Answer, ClientFrame, Outcome, PayloadRef, Pong, Welcome,
    };
    use shmbus_proto::sys::socket::{self, OutPacket, RecvBatch};
    use std::os::fd::AsFd;
    let addr = unique_address("a7-refusing");
    let listener = socket::listen(&shmbus::Address::parse(&addr).unwrap(), 4).unwrap();
    let fake = std::thread::spawn(move || {
        socket::set_nonblocking(listener.as_fd(), false).unwrap();
        let fd = rustix::net::accept(&listener).unwrap();
        let mut batch = RecvBatch::new(1);
        let send = |bytes: &[u8]| {
            let p = OutPacket { head: bytes, payload: &[], fds: &[] };
            socket::send_packet(fd.as_fd(), p, false).unwrap();
        };
        batch.recv(fd.as_fd(), false).unwrap(); // Hello
        let limits = shmbus::Limits {
            max_packet: 73728,
            max_inline_payload: 65536,
            queue_bytes: 1 << 20,
            queue_frames: 100,
            max_subscriptions: 10,
            fd_window: 128,
            max_depth: 32,
        };
        send(&encode_head(&Welcome { client_id: 1, limits }).unwrap());
        loop {
            match batch.recv(fd.as_fd(), false) {
                Ok(n) if n > 0 && !batch.packet(0).0.is_empty() => {}
                _ => return,
            }
            let token = match decode_client(batch.packet(0).0) {
                Ok(ClientFrame::Ping(p)) => p.token,
                _ => continue,
            };
            for i in 1..=answers {
                let a = Answer {
                    call_id: (1 << 63) | i,
                    outcome: Outcome::NoResponder,
                    responder: None,
                    payload: PayloadRef::Inline,
                };
                send(&encode_head(&a).unwrap());
            }
            send(&encode_head(&Pong { token }).unwrap());
        }
    });
    (addr, fake)
}

/// DEFECT (hostile broker): refusals of sends the client never made are
/// kept, as many as the broker cares to send.
#[test]
fn a_hostile_broker_cannot_make_a_client_keep_refusals_of_sends_it_never_made() {
    let (addr, fake) = refusing_broker(10_000);
    let c = shmbus::ConnectOptions::new()
        .address(shmbus::Address::parse(&addr).unwrap())
        .shared_memory(false)
        .connect()
        .unwrap();
    let kept = bounded("flush", {
        let c = c.clone();
        move || match c.flush() {
            Ok(()) => 0,
            Err(FlushError::SendsRefused(v)) => v.len(),
            Err(e) => panic!("flush: {e}"),
        }
    });
    drop(c);
    fake.join().unwrap();
    assert_eq!(
        kept, 0,
        "this client made no send, yet flush reports {kept} refused sends: \
         State::on_answer keeps a refusal for any SEND_BIT call id the broker names"
    );
}
