//! The two hottest bodies, `Publish` and `Deliver`, in postcard by hand.
//!
//! Every brokered message is one `Publish` the broker decodes and one
//! `Deliver` per receiver it encodes and the receiver decodes. Through
//! serde each field is a trait call into postcard's serializer or
//! deserializer; written out, a body is a few varints and two strings
//! (`perf` on a 16-byte stream: serde's and postcard's functions were 14%
//! of the broker's samples and 14% of a subscriber's).
//!
//! Invariants, checked by the property tests below:
//! - **Encoding is byte for byte postcard's** (the same varints, the same
//!   `Option` tags and enum indices), so the wire does not change and a
//!   peer that uses serde reads it.
//! - **Decoding never accepts what postcard refuses, nor reads a value
//!   postcard would read differently.** Anything out of the ordinary (a
//!   varint at its longest, an unknown tag, trailing bytes, bad UTF-8)
//!   gives `None`, and the caller decodes the body with postcard, whose
//!   error is then the one reported. So the fast path can only be faster,
//!   never more lenient.

use super::{Deliver, PayloadRef, Publish, Sender};

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    push_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn push_origin(out: &mut Vec<u8>, origin: Option<&str>) {
    match origin {
        None => out.push(0),
        Some(o) => {
            out.push(1);
            push_str(out, o);
        }
    }
}

fn push_payload_ref(out: &mut Vec<u8>, p: PayloadRef) {
    match p {
        PayloadRef::Inline => out.push(0),
        PayloadRef::Memfd { len } => {
            out.push(1);
            push_varint(out, len);
        }
    }
}

/// Appends `Publish`'s postcard body to `out`.
pub(super) fn encode_publish(out: &mut Vec<u8>, p: &Publish<'_>) {
    push_str(out, p.topic);
    push_origin(out, p.origin);
    push_payload_ref(out, p.payload);
}

/// Appends `Deliver`'s postcard body to `out`.
pub(super) fn encode_deliver(out: &mut Vec<u8>, d: &Deliver<'_>) {
    push_varint(out, u64::from(d.sub_id));
    push_str(out, d.topic);
    let Sender { client_id, uid, gid, pid } = d.sender;
    push_varint(out, client_id);
    push_varint(out, u64::from(uid));
    push_varint(out, u64::from(gid));
    push_varint(out, u64::from(pid));
    push_varint(out, d.seq);
    push_origin(out, d.origin);
    push_payload_ref(out, d.payload);
}

/// A cursor over a body; every method gives `None` where the fast path
/// declines (see the module essay).
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(b)
    }

    /// A varint of at most `max_len - 1` bytes: the longest form, whose
    /// last byte postcard range-checks, is left to postcard.
    fn varint(&mut self, max_len: usize) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..max_len - 1 {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn u32(&mut self) -> Option<u32> {
        // 5 bytes is postcard's longest u32; 4 hold 28 bits.
        self.varint(5).map(|v| v as u32)
    }

    fn u64(&mut self) -> Option<u64> {
        // 10 bytes is postcard's longest u64; 9 hold 63 bits.
        self.varint(10)
    }

    fn str(&mut self) -> Option<&'a str> {
        // postcard reads a length as a usize varint; one of at most 4
        // bytes (2^28, past any packet) reads the same on every platform.
        let len = self.u32()? as usize;
        let (s, rest) = self.bytes.split_at_checked(len)?;
        self.bytes = rest;
        std::str::from_utf8(s).ok()
    }

    fn origin(&mut self) -> Option<Option<&'a str>> {
        match self.byte()? {
            0 => Some(None),
            1 => Some(Some(self.str()?)),
            _ => None,
        }
    }

    fn payload_ref(&mut self) -> Option<PayloadRef> {
        match self.byte()? {
            0 => Some(PayloadRef::Inline),
            1 => Some(PayloadRef::Memfd { len: self.u64()? }),
            _ => None,
        }
    }

    /// `value` if every byte was used, as postcard requires.
    fn end<T>(self, value: T) -> Option<T> {
        self.bytes.is_empty().then_some(value)
    }
}

/// `Publish` from its body, or `None`: let postcard decide.
pub(super) fn decode_publish(body: &[u8]) -> Option<Publish<'_>> {
    let mut r = Reader { bytes: body };
    let topic = r.str()?;
    let origin = r.origin()?;
    let payload = r.payload_ref()?;
    r.end(Publish { topic, origin, payload })
}

/// `Deliver` from its body, or `None`: let postcard decide.
pub(super) fn decode_deliver(body: &[u8]) -> Option<Deliver<'_>> {
    let mut r = Reader { bytes: body };
    let sub_id = r.u32()?;
    let topic = r.str()?;
    let sender = Sender { client_id: r.u64()?, uid: r.u32()?, gid: r.u32()?, pid: r.u32()? };
    let seq = r.u64()?;
    let origin = r.origin()?;
    let payload = r.payload_ref()?;
    r.end(Deliver { sub_id, topic, sender, seq, origin, payload })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn payload_ref() -> impl Strategy<Value = PayloadRef> {
        prop_oneof![Just(PayloadRef::Inline), any::<u64>().prop_map(|len| PayloadRef::Memfd { len })]
    }

    /// Numbers of every varint length, not only the huge ones `any` favours.
    fn spread_u64() -> impl Strategy<Value = u64> {
        (any::<u64>(), 0u32..64).prop_map(|(v, shift)| v >> shift)
    }

    fn spread_u32() -> impl Strategy<Value = u32> {
        (any::<u32>(), 0u32..32).prop_map(|(v, shift)| v >> shift)
    }

    fn postcard_body<T: serde::Serialize>(v: &T) -> Vec<u8> {
        postcard::to_allocvec(v).expect("encodes")
    }

    /// Flips, inserts or cuts bytes of a valid body, so the decoders meet
    /// near misses and not only noise.
    fn mutate(mut body: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
        for &(at, what, byte) in edits {
            let at = if body.is_empty() { 0 } else { at % (body.len() + 1) };
            match what % 4 {
                0 if at < body.len() => body[at] = byte,
                1 => body.insert(at, byte),
                2 if at < body.len() => {
                    body.remove(at);
                }
                _ => body.truncate(at),
            }
        }
        body
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn publish_is_postcards_both_ways(
            topic in ".{0,40}",
            origin in proptest::option::of(".{0,20}"),
            payload in payload_ref(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..3),
        ) {
            let p = Publish { topic: &topic, origin: origin.as_deref(), payload };
            let mut mine = Vec::new();
            encode_publish(&mut mine, &p);
            prop_assert_eq!(&mine, &postcard_body(&p));
            let longest = matches!(payload, PayloadRef::Memfd { len } if len >> 63 != 0);
            prop_assert_eq!(decode_publish(&mine), (!longest).then(|| p.clone()));
            let bent = mutate(mine, &edits);
            if let Some(fast) = decode_publish(&bent) {
                prop_assert_eq!(postcard::from_bytes::<Publish>(&bent).ok(), Some(fast));
            }
        }

        #[test]
        fn deliver_is_postcards_both_ways(
            sub_id in spread_u32(),
            topic in ".{0,40}",
            ids in (spread_u64(), spread_u32(), spread_u32(), spread_u32(), spread_u64()),
            origin in proptest::option::of(".{0,20}"),
            payload in payload_ref(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..3),
        ) {
            let (client_id, uid, gid, pid, seq) = ids;
            let d = Deliver {
                sub_id,
                topic: &topic,
                sender: Sender { client_id, uid, gid, pid },
                seq,
                origin: origin.as_deref(),
                payload,
            };
            let mut mine = Vec::new();
            encode_deliver(&mut mine, &d);
            prop_assert_eq!(&mine, &postcard_body(&d));
            // A varint at its longest is left to postcard; anything
            // shorter the fast path reads itself.
            let longest = sub_id >> 28 != 0 || uid >> 28 != 0 || gid >> 28 != 0 || pid >> 28 != 0
                || client_id >> 63 != 0 || seq >> 63 != 0
                || matches!(payload, PayloadRef::Memfd { len } if len >> 63 != 0);
            prop_assert_eq!(decode_deliver(&mine), (!longest).then(|| d.clone()));
            let bent = mutate(mine, &edits);
            if let Some(fast) = decode_deliver(&bent) {
                prop_assert_eq!(postcard::from_bytes::<Deliver>(&bent).ok(), Some(fast));
            }
        }

        #[test]
        fn noise_the_fast_path_reads_postcard_reads_the_same(
            bytes in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            if let Some(fast) = decode_publish(&bytes) {
                prop_assert_eq!(postcard::from_bytes::<Publish>(&bytes).ok(), Some(fast));
            }
            if let Some(fast) = decode_deliver(&bytes) {
                prop_assert_eq!(postcard::from_bytes::<Deliver>(&bytes).ok(), Some(fast));
            }
        }
    }

    #[test]
    fn what_the_fast_path_declines() {
        // A varint in its longest form: postcard range-checks the last byte.
        let mut longest = vec![0xff, 0xff, 0xff, 0xff, 0x0f];
        longest.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(decode_deliver(&longest), None);
        // A bad option tag, trailing bytes, bad UTF-8.
        assert_eq!(decode_publish(&[1, b'a', 2, 0]), None);
        assert_eq!(decode_publish(&[1, b'a', 0, 0, 9]), None);
        assert_eq!(decode_publish(&[1, 0xff, 0, 0]), None);
        // And what it takes.
        assert_eq!(
            decode_publish(&[1, b'a', 0, 0]),
            Some(Publish { topic: "a", origin: None, payload: PayloadRef::Inline })
        );
    }
}
