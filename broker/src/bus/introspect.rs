//! Introspection: paged answers to `Query`.
//!
//! Model: an answer is a sequence of pages. Each `Query` gets at most one
//! page of `QueryItem`s — at most [`PAGE_ITEMS`] items and about
//! [`PAGE_BYTES`] bytes — then a `QueryEnd` whose `next` names where the
//! following page starts. So an answer is paced by the asker's reading (it
//! asks for the next page after reading this one), never queued whole
//! against the hard bound, and one query costs the broker O(log n + page)
//! whatever the size of the bus: clients and channels are kept in ordered
//! maps, patterns in the router's ordered table, and each page resumes
//! with a range lookup from its key.

use std::ops::Bound;
use std::time::Instant;

use shmbus_proto::frame::{
    ClientInfo, ErrorCode, Op, QueryEnd, QueryItem, QueryItemBody, QueryKind, TopicInfo,
};

use super::peer::{Peer, PeerId};
use super::rules::Action;
use super::Bus;

/// Most items in one page.
pub const PAGE_ITEMS: usize = 256;
/// Bytes of encoded items after which a page ends.
pub const PAGE_BYTES: usize = 64 * 1024;
/// Byte budget for the subscription patterns listed in one `ClientInfo`.
const INFO_PATTERN_BUDGET: usize = 8 * 1024;

impl Bus {
    pub(crate) fn query(
        &mut self,
        id: PeerId,
        req_id: u32,
        what: QueryKind,
        after: Option<&str>,
        now: Instant,
    ) {
        let denied = self.peers.get(&id).and_then(|p| p.access.check(Action::Introspect, "").err());
        if let Some(msg) = denied {
            self.denial(id, &msg);
            return self.op_error(id, Op::Query { req_id }, ErrorCode::Denied, &msg, now);
        }
        let (items, next, bytes) = match what {
            QueryKind::Stats => (vec![QueryItemBody::Stats(self.stats(now))], None, 0),
            QueryKind::Topics => page(self.router.patterns_after(after).map(|(pattern, n)| {
                let item = QueryItemBody::Topic(TopicInfo { pattern: pattern.to_owned(), subscribers: n });
                (pattern.to_owned(), item, pattern.len() + 16)
            })),
            QueryKind::Clients => {
                let Some(start) = parse_after(after) else {
                    return self.bad_cursor(id, req_id, now);
                };
                let peers = self.peers.range((start, Bound::Unbounded)).filter(|(_, p)| !p.is_closing());
                page(peers.map(|(pid, p)| {
                    let info = client_info(p, now);
                    let cost = info.subscriptions.iter().map(|s| s.len() + 2).sum::<usize>() + 128;
                    (pid.to_string(), QueryItemBody::Client(info), cost)
                }))
            }
            QueryKind::Names => page(self.names.infos_after(after).map(|info| {
                let cost = info.name.len() + 16 * (info.owners.len() + info.queued.len()) + 32;
                (info.name.clone(), QueryItemBody::Name(info), cost)
            })),
            QueryKind::Channels => {
                let Some(start) = parse_after(after) else {
                    return self.bad_cursor(id, req_id, now);
                };
                page(self.channels.by_id.range((start, Bound::Unbounded)).map(|(cid, ch)| {
                    (cid.to_string(), QueryItemBody::Channel(ch.info()), ch.topic.len() + 64)
                }))
            }
        };
        // Counted as work, as deliveries are: a page of 64 KiB of patterns
        // copied, sorted and encoded costs as much as some thousands of
        // deliveries, and a connection's read budget (`WORK_BUDGET`) must
        // end its turn under a flood of queries as under a fan-out.
        self.work = self.work.wrapping_add(1 + (bytes / QUERY_BYTES_PER_WORK) as u64);
        for item in items {
            if !self.control(id, &QueryItem { req_id, item }, now) {
                return;
            }
        }
        self.control(id, &QueryEnd { req_id, next }, now);
    }

    fn bad_cursor(&mut self, id: PeerId, req_id: u32, now: Instant) {
        let msg = "the query's `after` is not a key this answer gave";
        self.op_error(id, Op::Query { req_id }, ErrorCode::Unsupported, msg, now);
    }
}

/// The range start after a numeric key (client or channel id).
fn parse_after(after: Option<&str>) -> Option<Bound<u64>> {
    match after {
        None => Some(Bound::Unbounded),
        Some(s) => s.parse().ok().map(Bound::Excluded),
    }
}

/// Bytes of an introspection page that count as one unit of the bus's work
/// (a delivery): a `Clients` page of 50 KiB of one-byte patterns (each
/// copied, sorted and encoded) took the broker 10 ms in a debug build,
/// about 0.2 µs a byte, where a delivery takes 2–3 µs: one every 12 bytes
/// or so, counted on the safe side.
const QUERY_BYTES_PER_WORK: usize = 8;

/// One page of `entries` (key, item, cost in bytes), the key to resume
/// after when more is left, and the page's cost in bytes. Pulls at most
/// one entry past the page.
fn page(
    mut entries: impl Iterator<Item = (String, QueryItemBody, usize)>,
) -> (Vec<QueryItemBody>, Option<String>, usize) {
    let mut budget = Budget::default();
    let mut items = Vec::new();
    let mut last = None;
    loop {
        if budget.full() {
            return (items, entries.next().and(last), budget.bytes);
        }
        let Some((key, item, cost)) = entries.next() else { return (items, None, budget.bytes) };
        budget.take(cost);
        last = Some(key);
        items.push(item);
    }
}

#[derive(Default)]
struct Budget {
    items: usize,
    bytes: usize,
}

impl Budget {
    fn full(&self) -> bool {
        self.items >= PAGE_ITEMS || self.bytes >= PAGE_BYTES
    }

    fn take(&mut self, bytes: usize) {
        self.items += 1;
        self.bytes += bytes;
    }
}

/// One peer as introspection shows it: its first patterns up to a byte
/// budget (O(budget), not O(subscriptions)), and the full count.
fn client_info(p: &Peer, now: Instant) -> ClientInfo {
    let mut subscriptions: Vec<String> = Vec::new();
    let mut budget = INFO_PATTERN_BUDGET;
    for s in p.subs.values() {
        let pat = &*s.state.pattern;
        if pat.len() > budget {
            break;
        }
        budget -= pat.len();
        subscriptions.push(pat.to_owned());
    }
    subscriptions.sort_unstable();
    ClientInfo {
        id: p.id,
        name: p.name.clone(),
        pid: p.cred.pid,
        uid: p.cred.uid,
        gid: p.cred.gid,
        command: p.command.clone(),
        subscriptions,
        subscription_count: p.subs.len() as u32,
        queued_bytes: p.queue.bytes(),
        queued_frames: p.queue.len() as u32,
        msgs_in: p.published,
        msgs_out: p.msgs_out,
        dropped: p.dropped,
        connected_ms: now.saturating_duration_since(p.connected_at).as_millis() as u64,
    }
}
