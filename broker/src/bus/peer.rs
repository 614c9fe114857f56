//! A peer: one client connection, as the bus core holds it.
//!
//! Lifecycle: `AwaitHello` → `Ready` → `Closing` → (`Lingering`) → gone.
//! A peer is
//! `Closing` once the bus has decided to end it (it misbehaved, fell behind
//! with a `Disconnect` subscription, timed out, or the broker is shutting
//! down): its subscriptions are already out of the router, its channel
//! handles given back, its input is ignored, a `Goodbye` with the reason is
//! the last frame in its queue, and it is dropped when that queue has been
//! flushed or its deadline passes, whichever is first. If fds the broker
//! sent it are still unacknowledged (or acknowledged but not yet seen
//! read), they may sit unread in its socket, where the kernel charges them
//! to the broker's uid until the peer closes its end; so the peer
//! `Lingers`: the broker shuts down its side for writing but keeps the
//! socket, the connection and those fds charged to the peer's uid, until
//! the peer acknowledges them and the daemon sees them read
//! (`Bus::fds_delivered`), or it hangs up. A hostile peer can so pin no
//! more than its uid's limits.
//!
//! Identity: a peer's id is a `u64` handed out in increasing order and
//! never reused, so every registry (router, channels, stalls) keys on it
//! and a stale id can only miss, never hit another peer. Everything a peer
//! holds is charged to its uid's [`Usage`] through [`Charge`]s and the
//! queue, and released when the peer is dropped.

use std::collections::HashSet;
use std::rc::Rc;
use std::time::Instant;

use shmbus_proto::frame::ErrorCode;
use shmbus_proto::sys::socket::PeerCred;

use super::access::Access;
use shmbus_proto::text::escape;

use crate::bus::queue::{OutQueue, SubState};
use crate::bus::quota::{Charge, Resource, Usage};

/// A peer's id: never reused for the broker's lifetime.
pub type PeerId = u64;

/// A map keyed by peer id, hashed by one multiplication instead of
/// SipHash: the broker numbers peers itself, in order, so no peer can pick
/// keys that collide, and the reactor looks its connections up several
/// times per turn of its loop (SipHash was a tenth of a spinning broker's
/// time).
pub type PeerMap<V> = std::collections::HashMap<PeerId, V, std::hash::BuildHasherDefault<PeerIdHasher>>;

/// See [`PeerMap`]: Fibonacci hashing of the id (an odd multiplier, so
/// distinct ids keep distinct low bits, and the high bits mix them all).
#[derive(Default, Clone, Copy)]
pub struct PeerIdHasher(u64);

impl std::hash::Hasher for PeerIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by a `PeerId` key; anything else still
        // hashes, byte by byte.
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, id: u64) {
        self.0 = (self.0 ^ id).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by a peer's own subscription ids, hashed by a random key
/// (drawn per map) and a 64-bit mixer instead of SipHash (a lookup per
/// delivery: SipHash was 5% of a streaming broker's samples). The ids are
/// the peer's choice, so the key is secret: a peer cannot aim ids at one
/// bucket, and at worst slows its own lookups, bounded by its
/// subscription limit. (The map's order shows in introspection, which
/// lists a peer's patterns; the key is not practically recoverable from
/// bucket order, and it is drawn anew for every connection.)
pub type SubMap<V> = std::collections::HashMap<u32, V, SubIdHashing>;

/// See [`SubMap`]: the random key of one map.
#[derive(Clone, Copy, Debug)]
pub struct SubIdHashing(u64);

impl Default for SubIdHashing {
    fn default() -> SubIdHashing {
        use std::hash::BuildHasher;
        // std's per-process random keys (getrandom at first use), moved on
        // for each map.
        SubIdHashing(std::collections::hash_map::RandomState::new().hash_one(0u64))
    }
}

impl std::hash::BuildHasher for SubIdHashing {
    type Hasher = SubIdHasher;
    fn build_hasher(&self) -> SubIdHasher {
        SubIdHasher { key: self.0, hash: 0 }
    }
}

/// See [`SubMap`].
#[derive(Clone, Copy, Debug)]
pub struct SubIdHasher {
    key: u64,
    hash: u64,
}

impl std::hash::Hasher for SubIdHasher {
    fn finish(&self) -> u64 {
        self.hash
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u32` is used by a `u32` key; anything else still
        // hashes, a byte at a time.
        for &b in bytes {
            self.write_u32(u32::from(b) ^ (self.hash as u32).rotate_left(8));
        }
    }
    fn write_u32(&mut self, id: u32) {
        // The id, masked by the secret key, through murmur3's finaliser (a
        // bijection in which every input bit reaches every output bit): a
        // plain product kept structure (ids in steps of 2^k landed in a
        // third of the buckets for some keys).
        let mut x = (u64::from(id) ^ self.hash) ^ self.key;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^= x >> 33;
        self.hash = x;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    AwaitHello,
    Ready,
    Closing,
    /// Said goodbye; waits for the peer to hang up or acknowledge its fds.
    Lingering,
}

/// Where a peer stands with the shared-memory transport (`link.rs`).
#[derive(Debug)]
pub enum LinkPhase {
    /// May ask for one: `Hello` was its last frame.
    Offerable,
    /// Socket only, for good.
    Closed,
    /// Has one; its memory is charged here.
    Attached(Charge),
}

/// The subject a peer last published on and what it matched, so that a
/// stream on one subject is checked and routed once, not per message (a
/// third of a busy broker's time per message went to validating the
/// subject, splitting it and walking the trie). Valid while the router's
/// generation is the one it was made in; kept only for a match of at
/// most [`LastRoute::MAX_MATCHES`] subscriptions, so a peer holds a
/// bounded copy. Only what depends on the subject alone is skipped: the
/// access check (with its own per-subject memory) runs every time.
#[derive(Debug, Default)]
pub struct LastRoute {
    pub topic: String,
    pub generation: Option<u64>,
    pub matches: Vec<(PeerId, u32)>,
}

impl LastRoute {
    pub const MAX_MATCHES: usize = 64;

    /// Whether `topic` was routed last, with the router at `generation`.
    pub fn holds(&self, topic: &str, generation: u64) -> bool {
        self.generation == Some(generation) && self.topic == topic
    }

    /// Remembers a route (reusing the buffers); forgets when too big.
    pub fn remember(&mut self, topic: &str, generation: u64, matches: &[(PeerId, u32)]) {
        if matches.len() > Self::MAX_MATCHES {
            self.generation = None;
            return;
        }
        self.topic.clear();
        self.topic.push_str(topic);
        self.matches.clear();
        self.matches.extend_from_slice(matches);
        self.generation = Some(generation);
    }
}

/// A subscription and what it costs its uid.
#[derive(Debug)]
pub struct Subscription {
    pub state: SubState,
    pub charge: Charge,
}

#[derive(Debug)]
pub struct Peer {
    pub id: PeerId,
    pub cred: PeerCred,
    /// Its groups (`SO_PEERGROUPS`, and its primary gid), for the policy.
    pub groups: Vec<u32>,
    /// What the policy lets it do, compiled at connect and at each reload.
    pub access: Access,
    /// The peer's command name, from `/proc/<pid>/comm` at accept. Raw:
    /// escape it wherever a person reads it ([`Peer::who`] does).
    pub command: String,
    /// The name the client gave in `Hello`. Raw, like `command`.
    pub name: String,
    pub state: PeerState,
    pub link: LinkPhase,
    pub subs: SubMap<Subscription>,
    pub queue: OutQueue,
    /// Channel handles: (channel id, reader id; 0 for the publisher).
    pub channels: Vec<(u64, u32)>,
    /// Names it owns or waits for.
    pub names: Vec<String>,
    /// Reply slots it owes an answer to (as a service), by serial.
    pub calls_in: HashSet<u64>,
    /// Reply slots waiting on its behalf (as a caller), by serial.
    pub calls_out: HashSet<u64>,
    /// Some subscription has `missed > 0` awaiting a gap notice.
    pub owes_gaps: bool,
    /// A `Flush` effect for this peer is pending.
    pub dirty: bool,
    /// Publishes received; also the `seq` of the latest.
    pub published: u64,
    pub msgs_out: u64,
    pub dropped: u64,
    /// Channel membership frames queued for this peer and not yet sent:
    /// news waits in its channel while this many are in flight.
    pub news_queued: u32,
    /// Fds sent to this peer and not yet acknowledged with `FdAck`.
    pub unacked_fds: u64,
    /// Fds acknowledged with `FdAck` whose packets the daemon has not yet
    /// seen read from the socket ([`crate::bus::Bus::fds_delivered`]): a
    /// client can acknowledge fds it never took, so they still count
    /// against the window and the uid's `UnackedFds`.
    pub acked_fds: u64,
    /// The subject this peer last published on, checked and routed.
    pub last_route: LastRoute,
    pub connected_at: Instant,
    pub usage: Rc<Usage>,
    /// This connection's share of its uid's connection count.
    pub _connection: Charge,
}

impl Peer {
    /// "client 4 (uid 1000, pid 77, comm foo)": how log lines name a peer,
    /// with the command escaped so it cannot forge a line.
    pub fn who(&self) -> String {
        format!(
            "client {} (uid {}, pid {}, comm {})",
            self.id,
            self.cred.uid,
            self.cred.pid,
            escape(&self.command)
        )
    }

    /// Why a new subscription (or monitor) `sub_id` may not be made on
    /// this connection, holding at most `max`, if it may not.
    pub fn sub_id_refusal(&self, sub_id: u32, max: usize) -> Option<(ErrorCode, String)> {
        if self.subs.contains_key(&sub_id) {
            Some((ErrorCode::DuplicateSubscription, format!("subscription id {sub_id} is in use")))
        } else if self.subs.len() >= max {
            Some((
                ErrorCode::LimitExceeded,
                format!("at most {max} subscriptions per connection (raise it with --max-subscriptions)"),
            ))
        } else {
            None
        }
    }

    /// Closing or lingering: out of routing, input ignored but for `FdAck`.
    pub fn is_closing(&self) -> bool {
        matches!(self.state, PeerState::Closing | PeerState::Lingering)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        // The fds sent and never acknowledged (or never seen read) leave
        // with the socket.
        self.usage.sub(Resource::UnackedFds, self.unacked_fds + self.acked_fds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// Ids a peer picks to share their low bits (which a plain product
    /// keeps) still spread over a table's buckets, and each map draws its
    /// own key.
    #[test]
    fn chosen_sub_ids_spread_over_the_buckets() {
        // Over many keys, as each map draws its own (1024 ids that spread
        // as random ones fill ~632 of 1024 buckets, give or take 10).
        for _ in 0..200 {
            let hashing = SubIdHashing::default();
            for shift in [0, 10, 20, 22] {
                let buckets: std::collections::HashSet<u64> =
                    (0..1024u32).map(|i| hashing.hash_one(i << shift) & 1023).collect();
                assert!(buckets.len() > 500, "1024 ids << {shift} fell in {} of 1024 buckets", buckets.len());
            }
        }
        let hashing = SubIdHashing::default();
        let other = SubIdHashing::default();
        assert_ne!(hashing.hash_one(7u32), other.hash_one(7u32));
        let mut map: SubMap<u32> = SubMap::default();
        for i in 0..1000 {
            map.insert(i << 20, i);
        }
        assert!((0..1000).all(|i| map.get(&(i << 20)) == Some(&i)));
    }
}
