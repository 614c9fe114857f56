//! The `client_delivery` harness: whole deliveries (a packet and its fds)
//! from a hostile broker, read by the client's real receive path.
//!
//! Fds cannot come from the input, so the input describes them: each one
//! is built here (a sealed memfd of a chosen size, an unsealed one, a pipe,
//! a sealed memfd reopened write-only, ...) and sent with the packet in
//! SCM_RIGHTS over a socketpair whose other end is a client connection
//! (`shmbus::fuzzing`). The client then reads as an app would, and every
//! payload it hands out is read. Nothing may panic, every fd must be
//! closed afterwards, and what the client sends back must be valid
//! frames that acknowledge no more fds than it was sent.
//!
//! Input layout (every read past the end yields zeros):
//!
//! ```text
//! config: u8          local queue bound 1 + (c & 7) messages, fd window
//!                     (c >> 3) & 7, byte and fd bounds picked by c >> 6
//! then up to MAX_PACKETS times:
//!   tag: u8           bit 7: let the client read first; bit 5: send the
//!                     packet as the first entry of a `Batch` of two, a
//!                     `Gap` the second; bits 2..=4: fd count (0..=7; more
//!                     than 4 is cut by the kernel: MSG_CTRUNC); bits 0..=1:
//!                     how the packet is made (below)
//!   fds: count × (kind: u8, size: u16)
//!   packet:  0 raw      len: u16, bytes
//!            1 header   kind: 64 + u8 % 32 (the broker's), body: u8 len + bytes,
//!                       payload: u8 len + bytes; a valid header before them
//!            2 deliver  sub: u8, topic: u8, sender: 4 × u8, seq: u64,
//!                       payload: u8 (inline / memfd of the first fd's size /
//!                       memfd of a given u64 length), then its bytes
//!            3 gap      sub: u8, missed: u64
//! ```
//!
//! Shared by the fuzz target and by `client/tests/fuzz_regressions.rs`,
//! which includes this file by path: it uses only the client's own
//! dependencies.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::fs::{MemfdFlags, Mode, OFlags, SealFlags};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
use shmbus::fuzzing::{self, IDS};
use shmbus::Event;
use shmbus_proto::frame::{
    batch_push, decode_client, encode_frame, Batch, ClientFrame, Deliver, Gap, PayloadRef, Sender,
    HEADER_LEN, MAGIC, PROTOCOL_VERSION,
};
use shmbus_proto::sys::memfd;
use shmbus_proto::sys::socket::{self, OutPacket, RecvBatch};

/// Packets per input.
pub const MAX_PACKETS: usize = 32;

/// The broker-to-client frame kinds are 64 and up (and a few unknown).
const BROKER_KINDS: u8 = 32;

const TOPICS: [&str; 6] = ["a.b", "fuzz.1", "", "a..b", "x\u{202e}y\n", "*"];

/// Runs one input; panics on a bug. `check_fds`: also check that no fd
/// is left open (only where no other thread opens or closes fds).
pub fn run(data: &[u8], check_fds: bool) {
    let before = check_fds.then(open_fds);
    run_inner(data);
    if let Some(before) = before {
        assert_eq!(open_fds(), before, "fds leaked");
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        let mut b = [0; 8];
        b.iter_mut().for_each(|x| *x = self.u8());
        u64::from_le_bytes(b)
    }
}

fn run_inner(data: &[u8]) {
    let mut input = Input(data);
    let config = input.u8();
    let (messages, window) = (1 + usize::from(config & 7), u32::from(config >> 3) & 7);
    // Small byte and fd bounds with the top two bits; the defaults without.
    let (bytes, fds) = match config >> 6 {
        0 => (64 << 20, 256),
        1 => (512, 1),
        2 => (4096, 2),
        _ => (1 << 20, 0),
    };
    let Ok((conn, broker)) = fuzzing::connection(messages, bytes, fds, window) else { return };
    let mut sent_fds = 0usize;
    for _ in 0..MAX_PACKETS {
        if input.0.is_empty() {
            break;
        }
        let tag = input.u8();
        if tag & 0x80 != 0 {
            touch_all(&conn);
        }
        let fds: Vec<(OwnedFd, u64)> =
            (0..(tag >> 2) & 7).filter_map(|_| make_fd(input.u8(), input.u16())).collect();
        let mut packet = make_packet(tag & 3, &mut input, fds.first().map(|f| f.1));
        if tag & 0x20 != 0 {
            let mut entries = Vec::new();
            batch_push(&mut entries, &packet, &[]);
            batch_push(&mut entries, &make_packet(3, &mut input, None), &[]);
            packet = encode_frame(&Batch { frames: 2 }, &entries).unwrap_or(packet);
        }
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|(f, _)| f.as_fd()).collect();
        let mut sent = send(broker.as_fd(), &packet, &borrowed);
        if !sent {
            // The socket is full: let the client read, then try again.
            touch_all(&conn);
            sent = send(broker.as_fd(), &packet, &borrowed);
        }
        if sent {
            sent_fds += borrowed.len();
        }
    }
    touch_all(&conn);
    // What the client sent back: valid frames, acknowledging no more fds
    // than it was sent.
    let mut batch = RecvBatch::new(8);
    let mut acked = 0u64;
    while let Ok(n) = batch.recv(broker.as_fd(), true) {
        for i in 0..n {
            let (bytes, status, fds) = batch.packet(i);
            assert!(fds.is_empty() && !status.truncated, "the client sent fds or a huge packet");
            match decode_client(bytes) {
                Ok(ClientFrame::FdAck(a)) => acked += u64::from(a.fds),
                Ok(_) => {}
                Err(e) => panic!("the client sent an invalid frame: {e}"),
            }
        }
    }
    assert!(acked <= sent_fds as u64, "acked {acked} of {sent_fds} fds");
}

/// Takes every event the client has, and reads every payload as an app
/// would.
fn touch_all(conn: &fuzzing::Connection) {
    let (events, _closed) = conn.drain();
    for (sub, ev) in events {
        assert!((1..=IDS).contains(&sub));
        let Event::Message(m) = ev else { continue };
        let _ = (m.topic(), m.sender(), m.seq(), m.is_memfd(), m.is_empty());
        let len = m.len();
        let mapped = m.try_payload().map(<[u8]>::len).ok();
        if let Some(n) = mapped {
            assert_eq!(n, len);
        }
        // The plain accessor: an app that calls it must not die, whatever a
        // publisher sent (issue 9). It gives the bytes, or none if the
        // payload cannot be mapped.
        let p = m.payload();
        assert_eq!(p.len(), mapped.unwrap_or(0));
        if let (Some(first), Some(last)) = (p.first(), p.last()) {
            std::hint::black_box((first, last));
        }
        let _ = m.decode::<(u32, String)>();
        if let Ok(fd) = m.clone().into_fd() {
            assert_eq!(memfd::sealed_len(fd.as_fd()), Ok(len as u64));
        }
        if len <= 1 << 20 {
            assert_eq!(m.into_payload().len(), mapped.unwrap_or(0));
        }
    }
}

/// Sends `packet` with `fds`, without waiting. Returns whether it went.
fn send(sock: BorrowedFd<'_>, packet: &[u8], fds: &[BorrowedFd<'_>]) -> bool {
    if fds.len() <= shmbus_proto::limits::MAX_FDS_PER_PACKET {
        return socket::send_packet(sock, OutPacket { head: packet, payload: &[], fds }, true).is_ok();
    }
    // More fds than `send_packet` allows: the way a hostile broker would.
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(8))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    if !cmsg.push(SendAncillaryMessage::ScmRights(fds)) {
        return false;
    }
    let flags = SendFlags::DONTWAIT | SendFlags::NOSIGNAL;
    rustix::net::sendmsg(sock, &[IoSlice::new(packet)], &mut cmsg, flags).is_ok()
}

fn make_packet(how: u8, input: &mut Input<'_>, first_fd_len: Option<u64>) -> Vec<u8> {
    match how {
        0 => {
            let n = usize::from(input.u16());
            input.bytes(n).to_vec()
        }
        1 => {
            let kind = 64 + input.u8() % BROKER_KINDS;
            let n = usize::from(input.u8());
            let body = input.bytes(n);
            let n = usize::from(input.u8());
            let payload = input.bytes(n);
            let mut p = Vec::with_capacity(HEADER_LEN + body.len() + payload.len());
            p.extend_from_slice(&MAGIC.to_le_bytes());
            p.extend_from_slice(&[PROTOCOL_VERSION, kind]);
            p.extend_from_slice(&(body.len() as u32).to_le_bytes());
            p.extend_from_slice(body);
            p.extend_from_slice(payload);
            p
        }
        2 => {
            let sub_id = u32::from(input.u8()) % (IDS + 2);
            let topic = TOPICS[usize::from(input.u8()) % TOPICS.len()];
            let [client_id, uid, gid, pid] = [input.u8(), input.u8(), input.u8(), input.u8()];
            let sender =
                Sender { client_id: client_id.into(), uid: uid.into(), gid: gid.into(), pid: pid.into() };
            let seq = input.u64();
            let (payload, inline) = match input.u8() % 3 {
                0 => {
                    let n = usize::from(input.u8());
                    (PayloadRef::Inline, input.bytes(n))
                }
                1 => (PayloadRef::Memfd { len: first_fd_len.unwrap_or(0) }, &[][..]),
                _ => (PayloadRef::Memfd { len: input.u64() }, &[][..]),
            };
            let d = Deliver { sub_id, topic, sender, seq, origin: None, payload };
            encode_frame(&d, inline).expect("a small frame encodes")
        }
        _ => {
            let sub_id = u32::from(input.u8()) % (IDS + 2);
            let g = Gap { sub_id, missed: input.u64() };
            encode_frame(&g, &[]).expect("a small frame encodes")
        }
    }
}

/// An fd of the kind `kind` picks, with its size (for memfds).
fn make_fd(kind: u8, size: u16) -> Option<(OwnedFd, u64)> {
    let len = u64::from(size);
    let contents = || (0..size).map(|i| i as u8).collect::<Vec<u8>>();
    let fd = match kind % 10 {
        // What an honest broker sends.
        0 => memfd::from_bytes("fuzz", &contents()).ok()?,
        1 => memfd::create("fuzz", len).ok()?,
        2 => rustix::pipe::pipe().ok()?.0,
        // A sealed memfd, reopened write-only through /proc.
        3 => reopen(memfd::from_bytes("fuzz", &contents()).ok()?, OFlags::WRONLY)?,
        4 => reopen(memfd::from_bytes("fuzz", &contents()).ok()?, OFlags::RDONLY)?,
        // A sealed hugetlb memfd (maps only where huge pages are reserved).
        5 => {
            let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING | MemfdFlags::HUGETLB;
            let fd = rustix::fs::memfd_create("fuzz", flags | MemfdFlags::HUGE_2MB).ok()?;
            rustix::fs::ftruncate(&fd, 2 << 20).ok()?;
            memfd::seal(fd.as_fd()).ok()?;
            return Some((fd, 2 << 20));
        }
        // All the seals but one.
        6 => {
            let fd = memfd::create("fuzz", len).ok()?;
            let all = [SealFlags::SHRINK, SealFlags::GROW, SealFlags::WRITE, SealFlags::SEAL];
            let skip = usize::from(size) % all.len();
            let seals = all
                .iter()
                .enumerate()
                .filter(|&(i, _)| i != skip)
                .fold(SealFlags::empty(), |a, (_, s)| a | *s);
            rustix::fs::fcntl_add_seals(&fd, seals).ok()?;
            fd
        }
        7 => socket::pair().ok()?.0,
        // A tmpfs file that is not a memfd.
        8 => rustix::fs::open("/dev/shm", OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC, Mode::RUSR)
            .or_else(|_| rustix::fs::open("/dev/null", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()))
            .ok()?,
        // A sealed sparse memfd of 1 MiB to 128 TiB.
        _ => {
            let len = 1u64 << (20 + size % 28);
            let fd = memfd::create("fuzz", 0).ok()?;
            rustix::fs::ftruncate(&fd, len).ok()?;
            memfd::seal(fd.as_fd()).ok()?;
            return Some((fd, len));
        }
    };
    Some((fd, len))
}

fn reopen(fd: OwnedFd, mode: OFlags) -> Option<OwnedFd> {
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    rustix::fs::open(path, mode | OFlags::CLOEXEC, Mode::empty()).ok()
}
