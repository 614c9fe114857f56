//! The policy file: who may do what on the bus, and its per-peer snapshots.
//!
//! Model. A policy file (TOML) is a list of rules, read top to bottom.
//! Each rule has a `match` (which peers it is about: `{}` for everyone, or
//! any of `uid`, `user`, `gid`, `group`, all of which must hold) and two
//! optional lists of entries, `allow` and `deny`. An entry is an action,
//! followed by a pattern for the actions that take one:
//!
//! | action | pattern | asked for |
//! |---|---|---|
//! | `connect`, `monitor`, `introspect` | none | the peer as a whole |
//! | `publish`, `channel-publish` | subject pattern | each topic published to |
//! | `own`, `call` | name pattern | each name owned or called |
//! | `subscribe`, `channel-read` | subject pattern | each pattern subscribed to |
//!
//! Precedence. For one peer and one action, the entries of the rules whose
//! `match` holds for it are ordered: a later rule beats an earlier one;
//! within a rule, its `deny` entries beat its own `allow` entries (so a rule
//! carves exceptions out of what it allows), and within one list a later
//! entry beats an earlier one (which only changes which entry is named as
//! the reason). The highest-precedence entry that applies decides; if none
//! does, the answer is no. Root and the broker's own uid are privileged and
//! always allowed; no rule can lock them out.
//!
//! Patterns against patterns. A subscription asks for a pattern, not a
//! subject, and it must not let a peer receive a single subject it may not
//! receive. [`Snapshot::decide_pattern`] scans from the highest precedence
//! down: a `deny` entry that meets the pattern anywhere refuses it, an
//! `allow` entry that covers all of it accepts it, and an `allow` that only
//! overlaps it decides nothing. This is sound (an accepted pattern matches
//! only subjects [`Snapshot::decide`] allows) but deliberately incomplete:
//! a pattern that only several `allow` entries cover together is refused,
//! since proving coverage by a union of patterns is not worth its cost or
//! its surprises; the peer subscribes to the narrower patterns instead.
//!
//! Shape. [`Rules::parse`] does every check up front (syntax, actions,
//! patterns, user and group names through [`Accounts`]) and files the
//! entries by action, in precedence order, once. [`Rules::snapshot`] then
//! compiles one peer's view in a single pass over the entries (it runs at
//! every connect, and for every peer on reload): the indices of the entries
//! whose rule applies, grouped by action. A decision is a backwards scan of
//! one action's group. Errors carry the 1-based line of the offending item.
//!
//! No I/O: text in, decisions out. The daemon reads the policy file and
//! `/etc/passwd` and `/etc/group`, and hands their text here.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use shmbus_proto::subject::{pattern_covers_valid, patterns_intersect_valid, validate_pattern};

#[cfg(test)]
use shmbus_proto::subject::pattern_matches;

use super::router::Router;

/// Something a peer may be allowed to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Connect,
    Publish,
    Subscribe,
    Own,
    Call,
    ChannelPublish,
    ChannelRead,
    Monitor,
    Introspect,
}

impl Action {
    pub const ALL: [Action; 9] = [
        Action::Connect,
        Action::Publish,
        Action::Subscribe,
        Action::Own,
        Action::Call,
        Action::ChannelPublish,
        Action::ChannelRead,
        Action::Monitor,
        Action::Introspect,
    ];

    /// The action named as in a policy file (`channel-publish`), or `None`.
    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Connect => "connect",
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::Own => "own",
            Action::Call => "call",
            Action::ChannelPublish => "channel-publish",
            Action::ChannelRead => "channel-read",
            Action::Monitor => "monitor",
            Action::Introspect => "introspect",
        }
    }

    /// Whether entries of this action carry a subject or name pattern.
    pub fn takes_pattern(self) -> bool {
        !matches!(self, Action::Connect | Action::Monitor | Action::Introspect)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Users and groups by name, parsed from `/etc/passwd`- and
/// `/etc/group`-format text (the daemon reads the files; this module never
/// does I/O). Blank lines, `#` comments, NIS `+`/`-` lines and malformed
/// lines are skipped; when a name appears twice the first line wins, as
/// with `getpwnam`.
#[derive(Clone, Debug, Default)]
pub struct Accounts {
    users: HashMap<String, u32>,
    groups: HashMap<String, u32>,
}

impl Accounts {
    pub fn parse(passwd: &str, group: &str) -> Accounts {
        // name:password:uid:gid:gecos:home:shell and name:password:gid:members.
        Accounts { users: parse_db(passwd, 7), groups: parse_db(group, 4) }
    }

    /// The uid of a user name.
    pub fn user(&self, name: &str) -> Option<u32> {
        self.users.get(name).copied()
    }

    /// The gid of a group name.
    pub fn group(&self, name: &str) -> Option<u32> {
        self.groups.get(name).copied()
    }
}

/// `name → id` from lines of exactly `fields` colon-separated fields, the
/// id in the third.
fn parse_db(text: &str, fields: usize) -> HashMap<String, u32> {
    let mut ids = HashMap::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim_start().starts_with('#') || line.split(':').count() != fields {
            continue;
        }
        let mut parts = line.split(':');
        let (Some(name), Some(id)) = (parts.next(), parts.nth(1)) else { continue };
        let bad_name = name.is_empty() || name.starts_with(['+', '-']) || name.contains(char::is_whitespace);
        let Ok(id) = id.parse::<u32>() else { continue };
        if !bad_name {
            if let MapEntry::Vacant(v) = ids.entry(name.to_string()) {
                v.insert(id);
            }
        }
    }
    ids
}

/// Why a policy file was refused: where, and what is wrong there.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct RulesError {
    /// 1-based line in the file.
    pub line: usize,
    pub message: String,
}

/// A parsed, resolved policy file. Cloning is cheap (shared).
#[derive(Clone, Debug)]
pub struct Rules {
    inner: Arc<Compiled>,
}

#[derive(Debug)]
struct Compiled {
    rules: Vec<Rule>,
    /// Every entry of every rule, grouped by action (in [`Action::ALL`]
    /// order) and, within a group, in increasing precedence.
    entries: Vec<RuleEntry>,
    /// `entries[starts[a]..starts[a + 1]]` are the entries of action `a`.
    starts: [usize; 10],
    /// Per action, its entries' patterns in the router's trie, keyed by
    /// entry index: a decision on a subject looks up the entries that
    /// match it, whatever their number, instead of trying each.
    tries: Vec<Router<u32>>,
}

#[derive(Debug)]
struct Rule {
    /// All must hold: the peer's uid is each of `uids`, and each of `gids`
    /// is its primary or one of its supplementary gids.
    uids: Vec<u32>,
    gids: Vec<u32>,
    entries: usize,
}

impl Rule {
    fn applies(&self, uid: u32, gids: &[u32]) -> bool {
        self.uids.iter().all(|&u| u == uid) && self.gids.iter().all(|g| gids.contains(g))
    }
}

#[derive(Debug)]
struct RuleEntry {
    /// 0-based index into `Compiled::rules`.
    rule: usize,
    line: usize,
    allow: bool,
    /// `None` for actions that take no pattern: it applies to everything.
    pattern: Option<Box<str>>,
    /// As a person would write it: `deny publish sensors.secret.>`.
    text: Arc<str>,
}

impl RuleEntry {
    fn verdict(&self) -> Verdict {
        Verdict {
            allowed: self.allow,
            reason: Reason::Entry { rule: self.rule + 1, line: self.line, entry: Arc::clone(&self.text) },
        }
    }
}

// The file as TOML sees it. Spans are byte ranges, turned into lines.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDe {
    #[serde(default)]
    rule: Vec<Spanned<RuleDe>>,
}

type MatchDe = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleDe {
    #[serde(rename = "match")]
    matcher: Option<Spanned<MatchDe>>,
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
}

/// The 1-based line holding byte `offset` of `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
}

impl Rules {
    /// Parses and checks a whole policy file. The error is the first
    /// problem found: TOML syntax and type errors first, then each rule's
    /// `match` and entries in file order.
    pub fn parse(text: &str, accounts: &Accounts) -> Result<Rules, RulesError> {
        let fail = |offset: usize, message: String| RulesError { line: line_of(text, offset), message };
        let file: FileDe = toml::from_str(text)
            .map_err(|e| fail(e.span().map_or(0, |s| s.start), e.message().to_string()))?;

        let mut rules = Vec::with_capacity(file.rule.len());
        let mut entries = Vec::new();
        for (index, spanned) in file.rule.iter().enumerate() {
            let rule = spanned.get_ref();
            let Some(matcher) = &rule.matcher else {
                return Err(fail(
                    spanned.span().start,
                    "rule has no `match`; write `match = {}` for a rule about everyone".into(),
                ));
            };
            let (uids, gids) = resolve_match(matcher.get_ref(), accounts, &fail)?;
            // Increasing precedence: allows, then denies, each in list order.
            let items = rule.allow.iter().map(|i| (true, i)).chain(rule.deny.iter().map(|i| (false, i)));
            for (allow, item) in items {
                let (action, pattern) =
                    parse_entry(item.get_ref()).map_err(|m| fail(item.span().start, m))?;
                let verdict = if allow { "allow" } else { "deny" };
                let shown: Arc<str> = match &pattern {
                    Some(p) => format!("{verdict} {action} {p}").into(),
                    None => format!("{verdict} {action}").into(),
                };
                let line = line_of(text, item.span().start);
                entries.push((action, RuleEntry { rule: index, line, allow, pattern, text: shown }));
            }
            rules.push(Rule { uids, gids, entries: rule.allow.len() + rule.deny.len() });
        }

        if u32::try_from(entries.len()).is_err() {
            return Err(fail(text.len(), "too many entries".into()));
        }
        // A stable sort keeps precedence order within each action.
        entries.sort_by_key(|(action, _)| action.index());
        let mut starts = [0; 10];
        for (a, start) in starts.iter_mut().enumerate() {
            *start = entries.partition_point(|(action, _)| action.index() < a);
        }
        let entries: Vec<RuleEntry> = entries.into_iter().map(|(_, e)| e).collect();
        let mut tries: Vec<Router<u32>> = (0..Action::ALL.len()).map(|_| Router::new()).collect();
        for (a, window) in starts.windows(2).enumerate() {
            for (i, entry) in entries.iter().enumerate().take(window[1]).skip(window[0]) {
                if let Some(p) = &entry.pattern {
                    // Valid patterns of at most MAX_SUBJECT_DEPTH tokens,
                    // which the router always holds.
                    tries[a].insert(p, i as u32);
                }
            }
        }
        Ok(Rules { inner: Arc::new(Compiled { rules, entries, starts, tries }) })
    }

    pub fn rule_count(&self) -> usize {
        self.inner.rules.len()
    }

    /// The compiled per-peer view: only the entries of rules whose `match`
    /// applies to this peer (`gids` holds its primary and supplementary
    /// gids), in precedence order. uid 0 and `broker_uid` are privileged:
    /// everything is allowed. One pass over the entries.
    pub fn snapshot(&self, uid: u32, gids: &[u32], broker_uid: u32) -> Snapshot {
        let compiled = &*self.inner;
        if uid == 0 || uid == broker_uid {
            return Snapshot {
                rules: Arc::clone(&self.inner),
                picked: Box::default(),
                starts: [0; 10],
                applies: Box::default(),
                privileged: true,
            };
        }
        let applies: Vec<bool> = compiled.rules.iter().map(|r| r.applies(uid, gids)).collect();
        let count = compiled.rules.iter().zip(&applies).filter(|(_, &a)| a).map(|(r, _)| r.entries).sum();
        let mut picked = Vec::with_capacity(count);
        // Entry counts fit in u32: `parse` refuses more.
        let mut starts = [0; 10];
        for (a, window) in compiled.starts.windows(2).enumerate() {
            starts[a] = picked.len() as u32;
            let range = window[0]..window[1];
            picked.extend(range.filter(|&i| applies[compiled.entries[i].rule]).map(|i| i as u32));
        }
        starts[Action::ALL.len()] = picked.len() as u32;
        Snapshot {
            rules: Arc::clone(&self.inner),
            picked: picked.into_boxed_slice(),
            starts,
            applies: applies.into_boxed_slice(),
            privileged: false,
        }
    }
}

type Fail<'a> = &'a dyn Fn(usize, String) -> RulesError;

/// A rule's `match` table as the uids and gids it requires.
fn resolve_match(
    matcher: &MatchDe,
    accounts: &Accounts,
    fail: Fail<'_>,
) -> Result<(Vec<u32>, Vec<u32>), RulesError> {
    // In file order, so the first mistake reported is the first one written.
    let mut keys: Vec<_> = matcher.iter().collect();
    keys.sort_by_key(|(k, _)| k.span().start);
    let (mut uids, mut gids) = (Vec::new(), Vec::new());
    for (key, value) in keys {
        let at = value.span().start;
        let id = |what: &str| match value.get_ref() {
            toml::Value::Integer(n) => u32::try_from(*n)
                .map_err(|_| fail(at, format!("{what} {n} is out of range (0..={})", u32::MAX))),
            _ => Err(fail(at, format!("{what} must be a number, as in {{ {what} = 1000 }}"))),
        };
        let name = |what: &str, example: &str| match value.get_ref() {
            toml::Value::String(s) => Ok(s.clone()),
            _ => {
                Err(fail(at, format!("{what} must be a name in quotes, as in {{ {what} = \"{example}\" }}")))
            }
        };
        match key.get_ref().as_str() {
            "uid" => uids.push(id("uid")?),
            "gid" => gids.push(id("gid")?),
            "user" => {
                let user = name("user", "nobody")?;
                uids.push(accounts.user(&user).ok_or_else(|| fail(at, format!("unknown user \"{user}\"")))?);
            }
            "group" => {
                let group = name("group", "adm")?;
                gids.push(
                    accounts.group(&group).ok_or_else(|| fail(at, format!("unknown group \"{group}\"")))?,
                );
            }
            other => {
                return Err(fail(
                    key.span().start,
                    format!("unknown key `{other}` in match (expected uid, user, gid or group)"),
                ))
            }
        }
    }
    Ok((uids, gids))
}

/// `ACTION` or `ACTION PATTERN`, checked.
fn parse_entry(entry: &str) -> Result<(Action, Option<Box<str>>), String> {
    let mut words = entry.split_whitespace();
    let Some(word) = words.next() else {
        return Err("empty entry; expected an action such as \"connect\" or \"publish a.>\"".into());
    };
    let Some(action) = Action::parse(word) else {
        let known: Vec<&str> = Action::ALL.iter().map(|a| a.as_str()).collect();
        return Err(format!("unknown action `{word}` (expected one of {})", known.join(", ")));
    };
    let rest: Vec<&str> = words.collect();
    if !action.takes_pattern() {
        return match rest.first() {
            None => Ok((action, None)),
            Some(p) => Err(format!("`{action}` takes no pattern, but `{p}` follows it")),
        };
    }
    match rest[..] {
        [] => Err(format!("`{action}` needs a pattern, as in \"{action} sensors.>\"")),
        [pattern] => match validate_pattern(pattern) {
            Ok(()) => Ok((action, Some(pattern.into()))),
            Err(e) => Err(format!("bad pattern `{pattern}`: {e}")),
        },
        _ => Err(format!("`{action}` takes one pattern, found {}: {}", rest.len(), rest.join(" "))),
    }
}

/// One peer's compiled view of the rules: cheap to query, held per
/// connection, replaced on reload.
#[derive(Clone, Debug)]
pub struct Snapshot {
    rules: Arc<Compiled>,
    /// Indices into `rules.entries` of the entries that apply to the peer,
    /// grouped by action, each group in increasing precedence.
    picked: Box<[u32]>,
    /// `picked[starts[a]..starts[a + 1]]` is action `a`'s group.
    starts: [u32; 10],
    /// Per rule: whether its `match` holds for the peer.
    applies: Box<[bool]>,
    privileged: bool,
}

impl Snapshot {
    /// How many entries of `action` apply to this peer: what deciding a
    /// pattern for it may cost, in entries looked at.
    pub fn entry_count(&self, action: Action) -> usize {
        (self.starts[action.index() + 1] - self.starts[action.index()]) as usize
    }

    /// Root or the broker's own uid: everything is allowed.
    pub fn is_privileged(&self) -> bool {
        self.privileged
    }

    /// The entries of one action that apply, highest precedence first.
    fn entries(&self, action: Action) -> impl Iterator<Item = &RuleEntry> {
        let (a, b) = (self.starts[action.index()] as usize, self.starts[action.index() + 1] as usize);
        self.picked[a..b].iter().rev().map(|&i| &self.rules.entries[i as usize])
    }

    /// For a concrete subject or name (`publish`, `own`, `call`,
    /// `channel-publish`; `subscribe`/`channel-read` asked about one
    /// subject), or for `connect`, `monitor`, `introspect` with `subject`
    /// `""`: the highest-precedence entry of this action whose pattern
    /// matches decides; if none does, no. `subject` is trusted to be a valid
    /// subject (the caller has validated it).
    pub fn decide(&self, action: Action, subject: &str) -> Verdict {
        if self.privileged {
            return Verdict::PRIVILEGED;
        }
        if !action.takes_pattern() {
            return self.entries(action).next().map_or(Verdict::NO_RULE, RuleEntry::verdict);
        }
        // The entries whose pattern matches, from the trie; the one of
        // highest precedence (highest index) among those that apply to
        // this peer decides.
        let mut matching = Vec::new();
        self.rules.tries[action.index()].matches(subject, &mut matching);
        let entries = &self.rules.entries;
        matching
            .into_iter()
            .filter(|&i| self.applies[entries[i as usize].rule])
            .max()
            .map_or(Verdict::NO_RULE, |i| entries[i as usize].verdict())
    }

    /// [`Snapshot::decide`] the slow way, trying every entry in turn: what
    /// the trie must agree with.
    #[cfg(test)]
    fn decide_by_scan(&self, action: Action, subject: &str) -> Verdict {
        if self.privileged {
            return Verdict::PRIVILEGED;
        }
        self.entries(action)
            .find(|e| e.pattern.as_deref().is_none_or(|p| pattern_matches(p, subject)))
            .map_or(Verdict::NO_RULE, RuleEntry::verdict)
    }

    /// For `subscribe` / `channel-read` with a pattern: yes only if every
    /// subject the pattern can match is allowed. From the highest
    /// precedence down, a `deny` entry that intersects the pattern refuses
    /// it; an `allow` entry that covers the pattern accepts it; an `allow`
    /// that only overlaps it decides nothing. If no entry decides, no.
    ///
    /// Sound: whatever this accepts, [`Snapshot::decide`] allows for every
    /// subject the pattern matches. Incomplete on purpose: a pattern that
    /// only several `allow` entries cover together is refused
    /// ([`Reason::NotCovered`]). An invalid pattern is refused. For an
    /// action without a pattern, this is [`Snapshot::decide`].
    pub fn decide_pattern(&self, action: Action, pattern: &str) -> Verdict {
        if self.privileged {
            return Verdict::PRIVILEGED;
        }
        if !action.takes_pattern() {
            return self.decide(action, pattern);
        }
        // Validated once here; the entries were when the file was loaded.
        // So each entry costs the tokens compared up to the first
        // difference, not a validation of both patterns.
        if validate_pattern(pattern).is_err() {
            return Verdict::NO_RULE;
        }
        let mut overlapped = false;
        for e in self.entries(action) {
            let Some(p) = e.pattern.as_deref() else { continue };
            if !e.allow {
                if patterns_intersect_valid(p, pattern) {
                    return e.verdict();
                }
            } else if pattern_covers_valid(p, pattern) {
                return e.verdict();
            } else if !overlapped && patterns_intersect_valid(p, pattern) {
                overlapped = true;
            }
        }
        let reason = if overlapped { Reason::NotCovered } else { Reason::NoRule };
        Verdict { allowed: false, reason }
    }
}

/// A decision and what made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub reason: Reason,
}

impl Verdict {
    const PRIVILEGED: Verdict = Verdict { allowed: true, reason: Reason::Privileged };
    const NO_RULE: Verdict = Verdict { allowed: false, reason: Reason::NoRule };
}

/// What decided a [`Verdict`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Root or the broker's own uid.
    Privileged,
    /// This entry of the file.
    Entry {
        /// 1-based index of the rule in the file.
        rule: usize,
        /// 1-based line of the entry.
        line: usize,
        /// As written, normalized: `deny publish sensors.secret.>`.
        entry: Arc<str>,
    },
    /// No entry of the action applies (the default is no).
    NoRule,
    /// Allow entries overlap the pattern, but none covers all of it.
    NotCovered,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Privileged => f.write_str("root and the broker's uid may do everything"),
            Reason::Entry { rule, line, entry } => write!(f, "rule {rule} (line {line}): {entry}"),
            Reason::NoRule => f.write_str("no rule allows it"),
            Reason::NotCovered => f.write_str("no single rule allows every subject the pattern matches"),
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "allow" } else { "deny" };
        write!(f, "{verdict}: {}", self.reason)
    }
}

#[cfg(test)]
mod tests {
    /// The README's worked example, checked row by row against its table.
    #[test]
    fn the_readme_example_decides_as_its_table_says() {
        let readme = include_str!("../../../README.md");
        let policy = readme.split("## Policy").nth(1).expect("a Policy section");
        let block =
            policy.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).expect("a toml block");
        let accounts = super::Accounts::parse(
            "thermo:x:990:990::/:/bin/false\nlogbook:x:991:991::/:/bin/false\n",
            "video:x:44:\nusers:x:100:\n",
        );
        let rules = super::Rules::parse(block, &accounts).unwrap();
        let desktop = rules.snapshot(1000, &[1000, 100], 0);
        let thermo = rules.snapshot(990, &[990], 0);
        let video = rules.snapshot(1001, &[1001, 44], 0);
        let logbook = rules.snapshot(991, &[991], 0);
        let nobody = rules.snapshot(65534, &[65534], 0);
        use super::Action::*;
        assert!(desktop.decide_pattern(Subscribe, "sensors.kitchen.>").allowed);
        let v = desktop.decide_pattern(Subscribe, "sensors.>");
        assert!(!v.allowed);
        assert_eq!(v.to_string(), "deny: rule 4 (line 20): deny subscribe sensors.calibration.>");
        assert!(!desktop.decide_pattern(Subscribe, ">").allowed);
        assert!(desktop.decide(Call, "pub.thermo.now").allowed);
        assert!(thermo.decide(Publish, "sensors.calibration.t0").allowed);
        assert!(!thermo.decide(ChannelPublish, "video.front").allowed);
        assert!(video.decide(ChannelPublish, "video.front").allowed);
        assert!(desktop.decide_pattern(ChannelRead, "video.front").allowed);
        assert!(logbook.decide_pattern(Subscribe, "sensors.>").allowed);
        assert!(nobody.decide(Connect, "").allowed);
        assert!(!nobody.decide_pattern(Subscribe, "sensors.kitchen.>").allowed);
        assert!(nobody.decide_pattern(Subscribe, "$SYS.name.>").allowed);
    }

    use super::*;

    const PASSWD: &str = "\
# comment
root:x:0:0:root:/root:/bin/bash
alice:x:1000:1000:Alice,,,:/home/alice:/bin/bash
bob:x:1001:1001::/home/bob:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
broken line without colons
short:x:5
badid:x:notanumber:1::/:/bin/sh
+nisuser::::::
alice:x:4242:4242:second alice:/:/bin/sh
";
    const GROUP: &str = "\
root:x:0:
adm:x:4:syslog,alice
sensors:x:200:alice
  # indented comment
users:x:100:
bad:x:-1:
";

    const EXAMPLE: &str = r#"# Rules are read top to bottom; for a given peer and action, the last matching rule decides.
# Root and the broker's own uid may always do everything.
[[rule]]
match = {}                      # everyone: {}, or { uid = 1000 }, { user = "nobody" }, { gid = 100 }, { group = "adm" }
allow = ["connect", "subscribe public.>", "call org.example.>"]

[[rule]]
match = { group = "sensors" }
allow = ["publish sensors.>", "own sensors.>", "channel-publish video.>"]
deny  = ["publish sensors.secret.>"]

[[rule]]
match = { user = "nobody" }
deny  = ["connect"]
"#;

    const BROKER: u32 = 999;

    fn accounts() -> Accounts {
        Accounts::parse(PASSWD, GROUP)
    }

    fn rules(text: &str) -> Rules {
        Rules::parse(text, &accounts()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> RulesError {
        Rules::parse(text, &accounts()).expect_err("should be refused")
    }

    fn shown(v: Verdict) -> String {
        v.to_string()
    }

    #[test]
    fn actions() {
        for a in Action::ALL {
            assert_eq!(Action::parse(a.as_str()), Some(a));
            assert_eq!(a.to_string(), a.as_str());
            assert_eq!(Action::ALL[a.index()], a);
        }
        assert_eq!(Action::parse("Publish"), None);
        assert_eq!(Action::parse("channel_read"), None);
        let plain: Vec<_> = Action::ALL.into_iter().filter(|a| !a.takes_pattern()).collect();
        assert_eq!(plain, [Action::Connect, Action::Monitor, Action::Introspect]);
    }

    #[test]
    fn accounts_parse() {
        let a = accounts();
        assert_eq!(a.user("root"), Some(0));
        assert_eq!(a.user("alice"), Some(1000), "the first line wins");
        assert_eq!(a.user("nobody"), Some(65534));
        assert_eq!(a.user("short"), None);
        assert_eq!(a.user("badid"), None);
        assert_eq!(a.user("+nisuser"), None);
        assert_eq!(a.user("broken line without colons"), None);
        assert_eq!(a.user("# comment"), None);
        assert_eq!(a.group("adm"), Some(4));
        assert_eq!(a.group("sensors"), Some(200));
        assert_eq!(a.group("users"), Some(100));
        assert_eq!(a.group("bad"), None);
        assert_eq!(a.group("alice"), None);
        let crlf = Accounts::parse("carol:x:7:7::/:/bin/sh\r\n", "g:x:8:\r\n");
        assert_eq!((crlf.user("carol"), crlf.group("g")), (Some(7), Some(8)));
        let empty = Accounts::default();
        assert_eq!(empty.user("root"), None);
    }

    #[test]
    fn the_example() {
        let r = rules(EXAMPLE);
        assert_eq!(r.rule_count(), 3);
        let sensor = r.snapshot(1000, &[1000, 200], BROKER);
        let other = r.snapshot(1001, &[1001], BROKER);
        let nobody = r.snapshot(65534, &[65534], BROKER);
        let root = r.snapshot(0, &[0], BROKER);

        assert!(sensor.decide(Action::Publish, "sensors.x").allowed);
        assert_eq!(
            shown(sensor.decide(Action::Publish, "sensors.x")),
            "allow: rule 2 (line 9): allow publish sensors.>"
        );
        assert_eq!(
            shown(sensor.decide(Action::Publish, "sensors.secret.x")),
            "deny: rule 2 (line 10): deny publish sensors.secret.>"
        );
        assert!(sensor.decide(Action::Own, "sensors.a").allowed);
        assert!(sensor.decide(Action::ChannelPublish, "video.cam0").allowed);
        assert!(!sensor.decide(Action::ChannelRead, "video.cam0").allowed);
        assert!(!other.decide(Action::Publish, "sensors.x").allowed);
        assert_eq!(shown(other.decide(Action::Publish, "sensors.x")), "deny: no rule allows it");

        for s in [&sensor, &other, &nobody] {
            assert!(s.decide_pattern(Action::Subscribe, "public.>").allowed);
            assert!(s.decide_pattern(Action::Subscribe, "public.a").allowed);
            assert!(s.decide_pattern(Action::Subscribe, "public.*.b").allowed);
            assert!(!s.decide_pattern(Action::Subscribe, ">").allowed);
            assert!(!s.decide_pattern(Action::Subscribe, "public").allowed);
            assert!(s.decide(Action::Call, "org.example.Thing").allowed);
            assert!(!s.decide(Action::Monitor, "").allowed);
            assert!(!s.decide(Action::Introspect, "").allowed);
            assert!(!s.is_privileged());
        }
        assert_eq!(shown(other.decide(Action::Connect, "")), "allow: rule 1 (line 5): allow connect");
        assert_eq!(shown(nobody.decide(Action::Connect, "")), "deny: rule 3 (line 14): deny connect");

        for privileged in [&root, &r.snapshot(BROKER, &[BROKER], BROKER)] {
            assert!(privileged.is_privileged());
            for a in Action::ALL {
                assert!(privileged.decide(a, "sensors.secret.x").allowed);
                assert!(privileged.decide_pattern(a, ">").allowed);
            }
            assert_eq!(
                shown(privileged.decide(Action::Monitor, "")),
                "allow: root and the broker's uid may do everything"
            );
        }
    }

    #[test]
    fn subscribing_needs_one_covering_rule() {
        let r = rules(
            r#"
[[rule]]
match = {}
allow = ["subscribe public.>", "subscribe sensors.>", "channel-read video.*"]
deny = ["subscribe sensors.secret.>"]

[[rule]]
match = { uid = 1001 }
allow = ["subscribe a.b", "subscribe a.*.c"]
"#,
        );
        let s = r.snapshot(1000, &[1000], BROKER);
        assert!(!s.decide_pattern(Action::Subscribe, ">").allowed);
        assert!(s.decide_pattern(Action::Subscribe, "public.*").allowed);
        assert!(s.decide_pattern(Action::Subscribe, "public.>").allowed);
        assert!(s.decide_pattern(Action::Subscribe, "sensors.public.*").allowed);
        // The deny carved out of the allow meets these patterns.
        for p in ["sensors.>", "sensors.*.x", "sensors.secret.a", "*.secret.>"] {
            let v = s.decide_pattern(Action::Subscribe, p);
            assert_eq!(shown(v), "deny: rule 1 (line 5): deny subscribe sensors.secret.>", "{p}");
        }
        assert!(s.decide(Action::Subscribe, "sensors.x").allowed);
        // Partly allowed: no single entry covers it.
        assert_eq!(
            shown(s.decide_pattern(Action::Subscribe, "*.x")),
            "deny: no single rule allows every subject the pattern matches"
        );
        assert_eq!(shown(s.decide_pattern(Action::Subscribe, "other.>")), "deny: no rule allows it");
        assert!(s.decide_pattern(Action::ChannelRead, "video.cam0").allowed);
        assert!(!s.decide_pattern(Action::ChannelRead, "video.>").allowed);
        assert!(!s.decide_pattern(Action::Subscribe, "public..x").allowed, "invalid pattern");
        // Two allows together cover a.*.c ∪ a.b, but neither covers a.>.
        let t = r.snapshot(1001, &[1001], BROKER);
        assert!(t.decide_pattern(Action::Subscribe, "a.b").allowed);
        assert!(t.decide_pattern(Action::Subscribe, "a.x.c").allowed);
        assert!(!t.decide_pattern(Action::Subscribe, "a.*").allowed);
        // Without a pattern, decide_pattern is decide.
        assert_eq!(s.decide_pattern(Action::Connect, ""), s.decide(Action::Connect, ""));
    }

    #[test]
    fn groups_and_several_keys() {
        let r = rules(
            r#"
[[rule]]
match = { group = "adm" }
allow = ["monitor"]

[[rule]]
match = { gid = 100 }
allow = ["introspect"]

[[rule]]
match = { uid = 1000, group = "sensors" }
allow = ["publish x"]

[[rule]]
match = { user = "alice", uid = 1001 }
allow = ["publish never"]
"#,
        );
        // Supplementary groups count as well as the primary one.
        let alice = r.snapshot(1000, &[1000, 4, 200], BROKER);
        assert!(alice.decide(Action::Monitor, "").allowed);
        assert!(!alice.decide(Action::Introspect, "").allowed);
        assert!(alice.decide(Action::Publish, "x").allowed);
        assert!(!alice.decide(Action::Publish, "never").allowed, "uid 1000 is not 1001");
        let primary = r.snapshot(1002, &[100], BROKER);
        assert!(primary.decide(Action::Introspect, "").allowed);
        assert!(!primary.decide(Action::Monitor, "").allowed);
        // In `sensors` but not uid 1000: both keys must hold.
        let other = r.snapshot(1001, &[1001, 200], BROKER);
        assert!(!other.decide(Action::Publish, "x").allowed);
        assert!(!other.decide(Action::Publish, "never").allowed);
    }

    #[test]
    fn later_rules_win_and_deny_beats_allow_within_a_rule() {
        let r = rules(
            r#"
[[rule]]
match = {}
allow = ["publish a.>"]

[[rule]]
match = { uid = 1000 }
deny = ["publish a.>"]

[[rule]]
match = { group = "adm" }
deny = ["publish a.b.secret"]
allow = ["publish a.b.>", "publish a.b.c"]
"#,
        );
        let alice = r.snapshot(1000, &[1000, 4], BROKER);
        assert_eq!(
            shown(alice.decide(Action::Publish, "a.b.c")),
            "allow: rule 3 (line 13): allow publish a.b.c"
        );
        assert_eq!(
            shown(alice.decide(Action::Publish, "a.b.d")),
            "allow: rule 3 (line 13): allow publish a.b.>"
        );
        assert_eq!(
            shown(alice.decide(Action::Publish, "a.b.secret")),
            "deny: rule 3 (line 12): deny publish a.b.secret"
        );
        assert_eq!(shown(alice.decide(Action::Publish, "a.c")), "deny: rule 2 (line 8): deny publish a.>");
        let not_adm = r.snapshot(1000, &[1000], BROKER);
        assert!(!not_adm.decide(Action::Publish, "a.b.c").allowed);
        let bob = r.snapshot(1001, &[1001], BROKER);
        assert_eq!(shown(bob.decide(Action::Publish, "a.c")), "allow: rule 1 (line 4): allow publish a.>");
    }

    #[test]
    fn empty_file_allows_nothing() {
        let r = rules("# nothing yet\n");
        assert_eq!(r.rule_count(), 0);
        let s = r.snapshot(1000, &[1000], BROKER);
        for a in Action::ALL {
            assert_eq!(s.decide(a, "x"), Verdict { allowed: false, reason: Reason::NoRule });
        }
        assert!(r.snapshot(0, &[], BROKER).decide(Action::Connect, "").allowed);
    }

    #[test]
    fn error_lines() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "[[rule]]\nmatch = {}\nallow = [\"connect\",\n  \"frobnicate x\"]\n",
                4,
                "unknown action `frobnicate`",
            ),
            ("[[rule]]\nmatch = {}\n\ndeny = [\"publish a..b\"]\n", 4, "bad pattern `a..b`"),
            ("[[rule]]\nmatch = {}\nallow = [\"publish a.>.b\"]\n", 3, "'>' may only be the last token"),
            ("[[rule]]\nmatch = {}\nallow = [\"connect now\"]\n", 3, "`connect` takes no pattern"),
            ("[[rule]]\nmatch = {}\nallow = [\"monitor >\"]\n", 3, "`monitor` takes no pattern"),
            ("[[rule]]\nmatch = {}\nallow = [\"publish\"]\n", 3, "`publish` needs a pattern"),
            ("[[rule]]\nmatch = {}\nallow = [\"call a b\"]\n", 3, "`call` takes one pattern, found 2"),
            ("[[rule]]\nmatch = {}\nallow = [\"  \"]\n", 3, "empty entry"),
            (
                "[[rule]]\nmatch = {}\n\n[[rule]]\nmatch = { user = \"mallory\" }\n",
                5,
                "unknown user \"mallory\"",
            ),
            ("[[rule]]\nmatch = {\n  group = \"wheel\" }\n", 3, "unknown group \"wheel\""),
            ("[[rule]]\nmatch = { uid = 1, usr = \"x\" }\n", 2, "unknown key `usr` in match"),
            ("[[rule]]\nmatch = {}\nalow = [\"connect\"]\n", 3, "unknown field `alow`"),
            ("[[rules]]\nmatch = {}\n", 1, "unknown field `rules`"),
            ("\n[[rule]]\nallow = [\"connect\"]\n", 2, "rule has no `match`"),
            ("[[rule]]\nmatch = {}\n\n\n[[rule]]\n\nallow = []\n", 5, "rule has no `match`"),
            ("[[rule]]\nmatch = { uid = \"1000\" }\n", 2, "uid must be a number"),
            ("[[rule]]\nmatch = { gid = 4294967296 }\n", 2, "gid 4294967296 is out of range"),
            ("[[rule]]\nmatch = { uid = -1 }\n", 2, "uid -1 is out of range"),
            ("[[rule]]\nmatch = { user = 1000 }\n", 2, "user must be a name in quotes"),
            ("[[rule]]\nmatch = 5\n", 2, "expected a map"),
            ("[[rule]]\nmatch = {}\nallow = \"connect\"\n", 3, "expected a sequence"),
            ("[[rule]]\nmatch = {}\ndeny = [1]\n", 3, "expected a string"),
            ("[[rule]]\nmatch = {}\n\nallow = [\"connect\"\n", 4, ""),
            ("[[rule]]\nmatch = {\n", 2, "unclosed inline table"),
            ("[[rule]]\nmatch = {}\nmatch = {}\n", 3, "duplicate key"),
        ];
        for &(text, line, message) in cases {
            let e = err(text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(message), "{text:?}: {e}");
            assert_eq!(e.to_string(), format!("line {line}: {}", e.message));
        }
    }

    mod soundness {
        use super::*;
        use proptest::prelude::*;

        /// Every subject of 1..=5 tokens over {a, b, c}; `c` stands for
        /// any token the patterns below do not name.
        fn subjects() -> Vec<String> {
            let mut all: Vec<String> = Vec::new();
            let mut level = vec![String::new()];
            for _ in 0..5 {
                level = level
                    .iter()
                    .flat_map(|p| {
                        ["a", "b", "c"].map(|t| if p.is_empty() { t.into() } else { format!("{p}.{t}") })
                    })
                    .collect();
                all.extend(level.iter().cloned());
            }
            all
        }

        fn pattern() -> impl Strategy<Value = String> {
            (prop::collection::vec(prop::sample::select(vec!["a", "b", "*"]), 0..=3), any::<bool>()).prop_map(
                |(mut tokens, tail)| {
                    if tail || tokens.is_empty() {
                        tokens.push(">");
                    }
                    tokens.join(".")
                },
            )
        }

        /// (applies to the peer?, allow patterns, deny patterns)
        fn rule() -> impl Strategy<Value = (bool, Vec<String>, Vec<String>)> {
            (any::<bool>(), prop::collection::vec(pattern(), 0..3), prop::collection::vec(pattern(), 0..3))
        }

        fn file(rules: &[(bool, Vec<String>, Vec<String>)]) -> String {
            let list = |ps: &[String]| {
                ps.iter().map(|p| format!("\"subscribe {p}\"")).collect::<Vec<_>>().join(", ")
            };
            rules
                .iter()
                .map(|(mine, allow, deny)| {
                    let uid = if *mine { 1000 } else { 1001 };
                    format!(
                        "[[rule]]\nmatch = {{ uid = {uid} }}\nallow = [{}]\ndeny = [{}]\n",
                        list(allow),
                        list(deny)
                    )
                })
                .collect()
        }

        proptest! {
            #[test]
            fn an_allowed_pattern_matches_only_allowed_subjects(
                rules in prop::collection::vec(rule(), 0..5),
                patterns in prop::collection::vec(pattern(), 1..8),
            ) {
                let r = Rules::parse(&file(&rules), &Accounts::default()).unwrap();
                let s = r.snapshot(1000, &[1000], 0);
                let subjects = subjects();
                for p in &patterns {
                    if s.decide_pattern(Action::Subscribe, p).allowed {
                        for subject in subjects.iter().filter(|s| pattern_matches(p, s)) {
                            prop_assert!(s.decide(Action::Subscribe, subject).allowed, "{} via {}", subject, p);
                        }
                    }
                }
                // The trie finds exactly what trying every entry finds,
                // for this peer and for one no rule is about.
                let other = r.snapshot(1002, &[1002], 0);
                for subject in &subjects {
                    prop_assert_eq!(s.decide(Action::Subscribe, subject), s.decide_by_scan(Action::Subscribe, subject));
                    prop_assert_eq!(
                        other.decide(Action::Subscribe, subject),
                        other.decide_by_scan(Action::Subscribe, subject)
                    );
                }
                // On a concrete subject, both ways of deciding agree exactly.
                for subject in subjects.iter().take(40) {
                    prop_assert_eq!(
                        s.decide_pattern(Action::Subscribe, subject),
                        s.decide(Action::Subscribe, subject)
                    );
                }
            }
        }
    }
}
