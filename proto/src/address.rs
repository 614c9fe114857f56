//! Bus addresses.
//!
//! An address is written `@name` for an abstract AF_UNIX socket and as a
//! filesystem path otherwise. Resolution order, for both broker and client:
//! an explicit address, else `$SHMBUS_ADDRESS`, else the default for the
//! bus kind: the system bus is `@shmbus`, a user's bus is `@shmbus.<uid>`.
//!
//! This module only parses and formats; binding and connecting live in
//! [`crate::sys::socket`].

use std::fmt;
use std::path::PathBuf;

/// Environment variable that overrides the default address.
pub const ENV_ADDRESS: &str = "SHMBUS_ADDRESS";

/// Where a bus listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// Abstract socket name, without the leading NUL (and without the `@`).
    Abstract(Vec<u8>),
    /// Filesystem path.
    Path(PathBuf),
}

/// Why an address string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address is empty")]
    Empty,
    #[error("abstract name after '@' is empty")]
    EmptyAbstract,
    #[error("address is longer than the 107 bytes sockaddr_un allows")]
    TooLong,
}

impl Address {
    /// Parses `@name` (abstract) or a path.
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        if s.is_empty() {
            return Err(AddressError::Empty);
        }
        // sun_path is 108 bytes: abstract names lose one to the leading NUL,
        // paths one to the trailing NUL.
        if s.len() > 107 {
            return Err(AddressError::TooLong);
        }
        match s.strip_prefix('@') {
            Some("") => Err(AddressError::EmptyAbstract),
            Some(name) => Ok(Address::Abstract(name.as_bytes().to_vec())),
            None => Ok(Address::Path(PathBuf::from(s))),
        }
    }

    /// The system bus: `@shmbus`.
    pub fn system() -> Address {
        Address::Abstract(b"shmbus".to_vec())
    }

    /// The user bus of `uid`: `@shmbus.<uid>`.
    pub fn user(uid: u32) -> Address {
        Address::Abstract(format!("shmbus.{uid}").into_bytes())
    }

    /// The user bus of the calling process's real uid.
    pub fn current_user() -> Address {
        Address::user(rustix::process::getuid().as_raw())
    }

    /// `$SHMBUS_ADDRESS` if set and non-empty, else `None`.
    pub fn from_env() -> Option<Result<Address, AddressError>> {
        match std::env::var(ENV_ADDRESS) {
            Ok(s) if !s.is_empty() => Some(Address::parse(&s)),
            _ => None,
        }
    }

    /// `$SHMBUS_ADDRESS`, else the current user's bus.
    pub fn default_user() -> Result<Address, AddressError> {
        Address::from_env().unwrap_or_else(|| Ok(Address::current_user()))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Abstract(name) => write!(f, "@{}", String::from_utf8_lossy(name)),
            Address::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

impl std::str::FromStr for Address {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Address::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        assert_eq!(Address::parse("@x").unwrap(), Address::Abstract(b"x".to_vec()));
        assert_eq!(Address::parse("/run/x").unwrap(), Address::Path("/run/x".into()));
        assert_eq!(Address::parse("@"), Err(AddressError::EmptyAbstract));
        assert_eq!(Address::parse(""), Err(AddressError::Empty));
        assert_eq!(Address::user(1000).to_string(), "@shmbus.1000");
        assert_eq!(Address::system().to_string(), "@shmbus");
        assert_eq!(Address::parse(&"a".repeat(108)), Err(AddressError::TooLong));
    }
}
