//! Per-end-user counters: one table per workspace that sets `end_user_limits`,
//! holding a [`ScopeState`] for each distinct end user it has seen.
//!
//! End users are not in the policy: they are created the first time a request names
//! one, so their number is bounded here instead. A table is split into [`SHARDS`]
//! shards, each a short-held mutex over a hash table, so threads serving different end
//! users rarely meet; each shard holds at most its share of the workspace's
//! `max_tracked`. To make room, a shard forgets end users idle for `idle_secs` (with
//! nothing in flight), else the least recently seen one with nothing in flight; when
//! every end user of a full shard has a request in flight, a new one is refused (a
//! concurrency denial at the end-user scope) rather than growing past the cap.
//!
//! Forgetting an end user forgets its windows and budget: it starts afresh when it
//! comes back. That is acceptable because the end-user id is whatever the caller
//! says (OpenAI's `user` field is client-supplied): a client could always start
//! afresh by naming a new end user, so these limits bound honest end users' share of
//! a workspace, and the workspace's, key's and org's limits, which are never
//! forgotten, bound the spend.
//!
//! A known end user is found without allocating (hashbrown's `HashTable` probed with
//! the `&str`); the first request of a new one allocates its id and counters. A
//! reservation keeps its end user's counters (`Arc`), so it settles on them even if
//! the end user is forgotten meanwhile; an entry whose `Arc` is shared has a
//! reservation in flight and is not forgotten while others can be.

use std::hash::BuildHasher;

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use parking_lot::Mutex;

use crate::clock::Timestamp;
use crate::policy::rules::EndUserRules;
use crate::request::MAX_END_USER_LEN;
use crate::store::ScopeState;
use crate::sync::Arc;

/// The level number the Redis backend gives the end user's scope hash in a group's
/// levels: outside `0..LEVELS`, since its counters are not a snapshot's (its rules are
/// the workspace's `end_user_limits`).
#[cfg(feature = "redis")]
pub(crate) const END_USER_LEVEL: usize = usize::MAX;

/// The level the end user's comes after (key × model), in the in-memory engine and in
/// the Redis workspace group alike: see the README's level order.
pub(crate) const END_USER_AFTER: usize = 1;

/// Shards of one workspace's table. `max_tracked` is at least this (validated), so
/// every shard may hold at least one end user.
pub(crate) const SHARDS: usize = 16;

/// Whether `id` may name an end user: 1 to [`MAX_END_USER_LEN`] bytes without ASCII
/// control characters. It is user-supplied and ends up in logs and (hashed) in Redis
/// key names, so it is bounded; the check is one pass over at most 256 bytes.
#[inline]
pub(crate) fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_END_USER_LEN && !id.bytes().any(|b| b < 0x20 || b == 0x7f)
}

/// One workspace's end users and their counters. Outlives policy swaps: snapshots
/// hand it on by workspace id, like the workspace's own counters.
pub(crate) struct EndUserTable {
    hasher: RandomState,
    shards: Box<[Mutex<HashTable<Entry>>]>,
}

struct Entry {
    /// The id's hash, kept so the table can grow without hashing ids again.
    hash: u64,
    id: Box<str>,
    state: Arc<ScopeState>,
    /// When a request last named this end user (engine clock, Unix nanoseconds).
    last_seen: u64,
    /// The rules generation its counters were last adapted to.
    generation: u64,
}

impl Entry {
    /// A reservation holds a clone of `state`: something is in flight. Clones are only
    /// taken under the shard's lock, so a count of 1 seen under it stays 1.
    fn in_flight(&self) -> bool {
        Arc::strong_count(&self.state) > 1
    }
}

/// A workspace's end-user table as one snapshot sees it: the table and the rules
/// generation of this snapshot's `end_user_limits`.
#[derive(Clone)]
pub(crate) struct EndUserLevel {
    pub(crate) table: std::sync::Arc<EndUserTable>,
    /// Bumped when a new policy changes the workspace's `end_user_limits`: entries of
    /// an older generation are adapted to the new rules the next time they are seen.
    pub(crate) generation: u64,
}

/// A full shard whose every end user has a request in flight.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Full {
    /// The shard's share of `max_tracked`.
    pub(crate) cap: u32,
    /// End users with requests in flight in that shard.
    pub(crate) in_flight: u32,
}

impl EndUserLevel {
    /// A new, empty table.
    pub(crate) fn new() -> Self {
        EndUserLevel {
            table: std::sync::Arc::new(EndUserTable {
                hasher: RandomState::default(),
                shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            }),
            generation: 0,
        }
    }

    /// The same table under a new policy's rules (`changed`: they differ).
    pub(crate) fn carried(&self, changed: bool) -> Self {
        EndUserLevel {
            table: std::sync::Arc::clone(&self.table),
            generation: self.generation + u64::from(changed),
        }
    }

    /// The counters of end user `id`, created on first sight (which allocates),
    /// making room as the module doc says. Marks the end user seen at `now`.
    pub(crate) fn counters(
        &self,
        id: &str,
        rules: &EndUserRules,
        now: Timestamp,
    ) -> Result<Arc<ScopeState>, Full> {
        let table = &self.table;
        let hash = table.hasher.hash_one(id);
        let shard = shard_of(id);
        let at = now.as_unix_nanos();
        let mut entries = table.shards[shard].lock();
        if let Some(entry) = entries.find_mut(hash, |e| &*e.id == id) {
            entry.last_seen = entry.last_seen.max(at);
            if entry.generation < self.generation {
                entry.state.adapt(&rules.rules, now);
                entry.generation = self.generation;
            }
            return Ok(Arc::clone(&entry.state));
        }
        let cap = shard_cap(rules.max_tracked, shard);
        if entries.len() >= cap as usize {
            make_room(&mut entries, cap, at, rules.idle_nanos)?;
        }
        let state = Arc::new(ScopeState::new(&rules.rules, now, false));
        entries.insert_unique(
            hash,
            Entry {
                hash,
                id: id.into(),
                state: Arc::clone(&state),
                last_seen: at,
                generation: self.generation,
            },
            |e| e.hash,
        );
        Ok(state)
    }

    /// Every end user tracked now, with its counters (for saving them; allocates).
    pub(crate) fn all(&self) -> Vec<(Box<str>, Arc<ScopeState>)> {
        let mut all = Vec::new();
        for shard in self.table.shards.iter() {
            let entries = shard.lock();
            all.extend(entries.iter().map(|e| (e.id.clone(), Arc::clone(&e.state))));
        }
        all
    }

    /// End users tracked now.
    pub(crate) fn tracked(&self) -> usize {
        self.table.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// End user `id`'s counters if it is tracked, without marking it seen.
    pub(crate) fn peek(&self, id: &str) -> Option<Arc<ScopeState>> {
        let hash = self.table.hasher.hash_one(id);
        let shard = shard_of(id);
        let entries = self.table.shards[shard].lock();
        entries
            .find(hash, |e| &*e.id == id)
            .map(|e| Arc::clone(&e.state))
    }
}

/// Shard `shard`'s share of `max_tracked`: the shares add up to `max_tracked` exactly.
/// The shard of end user `id`: the 64-bit FNV-1a hash of its bytes, modulo
/// [`SHARDS`]. A documented, stable function rather than the table's seeded hash, so
/// that which end users share a shard's part of the cap (and so which one a full shard
/// forgets) can be predicted, as the reference model does; inside a shard the table
/// still hashes with a per-table random seed. One multiply per byte of the id.
pub(crate) fn shard_of(id: &str) -> usize {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = id
        .bytes()
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    (hash % SHARDS as u64) as usize
}

fn shard_cap(max_tracked: u32, shard: usize) -> u32 {
    let shards = SHARDS as u32;
    max_tracked / shards + u32::from((shard as u32) < max_tracked % shards)
}

/// Bring a full shard below `cap`: forget every end user idle for `idle` with nothing
/// in flight, then, while still full, the least recently seen one with nothing in
/// flight. Scans the shard (its share of `max_tracked`), only when a new end user
/// meets a full shard; an idle sweep frees many places at once.
fn make_room(entries: &mut HashTable<Entry>, cap: u32, at: u64, idle: u64) -> Result<(), Full> {
    entries.retain(|e| e.in_flight() || at.saturating_sub(e.last_seen) < idle);
    while entries.len() >= cap as usize {
        let oldest = entries
            .iter()
            .filter(|e| !e.in_flight())
            .min_by_key(|e| e.last_seen)
            .map(|e| (e.hash, e.last_seen));
        let Some((hash, seen)) = oldest else {
            return Err(Full {
                cap,
                in_flight: u32::try_from(entries.len()).unwrap_or(u32::MAX),
            });
        };
        match entries.find_entry(hash, |e| e.last_seen == seen && !e.in_flight()) {
            Ok(found) => drop(found.remove()),
            // Just seen under the same lock: cannot happen, but never loop on it.
            Err(_) => return Err(Full { cap, in_flight: 0 }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_follow_the_documented_hash() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c; of "" the offset basis.
        assert_eq!(shard_of("a"), (0xaf63_dc4c_8601_ec8c_u64 % 16) as usize);
        assert_eq!(shard_of(""), (0xcbf2_9ce4_8422_2325_u64 % 16) as usize);
        let used: std::collections::HashSet<usize> =
            (0..64).map(|i| shard_of(&format!("user-{i}"))).collect();
        assert_eq!(used.len(), SHARDS, "sequential ids spread over every shard");
    }

    #[test]
    fn shard_caps_add_up_to_the_cap() {
        for max in [16, 17, 100, 10_000, 10_001] {
            let sum: u32 = (0..SHARDS).map(|s| shard_cap(max, s)).sum();
            assert_eq!(sum, max);
        }
    }

    /// The README's figure for one end user's memory: its counters, the table slot,
    /// and the id (a 16-byte id here).
    #[test]
    fn one_end_user_costs_a_few_hundred_bytes() {
        let counters = std::mem::size_of::<ScopeState>() + 16; // Arc's two counts
        let slot = std::mem::size_of::<Entry>() + 1; // hashbrown's control byte
        let total = counters + slot + 16;
        eprintln!("end user: counters {counters} B, slot {slot} B, total {total} B");
        assert!(total <= 512, "{total} bytes per end user");
    }

    #[test]
    fn ids_are_bounded_and_printable() {
        assert!(valid_id("user-42@example.com"));
        assert!(valid_id("ünïcode"));
        assert!(valid_id(&"x".repeat(MAX_END_USER_LEN)));
        assert!(!valid_id(""));
        assert!(!valid_id(&"x".repeat(MAX_END_USER_LEN + 1)));
        assert!(!valid_id("a\nb"));
        assert!(!valid_id("a\u{7f}"));
    }
}
