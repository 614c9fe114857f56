//! The README's quick start, run exactly as written.
//!
//! A newcomer follows the README top to bottom, so its quick start must
//! run in order without a stumble. This test takes the first ```sh block
//! under `## Quick start` from README.md and runs it with `bash -e -o
//! pipefail` in an empty directory, with the freshly built `shmbusd` and
//! `shmbusctl` first on `PATH` and `SHMBUS_ADDRESS` set to a private bus.
//! The script runs in a process group of its own, killed whole at the
//! end (the broker it starts in the background included), and the whole
//! run is bounded, so a quick start that hangs fails here instead.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The commands of the quick start: the first ```sh block after the
/// `## Quick start` heading.
fn quick_start(readme: &str) -> String {
    let section = readme.split("\n## Quick start").nth(1).expect("README.md has a `## Quick start` section");
    let section = section.split("\n## ").next().unwrap_or(section);
    let block = section.split("```sh\n").nth(1).expect("the quick start has a ```sh block");
    block.split("\n```").next().expect("the block ends").to_owned()
}

/// Kills the script's whole process group when the test ends, however it
/// ends.
struct Group {
    pgid: i32,
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pgid) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

#[test]
fn the_readme_quick_start_runs_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let script = quick_start(&readme);
    assert!(script.contains("shmbusd"), "the quick start starts a broker:\n{script}");

    let address = unique_address("readme");
    // The script's working directory, removed after its process group
    // is killed (declared before `Group`, dropped after it).
    let dir = TempDir::new("readme");
    let bin = Path::new(SHMBUSD).parent().unwrap();
    assert!(bin.join("shmbusctl").exists(), "shmbusctl is built beside shmbusd");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());

    let mut cmd = Command::new("bash");
    cmd.args(["-e", "-o", "pipefail", "-c", &script])
        .current_dir(&dir)
        .env("PATH", path)
        .env("SHMBUS_ADDRESS", &address)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = cmd.spawn().expect("bash");
    let _group = Group { pgid: child.id() as i32 };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let limit = Duration::from_secs(120);
    let out = rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| panic!("the quick start did not finish within {limit:?}:\n{script}"))
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "the quick start failed ({}):\n--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    // What the README says the reader will see.
    for line in ["sensors.kitchen.temp 21.5", "same bytes", "video.frames frame"] {
        assert!(
            stdout.contains(line),
            "the quick start printed no {line:?}:\n{stdout}\n--- stderr\n{stderr}"
        );
    }
}
