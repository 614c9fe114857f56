//! End-to-end tests of `shmbus-bridge`: two real brokers standing in for two
//! hosts, a bridge process on each, and a real `nats-server` between them.
//!
//! What each test pins: a message crosses exactly once and never comes
//! back; the receiver sees the far bridge as sender; calls cross with
//! their errors (application errors keep their code, no-responder and
//! too-large map to the bridge's codes); large payloads cross byte-exact
//! through memfds; what NATS cannot take is refused and counted; both a
//! NATS restart and a broker restart are recovered from, and the loss
//! counted. Readiness is always polled (status, probes), never slept for.

mod common;

use std::time::Duration;

use common::*;
use shmbus::CallError;
use shmbus_bridge::code;

/// Our uid, as the broker stamps it.
fn own_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("Uid: in /proc/self/status")
}

/// Not a test: the harness runs this binary with it to get a broker
/// process (see `common::broker_process`); ignored in normal runs.
#[test]
#[ignore = "the harness's broker role, not a test"]
fn broker_process() {
    common::broker_process();
}

/// Both bridges export AND import `t.>`; A exports the `svc.>` services,
/// B imports three of them and one nobody exports.
const A_CFG: &str = r#"
export = ["t.>"]
import = ["t.>"]
services_export = ["svc.>"]
request_timeout_ms = 3000
"#;
const B_CFG: &str = r#"
export = ["t.>"]
import = ["t.>"]
services_import = ["svc.echo", "svc.fail", "svc.none", "elsewhere.none"]
request_timeout_ms = 3000
"#;

struct Hosts {
    // Drop order: bridges, then brokers, then NATS.
    a: Bridge,
    b: Bridge,
    broker_a: Broker,
    broker_b: Broker,
    nats: Nats,
}

fn two_hosts(tag: &str, max_payload: Option<usize>) -> Hosts {
    let nats = Nats::start(max_payload);
    let broker_a = Broker::start(&format!("{tag}-a"));
    let broker_b = Broker::start(&format!("{tag}-b"));
    let a = Bridge::start("hostA", &broker_a, &nats, A_CFG);
    let b = Bridge::start("hostB", &broker_b, &nats, B_CFG);
    Hosts { a, b, broker_a, broker_b, nats }
}

#[test]
fn a_publish_crosses_exactly_once_and_never_echoes() {
    let h = two_hosts("once", None);
    let ca = h.broker_a.client();
    let cb = h.broker_b.client();
    let sa = ca.subscribe("t.>").unwrap();
    let sb = cb.subscribe("t.>").unwrap();
    await_path(&ca, &sb, "t.probe");
    drain(&sa, Duration::from_millis(100));

    const N: usize = 20;
    for i in 0..N {
        ca.publish("t.x", format!("m{i}").as_bytes()).unwrap();
    }
    let mut at_b = Vec::new();
    while at_b.len() < N {
        at_b.push(next_message(&sb, "the messages at B"));
    }
    at_b.extend(drain(&sb, Duration::from_millis(500)));
    let payloads: Vec<String> =
        at_b.iter().map(|m| String::from_utf8_lossy(m.payload()).into_owned()).collect();
    let want: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    assert_eq!(payloads, want, "B sees each message once, in order");

    // B's messages come from B's bridge, as its broker stamped them, and
    // their origin names A's bridge and the original sender.
    let b_status = h.b.status();
    let uid = own_uid();
    for m in &at_b {
        assert_eq!(m.sender().client_id, b_status.shmbus.client_id);
        let origin = m.origin().expect("a bridged message carries its origin");
        assert!(origin.starts_with("nats:hostA@"), "{origin}");
        assert!(
            origin.ends_with(&format!(" uid={uid} pid={} client={}", std::process::id(), ca.id())),
            "{origin}"
        );
    }

    // A sees its own publishes once: nothing came back through B.
    let at_a = drain(&sa, Duration::from_millis(500));
    assert_eq!(at_a.len(), N, "A's subscriber sees its own publishes only");
    assert!(at_a.iter().all(|m| m.sender().client_id == ca.id()));

    // B's bridge saw the imported messages on its export subscription and
    // did not send them back.
    let b_status = h.b.wait_status("loops counted", |s| s.local_to_nats.loops_suppressed >= N as u64);
    assert!(b_status.nats_to_local.forwarded >= N as u64);
    let a_status = h.a.status();
    assert!(a_status.local_to_nats.forwarded >= N as u64);
    assert_eq!(a_status.local_to_nats.total_dropped(), 0, "{a_status:?}");
    assert_eq!(a_status.nats_to_local.forwarded, 0, "nothing came back to A: {a_status:?}");

    // The status command, for people and as JSON.
    let out = std::process::Command::new(BRIDGE)
        .args(["status", "--name", "hostA", "--address", &h.broker_a.address])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("bridge hostA") && text.contains("forwarded"), "{text}");
    let out = std::process::Command::new(BRIDGE)
        .args(["status", "--json", "--config"])
        .arg(h.b.config_path())
        .output()
        .unwrap();
    let s: shmbus_bridge::Status = serde_json::from_slice(&out.stdout).expect("status --json is a Status");
    assert_eq!(s.name, "hostB");
    assert!(s.nats.connected);
}

#[test]
fn calls_cross_with_application_errors_and_no_responder() {
    let h = two_hosts("calls", None);
    let ca = h.broker_a.client();
    let echo = ca.serve("svc.echo").unwrap();
    let fail = ca.serve("svc.fail").unwrap();
    let served = std::thread::spawn(move || {
        let mut n = 0;
        while n < 2 {
            if let Ok(Some(r)) = echo.recv_timeout(Duration::from_millis(50)) {
                let origin = r.origin().expect("a bridged call carries its origin").to_owned();
                assert!(origin.starts_with("nats:hostB@"), "{origin}");
                let mut p = r.payload().to_vec();
                p.reverse();
                r.reply(&p).unwrap();
                n += 1;
            }
            if let Ok(Some(r)) = fail.recv_timeout(Duration::from_millis(50)) {
                r.reply_error(42, "out of paper").unwrap();
                n += 1;
            }
        }
    });
    let cb = h.broker_b.client();
    let t = Duration::from_secs(5);
    let r = cb.request("svc.echo", b"hello", t).expect("a call across the bridges");
    assert_eq!(r.payload(), b"olleh");
    match cb.request("svc.fail", b"x", t) {
        Err(CallError::App { code, message, .. }) => {
            assert_eq!(code, 42);
            assert_eq!(message, "out of paper");
        }
        other => panic!("expected the application error, got {other:?}"),
    }
    served.join().unwrap();
    // Exported by A's bridge but served by nobody on A.
    match cb.request("svc.none", b"x", t) {
        Err(CallError::App { code, .. }) => assert_eq!(code, code::NO_RESPONDER),
        other => panic!("expected no-responder, got {other:?}"),
    }
    // Exported by no bridge at all: NATS's own no-responders.
    match cb.request("elsewhere.none", b"x", t) {
        Err(CallError::App { code, .. }) => assert_eq!(code, code::NO_RESPONDER),
        other => panic!("expected no-responder, got {other:?}"),
    }
    let sb = h.b.status();
    assert_eq!(sb.local_to_nats.calls_ok, 1);
    assert_eq!(sb.local_to_nats.calls_failed.get("app"), Some(&1));
    assert_eq!(sb.local_to_nats.calls_failed.get("no-responder"), Some(&2));
    let sa = h.a.status();
    assert_eq!(sa.nats_to_local.calls_ok, 1);
    assert_eq!(sa.nats_to_local.calls_failed.get("no-responder"), Some(&1));
}

#[test]
fn a_512k_memfd_payload_crosses_byte_exact() {
    let h = two_hosts("memfd", None);
    let ca = h.broker_a.client();
    let cb = h.broker_b.client();
    let sb = cb.subscribe("t.>").unwrap();
    await_path(&ca, &sb, "t.probe");
    let big: Vec<u8> = (0..512 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    ca.publish("t.big", &big).unwrap();
    let m = next_message(&sb, "the 512 KiB message");
    assert_eq!(m.topic(), "t.big");
    assert!(m.is_memfd(), "above the inline limit the bridge publishes a memfd");
    assert!(m.payload() == big.as_slice(), "byte-exact");
}

#[test]
fn over_max_payload_is_refused_and_counted() {
    let h = two_hosts("maxpay", Some(100_000));
    let ca = h.broker_a.client();
    let cb = h.broker_b.client();
    let sb = cb.subscribe("t.>").unwrap();
    await_path(&ca, &sb, "t.probe");
    assert_eq!(h.a.status().nats.max_payload, 100_000);
    ca.publish("t.big", vec![7u8; 200_000]).unwrap();
    ca.publish("t.after", b"small").unwrap();
    let m = next_message(&sb, "the small message after the refused one");
    assert_eq!(m.topic(), "t.after", "the large one never crossed, truncated or not");
    let s = h.a.wait_status("the refusal counted", |s| s.local_to_nats.dropped["too-large"] == 1);
    assert_eq!(s.local_to_nats.total_dropped(), 1);
    // A request too large for NATS is answered with an error, not cut.
    match cb.request("svc.echo", vec![1u8; 200_000], Duration::from_secs(5)) {
        Err(CallError::App { code, .. }) => assert_eq!(code, code::TOO_LARGE),
        other => panic!("expected too-large, got {other:?}"),
    }
    assert_eq!(h.b.status().local_to_nats.calls_failed.get("too-large"), Some(&1));
}

#[test]
fn plain_nats_publishers_and_hostile_subjects() {
    let h = two_hosts("plain", None);
    let cb = h.broker_b.client();
    let sb = cb.subscribe("t.>").unwrap();
    let gaps = cb.subscribe(&shmbus_bridge::gap_subject("hostB")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = h.nats.url();
    rt.block_on(async {
        let nc = async_nats::connect(url).await.unwrap();
        // 40 tokens: valid for NATS, too deep for shmbus.
        let deep = format!("t.{}", vec!["x"; 40].join("."));
        nc.publish(deep, "deep".into()).await.unwrap();
        let mut hdr = async_nats::HeaderMap::new();
        hdr.insert("Shmbus-Bridge", "x".repeat(20_000).as_str());
        hdr.insert("Shmbus-Sender", "\u{1}é\u{7f}");
        nc.publish_with_headers("t.hostile", hdr, "h".into()).await.unwrap();
        nc.publish("t.plain", "p".into()).await.unwrap();
        nc.flush().await.unwrap();
    });
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(next_message(&sb, "the plain NATS messages"));
    }
    let topics: Vec<&str> = got.iter().map(|m| m.topic()).collect();
    assert_eq!(topics, ["t.hostile", "t.plain"]);
    // A hostile header becomes a bounded, printable origin.
    let hostile = got[0].origin().unwrap();
    assert!(hostile.len() <= 200 && hostile.chars().all(|c| (' '..='~').contains(&c)), "{hostile}");
    assert_eq!(got[1].origin(), Some("nats:t.plain"), "a plain NATS publisher is named by its subject");
    let s = h.b.wait_status("the deep subject counted", |s| s.nats_to_local.dropped["invalid-subject"] == 1);
    assert_eq!(s.nats_to_local.forwarded, 2);
    // The loss is told on the receiving side.
    let notice = next_message(&gaps, "a gap notice");
    let v: serde_json::Value = serde_json::from_slice(notice.payload()).unwrap();
    assert_eq!(v["direction"], "nats-to-local");
    assert_eq!(v["missed"], 1);
    assert_eq!(v["bridge"], "hostB");
}

/// NATS core is at most once: what it drops on the way (a slow
/// consumer's messages) the importing bridge counts, exactly, from the
/// gaps in the exporting bridge's per-subject sequence.
#[test]
fn messages_lost_inside_nats_are_counted_from_the_senders_sequence() {
    let h = two_hosts("seq", None);
    let ca = h.broker_a.client();
    let cb = h.broker_b.client();
    let sb = cb.subscribe("t.>").unwrap();
    await_path(&ca, &sb, "t.probe");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = h.nats.url();
    // Bridge A numbers what it sends, per subject.
    let seqs: Vec<String> = rt.block_on(async {
        use futures_util::StreamExt;
        let nc = async_nats::connect(url.clone()).await.unwrap();
        let mut raw = nc.subscribe("t.s").await.unwrap();
        nc.flush().await.unwrap();
        for i in 0..3 {
            ca.publish("t.s", format!("{i}")).unwrap();
        }
        let mut v = Vec::new();
        while v.len() < 3 {
            let m = tokio::time::timeout(PATIENCE, raw.next()).await.expect("A's message on NATS").unwrap();
            v.push(
                m.headers.as_ref().and_then(|h| h.get("Shmbus-Seq")).map_or("none".into(), |s| s.to_string()),
            );
        }
        v
    });
    assert_eq!(seqs, ["1", "2", "3"]);
    // (Late copies of await_path's probes may still come: skipped.)
    let next_not_probe = |what: &str| loop {
        let m = next_message(&sb, what);
        if m.topic() != "t.probe" {
            return m;
        }
    };
    for _ in 0..3 {
        assert_eq!(next_not_probe("A's numbered messages at B").topic(), "t.s");
    }
    // Nothing lost so far (said now, with the status, rather than as a
    // timeout below).
    let s = h.b.status();
    assert_eq!(s.nats_to_local.dropped["nats-lost"], 0, "{s:?}\n{}", h.b.log());
    // A sender whose numbers skip 3, 4 and 5 (as if NATS dropped them).
    rt.block_on(async {
        let nc = async_nats::connect(url).await.unwrap();
        for n in [1, 2, 6] {
            let mut hdr = async_nats::HeaderMap::new();
            hdr.insert("Shmbus-Bridge", "hostX");
            hdr.insert("Shmbus-Seq", n.to_string().as_str());
            nc.publish_with_headers("t.gappy", hdr, "g".into()).await.unwrap();
        }
        nc.flush().await.unwrap();
    });
    for _ in 0..3 {
        assert_eq!(next_not_probe("hostX's messages").topic(), "t.gappy");
    }
    let s = h.b.wait_status("the loss inside NATS counted", |s| s.nats_to_local.dropped["nats-lost"] >= 3);
    assert_eq!(s.nats_to_local.dropped["nats-lost"], 3, "{s:?}");
}

#[test]
fn nats_restart_mid_stream_is_recovered_and_the_loss_counted() {
    let mut h = two_hosts("natsrestart", None);
    let ca = h.broker_a.client();
    let cb = h.broker_b.client();
    let sb = cb.subscribe("t.>").unwrap();
    await_path(&ca, &sb, "t.probe");
    for i in 0..10 {
        ca.publish("t.before", format!("{i}").as_bytes()).unwrap();
    }
    h.nats.stop();
    h.a.wait_status("A to see NATS gone", |s| !s.nats.connected);
    for i in 0..10 {
        ca.publish("t.during", format!("{i}").as_bytes()).unwrap();
    }
    let s = h.a.wait_status("the loss counted", |s| s.local_to_nats.dropped["nats-down"] >= 10);
    assert!(s.local_to_nats.dropped["nats-down"] >= 10, "{s:?}");
    h.nats.restart();
    h.a.wait_status("A back on NATS", |s| s.nats.connected && s.nats.reconnects >= 1);
    h.b.wait_status("B back on NATS", |s| s.nats.connected && s.nats.reconnects >= 1);
    await_path(&ca, &sb, "t.probe");
    ca.publish("t.after", b"later").unwrap();
    let m = next_message(&sb, "a message after the restart");
    assert_eq!(m.topic(), "t.after");
    assert!(h.a.log().contains("nats: reconnected"), "the state change is logged");
}

#[test]
fn a_broker_restart_is_recovered_names_and_subscriptions_renewed() {
    let mut h = two_hosts("brokerrestart", None);
    h.broker_a.restart();
    // It answers its status again: it owns its name on the new broker.
    h.a.wait_status("A's bridge back on its broker", |s| s.shmbus.reconnects >= 1);
    let ca = h.broker_a.client();
    let cb = h.broker_b.client();
    // Export (A -> B) resumes.
    let sb = cb.subscribe("t.>").unwrap();
    await_path(&ca, &sb, "t.probe-ab");
    // Import (B -> A) resumes.
    let sa = ca.subscribe("t.>").unwrap();
    await_path(&cb, &sa, "t.probe-ba");
    // Exported services are called on the new broker.
    let echo = ca.serve("svc.echo").unwrap();
    let served = std::thread::spawn(move || {
        let r = echo.recv_timeout(PATIENCE).unwrap().expect("the call reaches A");
        r.reply(b"pong").unwrap();
    });
    let r = cb.request("svc.echo", b"ping", Duration::from_secs(10)).unwrap();
    assert_eq!(r.payload(), b"pong");
    served.join().unwrap();
}

#[test]
fn bad_configs_fail_naming_the_key() {
    let dir = TempDir::new("bridge-bad");
    for (body, key) in [
        ("nats = \"nats://127.0.0.1:1\"\nexprot = [\"a\"]\n", "exprot"),
        ("nats = \"nats://127.0.0.1:1\"\nservices_import = [\"billing.>\"]\n", "services_import[0]"),
        ("nats = \"nats://127.0.0.1:1\"\nprefix = \"host1\"\n", "prefix"),
    ] {
        let path = dir.join(format!("{}.toml", unique("bad")));
        std::fs::write(&path, body).unwrap();
        let out = std::process::Command::new(BRIDGE).arg("--config").arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(key), "{key} not named in: {err}");
    }
}

#[test]
fn a_second_bridge_of_the_same_name_is_refused() {
    let nats = Nats::start(None);
    let broker = Broker::start("dupname");
    let _first = Bridge::start("dup", &broker, &nats, "");
    let dir = TempDir::new("bridge-dup");
    let path = dir.join("dup.toml");
    std::fs::write(
        &path,
        format!("nats = \"{}\"\nshmbus = \"{}\"\nname = \"dup\"\n", nats.url(), broker.address),
    )
    .unwrap();
    let out = std::process::Command::new(BRIDGE).arg("--config").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("another bridge named \"dup\""), "{err}");
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/shmbus-bridge.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    for key in
        ["RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "NoNewPrivileges=yes", "User=shmbus-bridge"]
    {
        assert!(text.contains(key), "shmbus-bridge.service lacks {key}");
    }
    let dir = TempDir::new("bridge-unit");
    let staged = dir.join("shmbus-bridge.service");
    std::fs::write(&staged, text.replace("/usr/local/bin/shmbus-bridge", BRIDGE)).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&staged)
        .output()
        .expect("systemd-analyze is missing: install Debian's systemd package (.ci/run does)");
    let err = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("shmbus-bridge")).collect();
    assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify: {err}");
}

/// Overlapping patterns in one bridge's lists (`t.>` and `t.a.*`) are two
/// subscriptions on each side, and each side delivers a matching message
/// once per subscription: the bridge must still forward it once, and call
/// an exported service once per request.
#[test]
fn overlapping_patterns_in_one_config_forward_once() {
    let nats = Nats::start(None);
    let broker_a = Broker::start("overlap-a");
    let broker_b = Broker::start("overlap-b");
    let a = Bridge::start(
        "ovA",
        &broker_a,
        &nats,
        "export = [\"t.>\", \"t.a.*\", \"t.a.b\"]\nservices_export = [\"svc.>\", \"svc.*\"]\n",
    );
    let b = Bridge::start(
        "ovB",
        &broker_b,
        &nats,
        "import = [\"t.>\", \"t.a.*\"]\nservices_import = [\"svc.echo\"]\n",
    );
    let ca = broker_a.client();
    let cb = broker_b.client();
    let sb = cb.subscribe("t.>").unwrap();
    await_path(&ca, &sb, "t.a.probe");
    for i in 0..5 {
        ca.publish("t.a.b", format!("m{i}").as_bytes()).unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        got.push(next_message(&sb, "the messages at B"));
    }
    got.extend(drain(&sb, Duration::from_millis(700)));
    let payloads: Vec<String> =
        got.iter().map(|m| String::from_utf8_lossy(m.payload()).into_owned()).collect();
    assert_eq!(payloads, ["m0", "m1", "m2", "m3", "m4"], "each message once at B");

    // A plain NATS publisher on a subject both import patterns match.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = nats.url();
    rt.block_on(async {
        let nc = async_nats::connect(url).await.unwrap();
        nc.publish("t.a.plain", "p".into()).await.unwrap();
        nc.flush().await.unwrap();
    });
    let m = next_message(&sb, "the plain NATS message");
    assert_eq!(m.topic(), "t.a.plain");
    assert!(drain(&sb, Duration::from_millis(700)).is_empty(), "imported once");

    // A request to a name both service patterns match: one local call.
    let echo = ca.serve("svc.echo").unwrap();
    let served = std::thread::spawn(move || {
        let mut calls = 0;
        while let Ok(Some(r)) = echo.recv_timeout(Duration::from_millis(1500)) {
            calls += 1;
            r.reply(b"pong").unwrap();
        }
        calls
    });
    let r = cb.request("svc.echo", b"ping", Duration::from_secs(10)).unwrap();
    assert_eq!(r.payload(), b"pong");
    assert_eq!(served.join().unwrap(), 1, "the service was called once");
    let sa = a.status();
    assert_eq!(sa.nats_to_local.calls_ok, 1, "{sa:?}");
    drop(b);
}

/// A stalled NATS server (stopped, its socket still open: the bridge sees
/// no disconnection) and a local flood of large messages on an exported
/// subject: the bridge keeps reading (the publisher is never held up),
/// holds a bounded amount of memory, and counts what it cannot queue.
#[test]
fn a_stalled_nats_server_costs_bounded_memory_and_counted_drops() {
    let h = two_hosts("stall", None);
    let ca = h.broker_a.client();
    let cb = h.broker_b.client();
    let sb = cb.subscribe("t.>").unwrap();
    await_path(&ca, &sb, "t.probe");
    let before = h.a.status().local_to_nats;
    signal(h.nats.pid(), "STOP");
    struct Cont(u32);
    impl Drop for Cont {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
        }
    }
    let _cont = Cont(h.nats.pid());
    const N: u64 = 1200;
    let big = vec![5u8; 512 * 1024];
    for _ in 0..N {
        ca.publish("t.big", &big).unwrap();
    }
    // Every message is accounted for: forwarded (handed to the NATS
    // client), dropped with a reason, or still in the bridge's queue.
    let accounted = |s: &shmbus_bridge::Status| {
        let l = &s.local_to_nats;
        (l.forwarded + l.total_dropped()) - (before.forwarded + before.total_dropped())
    };
    // (and one in the writer's hands, waiting for the NATS client)
    let queue_room = (shmbus_bridge::bridge::QUEUE_BYTES / big.len()) as u64 + 1;
    let s = h.a.wait_status("the large messages accounted for or queued", |s| accounted(s) + queue_room >= N);
    let rss = h.a.rss();
    assert!(rss < 220 << 20, "bridge A holds {} MiB for a stalled NATS: {s:?}", rss >> 20);
    assert!(s.local_to_nats.dropped["queue-full"] > 0, "{s:?}");
    // NATS back: what was queued goes on, and all of it is accounted for.
    drop(_cont);
    h.a.wait_status("every large message accounted for", |s| accounted(s) >= N);
}

/// A stalled local broker (stopped: the bridge's publishes wait for room
/// on its socket) and a NATS flood of large messages on an imported
/// subject: the bridge keeps reading NATS into a bounded queue, holds a
/// bounded amount of memory, and counts what it cannot queue.
#[test]
fn a_stalled_broker_costs_bounded_memory_and_counted_drops() {
    let h = two_hosts("stallb", None);
    let cb = h.broker_b.client();
    let sb = cb.subscribe("t.>").unwrap();
    await_path(&h.broker_a.client(), &sb, "t.probe");
    let before = h.b.status().nats_to_local;
    let broker_pid = h.broker_b.pid();
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
    let url = h.nats.url();
    rt.block_on(async {
        let nc = async_nats::connect(url).await.unwrap();
        for _ in 0..N {
            nc.publish("t.flood", big.clone()).await.unwrap();
        }
        nc.flush().await.unwrap();
    });
    // Let the bridge read what NATS sends it (it cannot be asked: its
    // broker is stopped), then measure.
    let start = std::time::Instant::now();
    let mut last = 0;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let rss = h.b.rss();
        if rss == last || start.elapsed() > PATIENCE {
            break;
        }
        last = rss;
    }
    let rss = h.b.rss();
    if let Some(p) = cont.0.take() {
        signal(p, "CONT");
    }
    assert!(rss < 220 << 20, "bridge B holds {} MiB for a stalled broker", rss >> 20);
    // Every message is forwarded or dropped with a reason.
    let s = h.b.wait_status("every message accounted for", |s| {
        let l = &s.nats_to_local;
        (l.forwarded + l.total_dropped()) - (before.forwarded + before.total_dropped()) >= N
    });
    assert!(s.nats_to_local.dropped["queue-full"] > 0, "{s:?}");
}
