//! For the `client_delivery` fuzz target (`fuzz/`) and its regression
//! test: a connection whose broker end is a bare socket, so a harness can
//! send it any packet with any fds, and the client reads them through its
//! real receive path (`recvmmsg`, fd checks, dispatch into its state). Not
//! an API: hidden, and free to change.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use shmbus_proto::frame::Limits;
use shmbus_proto::limits::{MAX_INLINE_PAYLOAD, MAX_PACKET, MAX_SUBJECT_DEPTH};
use shmbus_proto::sys::socket::{self, PeerCred};

use crate::connection::{Inner, LocalBounds};
use crate::error::Disconnect;
use crate::message::Event;
use crate::subscription::Subscription;

/// A connection past its handshake that awaits something for each id in
/// `1..=IDS`: subscriptions (their acks pending), queries, channel opens,
/// channels it publishes, and pings.
pub const IDS: u32 = 3;

pub struct Connection {
    inner: Arc<Inner>,
    subs: Vec<Subscription>,
}

/// A connection and the broker's end of its socket. Each subscription's
/// queue holds at most `messages` events, `bytes` bytes and `fds` fds, and
/// all of them together twice that many bytes and fds; `fd_window` is the
/// broker's announced fd window.
pub fn connection(
    messages: usize,
    bytes: usize,
    fds: usize,
    fd_window: u32,
) -> io::Result<(Connection, OwnedFd)> {
    let (ours, broker) = socket::pair()?;
    let limits = Limits {
        max_packet: MAX_PACKET as u32,
        max_inline_payload: MAX_INLINE_PAYLOAD as u32,
        queue_bytes: 1 << 20,
        queue_frames: 1024,
        max_subscriptions: 64,
        fd_window,
        max_depth: MAX_SUBJECT_DEPTH as u32,
    };
    let cred = PeerCred { pid: 0, uid: 0, gid: 0 };
    let bounds = LocalBounds { messages, bytes, fds, total_bytes: 2 * bytes, total_fds: 2 * fds };
    let inner = Arc::new(Inner::with_bounds(
        ours,
        1,
        limits,
        cred,
        "fuzz".into(),
        bounds,
        None,
        std::time::Duration::from_secs(5),
    ));
    let mut subs = Vec::new();
    {
        // As `Client` sets them up when it asks.
        let mut st = inner.state.lock();
        for _ in 1..=IDS {
            let id = st.new_sub_id().expect("ids are free");
            st.add_sub(id, Vec::new());
            st.awaiting_ack.insert(id);
            subs.push(Subscription::new(inner.clone(), id, format!("fuzz.{id}")));
            st.new_query().expect("ids are free");
            let id = st.next_channel_id()?;
            st.awaiting_grant.insert(id);
            st.reader_events.entry(u64::from(id)).or_default();
            st.new_ping();
        }
    }
    Ok((Connection { inner, subs }, broker))
}

impl Connection {
    /// Reads what is waiting, as an app would (`Subscription::recv_any`,
    /// not waiting), and returns every event with its sub id, in the order
    /// taken, and why the connection ended, if it did.
    pub fn drain(&self) -> (Vec<(u32, Event)>, Option<Disconnect>) {
        let subs: Vec<&Subscription> = self.subs.iter().collect();
        let mut events = Vec::new();
        while let Ok(Some((i, ev))) = Subscription::recv_any(&subs, Some(Duration::ZERO)) {
            events.push((i as u32 + 1, ev));
        }
        (events, self.inner.state.lock().closed.clone())
    }
}
