//! shmbusd: the shmbus broker.

#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use shmbus_broker::bus::quota::Resource;
use shmbus_broker::daemon::config::SocketAccess;
use shmbus_broker::daemon::{self, systemd, Config};
use shmbus_proto::limits as l;
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
    /// Also admit this user, by name or uid (root and the broker's own uid
    /// always are). Repeat for more.
    #[arg(long = "allow-uid", value_name = "USER|UID", conflicts_with = "policy",
          value_parser = daemon::config::parse_uid)]
    allow_uid: Vec<u32>,
    /// Admit every uid that can reach the socket.
    #[arg(long, conflicts_with = "policy")]
    allow_all_uids: bool,
    /// Permission bits of a path socket's file, in octal. Connecting needs
    /// write permission: the default 0666 lets every local user reach the
    /// socket, and the uid policy (or policy file) decides whom to admit;
    /// 0660 with --socket-group narrows who may even try. Not for an
    /// abstract address (`@name`), which has no file.
    #[arg(long, value_name = "OCTAL", value_parser = parse_mode)]
    socket_mode: Option<u32>,
    /// Group of a path socket's file, by name or gid (default: the
    /// broker's group).
    #[arg(long, value_name = "GROUP|GID", value_parser = daemon::config::parse_gid)]
    socket_group: Option<u32>,
    /// The policy file (TOML): who may connect, publish, subscribe, own,
    /// call, open channels, monitor and introspect. Read again on SIGHUP.
    /// Without one, admission by uid is the only gate.
    #[arg(long, value_name = "FILE")]
    policy: Option<std::path::PathBuf>,
    /// Bound of each connection's outgoing queue, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = l::DEFAULT_QUEUE_BYTES)]
    queue_bytes: u64,
    /// Bound of each connection's outgoing queue, in frames.
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_QUEUE_FRAMES)]
    queue_frames: u32,
    /// Bound of each connection's outgoing queue, in memfd payloads.
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_QUEUE_FDS)]
    queue_fds: u32,
    /// Most subscriptions one connection may hold.
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_MAX_SUBSCRIPTIONS)]
    max_subscriptions: u32,
    /// Fds sent to one connection before the broker waits for the client
    /// to acknowledge them (at least 4).
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_FD_WINDOW)]
    fd_window: u32,
    /// Readers one ring channel may have.
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_MAX_READERS_PER_CHANNEL)]
    max_readers_per_channel: u32,
    /// Readers one uid may have on one ring channel.
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_MAX_READERS_PER_CHANNEL_PER_UID)]
    max_readers_per_channel_per_uid: u32,
    /// Serve every connection over the socket alone: refuse the
    /// shared-memory transport clients ask for at the handshake.
    #[arg(long)]
    no_shared_memory: bool,
    /// Bytes per direction of a connection's shared-memory transport (a
    /// power of two, 256 KiB to 16 MiB; both directions count against
    /// --uid-ring-bytes while the connection lives).
    #[arg(long, value_name = "BYTES", default_value_t = shmbus_proto::link::layout::DEFAULT_CAPACITY, value_parser = parse_link_capacity)]
    link_capacity: u32,
    /// Milliseconds a new connection has to say Hello.
    #[arg(long, value_name = "MS", default_value_t = l::DEFAULT_HELLO_TIMEOUT_MS)]
    hello_timeout_ms: u64,
    /// Per uid, across all its connections: connections open at once.
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_MAX_CONNECTIONS_PER_UID)]
    max_connections_per_uid: u32,
    /// Per uid: bytes queued in the broker for its connections.
    #[arg(long, value_name = "BYTES", default_value_t = l::DEFAULT_UID_QUEUE_BYTES)]
    uid_queue_bytes: u64,
    /// Per uid: fds queued in the broker for its connections.
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_UID_QUEUE_FDS)]
    uid_queue_fds: u64,
    /// Per uid: fds sent to its connections and not yet acknowledged (at
    /// least 4, the most one packet carries: with less, a channel grant's
    /// fds could never be sent).
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_UID_UNACKED_FDS,
          value_parser = clap::value_parser!(u64).range(l::MAX_FDS_PER_PACKET as u64..))]
    uid_unacked_fds: u64,
    /// Per uid: subscriptions.
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_UID_SUBSCRIPTIONS)]
    uid_subscriptions: u64,
    /// Per uid: router memory of its subscriptions, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = l::DEFAULT_UID_ROUTER_BYTES)]
    uid_router_bytes: u64,
    /// Per uid: ring channels published.
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_UID_CHANNELS)]
    uid_channels: u64,
    /// Per uid: reader handles on ring channels.
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_UID_CHANNEL_READERS)]
    uid_channel_readers: u64,
    /// Per uid: ring and cursor memory the broker creates for it, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = l::DEFAULT_UID_RING_BYTES)]
    uid_ring_bytes: u64,
    /// Per uid: names owned or waited for.
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_UID_NAMES)]
    uid_names: u64,
    /// Per uid: requests waiting for an answer.
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_UID_PENDING_REQUESTS)]
    uid_pending_requests: u64,
    /// Longest a request may wait for its answer, in milliseconds (also
    /// what a request that names no timeout gets).
    #[arg(long, value_name = "MS", default_value_t = l::DEFAULT_MAX_REQUEST_TIMEOUT_MS)]
    max_request_timeout_ms: u64,
    /// Per uid: bytes of memfd payloads queued in the broker for its
    /// connections.
    #[arg(long, value_name = "BYTES", default_value_t = l::DEFAULT_MEMFD_QUOTA_BYTES)]
    memfd_quota_bytes: u64,
    /// Per uid: memfd payloads queued in the broker for its connections.
    #[arg(long, value_name = "N", default_value_t = l::DEFAULT_MEMFD_QUOTA_FDS)]
    memfd_quota_fds: u32,
    /// Log level: error, warn (default), info, debug or trace. $SHMBUS_LOG
    /// sets it too. The start line is logged at every level but error. Under
    /// systemd the log goes to the journal, with fields; elsewhere to
    /// stderr, coloured only on a terminal.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<tracing::Level>,
    /// Print this manual page (roff) on standard output and exit.
    #[arg(long, hide = true)]
    man: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.man {
        let man = clap_mangen::Man::new(<Args as clap::CommandFactory>::command());
        return match man.render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shmbusd: cannot write the manual page: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let level = args
        .log_level
        .or_else(|| std::env::var("SHMBUS_LOG").ok().and_then(|s| s.parse().ok()))
        .unwrap_or(tracing::Level::WARN);
    daemon::init_logging(level);

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
    // Before anything is bound: a TERM from here on is a clean stop.
    match daemon::signals::Signals::install() {
        Ok(s) => cfg.signals = Some(s),
        Err(e) => {
            eprintln!("shmbusd: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    }
    match systemd::listener_from_env() {
        Ok(fd) => cfg.listen_fd = fd,
        Err(e) => {
            eprintln!("shmbusd: socket activation: {e}");
            return ExitCode::FAILURE;
        }
    }
    let access = SocketAccess {
        mode: args.socket_mode.unwrap_or(daemon::config::DEFAULT_SOCKET_MODE),
        group: args.socket_group,
    };
    if !matches!(address, Address::Path(_)) && (args.socket_mode.is_some() || args.socket_group.is_some()) {
        eprintln!(
            "shmbusd: --socket-mode and --socket-group are for a path socket; {address} is abstract (it has \
             no file: who may connect is the uid policy's to say)"
        );
        return ExitCode::from(2);
    }
    let activated = cfg.listen_fd.is_some();
    // The socket file this broker made, if it made one: removed again at a
    // clean exit, unless another broker has since put its own there.
    let mut made: Option<MadeSocket> = None;
    if !activated {
        match daemon::config::listen(&address, access) {
            Ok((fd, dir)) => {
                cfg.listen_fd = Some(fd);
                if let (Address::Path(path), Some(dir)) = (&address, dir) {
                    made = MadeSocket::note(dir, path);
                }
            }
            Err(e) => {
                eprintln!("shmbusd: cannot serve {address}: {}", bind_hint(&address, &e));
                return ExitCode::FAILURE;
            }
        }
    }
    // What the service manager passed is named by what it is; a socket
    // made here by the address given (it is bound by its bare file name
    // in its directory: `daemon::config::listen`).
    let listening = cfg
        .listen_fd
        .as_ref()
        .filter(|_| activated)
        .and_then(|fd| shmbus_proto::sys::socket::local_address(std::os::fd::AsFd::as_fd(fd)).ok().flatten())
        .unwrap_or_else(|| address.clone());
    let who = clients_line(&args.allow_uid, args.allow_all_uids, args.policy.is_some());
    for uid in args.allow_uid {
        cfg.bus.policy.allow_uid(uid);
    }
    if args.allow_all_uids {
        cfg.bus.policy.allow_all();
    }
    if let Some(path) = args.policy {
        match daemon::policy_file::load(&path) {
            Ok(rules) => cfg.bus.rules = Some(rules),
            Err(e) => {
                eprintln!("shmbusd: bad policy file: {e}");
                return ExitCode::from(2);
            }
        }
        cfg.policy_path = Some(path);
    }
    let bus = &mut cfg.bus;
    bus.queue.bytes = args.queue_bytes.max(1);
    bus.queue.frames = args.queue_frames.max(1);
    bus.queue.fds = args.queue_fds.max(1);
    bus.max_subscriptions = args.max_subscriptions;
    // A channel grant carries 3 fds and a packet at most 4: a smaller
    // window could never send one.
    bus.fd_window = args.fd_window.max(l::MAX_FDS_PER_PACKET as u32);
    bus.max_readers_per_channel = args.max_readers_per_channel;
    bus.max_readers_per_channel_per_uid = args.max_readers_per_channel_per_uid;
    bus.hello_timeout = Duration::from_millis(args.hello_timeout_ms);
    bus.link_capacity = (!args.no_shared_memory).then_some(args.link_capacity);
    let limits = &mut bus.uid_limits;
    limits.set(Resource::Connections, args.max_connections_per_uid.into());
    limits.set(Resource::QueuedBytes, args.uid_queue_bytes);
    limits.set(Resource::QueuedFds, args.uid_queue_fds);
    limits.set(Resource::UnackedFds, args.uid_unacked_fds);
    limits.set(Resource::Subscriptions, args.uid_subscriptions);
    limits.set(Resource::RouterBytes, args.uid_router_bytes);
    limits.set(Resource::Channels, args.uid_channels);
    limits.set(Resource::ChannelReaders, args.uid_channel_readers);
    limits.set(Resource::RingBytes, args.uid_ring_bytes);
    limits.set(Resource::MemfdBytes, args.memfd_quota_bytes);
    limits.set(Resource::MemfdFds, args.memfd_quota_fds.into());
    limits.set(Resource::Names, args.uid_names);
    limits.set(Resource::PendingRequests, args.uid_pending_requests);
    bus.max_request_timeout = Duration::from_millis(args.max_request_timeout_ms.max(1));
    bus.close_grace = Duration::from_secs(2);
    let policy = cfg.policy_path.as_ref().map_or("none".to_owned(), |p| p.display().to_string());
    let socket = match (&listening, activated) {
        (_, true) => "; socket from the service manager".to_owned(),
        (Address::Path(_), false) => match access.group {
            Some(g) => format!("; socket mode {:04o}, group {g}", access.mode),
            None => format!("; socket mode {:04o}", access.mode),
        },
        (Address::Abstract(_), false) => String::new(),
    };
    tracing::info!(
        target: daemon::START_TARGET,
        "shmbusd {} listening on {listening} (pid {}; clients: {who}; policy: {policy}{socket})",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    let result = daemon::run(cfg);
    if let Some(m) = made {
        m.remove();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shmbusd: cannot serve {address}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The socket file this broker made: its directory, as opened for the
/// bind (`daemon::config::listen`), and the file's name and identity in it. Removing it goes through
/// the directory fd, so no rename or symlink of the path's directories
/// since can point the removal at another directory; and only a file still
/// the one it made (same device and inode, the name itself, not a symlink
/// it may now be) is removed.
struct MadeSocket {
    dir: std::os::fd::OwnedFd,
    name: std::ffi::OsString,
    id: (u64, u64),
}

impl MadeSocket {
    fn note(dir: std::os::fd::OwnedFd, path: &std::path::Path) -> Option<MadeSocket> {
        use rustix::fs::AtFlags;
        let name = path.file_name()?.to_owned();
        let st = rustix::fs::statat(&dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW).ok()?;
        Some(MadeSocket { dir, name, id: (st.st_dev, st.st_ino) })
    }

    fn remove(self) {
        use rustix::fs::AtFlags;
        let same = rustix::fs::statat(&self.dir, self.name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| (st.st_dev, st.st_ino) == self.id);
        if same {
            let _ = rustix::fs::unlinkat(&self.dir, self.name.as_os_str(), AtFlags::empty());
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

/// Who may connect, in words, for the start line.
fn clients_line(allowed: &[u32], all: bool, policy_file: bool) -> String {
    if policy_file {
        return "as the policy file says".to_owned();
    }
    if all {
        return "every uid that can reach the socket".to_owned();
    }
    let me = rustix::process::getuid().as_raw();
    let mut s =
        if me == 0 { "uid 0 (the broker's)".to_owned() } else { format!("uid 0 and the broker's uid {me}") };
    let more: Vec<String> = allowed.iter().filter(|&&u| u != 0 && u != me).map(u32::to_string).collect();
    if !more.is_empty() {
        s.push_str(&format!(", and uid {}", more.join(", ")));
    }
    s
}

/// A bind error, with what to do about the usual ones.
fn bind_hint(address: &Address, e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match (address, e.kind()) {
        (_, K::AddrInUse) => {
            format!("{e} (another broker listens there: stop it, or give another --address)")
        }
        (Address::Path(p), K::NotFound) => format!(
            "{e} (the directory {} does not exist; an abstract address starts with `@`)",
            p.parent().map_or_else(|| "?".into(), |d| d.display().to_string())
        ),
        (Address::Path(_), K::PermissionDenied) => {
            format!("{e} (the broker may not create a file there; an abstract address starts with `@`)")
        }
        _ => e.to_string(),
    }
}

/// A file mode in octal: 0666, 660, 0o600.
fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{s:?} is not a file mode: octal, 0000 to 0777 (such as 0660)")),
    }
}

fn parse_link_capacity(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if shmbus_proto::link::layout::valid_capacity(n) {
        Ok(n)
    } else {
        Err("a power of two from 262144 (256 KiB) to 16777216 (16 MiB)".into())
    }
}
