//! shmbusd at start: its start line, its log's form on a pipe and under
//! systemd, users by name, and the mode and group of a path socket.

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Instant;

use common::*;

#[test]
fn the_start_line_names_address_pid_and_policy_without_colour_on_a_pipe() {
    let b = Broker::launch("startline", Launch::new().capture_log());
    let log = b.wait_log("listening on");
    let line = log.lines().find(|l| l.contains("listening on")).unwrap();
    assert!(
        line.contains(&format!("shmbusd {} listening on {}", env!("CARGO_PKG_VERSION"), b.address)),
        "{line}"
    );
    assert!(line.contains(&format!("(pid {};", b.pid())), "{line}");
    assert!(line.contains("clients: uid 0") && line.contains("policy: none"), "{line}");
    // The default level is warn: the start line is there all the same,
    // once, and stderr is a pipe: no escape sequences.
    assert_eq!(log.matches("listening on").count(), 1, "{log}");
    assert!(!log.contains("\x1b["), "{log:?}");
}

#[test]
fn the_start_line_lists_users_allowed_by_name() {
    let b = Broker::launch("startnames", Launch::new().capture_log().args(&["--allow-uid", "nobody"]));
    let log = b.wait_log("listening on");
    assert!(log.contains(&format!("and uid {NOBODY};")), "{log}");
    if !needs_root("the_start_line_lists_users_allowed_by_name") {
        return;
    }
    let out = b.ctl_as(&["ping"], Some(NOBODY));
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn log_level_error_silences_the_start_line() {
    let b = Broker::launch("startquiet", Launch::new().capture_log().args(&["--log-level", "error"]));
    b.ctl(&["ping"]);
    assert_eq!(b.log(), "");
}

#[test]
fn an_unknown_user_name_is_refused_before_start() {
    let out = run_bounded({
        let mut c = Command::new(SHMBUSD);
        c.args(["--address", &unique_address("nouser"), "--allow-uid", "no-such-user-here"]);
        c
    });
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no user named \"no-such-user-here\" in /etc/passwd"), "{}", stderr(&out));
}

#[test]
fn an_unacked_fd_budget_smaller_than_one_packet_is_refused_before_start() {
    // A channel grant is one packet with up to 4 fds: a budget below that
    // could never let one through, and every channel open would stall.
    let out = run_bounded({
        let mut c = Command::new(SHMBUSD);
        c.args(["--address", &unique_address("unacked"), "--uid-unacked-fds", "3"]);
        c
    });
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--uid-unacked-fds"), "{}", stderr(&out));
}

/// Under systemd, stderr is the journal stream ($JOURNAL_STREAM names its
/// device and inode). With no journal socket to write to (as here, in a
/// container), the log stays on stderr, but bare: no timestamps, no
/// colours (journald adds its own).
#[test]
fn under_systemd_without_a_journal_the_log_has_no_timestamps() {
    if std::path::Path::new("/run/systemd/journal/socket").exists() {
        eprintln!("SKIPPED: a journal listens here; the log would go to it");
        return;
    }
    let (read, write) = rustix::pipe::pipe().unwrap();
    let st = rustix::fs::fstat(&write).unwrap();
    let address = unique_address("journal");
    let mut cmd = Command::new(SHMBUSD);
    cmd.args(["--address", &address])
        .env("JOURNAL_STREAM", format!("{}:{}", st.st_dev, st.st_ino))
        .stdin(Stdio::null())
        .stderr(Stdio::from(write));
    let child = ChildGuard(Some(cmd.spawn().unwrap()));
    drop(cmd);
    let line = first_line(read, &child);
    assert!(line.starts_with(" INFO shmbusd") || line.starts_with("INFO shmbusd"), "{line:?}");
    assert!(line.contains(&format!("listening on {address}")), "{line:?}");
}

/// The first line the process writes to `read` (bounded).
fn first_line(read: std::os::fd::OwnedFd, _child: &ChildGuard) -> String {
    use std::io::BufRead;
    bounded("the broker's first log line", move || {
        let mut line = String::new();
        std::io::BufReader::new(std::fs::File::from(read)).read_line(&mut line).unwrap();
        line
    })
}

/// A directory other uids may enter, for a path socket; removed on drop
/// (declared before the broker, it outlives it).
fn socket_dir(tag: &str) -> TempDir {
    TempDir::with_mode(&format!("sock-{tag}"), 0o755)
}

/// Starts shmbusd on `path` with `extra` flags; waits until it listens.
fn broker_on_path(path: &std::path::Path, extra: &[&str]) -> ChildGuard {
    let mut cmd = Command::new(SHMBUSD);
    cmd.arg("--address").arg(path).args(extra).stdin(Stdio::null()).stderr(Stdio::null());
    let mut guard = ChildGuard(Some(cmd.spawn().unwrap()));
    let addr = shmbus::Address::parse(path.to_str().unwrap()).unwrap();
    let start = Instant::now();
    while shmbus_proto::sys::socket::connect(&addr).is_err() {
        if let Some(status) = guard.0.as_mut().unwrap().try_wait().unwrap() {
            panic!("shmbusd exited before listening: {status}");
        }
        assert!(start.elapsed() < PATIENCE, "shmbusd never listened at {}", path.display());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    guard
}

fn ctl_at(path: &std::path::Path, uid: Option<u32>, args: &[&str]) -> std::process::Output {
    let mut cmd = match uid {
        Some(u) => command_as(SHMBUSCTL, u),
        None => Command::new(SHMBUSCTL),
    };
    cmd.arg("--address").arg(path).args(args);
    run_bounded(cmd)
}

#[test]
fn a_path_socket_is_0666_by_default_so_allowed_users_can_connect() {
    let dir = socket_dir("default");
    let path = dir.join("bus.sock");
    let _b = broker_on_path(&path, &["--allow-uid", &NOBODY.to_string()]);
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o666);
    if !needs_root("a_path_socket_is_0666_by_default_so_allowed_users_can_connect") {
        return;
    }
    let out = ctl_at(&path, Some(NOBODY), &["ping"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn socket_mode_and_group_set_who_may_reach_a_path_socket() {
    if !needs_root("socket_mode_and_group_set_who_may_reach_a_path_socket") {
        return;
    }
    let dir = socket_dir("mode");
    let path = dir.join("bus.sock");
    // Group nogroup (65534) by number: nobody's primary group in the tests.
    let _b = broker_on_path(
        &path,
        &["--socket-mode", "0660", "--socket-group", &NOBODY.to_string(), "--allow-uid", "nobody"],
    );
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!((meta.mode() & 0o7777, meta.gid()), (0o660, NOBODY));
    // nobody (gid 65534) is in the socket's group: it may connect.
    let out = ctl_at(&path, Some(NOBODY), &["ping"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // Uid 4001 (gid 4001) is not: the file mode stops it before the broker
    // sees it.
    let out = ctl_at(&path, Some(4001), &["ping"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("permission denied") && err.contains("keeps uid 4001 out"), "{err}");
}

#[test]
fn socket_mode_is_refused_for_an_abstract_address() {
    let out = run_bounded({
        let mut c = Command::new(SHMBUSD);
        c.args(["--address", &unique_address("abstractmode"), "--socket-mode", "0600"]);
        c
    });
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("for a path socket"), "{}", stderr(&out));
}

/// Stops a broker with SIGTERM and waits (bounded) for its clean exit.
fn terminate(mut guard: ChildGuard) {
    let child = guard.0.as_mut().unwrap();
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = wait_timeout(child, PATIENCE).expect("shmbusd stops on SIGTERM");
    assert!(status.success(), "{status}");
}

#[test]
fn a_clean_exit_removes_the_socket_file_it_made_and_no_other() {
    let dir = socket_dir("unlink");
    let path = dir.join("bus.sock");
    terminate(broker_on_path(&path, &[]));
    assert!(!path.exists(), "the socket file outlived its broker");

    // A live broker's path is not taken over (a second one is refused);
    // but if its file is removed and another broker binds the path anew,
    // the first one's exit leaves the new file alone.
    let first = broker_on_path(&path, &[]);
    let mut refused = Command::new(SHMBUSD);
    refused.arg("--address").arg(&path);
    let out = run_bounded(refused);
    assert!(!out.status.success(), "a second broker took a live broker's path");
    std::fs::remove_file(&path).unwrap();
    let second = broker_on_path(&path, &[]);
    terminate(first);
    assert!(path.exists(), "the first broker removed the second one's socket");
    let out = ctl_at(&path, None, &["ping"]);
    assert!(out.status.success(), "{}", stderr(&out));
    terminate(second);
    assert!(!path.exists());
}
