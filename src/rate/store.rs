//! A keyed GCRA state store with a hard cap on tracked keys.
//!
//! governor's own keyed stores grow with every new key until someone calls `retain_recent`; a flood of distinct
//! keys (spoofed headers, an IPv6 range) would grow them without bound. This store keeps at most `max_keys`
//! entries. Below the cap it forgets nothing, so active clients are never forgotten while fewer than `max_keys`
//! keys are tracked. At the cap a new key takes the place of an old one, chosen among the least recently seen
//! keys of its shard: the one whose budget refills first. Forgetting a key whose budget has refilled loses
//! nothing (GCRA treats an unknown key exactly like one with a full burst), so such a key goes first; when none
//! has, the one closest to refilling gains the least from coming back with a full burst.
//!
//! Keys arrive pre-hashed (a keyed SipHash of the user's key, see the service), so every entry has the same
//! small size whatever the key was, and the maps below need no hashing of their own.
//!
//! # Shards and the shared count
//!
//! Shards cut lock contention between cores. They have no caps of their own (a per-shard cap would make keys
//! that happen to hash together evict each other while the store is far from full); one atomic count of the
//! keys in all shards enforces the cap instead:
//!
//! - A hit (a known key) locks its shard and never touches the count.
//! - A new key below the cap takes a unit of the count (a compare-and-swap, only while the store fills) and is
//!   added to its shard.
//! - A new key at the cap replaces a key of its own shard; the count is unchanged and no lock but the shard's is
//!   taken.
//! - Only when the store is full and the new key's shard is empty does it take a key from another shard. While
//!   holding its own lock it only *tries* the other shards' locks, so no two threads can wait on each other. The
//!   count moves with the slot and stays exact; should its scans keep missing a key that another thread moves
//!   between shards meanwhile, the new key goes untracked rather than past the count.
//!
//! Memory keeps its hard cap: once the store is full the count never drops, so a shard gains entries only by
//! taking one from another while empty, which reuses a slot it freed earlier unless it never held a key. At most
//! `max_keys` plus one slot per shard is ever allocated, and shards of small stores hold at least
//! [`MIN_SHARD_KEYS`] keys' worth of the cap each, so a full store with an empty shard is rare.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use governor::nanos::Nanos;
use governor::state::StateStore;

/// The most shards a store is split into.
const MAX_SHARDS: usize = 16;
/// A store has one shard per this many keys of its cap (at least one shard, at most [`MAX_SHARDS`]).
const MIN_SHARD_KEYS: usize = 64;
/// How many of a shard's least recently seen keys are weighed when one must be forgotten: a bounded walk from
/// the tail of the recency list, so choosing a victim stays O(1).
const VICTIM_WINDOW: usize = 8;
const NIL: u32 = u32::MAX;

/// The hashes are already uniformly distributed: use them as they are.
#[derive(Default)]
struct PreHashed(u64);

impl Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

struct Slot {
    key: u64,
    /// governor's theoretical arrival time: the budget is full again once the clock reaches it.
    tat: u64,
    prev: u32,
    /// The next slot on the recency list, or on the free list for a slot not in use.
    next: u32,
}

/// One shard: a hash index into a slab of slots threaded on a recency list (head = most recent). Slots freed
/// when another shard takes a key from this one wait on a free list for reuse.
struct Shard {
    index: HashMap<u64, u32, BuildHasherDefault<PreHashed>>,
    slots: Vec<Slot>,
    head: u32,
    tail: u32,
    free: u32,
}

impl Shard {
    fn new() -> Self {
        Shard {
            index: HashMap::default(),
            slots: Vec::new(),
            head: NIL,
            tail: NIL,
            free: NIL,
        }
    }

    fn is_empty(&self) -> bool {
        self.head == NIL
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let s = &self.slots[i as usize];
            (s.prev, s.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let s = &mut self.slots[i as usize];
            s.prev = NIL;
            s.next = old;
        }
        match old {
            NIL => self.tail = i,
            o => self.slots[o as usize].prev = i,
        }
        self.head = i;
    }

    fn touch(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    /// Adds `key` in a free slot, or a new one. The caller has made room for it under the store's cap.
    fn insert(&mut self, key: u64, tat: u64) {
        let i = match self.free {
            NIL => {
                self.slots.push(Slot {
                    key,
                    tat,
                    prev: NIL,
                    next: NIL,
                });
                (self.slots.len() - 1) as u32
            }
            i => {
                let slot = &mut self.slots[i as usize];
                self.free = slot.next;
                slot.key = key;
                slot.tat = tat;
                i
            }
        };
        self.index.insert(key, i);
        self.push_front(i);
    }

    /// The key to forget (the shard must not be empty): of the [`VICTIM_WINDOW`] least recently seen, the one
    /// whose budget refills first, the least recent on a tie.
    fn victim(&self) -> u32 {
        let mut best = self.tail;
        let mut i = self.tail;
        for _ in 0..VICTIM_WINDOW {
            if i == NIL {
                break;
            }
            let slot = &self.slots[i as usize];
            if slot.tat < self.slots[best as usize].tat {
                best = i;
            }
            i = slot.prev;
        }
        best
    }

    /// Puts `key` in the place of the victim's slot.
    fn replace(&mut self, key: u64, tat: u64) {
        let i = self.victim();
        self.unlink(i);
        let slot = &mut self.slots[i as usize];
        self.index.remove(&slot.key);
        slot.key = key;
        slot.tat = tat;
        self.index.insert(key, i);
        self.push_front(i);
    }

    /// Forgets the victim (the shard must not be empty) and keeps its slot for reuse.
    fn evict(&mut self) {
        let i = self.victim();
        self.unlink(i);
        let slot = &mut self.slots[i as usize];
        self.index.remove(&slot.key);
        slot.next = self.free;
        self.free = i;
    }
}

/// What the store's clones share.
struct Shards {
    shards: Box<[Mutex<Shard>]>,
    /// Keys in all shards, at most `max_keys`; see the module docs.
    len: AtomicUsize,
    max_keys: usize,
}

/// The capped store: `max_keys` entries at most, spread over up to 16 shards. Clones share the shards (the
/// limiter owns one, the snapshot side another).
#[derive(Clone)]
pub(crate) struct BoundedStore {
    inner: Arc<Shards>,
}

/// A shard's lock. A panic while holding it cannot leave a shard half-updated (the list is relinked before any
/// user code runs, and governor's closure does not panic), so a poisoned lock is still usable.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

impl BoundedStore {
    /// `max_keys` must be at least 1 and fit in a `u32` (the builder checks).
    pub(crate) fn new(max_keys: usize) -> Self {
        Self::with_shards(max_keys, (max_keys / MIN_SHARD_KEYS).clamp(1, MAX_SHARDS))
    }

    fn with_shards(max_keys: usize, shards: usize) -> Self {
        BoundedStore {
            inner: Arc::new(Shards {
                shards: (0..shards.max(1))
                    .map(|_| Mutex::new(Shard::new()))
                    .collect(),
                len: AtomicUsize::new(0),
                max_keys: max_keys.max(1),
            }),
        }
    }

    fn shard_of(&self, key: u64) -> usize {
        // The high bits pick the shard; the index inside uses all of them, which is fine: they are uniform.
        ((key >> 32) as usize) % self.inner.shards.len()
    }

    /// Keys tracked now (one atomic load: no lock).
    pub(crate) fn len(&self) -> usize {
        self.inner.len.load(Ordering::Relaxed)
    }

    /// Counts one more key if the store is not full. Relaxed is enough: the count guards no data of its own,
    /// the shard locks order every access to the entries.
    fn reserve(&self) -> bool {
        let max = self.inner.max_keys;
        self.inner
            .len
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Forgets a key of a shard other than `home`, whose lock the caller holds and whose shard is empty while
    /// the store is full; the freed unit of the count passes to the caller. Returns whether it found one.
    ///
    /// Only `try_lock` is used on the other shards, so this never waits on a lock while holding one. A scan can
    /// find every other shard empty and unlocked although the store is full: meanwhile another thread moved a key
    /// from a shard not yet looked at into one already passed. It scans again, a few times; should every scan miss,
    /// it gives up and the caller leaves its key untracked (forgotten at once, as if evicted), which keeps the
    /// count exact rather than insert past it.
    fn take_from_another(&self, home: usize) -> bool {
        const EMPTY_SCANS: u32 = 3;
        let shards = &self.inner.shards;
        let mut empty_scans = 0;
        loop {
            let mut busy = false;
            for step in 1..shards.len() {
                let mut other = match shards[(home + step) % shards.len()].try_lock() {
                    Ok(guard) => guard,
                    Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                    Err(TryLockError::WouldBlock) => {
                        busy = true;
                        continue;
                    }
                };
                if !other.is_empty() {
                    other.evict();
                    return true;
                }
            }
            if !busy {
                empty_scans += 1;
                if empty_scans == EMPTY_SCANS {
                    return false;
                }
            }
            std::thread::yield_now();
        }
    }
}

impl StateStore for BoundedStore {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let home = self.shard_of(*key);
        let mut shard = lock(&self.inner.shards[home]);
        match shard.index.get(key).copied() {
            Some(i) => {
                // Refused keys are touched too: a client being throttled must not drift out of the store and
                // come back with a fresh burst.
                shard.touch(i);
                let (value, tat) = f(Some(Nanos::from(shard.slots[i as usize].tat)))?;
                shard.slots[i as usize].tat = tat.as_u64();
                Ok(value)
            }
            None => {
                let (value, tat) = f(None)?;
                let tat = tat.as_u64();
                if self.reserve() {
                    shard.insert(*key, tat);
                } else if !shard.is_empty() {
                    shard.replace(*key, tat);
                } else if self.take_from_another(home) {
                    shard.insert(*key, tat);
                }
                Ok(value)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admits `key` with the given theoretical arrival time.
    fn admit_at(store: &BoundedStore, key: u64, tat: u64) {
        store
            .measure_and_replace(&key, |_| Ok::<_, ()>(((), Nanos::from(tat))))
            .unwrap();
    }

    fn admit(store: &BoundedStore, key: u64) {
        admit_at(store, key, 1);
    }

    fn tracks(store: &BoundedStore, key: u64) -> bool {
        lock(&store.inner.shards[store.shard_of(key)])
            .index
            .contains_key(&key)
    }

    fn shard_lens(store: &BoundedStore) -> Vec<usize> {
        store
            .inner
            .shards
            .iter()
            .map(|s| lock(s).index.len())
            .collect()
    }

    /// The key `low` of shard `shard` (the high bits pick the shard).
    fn in_shard(shard: u64, low: u64) -> u64 {
        (shard << 32) | low
    }

    #[test]
    fn keys_sharing_a_shard_are_kept_while_the_store_is_not_full() {
        // 200 keys whose high bits are all zero land in one shard, far beyond an even share of a cap of 256.
        let store = BoundedStore::new(256);
        assert!(store.inner.shards.len() > 1);
        for key in 0..200 {
            admit(&store, key);
        }
        assert_eq!(store.len(), 200);
        for key in 0..200 {
            assert!(tracks(&store, key), "key {key} was forgotten below the cap");
        }
    }

    #[test]
    fn shard_counts() {
        for (max, shards) in [
            (1, 1),
            (127, 1),
            (128, 2),
            (1000, 15),
            (1024, 16),
            (100_000, 16),
        ] {
            assert_eq!(BoundedStore::new(max).inner.shards.len(), shards, "{max}");
        }
    }

    #[test]
    fn a_full_store_replaces_instead_of_growing() {
        let store = BoundedStore::new(1);
        admit(&store, 1);
        admit(&store, 2);
        assert_eq!(store.len(), 1);
        assert!(tracks(&store, 2) && !tracks(&store, 1));
        assert_eq!(lock(&store.inner.shards[0]).slots.len(), 1);
    }

    #[test]
    fn the_victim_is_the_least_recent_key_that_refills_first() {
        let store = BoundedStore::with_shards(4, 1);
        for (key, tat) in [(1, 50), (2, 10), (3, 30), (4, 40)] {
            admit_at(&store, key, tat);
        }
        admit_at(&store, 5, 60);
        assert!(!tracks(&store, 2), "2 refills first");
        assert!([1, 3, 4, 5].iter().all(|&k| tracks(&store, k)));
        // Equal times: the least recently seen goes.
        let store = BoundedStore::with_shards(3, 1);
        for key in 1..=3 {
            admit(&store, key);
        }
        admit(&store, 4);
        assert!(!tracks(&store, 1));
    }

    #[test]
    fn only_the_least_recently_seen_keys_are_weighed() {
        let store = BoundedStore::with_shards(VICTIM_WINDOW + 1, 1);
        admit_at(&store, 0, 0);
        for key in 1..=VICTIM_WINDOW as u64 {
            admit_at(&store, key, 5);
        }
        // Key 0 refills first but was just seen: it is out of the window.
        admit_at(&store, 0, 0);
        admit_at(&store, 100, 5);
        assert!(tracks(&store, 0));
        assert!(!tracks(&store, 1), "the least recent of the window");
    }

    #[test]
    fn refused_keys_stay_fresh() {
        let store = BoundedStore::with_shards(2, 1);
        admit(&store, 1);
        admit(&store, 2);
        // Key 1 is refused (still throttled): that counts as being seen.
        let refused = store.measure_and_replace(&1, |_| Err::<((), Nanos), ()>(()));
        assert_eq!(refused, Err(()));
        admit(&store, 3);
        assert!(tracks(&store, 1), "the throttled key kept its state");
        assert!(!tracks(&store, 2));
    }

    #[test]
    fn a_full_store_with_an_empty_shard_takes_a_key_from_another() {
        let store = BoundedStore::with_shards(4, 2);
        for low in 0..4 {
            admit_at(&store, in_shard(0, low), 10 + low);
        }
        assert_eq!(shard_lens(&store), [4, 0]);
        admit(&store, in_shard(1, 0));
        assert_eq!((store.len(), shard_lens(&store)), (4, vec![3, 1]));
        assert!(!tracks(&store, in_shard(0, 0)), "shard 0's victim went");
        // Shard 1 now replaces its own key, and shard 0 reuses the slot it gave up before growing.
        admit(&store, in_shard(1, 1));
        assert_eq!(shard_lens(&store), [3, 1]);
        let slots = |i: usize| lock(&store.inner.shards[i]).slots.len();
        assert_eq!((slots(0), slots(1)), (4, 1));
        admit(&store, in_shard(1, 2));
        admit(&store, in_shard(0, 9));
        assert_eq!(store.len(), 4);
        assert_eq!((slots(0), slots(1)), (4, 1));
    }

    /// The moment of a race: the store is full by its count, but its one key is on its way from a shard a scan has
    /// not reached to one it has passed, so every other shard looks empty. The new key is left untracked and the
    /// count stays exact (it was inserted past the count, one key more for good, and a debug assertion fired).
    #[test]
    fn a_scan_that_finds_every_shard_empty_leaves_the_key_untracked() {
        let store = BoundedStore::with_shards(1, 3);
        store.inner.len.store(1, Ordering::Relaxed);
        admit(&store, in_shard(0, 1));
        assert_eq!((store.len(), shard_lens(&store)), (1, vec![0, 0, 0]));
        assert!(!tracks(&store, in_shard(0, 1)));
    }

    /// Checks a shard's list, index and free list against each other; returns its keys from most to least
    /// recent.
    fn check_shard(shard: &Shard) -> Vec<u64> {
        let mut order = Vec::new();
        let mut i = shard.head;
        while i != NIL {
            order.push(shard.slots[i as usize].key);
            i = shard.slots[i as usize].next;
        }
        let mut backwards = Vec::new();
        let mut i = shard.tail;
        while i != NIL {
            backwards.push(shard.slots[i as usize].key);
            i = shard.slots[i as usize].prev;
        }
        backwards.reverse();
        assert_eq!(backwards, order);
        assert_eq!(shard.index.len(), order.len());
        for (k, &i) in &shard.index {
            assert_eq!(shard.slots[i as usize].key, *k);
        }
        let mut free = 0;
        let mut i = shard.free;
        while i != NIL {
            free += 1;
            i = shard.slots[i as usize].next;
        }
        assert_eq!(order.len() + free, shard.slots.len());
        order
    }

    proptest::proptest! {
        /// Under any sequence of admissions and refusals: the count is the number of keys, never above the cap;
        /// no key is forgotten while the store is not full, and at most one when it is; every shard keeps
        /// recency order; and no more than one slot per shard beyond the cap is ever allocated.
        #[test]
        fn matches_a_model(
            max in 1usize..8,
            shards in 1usize..4,
            ops in proptest::collection::vec((0u64..4, 0u64..6, 0u64..20, proptest::bool::ANY), 0..200),
        ) {
            let store = BoundedStore::with_shards(max, shards);
            let mut model: Vec<std::collections::VecDeque<u64>> = vec![Default::default(); shards];
            for (shard, low, tat, refuse) in ops {
                let key = in_shard(shard % shards as u64, low);
                let home = store.shard_of(key);
                let before = store.len();
                let known = model[home].contains(&key);
                let _ = store.measure_and_replace(&key, |_| {
                    if refuse { Err(()) } else { Ok(((), Nanos::from(tat))) }
                });
                if known || !refuse {
                    model[home].retain(|&k| k != key);
                    model[home].push_front(key);
                }
                let mut forgotten = 0;
                for (i, keys) in model.iter_mut().enumerate() {
                    let order = check_shard(&lock(&store.inner.shards[i]));
                    let len = keys.len();
                    keys.retain(|k| order.contains(k));
                    forgotten += len - keys.len();
                    proptest::prop_assert_eq!(&order, &keys.iter().copied().collect::<Vec<_>>());
                }
                let total: usize = model.iter().map(|k| k.len()).sum();
                proptest::prop_assert_eq!(store.len(), total);
                proptest::prop_assert!(total <= max);
                let allowed = usize::from(before == max && !known && !refuse);
                proptest::prop_assert!(forgotten <= allowed, "{} forgotten ({} of {} tracked)", forgotten, before, max);
                let slots: usize = store.inner.shards.iter().map(|s| lock(s).slots.len()).sum();
                proptest::prop_assert!(slots <= max + shards);
            }
        }
    }
}
