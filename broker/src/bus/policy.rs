//! Who may connect.
//!
//! Model: identity comes only from `SO_PEERCRED`, read by the broker at
//! accept; nothing a client says about itself is believed. An abstract
//! socket has no file permissions, so this check is the only gate. The
//! default admits the broker's own uid and root; `--allow-uid` opens the
//! bus to more users, `--allow-all-uids` to everyone in the network
//! namespace. No I/O.

use std::collections::BTreeSet;

use shmbus_proto::sys::socket::PeerCred;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    allowed: BTreeSet<u32>,
    allow_all: bool,
}

impl Policy {
    /// Root and `broker_uid`.
    pub fn new(broker_uid: u32) -> Policy {
        Policy { allowed: [0, broker_uid].into_iter().collect(), allow_all: false }
    }

    pub fn allow_uid(&mut self, uid: u32) {
        self.allowed.insert(uid);
    }

    pub fn allow_all(&mut self) {
        self.allow_all = true;
    }

    /// `Ok` to admit, or the reason to give the peer.
    pub fn admit(&self, cred: &PeerCred) -> Result<(), String> {
        if self.allow_all || self.allowed.contains(&cred.uid) {
            return Ok(());
        }
        let allowed: Vec<String> = self.allowed.iter().map(u32::to_string).collect();
        Err(format!(
            "access denied: uid {uid} may not connect to this bus (allowed uids: {}); start the broker with \
             --allow-uid {uid} (or --allow-all-uids), or give it a policy file (--policy) that allows `connect`",
            allowed.join(", "),
            uid = cred.uid,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(uid: u32) -> PeerCred {
        PeerCred { pid: 1, uid, gid: uid }
    }

    #[test]
    fn default_admits_root_and_self_only() {
        let p = Policy::new(1000);
        assert!(p.admit(&cred(0)).is_ok());
        assert!(p.admit(&cred(1000)).is_ok());
        let why = p.admit(&cred(65534)).unwrap_err();
        assert!(why.contains("denied") && why.contains("65534"), "{why}");
        assert!(why.contains("--allow-uid 65534"), "a refusal says what would allow it: {why}");
    }

    #[test]
    fn opened() {
        let mut p = Policy::new(0);
        p.allow_uid(7);
        assert!(p.admit(&cred(7)).is_ok());
        assert!(p.admit(&cred(8)).is_err());
        p.allow_all();
        assert!(p.admit(&cred(8)).is_ok());
    }

    /// The decision is made on the uid alone: a gid that happens to equal
    /// an allowed uid admits nothing, and a gid that does not refuses
    /// nothing. (Every other test gives a peer gid = uid, which cannot
    /// tell the two apart.)
    #[test]
    fn admission_reads_the_uid_never_the_gid() {
        let with = |uid, gid| PeerCred { pid: 1, uid, gid };
        let p = Policy::new(1000);
        // gid 0 and gid 1000 are "allowed uids"; the uids are not.
        for gid in [0, 1000] {
            let why = p.admit(&with(65534, gid)).expect_err("uid 65534 is not allowed, whatever its gid");
            assert!(why.contains("uid 65534"), "{why}");
        }
        // Allowed uids with gids that are not in the list.
        assert_eq!(p.admit(&with(0, 65534)), Ok(()));
        assert_eq!(p.admit(&with(1000, 4242)), Ok(()));

        let mut p = Policy::new(0);
        p.allow_uid(7);
        assert_eq!(p.admit(&with(7, 8)), Ok(()));
        assert!(p.admit(&with(8, 7)).is_err(), "uid 8 with gid 7 admitted");
        assert!(p.admit(&with(8, 0)).is_err(), "uid 8 with gid 0 admitted");
    }
}
