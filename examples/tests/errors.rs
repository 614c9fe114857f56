//! The examples tell people what went wrong: an error's Display, not its
//! Debug (`Os { code: 2, kind: NotFound, ... }`).

use std::process::{Command, Stdio};

fn run(bin: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(bin)
        .args(args)
        // A bus address nobody listens on: connecting fails at once.
        .env("SHMBUS_ADDRESS", format!("@shmbus-examples-test-nobody-{}", std::process::id()))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_missing_file_is_named_not_debug_printed() {
    let (code, err) = run(env!("CARGO_BIN_EXE_send_file"), &["files.x", "/nonexistent/shmbus-example-file"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("send_file: error: cannot open /nonexistent/shmbus-example-file"), "{err}");
    assert!(!err.contains("Os {"), "{err}");
}

#[test]
fn an_unreachable_bus_is_said_in_words() {
    for bin in [env!("CARGO_BIN_EXE_publisher"), env!("CARGO_BIN_EXE_subscriber")] {
        let (code, err) = run(bin, &[]);
        assert_eq!(code, Some(1), "{bin}: {err}");
        assert!(err.contains(": error: ") && err.contains("shmbus-examples-test-nobody"), "{bin}: {err}");
        assert!(!err.contains("Os {") && !err.contains("Unreachable"), "{bin}: {err}");
    }
}

#[test]
fn a_bad_count_says_what_was_wanted() {
    let (code, err) = run(env!("CARGO_BIN_EXE_publisher"), &["kitchen", "lots"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("COUNT must be a number, not \"lots\""), "{err}");
}
