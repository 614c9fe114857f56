//! Counters, the forwarding decisions they count, and the status report.
//!
//! Model: one [`Counters`] per bridge, shared by every task (atomics, no
//! lock on the message path). Messages flow in two directions
//! ([`Dir::LocalToNats`], [`Dir::NatsToLocal`]); each message that reaches
//! the bridge ends as exactly one of: forwarded, suppressed as a loop (the
//! bridge's own message coming back: correct behaviour, not a loss), or
//! dropped with one [`DropReason`]. Calls likewise: answered, or failed with
//! a kind. [`Counters::snapshot`] reads them into a [`Status`], which is
//! what the status name answers (JSON) and what `shmbus-bridge status`
//! prints.
//!
//! The decisions (`outbound`, whether a local message goes on) are pure
//! functions here so that they can be tested without a bus.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    LocalToNats,
    NatsToLocal,
}

impl Dir {
    pub fn label(self) -> &'static str {
        match self {
            Dir::LocalToNats => "local-to-nats",
            Dir::NatsToLocal => "nats-to-local",
        }
    }
}

/// Why a message was not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// NATS was not connected (local to NATS).
    NatsDown,
    /// The broker connection was lost (NATS to local).
    ShmbusDown,
    /// Larger than the far side takes (NATS `max_payload`).
    TooLarge,
    /// The publish itself failed.
    PublishError,
    /// The bounded local-to-NATS queue was full (NATS slower than the bus).
    QueueFull,
    /// The NATS subject has no local counterpart (see `mapping`).
    InvalidSubject,
    /// The broker dropped messages for the bridge's subscription (its
    /// `Gap` notice).
    Gap,
    /// Lost on the way through NATS (NATS core is at most once: a slow
    /// consumer's messages are dropped): the importing bridge found a gap
    /// in the exporting bridge's sequence for the subject (`mapping::SeqIn`).
    NatsLost,
}

pub const REASONS: [DropReason; 8] = [
    DropReason::NatsDown,
    DropReason::ShmbusDown,
    DropReason::TooLarge,
    DropReason::PublishError,
    DropReason::QueueFull,
    DropReason::InvalidSubject,
    DropReason::Gap,
    DropReason::NatsLost,
];

impl DropReason {
    pub fn label(self) -> &'static str {
        match self {
            DropReason::NatsDown => "nats-down",
            DropReason::ShmbusDown => "shmbus-down",
            DropReason::TooLarge => "too-large",
            DropReason::PublishError => "publish-error",
            DropReason::QueueFull => "queue-full",
            DropReason::InvalidSubject => "invalid-subject",
            DropReason::Gap => "gap",
            DropReason::NatsLost => "nats-lost",
        }
    }

    fn index(self) -> usize {
        REASONS.iter().position(|r| *r == self).expect("every reason is listed")
    }
}

#[derive(Default)]
struct DirCounters {
    forwarded: AtomicU64,
    loops: AtomicU64,
    dropped: [AtomicU64; 8],
    calls_ok: AtomicU64,
    /// Failed calls, by `RemoteError::kind` label.
    calls_failed: parking_map::Map,
}

/// A tiny map of counters keyed by static labels, behind a mutex (calls
/// are rare next to messages).
mod parking_map {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct Map(Mutex<BTreeMap<&'static str, u64>>);

    impl Map {
        pub fn add(&self, k: &'static str) {
            *self.0.lock().unwrap_or_else(|p| p.into_inner()).entry(k).or_default() += 1;
        }
        pub fn get(&self) -> BTreeMap<String, u64> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect()
        }
    }
}

/// Every counter of one bridge.
#[derive(Default)]
pub struct Counters {
    l2n: DirCounters,
    n2l: DirCounters,
    pub shmbus_reconnects: AtomicU64,
    pub nats_reconnects: AtomicU64,
    /// async-nats's slow-consumer events: NATS dropped messages for one of
    /// the bridge's subscriptions. Told, not counted as drops: the events
    /// are themselves dropped when async-nats's event queue is full, and
    /// what the exporting bridge sent is counted exactly as `nats-lost`.
    pub nats_slow_consumer: AtomicU64,
    pub nats_connected: std::sync::atomic::AtomicBool,
}

impl Counters {
    fn dir(&self, d: Dir) -> &DirCounters {
        match d {
            Dir::LocalToNats => &self.l2n,
            Dir::NatsToLocal => &self.n2l,
        }
    }

    pub fn forwarded(&self, d: Dir) {
        self.dir(d).forwarded.fetch_add(1, Ordering::Relaxed);
    }

    pub fn looped(&self, d: Dir) {
        self.dir(d).loops.fetch_add(1, Ordering::Relaxed);
    }

    /// Saturates rather than wraps: a count a peer can push (`nats-lost`,
    /// from forged sequence numbers) must not make the totals go down.
    pub fn dropped(&self, d: Dir, why: DropReason, n: u64) {
        // Relaxed: a statistic; pairs with nothing.
        let _ = self.dir(d).dropped[why.index()]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_add(n)));
    }

    pub fn call_ok(&self, d: Dir) {
        self.dir(d).calls_ok.fetch_add(1, Ordering::Relaxed);
    }

    pub fn call_failed(&self, d: Dir, kind: &'static str) {
        self.dir(d).calls_failed.add(kind);
    }

    /// Messages dropped in direction `d`, all reasons.
    pub fn total_dropped(&self, d: Dir) -> u64 {
        self.dir(d).dropped.iter().fold(0u64, |t, c| t.saturating_add(c.load(Ordering::Relaxed)))
    }

    fn dir_status(&self, d: Dir) -> DirStatus {
        let c = self.dir(d);
        DirStatus {
            forwarded: c.forwarded.load(Ordering::Relaxed),
            loops_suppressed: c.loops.load(Ordering::Relaxed),
            dropped: REASONS
                .iter()
                .map(|r| (r.label().to_owned(), c.dropped[r.index()].load(Ordering::Relaxed)))
                .collect(),
            calls_ok: c.calls_ok.load(Ordering::Relaxed),
            calls_failed: c.calls_failed.get(),
        }
    }

    pub fn snapshot(&self, side: SideInfo) -> Status {
        Status {
            name: side.name,
            host: side.host,
            prefix: side.prefix,
            shmbus: ShmbusStatus {
                address: side.shmbus_address,
                connected: true,
                client_id: side.client_id,
                reconnects: self.shmbus_reconnects.load(Ordering::Relaxed),
            },
            nats: NatsStatus {
                connected: self.nats_connected.load(Ordering::Relaxed),
                state: side.nats_state,
                servers: side.nats_servers,
                max_payload: side.max_payload,
                reconnects: self.nats_reconnects.load(Ordering::Relaxed),
                slow_consumer_notices: self.nats_slow_consumer.load(Ordering::Relaxed),
            },
            local_to_nats: self.dir_status(Dir::LocalToNats),
            nats_to_local: self.dir_status(Dir::NatsToLocal),
        }
    }
}

/// What the counters do not hold, for a snapshot.
#[derive(Debug, Clone)]
pub struct SideInfo {
    pub name: String,
    pub host: String,
    pub prefix: String,
    pub shmbus_address: String,
    pub client_id: u64,
    pub nats_state: String,
    pub nats_servers: Vec<String>,
    pub max_payload: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirStatus {
    pub forwarded: u64,
    pub loops_suppressed: u64,
    pub dropped: BTreeMap<String, u64>,
    pub calls_ok: u64,
    pub calls_failed: BTreeMap<String, u64>,
}

impl DirStatus {
    pub fn total_dropped(&self) -> u64 {
        self.dropped.values().fold(0u64, |t, n| t.saturating_add(*n))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmbusStatus {
    pub address: String,
    /// Always true in an answer: the answer came over that connection.
    pub connected: bool,
    pub client_id: u64,
    pub reconnects: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatsStatus {
    pub connected: bool,
    pub state: String,
    pub servers: Vec<String>,
    pub max_payload: usize,
    pub reconnects: u64,
    /// NATS's slow-consumer notices (see `Counters::nats_slow_consumer`).
    pub slow_consumer_notices: u64,
}

/// The status name's answer (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub name: String,
    pub host: String,
    pub prefix: String,
    pub shmbus: ShmbusStatus,
    pub nats: NatsStatus,
    pub local_to_nats: DirStatus,
    pub nats_to_local: DirStatus,
}

impl Status {
    /// For people: one block per side and direction.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(o, "bridge {} on {} (prefix {:?})", self.name, self.host, self.prefix);
        let _ = writeln!(
            o,
            "  shmbus  {}  connected as client {}, {} reconnection(s)",
            self.shmbus.address, self.shmbus.client_id, self.shmbus.reconnects
        );
        let _ = writeln!(
            o,
            "  nats    {}  {}, max_payload {} B, {} reconnection(s), {} slow-consumer notice(s)",
            self.nats.servers.join(","),
            self.nats.state,
            self.nats.max_payload,
            self.nats.reconnects,
            self.nats.slow_consumer_notices
        );
        for (label, d) in [("local -> nats", &self.local_to_nats), ("nats -> local", &self.nats_to_local)] {
            let _ = writeln!(
                o,
                "  {label}: {} forwarded, {} dropped, {} loop(s) suppressed; calls {} ok, {} failed",
                d.forwarded,
                d.total_dropped(),
                d.loops_suppressed,
                d.calls_ok,
                d.calls_failed.values().sum::<u64>()
            );
            for (r, n) in d.dropped.iter().filter(|(_, n)| **n > 0) {
                let _ = writeln!(o, "      dropped {r}: {n}");
            }
            for (k, n) in &d.calls_failed {
                let _ = writeln!(o, "      calls failed {k}: {n}");
            }
        }
        o
    }
}

/// What happens to a local message the bridge's subscription received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// Put it on the queue to NATS.
    Forward,
    /// The bridge imported it itself: not a loss, not forwarded.
    Loop,
    Drop(DropReason),
}

/// The decision for a local message: `sender` is its broker-stamped client
/// id, `own` the bridge's ids on this broker (its current one, and the one
/// before the last reconnection while messages from then may still be
/// queued), `len` its payload size, `max_payload` NATS's (0: unknown yet,
/// never connected), `nats_up` whether NATS is connected now.
pub fn outbound(sender: u64, own: &[u64], len: usize, max_payload: usize, nats_up: bool) -> Outbound {
    if own.contains(&sender) {
        Outbound::Loop
    } else if !nats_up {
        Outbound::Drop(DropReason::NatsDown)
    } else if max_payload > 0 && len > max_payload {
        Outbound::Drop(DropReason::TooLarge)
    } else {
        Outbound::Forward
    }
}

/// Headroom kept under `max_payload` for the bridge's headers, which count
/// toward NATS's limit.
pub const HEADER_ROOM: usize = 2048;

/// The largest payload the bridge sends with headers under `max_payload`.
pub fn payload_limit(max_payload: usize) -> usize {
    max_payload.saturating_sub(HEADER_ROOM)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side() -> SideInfo {
        SideInfo {
            name: "a".into(),
            host: "h".into(),
            prefix: String::new(),
            shmbus_address: "@x".into(),
            client_id: 3,
            nats_state: "connected".into(),
            nats_servers: vec!["nats://127.0.0.1:4222".into()],
            max_payload: 1 << 20,
        }
    }

    #[test]
    fn a_message_ends_as_exactly_one_of_loop_drop_forward() {
        assert_eq!(outbound(5, &[5, 9], 10, 100, true), Outbound::Loop);
        assert_eq!(outbound(9, &[5, 9], 10, 100, false), Outbound::Loop);
        assert_eq!(outbound(6, &[5], 10, 100, false), Outbound::Drop(DropReason::NatsDown));
        assert_eq!(outbound(6, &[5], 101, 100, true), Outbound::Drop(DropReason::TooLarge));
        assert_eq!(outbound(6, &[5], 100, 100, true), Outbound::Forward);
        assert_eq!(outbound(6, &[5], 1 << 30, 0, true), Outbound::Forward);
    }

    #[test]
    fn the_payload_limit_leaves_room_for_headers() {
        assert_eq!(payload_limit(1 << 20), (1 << 20) - HEADER_ROOM);
        assert_eq!(payload_limit(100), 0);
    }

    #[test]
    fn counters_reach_the_status_by_direction_and_reason() {
        let c = Counters::default();
        c.forwarded(Dir::LocalToNats);
        c.forwarded(Dir::LocalToNats);
        c.looped(Dir::LocalToNats);
        c.dropped(Dir::LocalToNats, DropReason::QueueFull, 3);
        c.dropped(Dir::NatsToLocal, DropReason::InvalidSubject, 1);
        c.call_ok(Dir::NatsToLocal);
        c.call_failed(Dir::NatsToLocal, "timeout");
        c.call_failed(Dir::NatsToLocal, "timeout");
        let s = c.snapshot(side());
        assert_eq!(s.local_to_nats.forwarded, 2);
        assert_eq!(s.local_to_nats.loops_suppressed, 1);
        assert_eq!(s.local_to_nats.dropped["queue-full"], 3);
        assert_eq!(s.local_to_nats.total_dropped(), 3);
        assert_eq!(c.total_dropped(Dir::LocalToNats), 3);
        assert_eq!(s.nats_to_local.dropped["invalid-subject"], 1);
        assert_eq!(s.nats_to_local.calls_ok, 1);
        assert_eq!(s.nats_to_local.calls_failed["timeout"], 2);
        // Every reason is listed, zero or not, so readers can rely on keys.
        assert_eq!(s.nats_to_local.dropped.len(), REASONS.len());
    }

    #[test]
    fn status_round_trips_through_json_and_renders() {
        let c = Counters::default();
        c.dropped(Dir::LocalToNats, DropReason::NatsDown, 7);
        let s = c.snapshot(side());
        let json = serde_json::to_string(&s).unwrap();
        let back: Status = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        let text = s.render();
        assert!(text.contains("dropped nats-down: 7"), "{text}");
        assert!(text.contains("max_payload 1048576"), "{text}");
    }
}
