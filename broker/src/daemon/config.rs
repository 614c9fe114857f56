//! What the broker is told at start.

use std::os::fd::OwnedFd;
use std::time::Duration;

use shmbus_proto::Address;

use crate::bus::policy::Policy;
use crate::bus::queue::QueueLimits;

#[derive(Debug)]
pub struct Config {
    /// Where to listen (ignored when `listen_fd` is given).
    pub address: Address,
    /// An already-listening socket to serve instead of binding `address`.
    pub listen_fd: Option<OwnedFd>,
    pub policy: Policy,
    pub queue: QueueLimits,
    pub max_subscriptions: u32,
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
            },
            max_subscriptions: shmbus_proto::limits::DEFAULT_MAX_SUBSCRIPTIONS,
            close_grace: Duration::from_secs(2),
        }
    }
}
