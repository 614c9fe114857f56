//! `Loan`: a writable shared-memory buffer to fill in place and publish
//! without a copy.
//!
//! A loan is a fresh memfd, sized (pages allocated up front) and mapped
//! writable into this process only. `Client::publish_loan` unmaps it, seals
//! it (shrink, grow, write, seal) and sends the fd: from then on nobody can
//! change the bytes, and every subscriber maps the same pages read-only.

use std::ops::{Deref, DerefMut};
use std::os::fd::OwnedFd;

use shmbus_proto::sys::mmap::ExclusiveMemfd;

use crate::error::LoanError;

/// A writable buffer in shared memory; derefs to `[u8]`.
#[derive(Debug)]
pub struct Loan {
    mem: ExclusiveMemfd,
}

impl Loan {
    pub(crate) fn new(len: usize) -> Result<Loan, LoanError> {
        let mut mem = ExclusiveMemfd::create("shmbus-loan", len).map_err(LoanError::Create)?;
        mem.map(true).map_err(LoanError::Map)?;
        Ok(Loan { mem })
    }

    /// Unmaps and seals; what is left is the fd to send.
    pub(crate) fn seal(self) -> std::io::Result<(OwnedFd, u64)> {
        self.mem.seal()
    }
}

impl Deref for Loan {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.mem.as_slice()
    }
}

impl DerefMut for Loan {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.mem.as_mut_slice()
    }
}
