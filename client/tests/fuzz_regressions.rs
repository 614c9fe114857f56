//! Replays the inputs in `fuzz/regressions/` (crashes the fuzz targets
//! found) and `fuzz/seeds/` through the harnesses the fuzz targets run,
//! which this file includes by path, so `cargo test` checks them without
//! cargo-fuzz or a nightly compiler. The router's are replayed in
//! `broker/tests/fuzz_regressions.rs`.

#[path = "../../fuzz/src/delivery.rs"]
mod delivery;
#[path = "../../fuzz/src/frame.rs"]
mod frame;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// The regression inputs and seeds of `target`.
fn inputs(target: &str) -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for dir in [fuzz.join("regressions").join(target), fuzz.join("seeds").join(target)] {
        // A directory with nothing in it is not in git: a fresh clone lacks it.
        if !dir.exists() {
            continue;
        }
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        files.extend(entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()));
    }
    files.sort();
    assert!(!files.is_empty(), "no inputs for {target}");
    files
}

/// Runs `check` on every input of `target`, and fails naming each input
/// that panicked.
fn replay(target: &str, check: impl Fn(&[u8])) {
    let mut failed = Vec::new();
    let files = inputs(target);
    for path in &files {
        let data = std::fs::read(path).unwrap();
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(
                path.strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz"))
                    .unwrap()
                    .display()
                    .to_string(),
            );
        }
    }
    assert!(failed.is_empty(), "{target}: {} of {} inputs fail: {failed:?}", failed.len(), files.len());
}

/// One test, so that no other test of this binary opens or closes fds
/// while the delivery harness counts them.
#[test]
fn fuzz_regressions_replay() {
    replay("frame_decode", frame::run);
    replay("client_delivery", |data| delivery::run(data, true));
}
