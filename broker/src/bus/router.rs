//! The router: which subscriptions match a subject.
//!
//! Model. Every pattern has a *shape*: exactly `n` tokens, or `k` tokens
//! then `>` (one or more more). Patterns are filed by shape into at most
//! 65 tries, one per exact length `1..=D` and one per tail prefix length
//! `0..D` (`D` is [`MAX_SUBJECT_DEPTH`], 32), so in one trie every
//! pattern ends at the same depth. A publish of `n` tokens walks only the
//! exact trie of length `n` and the tail tries with `k < n`: it never
//! enters a subtree holding no pattern that could match `n` tokens, and
//! that pruning costs nothing to maintain.
//!
//! Each trie is path-compressed (a radix trie over tokens): a node
//! carries a *label*, the run of tokens (`*` included) from where its
//! parent branched to where it branches itself, and every branch node has
//! at least two children, keyed by the first token of their labels. A
//! leaf *is* one distinct pattern and holds the keys subscribed to it. So
//! a trie of `P` patterns has fewer than `2P` nodes, whatever their
//! depth, and a pattern that shares nothing with others is one leaf, not
//! a chain of 32 nodes.
//!
//! Storage. Token strings are interned once, counted by the occurrences
//! in distinct patterns, and labels are `u32` token ids, up to five in the
//! node itself. Nodes are `u32` slots in two slabs (branches, leaves). A
//! branch keeps its `*` child in a field, and the count and XOR of its
//! literal children's first tokens: with one literal child, the XOR is
//! that child's token and the child sits in a field too (the common case
//! under wildcard-heavy patterns costs no hash probe); with two or more,
//! each is a `(branch, token id)` entry in one hash map. When a removal
//! leaves a branch one child, the XOR finds it in O(1) and it is merged
//! up. A leaf's keys are a `Vec` (matching copies it out whole) with,
//! past `INDEX_ABOVE` (16) keys, a key → position map, so a key leaves by
//! `swap_remove` in O(1). The pattern table, a `BTreeMap` from
//! pattern to leaf, holds the only copy of each distinct pattern's text;
//! it answers `insert`/`remove` of a present pattern without walking a
//! trie, and lists patterns in byte order from any point.
//!
//! Costs (`L` = the pattern's tokens, ≤ D; `P` = distinct patterns; hash
//! operations are expected O(1), on SipHash keyed per process so that no
//! one can aim collisions):
//! - `insert`: O(log P) string comparisons to find the pattern; then O(1)
//!   if it exists, else O(L): interning its tokens, a walk down at most
//!   `L` branches, and at most one split (one new branch, one new leaf);
//! - `remove`: O(log P) comparisons and O(1) to drop the key, and when it
//!   was the pattern's last, O(L) to walk to its leaf, drop it and merge
//!   its parent into the last sibling if only one is left. Tables shrink
//!   when three quarters empty, so both are amortised over hash-table
//!   growth and shrinkage;
//! - memory: at most [`cost`]`(pattern)` bytes per subscription, which the
//!   broker charges to the subscriber's uid.
//!
//! The publish bound. Let `s` have `n` tokens. A pattern is *compatible*
//! with `s` when its shape admits `n` tokens (exactly `n`, or a tail with
//! `k < n`). A publish looks up at most `min(n, D)` of its tokens in the
//! intern table, then visits at most
//!
//! ```text
//!     V(s) ≤ 2 · (M + F) ≤ 2 · (distinct compatible patterns)
//! ```
//!
//! nodes, where `M` is the distinct patterns matching `s` and `F` the
//! distinct compatible ones that do not match but that the walk touches:
//! those under a node it visits and rejects, or under a child it skips at
//! a branch it passes (each agrees with `s` on every token above that
//! node or branch). A visit is one comparison of the node's label with
//! the subject (at most `D` contiguous ids), at most one hash probe, and
//! one `*` check: so `O(M + F)` random memory accesses and `O(D · (M +
//! F))` id comparisons, plus one copy per matching key. Proof:
//! the visited nodes form a forest. Its leaves are matching leaves, nodes
//! whose label disagreed, and branches whose children were all skipped;
//! give each a pattern below it. A visited branch with exactly one visited
//! child has a skipped child; give it a pattern below that. These subtrees
//! are disjoint, so at most `M + F` nodes are counted so far, and the
//! visited branches with two visited children are fewer than the forest's
//! leaves. Nothing here grows with the number of `*` levels or the depth:
//! wildcards multiply the work only up to the distinct patterns stored,
//! each of which its subscriber paid for. It does stay linear in the near
//! misses `F`, and that is the problem, not the structure: deciding which
//! of many wildcard patterns match a string is the partial-match problem,
//! which no structure of polynomial size answers in time sublinear in the
//! patterns in the worst case. So the router keeps the work at two node
//! visits per pattern involved, and the quota bounds the patterns.
//!
//! Invariants: every branch has at least two children and every leaf at
//! least one key (emptied ones go at once, and a branch left with one
//! child merges into it), so the structure's size is a function of what
//! is subscribed; every node but a trie's root has a non-empty label, and
//! a trie's leaves all sit at its depth; a branch's literal children are
//! in its `solo` field when there is one, in the edge map when there are
//! more, never both; a token is interned exactly while
//! some distinct pattern holds it; a key appears at most once per pattern.
//! Patterns and subjects reaching here were validated by
//! `shmbus_proto::subject`; a pattern deeper than `D` is not stored (a
//! debug assertion), a subject deeper than `D` can only match tail
//! patterns. No I/O: the broker owns the sockets, the router only names
//! keys (the broker's `(peer id, subscription id)`).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::mem::size_of;
use std::ops::Bound;

use shmbus_proto::limits::MAX_SUBJECT_DEPTH;

/// `D`: most tokens in a subject or pattern.
const D: usize = MAX_SUBJECT_DEPTH;

/// No node; in a subject, a token that no pattern holds.
const NONE: u32 = u32::MAX;
/// `*` in a label.
const STAR: u32 = u32::MAX - 1;
/// Set in a node reference that names a leaf (else a branch).
const LEAF: u32 = 1 << 31;

/// A leaf builds a key → position index once it holds more keys than
/// this, and drops it again at [`INDEX_DROP`] (hysteresis, so one key
/// going and coming back does not rebuild it).
const INDEX_ABOVE: usize = 16;
const INDEX_DROP: usize = 8;

/// Largest key [`cost`] accounts for, in bytes (`(u64, u32)` is 16).
pub const MAX_KEY_BYTES: usize = 16;

/// Token ids a label keeps in place; longer labels go to the heap.
const INLINE: usize = 5;

/// A node's label: token ids, [`STAR`] for `*`. Short ones (most, in
/// practice) live in the node, so a walk reads them without a second
/// cache miss.
#[derive(Debug)]
enum Label {
    Inline(u8, [u32; INLINE]),
    Heap(Box<[u32]>),
}

impl Label {
    const EMPTY: Label = Label::Inline(0, [0; INLINE]);
}

impl std::ops::Deref for Label {
    type Target = [u32];

    fn deref(&self) -> &[u32] {
        match self {
            Label::Inline(n, ids) => &ids[..*n as usize],
            Label::Heap(ids) => ids,
        }
    }
}

impl From<&[u32]> for Label {
    fn from(ids: &[u32]) -> Label {
        if ids.len() <= INLINE {
            let mut inline = [0; INLINE];
            inline[..ids.len()].copy_from_slice(ids);
            Label::Inline(ids.len() as u8, inline)
        } else {
            Label::Heap(ids.into())
        }
    }
}

/// A node with children.
#[derive(Debug)]
struct Branch {
    label: Label,
    /// The `*` child, or [`NONE`].
    star: u32,
    /// How many literal children it has.
    literals: u32,
    /// XOR of the literal children's first tokens: the token of the only
    /// one, when there is one.
    xor: u32,
    /// The literal child when there is exactly one (its token is `xor`);
    /// from two on, they are all in `edges` instead. Chains of one literal
    /// and one `*` child are what wildcard-heavy patterns build, and this
    /// spares them a hash probe per visit.
    solo: u32,
}

impl Branch {
    const EMPTY: Branch = Branch { label: Label::EMPTY, star: NONE, literals: 0, xor: 0, solo: NONE };
}

/// One distinct pattern: the rest of its tokens, and the keys subscribed
/// to it.
#[derive(Debug)]
struct Leaf<K> {
    label: Label,
    keys: Vec<K>,
    /// Position of each key in `keys`, once there are many. Boxed so a
    /// leaf without one stays small (an inline `HashMap` is 48 bytes).
    #[allow(clippy::box_collection)]
    index: Option<Box<HashMap<K, u32>>>,
}

impl<K: Copy + Eq + Hash> Leaf<K> {
    const EMPTY: Leaf<K> = Leaf { label: Label::EMPTY, keys: Vec::new(), index: None };

    fn position(&self, key: &K) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(key).map(|&i| i as usize),
            None => self.keys.iter().position(|k| k == key),
        }
    }

    /// Adds `key`; false if it was there already.
    fn insert(&mut self, key: K) -> bool {
        if self.position(&key).is_some() {
            return false;
        }
        self.keys.push(key);
        match &mut self.index {
            Some(index) => {
                index.insert(key, (self.keys.len() - 1) as u32);
            }
            None if self.keys.len() > INDEX_ABOVE => {
                self.index =
                    Some(Box::new(self.keys.iter().enumerate().map(|(i, k)| (*k, i as u32)).collect()));
            }
            None => {}
        }
        true
    }

    /// Removes `key`; false if it was not there.
    fn remove(&mut self, key: &K) -> bool {
        let Some(i) = self.position(key) else { return false };
        self.keys.swap_remove(i);
        if let Some(index) = &mut self.index {
            index.remove(key);
            if let Some(moved) = self.keys.get(i) {
                index.insert(*moved, i as u32);
            }
            if self.keys.len() <= INDEX_DROP {
                self.index = None;
            } else if index.capacity() > 4 * index.len() {
                index.shrink_to(2 * index.len());
            }
        }
        if self.keys.capacity() > 4 * self.keys.len() + 4 {
            self.keys.shrink_to(2 * self.keys.len());
        }
        true
    }
}

/// An interned token: its id and how many times distinct patterns hold it.
#[derive(Debug)]
struct Token {
    id: u32,
    uses: u32,
}

/// A pattern's shape: how many tokens precede its end or its `>`, and
/// whether it ends in `>`. `None` past [`D`] tokens.
fn shape(pattern: &str) -> Option<(usize, bool)> {
    let tokens = pattern.split('.').count();
    if tokens > D {
        return None;
    }
    let tail = pattern == ">" || pattern.ends_with(".>");
    Some(if tail { (tokens - 1, true) } else { (tokens, false) })
}

/// Whether a label agrees with the subject's token ids at its place.
fn agrees(label: &[u32], subject: &[u32]) -> bool {
    label.iter().zip(subject).all(|(&t, &s)| t == s || t == STAR)
}

/// Where a node hangs.
#[derive(Clone, Copy, Debug)]
enum Slot {
    /// The root of the trie of this shape.
    Root(usize, bool),
    /// The child of a branch whose label starts with this token.
    Child(u32, u32),
}

/// Subscription tries plus the table of distinct patterns.
pub struct Router<K> {
    /// Root of the trie of patterns with exactly `n` tokens, at `n`.
    exact_roots: [u32; D + 1],
    /// Root of the trie of patterns `k` tokens then `>`, at `k`.
    tail_roots: [u32; D],
    /// Bit `k` set when `tail_roots[k]` is a trie.
    tail_mask: u32,
    branches: Vec<Branch>,
    free_branches: Vec<u32>,
    leaves: Vec<Leaf<K>>,
    free_leaves: Vec<u32>,
    /// Literal children: `(branch, first token of the child's label)` →
    /// child.
    edges: HashMap<(u32, u32), u32>,
    tokens: HashMap<Box<str>, Token>,
    free_tokens: Vec<u32>,
    next_token: u32,
    /// Each distinct pattern and its leaf.
    patterns: BTreeMap<Box<str>, u32>,
    subscriptions: usize,
    /// Bumped by every insert and remove: a match remembered with the
    /// generation it was made in holds while this has not moved.
    generation: u64,
}

impl<K> std::fmt::Debug for Router<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("subscriptions", &self.subscriptions)
            .field("patterns", &self.patterns.len())
            .field("branches", &(self.branches.len() - self.free_branches.len()))
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl<K: Copy + Eq + Hash + Ord> Default for Router<K> {
    fn default() -> Self {
        Router::new()
    }
}

impl<K: Copy + Eq + Hash + Ord> Router<K> {
    pub fn new() -> Router<K> {
        const { assert!(size_of::<K>() <= MAX_KEY_BYTES, "cost() accounts for keys of at most 16 bytes") };
        Router {
            exact_roots: [NONE; D + 1],
            tail_roots: [NONE; D],
            tail_mask: 0,
            branches: Vec::new(),
            free_branches: Vec::new(),
            leaves: Vec::new(),
            free_leaves: Vec::new(),
            edges: HashMap::new(),
            tokens: HashMap::new(),
            free_tokens: Vec::new(),
            next_token: 0,
            patterns: BTreeMap::new(),
            subscriptions: 0,
            generation: 0,
        }
    }

    /// Moves on whenever what any subject matches may have changed.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Adds `key` under `pattern` (which `validate_pattern` accepted). A
    /// key already held under this pattern is not added twice. Returns
    /// false, storing nothing, for a pattern deeper than the router holds:
    /// the caller refuses it (defence in depth; validation refuses it
    /// first).
    pub fn insert(&mut self, pattern: &str, key: K) -> bool {
        self.generation += 1;
        if let Some(&leaf) = self.patterns.get(pattern) {
            if self.leaves[leaf as usize].insert(key) {
                self.subscriptions += 1;
            }
            return true;
        }
        let Some((depth, tail)) = shape(pattern) else {
            return false;
        };
        let mut toks = [NONE; D];
        for (slot, token) in toks.iter_mut().zip(pattern.split('.')).take(depth) {
            *slot = if token == "*" { STAR } else { self.intern(token) };
        }
        let toks = &toks[..depth];
        let leaf = self.alloc_leaf();
        self.leaves[leaf as usize].insert(key);
        self.patterns.insert(pattern.into(), leaf);
        self.subscriptions += 1;
        let leaf_ref = leaf | LEAF;

        let mut slot = Slot::Root(depth, tail);
        let mut d = 0;
        loop {
            let node = self.get(slot);
            if node == NONE {
                // A new trie: the pattern is its root, one leaf.
                self.leaves[leaf as usize].label = toks.into();
                self.set(slot, leaf_ref);
                return true;
            }
            let mut buf = [NONE; D];
            let label = {
                let l = self.label(node);
                buf[..l.len()].copy_from_slice(l);
                &buf[..l.len()]
            };
            let j = label.iter().zip(&toks[d..]).take_while(|(a, b)| a == b).count();
            if j < label.len() {
                // The pattern parts from this node's label at `j`: a new
                // branch takes the common part and both as children.
                // (`d + j < depth`: labels end by the trie's depth.)
                let (common, rest) = (label[..j].into(), label[j..].into());
                let branch = self.alloc_branch();
                self.branches[branch as usize].label = common;
                let old_first = label[j];
                self.set_label(node, rest);
                self.set(slot, branch);
                self.add_child(branch, old_first, node);
                self.leaves[leaf as usize].label = toks[d + j..].into();
                self.add_child(branch, toks[d + j], leaf_ref);
                return true;
            }
            // The whole label agrees, so `node` is a branch (a leaf would
            // be this very pattern, which is new) and the pattern goes on.
            debug_assert!(node & LEAF == 0);
            d += label.len();
            let first = toks[d];
            if self.child(node, first) == NONE {
                self.leaves[leaf as usize].label = toks[d..].into();
                self.add_child(node, first, leaf_ref);
                return true;
            }
            slot = Slot::Child(node, first);
        }
    }

    /// Removes `key` from `pattern`. Returns whether it was there.
    pub fn remove(&mut self, pattern: &str, key: K) -> bool {
        self.generation += 1;
        let Some(&leaf) = self.patterns.get(pattern) else { return false };
        if !self.leaves[leaf as usize].remove(&key) {
            return false;
        }
        self.subscriptions -= 1;
        if self.leaves[leaf as usize].keys.is_empty() {
            self.patterns.remove(pattern);
            self.unlink(pattern, leaf);
        }
        true
    }

    /// Appends every subscription matching `subject` to `out`.
    pub fn matches(&self, subject: &str, out: &mut Vec<K>) {
        self.walk_all(subject, out);
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

    /// Each distinct pattern with how many subscriptions hold it, in
    /// ascending byte order.
    pub fn patterns(&self) -> impl Iterator<Item = (&str, u32)> + '_ {
        self.patterns_after(None)
    }

    /// The distinct patterns strictly after `after` (all of them for
    /// `None`), in ascending byte order, each with how many subscriptions
    /// hold it. Starting costs O(log P); each step O(1) amortised.
    pub fn patterns_after(&self, after: Option<&str>) -> impl Iterator<Item = (&str, u32)> + '_ {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.patterns
            .range::<str, _>((from, Bound::Unbounded))
            .map(|(p, &leaf)| (&**p, self.leaves[leaf as usize].keys.len() as u32))
    }

    // ------------------------------------------------------------ walk --

    /// Matches `subject` into `out`; returns the nodes visited.
    fn walk_all(&self, subject: &str, out: &mut Vec<K>) -> u64 {
        if self.subscriptions == 0 {
            return 0;
        }
        let n = subject.bytes().filter(|&b| b == b'.').count() + 1;
        let exact = self.exact_roots.get(n).copied().unwrap_or(NONE);
        // Tail tries with fewer prefix tokens than the subject has.
        let tails = if n >= 32 { self.tail_mask } else { self.tail_mask & ((1u32 << n) - 1) };
        if exact == NONE && tails == 0 {
            return 0;
        }
        let need = if exact != NONE { n } else { 32 - tails.leading_zeros() as usize - 1 };
        // Token ids; NONE for a token no pattern holds (only `*` agrees).
        let mut ids = [NONE; D];
        for (slot, token) in ids.iter_mut().zip(subject.split('.')).take(need) {
            *slot = self.tokens.get(token).map_or(NONE, |t| t.id);
        }
        let mut visits = 0;
        if exact != NONE {
            self.walk(exact, &ids, out, &mut visits);
        }
        let mut rest = tails;
        while rest != 0 {
            let k = rest.trailing_zeros() as usize;
            rest &= rest - 1;
            self.walk(self.tail_roots[k], &ids, out, &mut visits);
        }
        visits
    }

    /// Walks the subtree at `node`, whose label starts at `ids[0]`.
    fn walk(&self, node: u32, ids: &[u32], out: &mut Vec<K>, visits: &mut u64) {
        *visits += 1;
        if node & LEAF != 0 {
            let leaf = &self.leaves[(node & !LEAF) as usize];
            if agrees(&leaf.label, ids) {
                out.extend_from_slice(&leaf.keys);
            }
            return;
        }
        let branch = &self.branches[node as usize];
        if !agrees(&branch.label, ids) {
            return;
        }
        let ids = &ids[branch.label.len()..];
        let id = ids[0];
        if branch.literals == 1 {
            if id == branch.xor {
                self.walk(branch.solo, ids, out, visits);
            }
        } else if id != NONE && branch.literals != 0 {
            if let Some(&child) = self.edges.get(&(node, id)) {
                self.walk(child, ids, out, visits);
            }
        }
        if branch.star != NONE {
            self.walk(branch.star, ids, out, visits);
        }
    }

    // ---------------------------------------------------------- storage --

    fn get(&self, slot: Slot) -> u32 {
        match slot {
            Slot::Root(depth, false) => self.exact_roots[depth],
            Slot::Root(depth, true) => self.tail_roots[depth],
            Slot::Child(branch, first) => self.child(branch, first),
        }
    }

    /// Puts `node` where another hangs, or hung (a root), or unhangs it.
    fn set(&mut self, slot: Slot, node: u32) {
        match slot {
            Slot::Root(depth, false) => self.exact_roots[depth] = node,
            Slot::Root(depth, true) => {
                self.tail_roots[depth] = node;
                if node == NONE {
                    self.tail_mask &= !(1 << depth);
                } else {
                    self.tail_mask |= 1 << depth;
                }
            }
            Slot::Child(branch, STAR) => self.branches[branch as usize].star = node,
            Slot::Child(branch, first) => {
                let b = &mut self.branches[branch as usize];
                if b.literals == 1 {
                    debug_assert_eq!(b.xor, first, "replacing a child, not adding one");
                    b.solo = node;
                } else {
                    let old = self.edges.insert((branch, first), node);
                    debug_assert!(old.is_some(), "replacing a child, not adding one");
                }
            }
        }
    }

    fn child(&self, branch: u32, first: u32) -> u32 {
        let b = &self.branches[branch as usize];
        match (first, b.literals) {
            (STAR, _) => b.star,
            (_, 0) => NONE,
            (_, 1) if first == b.xor => b.solo,
            (_, 1) => NONE,
            _ => self.edges.get(&(branch, first)).copied().unwrap_or(NONE),
        }
    }

    fn add_child(&mut self, branch: u32, first: u32, node: u32) {
        let b = &mut self.branches[branch as usize];
        if first == STAR {
            debug_assert_eq!(b.star, NONE);
            b.star = node;
            return;
        }
        match b.literals {
            0 => b.solo = node,
            1 => {
                // Two literal children: both go to the edge map.
                debug_assert_ne!(b.xor, first);
                self.edges.insert((branch, b.xor), b.solo);
                self.edges.insert((branch, first), node);
                b.solo = NONE;
            }
            _ => {
                let old = self.edges.insert((branch, first), node);
                debug_assert!(old.is_none());
            }
        }
        b.literals += 1;
        b.xor ^= first;
    }

    fn remove_child(&mut self, branch: u32, first: u32) {
        let b = &mut self.branches[branch as usize];
        if first == STAR {
            b.star = NONE;
            return;
        }
        match b.literals {
            1 => b.solo = NONE,
            2 => {
                // One literal child left: it comes out of the edge map.
                self.edges.remove(&(branch, first));
                b.solo = self.edges.remove(&(branch, b.xor ^ first)).expect("the other child");
            }
            _ => {
                self.edges.remove(&(branch, first));
            }
        }
        b.literals -= 1;
        b.xor ^= first;
    }

    fn label(&self, node: u32) -> &[u32] {
        if node & LEAF != 0 {
            &self.leaves[(node & !LEAF) as usize].label
        } else {
            &self.branches[node as usize].label
        }
    }

    fn set_label(&mut self, node: u32, label: Label) {
        if node & LEAF != 0 {
            self.leaves[(node & !LEAF) as usize].label = label;
        } else {
            self.branches[node as usize].label = label;
        }
    }

    /// Takes a pattern whose last key just left out of its trie: drops its
    /// leaf, and merges the parent into the one child it may have left.
    fn unlink(&mut self, pattern: &str, leaf: u32) {
        let Some((depth, tail)) = shape(pattern) else { return };
        let mut toks = [NONE; D];
        for (slot, token) in toks.iter_mut().zip(pattern.split('.')).take(depth) {
            *slot = if token == "*" { STAR } else { self.tokens[token].id };
        }
        // Down to the leaf, remembering its parent and where that hangs.
        let mut slot = Slot::Root(depth, tail);
        let mut parent: Option<(Slot, u32)> = None;
        let mut d = 0;
        loop {
            let node = self.get(slot);
            if node == leaf | LEAF {
                break;
            }
            debug_assert!(node != NONE && node & LEAF == 0, "a held pattern's path leads to its leaf");
            d += self.branches[node as usize].label.len();
            parent = Some((slot, node));
            slot = Slot::Child(node, toks[d]);
        }
        for token in pattern.split('.').take(depth).filter(|t| *t != "*") {
            self.release(token);
        }
        self.free_leaf(leaf);
        match parent {
            None => self.set(slot, NONE),
            Some((parent_slot, branch)) => {
                self.remove_child(branch, toks[d]);
                let b = &self.branches[branch as usize];
                debug_assert!(b.star != NONE || b.literals > 0, "a branch had two children");
                let only = match (b.star, b.literals) {
                    (NONE, 1) => Some(b.xor),
                    (_, 0) => Some(STAR),
                    _ => None,
                };
                if let Some(first) = only {
                    // One child left: it takes the branch's place, its
                    // label prefixed with the branch's (so its first token,
                    // by which the grandparent knows it, is unchanged).
                    let child = self.child(branch, first);
                    self.remove_child(branch, first);
                    let mut joined = [NONE; D];
                    let (a, b) = (&*self.branches[branch as usize].label, self.label(child));
                    joined[..a.len()].copy_from_slice(a);
                    joined[a.len()..a.len() + b.len()].copy_from_slice(b);
                    let label = Label::from(&joined[..a.len() + b.len()]);
                    self.set_label(child, label);
                    self.free_branch(branch);
                    self.set(parent_slot, child);
                }
            }
        }
        self.shrink();
    }

    fn intern(&mut self, token: &str) -> u32 {
        if let Some(t) = self.tokens.get_mut(token) {
            t.uses += 1;
            return t.id;
        }
        let id = self.free_tokens.pop().unwrap_or_else(|| {
            self.next_token += 1;
            self.next_token - 1
        });
        // Ids stay far below STAR: there are fewer tokens than bytes of
        // patterns held.
        debug_assert!(id < LEAF);
        self.tokens.insert(token.into(), Token { id, uses: 1 });
        id
    }

    fn release(&mut self, token: &str) {
        let t = self.tokens.get_mut(token).expect("a held pattern's token is interned");
        t.uses -= 1;
        if t.uses == 0 {
            let id = t.id;
            self.tokens.remove(token);
            self.free_tokens.push(id);
        }
    }

    fn alloc_branch(&mut self) -> u32 {
        match self.free_branches.pop() {
            Some(i) => i,
            None => {
                self.branches.push(Branch::EMPTY);
                (self.branches.len() - 1) as u32
            }
        }
    }

    fn free_branch(&mut self, i: u32) {
        self.branches[i as usize] = Branch::EMPTY;
        self.free_branches.push(i);
    }

    fn alloc_leaf(&mut self) -> u32 {
        match self.free_leaves.pop() {
            Some(i) => i,
            None => {
                self.leaves.push(Leaf::EMPTY);
                (self.leaves.len() - 1) as u32
            }
        }
    }

    fn free_leaf(&mut self, i: u32) {
        self.leaves[i as usize] = Leaf::EMPTY;
        self.free_leaves.push(i);
    }

    /// Gives memory back: everything when the router is empty, and a
    /// hash table's spare room when it is three quarters empty (amortised
    /// O(1) per removal: a shrink to twice the live entries follows at
    /// least as many removals as it moves entries).
    fn shrink(&mut self) {
        if self.patterns.is_empty() {
            // A fresh router, but never a generation seen before: a
            // route remembered at the old one would hold again.
            let generation = self.generation;
            *self = Router::new();
            self.generation = generation;
            return;
        }
        fn shrink_map<A: Eq + Hash, B>(m: &mut HashMap<A, B>) {
            if m.capacity() > 64 && m.capacity() > 4 * m.len() {
                m.shrink_to(2 * m.len());
            }
        }
        shrink_map(&mut self.edges);
        shrink_map(&mut self.tokens);
    }
}

// ------------------------------------------------------------- cost --

/// A hash-table slot for an entry of `payload` bytes: a control byte
/// more, and a table is at least 7/16 full after it grows (7/8 load,
/// doubling), so a live entry pays for at most 16/7 of a slot; rounded up.
const fn table_slot(payload: u64) -> u64 {
    (payload + 1) * 16 / 7 + 1
}

/// A heap block for `n` bytes under glibc malloc: 8 bytes of header,
/// rounded up to 16, at least 32.
const fn heap_block(n: u64) -> u64 {
    let b = (n + 8).div_ceil(16) * 16;
    if b < 32 {
        32
    } else {
        b
    }
}

/// Bytes one entry of the pattern table can take beyond its text: key
/// (`Box<str>`, 16) and value (4) in a B-tree node of 11 that may be only
/// 5 full, with the node's header and a share of the internal nodes.
const PATTERN_ENTRY: u64 = 96;

/// Per token, when the pattern holds it first: an intern-table slot
/// (`Box<str>` 16, id and use count 8). Its text's heap block is counted
/// apart.
const TOKEN: u64 = table_slot(24);

/// A slab slot of `n` bytes: the slab may be half empty after growing,
/// and a freed slot's id (4) waits on a free list, likewise.
const fn slab_slot(n: u64) -> u64 {
    2 * n + 2 * 4
}

/// Per key: its slot in the leaf's vector (which may be a quarter full
/// before it shrinks), and its entry in the position index (key and
/// `u32`, padded to 24).
const KEY: u64 = 4 * MAX_KEY_BYTES as u64 + table_slot(24);

/// An upper bound, in bytes, of the router memory one subscription to
/// `pattern` can add (the broker charges it to the subscriber's uid).
///
/// It assumes the subscription is the pattern's first, and so adds: an
/// entry in the pattern table with the pattern's text; an intern entry
/// for each token, with its text (as if none were held yet); a leaf, with
/// its label (4 bytes per token, on the heap past five), its key vector's
/// first block and the index's box; one branch from a split, with a label
/// as long; and two edge-map entries. Every table is taken as sparse as
/// it can be after growing (half full, or 7/16 for hash tables); keys are
/// at most [`MAX_KEY_BYTES`]. Later subscriptions to the same pattern add
/// only a key, so summing `cost` over live subscriptions overestimates
/// the router's memory. Removing a subscription gives back what it took,
/// except slab slots, kept for reuse until the router empties. Valid for
/// patterns that `validate_pattern` accepts (at most 1024 bytes, 32
/// tokens): about 3.8 KiB for a 32-token pattern of 64 bytes, 1 KiB for
/// `a.b.c`.
pub fn cost(pattern: &str) -> u64 {
    let bytes = pattern.len() as u64;
    let tokens = pattern.split('.').count() as u64;
    // Labels longer than INLINE go to the heap.
    let label = if tokens as usize > INLINE { heap_block(4 * tokens) } else { 0 };
    PATTERN_ENTRY
        + heap_block(bytes)
        // Token texts: each block rounds its token up by at most 23 bytes
        // and is at least 32.
        + tokens * (TOKEN + 32) + bytes
        + slab_slot(size_of::<Leaf<(u64, u32)>>() as u64) + label
        + heap_block(4 * MAX_KEY_BYTES as u64) + heap_block(48)
        + slab_slot(size_of::<Branch>() as u64) + label
        + 2 * table_slot(12)
        + KEY
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use shmbus_proto::subject::{pattern_matches, validate_pattern, validate_subject};

    impl<K: Copy + Eq + Hash + Ord + std::fmt::Debug> Router<K> {
        fn matched(&self, s: &str) -> Vec<K> {
            let mut v = Vec::new();
            self.matches(s, &mut v);
            v.sort();
            v
        }

        /// Nodes visited to match `s`.
        fn visits(&self, s: &str) -> u64 {
            self.walk_all(s, &mut Vec::new())
        }

        /// Nodes (branches and leaves) currently in use.
        fn nodes(&self) -> usize {
            self.branches.len() - self.free_branches.len() + self.leaves.len() - self.free_leaves.len()
        }

        /// Checks every structural invariant by walking the tries.
        fn check(&self) {
            // Token uses: one per literal occurrence in a distinct pattern.
            let mut uses: HashMap<&str, u32> = HashMap::new();
            for p in self.patterns.keys() {
                let (depth, _) = shape(p).unwrap();
                for t in p.split('.').take(depth).filter(|t| *t != "*") {
                    *uses.entry(t).or_default() += 1;
                }
            }
            assert_eq!(uses.len(), self.tokens.len());
            for (t, n) in &uses {
                assert_eq!(self.tokens[*t].uses, *n, "{t}");
            }
            let ids: std::collections::HashSet<u32> = self.tokens.values().map(|t| t.id).collect();
            assert_eq!(ids.len(), self.tokens.len());
            let mut children: HashMap<u32, Vec<(u32, u32)>> = HashMap::new();
            for (&(parent, first), &child) in &self.edges {
                children.entry(parent).or_default().push((first, child));
            }
            let (mut branches, mut leaves, mut subs) = (0, 0, 0);
            let roots = self.exact_roots.iter().enumerate().map(|(n, &r)| (r, n, false));
            let tails = self.tail_roots.iter().enumerate().map(|(k, &r)| (r, k, true));
            for (root, depth, tail) in roots.chain(tails) {
                if tail {
                    assert_eq!(root != NONE, self.tail_mask >> depth & 1 == 1);
                }
                if root == NONE {
                    continue;
                }
                // (node, depth where its label starts, first token or NONE for a root)
                let mut stack = vec![(root, 0, NONE)];
                while let Some((node, d, first)) = stack.pop() {
                    let label = self.label(node);
                    if first != NONE {
                        assert_eq!(
                            label.first(),
                            Some(&first),
                            "a child is keyed by its label's first token"
                        );
                    }
                    for t in label {
                        assert!(*t == STAR || ids.contains(t));
                    }
                    let end = d + label.len();
                    if node & LEAF != 0 {
                        assert_eq!(end, depth, "a leaf ends at its trie's depth");
                        let leaf = &self.leaves[(node & !LEAF) as usize];
                        assert!(!leaf.keys.is_empty());
                        if let Some(ix) = &leaf.index {
                            assert_eq!(ix.len(), leaf.keys.len());
                            for (i, k) in leaf.keys.iter().enumerate() {
                                assert_eq!(ix[k] as usize, i);
                            }
                        }
                        leaves += 1;
                        subs += leaf.keys.len();
                        continue;
                    }
                    assert!(end < depth);
                    let b = &self.branches[node as usize];
                    let solo = [(b.xor, b.solo)];
                    let literal = match b.literals {
                        0 => &[][..],
                        1 => {
                            assert!(!children.contains_key(&node));
                            &solo[..]
                        }
                        _ => {
                            assert_eq!(b.solo, NONE);
                            children.get(&node).map_or(&[][..], Vec::as_slice)
                        }
                    };
                    assert_eq!(b.literals as usize, literal.len());
                    assert_eq!(b.xor, literal.iter().fold(0, |x, (f, _)| x ^ f));
                    let n = literal.len() + usize::from(b.star != NONE);
                    assert!(n >= 2, "a branch has two children or more");
                    branches += 1;
                    if b.star != NONE {
                        stack.push((b.star, end, STAR));
                    }
                    stack.extend(literal.iter().map(|&(f, c)| (c, end, f)));
                }
            }
            assert_eq!(branches, self.branches.len() - self.free_branches.len());
            assert_eq!(leaves, self.leaves.len() - self.free_leaves.len());
            assert_eq!(leaves, self.patterns.len());
            assert!(branches < leaves.max(1));
            for &leaf in self.patterns.values() {
                assert!(!self.leaves[leaf as usize].keys.is_empty());
            }
            assert_eq!(subs, self.subscriptions);
        }

        /// Everything is gone, not just unreachable.
        fn assert_pristine(&self) {
            self.check();
            assert!(self.is_empty());
            assert_eq!(self.nodes(), 0);
            assert!(self.branches.is_empty() && self.leaves.is_empty());
            assert!(self.edges.is_empty() && self.tokens.is_empty() && self.patterns.is_empty());
            assert_eq!(self.edges.capacity(), 0);
            assert_eq!(self.tokens.capacity(), 0);
            assert!(self.exact_roots.iter().chain(&self.tail_roots).all(|&r| r == NONE));
            assert_eq!(self.tail_mask, 0);
        }
    }

    /// The documented bound: twice the distinct patterns of a shape that
    /// admits `s`.
    fn bound(patterns: &[String], s: &str) -> u64 {
        let n = s.split('.').count();
        let mut distinct: Vec<&String> = patterns.iter().collect();
        distinct.sort();
        distinct.dedup();
        let compatible = distinct
            .iter()
            .filter(|p| {
                let (k, tail) = shape(p).unwrap();
                (tail && k < n) || (!tail && k == n)
            })
            .count();
        2 * compatible as u64
    }

    #[test]
    fn literal_star_and_tail() {
        let mut r = Router::new();
        r.insert("a.b", (1, 1));
        r.insert("a.*", (1, 2));
        r.insert("a.>", (2, 1));
        r.insert(">", (3, 1));
        r.insert("*.b.c", (4, 1));
        assert_eq!(r.matched("a.b"), vec![(1, 1), (1, 2), (2, 1), (3, 1)]);
        assert_eq!(r.matched("a.b.c"), vec![(2, 1), (3, 1), (4, 1)]);
        assert_eq!(r.matched("a"), vec![(3, 1)]);
        assert_eq!(r.matched("z"), vec![(3, 1)]);
        assert_eq!(r.len(), 5);
        r.check();
    }

    #[test]
    fn remove_prunes_everything() {
        let mut r = Router::new();
        r.insert("a.*.c.>", (1, 1));
        r.insert("a.*.c.>", (1, 2));
        assert!(r.remove("a.*.c.>", (1, 1)));
        assert!(!r.remove("a.*.c.>", (1, 1)));
        assert!(!r.remove("a.*.c", (1, 2)));
        assert_eq!(r.patterns().collect::<Vec<_>>(), vec![("a.*.c.>", 1)]);
        assert!(r.remove("a.*.c.>", (1, 2)));
        r.assert_pristine();

        // Many shapes sharing prefixes and tokens, removed in another order.
        let pats = ["a", "a.b", "a.>", ">", "*", "*.*", "a.*.b", "b.a.*", "a.b.>", "x.y.z"];
        for (i, p) in pats.iter().enumerate() {
            for j in 0..20 {
                r.insert(p, (i, j));
            }
        }
        r.check();
        assert_eq!(r.len(), pats.len() * 20);
        for j in 0..20 {
            for (i, p) in pats.iter().enumerate().rev() {
                assert!(r.remove(p, (i, j)));
            }
            r.check();
        }
        r.assert_pristine();
    }

    #[test]
    fn duplicate_key_is_held_once() {
        let mut r = Router::new();
        r.insert("a.b", (1, 1));
        r.insert("a.b", (1, 1));
        assert_eq!(r.len(), 1);
        assert_eq!(r.matched("a.b"), vec![(1, 1)]);
        // The same key under another pattern is another subscription.
        r.insert("a.*", (1, 1));
        assert_eq!(r.len(), 2);
        assert!(r.remove("a.b", (1, 1)));
        assert!(r.remove("a.*", (1, 1)));
        r.assert_pristine();
    }

    #[test]
    fn many_keys_on_one_pattern() {
        // Past INDEX_ABOVE the leaf indexes its keys; removal in any order
        // keeps the index right, and it is dropped again when small.
        let mut r: Router<(u64, u32)> = Router::new();
        for i in 0..1000u64 {
            r.insert("hot.topic", (i, 7));
        }
        r.check();
        assert_eq!(r.patterns().collect::<Vec<_>>(), vec![("hot.topic", 1000)]);
        for i in (0..1000u64).filter(|i| i % 3 == 0).chain((0..1000).filter(|i| i % 3 != 0)) {
            assert!(r.remove("hot.topic", (i, 7)));
            if i % 97 == 0 {
                r.check();
            }
        }
        r.assert_pristine();
    }

    /// A leaf's own bookkeeping: it indexes its keys from `INDEX_ABOVE + 1`
    /// on and drops the index at `INDEX_DROP`; as keys go, its key list and
    /// index give memory back (at most 4× what they hold, and after a
    /// shrink room for 2×).
    #[test]
    fn a_leaf_indexes_many_keys_and_gives_memory_back() {
        let mut leaf: Leaf<u64> = Leaf::EMPTY;
        for k in 0..INDEX_ABOVE as u64 {
            assert!(leaf.insert(k));
            assert!(leaf.index.is_none(), "indexed at {} keys", k + 1);
        }
        assert!(leaf.insert(INDEX_ABOVE as u64));
        assert!(leaf.index.is_some(), "not indexed at {} keys", INDEX_ABOVE + 1);
        for k in INDEX_ABOVE as u64 + 1..1000 {
            assert!(leaf.insert(k));
        }
        assert!(!leaf.insert(5), "a key held twice");
        let right = |leaf: &Leaf<u64>| {
            for (i, k) in leaf.keys.iter().enumerate() {
                assert_eq!(leaf.position(k), Some(i));
            }
        };
        right(&leaf);
        for k in 20..1000 {
            assert!(leaf.remove(&k));
        }
        assert!(!leaf.remove(&500), "a key removed twice");
        right(&leaf);
        assert_eq!(leaf.keys.len(), 20);
        assert!(leaf.keys.capacity() <= 4 * 20 + 4, "keys keep room for {}", leaf.keys.capacity());
        let index = leaf.index.as_ref().expect("still indexed at 20 keys");
        assert!(index.capacity() <= 4 * 20, "the index keeps room for {}", index.capacity());
        assert!(index.capacity() >= 2 * 20, "the index shrank to {}", index.capacity());
        for k in INDEX_DROP as u64 + 1..20 {
            assert!(leaf.remove(&k));
        }
        assert!(leaf.index.is_some(), "index dropped at {} keys", INDEX_DROP + 1);
        assert!(leaf.remove(&(INDEX_DROP as u64)));
        assert!(leaf.index.is_none(), "index kept at {} keys", INDEX_DROP);
        right(&leaf);
    }

    #[test]
    fn patterns_in_order_from_any_point() {
        let mut r: Router<(u64, u32)> = Router::new();
        for (i, p) in ["b", "a.b", "a", "c.>", "a.*", "b"].iter().enumerate() {
            r.insert(p, (i as u64, 0));
        }
        let all: Vec<_> = r.patterns().collect();
        assert_eq!(all, vec![("a", 1), ("a.*", 1), ("a.b", 1), ("b", 2), ("c.>", 1)]);
        assert_eq!(r.pattern_count(), 5);
        assert_eq!(r.patterns_after(Some("a.*")).collect::<Vec<_>>(), all[2..]);
        assert_eq!(r.patterns_after(Some("a.a")).collect::<Vec<_>>(), all[2..]);
        assert_eq!(r.patterns_after(Some("c.>")).count(), 0);
        assert_eq!(r.patterns_after(Some("")).count(), 5);
    }

    #[test]
    fn deep_subjects() {
        let mut r = Router::new();
        let deep: Vec<String> = (0..D).map(|i| i.to_string()).collect();
        let subject = deep.join(".");
        r.insert(&subject, (1, 1));
        r.insert("0.>", (1, 2));
        r.insert(&format!("{}.>", deep[..D - 1].join(".")), (1, 3));
        assert_eq!(r.matched(&subject), vec![(1, 1), (1, 2), (1, 3)]);
        // Too deep to validate, but a tail pattern still matches it.
        let deeper = format!("{subject}.x.y");
        assert_eq!(r.matched(&deeper), vec![(1, 2), (1, 3)]);
        r.check();
    }

    #[test]
    fn too_deep_pattern_is_not_stored() {
        let mut r: Router<(u64, u32)> = Router::new();
        assert!(!r.insert(&vec!["a"; D + 1].join("."), (1, 1)));
        assert!(r.is_empty());
        assert!(r.insert(&vec!["a"; D].join("."), (1, 1)));
    }

    #[test]
    fn length_pruning() {
        // Deep patterns are never entered by a subject of another length.
        let mut r = Router::new();
        for i in 0..100 {
            r.insert(&format!("x{i}.{}", vec!["a"; D - 1].join(".")), (i, 0));
        }
        assert_eq!(r.visits("x5.a"), 0);
        r.insert("x5.*", (1000, 0));
        assert_eq!(r.visits("x5.a"), 1);
        assert_eq!(r.matched("x5.a"), vec![(1000, 0)]);
    }

    /// The attacker's shapes, at the depth limit: visits per publish stay
    /// within the documented bound, which is linear in the patterns.
    #[test]
    fn attacker_shapes_are_bounded() {
        let d = D;
        // 512 patterns mixing `*` and literals at every level, 32 deep: the
        // first 9 levels enumerate {a, *}, the rest alternate, and every
        // one fails at the last token.
        let mut star_mix = Vec::new();
        for i in 0..512usize {
            let mut t: Vec<String> = (0..d - 1)
                .map(|l| {
                    let star = if l < 9 { i >> l & 1 == 1 } else { (i + l) % 2 == 0 };
                    if star {
                        "*".into()
                    } else {
                        "a".into()
                    }
                })
                .collect();
            t.push(format!("z{i}"));
            star_mix.push(t.join("."));
        }
        // 4096 deep literal patterns `x<i>.a.….a`.
        let literal: Vec<String> =
            (0..4096).map(|i| format!("x{i}.{}", vec!["a"; d - 1].join("."))).collect();
        // The same with `*` in place of the first token: all share it.
        let shared: Vec<String> =
            (0..4096).map(|i| format!("*.{}.y{i}", vec!["a"; d - 2].join("."))).collect();
        let mut all = Vec::new();
        let mut r: Router<(u64, u32)> = Router::new();
        for (i, p) in star_mix.iter().chain(&literal).chain(&shared).enumerate() {
            validate_pattern(p).unwrap();
            r.insert(p, (i as u64, 1));
            all.push(p.clone());
        }
        r.check();
        let miss = vec!["a"; d].join(".");
        let hit_literal = format!("x7.{}", vec!["a"; d - 1].join("."));
        let hit_star = {
            let mut t = vec!["a"; d - 1];
            t.push("z3");
            t.join(".")
        };
        for s in [&miss, &hit_literal, &hit_star, &"x7.a".to_string(), &"a".to_string()] {
            validate_subject(s).unwrap();
            let v = r.visits(s);
            let b = bound(&all, s);
            assert!(v <= b, "{s}: {v} visits > bound {b}");
        }
        // In numbers: the star mix makes one publish visit at most two
        // nodes per pattern, not 2^32 nor 32 per pattern; the literal and
        // shared shapes add a node or two.
        assert!(r.visits(&miss) <= 2 * 512 + 4, "{}", r.visits(&miss));
        assert!(r.visits(&hit_literal) <= 2 * 512 + 4, "{}", r.visits(&hit_literal));
        assert!(r.matched(&hit_star).contains(&(3, 1)));
        assert_eq!(r.matched(&hit_literal), vec![(512 + 7, 1)]);
        // Memory is per pattern, not per token of every subscription.
        assert!(r.nodes() < 2 * all.len());
        for (i, p) in all.iter().enumerate() {
            assert!(r.remove(p, (i as u64, 1)));
        }
        r.assert_pristine();
    }

    #[test]
    fn cost_is_sane() {
        let shallow = cost("a.b.c");
        let deep = cost(&format!("x1.{}", vec!["a"; D - 1].join(".")));
        assert!((500..=1500).contains(&shallow), "{shallow}");
        assert!((3_000..=5_000).contains(&deep), "{deep}");
        assert!(cost(">") < shallow);
        // A longer pattern never costs less.
        assert!(cost("a.b.c.d") > shallow && cost("aaaa.b.c") > shallow);
    }

    proptest! {
        /// The tries agree with the reference matcher on random patterns,
        /// stay consistent, and prune to nothing.
        #[test]
        fn agrees_with_reference(
            patterns in proptest::collection::vec("(a|b|\\*)(\\.(a|b|\\*)){0,3}(\\.>)?|>", 1..12),
            subjects in proptest::collection::vec("(a|b)(\\.(a|b)){0,4}", 1..12),
        ) {
            let mut r = Router::new();
            for (i, p) in patterns.iter().enumerate() {
                r.insert(p, (i, 0));
            }
            r.check();
            for s in &subjects {
                let want: Vec<(usize, u32)> = patterns.iter().enumerate()
                    .filter(|(_, p)| pattern_matches(p, s)).map(|(i, _)| (i, 0)).collect();
                prop_assert_eq!(r.matched(s), want);
                prop_assert!(r.visits(s) <= bound(&patterns, s));
            }
            for (i, p) in patterns.iter().enumerate() {
                prop_assert!(r.remove(p, (i, 0)));
                if i % 3 == 0 {
                    r.check();
                }
            }
            r.assert_pristine();
        }

        /// Inserts and removals interleaved at random, deeper patterns
        /// sharing more: the tries always agree with a plain list, keep
        /// every invariant, and end empty.
        #[test]
        fn interleaved_against_a_model(
            ops in proptest::collection::vec(
                (any::<bool>(), "(a|b|c|\\*)(\\.(a|b|c|\\*)){0,6}(\\.>)?|>", 0u32..3),
                1..60,
            ),
            subjects in proptest::collection::vec("(a|b|c|d)(\\.(a|b|c|d)){0,7}", 1..8),
        ) {
            let mut r: Router<(u64, u32)> = Router::new();
            let mut model: Vec<(String, (u64, u32))> = Vec::new();
            for (insert, pattern, key) in ops {
                let key = (u64::from(key), 0);
                let held = model.iter().position(|(p, k)| *p == pattern && *k == key);
                if insert {
                    r.insert(&pattern, key);
                    if held.is_none() {
                        model.push((pattern, key));
                    }
                } else {
                    prop_assert_eq!(r.remove(&pattern, key), held.is_some());
                    if let Some(i) = held {
                        model.swap_remove(i);
                    }
                }
                r.check();
                prop_assert_eq!(r.len(), model.len());
                for s in &subjects {
                    let mut want: Vec<(u64, u32)> =
                        model.iter().filter(|(p, _)| pattern_matches(p, s)).map(|(_, k)| *k).collect();
                    want.sort();
                    prop_assert_eq!(r.matched(s), want);
                    let patterns: Vec<String> = model.iter().map(|(p, _)| p.clone()).collect();
                    prop_assert!(r.visits(s) <= bound(&patterns, s));
                }
            }
            for (p, k) in model {
                prop_assert!(r.remove(&p, k));
            }
            r.assert_pristine();
        }
    }
}
