//! The router: which subscriptions match a subject.
//!
//! Model: a trie keyed by subject token. A subscription `a.*.c` lives at the
//! node reached by `a`, then the `*` edge, then `c`; a subscription ending in
//! `>` lives in the `tail` list of the node before the `>`. Matching walks
//! the subject's tokens once, following at each node both the literal edge
//! and the `*` edge and collecting `tail` lists on the way, so a publish
//! costs the subject's depth (times the fan-out of `*` branches actually
//! present), not the number of subscriptions.
//!
//! Invariants: every key appears at most once per pattern node; empty nodes
//! are pruned on removal, so the trie's size is bounded by what is
//! subscribed. Patterns reaching here were validated by
//! `shmbus_proto::subject::validate_pattern`. No I/O: the broker owns the
//! sockets, the router only names `(connection slot, subscription id)`.

use std::collections::HashMap;

use std::collections::BTreeMap;

#[derive(Debug)]
struct Node<K> {
    children: HashMap<Box<str>, Node<K>>,
    star: Option<Box<Node<K>>>,
    /// Subscriptions whose pattern ends exactly here.
    exact: Vec<K>,
    /// Subscriptions whose pattern is this node's path followed by `>`.
    tail: Vec<K>,
}

impl<K> Default for Node<K> {
    fn default() -> Self {
        Node { children: HashMap::new(), star: None, exact: Vec::new(), tail: Vec::new() }
    }
}

impl<K> Node<K> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.star.is_none() && self.exact.is_empty() && self.tail.is_empty()
    }
}

/// Subscription trie plus a count per distinct pattern (for introspection).
#[derive(Debug)]
pub struct Router<K> {
    root: Node<K>,
    patterns: BTreeMap<Box<str>, u32>,
    subscriptions: usize,
}

impl<K> Default for Router<K> {
    fn default() -> Self {
        Router { root: Node::default(), patterns: BTreeMap::new(), subscriptions: 0 }
    }
}

impl<K: Copy + Eq> Router<K> {
    pub fn new() -> Router<K> {
        Router::default()
    }

    /// Upper bound of the router memory one subscription adds.
    pub fn cost(pattern: &str) -> u64 {
        (pattern.len() + pattern.split('.').count() * 160 + 64) as u64
    }

    /// Distinct patterns after `after`, in order, with their counts.
    pub fn patterns_after<'a>(&'a self, after: Option<&str>) -> impl Iterator<Item = (&'a str, u32)> + 'a {
        use std::ops::Bound;
        let start: Bound<Box<str>> = match after {
            Some(a) => Bound::Excluded(a.into()),
            None => Bound::Unbounded,
        };
        self.patterns.range::<Box<str>, _>((start, Bound::Unbounded)).map(|(p, c)| (&**p, *c))
    }

    /// Adds `key` under `pattern`.
    pub fn insert(&mut self, pattern: &str, key: K) {
        let mut node = &mut self.root;
        let mut tokens = pattern.split('.').peekable();
        while let Some(t) = tokens.next() {
            if t == ">" && tokens.peek().is_none() {
                node.tail.push(key);
                self.finish_insert(pattern);
                return;
            }
            node = if t == "*" {
                node.star.get_or_insert_with(Default::default)
            } else {
                node.children.entry(t.into()).or_default()
            };
        }
        node.exact.push(key);
        self.finish_insert(pattern);
    }

    fn finish_insert(&mut self, pattern: &str) {
        *self.patterns.entry(pattern.into()).or_insert(0) += 1;
        self.subscriptions += 1;
    }

    /// Removes `key` from `pattern`. Returns whether it was there.
    pub fn remove(&mut self, pattern: &str, key: K) -> bool {
        let tokens: Vec<&str> = pattern.split('.').collect();
        let removed = remove_at(&mut self.root, &tokens, key);
        if removed {
            self.subscriptions -= 1;
            if let Some(c) = self.patterns.get_mut(pattern) {
                *c -= 1;
                if *c == 0 {
                    self.patterns.remove(pattern);
                }
            }
        }
        removed
    }

    /// Appends every subscription matching `subject` to `out`.
    pub fn matches(&self, subject: &str, out: &mut Vec<K>) {
        // Subjects are at most MAX_SUBJECT_LEN bytes, so at most 513 tokens.
        let mut tokens: smallvec_tokens::Tokens<'_> = smallvec_tokens::Tokens::new(subject);
        collect(&self.root, tokens.as_slice(), out);
        tokens.clear();
    }

    /// Number of subscriptions held.
    pub fn len(&self) -> usize {
        self.subscriptions
    }

    pub fn is_empty(&self) -> bool {
        self.subscriptions == 0
    }

    /// Number of distinct patterns.
    pub fn pattern_count(&self) -> usize {
        self.patterns.len()
    }

    /// Each distinct pattern with how many subscriptions hold it.
    pub fn patterns(&self) -> impl Iterator<Item = (&str, u32)> {
        self.patterns.iter().map(|(p, c)| (&**p, *c))
    }
}

fn collect<K: Copy>(node: &Node<K>, tokens: &[&str], out: &mut Vec<K>) {
    let Some((first, rest)) = tokens.split_first() else {
        out.extend_from_slice(&node.exact);
        return;
    };
    // `>` needs at least one more token, which `first` is.
    out.extend_from_slice(&node.tail);
    if let Some(child) = node.children.get(*first) {
        collect(child, rest, out);
    }
    if let Some(star) = &node.star {
        collect(star, rest, out);
    }
}

fn remove_at<K: Eq>(node: &mut Node<K>, tokens: &[&str], key: K) -> bool {
    let remove_from = |v: &mut Vec<K>| match v.iter().position(|k| *k == key) {
        Some(i) => {
            v.swap_remove(i);
            true
        }
        None => false,
    };
    match tokens {
        [] => remove_from(&mut node.exact),
        [">"] => remove_from(&mut node.tail),
        [first, rest @ ..] => {
            if *first == "*" {
                let Some(star) = node.star.as_deref_mut() else { return false };
                let removed = remove_at(star, rest, key);
                if star.is_empty() {
                    node.star = None;
                }
                removed
            } else {
                let Some(child) = node.children.get_mut(*first) else { return false };
                let removed = remove_at(child, rest, key);
                if child.is_empty() {
                    node.children.remove(*first);
                }
                removed
            }
        }
    }
}

/// Splitting a subject into tokens without a heap allocation for the common
/// case of shallow subjects.
mod smallvec_tokens {
    pub struct Tokens<'a> {
        inline: [&'a str; 16],
        len: usize,
        heap: Vec<&'a str>,
    }

    impl<'a> Tokens<'a> {
        pub fn new(subject: &'a str) -> Tokens<'a> {
            let mut t = Tokens { inline: [""; 16], len: 0, heap: Vec::new() };
            for tok in subject.split('.') {
                if t.len < 16 {
                    t.inline[t.len] = tok;
                    t.len += 1;
                } else {
                    if t.heap.is_empty() {
                        t.heap.extend_from_slice(&t.inline);
                    }
                    t.heap.push(tok);
                }
            }
            t
        }

        pub fn as_slice(&self) -> &[&'a str] {
            if self.heap.is_empty() {
                &self.inline[..self.len]
            } else {
                &self.heap
            }
        }

        pub fn clear(&mut self) {
            self.len = 0;
            self.heap.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    type SubKey = (usize, u32);
    use proptest::prelude::*;
    use shmbus_proto::subject::pattern_matches;

    fn matched(r: &Router<SubKey>, s: &str) -> Vec<SubKey> {
        let mut v = Vec::new();
        r.matches(s, &mut v);
        v.sort();
        v
    }

    #[test]
    fn literal_star_and_tail() {
        let mut r = Router::<SubKey>::new();
        r.insert("a.b", (1, 1));
        r.insert("a.*", (1, 2));
        r.insert("a.>", (2, 1));
        r.insert(">", (3, 1));
        r.insert("*.b.c", (4, 1));
        assert_eq!(matched(&r, "a.b"), vec![(1, 1), (1, 2), (2, 1), (3, 1)]);
        assert_eq!(matched(&r, "a.b.c"), vec![(2, 1), (3, 1), (4, 1)]);
        assert_eq!(matched(&r, "a"), vec![(3, 1)]);
        assert_eq!(matched(&r, "z"), vec![(3, 1)]);
        assert_eq!(r.len(), 5);
    }

    #[test]
    fn remove_prunes() {
        let mut r = Router::<SubKey>::new();
        r.insert("a.*.c.>", (1, 1));
        r.insert("a.*.c.>", (1, 2));
        assert!(r.remove("a.*.c.>", (1, 1)));
        assert!(!r.remove("a.*.c.>", (1, 1)));
        assert_eq!(r.patterns().collect::<Vec<_>>(), vec![("a.*.c.>", 1)]);
        assert!(r.remove("a.*.c.>", (1, 2)));
        assert!(r.root.is_empty());
        assert!(r.is_empty());
        assert_eq!(r.patterns().count(), 0);
    }

    #[test]
    fn deep_subjects() {
        let mut r = Router::<SubKey>::new();
        let deep: Vec<String> = (0..40).map(|i| i.to_string()).collect();
        let subject = deep.join(".");
        r.insert(&subject, (1, 1));
        r.insert("0.>", (1, 2));
        assert_eq!(matched(&r, &subject), vec![(1, 1), (1, 2)]);
    }

    proptest! {
        /// The trie agrees with the reference matcher on random patterns.
        #[test]
        fn agrees_with_reference(
            patterns in proptest::collection::vec("(a|b|\\*)(\\.(a|b|\\*)){0,3}(\\.>)?", 1..12),
            subjects in proptest::collection::vec("(a|b)(\\.(a|b)){0,4}", 1..12),
        ) {
            let mut r = Router::<SubKey>::new();
            for (i, p) in patterns.iter().enumerate() {
                r.insert(p, (i, 0));
            }
            for s in &subjects {
                let want: Vec<SubKey> = patterns.iter().enumerate()
                    .filter(|(_, p)| pattern_matches(p, s)).map(|(i, _)| (i, 0)).collect();
                prop_assert_eq!(matched(&r, s), want);
            }
            for (i, p) in patterns.iter().enumerate() {
                prop_assert!(r.remove(p, (i, 0)));
            }
            prop_assert!(r.root.is_empty());
        }
    }
}
