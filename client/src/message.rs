//! What a subscription receives.
//!
//! A message's payload came either inline (copied out of the packet) or as
//! a sealed memfd. Both read the same way, through [`Message::payload`]; a
//! memfd is mapped read-only on first use and unmapped when the message
//! drops, or handed on unmapped with [`Message::into_fd`].

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use serde::de::DeserializeOwned;
use shmbus_proto::sys::memfd::{self, MemfdError};
use shmbus_proto::sys::mmap::MappedRo;

pub use shmbus_proto::frame::Sender;

/// A sealed memfd payload: checked on arrival, mapped on first read.
///
/// The mapping is not pre-faulted (`MAP_POPULATE`): the `payload` benchmark
/// measured pre-faulting slower end to end (shmem fault-around maps 16
/// pages per fault) and much slower to a first usable mapping.
#[derive(Debug)]
pub(crate) struct MemfdPayload {
    pub fd: OwnedFd,
    pub len: u64,
    map: OnceLock<Result<MappedRo, MemfdError>>,
}

impl MemfdPayload {
    pub fn new(fd: OwnedFd, len: u64) -> MemfdPayload {
        MemfdPayload { fd, len, map: OnceLock::new() }
    }

    fn bytes(&self) -> Result<&[u8], MemfdError> {
        self.map
            .get_or_init(|| MappedRo::map_sealed(self.fd.as_fd(), self.len, false))
            .as_ref()
            .map(MappedRo::as_slice)
            .map_err(Clone::clone)
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Body {
    /// Up to [`SMALL`] bytes, in the message itself: most of a bus's
    /// messages are this short, and each then costs no allocation (malloc
    /// and free were 7% of a 16-byte stream's subscriber's samples).
    Small {
        len: u8,
        bytes: [u8; SMALL],
    },
    Inline(Vec<u8>),
    Memfd(Arc<MemfdPayload>),
}

/// Most payload bytes a message holds without an allocation: with the
/// length and the variant's tag, a body is 32 bytes (8 more than a `Vec`
/// alone; the unit test bounds it).
pub(crate) const SMALL: usize = 22;

impl Body {
    /// An inline payload, copied out of the packet.
    pub(crate) fn inline(payload: &[u8]) -> Body {
        match payload.len() {
            len @ 0..=SMALL => {
                let mut bytes = [0; SMALL];
                bytes[..len].copy_from_slice(payload);
                Body::Small { len: len as u8, bytes }
            }
            _ => Body::Inline(payload.to_vec()),
        }
    }
}

/// One message, as routed by the broker.
#[derive(Debug, Clone)]
pub struct Message {
    pub(crate) topic: Arc<str>,
    pub(crate) sender: Sender,
    pub(crate) seq: u64,
    pub(crate) origin: Option<String>,
    pub(crate) body: Body,
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

    /// Where the message comes from, as its publisher claims it (see
    /// [`crate::Client::publish_with_origin`]): `shmbus-bridge` names the
    /// host and sender it forwards for here. Unlike [`Message::sender`],
    /// the broker does not vouch for it: trust it as far as you trust the
    /// sender. At most 256 bytes without control characters (the broker
    /// checks); escape it before printing ([`shmbus_proto::text::escape`]).
    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// The payload bytes, however they travelled. A memfd payload is mapped
    /// read-only (`PROT_READ`, `MAP_SHARED`) on the first call.
    ///
    /// Never panics. If a memfd payload cannot be mapped, this returns an
    /// empty slice (while [`Message::len`] still says the declared length):
    /// use [`Message::try_payload`] to tell that apart from an empty
    /// payload. Every fd was checked on arrival (a readable, sealed shmem
    /// memfd of the declared size; anything else became a
    /// [`Event::Gap`]), so what is left to fail is the mapping itself:
    /// address space or memory exhausted.
    pub fn payload(&self) -> &[u8] {
        self.try_payload().unwrap_or_default()
    }

    /// The payload bytes, or why a memfd payload could not be mapped.
    pub fn try_payload(&self) -> Result<&[u8], MemfdError> {
        match &self.body {
            Body::Small { len, bytes } => Ok(&bytes[..usize::from(*len)]),
            Body::Inline(v) => Ok(v),
            Body::Memfd(m) => m.bytes(),
        }
    }

    /// Payload length in bytes, without mapping anything.
    pub fn len(&self) -> usize {
        match &self.body {
            Body::Small { len, .. } => usize::from(*len),
            Body::Inline(v) => v.len(),
            Body::Memfd(m) => m.len as usize,
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the payload arrived as a sealed memfd.
    pub fn is_memfd(&self) -> bool {
        matches!(self.body, Body::Memfd(_))
    }

    /// The payload as a sealed memfd, without mapping it: the one that
    /// arrived (duplicated if a clone of this message still holds it), or,
    /// for an inline payload, a new sealed memfd holding its bytes. Pass it
    /// on with [`crate::Client::publish_fd`].
    pub fn into_fd(self) -> io::Result<OwnedFd> {
        match self.body {
            Body::Small { len, bytes } => memfd::from_bytes("shmbus-payload", &bytes[..usize::from(len)]),
            Body::Inline(v) => memfd::from_bytes("shmbus-payload", &v),
            Body::Memfd(m) => match Arc::try_unwrap(m) {
                Ok(m) => Ok(m.fd),
                Err(shared) => shared.fd.try_clone(),
            },
        }
    }

    /// The payload as owned bytes (copied out of a memfd); empty if a memfd
    /// payload cannot be mapped, like [`Message::payload`].
    pub fn into_payload(self) -> Vec<u8> {
        match self.body {
            Body::Inline(v) => v,
            Body::Small { .. } | Body::Memfd(_) => self.payload().to_vec(),
        }
    }

    /// Decodes a payload written by [`crate::Client::publish_value`]
    /// (postcard). The value must use every byte: a payload that is not
    /// what `T` encodes to (say, the text `21.5` read as a `u32`) is an
    /// error, not the value its first bytes happen to spell.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        let bytes = self.try_payload().map_err(DecodeError::Memfd)?;
        let (value, rest) = postcard::take_from_bytes(bytes)
            .map_err(|e| DecodeError::Format { len: bytes.len(), reason: e.to_string() })?;
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes { len: bytes.len(), unused: rest.len() });
        }
        Ok(value)
    }
}

/// Why [`Message::decode`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The payload is not a postcard encoding of the requested type.
    #[error("the {len}-byte payload is not a postcard encoding of the requested type ({reason}); was it sent with publish_value?")]
    Format {
        /// The payload's length, in bytes.
        len: usize,
        /// What postcard said.
        reason: String,
    },
    /// The value ended before the payload did: the payload holds something
    /// else (text, another type).
    #[error("the {len}-byte payload is not a postcard encoding of the requested type: {unused} bytes are left over after the value; was it sent with publish_value?")]
    TrailingBytes {
        /// The payload's length, in bytes.
        len: usize,
        /// The bytes left after the value.
        unused: usize,
    },
    /// The memfd payload could not be mapped.
    #[error("cannot map the memfd payload: {0}")]
    Memfd(MemfdError),
}

impl DecodeError {
    /// The class of the error.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            DecodeError::Format { .. } | DecodeError::TrailingBytes { .. } => crate::ErrorKind::InvalidInput,
            DecodeError::Memfd(_) => crate::ErrorKind::Io,
        }
    }
}

/// What a subscription yields.
#[derive(Debug, Clone)]
pub enum Event {
    /// A message.
    Message(Message),
    /// `missed` messages for this subscription were dropped at this point of
    /// the stream because it fell behind (in the broker's queue, or in this
    /// process's per-subscription buffer), or, for a memfd payload, because
    /// it failed this client's own check (a readable, sealed shmem memfd of
    /// the declared size).
    Gap {
        /// How many messages were dropped.
        missed: u64,
    },
    /// The connection to the broker was lost and made again, and this
    /// subscription was renewed: messages published in between may have
    /// been missed, and how many cannot be known. (Only with reconnection
    /// on, the default: `ConnectOptions::reconnect`.)
    Reconnected,
}

impl Event {
    /// The message, if this is one.
    pub fn message(self) -> Option<Message> {
        match self {
            Event::Message(m) => Some(m),
            Event::Gap { .. } | Event::Reconnected => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: Body) -> Message {
        let sender = Sender { client_id: 1, uid: 0, gid: 0, pid: 1 };
        Message { topic: "t".into(), sender, seq: 1, origin: None, body }
    }

    #[test]
    fn decode_wants_the_whole_payload_to_be_the_value() {
        let m = message(Body::Inline(b"21.5".to_vec()));
        // postcard reads b'2' (50) as a u32 and would stop there.
        assert!(matches!(m.decode::<u32>(), Err(DecodeError::TrailingBytes { len: 4, unused: 3 })));
        let m = message(Body::Inline(postcard::to_allocvec(&21.5f32).unwrap()));
        assert_eq!(m.decode::<f32>(), Ok(21.5));
        let m = message(Body::Inline(Vec::new()));
        assert!(matches!(m.decode::<u32>(), Err(DecodeError::Format { len: 0, .. })));
    }

    /// Short payloads live in the message, longer ones on the heap; every
    /// accessor reads both the same, at and around the boundary.
    #[test]
    fn a_payload_reads_the_same_in_the_message_or_on_the_heap() {
        assert!(std::mem::size_of::<Body>() <= 32, "a small body must not grow the message");
        for len in [0, 1, SMALL - 1, SMALL, SMALL + 1, 100] {
            let bytes: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(7).wrapping_add(1)).collect();
            let body = Body::inline(&bytes);
            assert_eq!(matches!(body, Body::Small { .. }), len <= SMALL, "len {len}");
            let m = message(body);
            assert_eq!(m.payload(), &bytes[..]);
            assert_eq!(m.try_payload().unwrap(), &bytes[..]);
            assert_eq!((m.len(), m.is_empty(), m.is_memfd()), (len, len == 0, false));
            assert_eq!(m.clone().into_payload(), bytes);
            let fd = m.into_fd().unwrap();
            let back = MappedRo::map_sealed(fd.as_fd(), len as u64, false).unwrap();
            assert_eq!(back.as_slice(), &bytes[..]);
        }
    }

    /// A memfd that cannot be mapped (here: a sealed one reopened
    /// write-only, as if a check upstream had missed it) never panics the
    /// app: `try_payload` says why, `payload` is empty.
    #[test]
    fn an_unmappable_payload_is_an_error_not_a_panic() {
        let fd = memfd::from_bytes("t", b"hello").unwrap();
        let wronly = rustix::fs::open(
            format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd)),
            rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        let m = message(Body::Memfd(Arc::new(MemfdPayload::new(wronly, 5))));
        assert!(m.try_payload().is_err());
        assert_eq!(m.payload(), b"");
        assert_eq!(m.len(), 5);
        assert!(m.decode::<u32>().is_err());
        assert_eq!(m.clone().into_payload(), b"");
        // The fd itself can still be handed on.
        assert!(m.into_fd().is_ok());
        let ok = message(Body::Memfd(Arc::new(MemfdPayload::new(fd, 5))));
        assert_eq!(ok.payload(), b"hello");
    }
}
