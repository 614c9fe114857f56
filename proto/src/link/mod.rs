//! The shared-memory transport: a pair of single-producer single-consumer
//! rings per connection, so brokered frames move with a memcpy instead of
//! a system call each.
//!
//! Model. At the handshake a client may send `Attach`; the broker then
//! creates two memfds of the same shape ([`layout`]) and passes them in
//! `Attached`:
//! - the **client half**, written by the client alone (the broker maps it
//!   read-only): the client → broker ring's data and write position, the
//!   client's read position in the other ring, the client's flags;
//! - the **broker half**, written by the broker alone (the client gets a
//!   read-only fd and maps it read-only): the broker → client ring, the
//!   broker's read position in the client's ring, the broker's flags.
//!
//! So each word of shared memory has exactly one writer, and a peer can
//! only ever scribble its own half. Frames in the rings are the very bytes
//! a socket packet would carry; a frame with fds still goes on the socket,
//! and a *marker* record in the ring holds its place in the order.
//!
//! Doorbells (notification suppression, as io_uring's `SQ_NEED_WAKEUP`):
//! a consumer about to sleep raises its `consumer_sleep` flag, re-checks
//! the ring, then sleeps; a producer rings only when it sees the flag
//! raised, once per raise. A producer waiting for room raises
//! `producer_wait`; the consumer rings it once the ring is at most half
//! full. What "ringing" is belongs to the caller: a `Doorbell` packet on the
//! connection's socket (which both sides already poll, and which a peer
//! cannot turn into a blocking write), or, for a client sender waiting for
//! room, a futex wake on the broker half's `room` word.
//!
//! Each client also says in its half where it runs (`presence`: its CPU,
//! and whether it only waits for the broker's ring): a scheduling hint by
//! which a broker spinning on the same CPU knows whether to yield, and
//! nothing else ([`protocol::Presence`]).
//!
//! [`protocol`] is the algorithm on plain references to atomics, so
//! [`model`] runs the same functions under loom (`RUSTFLAGS="--cfg loom"
//! cargo test -p shmbus-proto --lib --release --target-dir target/loom
//! link::model`); `shm` maps real memfds.

pub mod layout;
#[cfg(all(test, loom))]
mod model;
pub mod protocol;
#[cfg(not(loom))]
pub mod shm;

pub use protocol::{Consumer, LinkError, Presence, Producer, RecordKind};
