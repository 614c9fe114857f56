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
}
