//! AF_UNIX SOCK_SEQPACKET sockets: bind, connect, accept, credentials, and
//! batched send and receive with fds beside the bytes.
//!
//! Model: one packet is one frame (see [`crate::frame`]). Receiving is
//! `recvmmsg(2)` into a reusable [`RecvBatch`]; sending is `sendmmsg(2)` of
//! up to [`MAX_BATCH`] packets, each a head slice plus an optional payload
//! slice (so a fanned-out payload is never copied in user space).
//!
//! Invariants:
//! - every fd this module creates has CLOEXEC set by the creating call;
//!   received fds are taken with `MSG_CMSG_CLOEXEC` and wrapped in `OwnedFd`
//!   at once, even when the caller will refuse them, so none can leak;
//! - a packet longer than the receive buffer (`MSG_TRUNC`) or one whose fds
//!   did not fit (`MSG_CTRUNC`) is reported, never silently accepted;
//! - `MSG_NOSIGNAL` on every send: a vanished peer is `EPIPE`, not SIGPIPE;
//! - a zero-length packet reads as end of stream (SOCK_SEQPACKET reports
//!   EOF as a zero-length read, and a zero-length frame is invalid anyway).
//!
//! rustix covers the plain calls safely; `sendmmsg`/`recvmmsg` with
//! ancillary data have no safe wrapper, so those two are written against
//! libc here, with the buffers they point into owned by this module.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::address::Address;
use crate::limits::{MAX_FDS_PER_PACKET, MAX_PACKET};

/// Most packets moved by one `sendmmsg`/`recvmmsg` call.
pub const MAX_BATCH: usize = 64;

/// Credentials of the process at the other end, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

fn sockaddr(addr: &Address) -> io::Result<SocketAddrUnix> {
    Ok(match addr {
        Address::Abstract(name) => SocketAddrUnix::new_abstract_name(name)?,
        Address::Path(p) => SocketAddrUnix::new(p.as_path())?,
    })
}

fn seqpacket(nonblocking: bool) -> io::Result<OwnedFd> {
    let mut flags = SocketFlags::CLOEXEC;
    if nonblocking {
        flags |= SocketFlags::NONBLOCK;
    }
    Ok(rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, flags, None)?)
}

/// Binds and listens on `addr`, non-blocking. For a path address, a stale
/// socket file that nobody listens on any more is replaced; a live one is
/// `AddrInUse`, and so is anything at the path that is not a socket (it is
/// never deleted: `lstat` must say `S_IFSOCK`, so not even a symlink to a
/// socket is followed).
pub fn listen(addr: &Address, backlog: i32) -> io::Result<OwnedFd> {
    let fd = seqpacket(true)?;
    let sa = sockaddr(addr)?;
    match rustix::net::bind(&fd, &sa) {
        Ok(()) => {}
        Err(rustix::io::Errno::ADDRINUSE) if matches!(addr, Address::Path(_)) => {
            let probe = seqpacket(false)?;
            if rustix::net::connect(&probe, &sa).is_ok() {
                return Err(io::Error::from(io::ErrorKind::AddrInUse));
            }
            if let Address::Path(p) = addr {
                let st = rustix::fs::lstat(p.as_path())?;
                if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::Socket {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} exists and is not a socket", p.display()),
                    ));
                }
                std::fs::remove_file(p)?;
            }
            rustix::net::bind(&fd, &sa)?;
        }
        Err(e) => return Err(e.into()),
    }
    rustix::net::listen(&fd, backlog)?;
    Ok(fd)
}

/// Connects a blocking socket to `addr`.
pub fn connect(addr: &Address) -> io::Result<OwnedFd> {
    let fd = seqpacket(false)?;
    rustix::net::connect(&fd, &sockaddr(addr)?)?;
    Ok(fd)
}

/// Accepts one pending connection as a non-blocking socket, or `None`
/// when there is none (`EAGAIN`).
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
    match rustix::net::accept_with(listener, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK) {
        Ok(fd) => Ok(Some(fd)),
        Err(rustix::io::Errno::AGAIN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A connected pair of SOCK_SEQPACKET sockets (blocking, CLOEXEC).
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?)
}

/// Credentials of the peer, as the kernel recorded them at connect (for a
/// listener's peer: at `listen`).
pub fn peer_cred(fd: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let c = rustix::net::sockopt::socket_peercred(fd)?;
    Ok(PeerCred {
        pid: rustix::process::Pid::as_raw(Some(c.pid)) as u32,
        uid: c.uid.as_raw(),
        gid: c.gid.as_raw(),
    })
}

/// The peer's groups as the kernel recorded them at connect
/// (`SO_PEERGROUPS`): its supplementary groups, which may or may not
/// include its primary gid (add `PeerCred::gid` to be sure).
pub fn peer_groups(fd: BorrowedFd<'_>) -> io::Result<Vec<u32>> {
    // NGROUPS_MAX is 65536; start small and grow to what the kernel asks.
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` has `len` writable bytes, properly aligned for
        // gid_t; the kernel writes at most `len` bytes and sets `len` to
        // what it wrote (or, with ERANGE, to what it needs).
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(needed.min(groups.len()));
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || needed <= groups.len() || needed > 65536 {
            return Err(e);
        }
        groups.resize(needed, 0);
    }
}

/// Bytes of the packets sent on `fd` that its peer has not received yet
/// (`SIOCOUTQ`: on a unix socket, the buffers the kernel still charges to
/// this end; a packet's is freed when the peer's `recvmsg` takes it, its
/// fds then installed in the peer and no longer in flight). 0: the peer
/// has read everything sent to it. A count below the least a packet is
/// charged (its buffer, hundreds of bytes) is the reference the kernel
/// holds on this end for a moment while it frees a packet just read
/// (`sock_wfree` keeps one across the write-space wake-up), not a packet:
/// it is reported as 0.
pub fn unread_by_peer(fd: BorrowedFd<'_>) -> io::Result<usize> {
    /// Less than any packet's charge (`SKB_TRUESIZE(0)` alone is larger).
    const NOT_A_PACKET: libc::c_int = 64;
    let mut n: libc::c_int = 0;
    // SAFETY: `fd` is open for the call; SIOCOUTQ (`TIOCOUTQ` by number)
    // writes one int through the pointer, which points at `n`, live and
    // aligned for it.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut n as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(if n < NOT_A_PACKET { 0 } else { n as usize })
}

/// Puts the socket `with` in place of `target`: the same fd number now
/// refers to `with`'s socket (close-on-exec), and `target`'s old socket is
/// closed unless something else holds it. So every holder of the number
/// (an app's event loop included) reaches the new connection. `with` is
/// closed here (its number is not needed any more).
pub fn replace_fd(target: BorrowedFd<'_>, with: OwnedFd) -> io::Result<()> {
    loop {
        // SAFETY: both are open fds for the duration of the call (`target`
        // is borrowed, `with` owned); dup3 atomically closes what `target`
        // referred to and makes its number refer to `with`'s file, which
        // the owner of `target` goes on owning. `with` drops afterwards.
        let r = unsafe { libc::dup3(with.as_raw_fd(), target.as_raw_fd(), libc::O_CLOEXEC) };
        if r >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The address a socket is bound to, if it is an AF_UNIX one with a name.
pub fn local_address(fd: BorrowedFd<'_>) -> io::Result<Option<Address>> {
    let any = rustix::net::getsockname(fd)?;
    let Ok(unix) = SocketAddrUnix::try_from(any) else { return Ok(None) };
    if let Some(name) = unix.abstract_name() {
        return Ok(Some(Address::Abstract(name.to_vec())));
    }
    Ok(unix.path().map(|p| {
        use std::os::unix::ffi::OsStrExt;
        Address::Path(std::ffi::OsStr::from_bytes(p.to_bytes()).into())
    }))
}

/// Whether `fd` is a listening SOCK_SEQPACKET socket.
pub fn is_listening_seqpacket(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(rustix::net::sockopt::socket_type(fd)? == SocketType::SEQPACKET
        && rustix::net::sockopt::socket_acceptconn(fd)?)
}

/// Sets or clears `O_NONBLOCK`.
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let mut flags = rustix::fs::fcntl_getfl(fd)?;
    flags.set(rustix::fs::OFlags::NONBLOCK, on);
    rustix::fs::fcntl_setfl(fd, flags)?;
    Ok(())
}

// ---------------------------------------------------------------- send --

/// One packet to send: `head` then `payload`, with `fds` beside them.
#[derive(Clone, Copy)]
pub struct OutPacket<'a> {
    pub head: &'a [u8],
    pub payload: &'a [u8],
    pub fds: &'a [BorrowedFd<'a>],
}

/// Control-buffer room for the most fds one packet may carry, in u64 units
/// so the buffer is aligned for `cmsghdr`.
const CMSG_WORDS: usize = cmsg_space(MAX_FDS_PER_PACKET).div_ceil(8);

const fn cmsg_space(nfds: usize) -> usize {
    // CMSG_SPACE(n) = CMSG_ALIGN(sizeof(cmsghdr)) + CMSG_ALIGN(n * 4) on
    // Linux; written out so it can be a const.
    let align = size_of::<usize>();
    let hdr = (size_of::<libc::cmsghdr>() + align - 1) & !(align - 1);
    let data = (nfds * size_of::<RawFd>() + align - 1) & !(align - 1);
    hdr + data
}

/// Sends up to [`MAX_BATCH`] packets with one `sendmmsg`. Returns how many
/// were sent; each packet is sent whole or not at all (SOCK_SEQPACKET).
/// With `nonblocking`, a full socket gives `WouldBlock` if none was sent.
pub fn send_packets(fd: BorrowedFd<'_>, packets: &[OutPacket<'_>], nonblocking: bool) -> io::Result<usize> {
    let n = packets.len().min(MAX_BATCH);
    if n == 0 {
        return Ok(0);
    }
    // Only the first n entries are set up: zeroing all MAX_BATCH headers
    // for a single packet would cost more than the packet.
    let mut iovs = [MaybeUninit::<libc::iovec>::uninit(); MAX_BATCH * 2];
    let mut ctrl = [MaybeUninit::<[u64; CMSG_WORDS]>::uninit(); MAX_BATCH];
    let mut hdrs = [MaybeUninit::<libc::mmsghdr>::uninit(); MAX_BATCH];
    for (i, p) in packets[..n].iter().enumerate() {
        if p.fds.len() > MAX_FDS_PER_PACKET {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "too many fds for one packet"));
        }
        iovs[2 * i].write(libc::iovec { iov_base: p.head.as_ptr() as *mut _, iov_len: p.head.len() });
        iovs[2 * i + 1]
            .write(libc::iovec { iov_base: p.payload.as_ptr() as *mut _, iov_len: p.payload.len() });
        // SAFETY: all-zero is a valid (empty) mmsghdr.
        let hdr = hdrs[i].write(unsafe { std::mem::zeroed() });
        let h = &mut hdr.msg_hdr;
        h.msg_iov = iovs[2 * i].as_mut_ptr();
        h.msg_iovlen = if p.payload.is_empty() { 1 } else { 2 };
        if !p.fds.is_empty() {
            let space = cmsg_space(p.fds.len());
            let buf = ctrl[i].write([0; CMSG_WORDS]);
            h.msg_control = buf.as_mut_ptr().cast();
            h.msg_controllen = space as _;
            // SAFETY: msg_control points at `space` bytes of aligned,
            // zeroed storage in `ctrl[i]` (space <= CMSG_WORDS * 8), so
            // CMSG_FIRSTHDR is non-null and CMSG_DATA has room for
            // fds.len() ints; all pointers stay inside that storage.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(h);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN((p.fds.len() * size_of::<RawFd>()) as u32) as _;
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for (j, f) in p.fds.iter().enumerate() {
                    data.add(j).write_unaligned(f.as_raw_fd());
                }
            }
        }
    }
    let mut flags = libc::MSG_NOSIGNAL;
    if nonblocking {
        flags |= libc::MSG_DONTWAIT;
    }
    loop {
        // SAFETY: hdrs[..n] were initialised above and point at iovecs and
        // control buffers that live on this stack frame until the call
        // returns; the iovecs point into the caller's slices, which outlive
        // the call. The kernel only reads them.
        let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr().cast(), n as u32, flags) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Sends one packet (blocking unless `nonblocking`).
pub fn send_packet(fd: BorrowedFd<'_>, packet: OutPacket<'_>, nonblocking: bool) -> io::Result<()> {
    match send_packets(fd, &[packet], nonblocking)? {
        1 => Ok(()),
        _ => Err(io::Error::from(io::ErrorKind::WouldBlock)),
    }
}

// ---------------------------------------------------------------- recv --

/// What the kernel said about one received packet, beyond its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecvStatus {
    /// The packet was longer than [`MAX_PACKET`] and was cut (`MSG_TRUNC`).
    pub truncated: bool,
    /// More fds were sent than fit (`MSG_CTRUNC`); the excess were closed
    /// by the kernel.
    pub fds_truncated: bool,
}

/// Reusable buffers for receiving up to `slots` packets per call.
pub struct RecvBatch {
    slots: usize,
    data: Vec<u8>,
    ctrl: Vec<[u64; CMSG_WORDS]>,
    lens: Vec<usize>,
    status: Vec<RecvStatus>,
    fds: Vec<Vec<OwnedFd>>,
    filled: usize,
}

impl RecvBatch {
    /// Buffers for `slots` packets (1..=[`MAX_BATCH`]) of up to
    /// [`MAX_PACKET`] bytes each.
    pub fn new(slots: usize) -> RecvBatch {
        let slots = slots.clamp(1, MAX_BATCH);
        RecvBatch {
            slots,
            data: vec![0; slots * MAX_PACKET],
            ctrl: vec![[0; CMSG_WORDS]; slots],
            lens: vec![0; slots],
            status: vec![RecvStatus::default(); slots],
            fds: (0..slots).map(|_| Vec::new()).collect(),
            filled: 0,
        }
    }

    /// Receives up to `slots` packets. Blocks for the first one unless
    /// `nonblocking`; never waits for the rest. Returns how many arrived;
    /// `WouldBlock` when nonblocking and nothing is queued.
    pub fn recv(&mut self, fd: BorrowedFd<'_>, nonblocking: bool) -> io::Result<usize> {
        // Fds of packets the caller did not take are closed here.
        for v in &mut self.fds[..self.filled] {
            v.clear();
        }
        self.filled = 0;
        let n = self.slots;
        let mut iovs = [MaybeUninit::<libc::iovec>::uninit(); MAX_BATCH];
        let mut hdrs = [MaybeUninit::<libc::mmsghdr>::uninit(); MAX_BATCH];
        let base = self.data.as_mut_ptr();
        for i in 0..n {
            // SAFETY: i < slots, and data holds slots * MAX_PACKET bytes, so
            // the slot [i*MAX_PACKET, (i+1)*MAX_PACKET) is in bounds.
            let slot = unsafe { base.add(i * MAX_PACKET) };
            iovs[i].write(libc::iovec { iov_base: slot.cast(), iov_len: MAX_PACKET });
            // SAFETY: all-zero is a valid (empty) mmsghdr.
            let hdr = hdrs[i].write(unsafe { std::mem::zeroed() });
            let h = &mut hdr.msg_hdr;
            h.msg_iov = iovs[i].as_mut_ptr();
            h.msg_iovlen = 1;
            h.msg_control = self.ctrl[i].as_mut_ptr().cast();
            h.msg_controllen = (CMSG_WORDS * 8) as _;
        }
        let mut flags = libc::MSG_CMSG_CLOEXEC;
        flags |= if nonblocking { libc::MSG_DONTWAIT } else { libc::MSG_WAITFORONE };
        let r = loop {
            // SAFETY: hdrs[..n] were initialised above and point at iovecs on
            // this frame and at data and control buffers owned by self, all
            // of the sizes given, alive and not otherwise borrowed until the
            // call returns.
            let r = unsafe {
                libc::recvmmsg(
                    fd.as_raw_fd(),
                    hdrs.as_mut_ptr().cast(),
                    n as u32,
                    flags,
                    std::ptr::null_mut(),
                )
            };
            if r >= 0 {
                break r as usize;
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        };
        for (i, h) in hdrs[..r].iter().enumerate() {
            // SAFETY: the first r <= n headers were initialised above and
            // filled in by the kernel.
            let h = unsafe { h.assume_init_ref() };
            let m = &h.msg_hdr;
            self.lens[i] = (h.msg_len as usize).min(MAX_PACKET);
            self.status[i] = RecvStatus {
                truncated: m.msg_flags & libc::MSG_TRUNC != 0,
                fds_truncated: m.msg_flags & libc::MSG_CTRUNC != 0,
            };
            // SAFETY: m is the header the kernel just filled; its control
            // pointer and (updated) length describe bytes inside ctrl[i].
            unsafe { take_fds(m, &mut self.fds[i]) };
        }
        self.filled = r;
        Ok(r)
    }

    /// Packet `i` of the last `recv`: its bytes, status, and its fds (moved
    /// out; an fd not taken is closed at the next `recv` or on drop).
    pub fn packet(&mut self, i: usize) -> (&[u8], RecvStatus, Vec<OwnedFd>) {
        if i >= self.filled {
            return (&[], RecvStatus::default(), Vec::new());
        }
        let fds = std::mem::take(&mut self.fds[i]);
        let start = i * MAX_PACKET;
        (&self.data[start..start + self.lens[i]], self.status[i], fds)
    }
}

/// Moves every fd of every SCM_RIGHTS message in `m` into `out`.
///
/// # Safety
/// `m` must be a `msghdr` just filled by `recvmsg`/`recvmmsg`, whose
/// `msg_control`/`msg_controllen` describe a live, aligned buffer.
unsafe fn take_fds(m: &libc::msghdr, out: &mut Vec<OwnedFd>) {
    if m.msg_control.is_null() || m.msg_controllen == 0 {
        return;
    }
    // SAFETY: the CMSG_* macros walk headers inside the buffer the kernel
    // filled, bounded by msg_controllen; each header's data is checked to
    // lie before `end` before it is read.
    unsafe {
        #[allow(clippy::unnecessary_cast)] // msg_controllen is not usize on every libc
        let end = (m.msg_control as usize).saturating_add(m.msg_controllen as usize);
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            let len = ((*c).cmsg_len as usize).saturating_sub(data as usize - c as usize);
            if data as usize + len > end {
                break;
            }
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let ptr = data.cast::<RawFd>();
                for j in 0..len / size_of::<RawFd>() {
                    let raw = ptr.add(j).read_unaligned();
                    if raw >= 0 {
                        // SCM_RIGHTS installed this fd in our table just now,
                        // and nothing else owns it, so OwnedFd may take it.
                        out.push(OwnedFd::from_raw_fd(raw));
                    }
                }
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes. `None` waits forever.
/// Returns whether it is readable (or hung up).
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<std::time::Duration>) -> io::Result<bool> {
    use rustix::event::{PollFd, PollFlags};
    let ts = timeout.map(|d| rustix::event::Timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: d.subsec_nanos() as i64,
    });
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    loop {
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch").field("slots", &self.slots).field("filled", &self.filled).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_replaced_fd_reaches_the_new_socket() {
        let (a, _b) = pair().unwrap();
        let (c, d) = pair().unwrap();
        let number = a.as_raw_fd();
        replace_fd(a.as_fd(), c).unwrap();
        assert_eq!(a.as_raw_fd(), number);
        send_packet(a.as_fd(), OutPacket { head: b"new", payload: &[], fds: &[] }, false).unwrap();
        let mut batch = RecvBatch::new(1);
        assert_eq!(batch.recv(d.as_fd(), true).unwrap(), 1);
        assert_eq!(batch.packet(0).0, b"new");
        let flags = rustix::io::fcntl_getfd(&a).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
    }

    #[test]
    fn unread_by_peer_counts_packets_until_the_peer_reads_them() {
        let (a, b) = pair().unwrap();
        assert_eq!(unread_by_peer(a.as_fd()).unwrap(), 0);
        let fds = [b.as_fd()];
        send_packet(a.as_fd(), OutPacket { head: b"one", payload: &[], fds: &fds }, false).unwrap();
        send_packet(a.as_fd(), OutPacket { head: b"two", payload: &[], fds: &[] }, false).unwrap();
        let both = unread_by_peer(a.as_fd()).unwrap();
        assert!(both > 0);
        let mut batch = RecvBatch::new(1);
        assert_eq!(batch.recv(b.as_fd(), true).unwrap(), 1);
        let one = unread_by_peer(a.as_fd()).unwrap();
        assert!(one > 0 && one < both, "{one} of {both}");
        assert_eq!(batch.recv(b.as_fd(), true).unwrap(), 1);
        assert_eq!(unread_by_peer(a.as_fd()).unwrap(), 0);
        // Only what this end sent counts.
        send_packet(b.as_fd(), OutPacket { head: b"back", payload: &[], fds: &[] }, false).unwrap();
        assert_eq!(unread_by_peer(a.as_fd()).unwrap(), 0);
    }

    #[test]
    fn peer_groups_are_this_process_supplementary_groups() {
        let (a, _b) = pair().unwrap();
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find_map(|l| l.strip_prefix("Groups:")).unwrap();
        let mut mine: Vec<u32> = line.split_whitespace().map(|g| g.parse().unwrap()).collect();
        let mut got = peer_groups(a.as_fd()).unwrap();
        mine.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, mine);
    }

    #[test]
    fn batch_roundtrip_with_fds() {
        let (a, b) = pair().unwrap();
        let (x, _y) = pair().unwrap();
        let fds = [x.as_fd()];
        let pk = [
            OutPacket { head: b"one", payload: b"-tail", fds: &[] },
            OutPacket { head: b"two", payload: b"", fds: &fds },
        ];
        assert_eq!(send_packets(a.as_fd(), &pk, false).unwrap(), 2);
        let mut batch = RecvBatch::new(8);
        assert_eq!(batch.recv(b.as_fd(), true).unwrap(), 2);
        let (d, st, f) = batch.packet(0);
        assert_eq!((d, st, f.len()), (&b"one-tail"[..], RecvStatus::default(), 0));
        let (d, _, f) = batch.packet(1);
        assert_eq!(d, b"two");
        assert_eq!(f.len(), 1);
        let flags = rustix::io::fcntl_getfd(&f[0]).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        assert_eq!(batch.recv(b.as_fd(), true).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn oversize_packet_is_truncated_and_reported() {
        let (a, b) = pair().unwrap();
        rustix::net::sockopt::set_socket_send_buffer_size(&a, 4 * MAX_PACKET).unwrap();
        let big = vec![7u8; MAX_PACKET + 10];
        send_packet(a.as_fd(), OutPacket { head: &big, payload: &[], fds: &[] }, false).unwrap();
        let mut batch = RecvBatch::new(1);
        assert_eq!(batch.recv(b.as_fd(), false).unwrap(), 1);
        assert!(batch.packet(0).1.truncated);
    }

    #[test]
    fn too_many_fds_is_ctrunc_and_nothing_leaks() {
        let (a, b) = pair().unwrap();
        let (x, _y) = pair().unwrap();
        let many: Vec<_> = (0..MAX_FDS_PER_PACKET + 3).map(|_| x.try_clone().unwrap()).collect();
        let raw: Vec<RawFd> = many.iter().map(|f| f.as_raw_fd()).collect();
        // Build an over-full SCM_RIGHTS by hand: send_packets refuses it.
        let space = cmsg_space(raw.len());
        let mut ctrl = vec![0u64; space.div_ceil(8)];
        let mut iov = libc::iovec { iov_base: b"x".as_ptr() as *mut _, iov_len: 1 };
        // SAFETY: test-only msghdr pointing at live local buffers.
        unsafe {
            let mut m: libc::msghdr = std::mem::zeroed();
            m.msg_iov = &mut iov;
            m.msg_iovlen = 1;
            m.msg_control = ctrl.as_mut_ptr().cast();
            m.msg_controllen = space as _;
            let c = libc::CMSG_FIRSTHDR(&m);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((raw.len() * 4) as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast(), raw.len());
            assert_eq!(libc::sendmsg(a.as_raw_fd(), &m, 0), 1);
        }
        // Count the fds open on `x`'s socket (other tests in this process
        // open fds of their own meanwhile, but never on this socket).
        let target = std::fs::read_link(format!("/proc/self/fd/{}", x.as_raw_fd())).unwrap();
        let open_on_x = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .flatten()
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == target))
                .count()
        };
        drop(many);
        // `x` itself; the ones in flight are held by the socket buffer.
        assert_eq!(open_on_x(), 1);
        let mut batch = RecvBatch::new(1);
        assert_eq!(batch.recv(b.as_fd(), false).unwrap(), 1);
        let (_, st, fds) = batch.packet(0);
        assert!(st.fds_truncated);
        assert!(fds.len() <= MAX_FDS_PER_PACKET);
        let received = fds.len();
        // What the kernel installed is exactly what we were handed, each
        // with close-on-exec; the rest were dropped by the kernel.
        assert_eq!(open_on_x(), 1 + received, "an fd arrived that the batch does not own");
        assert!(fds
            .iter()
            .all(|f| rustix::io::fcntl_getfd(f).unwrap().contains(rustix::io::FdFlags::CLOEXEC)));
        // Dropping them leaves nothing open: the rest died in the kernel.
        drop(fds);
        drop(batch);
        assert_eq!(open_on_x(), 1, "a received fd leaked");
    }

    /// A regular file where the socket should go is an error, and stays.
    #[test]
    fn listen_never_deletes_what_is_not_a_socket() {
        /// Removes the directory however the test ends.
        struct Dir(std::path::PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let guard = Dir(std::env::temp_dir().join(format!("shmbus-listen-{}", std::process::id())));
        let dir = &guard.0;
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join("not-a-socket");
        std::fs::write(&file, b"precious").unwrap();
        let addr = Address::Path(file.clone());
        assert!(listen(&addr, 4).is_err(), "listened over a regular file");
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
        // A stale socket (nobody listens) is still replaced; a live one is not.
        let sock = dir.join("stale");
        let addr = Address::Path(sock.clone());
        drop(listen(&addr, 4).unwrap());
        let live = listen(&addr, 4).unwrap();
        assert_eq!(listen(&addr, 4).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        drop(live);
    }
}
