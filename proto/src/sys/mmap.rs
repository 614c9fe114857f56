//! Mappings of shared memory, read-only and read-write.
//!
//! Model: a mapping is an owned region that is unmapped on drop. Two kinds:
//! - [`MappedRo`] maps a *sealed* memfd `PROT_READ`/`MAP_SHARED`. The seals
//!   are checked right before mapping; once present they can never be
//!   removed, so the bytes cannot change under the reader and the file can
//!   never shrink below the mapping (no `SIGBUS`). That is what makes handing
//!   out a `&[u8]` over shared memory sound.
//! - [`MappedRw`] maps a memfd this process created and has not shared yet
//!   (a loan), writable. Nobody else holds the fd, so nobody else can
//!   truncate or write it while the `&mut [u8]` lives. Mapping an fd is
//!   `unsafe` (only the caller can know nobody else holds it);
//!   [`ExclusiveMemfd`] is the safe way: it creates the memfd itself, keeps
//!   the fd to itself, maps it at most once, and lets the fd out only by
//!   unmapping and sealing it.
//!
//! Both may ask for `MAP_POPULATE`, which pre-faults every page in one
//! call instead of one fault per page (this VM pays dearly for faults).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::mm::{MapFlags, ProtFlags};

use crate::sys::memfd::{self, MemfdError};

/// A read-only mapping of a sealed memfd.
#[derive(Debug)]
pub struct MappedRo {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is immutable shared memory (write-sealed), so sharing
// `&[u8]` views of it across threads is as safe as sharing a `&[u8]`.
unsafe impl Send for MappedRo {}
// SAFETY: as above; there is no interior mutability.
unsafe impl Sync for MappedRo {}

impl MappedRo {
    /// Maps `fd`, which must be a sealed memfd of exactly `len` bytes.
    pub fn map_sealed(fd: BorrowedFd<'_>, len: u64, populate: bool) -> Result<MappedRo, MemfdError> {
        memfd::check_sealed(fd, len)?;
        let len = usize::try_from(len)
            .map_err(|_| MemfdError::Io("payload larger than the address space".into()))?;
        if len == 0 {
            return Ok(MappedRo { ptr: NonNull::dangling(), len: 0 });
        }
        let flags = if populate { MapFlags::SHARED | MapFlags::POPULATE } else { MapFlags::SHARED };
        // SAFETY: a fresh mapping at an address the kernel picks aliases no
        // Rust object. The memfd was just checked to carry the write,
        // shrink and grow seals, which can never be removed, so its `len`
        // bytes stay valid and unchanged for the mapping's whole life.
        let ptr = unsafe { rustix::mm::mmap(std::ptr::null_mut(), len, ProtFlags::READ, flags, fd, 0) }
            .map_err(|e| MemfdError::Io(e.to_string()))?;
        Ok(MappedRo { ptr: NonNull::new(ptr.cast()).expect("mmap never returns null on success"), len })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is a live read-only mapping of sealed memory
        // owned by self (or a dangling pointer with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for MappedRo {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the region was mapped by map_sealed with this length
            // and no reference into it outlives self.
            let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// Mappings at least this large ask for transparent huge pages.
pub const HUGE_ADVICE_MIN: usize = 2 << 20;

/// A writable mapping of a memfd this process owns alone.
#[derive(Debug)]
pub struct MappedRw {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is private to this value (see `map_exclusive`); moving
// it to another thread moves the only access to it.
unsafe impl Send for MappedRw {}

impl MappedRw {
    /// Maps `len` bytes of `fd` writable.
    ///
    /// # Safety
    /// `fd` must be a memfd of at least `len` bytes that nothing else can
    /// truncate or write while the mapping lives: no other process holds
    /// it (it was created here and not sent), and no other mapping of it
    /// exists or will be made in this process. [`ExclusiveMemfd`] keeps
    /// those promises for its caller.
    ///
    /// From [`HUGE_ADVICE_MIN`] bytes up, the mapping asks for transparent
    /// huge pages (`MADV_HUGEPAGE`) before it is populated. Where the system
    /// allows them for shared memory (`shmem_enabled` = `advise` or
    /// `within_size`), unmapping and sealing a 64 MiB loan then takes tens
    /// of microseconds instead of milliseconds, and readers fault in 2 MiB
    /// at a time; elsewhere the advice is ignored.
    pub unsafe fn map_exclusive(fd: BorrowedFd<'_>, len: usize, populate: bool) -> io::Result<MappedRw> {
        let st = rustix::fs::fstat(fd)?;
        if (st.st_size as u64) < len as u64 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "memfd smaller than the mapping"));
        }
        if len == 0 {
            return Ok(MappedRw { ptr: NonNull::dangling(), len: 0 });
        }
        let huge = len >= HUGE_ADVICE_MIN;
        let flags = if populate && !huge { MapFlags::SHARED | MapFlags::POPULATE } else { MapFlags::SHARED };
        // SAFETY: a fresh mapping aliases no Rust object; the memfd is at
        // least `len` bytes (checked above) and, by the caller's promise,
        // held by nobody else, so no one can truncate it under the mapping
        // or write it concurrently.
        let ptr = unsafe {
            rustix::mm::mmap(std::ptr::null_mut(), len, ProtFlags::READ | ProtFlags::WRITE, flags, fd, 0)
        }?;
        let map =
            MappedRw { ptr: NonNull::new(ptr.cast()).expect("mmap never returns null on success"), len };
        if huge {
            // SAFETY: advice on the range this value owns; neither call
            // changes its contents or validity. Failure (old kernel, THP
            // off) only means smaller pages.
            unsafe {
                let _ = rustix::mm::madvise(ptr, len, rustix::mm::Advice::LinuxHugepage);
                if populate {
                    let _ = rustix::mm::madvise(ptr, len, rustix::mm::Advice::LinuxPopulateWrite);
                }
            }
        }
        Ok(map)
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is a live mapping owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is a live writable mapping owned exclusively
        // by self, and `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for MappedRw {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: mapped by map_exclusive with this length; no borrow of
            // it outlives self.
            let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

/// A memfd created by this process and shared with no one, with at most
/// one writable mapping: the safe way to fill a payload in place.
///
/// The fd never leaves this value except through [`ExclusiveMemfd::seal`],
/// which unmaps it first, so while the mapping lives nobody else can write
/// or truncate the memory behind [`ExclusiveMemfd::as_mut_slice`].
#[derive(Debug)]
pub struct ExclusiveMemfd {
    fd: OwnedFd,
    len: usize,
    map: Option<MappedRw>,
}

impl ExclusiveMemfd {
    /// A new memfd of `len` bytes (see [`memfd::create`]), not mapped yet.
    pub fn create(name: &str, len: usize) -> io::Result<ExclusiveMemfd> {
        Ok(ExclusiveMemfd { fd: memfd::create(name, len as u64)?, len, map: None })
    }

    /// Maps it writable (once; later calls do nothing), pre-faulted if
    /// `populate` (see [`MappedRw::map_exclusive`] for huge pages).
    pub fn map(&mut self, populate: bool) -> io::Result<()> {
        if self.map.is_none() {
            // SAFETY: `create` made this memfd `len` bytes long, its fd has
            // never left this value (no accessor hands it out), and `map`
            // is `None`, so this is its only mapping.
            self.map = Some(unsafe { MappedRw::map_exclusive(self.fd.as_fd(), self.len, populate)? });
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The mapped bytes (empty before [`ExclusiveMemfd::map`]).
    pub fn as_slice(&self) -> &[u8] {
        self.map.as_ref().map_or(&[], MappedRw::as_slice)
    }

    /// The mapped bytes, writable (empty before [`ExclusiveMemfd::map`]).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self.map.as_mut().map_or(&mut [], MappedRw::as_mut_slice)
    }

    /// Unmaps and adds [`memfd::REQUIRED_SEALS`]: what is left is an
    /// immutable memfd of `len` bytes, to send.
    pub fn seal(mut self) -> io::Result<(OwnedFd, u64)> {
        // F_SEAL_WRITE fails while a writable mapping exists.
        self.map = None;
        memfd::seal(self.fd.as_fd())?;
        Ok((self.fd, self.len as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn loan_then_seal_then_read() {
        let fd = memfd::create("t", 8192).unwrap();
        // SAFETY: `fd` was just created here, is 8192 bytes, and is mapped
        // nowhere else.
        let mut w = unsafe { MappedRw::map_exclusive(fd.as_fd(), 8192, true) }.unwrap();
        w.as_mut_slice()[..5].copy_from_slice(b"hello");
        w.as_mut_slice()[8191] = 7;
        // Sealing fails while the writable mapping lives.
        assert!(memfd::seal(fd.as_fd()).is_err());
        drop(w);
        memfd::seal(fd.as_fd()).unwrap();
        let r = MappedRo::map_sealed(fd.as_fd(), 8192, false).unwrap();
        assert_eq!(&r.as_slice()[..5], b"hello");
        assert_eq!(r.as_slice()[8191], 7);
    }

    #[test]
    fn a_sealed_memfd_cannot_be_mapped_writable() {
        let fd = memfd::from_bytes("t", &[1; 4096]).unwrap();
        // SAFETY: test-only attempt that must fail; nothing is mapped.
        let r = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                4096,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd.as_fd(),
                0,
            )
        };
        assert!(r.is_err());
    }

    #[test]
    fn an_exclusive_memfd_is_filled_then_sealed() {
        let mut m = ExclusiveMemfd::create("t", 4096).unwrap();
        assert!(m.as_slice().is_empty(), "nothing before map");
        m.map(true).unwrap();
        m.map(true).unwrap();
        m.as_mut_slice()[..3].copy_from_slice(b"abc");
        let (fd, len) = m.seal().unwrap();
        let r = MappedRo::map_sealed(fd.as_fd(), len, false).unwrap();
        assert_eq!(&r.as_slice()[..3], b"abc");
    }

    #[test]
    fn unsealed_is_not_mapped_read_only() {
        let fd = memfd::create("t", 10).unwrap();
        assert!(matches!(MappedRo::map_sealed(fd.as_fd(), 10, false), Err(MemfdError::NotSealed)));
    }
}
