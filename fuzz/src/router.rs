//! The `router` harness: sequences of subscribe, unsubscribe, publish and
//! listing operations against the broker's router, checked after every
//! step against a plain list and the reference matcher
//! `shmbus_proto::subject::pattern_matches`. Every string also goes
//! through both validators, valid or not; only what they accept reaches
//! the router, as in the broker.
//!
//! Shared by the fuzz target (which makes the operations with `arbitrary`)
//! and by `broker/tests/fuzz_regressions.rs`, which includes this file by
//! path and replays operations saved as JSON: it uses only the broker's
//! own dependencies.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use shmbus_broker::bus::router::{cost, Router};
use shmbus_proto::subject::{pattern_matches, validate_pattern, validate_subject};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Subscribe {
        pattern: String,
        peer: u8,
        sub: u8,
    },
    Unsubscribe {
        pattern: String,
        peer: u8,
        sub: u8,
    },
    Publish {
        subject: String,
    },
    /// Lists the distinct patterns after this one (`None`: all).
    List {
        after: Option<String>,
    },
}

type Key = (u64, u32);

/// Both validators on `s`, which must agree with each other; returns
/// whether `s` is a valid pattern and whether it is a valid subject.
fn validate(s: &str) -> (bool, bool) {
    let pattern = validate_pattern(s).is_ok();
    let subject = validate_subject(s).is_ok();
    if subject {
        assert!(pattern, "{s:?} is a subject but not a pattern");
        assert!(pattern_matches(s, s), "{s:?} does not match itself");
    }
    (pattern, subject)
}

/// Runs `ops`; panics on a bug.
pub fn run(ops: &[Op]) {
    let mut router = Router::<Key>::new();
    // The reference: every (pattern, key) held, and how many keys each
    // distinct pattern holds.
    let mut held: BTreeSet<(String, Key)> = BTreeSet::new();
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let mut out = Vec::new();
    for op in ops {
        match op {
            Op::Subscribe { pattern, peer, sub } => {
                if !validate(pattern).0 {
                    continue;
                }
                assert!(cost(pattern) > 0);
                let key = (u64::from(*peer), u32::from(*sub));
                router.insert(pattern, key);
                if held.insert((pattern.clone(), key)) {
                    *counts.entry(pattern.clone()).or_default() += 1;
                }
            }
            Op::Unsubscribe { pattern, peer, sub } => {
                if !validate(pattern).0 {
                    continue;
                }
                let key = (u64::from(*peer), u32::from(*sub));
                let was = held.remove(&(pattern.clone(), key));
                assert_eq!(router.remove(pattern, key), was, "remove {pattern:?} {key:?}");
                if was {
                    let n = counts.get_mut(pattern).expect("counted");
                    *n -= 1;
                    if *n == 0 {
                        counts.remove(pattern);
                    }
                }
            }
            Op::Publish { subject } => {
                if !validate(subject).1 {
                    continue;
                }
                out.clear();
                router.matches(subject, &mut out);
                out.sort_unstable();
                let mut expected: Vec<Key> =
                    held.iter().filter(|(p, _)| pattern_matches(p, subject)).map(|&(_, k)| k).collect();
                expected.sort_unstable();
                assert_eq!(out, expected, "subscribers of {subject:?}");
            }
            Op::List { after } => {
                let got: Vec<(String, u32)> =
                    router.patterns_after(after.as_deref()).map(|(p, n)| (p.to_owned(), n)).collect();
                let expected: Vec<(String, u32)> = counts
                    .iter()
                    .filter(|(p, _)| after.as_deref() < Some(p.as_str()))
                    .map(|(p, &n)| (p.clone(), n))
                    .collect();
                assert_eq!(got, expected, "patterns after {after:?}");
            }
        }
        assert_eq!(router.len(), held.len(), "subscriptions");
        assert_eq!(router.is_empty(), held.is_empty());
        assert_eq!(router.pattern_count(), counts.len(), "distinct patterns");
    }
    let all: Vec<(String, u32)> = router.patterns().map(|(p, n)| (p.to_owned(), n)).collect();
    assert_eq!(all, counts.into_iter().collect::<Vec<_>>());
}
