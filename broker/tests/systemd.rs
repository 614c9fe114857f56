//! systemd integration, without systemd as PID 1: the units are checked
//! with `systemd-analyze`, and activation is driven by
//! `systemd-socket-activate`, with a test-owned `NOTIFY_SOCKET`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use shmbus_proto::frame::{ChannelOpen, ChannelOverflow, ChannelRole};

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd")
}

/// Copies units into `dir`, pointing ExecStart at the freshly built
/// binary (verify checks that the command exists).
fn stage_units(from: &Path, dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for name in ["shmbus.socket", "shmbus.service"] {
        let text = std::fs::read_to_string(from.join(name)).unwrap();
        let text = text.replace("/usr/local/bin/shmbusd", SHMBUSD);
        let dst = dir.join(name);
        std::fs::write(&dst, text).unwrap();
        out.push(dst);
    }
    out
}

fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).exists()))
        .unwrap_or(false);
    assert!(found, "{name} is missing: install Debian's systemd package (.ci/run does)");
    Command::new(name)
}

/// `systemd-analyze verify` exits 0 even on unknown keys, so the verdict is
/// read from stderr: any line about our units is a failure.
fn verify(user: bool, units: &[PathBuf], dir: &Path) -> Vec<String> {
    let mut cmd = tool("systemd-analyze");
    if user {
        let rt = dir.join("xdg");
        std::fs::create_dir_all(&rt).unwrap();
        std::fs::set_permissions(&rt, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
        cmd.env("XDG_RUNTIME_DIR", rt).arg("--user");
    }
    cmd.arg("verify").args(units);
    let out = run_bounded(cmd);
    assert!(out.status.success(), "verify failed: {}", stderr(&out));
    stderr(&out)
        .lines()
        .filter(|l| l.contains("shmbus") || l.contains(&*dir.to_string_lossy()))
        .map(str::to_owned)
        .collect()
}

#[test]
fn units_verify_without_complaints() {
    let dir = TempDir::new("verify");
    let sys = stage_units(&units_dir(), &dir);
    assert_eq!(verify(false, &sys, &dir), Vec::<String>::new());
    let udir = dir.join("user");
    std::fs::create_dir_all(&udir).unwrap();
    let user = stage_units(&units_dir().join("user"), &udir);
    assert_eq!(verify(true, &user, &udir), Vec::<String>::new());

    // The check itself works: a bad key is caught.
    let mut text = std::fs::read_to_string(&sys[1]).unwrap();
    text.push_str("\n[Service]\nListenSequentialPackets=@typo\n");
    std::fs::write(&sys[1], text).unwrap();
    let complaints = verify(false, &sys, &dir);
    assert!(complaints.iter().any(|l| l.contains("ListenSequentialPackets")), "{complaints:?}");
}

#[test]
fn units_are_what_the_issue_asks() {
    let socket = std::fs::read_to_string(units_dir().join("shmbus.socket")).unwrap();
    assert!(socket.contains("ListenSequentialPacket=@shmbus\n") && socket.contains("FileDescriptorName=bus"));
    let user = std::fs::read_to_string(units_dir().join("user/shmbus.socket")).unwrap();
    assert!(user.contains("ListenSequentialPacket=@shmbus.%U"));
    let service = std::fs::read_to_string(units_dir().join("shmbus.service")).unwrap();
    for key in [
        "Type=notify",
        "Sockets=shmbus.socket",
        "LimitNOFILE=",
        "Restart=on-failure",
        "WatchdogSec=",
        "RestrictAddressFamilies=AF_UNIX",
        "MemoryDenyWriteExecute=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "SystemCallFilter=",
    ] {
        assert!(service.contains(key), "shmbus.service lacks {key}");
    }
}

#[test]
fn system_service_exposure_is_ok() {
    let dir = TempDir::new("security");
    let units = stage_units(&units_dir(), &dir);
    let mut cmd = tool("systemd-analyze");
    cmd.args(["security", "--offline=true", "--no-pager"]).arg(&units[1]);
    let out = run_bounded(cmd);
    let text = stdout(&out) + &stderr(&out);
    let line =
        text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or_else(|| panic!("{text}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read a score from {line:?}"));
    assert!(score <= 2.0, "exposure {score} > 2.0: {line}");
}

/// A test-owned NOTIFY_SOCKET.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
}

impl Notify {
    fn new(dir: &Path) -> Notify {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Notify { sock, path }
    }

    /// Every datagram already waiting, without waiting.
    fn drain(&self) -> Vec<String> {
        self.sock.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.sock.set_nonblocking(false).unwrap();
        out
    }

    /// Every datagram that arrives within `span`.
    fn collect_for(&self, span: Duration) -> Vec<String> {
        let end = Instant::now() + span;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return out;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            if let Ok(n) = self.sock.recv(&mut buf) {
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
    }

    /// Waits (bounded) for a datagram containing `needle`; returns it.
    fn expect(&self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {needle:?} from the broker");
            self.sock.set_read_timeout(Some(left)).unwrap();
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == needle || l.starts_with(needle)) {
                    return msg;
                }
            }
        }
    }
}

fn activate(addr: &str, notify: &Notify, extra_env: &[&str], seqpacket: bool) -> ChildGuard {
    let mut cmd = tool("systemd-socket-activate");
    if seqpacket {
        cmd.arg("--seqpacket");
    }
    cmd.args(["-l", addr, "--fdname=bus", "-E", "NOTIFY_SOCKET"]).env("NOTIFY_SOCKET", &notify.path);
    for e in extra_env {
        cmd.args(["-E", e]);
    }
    cmd.arg(SHMBUSD);
    spawn_guarded(cmd)
}

fn connect_with_retry(addr: &str) -> shmbus::Client {
    let start = Instant::now();
    loop {
        match shmbus::Client::connect_to(addr) {
            Ok(c) => return c,
            Err(e) if start.elapsed() > PATIENCE => panic!("cannot connect to {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn socket_activation_serves_the_first_client_and_notifies() {
    let dir = TempDir::new("activate");
    let notify = Notify::new(&dir);
    let addr = unique_address("act");
    let mut guard = activate(&addr, &notify, &[], true);
    // This connection is what starts the broker.
    let c = connect_with_retry(&addr);
    c.ping().unwrap();
    let ready = notify.expect("READY=1");
    assert!(ready.contains("STATUS="), "{ready}");
    let st = c.stats().unwrap();
    assert_eq!(st.address, addr, "the broker names the socket it was given");
    assert_eq!(st.connections_accepted, 1);
    // Status follows the client count.
    let _s = c.subscribe("x.>").unwrap();
    notify.expect("STATUS=1 clients, 1 subscriptions");
    // Stopping is announced, and the exit is clean.
    let pid = guard.0.as_ref().unwrap().id();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    notify.expect("STOPPING=1");
    let status = wait_timeout(guard.0.as_mut().unwrap(), PATIENCE).expect("broker exits");
    assert!(status.success(), "{status:?}");
}

/// How long the broker's event loop is held still, and how much of that
/// time is watched for pings (the rest is slack for a slow machine to
/// notice the stall and start watching).
const STALL: Duration = Duration::from_secs(4);
const WATCH: Duration = Duration::from_millis(1500);

/// Watchdog pings come from the event loop: while the loop is stuck, none
/// arrive, and when it runs again they resume. (A ping from a thread or a
/// timer of its own would keep systemd from restarting a hung broker.)
///
/// The loop is stuck the way a hung one is, with the rest of the process
/// free to run: the broker runs under strace, which delays the return of
/// the broker's first `memfd_create` by [`STALL`]. The broker calls it
/// only to create a ring, on its loop, so the test picks the moment by
/// asking for a channel; it then waits until the broker's main thread sits
/// stopped in that call, drains what was sent before, and watches the
/// notify socket for [`WATCH`], 15 ping intervals, checking afterwards that
/// the thread had not moved. The broker has no other thread today; a ping
/// sent from any thread but the stuck one would arrive in the watch.
#[test]
fn watchdog_pings_arrive_from_the_loop() {
    let dir = TempDir::new("watchdog");
    let notify = Notify::new(&dir);
    let addr = unique_address("wd");
    let mut cmd = tool("strace");
    cmd.args(["-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", "-e", "trace=memfd_create", "-e"])
        .arg(format!("inject=memfd_create:delay_exit={}:when=1", STALL.as_micros()));
    let activate = tool("systemd-socket-activate");
    cmd.arg(activate.get_program()).args(["--seqpacket", "-l", &addr, "--fdname=bus"]);
    cmd.args(["-E", "NOTIFY_SOCKET", "-E", "WATCHDOG_USEC=200000"]).env("NOTIFY_SOCKET", &notify.path);
    cmd.arg(SHMBUSD);
    let tracer = spawn_guarded(cmd);
    let start_wait = Instant::now();
    // Over the socket: the stall is injected into the broker's first
    // memfd_create, which must be the ring's below, not a link's.
    let c = loop {
        let opts = shmbus::ConnectOptions::new()
            .address(shmbus::Address::parse(&addr).unwrap())
            .shared_memory(false);
        match opts.connect() {
            Ok(c) => break c,
            Err(e) if start_wait.elapsed() > PATIENCE => panic!("cannot connect to {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    c.ping().unwrap();
    notify.expect("READY=1");
    let start = Instant::now();
    for _ in 0..4 {
        notify.expect("WATCHDOG=1");
    }
    // Four pings at 100 ms: not a flood.
    assert!(start.elapsed() >= Duration::from_millis(250), "{:?}", start.elapsed());
    // strace's child is systemd-socket-activate, which became the broker.
    let tracer_pid = tracer.0.as_ref().unwrap().id();
    let broker = KillOnDrop(child_of(tracer_pid));
    assert_eq!(c.broker_cred().pid, broker.0, "strace's child is the broker");

    // Ask for a ring; the loop stops in memfd_create and stays there.
    let mut raw = Raw::hello_at(&addr, "stall").0;
    let open = ChannelOpen {
        req_id: 1,
        topic: "stall",
        role: ChannelRole::Publish { slot_size: 64, slot_count: 16, overflow: ChannelOverflow::Overwrite },
    };
    raw.send_body(&open, &[]);
    let deadline = Instant::now() + PATIENCE;
    while !stopped_in(broker.0, libc::SYS_memfd_create) {
        assert!(Instant::now() < deadline, "the broker's loop never reached memfd_create");
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = notify.drain();
    let during = notify.collect_for(WATCH);
    assert!(
        stopped_in(broker.0, libc::SYS_memfd_create),
        "the loop left its stall before the watch ended (the machine is too slow for STALL = {STALL:?}); \
         the test proves nothing this run"
    );
    let pings: Vec<&String> = during.iter().filter(|m| m.lines().any(|l| l == "WATCHDOG=1")).collect();
    assert!(
        pings.is_empty(),
        "{} watchdog pings arrived while the event loop was stuck: they do not come from the loop \
         ({pings:?}; drained before the watch: {before:?})",
        pings.len()
    );

    // The loop runs again: the ring is granted and the pings resume.
    match raw.next_packet().frame() {
        Some(shmbus_proto::frame::BrokerFrame::ChannelGranted(g)) => assert_eq!(g.req_id, 1),
        other => panic!("expected the grant once the loop ran again, got {other:?}"),
    }
    for _ in 0..2 {
        notify.expect("WATCHDOG=1");
    }
    c.ping().unwrap();
}

/// Kills a process that is not our child (here, the broker under strace)
/// on drop.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.0 as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// The one child of `pid`, waited for (bounded).
fn child_of(pid: u32) -> u32 {
    let start = Instant::now();
    loop {
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        if let Some(child) = children.split_whitespace().next() {
            return child.parse().unwrap();
        }
        assert!(start.elapsed() < PATIENCE, "process {pid} never had a child");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the main thread of `pid` is stopped by its tracer ('t') inside
/// system call `nr` (as `/proc/PID/task/PID/syscall` reports it).
fn stopped_in(pid: u32, nr: libc::c_long) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).unwrap_or_default();
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next());
    if state != Some("t") {
        return false;
    }
    let syscall = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/syscall")).unwrap_or_default();
    syscall.split_whitespace().next() == Some(nr.to_string().as_str())
}

#[test]
fn a_passed_socket_of_the_wrong_type_is_refused() {
    let dir = TempDir::new("wrongtype");
    let notify = Notify::new(&dir);
    let addr = unique_address("stream");
    let guard = activate(&addr, &notify, &[], false);
    // A stream connection starts the broker, which must refuse the socket.
    use std::os::linux::net::SocketAddrExt;
    let sa = std::os::unix::net::SocketAddr::from_abstract_name(&addr.as_bytes()[1..]).unwrap();
    let start = Instant::now();
    let _conn = loop {
        match std::os::unix::net::UnixStream::connect_addr(&sa) {
            Ok(c) => break c,
            Err(e) if start.elapsed() > PATIENCE => panic!("{e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let out = guard.wait_output();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a listening SOCK_SEQPACKET socket"), "{}", stderr(&out));
}

#[test]
fn soft_fd_limit_is_raised_to_the_hard_one() {
    let mut cmd = tool("prlimit");
    let addr = unique_address("nofile");
    cmd.args(["--nofile=256:4096", SHMBUSD, "--address", &addr]);
    let guard = spawn_guarded(cmd);
    let pid = guard.0.as_ref().unwrap().id();
    let start = Instant::now();
    loop {
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
        let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or("").to_owned();
        let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
        if nums == ["4096", "4096"] {
            break;
        }
        assert!(start.elapsed() < PATIENCE, "limit not raised: {line:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every system call the broker makes, across a workload that touches
/// every feature, is allowed by the hardened unit's `SystemCallFilter=`
/// (which would otherwise kill or cripple it under systemd).
#[test]
fn the_unit_syscall_filter_allows_everything_the_broker_does() {
    let dir = TempDir::new("seccomp");
    let trace = dir.join("trace");
    let addr = unique_address("seccomp");
    let mut cmd = tool("strace");
    cmd.args(["-f", "-qq", "-o"]).arg(&trace).args([SHMBUSD, "--address", &addr]);
    let mut guard = spawn_guarded(cmd);
    let c = connect_with_retry(&addr);
    // Pub/sub inline and by memfd, introspection, a ring channel, a bad peer.
    let s = c.subscribe("w.>").unwrap();
    c.publish("w.small", b"x").unwrap();
    c.publish("w.big", vec![1u8; 300_000]).unwrap();
    for _ in 0..2 {
        next_message(&s);
    }
    c.clients().unwrap();
    c.topics().unwrap();
    c.stats().unwrap();
    let mut p = c.channel_publisher("w.ring", shmbus::ChannelConfig::default()).unwrap();
    let mut r = c.channel_subscriber("w.ring").unwrap();
    p.publish(b"r").unwrap();
    r.recv_vec_timeout(PATIENCE).unwrap();
    c.channels().unwrap();
    drop((r, p));
    let mut raw = Raw::connect_addr(&addr);
    raw.send(b"garbage!", &[]);
    assert!(raw.recv().is_some());
    drop(s);
    drop(c);
    // Shut down cleanly, so the exit path is traced too.
    let strace_pid = guard.0.as_ref().unwrap().id();
    let children = std::fs::read_to_string(format!("/proc/{strace_pid}/task/{strace_pid}/children")).unwrap();
    let broker_pid: i32 = children.split_whitespace().next().expect("traced broker").parse().unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(broker_pid).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let out = guard.0.take().map(|c| ChildGuard(Some(c)).wait_output()).unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let text = std::fs::read_to_string(&trace).unwrap();
    let mut used: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
    for line in text.lines() {
        // "1234 name(args) = result"; skip signal and exit notes.
        let rest = line.split_once(' ').map_or(line, |(_, r)| r).trim_start();
        if let Some((name, _)) = rest.split_once('(') {
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                used.insert(name.to_owned());
            }
        }
    }
    assert!(used.contains("sendmmsg") && used.contains("memfd_create"), "{used:?}");

    // The unit's filter: the allow list minus the deny list, expanded.
    let unit = std::fs::read_to_string(units_dir().join("shmbus.service")).unwrap();
    let (mut allow, mut deny) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    for line in unit.lines() {
        let Some(v) = line.strip_prefix("SystemCallFilter=") else { continue };
        let (set, v) = match v.strip_prefix('~') {
            Some(v) => (&mut deny, v),
            None => (&mut allow, v),
        };
        for item in v.split_whitespace() {
            set.extend(expand_filter(item));
        }
    }
    let blocked: Vec<&String> = used.iter().filter(|s| !allow.contains(*s) || deny.contains(*s)).collect();
    assert!(blocked.is_empty(), "the unit's filter blocks syscalls shmbusd makes: {blocked:?}");
}

fn expand_filter(item: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    if !item.starts_with('@') {
        out.insert(item.to_owned());
        return out;
    }
    let mut cmd = tool("systemd-analyze");
    cmd.args(["syscall-filter", item]);
    let text = stdout(&run_bounded(cmd));
    for line in text.lines().skip(1) {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        out.extend(expand_filter(t));
    }
    out
}

/// `SIGHUP` (what `systemctl reload` sends) reads the policy file again,
/// announced as `RELOADING=1` with `MONOTONIC_USEC=` and ended with
/// `READY=1`, whether the new file loads or not.
#[test]
fn a_policy_reload_is_announced_reloading_then_ready() {
    let dir = TempDir::new("reload");
    let notify = Notify::new(&dir);
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, "[[rule]]\nmatch = {}\nallow = [\"connect\"]\n").unwrap();
    let addr = unique_address("reload");
    let mut cmd = tool("systemd-socket-activate");
    cmd.args(["--seqpacket", "-l", &addr, "--fdname=bus", "-E", "NOTIFY_SOCKET"])
        .env("NOTIFY_SOCKET", &notify.path)
        .arg(SHMBUSD)
        .arg("--policy")
        .arg(&policy);
    let _guard = spawn_guarded(cmd);
    let c = connect_with_retry(&addr);
    c.ping().unwrap();
    notify.expect("READY=1");
    let pid = rustix::process::Pid::from_raw(c.broker_cred().pid as i32).unwrap();
    for text in ["[[rule]]\nmatch = {}\nallow = [\"connect\", \"subscribe a.>\"]\n", "[[rule]\n"] {
        std::fs::write(&policy, text).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
        let reloading = notify.expect("RELOADING=1");
        assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
        notify.expect("READY=1");
        c.ping().unwrap();
    }
}
