//! Test harness: real processes only. A `nats-server` on a free loopback
//! port, shmbus brokers on unique abstract addresses (this very test
//! binary re-executed in its ignored `broker_process` role, which runs the
//! broker library: `cargo test -p shmbus-bridge` then needs no other
//! binary built), and `shmbus-bridge` processes with a config file each.
//! Every process is killed on drop, every wait is bounded by [`PATIENCE`]
//! and fails with what it waited for.

#![allow(dead_code)]

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use shmbus::{Client, Event, Message, Subscription};
use shmbus_bridge::Status;

// The broker's tests' guard for files under the temp directory: the one
// way these tests make them too.
#[path = "../../../broker/tests/common/tempdir.rs"]
mod tempdir;
#[allow(unused_imports)] // (by the test binaries that make no files)
pub use tempdir::TempDir;

pub const BRIDGE: &str = env!("CARGO_BIN_EXE_shmbus-bridge");
pub const BROKER_ENV: &str = "SHMBUS_BRIDGE_TEST_BROKER";

/// Generous bound for anything that should take milliseconds to seconds.
pub const PATIENCE: Duration = Duration::from_secs(30);

static NEXT: AtomicU32 = AtomicU32::new(0);

pub fn unique(tag: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{tag}-{}-{n}-{nanos}", std::process::id())
}

/// Polls `f` until it gives a value, at most [`PATIENCE`].
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The `nats-server` binary; a clear failure if it is not installed.
pub fn nats_server_bin() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(["/usr/sbin".into(), "/usr/bin".into()]);
    for d in dirs {
        let p = d.join("nats-server");
        if p.is_file() {
            return p;
        }
    }
    panic!("nats-server is not installed: the bridge tests need it (apt-get install nats-server)");
}

/// A `nats-server` on 127.0.0.1 and a port of its own.
pub struct Nats {
    child: Option<Child>,
    pub port: u16,
    max_payload: Option<usize>,
}

impl Nats {
    pub fn start(max_payload: Option<usize>) -> Nats {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
            l.local_addr().unwrap().port()
        };
        let mut n = Nats { child: None, port, max_payload };
        n.spawn();
        n
    }

    /// The server's process id (to stop and continue it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("nats-server runs").id()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(nats_server_bin());
        cmd.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]);
        // nats-server 2.9 has no --max_payload flag: a config file says it.
        // Read at start: removed once the server listens (or the wait
        // fails).
        let _conf = self.max_payload.map(|m| {
            let dir = TempDir::new("bridge-nats");
            let path = dir.join("nats.conf");
            std::fs::write(&path, format!("max_payload: {m}\n")).unwrap();
            cmd.arg("-c").arg(&path);
            dir
        });
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn nats-server");
        let addr = format!("127.0.0.1:{}", self.port);
        wait_for("nats-server to listen", || {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("nats-server exited at start: {st}");
            }
            TcpStream::connect(&addr).ok()
        });
        self.child = Some(child);
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
    }

    /// Starts it again on the same port (a stopped server's port may take
    /// a moment to be free again: bounded retries).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A shmbus broker (this test binary in its `broker_process` role).
pub struct Broker {
    child: Option<Child>,
    pub address: String,
}

impl Broker {
    pub fn start(tag: &str) -> Broker {
        let mut b = Broker { child: None, address: format!("@shmbus-bridge-test-{}", unique(tag)) };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let exe = std::env::current_exe().expect("own path");
        let child = Command::new(exe)
            .args(["broker_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(BROKER_ENV, &self.address)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn the broker");
        self.child = Some(child);
        let address = self.address.clone();
        wait_for("the broker to accept", || Client::connect_to(&address).ok());
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the broker runs").id()
    }

    pub fn client(&self) -> Client {
        Client::connect_to(&self.address).expect("connect to the test broker")
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `shmbus-bridge` process.
pub struct Bridge {
    child: Option<Child>,
    pub name: String,
    pub address: String,
    log: PathBuf,
    config: PathBuf,
    /// Holds `log` and `config`; removed after the process is killed.
    dir: TempDir,
}

impl Bridge {
    /// Starts a bridge named `name` for `broker` with the rest of its
    /// config in `body` (TOML lines), and waits until it answers its
    /// status with NATS connected.
    pub fn start(name: &str, broker: &Broker, nats: &Nats, body: &str) -> Bridge {
        let dir = TempDir::new("bridge-test");
        let config = dir.join("bridge.toml");
        let text = format!(
            "nats = \"{}\"\nshmbus = \"{}\"\nname = \"{name}\"\n{body}\n",
            nats.url(),
            broker.address
        );
        std::fs::write(&config, text).unwrap();
        let log = dir.join("bridge.log");
        let err = std::fs::File::create(&log).unwrap();
        let child = Command::new(BRIDGE)
            .arg("--config")
            .arg(&config)
            .arg("--verbose")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn shmbus-bridge");
        let b = Bridge {
            child: Some(child),
            name: name.to_owned(),
            address: broker.address.clone(),
            log,
            config,
            dir,
        };
        b.wait_status("NATS connected", |s| s.nats.connected);
        b
    }

    /// The bridge's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the bridge runs").id()
    }

    /// The bridge's resident memory, in bytes (from /proc).
    pub fn rss(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The status, if the bridge answers.
    pub fn try_status(&self) -> Option<Status> {
        let c = Client::connect_to(&self.address).ok()?;
        let r = c.request(&shmbus_bridge::status_name(&self.name), b"", Duration::from_secs(2)).ok()?;
        serde_json::from_slice(r.payload()).ok()
    }

    pub fn status(&self) -> Status {
        self.try_status()
            .unwrap_or_else(|| panic!("bridge {} did not answer; its log:\n{}", self.name, self.log()))
    }

    /// Polls the status until `ok` holds.
    pub fn wait_status(&self, what: &str, ok: impl Fn(&Status) -> bool) -> Status {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_status() {
                if ok(&s) {
                    return s;
                }
            }
            assert!(
                start.elapsed() < PATIENCE,
                "bridge {}: timed out waiting for {what}; last status {:?}; log:\n{}",
                self.name,
                self.try_status(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits at most `within` for the process to exit; its status, or
    /// `None` if it still runs (it is then killed on drop as usual).
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.child = None;
                return Some(st);
            }
            if start.elapsed() > within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn config_path(&self) -> &std::path::Path {
        &self.config
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
        if std::thread::panicking() {
            let _ = writeln!(std::io::stderr(), "--- log of bridge {} ---\n{}", self.name, self.log());
        }
    }
}

/// The next message on `sub` within [`PATIENCE`] (gaps and reconnection
/// events are skipped).
pub fn next_message(sub: &Subscription, what: &str) -> Message {
    let start = Instant::now();
    loop {
        let left = PATIENCE.saturating_sub(start.elapsed());
        assert!(!left.is_zero(), "timed out waiting for {what}");
        match sub.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(Some(Event::Message(m))) => return m,
            Ok(_) => {}
            Err(e) => panic!("receiving {what}: {e}"),
        }
    }
}

/// Every message on `sub` until it has been quiet for `quiet`.
pub fn drain(sub: &Subscription, quiet: Duration) -> Vec<Message> {
    let mut got = Vec::new();
    while let Ok(Some(e)) = sub.recv_timeout(quiet) {
        if let Event::Message(m) = e {
            got.push(m);
        }
    }
    got
}

/// Publishes probes on `subject` from `from` until one reaches `sub`, then
/// drains `sub`: the path through both bridges and NATS is up.
pub fn await_path(from: &Client, sub: &Subscription, subject: &str) {
    let start = Instant::now();
    loop {
        from.publish(subject, b"probe").expect("publish a probe");
        if let Ok(Some(Event::Message(m))) = sub.recv_timeout(Duration::from_millis(150)) {
            if m.topic() == subject {
                break;
            }
        }
        assert!(start.elapsed() < PATIENCE, "no probe on {subject} crossed the bridges");
    }
    drain(sub, Duration::from_millis(300));
}

/// Sends `sig` to `pid` (`kill -SIG pid`).
pub fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status().expect("run kill");
    assert!(st.success(), "kill -{sig} {pid}");
}

/// Runs a broker in this process when the harness asked for one.
pub fn broker_process() {
    let Ok(addr) = std::env::var(BROKER_ENV) else { return };
    let cfg = shmbus_broker::daemon::Config::new(shmbus::Address::parse(&addr).unwrap());
    shmbus_broker::daemon::run(cfg).unwrap();
}
