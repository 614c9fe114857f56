//! The bench runner's command line: usage, the scenario list, and bad
//! names refused before anything runs.

use std::process::Command;

const BENCHES: &str = env!("CARGO_BIN_EXE_shmbus-benches");

#[test]
fn help_lists_every_scenario_and_runs_nothing() {
    let out = Command::new(BENCHES).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("shmbus benchmarks"), "{text}");
    for name in ["all", "latency", "throughput", "link", "policy", "diag-raw-peers", "diag-link-tp", "--json"]
    {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    // The suite did not run: no result table.
    assert!(!text.contains("µs") && !text.contains("msgs/s"), "{text}");
}

#[test]
fn an_unknown_scenario_is_refused_with_the_list() {
    let out = Command::new(BENCHES).args(["latency", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("no such scenario") && err.contains("diag-link-rtt"), "{err}");
    assert!(out.stdout.is_empty());
}
