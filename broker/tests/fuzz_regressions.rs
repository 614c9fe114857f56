//! Replays `fuzz/regressions/router/*.json` (operation lists: crashes the
//! `router` fuzz target found, saved with `cargo fuzz fmt`, and a few
//! written by hand) through the harness that target runs, which this file
//! includes by path, so `cargo test` checks them without cargo-fuzz or a
//! nightly compiler. The other targets' inputs are replayed in
//! `client/tests/fuzz_regressions.rs`.

#[path = "../../fuzz/src/router.rs"]
mod router;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

#[test]
fn fuzz_regressions_replay_router() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/router");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no cases in {}", dir.display());
    let mut failed = Vec::new();
    for path in &files {
        let ops: Vec<router::Op> = serde_json::from_slice(&std::fs::read(path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if catch_unwind(AssertUnwindSafe(|| router::run(&ops))).is_err() {
            failed.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(failed.is_empty(), "{} of {} cases fail: {failed:?}", failed.len(), files.len());
}
