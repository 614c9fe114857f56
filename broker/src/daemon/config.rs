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
    /// The signal pipes, if installed already (`shmbusd` does, before it
    /// listens); else the reactor installs them.
    pub signals: Option<crate::daemon::signals::Signals>,
}

impl Config {
    pub fn new(address: Address) -> Config {
        let bus = BusConfig::new(address.to_string(), rustix::process::getuid().as_raw());
        Config { address, listen_fd: None, bus, policy_path: None, signals: None }
    }
}

/// Who may use a path socket, beyond the uid policy: its file mode and
/// group. (An abstract socket has no file; these do not apply.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits of the socket file. Connecting needs write
    /// permission, so 0666 lets every local user reach the broker, whose
    /// uid policy (or policy file) then decides who is admitted: the
    /// default, as for the D-Bus system socket.
    pub mode: u32,
    /// Group of the socket file (with a mode such as 0660, who may reach
    /// it); `None` leaves the broker's own.
    pub group: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> SocketAccess {
        SocketAccess { mode: DEFAULT_SOCKET_MODE, group: None }
    }
}

/// Default mode of a path socket (see [`SocketAccess::mode`]).
pub const DEFAULT_SOCKET_MODE: u32 = 0o666;

/// Binds and listens on `address` as the broker does. A path socket is
/// created with no permissions for anyone but its owner, then given
/// `access`'s group and mode, so it is never reachable by more users than
/// asked for, not even for a moment.
///
/// A path socket is made in its directory as opened once, before the bind:
/// every step (the bind, the stale-socket check, the group and mode) names
/// the file relative to that directory (the working directory of a thread
/// that has one of its own), and the directory is returned
/// for the removal at exit. So a user who can rename the path's
/// directories (swap one for a symlink to another, in a loop) cannot point
/// any step, nor the removal, at a file in another directory.
pub fn listen(address: &Address, access: SocketAccess) -> std::io::Result<(OwnedFd, Option<OwnedFd>)> {
    let Address::Path(path) = address else {
        return Ok((shmbus_proto::sys::socket::listen(address, 1024)?, None));
    };
    use rustix::fs::{Mode, OFlags};
    // `file_name` and `parent` read "d/s/" and "d/s/." as "d/s": a path
    // that does not end in its file name names a directory (the bind of
    // the whole path failed on it), not a socket a client could reach.
    let name = path
        .file_name()
        .filter(|n| {
            use std::os::unix::ffi::OsStrExt;
            path.as_os_str().as_bytes().ends_with(n.as_bytes())
        })
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{} names no file", path.display()))
        })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    let open_dir = |p: &std::path::Path| {
        rustix::fs::open(p, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(|e| {
            std::io::Error::new(std::io::Error::from(e).kind(), format!("cannot open {}: {e}", p.display()))
        })
    };
    let dir = open_dir(parent)?;
    // In a thread with a working directory of its own: the process's is
    // never changed, so nothing has to go back to it (it may be one the
    // broker's user cannot enter again, under `sudo -u`, say).
    let made = std::thread::scope(|s| {
        s.spawn(|| {
            shmbus_proto::sys::sched::own_working_directory()?;
            rustix::process::fchdir(&dir)?;
            in_dir(&Address::Path(std::path::PathBuf::from(name)), std::path::Path::new(name), access, path)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the thread making the socket panicked")))
    });
    let fd = made?;
    Ok((fd, Some(dir)))
}

/// [`listen`]'s steps in the socket's directory (the working directory):
/// `local` is the file's name there, `shown` its path as given.
fn in_dir(
    address: &Address,
    local: &std::path::Path,
    access: SocketAccess,
    shown: &std::path::Path,
) -> std::io::Result<OwnedFd> {
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let fd = shmbus_proto::sys::socket::listen(address, 1024);
    rustix::process::umask(old);
    let fd = fd?;
    let fail = |what: String, e: std::io::Error| {
        let _ = std::fs::remove_file(local);
        std::io::Error::new(e.kind(), format!("{what} of {}: {e}", shown.display()))
    };
    if let Some(gid) = access.group {
        let gid = rustix::process::Gid::from_raw(gid);
        rustix::fs::chownat(rustix::fs::CWD, local, None, Some(gid), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| fail(format!("cannot set the group {}", gid.as_raw()), e.into()))?;
    }
    rustix::fs::chmod(local, rustix::fs::Mode::from_raw_mode(access.mode))
        .map_err(|e| fail(format!("cannot set the mode {:04o}", access.mode), e.into()))?;
    Ok(fd)
}

/// A uid given as a number or a user name (looked up in /etc/passwd).
pub fn parse_uid(s: &str) -> Result<u32, String> {
    parse_id(s, "/etc/passwd", "user")
}

/// A gid given as a number or a group name (looked up in /etc/group).
pub fn parse_gid(s: &str) -> Result<u32, String> {
    parse_id(s, "/etc/group", "group")
}

fn parse_id(s: &str, db: &str, what: &str) -> Result<u32, String> {
    if let Ok(n) = s.parse::<u32>() {
        return Ok(n);
    }
    if s.is_empty() || s.starts_with(|c: char| c.is_ascii_digit() || c == '-' || c == '+') {
        return Err(format!("{s:?} is neither a number nor a {what} name"));
    }
    let text = std::fs::read_to_string(db).map_err(|e| format!("cannot read {db} to look up {s:?}: {e}"))?;
    lookup_id(&text, s).ok_or_else(|| format!("no {what} named {s:?} in {db}"))
}

/// The id of the entry named `name` in the text of /etc/passwd or
/// /etc/group (`name:password:id:...` lines; comments and blank lines
/// skipped). Names served by NSS alone (LDAP, systemd's dynamic users) are
/// not found: give their number.
pub fn lookup_id(db: &str, name: &str) -> Option<u32> {
    db.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let mut fields = line.split(':');
        let entry = fields.next()?;
        let id = fields.nth(1)?;
        (entry == name).then(|| id.trim().parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/bash
# a comment:x:7:7
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin

nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
broken:x:notanumber:1::/:
";
    const GROUP: &str = "root:x:0:\nadm:x:4:syslog,alice\nnogroup:x:65534:\n";

    #[test]
    fn names_are_looked_up_in_passwd_and_group_text() {
        assert_eq!(lookup_id(PASSWD, "nobody"), Some(65534));
        assert_eq!(lookup_id(PASSWD, "root"), Some(0));
        assert_eq!(lookup_id(PASSWD, "daemon"), Some(1));
        assert_eq!(lookup_id(GROUP, "adm"), Some(4));
        assert_eq!(lookup_id(GROUP, "nogroup"), Some(65534));
    }

    #[test]
    fn unknown_commented_partial_and_broken_entries_are_not_found() {
        assert_eq!(lookup_id(PASSWD, "alice"), None);
        assert_eq!(lookup_id(PASSWD, "# a comment"), None);
        assert_eq!(lookup_id(PASSWD, "broken"), None);
        assert_eq!(lookup_id(PASSWD, ""), None);
        assert_eq!(lookup_id(PASSWD, "nob"), None);
        assert_eq!(lookup_id("lonely", "lonely"), None);
    }

    #[test]
    fn numbers_pass_as_they_are_and_names_need_the_database() {
        assert_eq!(parse_uid("1000"), Ok(1000));
        assert_eq!(parse_gid("0"), Ok(0));
        assert!(parse_uid("-1").unwrap_err().contains("neither a number nor a user name"));
        // Every system has root in /etc/passwd and /etc/group.
        assert_eq!(parse_uid("root"), Ok(0));
        assert_eq!(parse_gid("root"), Ok(0));
        let e = parse_uid("no-such-user-here").unwrap_err();
        assert!(e.contains("no user named") && e.contains("/etc/passwd"), "{e}");
    }
}
