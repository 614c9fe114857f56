//! What a subscription receives.

use serde::de::DeserializeOwned;

pub use shmbus_proto::frame::Sender;

/// One message, as routed by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub(crate) topic: String,
    pub(crate) sender: Sender,
    pub(crate) seq: u64,
    pub(crate) payload: Vec<u8>,
}

impl Message {
    /// The subject it was published to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Who sent it, stamped by the broker from `SO_PEERCRED`: it cannot be
    /// forged by the sender.
    pub fn sender(&self) -> Sender {
        self.sender
    }

    /// The sender's publish count on its connection when it sent this
    /// (1 for its first publish). Per sender, it only grows.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    pub fn into_payload(self) -> Vec<u8> {
        self.payload
    }

    /// Decodes a payload written by [`crate::Client::publish_value`].
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, postcard::Error> {
        postcard::from_bytes(&self.payload)
    }
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message.
    Message(Message),
    /// `missed` messages for this subscription were dropped at this point of
    /// the stream because it fell behind (in the broker's queue, or in this
    /// process's per-subscription buffer).
    Gap { missed: u64 },
}

impl Event {
    /// The message, if this is one.
    pub fn message(self) -> Option<Message> {
        match self {
            Event::Message(m) => Some(m),
            Event::Gap { .. } => None,
        }
    }
}
