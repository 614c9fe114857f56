//! A path socket made in its directory (`daemon::config::listen` changes
//! into the socket's directory for the bind): the broker still names its
//! address as given, and still starts whatever its working directory.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// A directory (for a path socket, or a working directory) of permission
/// bits `mode`; removed on drop.
fn socket_dir(tag: &str, mode: u32) -> TempDir {
    TempDir::with_mode(&format!("att-listen-{tag}"), mode)
}

/// Waits (bounded) until something listens at `path`, failing if `guard`'s
/// broker exits first.
fn wait_listening(path: &std::path::Path, guard: &mut ChildGuard) {
    let addr = shmbus::Address::parse(path.to_str().unwrap()).unwrap();
    let start = std::time::Instant::now();
    while shmbus_proto::sys::socket::connect(&addr).is_err() {
        if let Some(status) = guard.0.as_mut().unwrap().try_wait().unwrap() {
            let out = guard.0.take().unwrap().wait_with_output().unwrap();
            panic!("shmbusd exited before listening: {status}: {}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(start.elapsed() < PATIENCE, "shmbusd never listened at {}", path.display());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The broker reports a path socket by its path (the start line, and
/// `shmbusctl status`), not by the bare file name it bound in the
/// directory it changed into: `getsockname` gives back the name as bound.
#[test]
fn a_path_socket_is_reported_by_its_path_not_its_file_name() {
    let dir = socket_dir("name", 0o755);
    let path = dir.join("bus.sock");
    let mut cmd = Command::new(SHMBUSD);
    cmd.arg("--address").arg(&path).args(["--log-level", "info"]).stdin(Stdio::null()).stderr(Stdio::null());
    let mut guard = ChildGuard(Some(cmd.spawn().unwrap()));
    wait_listening(&path, &mut guard);
    let mut ctl = Command::new(SHMBUSCTL);
    ctl.arg("--address").arg(&path).arg("status");
    let out = run_bounded(ctl);
    assert!(out.status.success(), "{}", stderr(&out));
    let first = stdout(&out).lines().next().unwrap_or_default().to_owned();
    assert!(first.contains(&format!(" on {},", path.display())), "{first:?}");
}

/// A broker started (by `sudo -u`, `su`, `setpriv`) in a working
/// directory its user may not search still serves an absolute path in a
/// directory it may use: the working directory has nothing to do with it.
#[test]
fn an_absolute_path_socket_does_not_need_the_working_directory() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIPPED: needs root to run the broker as another uid");
        return;
    }
    if !std::path::Path::new("/usr/bin/setpriv").exists() {
        eprintln!("SKIPPED: no setpriv");
        return;
    }
    let sockets = socket_dir("abs", 0o777);
    let path = sockets.join("bus.sock");
    // Root's, and closed to others: the broker's working directory.
    let closed = socket_dir("cwd", 0o700);
    let mut cmd = Command::new("/usr/bin/setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(world_readable_copy(SHMBUSD))
        .arg("--address")
        .arg(&path)
        .current_dir(&closed)
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard(Some(cmd.spawn().unwrap()));
    wait_listening(&path, &mut guard);
}

/// A path that ends in `/` (or `/.`) names a directory, not a socket file:
/// the broker refuses it (as the kernel's bind did), or else clients can
/// reach it by that path. It must not bind the file name without the
/// slash and report a path nobody can connect to (`ENOTDIR`).
#[test]
fn a_path_with_a_trailing_slash_is_refused_or_reachable_as_given() {
    for (tag, tail) in [("slash", "t.sock/"), ("dot", "t.sock/.")] {
        let dir = socket_dir(tag, 0o755);
        let given = format!("{}/{tail}", dir.display());
        let made = dir.join("t.sock");
        let mut cmd = Command::new(SHMBUSD);
        cmd.arg("--address").arg(&given).stdin(Stdio::null()).stderr(Stdio::null());
        let mut guard = ChildGuard(Some(cmd.spawn().unwrap()));
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = guard.0.as_mut().unwrap().try_wait().unwrap() {
                assert!(!status.success(), "{given}: {status}");
                break;
            }
            if made.exists() {
                let mut ctl = Command::new(SHMBUSCTL);
                ctl.arg("--address").arg(&given).arg("ping");
                let out = run_bounded(ctl);
                assert!(out.status.success(), "{given}: the broker listens there, but: {}", stderr(&out));
                break;
            }
            assert!(start.elapsed() < PATIENCE, "shmbusd neither exited nor listened at {given}");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
