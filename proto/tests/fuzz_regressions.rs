//! Replays the inputs in `fuzz/regressions/ring_reader/` (crashes the
//! `ring_reader` fuzz target found, or cases written by hand) and
//! `fuzz/seeds/ring_reader/` through the harness that target runs, which
//! this file includes by path, so `cargo test` checks them without
//! cargo-fuzz or a nightly compiler. The other targets' inputs are
//! replayed in `client/tests/fuzz_regressions.rs` and
//! `broker/tests/fuzz_regressions.rs`.

#[path = "../../fuzz/src/ring.rs"]
mod ring;

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
        let found: Vec<_> = entries.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
        assert!(!found.is_empty(), "no inputs in {}", dir.display());
        files.extend(found);
    }
    files.sort();
    files
}

#[test]
fn fuzz_regressions_replay_ring_reader() {
    let files = inputs("ring_reader");
    let mut failed = Vec::new();
    for path in &files {
        let data = std::fs::read(path).unwrap();
        if catch_unwind(AssertUnwindSafe(|| ring::run(&data))).is_err() {
            failed.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(failed.is_empty(), "{} of {} inputs fail: {failed:?}", failed.len(), files.len());
}

/// The frame seeds are valid frames of the current protocol (a seed the
/// decoder turns away at its version byte or a short body fuzzes nothing
/// past that check): `make_seeds.py` is run again when a body changes
/// shape or the version moves.
#[test]
fn every_frame_seed_decodes() {
    use shmbus_proto::frame::{decode_broker, decode_client};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/frame_decode");
    let mut stale = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        // Not a frame: the payload of a delivery on $SYS.name.<name>.
        if path.file_name().is_some_and(|n| n == "name_owner_changed") {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        if decode_client(&data).is_err() && decode_broker(&data).is_err() {
            stale.push(path.display().to_string());
        }
    }
    assert!(stale.is_empty(), "seeds no decoder takes (run fuzz/seeds/make_seeds.py): {stale:?}");
}
