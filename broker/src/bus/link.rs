//! The shared-memory transport (`shmbus_proto::link`), as the bus sees it:
//! who may have one, and what it costs. Moving bytes through it is the
//! daemon's (`daemon/link.rs`); to the bus a frame is a frame, whichever
//! way it came or goes.
//!
//! Rules: `Attach` is valid only as a peer's first frame after `Hello`, so
//! nothing has been queued for it yet and the switch from socket to rings
//! happens between two frames, never inside the order. A link's two
//! halves are allocated up front and charged to the peer's uid as ring
//! bytes (`--uid-ring-bytes`), for as long as the connection lives. When
//! the bus says yes ([`Effect::Attach`]), the daemon makes the memfds and
//! sends `Attached`; if it cannot, it says so ([`Bus::attach_failed`]),
//! the charge is given back and the client hears why, on the socket, and
//! carries on there.

use std::time::Instant;

use shmbus_proto::frame::{Attach, ErrorCode, Op};
use shmbus_proto::link::layout::valid_capacity;
use shmbus_proto::link::shm::link_bytes;

use super::peer::{LinkPhase, PeerId};
use super::quota::{charge_usage, Resource};
use super::{bump, Bus, Effect};

impl Bus {
    pub(crate) fn attach(&mut self, id: PeerId, a: Attach, may: bool, now: Instant) {
        let op = Op::Attach;
        if !may {
            let msg = "Attach is only valid as the first frame after Hello";
            return self.op_error(id, op, ErrorCode::Unsupported, msg, now);
        }
        let Some(default) = self.cfg.link_capacity else {
            let msg = "this broker runs without the shared-memory transport (--no-shared-memory)";
            return self.op_error(id, op, ErrorCode::Unsupported, msg, now);
        };
        let capacity = if a.capacity == 0 { default } else { a.capacity };
        if !valid_capacity(capacity) {
            let msg = format!("link capacity {capacity} is not a power of two from 256 KiB to 16 MiB");
            return self.op_error(id, op, ErrorCode::Unsupported, &msg, now);
        }
        let Some(p) = self.peers.get_mut(&id) else { return };
        let charge = match charge_usage(&p.usage, &[(Resource::RingBytes, link_bytes(capacity))]) {
            Ok(c) => c,
            Err(e) => return self.quota_refusal(id, op, &e, now),
        };
        p.link = LinkPhase::Attached(charge);
        self.effects.push(Effect::Attach(id, capacity));
    }

    /// The daemon could not set up the link the bus allowed: the charge is
    /// given back and the client told why; it goes on over the socket.
    pub fn attach_failed(&mut self, id: PeerId, why: &str, now: Instant) {
        let Some(p) = self.peers.get_mut(&id) else { return };
        p.link = LinkPhase::Closed;
        bump(&mut self.counters.broker_resource_errors, 1);
        let msg = format!("the broker cannot set up the shared-memory transport: {why}");
        self.op_error(id, Op::Attach, ErrorCode::BrokerResource, &msg, now);
    }

    /// Whether `id` has a link.
    pub fn is_linked(&self, id: PeerId) -> bool {
        self.peers.get(&id).is_some_and(|p| matches!(p.link, LinkPhase::Attached(_)))
    }
}
