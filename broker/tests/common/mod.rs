//! Test harness: a real `shmbusd` on a unique abstract address per test,
//! killed on drop; bounded waits everywhere so a bug fails instead of
//! hanging.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shmbus::Client;

mod tempdir;
#[allow(unused_imports)] // (by the test binaries that make no files)
pub use tempdir::TempDir;

pub const SHMBUSD: &str = env!("CARGO_BIN_EXE_shmbusd");
pub const SHMBUSCTL: &str = env!("CARGO_BIN_EXE_shmbusctl");

/// Generous bound for anything that should take milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(20);

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn unique_address(tag: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("@shmbus-test-{tag}-{}-{n}-{nanos}", std::process::id())
}

pub struct Broker {
    pub child: Option<Child>,
    pub address: String,
    /// The uid the broker runs as, when not ours; clients made by
    /// [`Broker::client`] trust it.
    pub uid: Option<u32>,
    /// The broker's stderr, when [`Launch::capture_log`] asked for it.
    log: Option<Arc<Mutex<Vec<u8>>>>,
    /// How it was started, for [`Broker::restart`].
    launch: Launch,
}

/// How to start a broker, beyond its address: for tests that run it as
/// another uid, under a low fd limit, or read its log.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    pub args: Vec<String>,
    /// Run the broker as this uid (and gid).
    pub uid: Option<u32>,
    /// Start it under `prlimit --nofile=N:N` (util-linux), so its fd
    /// table holds at most N fds.
    pub nofile: Option<u64>,
    /// Keep its stderr for [`Broker::log`] instead of passing it through.
    pub capture_log: bool,
    /// Run it under valgrind's memcheck, which exits with 99 if it found
    /// an error ([`VALGRIND`]).
    pub valgrind: bool,
}

/// How the tests run a program under valgrind: quiet, and exit status 99
/// if memcheck found an error.
pub const VALGRIND: [&str; 3] = ["-q", "--error-exitcode=99", "--"];

impl Launch {
    pub fn new() -> Launch {
        Launch::default()
    }

    pub fn args(mut self, args: &[&str]) -> Launch {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn uid(mut self, uid: u32) -> Launch {
        self.uid = Some(uid);
        self
    }

    pub fn nofile(mut self, n: u64) -> Launch {
        self.nofile = Some(n);
        self
    }

    pub fn capture_log(mut self) -> Launch {
        self.capture_log = true;
        self
    }

    pub fn valgrind(mut self) -> Launch {
        self.valgrind = true;
        self
    }
}

impl Broker {
    pub fn start(tag: &str) -> Broker {
        Broker::start_with(tag, &[])
    }

    pub fn start_with(tag: &str, extra: &[&str]) -> Broker {
        Broker::spawn(tag, extra, None)
    }

    /// Spawns the broker as `uid` (for trust tests).
    pub fn spawn(tag: &str, extra: &[&str], uid: Option<u32>) -> Broker {
        let mut launch = Launch::new().args(extra);
        launch.uid = uid;
        Broker::launch(tag, launch)
    }

    /// Spawns the broker as `launch` says.
    pub fn launch(tag: &str, launch: Launch) -> Broker {
        Broker::launch_at(unique_address(tag), launch)
    }

    /// Stops the broker with `signal` (bounded wait), then starts a new
    /// one as before, on the same address.
    pub fn restart(&mut self, signal: rustix::process::Signal) {
        if let Some(mut c) = self.child.take() {
            let pid = rustix::process::Pid::from_raw(c.id() as i32).unwrap();
            let _ = rustix::process::kill_process(pid, signal);
            if wait_timeout(&mut c, PATIENCE).is_none() {
                let _ = c.kill();
                let _ = c.wait();
                panic!("the broker did not stop on {signal:?}");
            }
        }
        let again = Broker::launch_at(self.address.clone(), self.launch.clone());
        *self = again;
    }

    pub fn launch_at(address: String, launch: Launch) -> Broker {
        let shmbusd = match launch.uid {
            Some(_) => world_readable_copy(SHMBUSD),
            None => std::path::PathBuf::from(SHMBUSD),
        };
        let mut cmd = match (launch.nofile, launch.valgrind) {
            (Some(n), _) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(&shmbusd);
                c
            }
            (None, true) => {
                let mut c = Command::new("valgrind");
                c.args(VALGRIND).arg(&shmbusd);
                c
            }
            (None, false) => Command::new(&shmbusd),
        };
        if let Some(uid) = launch.uid {
            cmd.uid(uid).gid(uid).current_dir("/");
        }
        cmd.arg("--address").arg(&address).args(&launch.args).stdin(Stdio::null());
        if launch.capture_log {
            cmd.stderr(Stdio::piped());
        }
        let mut child = match spawn_retrying(&mut cmd) {
            Ok(c) => c,
            Err(e) if launch.nofile.is_some() => panic!("cannot run prlimit (util-linux): {e}"),
            Err(e) if launch.valgrind => panic!("cannot run valgrind (apt-get install valgrind): {e}"),
            Err(e) => panic!("spawn shmbusd: {e}"),
        };
        let log = child.stderr.take().map(|mut err| {
            let log = Arc::new(Mutex::new(Vec::new()));
            let sink = log.clone();
            std::thread::spawn(move || {
                use std::io::Read;
                let mut buf = [0u8; 8192];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            log
        });
        let uid = launch.uid;
        let mut b = Broker { child: Some(child), address, uid, log, launch };
        b.wait_ready();
        b
    }

    /// What the broker wrote to stderr so far (needs `capture_log`).
    pub fn log(&self) -> String {
        let log = self.log.as_ref().expect("start the broker with Launch::capture_log to read its log");
        String::from_utf8_lossy(&log.lock().unwrap()).into_owned()
    }

    /// Waits (bounded) until the broker's log holds `needle`.
    pub fn wait_log(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let log = self.log();
            if log.contains(needle) {
                return log;
            }
            assert!(start.elapsed() < PATIENCE, "the broker never logged {needle:?}; its log:\n{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The broker's resident memory (`VmRSS` of /proc/PID/status), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/PID/status");
        let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }

    /// CPU time the broker has used, user and system, in clock ticks
    /// (USER_HZ, 100 per second on Linux).
    pub fn cpu_ticks(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // The command name may hold anything, ')' included: fields start
        // after the last ')'. utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')').unwrap() + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    }

    /// CPU time the broker has run, in ns: the scheduler's own count
    /// (`schedstat`), exact even for a loop that never enters the kernel,
    /// which `stat`'s sampled ticks may miss.
    pub fn cpu_ns(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/schedstat", self.pid())).unwrap();
        s.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// How many times the broker's main thread has been put on a CPU
    /// (`/proc/PID/schedstat`'s third field): its wake-ups.
    pub fn runs(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/schedstat", self.pid())).unwrap();
        s.split_whitespace().nth(2).unwrap().parse().unwrap()
    }

    fn wait_ready(&mut self) {
        let start = Instant::now();
        loop {
            let addr = shmbus::Address::parse(&self.address).unwrap();
            if shmbus_proto::sys::socket::connect(&addr).is_ok() {
                return;
            }
            // A broker that exited (a flag it does not know, say) fails
            // the test now, not after PATIENCE.
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                let log = self.log.as_ref().map(|l| String::from_utf8_lossy(&l.lock().unwrap()).into_owned());
                panic!("shmbusd exited before listening ({status}); its log: {}", log.unwrap_or_default());
            }
            assert!(start.elapsed() < PATIENCE, "shmbusd did not start listening at {}", self.address);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn client(&self) -> Client {
        self.client_named("test")
    }

    pub fn client_named(&self, name: &str) -> Client {
        self.options().name(name).connect().expect("connect to the test broker")
    }

    /// Options to connect to this broker, trusting its uid when it runs
    /// as another.
    pub fn options(&self) -> shmbus::ConnectOptions {
        let o = Client::options().address(shmbus::Address::parse(&self.address).unwrap());
        match self.uid {
            Some(uid) => o.trust_broker_uid(uid),
            None => o,
        }
    }

    /// Number of open fds in the broker process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).unwrap().count()
    }

    /// The broker's fd count once it is idle: earlier probe connections
    /// closed and nothing in flight.
    pub fn baseline_fds(&self) -> usize {
        self.client().ping().unwrap();
        let mut last = self.fd_count();
        let start = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let now = self.fd_count();
            if now == last {
                return now;
            }
            assert!(start.elapsed() < PATIENCE, "broker fd count never settled");
            last = now;
        }
    }

    /// Waits until the broker's fd count is `want` (fds close a moment
    /// after the peer goes), failing after PATIENCE.
    pub fn wait_fd_count(&self, want: usize) {
        let start = Instant::now();
        loop {
            let now = self.fd_count();
            if now == want {
                return;
            }
            assert!(start.elapsed() < PATIENCE, "broker holds {now} fds, expected {want}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the broker reports `n` clients.
    pub fn wait_clients(&self, probe: &Client, n: u32) {
        let start = Instant::now();
        loop {
            // The probe itself is one of the clients.
            let now = probe.stats().unwrap().clients;
            if now == n {
                return;
            }
            assert!(start.elapsed() < PATIENCE, "broker has {now} clients, expected {n}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        wait_timeout(&mut child, PATIENCE).expect("shmbusd did not exit after SIGTERM")
    }

    /// `shmbusctl --address <this broker> args...`, bounded.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_as(args, None)
    }

    pub fn ctl_as(&self, args: &[&str], uid: Option<u32>) -> Output {
        let mut cmd = match uid {
            Some(uid) => command_as(SHMBUSCTL, uid),
            None => Command::new(SHMBUSCTL),
        };
        cmd.arg("--address").arg(&self.address).args(args);
        run_bounded(cmd)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Kills a child on drop.
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// Waits (bounded) for the child, reading its output as it goes so a
    /// full pipe cannot stall it.
    pub fn wait_output(self) -> Output {
        self.wait_output_within(PATIENCE)
    }

    /// As `wait_output`, for a child whose own waits add up to more than
    /// one PATIENCE (a whole test run in a process of its own).
    pub fn wait_output_within(mut self, limit: Duration) -> Output {
        use std::io::Read;
        let mut child = self.0.take().unwrap();
        let drain = |r: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut v = Vec::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_end(&mut v);
                }
                v
            })
        };
        let out = drain(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
        let err = drain(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
        let status = wait_timeout(&mut child, limit);
        if status.is_none() {
            // Killed here, not in Drop: the drains end only when its pipes close.
            let _ = child.kill();
            let _ = child.wait();
        }
        let stdout = out.join().unwrap();
        let stderr = err.join().unwrap();
        let Some(status) = status else {
            panic!(
                "child did not finish in {limit:?}; {} bytes of stdout, stderr {:?}",
                stdout.len(),
                String::from_utf8_lossy(&stderr)
            );
        };
        Output { status, stdout, stderr }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A command that runs `binary` as `uid`/`gid`. The build tree may sit in a
/// directory other users cannot enter (a clone in a 0700 `mktemp -d`, as CI
/// may use), so the binary is first copied to a world-readable directory.
pub fn command_as(binary: &str, uid: u32) -> Command {
    let mut cmd = Command::new(world_readable_copy(binary));
    cmd.uid(uid).gid(uid).current_dir("/");
    cmd
}

/// A world-readable directory of this test process, for files other uids
/// must reach, `<temp dir>/shmbus-test-bin-<pid>`: made at the first call
/// and shared by the process's tests (a copy of a binary there may be
/// running until the last test ends), it is removed when the process
/// ends, however it ends (killed too). Should that fail, the next test
/// process to make its own removes those of processes that are gone.
pub fn world_readable_dir() -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static DIR: std::sync::OnceLock<(std::path::PathBuf, std::process::ChildStdin)> =
        std::sync::OnceLock::new();
    let (dir, _) = DIR.get_or_init(|| {
        let tmp = std::env::temp_dir();
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("shmbus-test-bin-") {
                if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tmp.join(format!("shmbus-test-bin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Removed at our exit, however we exit, by a shell waiting for the
        // end of a pipe only we hold (the write end is close-on-exec, so no
        // child of a test holds it).
        // Never waited for: it outlives us by design (init reaps it).
        #[allow(clippy::zombie_processes)]
        let remover = Command::new("sh")
            .args(["-c", "read -r _; rm -rf -- \"$0\"", dir.to_str().unwrap()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        (dir, remover.stdin.unwrap())
    });
    dir.clone()
}

/// A copy of `binary` that other uids may run (see [`command_as`]), in
/// [`world_readable_dir`]; made once per process.
pub fn world_readable_copy(binary: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    static COPIES: std::sync::Mutex<Vec<(String, std::path::PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut copies = COPIES.lock().unwrap();
    match copies.iter().find(|(b, _)| b == binary) {
        Some((_, p)) => p.clone(),
        None => {
            let name = std::path::Path::new(binary).file_name().unwrap();
            let dst = world_readable_dir().join(name);
            std::fs::copy(binary, &dst).unwrap();
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
            copies.push((binary.to_owned(), dst.clone()));
            dst
        }
    }
}

/// `cmd.spawn()`, retried a few times on `ETXTBSY`: a binary copied a
/// moment ago may still be open for writing in a child another test thread
/// forked meanwhile (until that child execs).
pub fn spawn_retrying(cmd: &mut Command) -> std::io::Result<Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::TXTBSY.raw_os_error()) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

pub fn spawn_guarded(mut cmd: Command) -> ChildGuard {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Retried on `ETXTBSY`: the command may be a copy made a moment ago
    // (`command_as`).
    ChildGuard(Some(spawn_retrying(&mut cmd).expect("spawn")))
}

pub fn run_bounded(cmd: Command) -> Output {
    spawn_guarded(cmd).wait_output()
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs `f` on a thread and fails the test if it takes longer than
/// PATIENCE (the thread is abandoned; the test process exits soon after).
pub fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(PATIENCE).unwrap_or_else(|_| panic!("{what} did not finish within {PATIENCE:?}"))
}

/// The next event, which must be a message, within PATIENCE.
pub fn next_message(sub: &shmbus::Subscription) -> shmbus::Message {
    match sub.recv_timeout(PATIENCE).expect("recv").expect("a message within PATIENCE") {
        shmbus::Event::Message(m) => m,
        shmbus::Event::Gap { missed } => panic!("unexpected gap of {missed}"),
        shmbus::Event::Reconnected => panic!("unexpected reconnection"),
    }
}

/// Waits until `pattern` has `n` subscribers, as the broker reports it.
pub fn wait_subscribers(c: &Client, pattern: &str, n: u32) {
    let start = Instant::now();
    while !c.topics().unwrap().iter().any(|t| t.pattern == pattern && t.subscribers == n) {
        assert!(start.elapsed() < PATIENCE, "{pattern} never reached {n} subscribers");
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

// ------------------------------------------------- a raw protocol peer --

use std::os::fd::{AsFd, OwnedFd};

use shmbus_proto::frame::{
    batch_entries, decode_broker, encode_head, Body, BrokerFrame, GoodbyeCode, Hello, Welcome,
    PROTOCOL_VERSION,
};
use shmbus_proto::sys::socket::{self, OutPacket, RecvBatch, RecvStatus};

/// One packet from the broker, owned: its bytes and the fds beside them.
#[derive(Debug)]
pub struct Packet {
    pub data: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    pub status: RecvStatus,
}

impl Packet {
    /// The end of the stream (the broker closed the connection).
    pub fn is_eof(&self) -> bool {
        self.data.is_empty()
    }

    /// The frame, which must be valid; `None` at the end of the stream.
    pub fn frame(&self) -> Option<BrokerFrame<'_>> {
        (!self.data.is_empty()).then(|| decode_broker(&self.data).expect("the broker sends valid frames"))
    }
}

/// A client that speaks the wire protocol by hand, to misbehave on purpose.
/// It hands out frames one by one: the frames of a `Batch` packet come
/// out as packets of their own (without fds, as batched frames have none).
pub struct Raw {
    pub fd: OwnedFd,
    batch: RecvBatch,
    /// Frames of a batch not handed out yet, in order.
    unbatched: std::collections::VecDeque<Vec<u8>>,
    /// The frame `recv` returned last (it borrows from here).
    current: Vec<u8>,
    /// Packets read from the socket (a batch counts once).
    pub packets: u64,
}

impl Raw {
    pub fn connect_addr(address: &str) -> Raw {
        let addr = shmbus::Address::parse(address).unwrap();
        Raw::on(socket::connect(&addr).unwrap())
    }

    pub fn connect(b: &Broker) -> Raw {
        Raw::connect_addr(&b.address)
    }

    fn on(fd: OwnedFd) -> Raw {
        Raw { fd, batch: RecvBatch::new(1), unbatched: Default::default(), current: Vec::new(), packets: 0 }
    }

    /// The received packet, or its batch's first frame (the rest wait in
    /// `unbatched`). A damaged batch fails the test.
    fn take_received(&mut self) -> Packet {
        self.packets += 1;
        let (data, status, fds) = self.batch.packet(0);
        if let Ok(BrokerFrame::Batch(b, entries)) = decode_broker(data) {
            assert!(fds.is_empty(), "the broker sent fds with a batch");
            let entries = batch_entries(b, entries).expect("the broker sends valid batches");
            self.unbatched.extend(entries.into_iter().map(<[u8]>::to_vec));
            let first = self.unbatched.pop_front().expect("a batch has frames");
            return Packet { data: first, fds: Vec::new(), status };
        }
        Packet { data: data.to_vec(), fds, status }
    }

    pub fn hello(b: &Broker) -> Raw {
        let mut r = Raw::connect(b);
        r.send(&encode_head(&Hello { version: PROTOCOL_VERSION.into(), name: "raw" }).unwrap(), &[]);
        match r.recv() {
            Some(BrokerFrame::Welcome(_)) => {}
            other => panic!("{other:?}"),
        }
        r
    }

    /// Connects to `address` and says Hello as `name`; returns the Welcome.
    pub fn hello_at(address: &str, name: &str) -> (Raw, Welcome) {
        let mut r = Raw::connect_addr(address);
        r.send_body(&Hello { version: PROTOCOL_VERSION.into(), name }, &[]);
        match r.recv() {
            Some(BrokerFrame::Welcome(w)) => (r, w),
            other => panic!("expected a welcome, got {other:?}"),
        }
    }

    /// Says Hello as `name` to `b`.
    pub fn hello_named(b: &Broker, name: &str) -> (Raw, Welcome) {
        Raw::hello_at(&b.address, name)
    }

    /// Sends one frame without payload.
    pub fn send_body<B: Body>(&self, body: &B, fds: &[std::os::fd::BorrowedFd<'_>]) {
        self.send(&encode_head(body).unwrap(), fds);
    }

    /// The next packet, fds included, waiting at most `timeout`: `None`
    /// if nothing came; a packet with no bytes at the end of the stream.
    pub fn recv_packet(&mut self, timeout: Duration) -> Option<Packet> {
        if let Some(data) = self.unbatched.pop_front() {
            return Some(Packet { data, fds: Vec::new(), status: RecvStatus::default() });
        }
        let deadline = Instant::now() + timeout;
        let mut resets = 0;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !socket::wait_readable(self.fd.as_fd(), Some(left)).unwrap() {
                return None;
            }
            match self.batch.recv(self.fd.as_fd(), true) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && resets < 2 => resets += 1,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Some(Packet { data: Vec::new(), fds: Vec::new(), status: RecvStatus::default() })
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return None;
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
        Some(self.take_received())
    }

    /// The next packet, which must come within PATIENCE.
    pub fn next_packet(&mut self) -> Packet {
        self.recv_packet(PATIENCE).expect("broker went silent")
    }

    /// A packet already waiting, without waiting for one.
    pub fn try_packet(&mut self) -> Option<Packet> {
        self.recv_packet(Duration::ZERO)
    }

    pub fn send(&self, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
        // The broker may already have closed us; that is fine.
        let _ = socket::send_packet(self.fd.as_fd(), OutPacket { head: bytes, payload: &[], fds }, false);
    }

    /// Next frame, or None at end of stream. Bounded.
    pub fn recv(&mut self) -> Option<BrokerFrame<'_>> {
        if let Some(data) = self.unbatched.pop_front() {
            self.current = data;
            return Some(decode_broker(&self.current).expect("the broker sends valid frames"));
        }
        let mut resets = 0;
        loop {
            assert!(socket::wait_readable(self.fd.as_fd(), Some(PATIENCE)).unwrap(), "broker went silent");
            match self.batch.recv(self.fd.as_fd(), true) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && resets < 2 => resets += 1,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        let pkt = self.take_received();
        assert!(pkt.fds.is_empty(), "the broker must not send fds");
        if pkt.data.is_empty() {
            return None;
        }
        self.current = pkt.data;
        Some(decode_broker(&self.current).expect("the broker sends valid frames"))
    }

    /// Expects a goodbye with `code` whose reason contains `needle`, then EOF.
    pub fn expect_goodbye(&mut self, code: GoodbyeCode, needle: &str) {
        match self.recv() {
            Some(BrokerFrame::Goodbye(g)) => {
                assert_eq!(g.code, code, "{}", g.reason);
                assert!(g.reason.contains(needle), "reason {:?} lacks {needle:?}", g.reason);
            }
            other => panic!("expected a goodbye, got {other:?}"),
        }
        assert!(self.recv().is_none(), "the connection must be closed after a goodbye");
    }
}

/// A helper process (this test binary re-run in a role): its stdout read
/// line by line, its stderr kept for failure messages. Lines it says start
/// with the test file's own marker; `expect` waits, bounded, for one.
pub struct Helper {
    pub child: ChildGuard,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
    say: &'static str,
}

impl Helper {
    /// Spawns `cmd` (stdout and stderr piped here) as a helper whose lines
    /// start with `say`.
    pub fn spawn(cmd: &mut Command, say: &'static str) -> Helper {
        use std::io::{BufRead, Read};
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = spawn_retrying(cmd).expect("spawn a helper process");
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Helper { child: ChildGuard(Some(child)), lines, seen: Vec::new(), stderr, say }
    }

    /// What the helper wrote to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits (bounded) until the helper says `what`; returns the rest of
    /// that line.
    pub fn expect(&mut self, what: &str) -> String {
        let want = format!("{}{what}", self.say);
        let start = Instant::now();
        loop {
            match self.lines.recv_timeout(PATIENCE.saturating_sub(start.elapsed())) {
                // libtest may print "test helper_process ... " first, on
                // the same line.
                Ok(line) => match line.find(&want) {
                    Some(at) => return line[at + want.len()..].trim().to_owned(),
                    None => self.seen.push(line),
                },
                Err(_) => panic!(
                    "the helper never said {what:?}; its stdout: {:?}; its stderr:\n{}",
                    self.seen,
                    self.stderr()
                ),
            }
        }
    }

    /// Waits (bounded) for the helper to exit, which it must do cleanly.
    pub fn finish(mut self) {
        let mut child = self.child.0.take().unwrap();
        let status = wait_timeout(&mut child, PATIENCE);
        assert!(
            status.is_some_and(|s| s.success()),
            "helper ended with {status:?}; its stderr:\n{}",
            self.stderr()
        );
    }
}

/// A client on the shared-memory transport, speaking it by hand: to check
/// the broker's side of the contract, and to misbehave on purpose. Frames
/// come out one per record (a marker's frame from the socket, in its
/// place); doorbells are answered as the contract says.
pub struct RawLink {
    pub raw: Raw,
    pub map: shmbus_proto::link::shm::LinkMap,
    pub producer: shmbus_proto::link::Producer,
    pub consumer: shmbus_proto::link::Consumer,
    /// Socket packets (with fds) read before their marker came up.
    ahead: std::collections::VecDeque<Packet>,
    eof: bool,
    /// Doorbells the broker sent.
    pub doorbells: u64,
}

impl RawLink {
    /// Hello, then Attach: the broker must grant the link.
    pub fn attach(b: &Broker, name: &str) -> RawLink {
        RawLink::attach_at(&b.address, name)
    }

    pub fn attach_at(address: &str, name: &str) -> RawLink {
        use shmbus_proto::frame::Attach;
        let (mut raw, _) = Raw::hello_at(address, name);
        raw.send_body(&Attach { capacity: 0 }, &[]);
        let p = raw.next_packet();
        let capacity = match p.frame() {
            Some(BrokerFrame::Attached(a)) => a.capacity,
            other => panic!("expected Attached, got {other:?}"),
        };
        assert_eq!(p.fds.len(), 2, "Attached carries two fds");
        let map = shmbus_proto::link::shm::attach(capacity, p.fds[0].as_fd(), p.fds[1].as_fd()).unwrap();
        RawLink {
            raw,
            map,
            producer: shmbus_proto::link::Producer::new(capacity),
            consumer: shmbus_proto::link::Consumer::new(capacity),
            ahead: Default::default(),
            eof: false,
            doorbells: 0,
        }
    }

    /// Writes a frame into the ring (spinning while it is full, bounded)
    /// and rings the broker if it sleeps.
    pub fn send_frame(&mut self, head: &[u8], payload: &[u8]) {
        use shmbus_proto::link::RecordKind;
        let deadline = Instant::now() + PATIENCE;
        while !self
            .producer
            .try_push(self.map.peer(), self.map.my_data(), RecordKind::Frame, &[head, payload])
            .unwrap()
        {
            assert!(Instant::now() < deadline, "the broker never read its ring");
            std::thread::yield_now();
        }
        self.publish();
    }

    pub fn send_body<B: Body>(&mut self, body: &B, payload: &[u8]) {
        self.send_frame(&encode_head(body).unwrap(), payload);
    }

    /// A frame with fds: the packet on the socket, then a marker.
    pub fn send_with_fds<B: Body>(&mut self, body: &B, fds: &[std::os::fd::BorrowedFd<'_>]) {
        use shmbus_proto::link::RecordKind;
        self.raw.send_body(body, fds);
        assert!(self
            .producer
            .try_push(self.map.peer(), self.map.my_data(), RecordKind::Marker, &[])
            .unwrap());
        self.publish();
    }

    /// Makes what was written visible; rings if the broker sleeps.
    pub fn publish(&mut self) {
        self.producer.publish(self.map.mine());
        if self.producer.must_ring(self.map.peer()) {
            self.raw.send_body(&shmbus_proto::frame::Doorbell, &[]);
        }
    }

    /// Reads the socket once (waiting up to `timeout`): doorbells counted
    /// and dropped, other packets kept for their markers.
    fn read_socket(&mut self, timeout: Duration) {
        if let Some(p) = self.raw.recv_packet(timeout) {
            if p.is_eof() {
                self.eof = true;
            } else if matches!(p.frame(), Some(BrokerFrame::Doorbell)) {
                self.doorbells += 1;
            } else {
                self.ahead.push_back(p);
            }
        }
    }

    /// The next frame (a marker's comes from the socket with its fds), or
    /// `None` if nothing came within `timeout`; an EOF packet at the end.
    pub fn recv_packet(&mut self, timeout: Duration) -> Option<Packet> {
        use shmbus_proto::link::RecordKind;
        let deadline = Instant::now() + timeout;
        loop {
            let mut buf = Vec::new();
            match self.consumer.next(self.map.peer(), self.map.peer_data(), &mut buf).unwrap() {
                Some(RecordKind::Frame) => {
                    self.give_back();
                    return Some(Packet { data: buf, fds: Vec::new(), status: RecvStatus::default() });
                }
                Some(RecordKind::Marker) => {
                    self.give_back();
                    while self.ahead.is_empty() {
                        assert!(!self.eof, "a marker without its packet");
                        self.read_socket(PATIENCE);
                    }
                    return self.ahead.pop_front();
                }
                None => {}
            }
            if self.eof {
                return Some(Packet { data: Vec::new(), fds: Vec::new(), status: RecvStatus::default() });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if self.consumer.prepare_sleep(self.map.mine(), self.map.peer()).unwrap() {
                if left.is_zero() {
                    self.consumer.wake(self.map.mine());
                    return None;
                }
                self.read_socket(left);
                self.consumer.wake(self.map.mine());
            }
        }
    }

    /// Gives read records back; rings the broker if it waits for room.
    fn give_back(&mut self) {
        self.consumer.commit(self.map.mine());
        if self.consumer.must_ring_room(self.map.peer()) {
            self.raw.send_body(&shmbus_proto::frame::Doorbell, &[]);
        }
    }

    /// The next frame, which must come within PATIENCE (decoded by the
    /// caller from the packet's bytes).
    pub fn next_packet(&mut self) -> Packet {
        self.recv_packet(PATIENCE).expect("broker went silent")
    }

    /// Subscribes through the ring; the broker must confirm.
    pub fn subscribe(&mut self, sub_id: u32, pattern: &str, overflow: shmbus_proto::frame::Overflow) {
        self.send_body(&shmbus_proto::frame::Subscribe { sub_id, pattern, overflow }, &[]);
        let p = self.next_packet();
        match p.frame() {
            Some(BrokerFrame::Subscribed(s)) => assert_eq!(s.sub_id, sub_id),
            other => panic!("expected Subscribed, got {other:?}"),
        }
    }

    /// A ping through the ring; the next frame must be its pong.
    pub fn ping(&mut self, token: u64) {
        self.send_body(&shmbus_proto::frame::Ping { token }, &[]);
        let p = self.next_packet();
        match p.frame() {
            Some(BrokerFrame::Pong(p)) => assert_eq!(p.token, token),
            other => panic!("expected Pong, got {other:?}"),
        }
    }
}

/// The uid tests run other processes as.
pub const NOBODY: u32 = 65534;

pub fn is_root() -> bool {
    rustix::process::getuid().is_root()
}

/// Whether a test that acts as another uid can run: it needs root. As
/// another user it says loudly that it was skipped (straight to stderr, past
/// the test harness's capture, so the line shows even when the test reports
/// "ok"); under CI (the `CI` variable set) it fails instead, so a CI run can
/// never pass these tests by skipping them.
pub fn needs_root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    let why = format!(
        "{test} needs root to run a process as another uid; this test process runs as uid {}",
        rustix::process::getuid().as_raw()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why}. CI is set: run the suite as root, these tests may not be skipped there");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {why}");
    false
}

/// Held for the whole of a test that measures a bystander's round trips
/// against its idle ones. The tests of one binary run on parallel
/// threads, and on two CPUs another attack's broker and threads are not
/// the attack measured: with two attacks at once, CI saw a bystander's
/// p50 at 2.4 ms where alone it was 0.05–0.9 ms. (A panic in one holder
/// poisons the lock; the others go on.)
pub fn measuring_alone() -> std::sync::MutexGuard<'static, ()> {
    static MEASURING: Mutex<()> = Mutex::new(());
    MEASURING.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Longest a single bystander round trip may take in an attack test.
pub const ONE_PING: Duration = Duration::from_secs(5);

/// `n` pings on a socket client (an attack's bystander), sorted round
/// trips; each bounded by [`ONE_PING`].
pub fn socket_rtts(raw: &mut Raw, n: u64) -> Vec<Duration> {
    let mut v = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        raw.send_body(&shmbus_proto::frame::Ping { token: i }, &[]);
        loop {
            let left = ONE_PING.saturating_sub(t.elapsed());
            let p = raw.recv_packet(left).unwrap_or_else(|| panic!("ping {i} unanswered in {ONE_PING:?}"));
            assert!(!p.is_eof(), "the bystander was cut off");
            if matches!(p.frame(), Some(BrokerFrame::Pong(p)) if p.token == i) {
                break;
            }
        }
        v.push(t.elapsed());
        std::thread::sleep(Duration::from_micros(300));
    }
    v.sort();
    v
}

/// The `p`th percentile of sorted durations.
pub fn pct(v: &[Duration], p: usize) -> Duration {
    v[(v.len() * p / 100).min(v.len() - 1)]
}

/// Runs `f` on a thread of its own whose credentials alone are `uid` (and
/// gid `uid`): Linux keeps them per thread, and `connect` stamps the
/// caller's into `SO_PEERCRED`. Needs root.
pub fn as_uid<T: Send + 'static>(
    uid: u32,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        let gid = rustix::process::Gid::from_raw(uid);
        let u = rustix::process::Uid::from_raw(uid);
        rustix::thread::set_thread_res_gid(gid, gid, gid).expect("setresgid on this thread (needs root)");
        rustix::thread::set_thread_res_uid(u, u, u).expect("setresuid on this thread (needs root)");
        f()
    })
}

/// A raw connection whose `SO_PEERCRED` says `uid`, past its Welcome, and
/// the client id the broker gave it (see [`as_uid`]).
pub fn raw_id_as(b: &Broker, uid: u32, name: &str) -> (Raw, u64) {
    let address = b.address.clone();
    let name = name.to_owned();
    as_uid(uid, move || {
        let (r, w) = Raw::hello_at(&address, &name);
        (r, w.client_id)
    })
    .join()
    .expect("the connecting thread")
}

/// [`raw_id_as`], the connection alone.
pub fn raw_as(b: &Broker, uid: u32, name: &str) -> Raw {
    raw_id_as(b, uid, name).0
}

/// A client of another uid (65534) doing ping, sub and pub round trips
/// through `shmbusctl` until stopped: never refused nor cut off, each
/// round within PATIENCE. Its broker must admit uid 65534
/// (`--allow-uid 65534`).
pub struct Bystander {
    stop: Arc<std::sync::atomic::AtomicBool>,
    rounds: Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Bystander {
    pub fn start(b: &Broker) -> Bystander {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let address = b.address.clone();
        let (s, r) = (stop.clone(), rounds.clone());
        let thread = std::thread::spawn(move || {
            let ctl = |args: &[&str]| {
                let mut c = command_as(SHMBUSCTL, NOBODY);
                c.arg("--address").arg(&address).args(args);
                c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
                c
            };
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) || n == 0 {
                let t = Instant::now();
                let o = run_bounded(ctl(&["ping"]));
                assert!(o.status.success(), "bystander ping: {}", stderr(&o));
                let topic = format!("by.{n}");
                let sub = spawn_guarded(ctl(&["sub", &topic, "--count", "1"]));
                let o =
                    run_bounded(ctl(&["pub", "--wait-subscribers", "1", "--timeout", "20", &topic, "hi"]));
                assert!(o.status.success(), "bystander pub: {}", stderr(&o));
                let o = sub.wait_output();
                assert!(o.status.success() && stdout(&o).contains("hi"), "bystander sub: {}", stderr(&o));
                assert!(t.elapsed() < PATIENCE, "a bystander round took {:?}", t.elapsed());
                n += 1;
                r.store(n, Ordering::Relaxed);
            }
        });
        Bystander { stop, rounds, thread: Some(thread) }
    }

    /// Waits for one more full round (while the attack runs), then stops;
    /// panics if it failed.
    pub fn finish(mut self) -> u64 {
        let before = self.rounds.load(Ordering::Relaxed);
        let t = Instant::now();
        while self.rounds.load(Ordering::Relaxed) <= before {
            assert!(!self.thread.as_ref().unwrap().is_finished(), "the bystander failed");
            assert!(t.elapsed() < 3 * PATIENCE, "the bystander made no round");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("the bystander's round trips all completed");
        self.rounds.load(Ordering::Relaxed)
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
