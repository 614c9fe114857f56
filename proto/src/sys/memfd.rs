//! Memfds and seals: how a large payload becomes immutable before it
//! crosses a process boundary.
//!
//! Model: the publisher creates a memfd (close-on-exec, sealing allowed,
//! never executable where the kernel supports `MFD_NOEXEC_SEAL`), sizes and
//! fills it, drops every writable mapping, then adds [`REQUIRED_SEALS`].
//! From then on nobody — not the publisher, not a subscriber — can change,
//! grow or shrink its contents, so a reader may map it and trust that the
//! bytes stay put and the mapping never faults past the end.
//!
//! Receivers (the broker, then each client) call [`check_sealed`] before
//! they trust or map an fd: it must be a memfd on shmem (tmpfs, never
//! hugetlbfs), open for reading, carry all the seals, and be exactly the
//! declared size; so a receiver can always map it read-only. Everything
//! here goes through rustix and is safe code; mapping lives in
//! [`crate::sys::mmap`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::{FallocateFlags, MemfdFlags, SealFlags};

use crate::limits::MAX_MEMFD_PAYLOAD;

/// The seals every shared payload carries: no shrinking, no growing, no
/// writing, and no changing the seals.
pub const REQUIRED_SEALS: SealFlags =
    SealFlags::SHRINK.union(SealFlags::GROW).union(SealFlags::WRITE).union(SealFlags::SEAL);

/// `statfs.f_type` of tmpfs and of the kernel's internal shmem mount,
/// where every memfd without `MFD_HUGETLB` lives.
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// `statfs.f_type` of hugetlbfs (`MFD_HUGETLB` memfds).
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Creates an empty memfd of `len` bytes, with its pages allocated up front
/// (`fallocate`) so filling it does not fault page by page.
pub fn create(name: &str, len: u64) -> io::Result<OwnedFd> {
    let base = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
    let fd = match rustix::fs::memfd_create(name, base | MemfdFlags::NOEXEC_SEAL) {
        Ok(fd) => fd,
        // Kernels before 6.3 do not know MFD_NOEXEC_SEAL.
        Err(rustix::io::Errno::INVAL) => rustix::fs::memfd_create(name, base)?,
        Err(e) => return Err(e.into()),
    };
    rustix::fs::ftruncate(&fd, len)?;
    // Allocate the pages up front (best effort: on failure they come on
    // first touch) — except for large memfds, whose pages are left to the
    // mapping that fills them, so that it can ask for huge pages (see
    // `mmap::HUGE_ADVICE_MIN`); fallocate would commit small ones first.
    if len > 0 && len < crate::sys::mmap::HUGE_ADVICE_MIN as u64 {
        let _ = rustix::fs::fallocate(&fd, FallocateFlags::KEEP_SIZE, 0, len);
    }
    Ok(fd)
}

/// Creates a sealed memfd holding `bytes` (written with `write(2)`, which
/// copies straight into the page cache).
pub fn from_bytes(name: &str, bytes: &[u8]) -> io::Result<OwnedFd> {
    let fd = create(name, bytes.len() as u64)?;
    let mut off = 0usize;
    while off < bytes.len() {
        match rustix::io::pwrite(&fd, &bytes[off..], off as u64) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => off += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    seal(fd.as_fd())?;
    Ok(fd)
}

/// Adds [`REQUIRED_SEALS`]. Fails with `EBUSY` while a writable shared
/// mapping of the memfd exists.
///
/// The kernel also answers `EBUSY` when a page just written still has a
/// passing extra reference: it waits a little for such pins, but (most
/// likely) a page sitting in another CPU's LRU batch, the writer having
/// migrated between the write and the seal, can outlast that on a loaded
/// machine, with no mapping anywhere. Seen once in a few dozen runs under
/// load, for a 512 KiB payload written with `pwrite` and never mapped. So
/// `EBUSY` is tried again, a few times over about 100 ms, before it is
/// returned: a real writable mapping still fails, only later.
pub fn seal(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut pause = std::time::Duration::from_millis(1);
    for _ in 0..6 {
        match rustix::fs::fcntl_add_seals(fd, REQUIRED_SEALS) {
            Err(rustix::io::Errno::BUSY) => {
                std::thread::sleep(pause);
                pause *= 2;
            }
            other => return Ok(other?),
        }
    }
    Ok(rustix::fs::fcntl_add_seals(fd, REQUIRED_SEALS)?)
}

/// A new, read-only file description of the same memfd: whoever holds it
/// can map it only `PROT_READ`, and cannot write it. (Reopened through
/// `/proc/self/fd`, the one way to downgrade a memfd's access mode.)
///
/// The memfd's mode becomes 0400 first (`fchmod`; the caller must own
/// it). A memfd is born 0777, and the same reopening works the other way:
/// a holder of the read-only fd could open `/proc/self/fd/<it>` `O_RDWR`
/// and write what it was only to read. With 0400 that reopening is
/// refused (`EACCES`) to every uid but the owner's, who may `fchmod` it
/// back, and root: a process of the creator's own uid, or root, could
/// ptrace the creator anyway. Descriptions already open keep their
/// access: the creator's read-write fd stays read-write.
pub fn reopen_read_only(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    rustix::fs::fchmod(fd, rustix::fs::Mode::RUSR)?;
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}

/// Why an fd is not an acceptable payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemfdError {
    #[error("not a memfd")]
    NotMemfd,
    #[error("memfd is not sealed (needs shrink, grow, write and seal seals)")]
    NotSealed,
    #[error("memfd holds {actual} bytes, {declared} were declared")]
    SizeMismatch { declared: u64, actual: u64 },
    #[error("a memfd payload of {declared} bytes; at most {MAX_MEMFD_PAYLOAD}")]
    TooLarge { declared: u64 },
    /// A sealed memfd that cannot be mapped read-only: a write-only (or
    /// `O_PATH`) file description, or one on hugetlbfs, whose pages may not
    /// exist (no huge pages reserved) and would fail every mapping.
    #[error("memfd cannot be mapped read-only: {0}")]
    Unmappable(&'static str),
    #[error("cannot inspect the fd: {0}")]
    Io(String),
}

/// Whether holding `fd` can keep no other file open: a file on tmpfs or
/// hugetlbfs (a memfd or not) holds pages, never other files. Anything
/// else may: a unix socket holds the fds queued in it (its peer's own end,
/// say), an io_uring its registered files. (False if it cannot be told.)
pub fn holds_only_pages(fd: BorrowedFd<'_>) -> bool {
    rustix::fs::fstatfs(fd).is_ok_and(|fs| {
        #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
        let magic = fs.f_type as i64;
        magic == TMPFS_MAGIC || magic == HUGETLBFS_MAGIC
    })
}

/// Checks that `fd` is a readable shmem memfd carrying [`REQUIRED_SEALS`]
/// and exactly `declared` bytes long: what a receiver may map read-only.
pub fn check_sealed(fd: BorrowedFd<'_>, declared: u64) -> Result<(), MemfdError> {
    if declared > MAX_MEMFD_PAYLOAD {
        return Err(MemfdError::TooLarge { declared });
    }
    let actual = sealed_len(fd)?;
    if actual != declared {
        return Err(MemfdError::SizeMismatch { declared, actual });
    }
    Ok(())
}

/// The size of a readable shmem memfd carrying [`REQUIRED_SEALS`].
pub fn sealed_len(fd: BorrowedFd<'_>) -> Result<u64, MemfdError> {
    let io = |e: rustix::io::Errno| MemfdError::Io(e.to_string());
    // The access mode first: mmap(PROT_READ) needs a file description open
    // for reading, and O_PATH ones cannot even be asked for their seals.
    let mode = rustix::fs::fcntl_getfl(fd).map_err(io)?;
    if mode.contains(rustix::fs::OFlags::PATH) {
        return Err(MemfdError::NotMemfd);
    }
    let access = mode & rustix::fs::OFlags::RWMODE;
    if access != rustix::fs::OFlags::RDONLY && access != rustix::fs::OFlags::RDWR {
        return Err(MemfdError::Unmappable("not open for reading"));
    }
    let fs = rustix::fs::fstatfs(fd).map_err(io)?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    let magic = fs.f_type as i64;
    if magic == HUGETLBFS_MAGIC {
        return Err(MemfdError::Unmappable("on hugetlbfs"));
    }
    if magic != TMPFS_MAGIC {
        return Err(MemfdError::NotMemfd);
    }
    // A tmpfs file opened by path is shmem too; only memfd_create names
    // its files "memfd:…". Without /proc (unusual) the seal check below
    // still refuses such a file, since it cannot carry the write seal.
    if let Ok(target) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        if !target.to_string_lossy().starts_with("/memfd:") {
            return Err(MemfdError::NotMemfd);
        }
    }
    let seals = match rustix::fs::fcntl_get_seals(fd) {
        Ok(s) => s,
        Err(rustix::io::Errno::INVAL) => return Err(MemfdError::NotMemfd),
        Err(e) => return Err(io(e)),
    };
    if !seals.contains(REQUIRED_SEALS) {
        return Err(MemfdError::NotSealed);
    }
    let st = rustix::fs::fstat(fd).map_err(io)?;
    Ok(st.st_size as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_memfd_passes_and_cannot_change() {
        let fd = from_bytes("t", b"hello").unwrap();
        check_sealed(fd.as_fd(), 5).unwrap();
        assert_eq!(check_sealed(fd.as_fd(), 6), Err(MemfdError::SizeMismatch { declared: 6, actual: 5 }));
        assert!(rustix::io::pwrite(&fd, b"x", 0).is_err(), "write seal holds");
        assert!(rustix::fs::ftruncate(&fd, 1).is_err(), "shrink seal holds");
        assert!(rustix::fs::ftruncate(&fd, 100).is_err(), "grow seal holds");
    }

    #[test]
    fn only_files_of_pages_hold_only_pages() {
        let fd = from_bytes("t", b"hello").unwrap();
        assert!(holds_only_pages(fd.as_fd()));
        let (a, _b) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap();
        assert!(!holds_only_pages(a.as_fd()), "a socket may hold the fds queued in it");
    }

    #[test]
    fn refusals() {
        let unsealed = create("t", 10).unwrap();
        assert_eq!(check_sealed(unsealed.as_fd(), 10), Err(MemfdError::NotSealed));
        let (a, _b) = crate::sys::socket::pair().unwrap();
        assert_eq!(check_sealed(a.as_fd(), 0), Err(MemfdError::NotMemfd));
        let (r, _w) = rustix::pipe::pipe().unwrap();
        assert_eq!(check_sealed(r.as_fd(), 0), Err(MemfdError::NotMemfd));
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(check_sealed(f.as_fd(), 0), Err(MemfdError::NotMemfd));
        let empty = from_bytes("t", b"").unwrap();
        check_sealed(empty.as_fd(), 0).unwrap();
        // A declared length past the bound is refused before anything
        // else (a sparse memfd of 2^63 bytes costs its maker nothing).
        let huge = MAX_MEMFD_PAYLOAD + 1;
        assert_eq!(check_sealed(empty.as_fd(), huge), Err(MemfdError::TooLarge { declared: huge }));
    }

    /// `create` makes a memfd that is close-on-exec (an exec'd child
    /// inherits no payload) and that can be sealed; `reopen_read_only`
    /// gives a read-only fd, close-on-exec too.
    #[test]
    fn created_memfds_are_close_on_exec_and_sealable() {
        let fd = create("t", 10).unwrap();
        let flags = rustix::io::fcntl_getfd(&fd).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC), "a memfd without FD_CLOEXEC");
        seal(fd.as_fd()).unwrap();
        assert!(rustix::fs::fcntl_get_seals(&fd).unwrap().contains(REQUIRED_SEALS));
        check_sealed(fd.as_fd(), 10).unwrap();
        let ro = reopen_read_only(fd.as_fd()).unwrap();
        let flags = rustix::io::fcntl_getfd(&ro).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC), "a reopened memfd without FD_CLOEXEC");
        let mode = rustix::fs::fcntl_getfl(&ro).unwrap() & rustix::fs::OFlags::RWMODE;
        assert_eq!(mode, rustix::fs::OFlags::RDONLY);
        // Mode 0400: no other uid may reopen it writable (the test across
        // uids is broker/tests/attack_review2.rs); the creator's own fd
        // stays writable.
        assert_eq!(rustix::fs::fstat(&ro).unwrap().st_mode & 0o7777, 0o400);
        let rw = rustix::fs::fcntl_getfl(&fd).unwrap() & rustix::fs::OFlags::RWMODE;
        assert_eq!(rw, rustix::fs::OFlags::RDWR);
    }

    /// Small memfds get their pages up front (`fallocate`); from
    /// `HUGE_ADVICE_MIN` up they get none, so the filling mapping can ask
    /// for huge pages.
    #[test]
    fn only_small_memfds_are_allocated_up_front() {
        let min = crate::sys::mmap::HUGE_ADVICE_MIN as u64;
        let allocated = |len: u64| {
            let fd = create("t", len).unwrap();
            let st = rustix::fs::fstat(&fd).unwrap();
            assert_eq!(st.st_size as u64, len);
            st.st_blocks as u64 * 512
        };
        assert_eq!(allocated(0), 0);
        for len in [1, 4096, min - 1] {
            assert!(allocated(len) >= len, "{len} bytes not allocated up front");
        }
        for len in [min, 2 * min] {
            assert_eq!(allocated(len), 0, "{len} bytes allocated up front");
        }
    }

    /// A sealed memfd reopened write-only passes every seal and size
    /// check, but cannot be mapped `PROT_READ`: refused.
    #[test]
    fn a_write_only_memfd_is_refused() {
        let fd = from_bytes("t", b"hello").unwrap();
        let wronly = rustix::fs::open(
            format!("/proc/self/fd/{}", fd.as_raw_fd()),
            rustix::fs::OFlags::WRONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        assert!(check_sealed(wronly.as_fd(), 5).is_err(), "a write-only fd passed");
        assert!(sealed_len(wronly.as_fd()).is_err(), "a write-only fd passed");
        // The read-only and read-write ones still pass.
        check_sealed(reopen_read_only(fd.as_fd()).unwrap().as_fd(), 5).unwrap();
        check_sealed(fd.as_fd(), 5).unwrap();
    }

    /// A sealed hugetlbfs memfd: on a host with no huge pages reserved its
    /// mapping fails (ENOMEM), and elsewhere it pins scarce memory; refused
    /// either way. Skipped (with a note) where hugetlbfs memfds cannot be
    /// made at all.
    #[test]
    fn a_hugetlb_memfd_is_refused() {
        let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING | MemfdFlags::HUGETLB;
        let fd = match rustix::fs::memfd_create("huge", flags) {
            Ok(fd) => fd,
            Err(e) => return eprintln!("skipped: this kernel makes no hugetlb memfd ({e})"),
        };
        rustix::fs::ftruncate(&fd, 2 << 20).unwrap();
        rustix::fs::fcntl_add_seals(&fd, REQUIRED_SEALS).unwrap();
        assert!(check_sealed(fd.as_fd(), 2 << 20).is_err(), "a hugetlbfs memfd passed");
    }
}
