//! The `frame_decode` harness: both decoders on arbitrary bytes, and a
//! round trip through the encoder for whatever decodes.
//!
//! Shared by the fuzz target and by `client/tests/fuzz_regressions.rs`,
//! which includes this file by path: it uses only `shmbus_proto` and std.

use shmbus_proto::frame::{
    batch_entries, batched, decode_broker, decode_client, encode_frame, Body, BrokerFrame, ClientFrame,
    MonitorEvent, NameOwnerChanged, HEADER_LEN,
};
use shmbus_proto::subject::{pattern_matches, validate_pattern, validate_subject};
use shmbus_proto::text::escape;

/// Runs every check on `data`; panics on a bug.
pub fn run(data: &[u8]) {
    if let Ok(frame) = decode_client(data) {
        check_client(data, &frame);
    }
    if let Ok(frame) = decode_broker(data) {
        check_broker(data, &frame);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        check_text(s);
    }
    // The payload of a delivery on `$SYS.name.<name>`, and a monitor's.
    if let Ok(n) = NameOwnerChanged::from_bytes(data) {
        assert_eq!(NameOwnerChanged::from_bytes(&n.to_bytes()), Ok(n));
    }
    if let Ok(m) = MonitorEvent::from_bytes(data) {
        assert_eq!(MonitorEvent::from_bytes(&m.to_bytes()), Ok(m));
    }
}

/// Encodes `body` with `payload`, as its sender would, and checks the
/// result against the packet it was decoded from.
fn reencode<B: Body + std::fmt::Debug>(packet: &[u8], body: &B, payload: &[u8]) -> Vec<u8> {
    let bytes = encode_frame(body, payload)
        .unwrap_or_else(|e| panic!("{body:?} decoded from a packet but does not encode: {e}"));
    // postcard accepts over-long varints, so the body may come out
    // shorter than it went in, never longer; the payload is untouched.
    assert!(bytes.len() <= packet.len(), "re-encoding grew {body:?}");
    assert_eq!(bytes[..4], packet[..4], "magic, version and kind survive");
    assert!(bytes.ends_with(payload));
    let body_len = u32::from_le_bytes(bytes[4..HEADER_LEN].try_into().unwrap()) as usize;
    assert_eq!(HEADER_LEN + body_len + payload.len(), bytes.len());
    bytes
}

fn check_client(packet: &[u8], frame: &ClientFrame<'_>) {
    let bytes = match frame {
        ClientFrame::Hello(b) => reencode(packet, b, &[]),
        ClientFrame::Subscribe(b) => {
            check_text(b.pattern);
            reencode(packet, b, &[])
        }
        ClientFrame::Unsubscribe(b) => reencode(packet, b, &[]),
        ClientFrame::Publish(b, payload) => {
            check_text(b.topic);
            reencode(packet, b, payload)
        }
        ClientFrame::Ping(b) => reencode(packet, b, &[]),
        ClientFrame::Query(b) => reencode(packet, b, &[]),
        ClientFrame::ChannelOpen(b) => reencode(packet, b, &[]),
        ClientFrame::ChannelClose(b) => reencode(packet, b, &[]),
        ClientFrame::FdAck(b) => reencode(packet, b, &[]),
        ClientFrame::NameRequest(b) => {
            check_text(b.name);
            reencode(packet, b, &[])
        }
        ClientFrame::NameRelease(b) => reencode(packet, b, &[]),
        ClientFrame::GetNameOwner(b) => reencode(packet, b, &[]),
        ClientFrame::Request(b, payload) => {
            check_text(b.name);
            reencode(packet, b, payload)
        }
        ClientFrame::Reply(b, payload) => reencode(packet, b, payload),
        ClientFrame::Monitor(b) => {
            for p in &b.patterns {
                check_text(p);
            }
            reencode(packet, b, &[])
        }
        ClientFrame::PolicyCheck(b) => {
            check_text(b.subject);
            reencode(packet, b, &[])
        }
        ClientFrame::Attach(b) => reencode(packet, b, &[]),
        ClientFrame::Doorbell => reencode(packet, &shmbus_proto::frame::Doorbell, &[]),
    };
    let again = decode_client(&bytes).expect("an encoded frame decodes");
    assert_eq!(&again, frame, "round trip");
}

fn check_broker(packet: &[u8], frame: &BrokerFrame<'_>) {
    let bytes = match frame {
        BrokerFrame::Welcome(b) => reencode(packet, b, &[]),
        BrokerFrame::Goodbye(b) => reencode(packet, b, &[]),
        BrokerFrame::Deliver(b, payload) => {
            check_text(b.topic);
            reencode(packet, b, payload)
        }
        BrokerFrame::Gap(b) => reencode(packet, b, &[]),
        BrokerFrame::Subscribed(b) => reencode(packet, b, &[]),
        BrokerFrame::Pong(b) => reencode(packet, b, &[]),
        BrokerFrame::QueryItem(b) => reencode(packet, &**b, &[]),
        BrokerFrame::QueryEnd(b) => reencode(packet, b, &[]),
        BrokerFrame::OpError(b) => reencode(packet, b, &[]),
        BrokerFrame::ChannelGranted(b) => reencode(packet, b, &[]),
        BrokerFrame::ChannelReader(b) => reencode(packet, b, &[]),
        BrokerFrame::NameReply(b) => reencode(packet, b, &[]),
        BrokerFrame::NameOwner(b) => reencode(packet, b, &[]),
        BrokerFrame::Serve(b, payload) => reencode(packet, b, payload),
        BrokerFrame::Answer(b, payload) => reencode(packet, b, payload),
        BrokerFrame::Batch(b, payload) => {
            // Each entry that decodes is checked as a frame of its own;
            // `batched` accepts only if every entry does.
            let entries = batch_entries(*b, payload);
            let mut all_decode = entries.is_ok();
            for entry in entries.unwrap_or_default() {
                match decode_broker(entry) {
                    Ok(f) => check_broker(entry, &f),
                    Err(_) => all_decode = false,
                }
            }
            if batched(*b, payload).is_ok() {
                assert!(all_decode, "a batch with a bad entry was accepted");
            }
            reencode(packet, b, payload)
        }
        BrokerFrame::Revoked(b) => reencode(packet, b, &[]),
        BrokerFrame::Attached(b) => reencode(packet, b, &[]),
        BrokerFrame::Doorbell => reencode(packet, &shmbus_proto::frame::Doorbell, &[]),
    };
    let again = decode_broker(&bytes).expect("an encoded frame decodes");
    assert_eq!(&again, frame, "round trip");
}

/// Subject checks and escaping on text a peer chose.
pub fn check_text(s: &str) {
    let subject = validate_subject(s).is_ok();
    let pattern = validate_pattern(s).is_ok();
    if subject {
        assert!(pattern, "a valid subject {s:?} is a valid pattern");
        assert!(pattern_matches(s, s), "{s:?} matches itself");
    }
    let escaped = escape(s);
    assert!(
        !escaped.chars().any(|c| c.is_control()),
        "escape({s:?}) = {escaped:?} holds a control character"
    );
    assert_eq!(unescape(&escaped).as_deref(), Some(s), "escape({s:?}) = {escaped:?} does not undo");
}

/// The inverse of `escape`; `None` for text `escape` cannot have written.
fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next()? {
            '\\' => out.push('\\'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            't' => out.push('\t'),
            'e' => out.push('\u{1b}'),
            'u' => {
                if it.next()? != '{' {
                    return None;
                }
                let hex: String = it.by_ref().take_while(|&c| c != '}').collect();
                out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
            }
            _ => return None,
        }
    }
    Some(out)
}
