//! Well-known names: who owns what, who waits, and who gets a request
//! (dbus-broker's `name.c`, with NATS queue groups as shared names).
//!
//! Model: a name is a subject without wildcards. It is either *exclusive*
//! — one primary owner and a FIFO queue of askers, with D-Bus's flags
//! (`allow_replacement` on the owner's side, `replace_existing` and
//! `do_not_queue` on the asker's) — or *shared*, decided by its first
//! owner: every client that asks with `shared` becomes a member, and
//! requests go to the members in turn. An asker whose `shared` flag does
//! not match the name's kind is told `Exists`. The primary owner of a
//! shared name is its longest-standing member.
//!
//! Every change of a name's primary owner is returned to the caller as an
//! [`OwnerChange`], which the bus publishes on `$SYS.name.<name>`, in the
//! order the changes happened. Each owner and queue entry holds a
//! [`Charge`] against its uid's `Names` quota; dropping the entry releases
//! it. No I/O; keyed by peer ids, which are never reused.

use std::collections::BTreeMap;

use shmbus_proto::frame::{NameFlags, NameInfo, NameResult};
use shmbus_proto::limits::MAX_NAME_INFO_IDS;

use super::peer::PeerId;
use super::quota::Charge;

/// One owner or queued asker.
#[derive(Debug)]
pub struct Entry {
    pub peer: PeerId,
    pub flags: NameFlags,
    pub charge: Charge,
}

#[derive(Debug)]
pub struct Name {
    /// Exclusive: the primary owner first, then the queue. Shared: the
    /// members, longest-standing first.
    entries: Vec<Entry>,
    shared: bool,
    /// Shared: the member that gets the next request.
    turn: usize,
}

impl Name {
    fn primary(&self) -> Option<PeerId> {
        self.entries.first().map(|e| e.peer)
    }
}

/// A change of a name's primary owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerChange {
    pub name: String,
    pub old: Option<PeerId>,
    pub new: Option<PeerId>,
}

/// Every name, in byte order (for paged introspection).
#[derive(Debug, Default)]
pub struct Names {
    by_name: BTreeMap<String, Name>,
}

impl Names {
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The primary owner of `name` and how many share it.
    pub fn owner(&self, name: &str) -> (Option<PeerId>, u32) {
        match self.by_name.get(name) {
            None => (None, 0),
            Some(n) if n.shared => (n.primary(), n.entries.len() as u32),
            Some(n) => (n.primary(), u32::from(n.primary().is_some())),
        }
    }

    /// Whether `peer` owns or waits for `name` (so asking again costs no
    /// new charge).
    pub fn holds(&self, name: &str, peer: PeerId) -> bool {
        self.by_name.get(name).is_some_and(|n| n.entries.iter().any(|e| e.peer == peer))
    }

    /// `peer` asks for `name`. `charge` pays for a new entry; it is dropped
    /// (released) when no entry is made.
    pub fn request(
        &mut self,
        name: &str,
        peer: PeerId,
        flags: NameFlags,
        charge: Charge,
    ) -> (NameResult, Option<OwnerChange>) {
        let Some(n) = self.by_name.get_mut(name) else {
            let entries = vec![Entry { peer, flags, charge }];
            self.by_name.insert(name.to_owned(), Name { entries, shared: flags.shared, turn: 0 });
            let change = OwnerChange { name: name.to_owned(), old: None, new: Some(peer) };
            return (NameResult::PrimaryOwner, Some(change));
        };
        if n.shared != flags.shared {
            return (NameResult::Exists, None);
        }
        if n.shared {
            if let Some(e) = n.entries.iter_mut().find(|e| e.peer == peer) {
                e.flags = flags;
                return (NameResult::AlreadyOwner, None);
            }
            n.entries.push(Entry { peer, flags, charge });
            return (NameResult::PrimaryOwner, None);
        }
        let old = n.primary();
        if old == Some(peer) {
            n.entries[0].flags = flags;
            return (NameResult::AlreadyOwner, None);
        }
        let queued_at = n.entries.iter().position(|e| e.peer == peer);
        if n.entries[0].flags.allow_replacement && flags.replace_existing {
            // The asker takes over; it may have waited in the queue.
            let entry = match queued_at {
                Some(i) => {
                    let mut e = n.entries.remove(i);
                    e.flags = flags;
                    e
                }
                None => Entry { peer, flags, charge },
            };
            n.entries.insert(0, entry);
            // The old owner waits in the queue, first, unless it said it
            // would not.
            if n.entries[1].flags.do_not_queue {
                n.entries.remove(1);
            }
            let change = OwnerChange { name: name.to_owned(), old, new: Some(peer) };
            return (NameResult::PrimaryOwner, Some(change));
        }
        if flags.do_not_queue {
            if let Some(i) = queued_at {
                n.entries.remove(i);
            }
            return (NameResult::Exists, None);
        }
        match queued_at {
            Some(i) => n.entries[i].flags = flags,
            None => n.entries.push(Entry { peer, flags, charge }),
        }
        (NameResult::InQueue, None)
    }

    /// `peer` gives up `name` (or its place in the queue).
    pub fn release(&mut self, name: &str, peer: PeerId) -> (NameResult, Option<OwnerChange>) {
        let Some(n) = self.by_name.get_mut(name) else { return (NameResult::NonExistent, None) };
        let Some(i) = n.entries.iter().position(|e| e.peer == peer) else {
            return (NameResult::NotOwner, None);
        };
        let old = n.primary();
        n.entries.remove(i);
        if n.turn >= n.entries.len() {
            n.turn = 0;
        }
        let new = n.primary();
        if new.is_none() {
            self.by_name.remove(name);
        }
        let change = (old != new).then(|| OwnerChange { name: name.to_owned(), old, new });
        (NameResult::Released, change)
    }

    /// Every name `peer` owns or waits for, given up (it left).
    pub fn release_all(&mut self, peer: PeerId, held: &[String]) -> Vec<OwnerChange> {
        held.iter().filter_map(|name| self.release(name, peer).1).collect()
    }

    /// Who gets the next request to `name`: the primary owner, or the
    /// shared members in turn.
    pub fn route(&mut self, name: &str) -> Option<PeerId> {
        let n = self.by_name.get_mut(name)?;
        if !n.shared {
            return n.primary();
        }
        let pick = n.entries.get(n.turn % n.entries.len().max(1)).map(|e| e.peer);
        n.turn = (n.turn + 1) % n.entries.len().max(1);
        pick
    }

    /// Names after `after`, in byte order, as introspection shows them.
    pub fn infos_after<'a>(&'a self, after: Option<&str>) -> impl Iterator<Item = NameInfo> + 'a {
        use std::ops::Bound;
        let start = match after {
            Some(a) => Bound::Excluded(a.to_owned()),
            None => Bound::Unbounded,
        };
        self.by_name.range((start, Bound::Unbounded)).map(|(name, n)| {
            // At most MAX_NAME_INFO_IDS listed (owners first), so the
            // item fits a packet however many clients share the name (an
            // item that did not fit was never sent, and its page never
            // ended); the counts are whole.
            let listed = n.entries.iter().map(|e| e.peer).take(MAX_NAME_INFO_IDS);
            let owner_count = if n.shared { n.entries.len() } else { n.entries.len().min(1) };
            let (owners, queued): (Vec<PeerId>, Vec<PeerId>) = if n.shared {
                (listed.collect(), Vec::new())
            } else {
                let mut all = listed;
                (all.next().into_iter().collect(), all.collect())
            };
            let count = |c: usize| u32::try_from(c).unwrap_or(u32::MAX);
            NameInfo {
                name: name.clone(),
                owners,
                queued,
                shared: n.shared,
                allow_replacement: n.entries.first().is_some_and(|e| e.flags.allow_replacement),
                owner_count: count(owner_count),
                queued_count: count(n.entries.len() - owner_count),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::quota::{Accounts, Resource, UidLimits};

    fn charge(a: &mut Accounts) -> Charge {
        a.charge(1, &[(Resource::Names, 1)]).unwrap()
    }

    const EXCL: NameFlags =
        NameFlags { allow_replacement: false, replace_existing: false, do_not_queue: false, shared: false };

    #[test]
    fn exclusive_names_queue_and_hand_over_in_order() {
        let mut acc = Accounts::new(UidLimits::default());
        let mut n = Names::default();
        let (r, c) = n.request("a", 1, EXCL, charge(&mut acc));
        assert_eq!(r, NameResult::PrimaryOwner);
        assert_eq!(c, Some(OwnerChange { name: "a".into(), old: None, new: Some(1) }));
        assert_eq!(n.request("a", 2, EXCL, charge(&mut acc)).0, NameResult::InQueue);
        assert_eq!(n.request("a", 3, EXCL, charge(&mut acc)).0, NameResult::InQueue);
        let no_queue = NameFlags { do_not_queue: true, ..EXCL };
        assert_eq!(n.request("a", 4, no_queue, charge(&mut acc)).0, NameResult::Exists);
        assert_eq!(n.request("a", 1, EXCL, charge(&mut acc)).0, NameResult::AlreadyOwner);
        assert_eq!(acc.held(1, Resource::Names), 3, "refused and repeated asks hold nothing");
        assert_eq!(n.route("a"), Some(1));
        let (r, c) = n.release("a", 1);
        assert_eq!((r, c.unwrap().new), (NameResult::Released, Some(2)));
        // Leaving the queue changes no owner.
        assert_eq!(n.release("a", 3), (NameResult::Released, None));
        assert_eq!(n.release("a", 9).0, NameResult::NotOwner);
        let (_, c) = n.release("a", 2);
        assert_eq!(c.unwrap().new, None);
        assert_eq!(n.release("a", 2).0, NameResult::NonExistent);
        assert!(n.is_empty());
        assert_eq!(acc.held(1, Resource::Names), 0);
    }

    #[test]
    fn replacement_needs_both_flags_and_the_old_owner_queues_unless_it_said_not_to() {
        let mut acc = Accounts::new(UidLimits::default());
        let mut n = Names::default();
        let replace = NameFlags { replace_existing: true, ..EXCL };
        n.request("a", 1, EXCL, charge(&mut acc));
        assert_eq!(
            n.request("a", 2, replace, charge(&mut acc)).0,
            NameResult::InQueue,
            "1 does not allow it"
        );
        n.request("a", 1, NameFlags { allow_replacement: true, ..EXCL }, charge(&mut acc));
        let (r, c) = n.request("a", 2, replace, charge(&mut acc));
        assert_eq!((r, c.map(|c| (c.old, c.new))), (NameResult::PrimaryOwner, Some((Some(1), Some(2)))));
        assert_eq!(n.infos_after(None).next().unwrap().queued, vec![1]);
        // An owner that allows replacement and will not queue loses it.
        let mut m = Names::default();
        m.request(
            "b",
            1,
            NameFlags { allow_replacement: true, do_not_queue: true, ..EXCL },
            charge(&mut acc),
        );
        m.request("b", 2, replace, charge(&mut acc));
        let info = m.infos_after(None).next().unwrap();
        assert_eq!((info.owners, info.queued), (vec![2], vec![]));
    }

    #[test]
    fn shared_names_spread_requests_and_refuse_exclusive_askers() {
        let mut acc = Accounts::new(UidLimits::default());
        let mut n = Names::default();
        let shared = NameFlags { shared: true, ..EXCL };
        for p in 1..=3 {
            assert_eq!(n.request("s", p, shared, charge(&mut acc)).0, NameResult::PrimaryOwner);
        }
        assert_eq!(n.request("s", 4, EXCL, charge(&mut acc)).0, NameResult::Exists);
        assert_eq!(n.owner("s"), (Some(1), 3));
        let picks: Vec<_> = (0..6).map(|_| n.route("s").unwrap()).collect();
        assert_eq!(picks, vec![1, 2, 3, 1, 2, 3]);
        n.release("s", 2);
        let picks: Vec<_> = (0..4).map(|_| n.route("s").unwrap()).collect();
        assert!(picks.contains(&1) && picks.contains(&3) && !picks.contains(&2));
        let (_, c) = n.release("s", 1);
        assert_eq!(c.unwrap().new, Some(3), "the longest-standing member is the owner");
    }
}
