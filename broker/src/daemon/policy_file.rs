//! Reading the policy file: the one place the broker opens it, and
//! `/etc/passwd` and `/etc/group` to resolve the user and group names in
//! it.
//!
//! Model: the file is read and compiled whole, at start and on every
//! `SIGHUP`; the bus core gets a finished [`Rules`] or nothing. A file that
//! cannot be read, parsed or resolved is an error naming the file and the
//! line, and on reload leaves the rules in force untouched. Names are
//! resolved from the two files directly (no NSS modules), once per load.

use std::path::Path;

use crate::bus::rules::{Accounts, Rules};

/// Reads and compiles the policy file at `path`.
pub fn load(path: &Path) -> Result<Rules, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // A system without one of these files simply has no names to resolve.
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    Rules::parse(&text, &Accounts::parse(&passwd, &group)).map_err(|e| format!("{}: {e}", path.display()))
}
