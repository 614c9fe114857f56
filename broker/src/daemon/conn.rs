//! One client connection, as the broker holds it.
//!
//! Lifecycle: `AwaitHello` → `Ready` → `Closing` → gone. A connection is
//! `Closing` once the broker has decided to end it (the client misbehaved,
//! fell behind with a `Disconnect` subscription, or the broker is shutting
//! down): its subscriptions are already out of the router, its input is
//! ignored, a `Goodbye` with the reason is the last frame in its queue, and
//! it is closed when that queue has been flushed or its deadline passes,
//! whichever is first.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::time::Instant;

use shmbus_proto::sys::socket::PeerCred;

use crate::bus::queue::{OutQueue, SubState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    AwaitHello,
    Ready,
    Closing { deadline: Instant },
}

#[derive(Debug)]
pub struct Conn {
    pub id: u64,
    pub fd: OwnedFd,
    pub cred: PeerCred,
    /// The peer's command name, from `/proc/<pid>/comm` at accept.
    pub command: String,
    /// The name the client gave in `Hello`.
    pub name: String,
    pub state: ConnState,
    pub subs: HashMap<u32, SubState>,
    pub queue: OutQueue,
    /// Some subscription has `missed > 0` awaiting a gap notice.
    pub owes_gaps: bool,
    /// In the broker's flush list.
    pub dirty: bool,
    /// Registered for writable events: its socket was full at the last
    /// flush. Cleared once the queue drains.
    pub wants_write: bool,
    /// Publishes received; also the `seq` of the latest.
    pub published: u64,
    pub msgs_out: u64,
    pub dropped: u64,
    pub connected_at: Instant,
}

impl Conn {
    /// "client 4 (uid 1000, pid 77, comm foo)": how log lines name a peer.
    pub fn who(&self) -> String {
        format!("client {} (uid {}, pid {}, comm {})", self.id, self.cred.uid, self.cred.pid, self.command)
    }

    pub fn is_closing(&self) -> bool {
        matches!(self.state, ConnState::Closing { .. })
    }
}

/// Best-effort command name of `pid`, for logs and introspection.
pub fn command_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim_end().to_owned())
        .unwrap_or_else(|_| "?".to_owned())
}
