//! Maps and sets keyed by the integer ids of a connection (subscription,
//! query, channel, name and call ids, ping tokens), hashed with one
//! multiply instead of SipHash.
//!
//! Model: these ids are handed out by this client, or echoed by the
//! broker it chose to trust, so no one hostile picks keys to collide;
//! SipHash's protection against that bought nothing and cost about 700
//! instructions per delivered message (12% of an echo's work, counted
//! with callgrind). The hash is FxHash's: a rotate, an xor and a multiply
//! by an odd constant per word, which spreads consecutive ids over the
//! high bits hashbrown takes its tags from and permutes the low ones it
//! takes its buckets from.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

pub(crate) type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
pub(crate) type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

/// FxHash over the words written (see the module essay).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl IdHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// Consecutive ids land in distinct buckets of a small table and carry
    /// distinct tags: the map stays a map, not a list.
    #[test]
    fn consecutive_ids_spread_over_buckets_and_tags() {
        let build = BuildHasherDefault::<IdHasher>::default();
        let hashes: Vec<u64> = (1u32..=64).map(|id| build.hash_one(id)).collect();
        let buckets: HashSet<u64> = hashes.iter().map(|h| h & 127).collect();
        let tags: HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert_eq!(buckets.len(), 64, "64 ids in 128 buckets: no collisions");
        // Random hashes would give about 50 distinct tags; FxHash gives 37,
        // and a tag only speeds up the probe within a group.
        assert!(tags.len() >= 32, "the 7-bit tags vary: {} of 64 distinct", tags.len());
    }

    #[test]
    fn a_map_keyed_by_ids_behaves_as_a_map() {
        let mut m: IdMap<u32, u32> = IdMap::default();
        for id in 0..10_000u32 {
            m.insert(id, id * 2);
        }
        for id in (0..10_000u32).step_by(2) {
            m.remove(&id);
        }
        assert_eq!(m.len(), 5_000);
        assert!((1..10_000u32).step_by(2).all(|id| m.get(&id) == Some(&(id * 2))));
        let mut s: IdSet<u64> = IdSet::default();
        assert!(s.insert(u64::MAX) && !s.insert(u64::MAX));
    }
}
