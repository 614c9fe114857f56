//! Running under a service manager: socket activation, readiness, status,
//! watchdog, stopping.
//!
//! Model: systemd owns the listening socket (`shmbus.socket`) and starts
//! the broker on the first connection, passing the socket as fd 3 named
//! `bus`. The broker tells systemd `READY=1` once its state is built, keeps
//! `STATUS=` current (client and pattern counts, rate-limited), sends
//! `WATCHDOG=1` at half of `WATCHDOG_USEC` *from the event loop* (so a hung
//! loop stops the pings and systemd restarts it), and `STOPPING=1` when it
//! begins to shut down. Without `NOTIFY_SOCKET` every notification is a
//! no-op; without `LISTEN_FDS` the broker binds its own address.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use shmbus_proto::sys::activation::{take_listen_fds, ActivationError};
use shmbus_proto::sys::socket;
use tracing::{debug, warn};

/// The `FileDescriptorName=` the broker looks for.
pub const FD_NAME: &str = "bus";

/// Least time between two `STATUS=` updates.
const STATUS_EVERY: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum ListenFdError {
    #[error(transparent)]
    Activation(#[from] ActivationError),
    #[error("{0} fds were passed and none is named {FD_NAME:?}")]
    NoneNamedBus(usize),
    #[error("the passed fd {name:?} is not a listening SOCK_SEQPACKET socket")]
    NotSeqpacketListener { name: String },
    #[error("cannot inspect the passed fd: {0}")]
    Io(#[from] io::Error),
}

/// The listening socket the service manager passed, if it passed one:
/// the one named `bus` when names are given, else the only one. It must be
/// a listening SOCK_SEQPACKET socket; it is made non-blocking. Any other
/// passed fd is closed.
pub fn listener_from_env() -> Result<Option<OwnedFd>, ListenFdError> {
    let fds = take_listen_fds()?;
    if fds.is_empty() {
        return Ok(None);
    }
    let total = fds.len();
    let named = fds.iter().any(|f| f.name.is_some());
    let mut chosen = None;
    for f in fds {
        let wanted = if named { f.name.as_deref() == Some(FD_NAME) } else { total == 1 };
        if wanted && chosen.is_none() {
            chosen = Some(f);
        } else {
            warn!("closing passed fd {:?}: not the bus socket", f.name);
        }
    }
    let Some(f) = chosen else { return Err(ListenFdError::NoneNamedBus(total)) };
    let name = f.name.clone().unwrap_or_else(|| "(unnamed)".into());
    if !socket::is_listening_seqpacket(f.fd.as_fd())? {
        return Err(ListenFdError::NotSeqpacketListener { name });
    }
    socket::set_nonblocking(f.fd.as_fd(), true)?;
    debug!("serving the socket passed by the service manager ({name})");
    Ok(Some(f.fd))
}

/// `WATCHDOG_USEC`, if a watchdog is asked of this process (libsystemd's
/// rule: `WATCHDOG_PID`, when set, must be ours). Unsets both.
fn watchdog_from_env() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok().and_then(|s| s.trim().parse::<u64>().ok());
    let pid = std::env::var("WATCHDOG_PID").ok().map(|s| s.trim().parse::<u32>().ok());
    std::env::remove_var("WATCHDOG_USEC");
    std::env::remove_var("WATCHDOG_PID");
    match (usec, pid) {
        (Some(u), None) if u > 0 => Some(Duration::from_micros(u)),
        (Some(u), Some(Some(p))) if u > 0 && p == std::process::id() => Some(Duration::from_micros(u)),
        _ => None,
    }
}

/// Talks to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    enabled: bool,
    watchdog_every: Option<Duration>,
    next_ping: Option<Instant>,
    status: String,
    status_sent: Option<Instant>,
    status_pending: bool,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some();
        let watchdog_every = watchdog_from_env().map(|d| d / 2);
        Notifier {
            enabled,
            watchdog_every,
            next_ping: watchdog_every.map(|d| Instant::now() + d),
            status: String::new(),
            status_sent: None,
            status_pending: false,
        }
    }

    /// Whether a service manager listens (`NOTIFY_SOCKET` was set).
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        if let Err(e) = sd_notify::notify(false, states) {
            warn!("cannot notify the service manager: {e}");
        }
    }

    pub fn ready(&mut self, status: String) {
        self.send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        self.status = status;
        self.status_sent = Some(Instant::now());
    }

    /// Records the current status; it is sent now or, if one was sent very
    /// recently, at the next `tick` after the rate limit.
    pub fn set_status(&mut self, status: String) {
        if status != self.status {
            self.status = status;
            self.status_pending = true;
        }
    }

    /// A reload begins (`Type=notify-reload`): `RELOADING=1` with the
    /// monotonic time, then [`Notifier::reloaded`] when it is over.
    pub fn reloading(&mut self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now, NotifyState::Status("reloading the policy")]),
            Err(e) => warn!("cannot read the monotonic clock for RELOADING=1: {e}"),
        }
    }

    /// The reload is over, applied or not: `READY=1` again.
    pub fn reloaded(&mut self) {
        let status = std::mem::take(&mut self.status);
        self.ready(status);
    }

    pub fn stopping(&mut self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
    }

    /// Sends what is due: a watchdog ping, a pending status.
    pub fn tick(&mut self, now: Instant) {
        if let (Some(next), Some(every)) = (self.next_ping, self.watchdog_every) {
            if now >= next {
                self.send(&[NotifyState::Watchdog]);
                self.next_ping = Some(now + every);
            }
        }
        if self.status_pending && self.status_sent.is_none_or(|t| now >= t + STATUS_EVERY) {
            let status = std::mem::take(&mut self.status);
            self.send(&[NotifyState::Status(&status)]);
            self.status = status;
            self.status_sent = Some(now);
            self.status_pending = false;
        }
    }

    /// When `tick` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.enabled {
            return None;
        }
        let status_due =
            self.status_pending.then(|| self.status_sent.map_or(Instant::now(), |t| t + STATUS_EVERY));
        match (self.next_ping, status_due) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
