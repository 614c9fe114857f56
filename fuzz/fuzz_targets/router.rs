//! Subscribe, unsubscribe, publish and list against the broker's router,
//! checked against a reference matcher. See `src/router.rs`.
#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use shmbus_fuzz::router::{run, Op};

/// Tokens drawn from a small alphabet, so that patterns and subjects
/// share them and match; the wildcards, the empty token and a few that
/// validation refuses among them.
const TOKENS: [&str; 14] = ["a", "b", "c", "ab", "a1", "*", ">", "", "é", "*a", "a>", " ", "\u{202e}", "x-y"];

/// A subject or pattern: mostly tokens joined with dots, sometimes any
/// string at all.
fn text(u: &mut Unstructured<'_>) -> Result<String> {
    if u.ratio(1, 16)? {
        return String::arbitrary(u);
    }
    // Up to 34 tokens: past the depth limit of 32.
    let n = if u.ratio(1, 32)? { u.int_in_range(30..=34)? } else { u.int_in_range(1..=5)? };
    let mut tokens = Vec::with_capacity(n);
    for _ in 0..n {
        tokens.push(*u.choose(&TOKENS)?);
    }
    Ok(tokens.join("."))
}

struct Ops(Vec<Op>);

/// As JSON, the form `broker/tests/fuzz_regressions.rs` replays; `cargo
/// fuzz fmt router <artifact>` prints it (see README.md, "A crash").
impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&serde_json::to_string_pretty(&self.0).map_err(|_| std::fmt::Error)?)
    }
}

impl<'a> Arbitrary<'a> for Ops {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let mut ops = Vec::new();
        u.arbitrary_loop(None, Some(256), |u| {
            // Few peers and subscription ids, so keys collide.
            let (peer, sub) = (u.int_in_range(0..=3)?, u.int_in_range(0..=3)?);
            ops.push(match u.int_in_range(0..=9)? {
                0..=3 => Op::Subscribe { pattern: text(u)?, peer, sub },
                4..=5 => Op::Unsubscribe { pattern: text(u)?, peer, sub },
                6..=8 => Op::Publish { subject: text(u)? },
                _ => Op::List { after: Option::<()>::arbitrary(u)?.map(|()| text(u)).transpose()? },
            });
            Ok(std::ops::ControlFlow::Continue(()))
        })?;
        Ok(Ops(ops))
    }
}

libfuzzer_sys::fuzz_target!(|ops: Ops| run(&ops.0));
