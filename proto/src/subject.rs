//! Subjects and subscription patterns, NATS style.
//!
//! A *subject* names what a message is about: tokens separated by `.`, such
//! as `sensors.kitchen.temp`. A *pattern* is what a subscriber asks for: the
//! same shape, where a token may also be `*` (exactly one token) or, as the
//! last token only, `>` (one or more remaining tokens).
//!
//! Invariants enforced here, and relied on by the broker's router:
//! - a subject or pattern is 1..=[`MAX_SUBJECT_LEN`] bytes of UTF-8;
//! - it has at most [`MAX_SUBJECT_DEPTH`] tokens (a final `>` counts as
//!   one), which bounds the router's work per publish and memory per
//!   pattern;
//! - no token is empty (no leading, trailing or doubled `.`);
//! - no token holds whitespace or a control character;
//! - a subject holds no wildcard token, and `*`/`>` never appear inside a
//!   longer token (`a*` is refused rather than guessed at);
//! - `>` is only ever the last token.
//!
//! Validation is pure and allocation-free, so both sides run it: the client
//! to fail fast with a precise error, the broker because it trusts nothing.
//!
//! Two relations between patterns let the broker's policy judge a
//! subscription by its pattern alone, without enumerating subjects:
//! [`pattern_covers`] (every subject one matches, the other matches too)
//! and [`patterns_intersect`] (some subject matches both). Both are exact
//! over subjects of any length from an unbounded alphabet of tokens, and
//! are checked against brute force over a small one. They ignore
//! [`MAX_SUBJECT_DEPTH`]: near that depth a `>` can stand for tails too
//! long to be valid subjects, so "covers" may say no and "intersect" yes
//! where the depth limit alone would decide otherwise. Both errors are on
//! the side of refusing, which is the side a policy wants.

use crate::limits::{MAX_SUBJECT_DEPTH, MAX_SUBJECT_LEN};

/// Why a subject or pattern was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject is empty")]
    Empty,
    #[error("subject is longer than {MAX_SUBJECT_LEN} bytes")]
    TooLong,
    #[error("subject has an empty token (leading, trailing or doubled '.')")]
    EmptyToken,
    #[error("subject holds whitespace or a control character")]
    BadCharacter,
    #[error("wildcards ('*', '>') are only allowed in subscription patterns")]
    WildcardInSubject,
    #[error("'*' and '>' must be whole tokens")]
    PartialWildcard,
    #[error("'>' may only be the last token")]
    TailNotLast,
    #[error("subject has more than {MAX_SUBJECT_DEPTH} tokens")]
    TooDeep,
}

fn check_common(s: &str) -> Result<(), SubjectError> {
    if s.is_empty() {
        return Err(SubjectError::Empty);
    }
    if s.len() > MAX_SUBJECT_LEN {
        return Err(SubjectError::TooLong);
    }
    // Fast path: printable ASCII without spaces needs no char decoding.
    if s.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Ok(());
    }
    if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(SubjectError::BadCharacter);
    }
    Ok(())
}

/// Checks a concrete subject, the kind a message is published to.
pub fn validate_subject(s: &str) -> Result<(), SubjectError> {
    check_common(s)?;
    for (i, token) in s.split('.').enumerate() {
        if i == MAX_SUBJECT_DEPTH {
            return Err(SubjectError::TooDeep);
        }
        if token.is_empty() {
            return Err(SubjectError::EmptyToken);
        }
        if token.contains(['*', '>']) {
            return Err(SubjectError::WildcardInSubject);
        }
    }
    Ok(())
}

/// Checks a subscription pattern, which may hold `*` and a final `>`.
pub fn validate_pattern(s: &str) -> Result<(), SubjectError> {
    check_common(s)?;
    let mut tokens = s.split('.').peekable();
    let mut depth = 0;
    while let Some(token) = tokens.next() {
        depth += 1;
        if depth > MAX_SUBJECT_DEPTH {
            return Err(SubjectError::TooDeep);
        }
        match token {
            "" => return Err(SubjectError::EmptyToken),
            "*" => {}
            ">" if tokens.peek().is_some() => return Err(SubjectError::TailNotLast),
            ">" => {}
            t if t.contains(['*', '>']) => return Err(SubjectError::PartialWildcard),
            _ => {}
        }
    }
    Ok(())
}

/// Whether a valid `pattern` matches a valid `subject`. The router does not
/// call this (it walks a trie); it is the reference the trie is tested against.
pub fn pattern_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every subject matched by `inner` is also matched by `outer`:
/// the set `outer` stands for includes the set `inner` stands for. Both
/// must be valid patterns; if either is not, the answer is `false`.
///
/// Token by token, `outer` covers `inner` when each of its tokens matches
/// at least everything the token of `inner` at the same place does: a
/// literal covers only the same literal, `*` covers a literal or `*` but not
/// `>` (which also stands for longer tails), and a final `>` covers
/// whatever non-empty tail `inner` has left. Running out of tokens on both
/// sides at once covers; on one side only does not. Nothing is allocated.
pub fn pattern_covers(outer: &str, inner: &str) -> bool {
    validate_pattern(outer).is_ok() && validate_pattern(inner).is_ok() && pattern_covers_valid(outer, inner)
}

/// [`pattern_covers`] for patterns the caller has already validated (a
/// policy's entries, checked once when the file was loaded): no
/// validation, so its cost is the tokens it compares, at most until the
/// first difference. On invalid input the answer is meaningless (but it
/// never panics).
pub fn pattern_covers_valid(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('.');
    let mut i = inner.split('.');
    loop {
        match (o.next(), i.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b && a != "*" && a != ">" => {}
            _ => return false,
        }
    }
}

/// Whether some subject is matched by both `a` and `b`. Both must be valid
/// patterns; if either is not, the answer is `false`.
///
/// Token by token: two literals must be equal, `*` meets any token, and a
/// final `>` on either side meets whatever non-empty tail the other has
/// left (that tail, being a valid pattern, matches at least one subject).
/// Both running out at once intersects; one only does not.
pub fn patterns_intersect(a: &str, b: &str) -> bool {
    validate_pattern(a).is_ok() && validate_pattern(b).is_ok() && patterns_intersect_valid(a, b)
}

/// [`patterns_intersect`] for patterns the caller has already validated,
/// as [`pattern_covers_valid`].
pub fn patterns_intersect_valid(a: &str, b: &str) -> bool {
    let mut a = a.split('.');
    let mut b = b.split('.');
    loop {
        match (a.next(), b.next()) {
            (None, None) => return true,
            (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
            (Some("*"), Some(_)) | (Some(_), Some("*")) => {}
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        assert!(validate_subject("a").is_ok());
        assert!(validate_subject("a.b.c").is_ok());
        assert_eq!(validate_subject(""), Err(SubjectError::Empty));
        assert_eq!(validate_subject("a..b"), Err(SubjectError::EmptyToken));
        assert_eq!(validate_subject(".a"), Err(SubjectError::EmptyToken));
        assert_eq!(validate_subject("a."), Err(SubjectError::EmptyToken));
        assert_eq!(validate_subject("a.*"), Err(SubjectError::WildcardInSubject));
        assert_eq!(validate_subject("a b"), Err(SubjectError::BadCharacter));
        assert_eq!(validate_subject("a\0"), Err(SubjectError::BadCharacter));
        let long = "x".repeat(MAX_SUBJECT_LEN + 1);
        assert_eq!(validate_subject(&long), Err(SubjectError::TooLong));
    }

    #[test]
    fn patterns() {
        assert!(validate_pattern("a.*.c").is_ok());
        assert!(validate_pattern(">").is_ok());
        assert!(validate_pattern("a.>").is_ok());
        assert_eq!(validate_pattern("a.>.b"), Err(SubjectError::TailNotLast));
        assert_eq!(validate_pattern("a*"), Err(SubjectError::PartialWildcard));
        assert_eq!(validate_pattern("a.b>"), Err(SubjectError::PartialWildcard));
    }

    /// `n` tokens `t0.t1.…`, or `*`/`>` in place of the last ones.
    fn deep(n: usize, last: &str) -> String {
        let mut v: Vec<String> = (0..n - 1).map(|i| format!("t{i}")).collect();
        v.push(last.into());
        v.join(".")
    }

    #[test]
    fn depth_limit() {
        let max = MAX_SUBJECT_DEPTH;
        assert!(validate_subject(&deep(max, "x")).is_ok());
        assert_eq!(validate_subject(&deep(max + 1, "x")), Err(SubjectError::TooDeep));
        // The shortest subject too deep, well inside the byte limit.
        let dots = vec!["a"; max + 1].join(".");
        assert!(dots.len() < MAX_SUBJECT_LEN);
        assert_eq!(validate_subject(&dots), Err(SubjectError::TooDeep));
        for last in ["x", "*", ">"] {
            assert!(validate_pattern(&deep(max, last)).is_ok(), "{last}");
            assert_eq!(validate_pattern(&deep(max + 1, last)), Err(SubjectError::TooDeep), "{last}");
        }
        // `>` counts as a token; so does `*`.
        assert_eq!(validate_pattern(&vec!["*"; max + 1].join(".")), Err(SubjectError::TooDeep));
        assert!(validate_pattern(&vec!["*"; max].join(".")).is_ok());
        assert!(SubjectError::TooDeep.to_string().contains(&max.to_string()));
    }

    #[test]
    fn matching() {
        assert!(pattern_matches("a.b", "a.b"));
        assert!(!pattern_matches("a.b", "a.b.c"));
        assert!(pattern_matches("a.*", "a.b"));
        assert!(!pattern_matches("a.*", "a.b.c"));
        assert!(!pattern_matches("a.*", "a"));
        assert!(pattern_matches("a.>", "a.b.c"));
        assert!(!pattern_matches("a.>", "a"));
        assert!(pattern_matches(">", "x"));
        assert!(pattern_matches("*.b.>", "a.b.c.d"));
    }
    #[test]
    fn covering() {
        // Equal patterns cover each other.
        for p in ["a", "a.b", "a.*", "*", ">", "a.>", "*.b.>"] {
            assert!(pattern_covers(p, p), "{p}");
        }
        assert!(pattern_covers(">", "*.>"));
        assert!(!pattern_covers("*.>", ">"), "`>` matches `a`, `*.>` does not");
        assert!(pattern_covers("a.>", "a.*"));
        assert!(!pattern_covers("a.*", "a.>"));
        assert!(pattern_covers(">", "*"));
        assert!(!pattern_covers("*", ">"));
        assert!(pattern_covers("*", "a"));
        assert!(!pattern_covers("a", "*"));
        assert!(pattern_covers("a.*", "a.b"));
        assert!(!pattern_covers("a.b", "a.b.c"));
        assert!(!pattern_covers("a.b.c", "a.b"));
        assert!(!pattern_covers("a.>", "a"));
        assert!(pattern_covers("a.>", "a.b.c.>"));
        assert!(pattern_covers("*.*.>", "a.*.b.>"));
        assert!(!pattern_covers("*.*.>", "a.>"));
        assert!(!pattern_covers("a.b", "a.c"));
        // Invalid patterns cover nothing and are covered by nothing.
        assert!(!pattern_covers(">", "a..b"));
        assert!(!pattern_covers("a.>.b", "a.b.b"));
        assert!(!pattern_covers("", ""));
    }

    #[test]
    fn intersecting() {
        for p in ["a", "a.b", "a.*", "*", ">", "a.>"] {
            assert!(patterns_intersect(p, p), "{p}");
        }
        assert!(patterns_intersect(">", "*.>"));
        assert!(patterns_intersect("a.*", "a.>"));
        assert!(patterns_intersect("*", ">"));
        assert!(patterns_intersect("a.*.c", "*.b.>"));
        assert!(!patterns_intersect("a.*", "a"));
        assert!(!patterns_intersect("a.>", "a"));
        assert!(!patterns_intersect("a.*", "a.b.c"));
        assert!(!patterns_intersect("a.b", "a.c"));
        assert!(!patterns_intersect("*", "a.b"));
        assert!(!patterns_intersect("a.*.c", "a.b.d.>"));
        assert!(!patterns_intersect(">", "a*"));
        assert!(!patterns_intersect("", ""));
    }

    mod oracle {
        use super::super::*;
        use proptest::prelude::*;

        /// Every subject of 1..=5 tokens over {a, b, c}. Patterns below use
        /// only `a` and `b` as literals, so `c` stands for "any other token",
        /// and 5 is one token longer than any pattern, so the difference a
        /// `>` makes (tails of any length) already shows.
        fn subjects() -> Vec<String> {
            let mut all = Vec::new();
            let mut level = vec![String::new()];
            for _ in 0..5 {
                let mut next = Vec::new();
                for prefix in &level {
                    for t in ["a", "b", "c"] {
                        next.push(if prefix.is_empty() { t.to_string() } else { format!("{prefix}.{t}") });
                    }
                }
                all.extend(next.iter().cloned());
                level = next;
            }
            all
        }

        /// Valid patterns of 1..=4 tokens over {a, b, *}, maybe ending in `>`.
        fn pattern() -> impl Strategy<Value = String> {
            (prop::collection::vec(prop::sample::select(vec!["a", "b", "*"]), 0..=4), any::<bool>())
                .prop_filter_map("1..=4 tokens", |(mut tokens, tail)| {
                    if tail || tokens.is_empty() {
                        tokens.push(">");
                    }
                    (tokens.len() <= 4).then(|| tokens.join("."))
                })
        }

        proptest! {
            #[test]
            fn covers_agrees_with_enumeration(outer in pattern(), inner in pattern()) {
                let expected = subjects()
                    .iter()
                    .all(|s| !pattern_matches(&inner, s) || pattern_matches(&outer, s));
                prop_assert_eq!(pattern_covers(&outer, &inner), expected);
            }

            #[test]
            fn intersect_agrees_with_enumeration(a in pattern(), b in pattern()) {
                let expected = subjects().iter().any(|s| pattern_matches(&a, s) && pattern_matches(&b, s));
                prop_assert_eq!(patterns_intersect(&a, &b), expected);
                prop_assert_eq!(patterns_intersect(&b, &a), expected);
            }
        }
    }
}
