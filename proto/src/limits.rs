//! Fixed protocol limits, shared by both ends.
//!
//! These bound every buffer a peer can make the other side allocate. The
//! broker may announce tighter per-connection limits in `Welcome`; it never
//! announces looser ones than these constants, because receive buffers on
//! both sides are sized from them.

/// Largest packet (header, body and inline payload) either side sends.
/// A larger one is a protocol violation (`MSG_TRUNC` on receive).
pub const MAX_PACKET: usize = 72 * 1024;

/// Largest inline payload. Bigger payloads go as sealed memfds; 64 KiB
/// keeps one packet well inside the default AF_UNIX send buffer
/// (`net.core.wmem_default`, 208 KiB) so a single send never stalls.
pub const MAX_INLINE_PAYLOAD: usize = 64 * 1024;

/// Longest subject or pattern, in bytes.
pub const MAX_SUBJECT_LEN: usize = 1024;

/// Most tokens in a subject or pattern. Bounds the router's work per
/// publish (its depth) and its memory per pattern. NATS has no fixed
/// bound; 32 is deeper than any subject scheme seen in practice.
pub const MAX_SUBJECT_DEPTH: usize = 32;

/// Most client ids one name's introspection (`NameInfo`) lists, owners
/// and queue together; the counts say how many there are in all. 4,096
/// ids of at most 10 bytes each, and a name of [`MAX_SUBJECT_LEN`], fit
/// [`MAX_PACKET`] whatever the ids.
pub const MAX_NAME_INFO_IDS: usize = 4096;
// A u64 is at most 10 varint bytes; 256 bytes for the header, the other
// fields and the name's length prefix.
const _: () = assert!(MAX_NAME_INFO_IDS * 10 + MAX_SUBJECT_LEN + 256 <= MAX_PACKET);

/// Longest client name sent in `Hello`, in bytes.
pub const MAX_CLIENT_NAME: usize = 256;

/// The longest `origin` a publish or request may carry (bytes of UTF-8).
pub const MAX_ORIGIN_LEN: usize = 256;

/// Longest text a frame carries for people to read: an application's
/// error message in a `Reply` (the broker refuses a longer one, and the
/// client library cuts its own to this), and any reason or message the
/// broker writes (`OpError`, `Goodbye`, `Revoked`, an `Answer`'s
/// outcome, a monitor event's detail), which it cuts to this at a
/// character boundary. With the other limits, every frame the broker
/// builds around what a peer sent still fits [`MAX_PACKET`].
pub const MAX_ERROR_MESSAGE: usize = 4096;

/// Most characters of a peer's string quoted in a message about it
/// ([`crate::text::quote`]): a refusal quotes enough to recognise it,
/// never the whole of a string that may fill a packet.
pub const MAX_QUOTED_CHARS: usize = 64;

/// Largest memfd payload, in bytes (1 TiB). A sealed memfd may be sparse:
/// one of 2^63 bytes costs its maker nothing, and sums of such lengths
/// would overflow the counters that charge payloads to a uid's quota.
/// Larger ones are refused (`PayloadTooLarge`; a client counts one it
/// receives as missed).
pub const MAX_MEMFD_PAYLOAD: u64 = 1 << 40;

/// Most fds that may ride on one packet. The receive side sizes its
/// control buffer for exactly this many; more is `MSG_CTRUNC`.
pub const MAX_FDS_PER_PACKET: usize = 4;

/// Default bound of one connection's outgoing queue, in bytes.
pub const DEFAULT_QUEUE_BYTES: u64 = 4 * 1024 * 1024;

/// Default bound of one connection's outgoing queue, in frames.
pub const DEFAULT_QUEUE_FRAMES: u32 = 8192;

/// Default bound of one connection's outgoing queue, in memfd payloads.
pub const DEFAULT_QUEUE_FDS: u32 = 256;

/// Default number of subscriptions one connection may hold.
pub const DEFAULT_MAX_SUBSCRIPTIONS: u32 = 4096;

/// Default bytes of memfd payloads one uid may have held by the broker
/// (queued for subscribers that have not yet received them).
pub const DEFAULT_MEMFD_QUOTA_BYTES: u64 = 1024 * 1024 * 1024;

/// Default number of memfd payloads one uid may have held by the broker.
pub const DEFAULT_MEMFD_QUOTA_FDS: u32 = 1024;

/// Default number of connections one uid may have open at once.
pub const DEFAULT_MAX_CONNECTIONS_PER_UID: u32 = 256;

/// Default bytes queued in the broker for all of one uid's connections.
pub const DEFAULT_UID_QUEUE_BYTES: u64 = 64 * 1024 * 1024;

/// Default fds queued in the broker for all of one uid's connections.
pub const DEFAULT_UID_QUEUE_FDS: u64 = 1024;

/// Default fds the broker sends one connection before it waits for an
/// acknowledgement.
pub const DEFAULT_FD_WINDOW: u32 = 128;

/// Default fds sent to one uid's connections and not yet acknowledged.
pub const DEFAULT_UID_UNACKED_FDS: u64 = 1024;

/// Default subscriptions one uid may hold across its connections.
pub const DEFAULT_UID_SUBSCRIPTIONS: u64 = 16 * 1024;

/// Default router memory one uid's subscriptions may take, in bytes.
pub const DEFAULT_UID_ROUTER_BYTES: u64 = 16 * 1024 * 1024;

/// Default ring channels one uid may publish.
pub const DEFAULT_UID_CHANNELS: u64 = 64;

/// Default reader handles one uid may hold on channels.
pub const DEFAULT_UID_CHANNEL_READERS: u64 = 256;

/// Default readers one channel may have.
pub const DEFAULT_MAX_READERS_PER_CHANNEL: u32 = 64;

/// Default readers one uid may have on one channel.
pub const DEFAULT_MAX_READERS_PER_CHANNEL_PER_UID: u32 = 16;

/// Default ring and cursor memory one uid may have the broker create.
pub const DEFAULT_UID_RING_BYTES: u64 = 256 * 1024 * 1024;

/// Default names one uid may own or wait for.
pub const DEFAULT_UID_NAMES: u64 = 256;

/// Default requests one uid may have waiting for an answer.
pub const DEFAULT_UID_PENDING_REQUESTS: u64 = 4096;

/// Longest a request may wait for its answer, in milliseconds (also what a
/// request that names no timeout gets).
pub const DEFAULT_MAX_REQUEST_TIMEOUT_MS: u64 = 60_000;

/// Default time a new connection has to say `Hello`, in milliseconds.
pub const DEFAULT_HELLO_TIMEOUT_MS: u64 = 5000;
