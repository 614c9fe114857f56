//! What the broker is told at start.

use std::os::fd::OwnedFd;
use std::time::Duration;

use shmbus_proto::Address;

use crate::bus::policy::Policy;
use crate::bus::queue::QueueLimits;
use crate::bus::quota::QuotaLimits;

#[derive(Debug)]
pub struct Config {
    /// Where to listen (ignored when `listen_fd` is given).
    pub address: Address,
    /// An already-listening socket to serve instead of binding `address`.
    pub listen_fd: Option<OwnedFd>,
    pub policy: Policy,
    pub queue: QueueLimits,
    pub max_subscriptions: u32,
    /// Connections one uid may have open at once.
    pub max_connections_per_uid: u32,
    /// Per-uid bounds on memfd payloads the broker holds.
    pub quota: QuotaLimits,
    /// How long a connection being closed may take to flush its queue,
    /// and how long shutdown waits for all of them.
    pub close_grace: Duration,
}

impl Config {
    pub fn new(address: Address) -> Config {
        Config {
            address,
            listen_fd: None,
            policy: Policy::new(rustix::process::getuid().as_raw()),
            queue: QueueLimits {
                bytes: shmbus_proto::limits::DEFAULT_QUEUE_BYTES,
                frames: shmbus_proto::limits::DEFAULT_QUEUE_FRAMES,
                fds: shmbus_proto::limits::DEFAULT_QUEUE_FDS,
            },
            max_subscriptions: shmbus_proto::limits::DEFAULT_MAX_SUBSCRIPTIONS,
            max_connections_per_uid: shmbus_proto::limits::DEFAULT_MAX_CONNECTIONS_PER_UID,
            quota: QuotaLimits {
                memfd_bytes: shmbus_proto::limits::DEFAULT_MEMFD_QUOTA_BYTES,
                memfd_fds: shmbus_proto::limits::DEFAULT_MEMFD_QUOTA_FDS,
            },
            close_grace: Duration::from_secs(2),
        }
    }
}
