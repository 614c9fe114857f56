//! FdAcks count only once the socket shows the packets read (SIOCOUTQ,
//! `Reactor::confirm_reads`): a client that acks while other packets sit
//! unread in its socket gets its credit back when it reads them, and a
//! lingering client that acks and reads its goodbye is let go.

mod common;

use std::os::fd::AsFd;
use std::time::Duration;

use common::*;
use shmbus_proto::frame::{
    encode_frame, encode_head, BrokerFrame, FdAck, Overflow, PayloadRef, Ping, Publish, Subscribe,
};
use shmbus_proto::sys::{memfd, socket};

fn subscribe(r: &mut Raw, sub_id: u32, pattern: &str) {
    r.send_body(&Subscribe { sub_id, pattern, overflow: Overflow::Gap }, &[]);
    assert!(matches!(r.recv(), Some(BrokerFrame::Subscribed(_))));
}

fn pong(r: &mut Raw, token: u64) {
    r.send_body(&Ping { token }, &[]);
    match r.recv() {
        Some(BrokerFrame::Pong(p)) if p.token == token => {}
        other => panic!("expected the pong, got {other:?}"),
    }
}

fn publish_memfds(p: &mut Raw, topic: &str, n: usize) {
    let fd = memfd::from_bytes(topic, &[7; 64]).unwrap();
    let frame =
        encode_head(&Publish { topic, origin: None, payload: PayloadRef::Memfd { len: 64 } }).unwrap();
    for _ in 0..n {
        p.send(&frame, &[fd.as_fd()]);
    }
}

/// Reads `n` deliveries with fds (and only those), bounded.
fn take_fd_deliveries(r: &mut Raw, n: usize) {
    for i in 0..n {
        let pkt = r.next_packet();
        assert!(
            matches!(pkt.frame(), Some(BrokerFrame::Deliver(..))) && pkt.fds.len() == 1,
            "delivery {i}: {:?} with {} fds",
            pkt.frame(),
            pkt.fds.len()
        );
    }
}

/// The client acks its window while a plain message and a pong sit unread
/// behind the fd packets; the broker cannot believe the ack yet. Reading
/// them must bring the credit back (a write-space wake-up): the next
/// window's memfds come.
#[test]
fn an_ack_with_packets_unread_behind_it_is_believed_once_they_are_read() {
    let b = Broker::start_with("confirmlater", &["--fd-window", "4"]);
    let mut r = Raw::hello(&b);
    subscribe(&mut r, 1, "f");
    subscribe(&mut r, 2, "t");
    let mut p = Raw::hello(&b);
    publish_memfds(&mut p, "f", 4);
    let plain =
        encode_frame(&Publish { topic: "t", origin: None, payload: PayloadRef::Inline }, b"plain").unwrap();
    p.send(&plain, &[]);
    pong(&mut p, 1);
    take_fd_deliveries(&mut r, 4);
    // The plain message is in the socket, unread.
    assert!(socket::wait_readable(r.fd.as_fd(), Some(PATIENCE)).unwrap());
    r.send_body(&FdAck { fds: 4 }, &[]);
    r.send_body(&Ping { token: 9 }, &[]);
    // The next window, held for the credit.
    publish_memfds(&mut p, "f", 4);
    pong(&mut p, 2);
    let mut seen = Vec::new();
    while !seen.iter().any(|s: &String| s.starts_with("Pong")) {
        let pkt = r.next_packet();
        let f = format!("{:?}", pkt.frame());
        seen.push(f.trim_start_matches("Some(").to_owned());
        if !pkt.fds.is_empty() {
            // Sent before the pong: the ack was believed at once.
            break;
        }
    }
    let mut fds = 0;
    while fds < 4 {
        let Some(pkt) = r.recv_packet(Duration::from_secs(10)) else {
            panic!("the next window never came ({fds} of 4 fds); read before: {seen:?}");
        };
        fds += pkt.fds.len();
    }
}

/// A client the broker closes while it holds fds unacknowledged lingers;
/// once it acks them and reads its goodbye, every packet is read: the
/// broker must let it go (close its socket), not hold it until it hangs up.
#[test]
fn a_lingering_client_that_acks_and_reads_its_goodbye_is_let_go() {
    let b = Broker::start_with("lingerack", &["--fd-window", "4"]);
    let baseline = b.baseline_fds();
    let mut p = Raw::hello(&b);
    let mut r = Raw::hello(&b);
    subscribe(&mut r, 1, "f");
    publish_memfds(&mut p, "f", 2);
    pong(&mut p, 1);
    take_fd_deliveries(&mut r, 2);
    // A frame the broker cannot decode: a violation, a goodbye.
    r.send(&[0xff; 16], &[]);
    assert!(socket::wait_readable(r.fd.as_fd(), Some(PATIENCE)).unwrap());
    // The goodbye waits unread while the ack goes.
    r.send_body(&FdAck { fds: 2 }, &[]);
    pong(&mut p, 2);
    let pkt = r.next_packet();
    assert!(matches!(pkt.frame(), Some(BrokerFrame::Goodbye(_))), "{:?}", pkt.frame());
    drop(p);
    // r stays open: only the broker can end it now.
    b.wait_fd_count(baseline);
    drop(r);
}
