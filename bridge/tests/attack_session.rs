//! Attacks on what this session added to the bridge: forged `Shmbus-Seq`
//! headers from a plain NATS publisher, many distinct (bridge, subject)
//! pairs with large forged bridge names, a flood of status callers, and a
//! local publish carrying a maximal origin. A bystander's messages must
//! keep crossing, and the bridge must stay up and answer its status.

mod common;

use std::time::Duration;

use common::*;

#[test]
#[ignore = "the harness's broker role, not a test"]
fn broker_process() {
    common::broker_process();
}

const CFG: &str = r#"
export = ["t.>"]
import = ["t.>", "f.>"]
"#;

struct One {
    b: Bridge,
    broker: Broker,
    nats: Nats,
}

fn one(tag: &str) -> One {
    let nats = Nats::start(None);
    let broker = Broker::start(tag);
    let b = Bridge::start("hostB", &broker, &nats, CFG);
    One { b, broker, nats }
}

fn forge(url: &str, msgs: Vec<(String, Vec<(&'static str, String)>)>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let nc = async_nats::connect(url).await.unwrap();
        for (subject, headers) in msgs {
            let mut hdr = async_nats::HeaderMap::new();
            for (k, v) in headers {
                hdr.insert(k, v.as_str());
            }
            nc.publish_with_headers(subject, hdr, "x".into()).await.unwrap();
        }
        nc.flush().await.unwrap();
    });
}

/// A bystander message still crosses from NATS to the local broker.
fn bystander_crosses(h: &One, sub: &shmbus::Subscription, n: usize) {
    forge(&h.nats.url(), vec![(format!("t.bystander.{n}"), vec![])]);
    let m = next_message(sub, "the bystander's message");
    assert_eq!(m.topic(), format!("t.bystander.{n}"));
}

/// Forged sequence numbers: non-numeric, negative, huge, u64::MAX, and a
/// jump from 1 to u64::MAX on two subjects (whose "lost" counts add past
/// 2^64). The bridge must not panic (its counters, its gap notices) and
/// must keep importing and answering its status.
#[test]
fn forged_sequence_numbers_neither_panic_nor_poison_the_counts() {
    let h = one("seqforge");
    let c = h.broker.client();
    let sub = c.subscribe("t.>").unwrap();
    bystander_crosses(&h, &sub, 0);
    let bad = |s: &str| vec![("Shmbus-Bridge", "evil".to_owned()), ("Shmbus-Seq", s.to_owned())];
    let mut msgs = Vec::new();
    for s in ["abc", "-1", "", "99999999999999999999999", "0x10", " 5 "] {
        msgs.push(("t.f.junk".to_owned(), bad(s)));
    }
    for subj in ["t.f.a", "t.f.b", "t.f.c"] {
        msgs.push((subj.to_owned(), bad("1")));
        msgs.push((subj.to_owned(), bad(&u64::MAX.to_string())));
    }
    forge(&h.nats.url(), msgs.clone());
    for _ in 0..12 {
        let m = next_message(&sub, "the forged messages");
        assert!(m.topic().starts_with("t.f."), "{}", m.topic());
    }
    // Let the gap task (500 ms tick) see the totals, then wrap them again
    // on fresh subjects so the total falls below what the task last told.
    std::thread::sleep(Duration::from_millis(1500));
    let again: Vec<_> = msgs.into_iter().skip(6).map(|(s, h)| (s.replace("t.f.", "t.g."), h)).collect();
    forge(&h.nats.url(), again);
    for _ in 0..6 {
        next_message(&sub, "the second forged messages");
    }
    std::thread::sleep(Duration::from_millis(1500));
    bystander_crosses(&h, &sub, 1);
    let s = h.b.status();
    let lost = s.nats_to_local.dropped["nats-lost"];
    let log = h.b.log();
    assert!(!log.contains("panicked"), "the bridge panicked:\n{log}");
    assert!(
        lost < 1_000_000,
        "a forged Shmbus-Seq let a NATS publisher set nats-lost to {lost} (status {s:?})"
    );
}

/// Many distinct (bridge, subject) pairs, each with a large forged bridge
/// name: the importer's table is bounded in entries (4,096) but its keys
/// are the forged strings. The bridge's RSS must stay bounded.
#[test]
fn many_forged_bridge_names_keep_the_bridge_bounded() {
    let h = one("seqnames");
    let c = h.broker.client();
    let sub = c.subscribe("t.bystander.>").unwrap();
    bystander_crosses(&h, &sub, 0);
    let name = "B".repeat(64 * 1024);
    let url = h.nats.url();
    let flood = |distinct: bool| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let nc = async_nats::connect(url.clone()).await.unwrap();
            for i in 0..6000u32 {
                let mut hdr = async_nats::HeaderMap::new();
                let mut n = name.clone();
                let subject = if distinct {
                    n.push_str(&i.to_string());
                    format!("f.s{i}")
                } else {
                    "f.same".to_owned()
                };
                hdr.insert("Shmbus-Bridge", n.as_str());
                hdr.insert("Shmbus-Seq", (i + 1).to_string().as_str());
                nc.publish_with_headers(subject, hdr, "x".into()).await.unwrap();
                if i % 256 == 0 {
                    nc.flush().await.unwrap();
                }
            }
            nc.flush().await.unwrap();
        });
    };
    // Control: the same bytes through NATS, one table entry.
    flood(false);
    bystander_crosses(&h, &sub, 10);
    std::thread::sleep(Duration::from_millis(500));
    let rss0 = h.b.rss();
    // Attack: 64 KiB bridge names on 6,000 subjects (f.> is imported,
    // nobody local subscribes it; the bridge keeps the table).
    flood(true);
    bystander_crosses(&h, &sub, 1);
    std::thread::sleep(Duration::from_millis(500));
    bystander_crosses(&h, &sub, 2);
    let rss1 = h.b.rss();
    let grew = rss1.saturating_sub(rss0);
    eprintln!("bridge rss {rss0} -> {rss1} (+{grew})");
    assert!(h.b.try_status().is_some(), "the bridge answers its status");
    // 4,096 keys × 64 KiB = 256 MiB if the keys are kept whole.
    assert!(grew < 128 * 1024 * 1024, "the bridge grew by {grew} bytes on forged bridge names");
}

/// Many callers of the status service at once, none reading slowly: the
/// bridge answers them all and keeps importing.
#[test]
fn a_flood_of_status_callers_does_not_stop_the_bridge() {
    let h = one("statusflood");
    let c = h.broker.client();
    let sub = c.subscribe("t.>").unwrap();
    bystander_crosses(&h, &sub, 0);
    let name = shmbus_bridge::status_name("hostB");
    let address = h.broker.address.clone();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let name = name.clone();
            let address = address.clone();
            std::thread::spawn(move || {
                let c = shmbus::Client::connect_to(&address).unwrap();
                let mut ok = 0;
                for _ in 0..200 {
                    // Fire-and-forget requests too: callers that never wait.
                    if c.request(&name, b"", Duration::from_secs(10)).is_ok() {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    for i in 1..20 {
        bystander_crosses(&h, &sub, i);
    }
    let answered: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(answered, 16 * 200, "every status call answered");
    assert!(h.b.try_status().is_some());
}

/// A local publisher's 256-byte origin through the exporting bridge: it
/// crosses (the bridge writes its own origin of at most 200 bytes) and
/// nothing breaks.
#[test]
fn a_maximal_local_origin_crosses_the_bridge() {
    let h = one("origin256");
    let c = h.broker.client();
    let url = h.nats.url();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let got = rt.block_on(async {
        use futures_util::StreamExt;
        let nc = async_nats::connect(url).await.unwrap();
        let mut raw = nc.subscribe("t.o").await.unwrap();
        nc.flush().await.unwrap();
        let origin = "\u{202e}".repeat(85) + "z"; // 255 + 1 bytes, bidi overrides
        assert_eq!(origin.len(), 256);
        let mut got = None;
        for _ in 0..50 {
            c.publish_with_origin("t.o", "p", &origin).unwrap();
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), raw.next()).await {
                got = Some(m);
                break;
            }
        }
        got.expect("the message crossed to NATS")
    });
    assert_eq!(&got.payload[..], b"p");
    let sub = c.subscribe("t.>").unwrap();
    bystander_crosses(&h, &sub, 0);
    assert!(h.b.try_status().is_some());
}
