//! The harnesses behind the fuzz targets in `fuzz_targets/`. Each module
//! is also included by path into a regression test of the main workspace
//! (`client/tests/fuzz_regressions.rs`, `broker/tests/fuzz_regressions.rs`,
//! `proto/tests/fuzz_regressions.rs`), which replays
//! `fuzz/regressions/<target>/` through the same code.

pub mod delivery;
pub mod frame;
pub mod ring;
pub mod router;
