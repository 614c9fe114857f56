//! shmbusd: the shmbus broker.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use shmbus_broker::daemon::{self, systemd, Config};
use shmbus_proto::Address;

/// The shmbus broker: a local message bus over an abstract AF_UNIX
/// SOCK_SEQPACKET socket.
#[derive(Parser, Debug)]
#[command(name = "shmbusd", version)]
struct Args {
    /// Address to listen on: `@name` for an abstract socket, else a path.
    /// Default: $SHMBUS_ADDRESS, else the user bus `@shmbus.<uid>`.
    #[arg(long, value_name = "ADDR")]
    address: Option<Address>,
    /// Serve the system bus, `@shmbus`.
    #[arg(long, conflicts_with = "address")]
    system: bool,
    /// Also admit this uid (root and the broker's own uid always are).
    #[arg(long = "allow-uid", value_name = "UID")]
    allow_uid: Vec<u32>,
    /// Admit every uid that can reach the socket.
    #[arg(long)]
    allow_all_uids: bool,
    /// Bound of each connection's outgoing queue, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = shmbus_proto::limits::DEFAULT_QUEUE_BYTES)]
    queue_bytes: u64,
    /// Bound of each connection's outgoing queue, in frames.
    #[arg(long, value_name = "N", default_value_t = shmbus_proto::limits::DEFAULT_QUEUE_FRAMES)]
    queue_frames: u32,
    /// Bound of each connection's outgoing queue, in memfd payloads.
    #[arg(long, value_name = "N", default_value_t = shmbus_proto::limits::DEFAULT_QUEUE_FDS)]
    queue_fds: u32,
    /// Most connections one uid may have open at once.
    #[arg(long, value_name = "N", default_value_t = shmbus_proto::limits::DEFAULT_MAX_CONNECTIONS_PER_UID)]
    max_connections_per_uid: u32,
    /// Most subscriptions one connection may hold.
    #[arg(long, value_name = "N", default_value_t = shmbus_proto::limits::DEFAULT_MAX_SUBSCRIPTIONS)]
    max_subscriptions: u32,
    /// Bytes of memfd payloads one uid may have queued in the broker.
    #[arg(long, value_name = "BYTES", default_value_t = shmbus_proto::limits::DEFAULT_MEMFD_QUOTA_BYTES)]
    memfd_quota_bytes: u64,
    /// Memfd payloads one uid may have queued in the broker.
    #[arg(long, value_name = "N", default_value_t = shmbus_proto::limits::DEFAULT_MEMFD_QUOTA_FDS)]
    memfd_quota_fds: u32,
    /// Log level: error, warn (default), info, debug or trace. $SHMBUS_LOG
    /// sets it too.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<tracing::Level>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let level = args
        .log_level
        .or_else(|| std::env::var("SHMBUS_LOG").ok().and_then(|s| s.parse().ok()))
        .unwrap_or(tracing::Level::WARN);
    tracing_subscriber::fmt().with_max_level(level).with_writer(std::io::stderr).with_target(false).init();

    let address = match (args.address, args.system) {
        (Some(a), _) => a,
        (None, true) => Address::system(),
        (None, false) => match Address::default_user() {
            Ok(a) => a,
            Err(e) => {
                eprintln!("shmbusd: bad $SHMBUS_ADDRESS: {e}");
                return ExitCode::from(2);
            }
        },
    };
    raise_nofile_limit();
    let mut cfg = Config::new(address.clone());
    match systemd::listener_from_env() {
        Ok(fd) => cfg.listen_fd = fd,
        Err(e) => {
            eprintln!("shmbusd: socket activation: {e}");
            return ExitCode::FAILURE;
        }
    }
    for uid in args.allow_uid {
        cfg.policy.allow_uid(uid);
    }
    if args.allow_all_uids {
        cfg.policy.allow_all();
    }
    cfg.queue.bytes = args.queue_bytes.max(1);
    cfg.queue.frames = args.queue_frames.max(1);
    cfg.queue.fds = args.queue_fds.max(1);
    cfg.max_subscriptions = args.max_subscriptions;
    cfg.max_connections_per_uid = args.max_connections_per_uid;
    cfg.quota.memfd_bytes = args.memfd_quota_bytes;
    cfg.quota.memfd_fds = args.memfd_quota_fds;
    cfg.close_grace = Duration::from_secs(2);
    match daemon::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shmbusd: cannot serve {address}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A broker holds one fd per client: raise the soft fd limit to the hard
/// one, as systemd's `LimitNOFILE=` intends.
fn raise_nofile_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut lim = getrlimit(Resource::Nofile);
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!("cannot raise the fd limit: {e}");
        }
    }
}
