//! shmbus: the client library of the shmbus local message bus.
//!
//! ```no_run
//! use shmbus::{Client, Event};
//!
//! let client = Client::connect()?;            // $SHMBUS_ADDRESS or @shmbus.<uid>
//! let sub = client.subscribe("sensors.*.temp")?;
//! client.publish("sensors.kitchen.temp", b"21.5")?;
//! match sub.recv()? {
//!     Event::Message(m) => println!("{} from pid {}: {:?}", m.topic(), m.sender().pid, m.payload()),
//!     Event::Gap { missed } => eprintln!("fell behind, missed {missed}"),
//!     Event::Reconnected => eprintln!("the broker restarted; some messages may have been missed"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Services: a client owns a name and answers calls to it; every call
//! gets exactly one answer (the reply, or a [`CallError`] saying why not).
//!
//! ```no_run
//! use std::time::Duration;
//! # let client = shmbus::Client::connect()?;
//! let service = client.serve("thermo.kitchen")?;      // in the service
//! # let caller = shmbus::Client::connect()?;
//! let call = caller.request_async("thermo.kitchen", b"temp?", Duration::from_secs(1))?;
//! let request = service.recv()?;
//! request.reply(b"21.5")?;
//! assert_eq!(call.wait()?.payload(), b"21.5");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Administration: [`Client::monitor`] watches what passes through the
//! broker, [`Client::policy_check`] asks how its policy decides an action.
//! When a reloaded policy takes something back, the handle says so: a
//! [`Subscription`] or [`Service`] ends with [`RecvError::Revoked`], a ring
//! channel with [`ChannelError::Revoked`], and [`Client::revoked_names`]
//! lists names owned without a `Service`.
//!
//! Async: with the cargo feature `tokio`, `AsyncClient` offers the same
//! API to tokio tasks (streams of events and requests, cancel-safe
//! futures), on the same connection as the blocking API.
//!
//! Layering: this crate speaks the wire protocol of `shmbus-proto` over
//! its socket layer, and over its shared-memory link where the broker
//! offers one (see [`Client::transport`]), and holds no `unsafe` of its
//! own. A [`Client`] is one
//! connection; [`Subscription`]s share it (see `connection` for how one
//! socket feeds many consumers without a background thread).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "tokio")]
mod asynch;
mod channel;
mod client;
mod connection;
mod core;
mod error;
/// For the fuzz targets in `fuzz/`; not an API.
#[doc(hidden)]
pub mod fuzzing;
mod id_map;
mod link;
mod loan;
mod message;
mod monitor;
mod service;
mod subscription;

pub use channel::{
    ChannelConfig, ChannelError, ChannelEvent, ChannelLoan, ChannelPublisher, ChannelSubscriber,
};
pub use client::{
    Client, ConnectOptions, ReconnectPolicy, DEFAULT_LOCAL_QUEUE, DEFAULT_MEMFD_THRESHOLD, DEFAULT_TIMEOUT,
    TRANSPORT_ENV,
};
pub use error::{
    BadSubject, CallError, ConnectError, Disconnect, ErrorKind, FlushError, LoanError, MonitorError,
    NameError, PublishError, PublishRefused, RecvError, Refusals, ReplyError, RequestError, SendRefused,
    ServeError, SubscribeError, MAX_REFUSALS,
};
pub use link::Transport;
pub use loan::Loan;
pub use message::{DecodeError, Event, Message, Sender};
pub use monitor::{BusEvent, Monitor, MonitorItem, MonitorIter};
pub use service::{
    reply_code, Incoming, NameFlagsExt, NameStatus, PendingCall, Reply, Request, RevokedName, Service,
    MAX_ERROR_MESSAGE,
};
pub use shmbus_proto::sys::memfd::MemfdError;
pub use subscription::{Iter, Subscription};

/// The async API, on tokio (cargo feature `tokio`): see [`AsyncClient`].
#[cfg(feature = "tokio")]
pub use asynch::{AsyncChannelSubscriber, AsyncClient, AsyncService, AsyncSubscription};

/// Wire-level types a client may need to name.
pub use shmbus_proto::frame::{
    ChannelInfo, ChannelOverflow, ClientInfo, ErrorCode, GoodbyeCode, Limits, MonitorKind, NameFlags,
    NameInfo, NameOwnerChanged, NameResult, Overflow, PolicyVerdict, Stats, TopicInfo,
};
pub use shmbus_proto::sys::socket::PeerCred;
pub use shmbus_proto::Address;
