//! A hash index from ids (or digests) to positions in a policy's vectors.
//!
//! It stores only the `u32` positions: a probe compares against the policy's own copy
//! of the id, so a million keys cost 4 bytes (plus table slack) per index instead of a
//! second copy of every id and digest.

use std::hash::{BuildHasher, Hash};

use foldhash::fast::RandomState;
use hashbrown::HashTable;

pub(crate) struct Index {
    table: HashTable<u32>,
    hasher: RandomState,
}

impl Index {
    /// Index `len` items; `key_of(i)` is item `i`'s id. Duplicates (which validation
    /// refuses) resolve to the first.
    pub(crate) fn build<'a, K, F>(len: usize, key_of: F) -> Self
    where
        K: Hash + Eq + ?Sized + 'a,
        F: Fn(u32) -> &'a K,
    {
        let hasher = RandomState::default();
        let mut table = HashTable::with_capacity(len);
        for i in 0..len as u32 {
            let key = key_of(i);
            let hash = hasher.hash_one(key);
            if table.find(hash, |&j| key_of(j) == key).is_none() {
                table.insert_unique(hash, i, |&j| hasher.hash_one(key_of(j)));
            }
        }
        Index { table, hasher }
    }

    /// The position of `key`, comparing candidates with `key_of`.
    #[inline]
    pub(crate) fn get<'a, K, F>(&self, key: &K, key_of: F) -> Option<u32>
    where
        K: Hash + Eq + ?Sized + 'a,
        F: Fn(u32) -> &'a K,
    {
        let hash = self.hasher.hash_one(key);
        self.table.find(hash, |&i| key_of(i) == key).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_id_and_nothing_else() {
        let ids: Vec<String> = (0..1000).map(|i| format!("key-{i}")).collect();
        let index = Index::build(ids.len(), |i| ids[i as usize].as_str());
        for (i, id) in ids.iter().enumerate() {
            assert_eq!(
                index.get(id.as_str(), |j| ids[j as usize].as_str()),
                Some(i as u32)
            );
        }
        assert_eq!(index.get("key-1000", |j| ids[j as usize].as_str()), None);
    }
}
