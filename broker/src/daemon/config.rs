//! What the broker is told at start: where to listen, and the bus core's
//! configuration (limits, policy, deadlines).

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use shmbus_proto::Address;

use crate::bus::BusConfig;

#[derive(Debug)]
pub struct Config {
    /// Where to listen (ignored when `listen_fd` is given).
    pub address: Address,
    /// An already-listening socket to serve instead of binding `address`.
    pub listen_fd: Option<OwnedFd>,
    pub bus: BusConfig,
    /// The policy file, read again on `SIGHUP` (its rules, loaded at
    /// start, are in `bus.rules`).
    pub policy_path: Option<PathBuf>,
}

impl Config {
    pub fn new(address: Address) -> Config {
        let bus = BusConfig::new(address.to_string(), rustix::process::getuid().as_raw());
        Config { address, listen_fd: None, bus, policy_path: None }
    }
}
