//! `bridge`: two hosts (two brokers) joined by two `shmbus-bridge`s through
//! one local `nats-server`, beside raw NATS through the same server, in the
//! same run.
//!
//! - round trip of a call from A to a service on B (caller → broker A →
//!   bridge A → NATS → bridge B → broker B → service → and all the way
//!   back), 16 B, against a raw NATS request/reply between two connections
//!   of one NATS server (the floor: the NATS hops alone). The two paths are
//!   timed in alternating blocks; `ratio_to_floor` is bridged / raw at p50;
//! - forwarded rate at 16 B: one publisher on A as fast as it can,
//!   messages per second arriving at a subscriber on B, with what was
//!   dropped on the way (the bridge's counters: a publisher faster than
//!   NATS overflows the bridge's bounded queue, by design), against raw
//!   NATS publish → subscribe through the same server.
//!
//! Each bridge runs in a helper process (`__bridge CONFIG`, this binary),
//! the service in another (`__service`). Skips, saying so, when
//! `nats-server` is not installed.

use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use shmbus::{Client, Event};

use crate::{connect_retry, percentiles, start_broker, Helper, Report, Row};

const NAME: &str = "bench.svc";
const RTT_WARMUP: usize = 300;
const RTT_ITERS: usize = 3_000;
const RTT_BLOCK: usize = 300;
const TP_MESSAGES: u64 = 200_000;

/// The `__bridge CONFIG` helper: a bridge in this process.
pub(crate) fn helper_bridge(config: &str) {
    let host = shmbus_bridge::hostname();
    let cfg = shmbus_bridge::Config::load(std::path::Path::new(config), &host).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(shmbus_bridge::run(cfg, host, std::future::pending())).unwrap();
}

fn nats_server() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join("nats-server"))
        .find(|p| p.is_file())
}

struct Rig {
    // Drop order: bridges and service, then brokers, then NATS.
    _bridges: [Helper; 2],
    _service: Helper,
    _brokers: [Helper; 2],
    _nats: Helper,
    url: String,
    a: Client,
    b: Client,
    configs: Vec<std::path::PathBuf>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for c in &self.configs {
            let _ = std::fs::remove_file(c);
        }
    }
}

fn status(c: &Client, name: &str) -> Option<serde_json::Value> {
    let r = c.request(&shmbus_bridge::status_name(name), b"", Duration::from_secs(2)).ok()?;
    serde_json::from_slice(r.payload()).ok()
}

fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Rig {
    fn new(server: &std::path::Path) -> Rig {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(server)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        let nats = Helper(child);
        wait("nats-server", || TcpStream::connect(("127.0.0.1", port)).ok());
        let url = format!("nats://127.0.0.1:{port}");
        let (ba, addr_a) = start_broker("bridge-a");
        let (bb, addr_b) = start_broker("bridge-b");
        let service = Helper::spawn(&["__service", &addr_b]);
        let mut configs = Vec::new();
        let mut bridge = |name: &str, addr: &str, body: &str| {
            let path = std::env::temp_dir().join(format!("shmbus-bench-{name}-{}.toml", std::process::id()));
            let text = format!("nats = \"{url}\"\nshmbus = \"{addr}\"\nname = \"{name}\"\n{body}\n");
            std::fs::write(&path, text).unwrap();
            let h = Helper::spawn(&["__bridge", path.to_str().unwrap()]);
            configs.push(path);
            h
        };
        let bridge_a = bridge("benchA", &addr_a, "export = [\"bench.>\"]\nservices_import = [\"bench.svc\"]");
        let bridge_b = bridge("benchB", &addr_b, "import = [\"bench.>\"]\nservices_export = [\"bench.svc\"]");
        let a = connect_retry(&addr_a);
        let b = connect_retry(&addr_b);
        for (c, n) in [(&a, "benchA"), (&b, "benchB")] {
            wait("the bridge to reach NATS", || {
                status(c, n).filter(|s| s["nats"]["connected"] == serde_json::json!(true))
            });
        }
        wait("the service on B", || b.name_owner(NAME).ok().flatten());
        Rig {
            _bridges: [bridge_a, bridge_b],
            _service: service,
            _brokers: [ba, bb],
            _nats: nats,
            url,
            a,
            b,
            configs,
        }
    }
}

pub(crate) fn bridge(report: &mut Report) {
    let Some(server) = nats_server() else {
        eprintln!("bridge: skipped, nats-server is not installed (apt-get install nats-server)");
        return;
    };
    let rig = Rig::new(&server);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (nc, responder) = rt.block_on(async {
        let nc = async_nats::connect(&rig.url).await.unwrap();
        let echo = async_nats::connect(&rig.url).await.unwrap();
        let mut sub = echo.subscribe("floor.echo").await.unwrap();
        echo.flush().await.unwrap();
        let task = tokio::spawn(async move {
            while let Some(m) = sub.next().await {
                if let Some(r) = m.reply {
                    let _ = echo.publish(r, m.payload).await;
                }
            }
        });
        (nc, task)
    });

    // Round trips, alternating blocks.
    let msg = vec![1u8; 16];
    let call = || {
        let r = rig.a.request(NAME, &msg, Duration::from_secs(10)).expect("a call across the bridges");
        assert_eq!(r.len(), msg.len());
    };
    let raw = || {
        rt.block_on(async {
            let r = nc.request("floor.echo", bytes::Bytes::copy_from_slice(&msg)).await.unwrap();
            assert_eq!(r.payload.len(), msg.len());
        })
    };
    for _ in 0..RTT_WARMUP {
        call();
        raw();
    }
    let (mut bridged, mut floor) = (Vec::with_capacity(RTT_ITERS), Vec::with_capacity(RTT_ITERS));
    while bridged.len() < RTT_ITERS {
        for _ in 0..RTT_BLOCK {
            let t = Instant::now();
            call();
            bridged.push(t.elapsed().as_nanos() as u64);
        }
        for _ in 0..RTT_BLOCK {
            let t = Instant::now();
            raw();
            floor.push(t.elapsed().as_nanos() as u64);
        }
    }
    let floor = percentiles(floor);
    report.push(Row::timed("bridge", "nats_raw_req_reply", 16, None, floor, ("nats_raw_req_reply", floor.0)));
    report.push(Row::timed(
        "bridge",
        "call_a_nats_b_nats_a",
        16,
        None,
        percentiles(bridged),
        ("nats_raw_req_reply", floor.0),
    ));

    // Forwarded rate at 16 B: raw NATS first, then through the bridges.
    let raw_rate = rt.block_on(async {
        let sub_conn = async_nats::connect(&rig.url).await.unwrap();
        let mut sub = sub_conn.subscribe("floor.tp").await.unwrap();
        sub_conn.flush().await.unwrap();
        let payload = bytes::Bytes::from_static(&[0xa5; 16]);
        let start = Instant::now();
        let publisher = nc.clone();
        tokio::spawn(async move {
            for _ in 0..TP_MESSAGES {
                publisher.publish("floor.tp", payload.clone()).await.unwrap();
            }
            publisher.flush().await.unwrap();
        });
        let mut got = 0u64;
        let mut last = start;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
            got += 1;
            last = Instant::now();
            if got == TP_MESSAGES {
                break;
            }
        }
        (got as f64 / last.duration_since(start).as_secs_f64(), TP_MESSAGES - got)
    });
    let sub = rig.b.subscribe("bench.tp").unwrap();
    let probe = rig.b.subscribe("bench.probe").unwrap();
    wait("the path A -> B", || {
        rig.a.publish("bench.probe", b"p").unwrap();
        matches!(probe.recv_timeout(Duration::from_millis(100)), Ok(Some(Event::Message(_)))).then_some(())
    });
    let sum = |v: &serde_json::Value| {
        v.as_object().map_or(0, |d| d.values().filter_map(|v| v.as_u64()).sum::<u64>())
    };
    let before = status(&rig.a, "benchA").expect("bridge A's status");
    let dropped_before = sum(&before["local_to_nats"]["dropped"]);
    let before_b = status(&rig.b, "benchB").expect("bridge B's status");
    let dropped_before_b = sum(&before_b["nats_to_local"]["dropped"]);
    let payload = [0xa5u8; 16];
    let start = Instant::now();
    for _ in 0..TP_MESSAGES {
        rig.a.publish("bench.tp", payload).unwrap();
    }
    let (mut got, mut gaps) = (0u64, 0u64);
    let mut last = start;
    while let Ok(Some(e)) = sub.recv_timeout(Duration::from_secs(1)) {
        match e {
            Event::Message(_) => {
                got += 1;
                last = Instant::now();
            }
            Event::Gap { missed } => gaps += missed,
            Event::Reconnected => {}
        }
        if got == TP_MESSAGES {
            break;
        }
    }
    // One more on the same subject, once the flood is over: the importing
    // bridge counts what NATS lost when the next message shows the gap in
    // the sequence, so a loss at the flood's tail needs a next one.
    let last_word = (0..50).find_map(|_| {
        rig.a.publish("bench.tp", b"last").unwrap();
        match sub.recv_timeout(Duration::from_millis(200)) {
            Ok(Some(Event::Message(m))) if m.payload() == b"last" => Some(()),
            Ok(Some(Event::Message(_))) => {
                got += 1;
                None
            }
            _ => None,
        }
    });
    assert!(last_word.is_some(), "the path A -> B never came back after the flood");
    let after = status(&rig.a, "benchA").expect("bridge A's status");
    let drops = sum(&after["local_to_nats"]["dropped"]) - dropped_before;
    let after_b = status(&rig.b, "benchB").expect("bridge B's status");
    let drops_b = sum(&after_b["nats_to_local"]["dropped"]) - dropped_before_b;
    let rate = got as f64 / last.duration_since(start).as_secs_f64();
    report.push(Row {
        scenario: "bridge",
        path: "nats_raw_pub_sub".into(),
        size: 16,
        subscribers: Some(1),
        p50_ns: None,
        p99_ns: None,
        msgs_per_s: Some(raw_rate.0),
        floor: "nats_raw_pub_sub".into(),
        ratio_to_floor: 1.0,
        note: format!("{} of {TP_MESSAGES} lost", raw_rate.1),
    });
    report.push(Row {
        scenario: "bridge",
        path: "forward_a_nats_b".into(),
        size: 16,
        subscribers: Some(1),
        p50_ns: None,
        p99_ns: None,
        msgs_per_s: Some(rate),
        floor: "nats_raw_pub_sub".into(),
        // As in `throughput`: floor/path, so bigger is slower.
        ratio_to_floor: raw_rate.0 / rate,
        note: format!(
            "{got} of {TP_MESSAGES} arrived; bridge A dropped {drops} (by reason: {}); bridge B dropped \
             {drops_b} (by reason: {}); B's subscriber gaps {gaps}; not accounted for: {}",
            after["local_to_nats"]["dropped"],
            after_b["nats_to_local"]["dropped"],
            TP_MESSAGES.saturating_sub(got + drops + drops_b + gaps)
        ),
    });
    responder.abort();
}
