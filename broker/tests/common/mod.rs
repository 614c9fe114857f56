//! Test harness: a real `shmbusd` on a unique abstract address per test,
//! killed on drop; bounded waits everywhere so a bug fails instead of
//! hanging.

#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use shmbus::Client;

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
        let address = unique_address(tag);
        let mut cmd = match uid {
            Some(uid) => command_as(SHMBUSD, uid),
            None => Command::new(SHMBUSD),
        };
        cmd.arg("--address").arg(&address).args(extra).stdin(Stdio::null());
        let child = cmd.spawn().expect("spawn shmbusd");
        let b = Broker { child: Some(child), address };
        b.wait_ready();
        b
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            let addr = shmbus::Address::parse(&self.address).unwrap();
            if shmbus_proto::sys::socket::connect(&addr).is_ok() {
                return;
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
        Client::options()
            .address(shmbus::Address::parse(&self.address).unwrap())
            .name(name)
            .connect()
            .expect("connect to the test broker")
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
    pub fn wait_output(mut self) -> Output {
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
        let status = wait_timeout(&mut child, PATIENCE);
        let stdout = out.join().unwrap();
        let stderr = err.join().unwrap();
        let Some(status) = status else {
            panic!(
                "child did not finish in {PATIENCE:?}; {} bytes of stdout, stderr {:?}",
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
    use std::os::unix::fs::PermissionsExt;
    static COPIES: std::sync::Mutex<Vec<(String, std::path::PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut copies = COPIES.lock().unwrap();
    let path = match copies.iter().find(|(b, _)| b == binary) {
        Some((_, p)) => p.clone(),
        None => {
            // Copies left by earlier test processes that are gone.
            for e in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("shmbus-test-bin-") {
                    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
            let dir = std::env::temp_dir().join(format!("shmbus-test-bin-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            let name = std::path::Path::new(binary).file_name().unwrap();
            let dst = dir.join(name);
            std::fs::copy(binary, &dst).unwrap();
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).unwrap();
            copies.push((binary.to_owned(), dst.clone()));
            dst
        }
    };
    let mut cmd = Command::new(path);
    cmd.uid(uid).gid(uid).current_dir("/");
    cmd
}

pub fn spawn_guarded(mut cmd: Command) -> ChildGuard {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    ChildGuard(Some(cmd.spawn().expect("spawn")))
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

use shmbus_proto::frame::{decode_broker, encode_head, BrokerFrame, GoodbyeCode, Hello, PROTOCOL_VERSION};
use shmbus_proto::sys::socket::{self, OutPacket, RecvBatch};

/// A client that speaks the wire protocol by hand, to misbehave on purpose.
pub struct Raw {
    pub fd: OwnedFd,
    batch: RecvBatch,
}

impl Raw {
    pub fn connect_addr(address: &str) -> Raw {
        let addr = shmbus::Address::parse(address).unwrap();
        Raw { fd: socket::connect(&addr).unwrap(), batch: RecvBatch::new(1) }
    }

    pub fn connect(b: &Broker) -> Raw {
        let addr = shmbus::Address::parse(&b.address).unwrap();
        Raw { fd: socket::connect(&addr).unwrap(), batch: RecvBatch::new(1) }
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

    pub fn send(&self, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) {
        // The broker may already have closed us; that is fine.
        let _ = socket::send_packet(self.fd.as_fd(), OutPacket { head: bytes, payload: &[], fds }, false);
    }

    /// Next frame, or None at end of stream. Bounded.
    pub fn recv(&mut self) -> Option<BrokerFrame<'_>> {
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
        let (data, _, fds) = self.batch.packet(0);
        assert!(fds.is_empty(), "the broker must not send fds");
        if data.is_empty() {
            return None;
        }
        Some(decode_broker(data).expect("the broker sends valid frames"))
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
