//! [`TempDir`], the one way the tests make files under the temp directory.
//! (The bridge's tests include this file too, by path.)

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory of one test, `<temp dir>/shmbus-<tag>-<pid>-<n>`, made
/// empty, and removed with everything in it when dropped, however the
/// test ends (a failed assertion too).
///
/// Declare it before whatever uses it (a broker listening in it, a child
/// writing there), so that it is dropped after them: locals drop in
/// reverse order.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("shmbus-{tag}-{}-{n}", std::process::id()));
        // A leftover of an earlier process that had our pid.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot make {}: {e}", dir.display()));
        TempDir(dir)
    }

    /// [`TempDir::new`], with permission bits `mode` (say 0o755 for a
    /// directory other uids must enter, whatever the umask).
    pub fn with_mode(tag: &str, mode: u32) -> TempDir {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new(tag);
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(mode)).unwrap();
        dir
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for TempDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
