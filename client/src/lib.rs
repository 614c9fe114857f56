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
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Layering: this crate speaks the wire protocol of `shmbus-proto` over
//! its socket layer and holds no `unsafe` of its own. A [`Client`] is one
//! connection; [`Subscription`]s share it (see `connection` for how one
//! socket feeds many consumers without a background thread).

#![forbid(unsafe_code)]

mod channel;
mod client;
mod connection;
mod error;
mod loan;
mod message;
mod subscription;

pub use channel::{
    ChannelConfig, ChannelError, ChannelEvent, ChannelLoan, ChannelPublisher, ChannelSubscriber,
};
pub use client::{Client, ConnectOptions, DEFAULT_LOCAL_QUEUE, DEFAULT_MEMFD_THRESHOLD, DEFAULT_TIMEOUT};
pub use error::{
    ConnectError, Disconnect, ErrorKind, FlushError, LoanError, PublishError, PublishRefused, RecvError,
    RequestError, SubscribeError,
};
pub use loan::Loan;
pub use message::{Event, Message, Sender};
pub use shmbus_proto::sys::memfd::MemfdError;
pub use subscription::{Iter, Subscription};

/// Wire-level types a client may need to name.
pub use shmbus_proto::frame::{
    ChannelInfo, ChannelOverflow, ClientInfo, ErrorCode, GoodbyeCode, Limits, Overflow, Stats, TopicInfo,
};
pub use shmbus_proto::sys::socket::PeerCred;
pub use shmbus_proto::Address;
