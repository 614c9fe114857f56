//! Which socket connections the reactor reads again, and when: one read
//! budget per connection per turn of the loop.
//!
//! Model: the reactor reads a connection when epoll says it is readable,
//! with a budget (`READ_BUDGET` receives, `WORK_BUDGET` deliveries). A
//! read that spends its budget leaves the rest in the socket (or in the
//! connection's `pending` packets) and asks to be read again; so does a
//! new connection, whose first edge may have been missed. The list of
//! those is read at the start of the next turn, before its events; a
//! link's ring reads draw on the same per-uid budget.
//!
//! Invariants, each once a defect (a hostile review measured a bystander's
//! ping at 85 ms behind another uid's fan-out, 15 µs idle):
//! - a connection is in the list at most once ([`ReadMark::queued`]): a
//!   read that spent its budget queued it again on every read, and each
//!   entry was a fresh budget in one turn;
//! - a connection that spent its budget in this turn is not read again in
//!   this turn ([`ReadTurns::may_read`]), however its events and retries
//!   fall: a readable event after it only queues it for the next;
//! - the budget is a uid's, not a connection's ([`ReadTurns::uid_left`]):
//!   a uid's connections share one budget a turn, so opening more
//!   connections buys no more of the loop (a review measured another
//!   uid's ping at 0.8 s behind four connections' floods of queries);
//! - a read gets a share of the uid's budget, not all of it
//!   ([`ReadTurns::share`]), so several of a uid's connections are read
//!   each turn;
//! - a connection turned away for its uid's spent budget goes first next
//!   turn, in the order it was turned away ([`ReadTurns::deferred`]); one
//!   whose last read emptied it goes ahead of those with a backlog.
//!
//! No I/O: the reactor holds one [`ReadMark`] per connection and calls
//! these as it reads.

use std::collections::{HashMap, VecDeque};

use crate::bus::peer::PeerId;

/// One connection's place in the read-again list.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReadMark {
    /// In the list.
    queued: bool,
    /// The turn in which it last spent its budget (0: never).
    spent_in: u64,
    /// Its last read spent its budget (it has a backlog), rather than
    /// reading it to the end.
    backlogged: bool,
}

/// The read-again list, the loop's turn count, and the work each uid's
/// connections did in this turn.
#[derive(Debug)]
pub struct ReadTurns {
    turn: u64,
    list: VecDeque<PeerId>,
    /// Those turned away for their uid's spent budget, in the order they
    /// were: read before `list`.
    deferred: VecDeque<PeerId>,
    /// Those of `deferred` whose last read reached the end of what they
    /// had sent (a packet now and then, no backlog): read before
    /// `deferred`, as fq_codel serves its new flows before its old ones.
    sparse: VecDeque<PeerId>,
    uid_work: HashMap<u32, u64>,
}

impl Default for ReadTurns {
    fn default() -> Self {
        ReadTurns {
            turn: 1,
            list: VecDeque::new(),
            deferred: VecDeque::new(),
            sparse: VecDeque::new(),
            uid_work: HashMap::new(),
        }
    }
}

impl ReadTurns {
    /// A new turn of the loop begins.
    pub fn next_turn(&mut self) {
        self.turn += 1;
        self.uid_work.clear();
    }

    /// What is left of `budget` for `uid`'s connections in this turn.
    pub fn uid_left(&self, uid: u32, budget: u64) -> u64 {
        budget.saturating_sub(self.uid_work.get(&uid).copied().unwrap_or(0))
    }

    /// The budget of a read of one of `uid`'s connections: what is left of
    /// `budget` for `uid` in this turn, at most `quantum` of it, so that
    /// several of a uid's connections are read each turn (one given the
    /// whole budget made each of its siblings wait a turn).
    pub fn share(&self, uid: u32, budget: u64, quantum: u64) -> u64 {
        self.uid_left(uid, budget).min(quantum)
    }

    /// `uid`'s connection did `work` in this turn.
    pub fn uid_did(&mut self, uid: u32, work: u64) {
        if work > 0 {
            let w = self.uid_work.entry(uid).or_insert(0);
            *w = w.saturating_add(work);
        }
    }

    /// Queues `id` to be read again (once), behind those queued before.
    pub fn later(&mut self, id: PeerId, mark: &mut ReadMark) {
        if !mark.queued {
            mark.queued = true;
            self.list.push_back(id);
        }
    }

    /// `id` was not read at all in this turn, its uid's budget spent by
    /// another of its connections: queued ahead of those that read, in the
    /// order they were turned away, so that next turn it goes first (else
    /// a uid's quiet connection could wait for ever behind its busy one;
    /// and queued at the front one by one, the middle one of three busy
    /// connections was, as a review found: each of a uid's connections is
    /// read within as many turns as the uid has busy connections).
    ///
    /// A connection whose last read emptied it (no backlog) goes ahead of
    /// those with one: its siblings' floods cannot make it wait a turn for
    /// each of them (a review measured a uid's quiet connection's ping at
    /// 40 pages' worth of its four siblings' query flood, another uid's at
    /// 14). Its own uid's budget still bounds what it reads, and once a
    /// read of it spends the budget it queues with the backlogged.
    pub fn deferred(&mut self, id: PeerId, mark: &mut ReadMark) {
        mark.spent_in = self.turn;
        if !mark.queued {
            mark.queued = true;
            if mark.backlogged {
                self.deferred.push_back(id);
            } else {
                self.sparse.push_back(id);
            }
        }
    }

    /// `id` spent its budget in this turn: queued for a later one.
    pub fn spent(&mut self, id: PeerId, mark: &mut ReadMark) {
        mark.spent_in = self.turn;
        mark.backlogged = true;
        self.later(id, mark);
    }

    /// `mark`'s connection was read to the end of what it had sent;
    /// `used_share`: what it sent cost the whole share of its read. Such a
    /// connection counts as backlogged all the same, as fq_codel moves a
    /// new flow that used its quantum to the old ones: else a uid's
    /// connections that each keep one costly request (a `Clients` page)
    /// waiting were "sparse" every time, went ahead every turn, and a
    /// sibling with a real backlog was not read once in 30 s (a review).
    pub fn drained(mark: &mut ReadMark, used_share: bool) {
        mark.backlogged = used_share;
    }

    /// Whether `id` may be read now: not if it spent its budget in this
    /// turn (then queue it with [`ReadTurns::later`]).
    pub fn may_read(&self, mark: &ReadMark) -> bool {
        mark.spent_in != self.turn
    }

    /// The list, to read each of them; each must be [`ReadTurns::taken`]
    /// as it is read.
    pub fn take(&mut self) -> Vec<PeerId> {
        self.sparse.drain(..).chain(self.deferred.drain(..)).chain(self.list.drain(..)).collect()
    }

    /// `mark`'s connection came off the list.
    pub fn taken(mark: &mut ReadMark) {
        mark.queued = false;
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty() && self.deferred.is_empty() && self.sparse.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reactor's turn as the event loop runs it: the list first, then
    /// `events` readable connections. `spends` says whether a read spent
    /// its budget. Returns how many budgets each connection got.
    fn turn(t: &mut ReadTurns, marks: &mut [ReadMark], events: &[PeerId], spends: bool) -> Vec<u32> {
        t.next_turn();
        let mut reads = vec![0; marks.len()];
        let mut read = |t: &mut ReadTurns, id: PeerId, marks: &mut [ReadMark]| {
            let m = &mut marks[id as usize];
            if !t.may_read(m) {
                return t.later(id, m);
            }
            reads[id as usize] += 1;
            if spends {
                t.spent(id, m);
            }
        };
        for id in t.take() {
            ReadTurns::taken(&mut marks[id as usize]);
            read(t, id, marks);
        }
        for &id in events {
            read(t, id, marks);
        }
        reads
    }

    #[test]
    fn a_busy_connection_gets_one_budget_a_turn_however_its_events_fall() {
        let mut t = ReadTurns::default();
        let mut marks = [ReadMark::default(); 2];
        // Connection 0 spends its budget on every read, and is readable
        // again and again; connection 1 is quiet.
        for _ in 0..100 {
            let reads = turn(&mut t, &mut marks, &[0, 0, 0], true);
            assert_eq!(reads, [1, 0], "one budget a turn");
            // Queued once, for the next turn.
            assert_eq!(t.list, [0]);
        }
    }

    /// With a uid's budget: one read per turn for the uid (the first
    /// spends it all). Its busy connection 0 is readable every turn, and
    /// listed first; its quiet connection 1 has one packet: it is read
    /// within two turns, not starved behind 0.
    #[test]
    fn a_uids_quiet_connection_is_not_starved_by_its_busy_one() {
        let mut t = ReadTurns::default();
        let mut marks = [ReadMark::default(); 2];
        let mut quiet_read = false;
        let mut pending_quiet = true;
        for round in 0..4 {
            t.next_turn();
            let mut order: Vec<PeerId> = t.take();
            for &id in &order {
                ReadTurns::taken(&mut marks[id as usize]);
            }
            // Then this turn's events: 0 always, 1 while it has its packet.
            order.push(0);
            if pending_quiet && round == 0 {
                order.push(1);
            }
            for id in order {
                let m = &mut marks[id as usize];
                if !t.may_read(m) {
                    t.later(id, m);
                    continue;
                }
                if t.uid_left(7, 1) == 0 {
                    t.deferred(id, m);
                    continue;
                }
                t.uid_did(7, 1);
                t.spent(id, m);
                if id == 1 {
                    quiet_read = true;
                    pending_quiet = false;
                }
            }
            if quiet_read {
                assert!(round <= 1, "read in round {round}");
                return;
            }
        }
        panic!("the quiet connection was never read");
    }

    /// Three busy connections of one uid, a budget a turn for the uid:
    /// each is read once every three turns, none starves.
    #[test]
    fn a_uids_busy_connections_take_turns() {
        let mut t = ReadTurns::default();
        let mut marks = [ReadMark::default(); 3];
        let mut reads = [0u32; 3];
        for _ in 0..30 {
            t.next_turn();
            let mut order: Vec<PeerId> = t.take();
            for &id in &order {
                ReadTurns::taken(&mut marks[id as usize]);
            }
            // All three readable every turn, in the same order.
            order.extend([0, 1, 2]);
            for id in order {
                let m = &mut marks[id as usize];
                if !t.may_read(m) {
                    t.later(id, m);
                } else if t.uid_left(7, 1) == 0 {
                    t.deferred(id, m);
                } else {
                    t.uid_did(7, 1);
                    reads[id as usize] += 1;
                    t.spent(id, m);
                }
            }
        }
        assert_eq!(reads, [10, 10, 10], "each in its turn");
    }

    /// A uid's `busy` connections, each with a backlog that spends any
    /// read's budget, and a quiet one that sends one packet at turn
    /// `first` and every `every` turns after it is read; the uid's
    /// `budget` a turn, `quantum` of it at most a read, as the reactor
    /// reads. Returns how many turns each of the quiet one's packets
    /// waited before it was read.
    fn quiet_waits(budget: u64, quantum: u64, busy: PeerId, first: u32, every: u32) -> Vec<u32> {
        let quiet = busy;
        let mut t = ReadTurns::default();
        let mut marks = vec![ReadMark::default(); busy as usize + 1];
        let mut waits = Vec::new();
        let mut sent_at = None;
        let mut next = first;
        for round in 0..60u32 {
            t.next_turn();
            let mut order: Vec<PeerId> = t.take();
            for &id in &order {
                ReadTurns::taken(&mut marks[id as usize]);
            }
            // This turn's events: the busy ones, then the quiet one's.
            order.extend(0..busy);
            if round == next {
                sent_at = Some(round);
                order.push(quiet);
            }
            for id in order {
                let m = &mut marks[id as usize];
                let share = t.share(7, budget, quantum);
                if !t.may_read(m) {
                    t.later(id, m);
                } else if share == 0 {
                    t.deferred(id, m);
                } else if id == quiet {
                    // One packet: read to the end.
                    t.uid_did(7, 1);
                    ReadTurns::drained(m, false);
                    if let Some(at) = sent_at.take() {
                        waits.push(round - at);
                        next = round + every;
                    }
                } else {
                    t.uid_did(7, share);
                    t.spent(id, m);
                }
            }
        }
        waits
    }

    /// Four busy connections of one uid and a quiet fifth that sends one
    /// packet now and then, a budget a turn for the uid that one read
    /// spends. The quiet one, turned away for the spent budget, goes
    /// ahead of the busy ones turned away before it (it has a packet, not
    /// a backlog): read in the next turn, not after each of its busy
    /// siblings had its turn.
    #[test]
    fn a_uids_quiet_connection_goes_ahead_of_its_busy_ones() {
        let waits = quiet_waits(4, 4, 4, 10, 7);
        assert!(waits.len() >= 6, "the quiet connection was read {} times", waits.len());
        assert!(waits.iter().all(|&w| w <= 1), "turns the quiet connection waited: {waits:?}");
    }

    /// The same five connections all start at once, so that none of the
    /// busy ones is yet known to have a backlog. With a read's share of
    /// the uid's budget a quarter of it, four of them are read a turn, and
    /// the quiet one waits one turn at most; were a read given the whole
    /// budget it waited four, one for each sibling (a review measured its
    /// ping at 40 pages' worth of its siblings' query flood, where another
    /// uid's waited 14).
    #[test]
    fn a_uids_quiet_connection_starting_with_its_busy_ones_waits_a_turn_at_most() {
        let waits = quiet_waits(4, 1, 4, 0, 7);
        assert!(waits.len() >= 6, "the quiet connection was read {} times", waits.len());
        assert!(waits.iter().all(|&w| w <= 1), "turns the quiet connection waited: {waits:?}");
        assert_eq!(quiet_waits(4, 4, 4, 0, 7)[0], 4, "the whole budget a read: a turn behind each sibling");
    }

    /// Many connections of a uid that each send one costly packet at a
    /// time (a whole read's share), read to the end every time, and one
    /// with a backlog: the backlogged one is read every few turns, not
    /// starved behind ever "sparse" siblings.
    #[test]
    fn one_costly_packet_at_a_time_is_a_backlog_too() {
        const BACKLOGGED: PeerId = 16;
        let mut t = ReadTurns::default();
        let mut marks = [ReadMark::default(); 17];
        let mut reads = 0;
        for _ in 0..40 {
            t.next_turn();
            let mut order: Vec<PeerId> = t.take();
            for &id in &order {
                ReadTurns::taken(&mut marks[id as usize]);
            }
            // Every one of them has something each turn.
            order.extend(0..=BACKLOGGED);
            for id in order {
                let m = &mut marks[id as usize];
                let share = t.share(7, 4, 1);
                if !t.may_read(m) {
                    t.later(id, m);
                } else if share == 0 {
                    t.deferred(id, m);
                } else {
                    t.uid_did(7, share);
                    if id == BACKLOGGED {
                        reads += 1;
                        t.spent(id, m);
                    } else {
                        // Its one packet, read to the end, cost the share.
                        ReadTurns::drained(m, true);
                    }
                }
            }
        }
        // 17 connections, 4 reads a turn: about 40 * 4 / 17.
        assert!(reads >= 8, "the backlogged connection was read {reads} times in 40 turns");
    }

    #[test]
    fn a_connection_that_did_not_spend_is_read_again_in_the_same_turn() {
        let mut t = ReadTurns::default();
        let mut marks = [ReadMark::default(); 3];
        // A new connection queued (its first edge may be missed): read at
        // the next turn's start.
        t.later(2, &mut marks[2]);
        t.later(2, &mut marks[2]);
        assert_eq!(t.list, [2], "queued once");
        let reads = turn(&mut t, &mut marks, &[], false);
        assert_eq!(reads, [0, 0, 1]);
        assert!(t.is_empty());
        // Queued again after it was taken: it is on the list again.
        t.later(2, &mut marks[2]);
        assert_eq!(t.list, [2]);
    }

    #[test]
    fn a_uids_connections_share_one_budget_a_turn() {
        let mut t = ReadTurns::default();
        t.next_turn();
        assert_eq!(t.uid_left(7, 100), 100);
        t.uid_did(7, 60);
        t.uid_did(8, 10);
        assert_eq!(t.uid_left(7, 100), 40, "what its first connection left");
        t.uid_did(7, 60);
        assert_eq!(t.uid_left(7, 100), 0, "spent: its other connections wait");
        assert_eq!(t.uid_left(8, 100), 90, "another uid's own");
        t.next_turn();
        assert_eq!(t.uid_left(7, 100), 100, "afresh each turn");
    }

    #[test]
    fn a_spent_connection_is_read_in_the_next_turn() {
        let mut t = ReadTurns::default();
        let mut marks = [ReadMark::default(); 1];
        t.next_turn();
        assert!(t.may_read(&marks[0]));
        t.spent(0, &mut marks[0]);
        assert!(!t.may_read(&marks[0]));
        t.next_turn();
        assert!(t.may_read(&marks[0]));
        assert_eq!(t.take(), [0]);
    }
}
