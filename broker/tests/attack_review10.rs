//! A tenth review as a hostile local user: with one uid's read budget
//! always spent by its own flood of linked connections, are its OTHER
//! links still served: a closed one ended, a full ring given room, a
//! scribbled one cut off? (597277f, d4198f6: `Reactor::read_link_ring`.)
//! It held in a debug and a release build. A review of the code also
//! found that in a quick turn (the hot list rotates only after a long
//! one) the same first rings of a busy uid could take its budget every
//! turn: the first ring turned away now goes first the next turn
//! (`Reactor::service_links`).
//!
//! Every wait is bounded; the broker is killed on drop.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use shmbus_proto::frame::BrokerFrame;
use shmbus_proto::frame::{encode_head, PayloadRef, Ping, Publish};

const MANY: u32 = 4701;
const BYSTANDER: u32 = 4702;

fn ping(r: &mut Raw, token: u64, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    r.send_body(&Ping { token }, &[]);
    loop {
        let left = limit.checked_sub(t.elapsed())?;
        let p = r.recv_packet(left)?;
        assert!(!p.is_eof(), "the broker closed the bystander");
        if let Some(BrokerFrame::Pong(p)) = p.frame() {
            if p.token == token {
                return Some(t.elapsed());
            }
        }
    }
}

fn wait_fds(b: &Broker, want: usize, limit: Duration) -> (Option<Duration>, usize) {
    let t = Instant::now();
    loop {
        let n = b.fd_count();
        if n == want {
            return (Some(t.elapsed()), n);
        }
        if t.elapsed() > limit {
            return (None, n);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_uids_other_links_are_served_while_its_flood_spends_its_budget() {
    if !needs_root("a_uids_other_links_are_served_while_its_flood_spends_its_budget") {
        return;
    }
    let flood_links: usize = std::env::var("FLOOD_LINKS").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    let _alone = measuring_alone();
    let b = Broker::launch(
        "review10",
        Launch::new().args(&["--allow-uid", &MANY.to_string(), "--allow-uid", &BYSTANDER.to_string()]),
    );
    let mut bystander = raw_as(&b, BYSTANDER, "bystander");
    let base = b.baseline_fds();
    let a = b.address.clone();
    let links: Vec<RawLink> = as_uid(MANY, move || {
        (0..flood_links).map(|i| RawLink::attach_at(&a, &format!("flood-{i}"))).collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = stop.clone();
    let flooder = std::thread::spawn(move || {
        let mut links = links;
        let head =
            encode_head(&Publish { topic: "nobody", origin: None, payload: PayloadRef::Inline }).unwrap();
        let mut written = 0u64;
        while !flooding.load(Ordering::Relaxed) {
            for l in &mut links {
                for _ in 0..8 {
                    match l.producer.try_push(
                        l.map.peer(),
                        l.map.my_data(),
                        shmbus_proto::link::RecordKind::Frame,
                        &[&head, b"x"],
                    ) {
                        Ok(true) => written += 1,
                        _ => break,
                    }
                }
                l.publish();
            }
        }
        (written, links)
    });
    std::thread::sleep(Duration::from_millis(500));
    let fd_flood = b.fd_count();
    let t0 = Instant::now();

    // (a) write some records, then leave.
    let a = b.address.clone();
    let leavers = as_uid(MANY, move || {
        let head =
            encode_head(&Publish { topic: "nobody", origin: None, payload: PayloadRef::Inline }).unwrap();
        let mut ls: Vec<RawLink> = (0..10).map(|i| RawLink::attach_at(&a, &format!("leaver-{i}"))).collect();
        for l in &mut ls {
            for _ in 0..50 {
                assert!(l
                    .producer
                    .try_push(
                        l.map.peer(),
                        l.map.my_data(),
                        shmbus_proto::link::RecordKind::Frame,
                        &[&head, b"y"]
                    )
                    .unwrap());
            }
            l.publish();
        }
        drop(ls);
    });
    // (b) a full ring, then wait for room.
    let a = b.address.clone();
    let waiter = as_uid(MANY, move || {
        let head =
            encode_head(&Publish { topic: "nobody", origin: None, payload: PayloadRef::Inline }).unwrap();
        let mut l = RawLink::attach_at(&a, "waiter");
        let mut n = 0u64;
        let start = Instant::now();
        loop {
            let ok = l
                .producer
                .try_push(
                    l.map.peer(),
                    l.map.my_data(),
                    shmbus_proto::link::RecordKind::Frame,
                    &[&head, &[0u8; 200]],
                )
                .unwrap();
            l.publish();
            if !ok {
                break;
            }
            n += 1;
            assert!(start.elapsed() < Duration::from_secs(20), "never full");
        }
        let full_at = Instant::now();
        // Wait for room (bounded): spin with yields.
        let mut room = None;
        while full_at.elapsed() < Duration::from_secs(15) {
            if l.producer
                .try_push(
                    l.map.peer(),
                    l.map.my_data(),
                    shmbus_proto::link::RecordKind::Frame,
                    &[&head, &[0u8; 200]],
                )
                .unwrap()
            {
                l.publish();
                room = Some(full_at.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        (n, room, l)
    });
    // (c) scribbled rings, sockets kept open.
    let a = b.address.clone();
    let evil: Vec<RawLink> = as_uid(MANY, move || {
        (0..5)
            .map(|i| {
                let e = RawLink::attach_at(&a, &format!("evil-{i}"));
                e.map.my_data()[0].store(u64::MAX, Ordering::Relaxed);
                e.map.mine().tail.v.store(64, Ordering::Release);
                e.raw.send_body(&shmbus_proto::frame::Doorbell, &[]);
                e
            })
            .collect()
    })
    .join()
    .unwrap();
    leavers.join().unwrap();
    let mut rtts = Vec::new();
    let mut tok = 0;
    let (waited, room, wlink) = loop {
        if waiter.is_finished() {
            break waiter.join().unwrap();
        }
        tok += 1;
        rtts.push(ping(&mut bystander, tok, Duration::from_secs(5)).unwrap_or(Duration::from_secs(5)));
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("waiter: {waited} records filled the ring; room after {room:?}; t={:?}", t0.elapsed());
    drop(wlink);
    // Everything but the flood should now be ended, while the flood goes on.
    let (during, n_during) = wait_fds(&b, fd_flood, Duration::from_secs(5));
    for _ in 0..20 {
        tok += 1;
        rtts.push(ping(&mut bystander, tok, Duration::from_secs(5)).unwrap_or(Duration::from_secs(5)));
    }
    stop.store(true, Ordering::Relaxed);
    let (written, links) = flooder.join().unwrap();
    rtts.sort();
    eprintln!(
        "flood {flood_links} links, {written} records, {:?}; fds base {base} flood {fd_flood}; back to flood level \
         during flood: {during:?} (now {n_during}); bystander p50 {:?} max {:?} ({} pings)",
        t0.elapsed(),
        pct(&rtts, 50),
        rtts.last().unwrap(),
        rtts.len()
    );
    drop(links);
    drop(evil);
    let (after, n_after) = wait_fds(&b, base, Duration::from_secs(10));
    eprintln!("after the flood stopped: back to base {base}: {after:?} (now {n_after})");
    assert!(room.is_some(), "the waiting writer was never given room (15 s)");
    assert!(
        during.is_some(),
        "closed/broken links of the flooding uid not ended during the flood: {n_during} fds, want {fd_flood}"
    );
    assert!(after.is_some(), "broker holds {n_after} fds after all left, want {base}");
    assert!(*rtts.last().unwrap() < Duration::from_secs(1), "bystander ping max {:?}", rtts.last().unwrap());
}
