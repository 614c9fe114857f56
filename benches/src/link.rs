//! `link`: brokered messages over the shared-memory transport beside the
//! socket transport, in the same run, every peer its own process.
//!
//! - throughput, 16 B and 1 KiB, one `publish()` per message, a publisher
//!   process → broker process → this subscriber: the rate at the
//!   subscriber, what it missed (gap-reported; the bench broker's queues
//!   are deep, so none is expected), the CPU each process spent per
//!   message, and the system calls each made per 1,000 messages over the
//!   whole run (`perf stat -e raw_syscalls:sys_enter` attached to the three
//!   processes before the first message; "n/a" without perf), beside a ring
//!   channel's 1 → 1 rate (8 B, block mode) as the ceiling;
//! - round trip A → broker → B → broker → A at 16 B: *busy* (back to back,
//!   within every spin window) and *idle* (2 ms of sleep between round
//!   trips, so every side has gone to sleep and is woken by a doorbell);
//! - round trip A → broker → A at 16 B, back to back (two processes);
//! - the broker's CPU over 2 s with linked clients connected and idle.
//!
//! The transport is chosen per process: `ConnectOptions::shared_memory`
//! here, `SHMBUS_TRANSPORT` in the helpers; each side checks it got the
//! one asked for.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shmbus::{Client, ConnectOptions, Event, Transport};
use shmbus_proto::Address;

use crate::{start_broker, Helper, Report, Row};

/// CPU time a process's threads have run, in ns (the scheduler's own
/// count, `/proc/<pid>/task/*/schedstat`: exact, where `stat`'s ticks are
/// sampled and miss a process that spins without entering the kernel).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

const TRANSPORTS: [&str; 2] = ["socket", "shm"];

fn spawn_on(args: &[&str], transport: &str) -> Helper {
    let exe = std::env::current_exe().expect("own path");
    let child = Command::new(exe)
        .args(args)
        .env("SHMBUS_TRANSPORT", transport)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn helper");
    Helper(child)
}

fn connect_on(addr: &str, transport: &str) -> Client {
    let start = Instant::now();
    let c = loop {
        let opts =
            ConnectOptions::new().address(Address::parse(addr).unwrap()).shared_memory(transport == "shm");
        match opts.connect() {
            Ok(c) => break c,
            Err(e) if start.elapsed() > Duration::from_secs(10) => panic!("cannot connect to {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let want = if transport == "shm" { Transport::SharedMemory } else { Transport::Socket };
    assert_eq!(c.transport(), want, "the client got the transport asked for");
    c
}

fn check_transport(c: &Client) {
    let want = match std::env::var("SHMBUS_TRANSPORT").as_deref() {
        Ok("socket") => Transport::Socket,
        _ => Transport::SharedMemory,
    };
    assert_eq!(c.transport(), want, "the helper got the transport asked for");
}

/// Publisher helper: waits for `bench.go`, then publishes `n` messages of
/// `size` bytes on `bench.tp`, one `publish()` each.
pub(crate) fn helper_pub_go(addr: &str, size: usize, n: u64) {
    let c = crate::connect_retry(addr);
    check_transport(&c);
    let go = c.subscribe("bench.go").unwrap();
    c.publish("bench.ready", b"").unwrap();
    go.recv_timeout(Duration::from_secs(30)).unwrap().expect("go");
    let payload = vec![0xa5u8; size];
    for _ in 0..n {
        c.publish("bench.tp", &payload).unwrap();
    }
    c.flush().unwrap();
    std::thread::sleep(Duration::from_secs(2));
}

/// Echo helper: answers each `bench.ping` on `bench.pong`.
pub(crate) fn helper_echo(addr: &str) {
    crate::pin_env("SHMBUS_BENCH_PIN_CLIENTS");
    crate::pin_env("SHMBUS_BENCH_PIN_ECHO");
    let c = crate::connect_retry(addr);
    check_transport(&c);
    let sub = c.subscribe("bench.ping").unwrap();
    c.publish("bench.ready", b"").unwrap();
    while let Ok(Event::Message(m)) = sub.recv() {
        if c.publish("bench.pong", m.payload()).is_err() {
            return;
        }
    }
}

/// System calls made by a process, counted by `perf` attached to it.
struct Syscalls(Vec<Child>);

impl Syscalls {
    fn attach(pids: &[u32]) -> Option<Syscalls> {
        let mut children = Vec::new();
        for pid in pids {
            // SHMBUS_BENCH_SYSCALLS=1: count each system call apart too
            // (printed to stderr), to see which ones a path makes.
            let events = if std::env::var_os("SHMBUS_BENCH_SYSCALLS").is_some() {
                "raw_syscalls:sys_enter,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,\
                 syscalls:sys_enter_sendmsg,syscalls:sys_enter_recvmsg,syscalls:sys_enter_recvmmsg,\
                 syscalls:sys_enter_sendmmsg,syscalls:sys_enter_ppoll,syscalls:sys_enter_poll,\
                 syscalls:sys_enter_sched_yield,syscalls:sys_enter_nanosleep,syscalls:sys_enter_clock_nanosleep,\
                 syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_mmap,syscalls:sys_enter_munmap"
            } else {
                "raw_syscalls:sys_enter"
            };
            let child = Command::new("perf")
                .args(["stat", "-x,", "-e", events, "-p", &pid.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .ok()?;
            children.push(child);
        }
        // perf needs a moment to attach before it counts.
        std::thread::sleep(Duration::from_millis(500));
        Some(Syscalls(children))
    }

    fn stop(self) -> Vec<Option<u64>> {
        use std::io::Read;
        self.0
            .into_iter()
            .map(|mut c| {
                let pid = rustix::process::Pid::from_raw(c.id() as i32)?;
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
                let mut err = String::new();
                c.stderr.take()?.read_to_string(&mut err).ok()?;
                let _ = c.wait();
                if std::env::var_os("SHMBUS_BENCH_SYSCALLS").is_some() {
                    eprintln!("perf for one process:\n{err}");
                }
                let line = err.lines().find(|l| l.contains("raw_syscalls:sys_enter"))?;
                if line.contains("<not counted>") {
                    // The process never ran while perf watched.
                    return Some(0);
                }
                line.split(',').next()?.trim().parse().ok()
            })
            .collect()
    }
}

struct Tp {
    rate: f64,
    missed: u64,
    /// System calls per 1,000 messages: broker, publisher, subscriber.
    syscalls: Vec<Option<f64>>,
    /// CPU µs per message: broker, publisher, subscriber.
    cpu: [f64; 3],
}

fn tp(size: usize, transport: &str) -> Tp {
    let n: u64 = if size <= 64 { 4_000_000 } else { 1_000_000 };
    let (broker, addr) = start_broker("linktp");
    let c = connect_on(&addr, transport);
    let s = c.subscribe("bench.tp").unwrap();
    let ready = c.subscribe("bench.ready").unwrap();
    let publisher = spawn_on(&["__link-pub", &addr, &size.to_string(), &n.to_string()], transport);
    ready.recv_timeout(Duration::from_secs(20)).unwrap().expect("publisher ready");
    let pids = [broker.0.id(), publisher.0.id(), std::process::id()];
    let perf = Syscalls::attach(&pids);
    let cpu0 = pids.map(cpu_ns);
    c.publish("bench.go", b"").unwrap();
    let (mut got, mut missed) = (0u64, 0u64);
    let mut start = None;
    while got + missed < n {
        match s.recv_timeout(Duration::from_secs(60)).unwrap().expect("stream stalled") {
            Event::Message(_) => got += 1,
            Event::Gap { missed: m } => missed += m,
            Event::Reconnected => panic!("the broker restarted mid-bench"),
        }
        start.get_or_insert_with(Instant::now);
    }
    let rate = got.saturating_sub(1) as f64 / start.unwrap().elapsed().as_secs_f64();
    let cpu1 = pids.map(cpu_ns);
    let syscalls = match perf {
        Some(p) => p.stop().into_iter().map(|c| c.map(|c| c as f64 * 1000.0 / n as f64)).collect(),
        None => vec![None; 3],
    };
    let cpu = [0, 1, 2].map(|i| (cpu1[i] - cpu0[i]) as f64 / 1000.0 / n as f64);
    Tp { rate, missed, syscalls, cpu }
}

fn median3_tp(mut f: impl FnMut() -> Tp) -> Tp {
    let mut runs = [f(), f(), f()];
    runs.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let [_, mid, _] = runs;
    mid
}

/// A round-trip rig: its own broker, this client and an echo helper, all
/// on `transport`.
struct RttRig {
    _broker: Helper,
    c: Client,
    pong: shmbus::Subscription,
    _echo: Helper,
}

impl RttRig {
    /// CPU time (ns) used so far by the rig's three processes: this one
    /// (A), the echo (B), the broker.
    fn cpu(&self) -> [u64; 3] {
        [std::process::id(), self._echo.0.id(), self._broker.0.id()].map(cpu_ns)
    }

    fn new(transport: &str) -> RttRig {
        let (broker, addr) = start_broker("linkrtt");
        let c = connect_on(&addr, transport);
        let ready = c.subscribe("bench.ready").unwrap();
        let pong = c.subscribe("bench.pong").unwrap();
        let echo = spawn_on(&["__link-echo", &addr], transport);
        ready.recv_timeout(Duration::from_secs(10)).unwrap().expect("echo ready");
        RttRig { _broker: broker, c, pong, _echo: echo }
    }

    fn once(&self) {
        self.c.publish("bench.ping", [1u8; 16]).unwrap();
        let _ = self.pong.recv().unwrap();
    }
}

/// The busy round trip on `transport`: back to back.
fn rtt(transport: &str) -> (u64, u64) {
    let rig = RttRig::new(transport);
    // SHMBUS_BENCH_RTT_ROUNDS: more round trips, for a profiler to attach.
    let rounds = std::env::var("SHMBUS_BENCH_RTT_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50_000);
    crate::timed(2_000, rounds, || rig.once())
}

/// Runs `f` with the busy round trip's processes pinned: the broker (and
/// the floor's relay) on CPU `broker`, this process on CPU 0, the echo
/// (and the floor's echo) on CPU `echo`; this process's CPUs are restored
/// after. Through the environment its helpers inherit (`pin_env`).
fn pinned<T>(broker: usize, echo: usize, f: impl FnOnce() -> T) -> T {
    let before = rustix::thread::sched_getaffinity(None).ok();
    std::env::set_var("SHMBUS_BENCH_PIN_BROKER", broker.to_string());
    std::env::set_var("SHMBUS_BENCH_PIN_CLIENTS", "0");
    std::env::set_var("SHMBUS_BENCH_PIN_ECHO", echo.to_string());
    crate::pin_env("SHMBUS_BENCH_PIN_CLIENTS");
    let r = f();
    for var in ["SHMBUS_BENCH_PIN_BROKER", "SHMBUS_BENCH_PIN_CLIENTS", "SHMBUS_BENCH_PIN_ECHO"] {
        std::env::remove_var(var);
    }
    if let Some(set) = before {
        let _ = rustix::thread::sched_setaffinity(None, &set);
    }
    r
}

/// The idle round trips of one transport: p50 and p99, and the CPU each
/// of A, B and the broker used per round trip (µs), sleeps included (a
/// sleeping process uses none).
struct IdleRtt {
    p: (u64, u64),
    cpu: [f64; 3],
}

/// The idle round trip (2 ms asleep before each, so every side has gone
/// to sleep and is woken by a doorbell) on the socket and on the link:
/// alternating blocks of 100 on two rigs set up side by side, so that the
/// machine's drift over the seconds this takes falls on both alike (run
/// one after the other, the socket's own p50 moved 66–86 µs between runs).
/// Each block's CPU is its rig's: the blocks run one at a time, and A is
/// this process, which does nothing else meanwhile.
fn rtt_idle_both() -> [IdleRtt; 2] {
    const BLOCKS: usize = 20;
    const PER_BLOCK: usize = 100;
    let rigs = TRANSPORTS.map(RttRig::new);
    let mut samples = [Vec::new(), Vec::new()];
    let mut cpu = [[0u64; 3]; 2];
    for block in 0..BLOCKS {
        for ((rig, v), used) in rigs.iter().zip(samples.iter_mut()).zip(cpu.iter_mut()) {
            let before = rig.cpu();
            for i in 0..PER_BLOCK {
                std::thread::sleep(Duration::from_millis(2));
                let t = Instant::now();
                rig.once();
                // The first block of each is a warm-up.
                if block > 0 || i >= 10 {
                    v.push(t.elapsed().as_nanos() as u64);
                }
            }
            if block > 0 {
                let after = rig.cpu();
                for k in 0..3 {
                    used[k] += after[k].saturating_sub(before[k]);
                }
            }
        }
    }
    let rounds = ((BLOCKS - 1) * PER_BLOCK) as f64;
    let [s, l] = samples.map(crate::percentiles);
    let [cs, cl] = cpu.map(|c| c.map(|ns| ns as f64 / 1e3 / rounds));
    [IdleRtt { p: s, cpu: cs }, IdleRtt { p: l, cpu: cl }]
}

/// Round trip A → broker → A, back to back: two processes, so on two
/// CPUs each side can spin on its own (the busy round trip between three
/// processes cannot: one of them is always waiting for a CPU).
fn rtt_self(transport: &str) -> (u64, u64) {
    let (_broker, addr) = start_broker("linkself");
    let c = connect_on(&addr, transport);
    let s = c.subscribe("bench.self").unwrap();
    let msg = [1u8; 16];
    let rounds = std::env::var("SHMBUS_BENCH_RTT_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(50_000);
    crate::timed(2_000, rounds, || {
        c.publish("bench.self", msg).unwrap();
        let _ = s.recv().unwrap();
    })
}

/// Broker CPU (µs) and system calls over 2 s with four
/// linked clients connected, subscribed and quiet.
fn idle_broker() -> (u64, Option<u64>) {
    // Returns CPU µs.
    let (broker, addr) = start_broker("linkidle");
    let clients: Vec<Client> = (0..4).map(|_| connect_on(&addr, "shm")).collect();
    let subs: Vec<_> = clients.iter().map(|c| c.subscribe("bench.idle").unwrap()).collect();
    for c in &clients {
        c.ping().unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let perf = Syscalls::attach(&[broker.0.id()]);
    let t0 = cpu_ns(broker.0.id());
    std::thread::sleep(Duration::from_secs(2));
    let ns = cpu_ns(broker.0.id()) - t0;
    let calls = perf.and_then(|p| p.stop().into_iter().next().flatten());
    drop(subs);
    (ns / 1000, calls)
}

/// Diagnostic: one throughput run over the link at `size`, printed.
pub(crate) fn diag_tp(size: usize, transport: &str) {
    let r = tp(size, transport);
    println!(
        "{transport} {size} B: {:.0} msgs/s, {} missed, syscalls/1000 {:?}, cpu µs/msg {:?}",
        r.rate, r.missed, r.syscalls, r.cpu
    );
}

/// The broker's CPU while one linked client publishes a message every
/// `every` for 2 s (nobody subscribed): what a trickle costs it.
pub(crate) fn trickle_cpu(every: Duration) -> (f64, u64) {
    let (broker, addr) = start_broker("linktrickle");
    let c = connect_on(&addr, "shm");
    c.ping().unwrap();
    let t0 = cpu_ns(broker.0.id());
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        c.publish("bench.trickle", b"x").unwrap();
        n += 1;
        std::thread::sleep(every);
    }
    let used = cpu_ns(broker.0.id()) - t0;
    (used as f64 / start.elapsed().as_nanos() as f64, n)
}

/// Diagnostic: one round-trip run, printed.
pub(crate) fn diag_rtt(idle: bool, transport: &str) {
    crate::pin_env("SHMBUS_BENCH_PIN_CLIENTS");
    let us = |ns: u64| ns as f64 / 1e3;
    if idle {
        // Both transports, interleaved: the ratio is what means anything.
        let [socket, shm] = rtt_idle_both();
        println!(
            "idle: socket p50 {:.2} µs, p99 {:.2} µs; shm p50 {:.2} µs, p99 {:.2} µs; shm/socket p50 {:.2}",
            us(socket.p.0),
            us(socket.p.1),
            us(shm.p.0),
            us(shm.p.1),
            shm.p.0 as f64 / socket.p.0 as f64
        );
        for (t, r) in [("socket", &socket), ("shm", &shm)] {
            println!(
                "  {t} CPU per round trip: A {:.1} µs, B {:.1} µs, broker {:.1} µs",
                r.cpu[0], r.cpu[1], r.cpu[2]
            );
        }
        return;
    }
    if std::env::var_os("SHMBUS_BENCH_RTT_SELF").is_some() {
        // A → broker → A only: two processes, each on its own CPU.
        let (p50, p99) = rtt_self(transport);
        println!("{transport} self: p50 {:.2} µs, p99 {:.2} µs", us(p50), us(p99));
        return;
    }
    let (p50, p99) = rtt(transport);
    println!("{transport} busy: p50 {:.2} µs, p99 {:.2} µs", us(p50), us(p99));
}

pub(crate) fn link(report: &mut Report) {
    let ceiling = crate::ring::ring_throughput(1);
    report.push(Row {
        scenario: "link",
        path: "ring_channel_1to1".into(),
        size: 8,
        subscribers: Some(1),
        p50_ns: None,
        p99_ns: None,
        msgs_per_s: Some(ceiling.0),
        floor: "ring_channel_1to1".into(),
        ratio_to_floor: 1.0,
        note: format!("the ceiling: no broker on the path; block mode, {} missed", ceiling.1),
    });
    for size in [16usize, 1024] {
        for transport in TRANSPORTS {
            let r = median3_tp(|| tp(size, transport));
            let calls = |x: Option<f64>| x.map_or("n/a".to_string(), |x| format!("{x:.2}"));
            report.push(Row {
                scenario: "link",
                path: format!("tp_{transport}"),
                size,
                subscribers: Some(1),
                p50_ns: None,
                p99_ns: None,
                msgs_per_s: Some(r.rate),
                floor: "ring_channel_1to1".into(),
                ratio_to_floor: ceiling.0 / r.rate,
                note: format!(
                    "median of 3; {} missed; syscalls/1000 msgs broker {} pub {} sub {}; cpu µs/msg broker {:.2} pub {:.2} sub {:.2}",
                    r.missed,
                    calls(r.syscalls[0]),
                    calls(r.syscalls[1]),
                    calls(r.syscalls[2]),
                    r.cpu[0],
                    r.cpu[1],
                    r.cpu[2]
                ),
            });
        }
    }
    for idle in [false, true] {
        let (socket, shm, cpu) = if idle {
            let [socket, shm] = rtt_idle_both();
            (socket.p, shm.p, Some([socket.cpu, shm.cpu]))
        } else {
            (rtt("socket"), rtt("shm"), None)
        };
        let case = if idle { "idle" } else { "busy" };
        for (i, (transport, r)) in [("socket", socket), ("shm", shm)].into_iter().enumerate() {
            let mut row = Row::timed(
                "link",
                &format!("rtt_{case}_{transport}"),
                16,
                None,
                r,
                (&format!("rtt_{case}_socket"), socket.0),
            );
            row.note = if let Some(cpu) = cpu {
                let [a, b, broker] = cpu[i];
                format!(
                    "2 ms asleep before each round trip; socket and shm in alternating blocks of 100; \
                     CPU per round trip: A {a:.1} µs, B {b:.1} µs, broker {broker:.1} µs"
                )
            } else {
                "back to back".into()
            };
            report.push(row);
        }
    }
    // The busy round trip's physical floor on this machine: three
    // processes handing a cache line on, with and without giving the CPU
    // away between polls.
    for kind in ["yield", "spin"] {
        let r = crate::ring::floor3(kind);
        let mut row =
            Row::timed("link", &format!("rtt_busy_floor_{kind}"), 8, None, r, ("rtt_busy_socket", 0));
        row.ratio_to_floor = 0.0;
        row.note = format!(
            "A → relay → B → relay → A through one shared cache line, three processes, {}; {} CPUs",
            if kind == "yield" { "sched_yield between polls" } else { "pure spinning" },
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        report.push(row);
    }
    // The busy round trip depends on which two of its three processes
    // share a CPU; pinned, each placement is measured beside its own floor.
    if std::thread::available_parallelism().map_or(0, |n| n.get()) >= 2 {
        for (place, echo, what) in [
            ("apart", 0, "broker (relay) alone on CPU 1, A and B on CPU 0: two switches per round trip"),
            ("shared", 1, "broker (relay) and A on CPU 0, B on CPU 1: four switches per round trip"),
        ] {
            let (shm, floor) = pinned(1 - echo, echo, || (rtt("shm"), crate::ring::floor3("yield")));
            let floor_path = format!("rtt_busy_floor_yield_{place}");
            let mut row =
                Row::timed("link", &format!("rtt_busy_shm_{place}"), 16, None, shm, (&floor_path, floor.0));
            row.note = format!("pinned: {what}");
            report.push(row);
            let mut row = Row::timed("link", &floor_path, 8, None, floor, (&floor_path, floor.0));
            row.note = "pinned as the row above: one cache line handed on, sched_yield between polls".into();
            report.push(row);
        }
    }
    let self_socket = rtt_self("socket");
    let self_shm = rtt_self("shm");
    for (transport, r) in [("socket", self_socket), ("shm", self_shm)] {
        let mut row = Row::timed(
            "link",
            &format!("rtt_self_{transport}"),
            16,
            None,
            r,
            ("rtt_self_socket", self_socket.0),
        );
        row.note = "A → broker → A, back to back: two processes".into();
        report.push(row);
    }
    let (cpu_us, calls) = idle_broker();
    report.push(Row {
        scenario: "link",
        path: "idle_broker".into(),
        size: 0,
        subscribers: Some(4),
        p50_ns: None,
        p99_ns: None,
        msgs_per_s: None,
        floor: "-".into(),
        ratio_to_floor: 0.0,
        note: format!(
            "broker CPU over 2 s with 4 quiet linked clients: {} µs; system calls: {}",
            cpu_us,
            calls.map_or("n/a".into(), |c| c.to_string())
        ),
    });
}
