//! install.sh, staged into a temporary DESTDIR from the binaries this test
//! run built (--no-build): every file lands where the README says, the
//! units name the chosen prefix, and --dry-run touches nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../install.sh")
}

fn bin_dir() -> PathBuf {
    Path::new(SHMBUSD).parent().unwrap().to_path_buf()
}

fn stage(tag: &str) -> TempDir {
    TempDir::new(&format!("install-{tag}"))
}

#[test]
fn install_stages_binaries_units_docs_man_pages_and_completions() {
    let dest = stage("full");
    let mut cmd = Command::new("bash");
    cmd.arg(script()).args(["--no-build", "--prefix", "/opt/shmbus", "--bin-dir"]).arg(bin_dir());
    cmd.arg("--destdir").arg(&dest);
    let out = run_bounded(cmd);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let root = dest.join("opt/shmbus");
    for f in [
        "bin/shmbusd",
        "bin/shmbusctl",
        "share/doc/shmbus/README.md",
        "share/man/man1/shmbusd.1",
        "share/man/man1/shmbusctl.1",
        "share/man/man1/shmbusctl-sub.1",
        "share/bash-completion/completions/shmbusctl",
        "share/zsh/site-functions/_shmbusctl",
        "share/fish/vendor_completions.d/shmbusctl.fish",
    ] {
        assert!(root.join(f).is_file(), "{f} was not installed");
    }
    for f in [
        "etc/systemd/system/shmbus.service",
        "etc/systemd/system/shmbus.socket",
        "etc/systemd/user/shmbus.service",
        "etc/shmbus/policy.toml",
    ] {
        assert!(dest.join(f).is_file(), "{f} was not installed");
    }
    let man = std::fs::read_to_string(root.join("share/man/man1/shmbusd.1")).unwrap();
    assert!(man.contains(".TH shmbusd 1"), "{man}");
    let bash = std::fs::read_to_string(root.join("share/bash-completion/completions/shmbusctl")).unwrap();
    assert!(bash.contains("_shmbusctl"));
    // The units point at what was installed: the binary and the README.
    let service = std::fs::read_to_string(dest.join("etc/systemd/system/shmbus.service")).unwrap();
    assert!(service.contains("ExecStart=/opt/shmbus/bin/shmbusd --system"), "{service}");
    assert!(service.contains("Documentation=file:///opt/shmbus/share/doc/shmbus/README.md"), "{service}");
    assert!(!service.contains("/usr/local"), "{service}");
}

#[test]
fn install_keeps_an_existing_policy_and_dry_run_writes_nothing() {
    let dest = stage("keep");
    std::fs::create_dir_all(dest.join("etc/shmbus")).unwrap();
    std::fs::write(dest.join("etc/shmbus/policy.toml"), "# mine\n").unwrap();
    let mut cmd = Command::new("bash");
    cmd.arg(script()).args(["--no-build", "--bin-dir"]).arg(bin_dir()).arg("--destdir").arg(&dest);
    let out = run_bounded(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(dest.join("etc/shmbus/policy.toml")).unwrap(), "# mine\n");

    let dry = stage("dry");
    let mut cmd = Command::new("bash");
    cmd.arg(script()).args(["--dry-run", "--destdir"]).arg(&dry);
    let out = run_bounded(cmd);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("cargo build --release"), "{}", stdout(&out));
    assert_eq!(std::fs::read_dir(&dry).unwrap().count(), 0, "--dry-run wrote files");
}

#[test]
fn install_help_and_bad_options() {
    let mut cmd = Command::new("bash");
    cmd.arg(script()).arg("--help");
    let out = run_bounded(cmd);
    assert!(out.status.success());
    assert!(stdout(&out).contains("DESTDIR") && stdout(&out).contains("--dry-run"));
    let mut cmd = Command::new("bash");
    cmd.arg(script()).arg("--bogus");
    let out = run_bounded(cmd);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown option --bogus"), "{}", stderr(&out));
}

/// The guard every test's files under the temp directory live in takes
/// them all away when a test fails too: a socket, a tree, an unreadable
/// file.
#[test]
fn a_temp_dir_is_removed_when_its_test_panics() {
    use std::os::unix::fs::PermissionsExt;
    let made = std::sync::Mutex::new(None);
    let panicked = std::panic::catch_unwind(|| {
        let dir = TempDir::new("guard");
        *made.lock().unwrap() = Some(dir.to_path_buf());
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/b/file"), "x").unwrap();
        std::fs::set_permissions(dir.join("a/b/file"), std::fs::Permissions::from_mode(0o000)).unwrap();
        let _sock = std::os::unix::net::UnixListener::bind(dir.join("bus.sock")).unwrap();
        panic!("a failing test");
    });
    assert!(panicked.is_err());
    let made = made.into_inner().unwrap().expect("the directory was made");
    assert!(made.starts_with(std::env::temp_dir()), "{}", made.display());
    assert!(!made.exists(), "{} outlived its test", made.display());
}
