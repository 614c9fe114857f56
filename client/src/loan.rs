//! `Loan`: a writable shared-memory buffer to fill in place and publish
//! without a copy.
//!
//! A loan is a fresh memfd, sized (pages allocated up front) and mapped
//! writable into this process only. `Client::publish_loan` unmaps it, seals
//! it (shrink, grow, write, seal) and sends the fd: from then on nobody can
//! change the bytes, and every subscriber maps the same pages read-only.

use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, OwnedFd};

use shmbus_proto::sys::memfd;
use shmbus_proto::sys::mmap::MappedRw;

use crate::error::LoanError;

/// A writable buffer in shared memory; derefs to `[u8]`.
#[derive(Debug)]
pub struct Loan {
    pub(crate) fd: OwnedFd,
    pub(crate) map: Option<MappedRw>,
    pub(crate) len: usize,
}

impl Loan {
    pub(crate) fn new(len: usize) -> Result<Loan, LoanError> {
        let fd = memfd::create("shmbus-loan", len as u64).map_err(LoanError::Create)?;
        let map = MappedRw::map_exclusive(fd.as_fd(), len, true).map_err(LoanError::Map)?;
        Ok(Loan { fd, map: Some(map), len })
    }

    /// Unmaps and seals; what is left is the fd to send.
    pub(crate) fn seal(mut self) -> std::io::Result<(OwnedFd, u64)> {
        // F_SEAL_WRITE fails while a writable mapping exists.
        self.map = None;
        memfd::seal(self.fd.as_fd())?;
        Ok((self.fd, self.len as u64))
    }
}

impl Deref for Loan {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.map.as_ref().map_or(&[], MappedRw::as_slice)
    }
}

impl DerefMut for Loan {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.map.as_mut().map_or(&mut [], MappedRw::as_mut_slice)
    }
}
