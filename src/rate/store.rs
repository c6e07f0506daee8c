//! A keyed GCRA state store with a hard cap on tracked keys.
//!
//! governor's own keyed stores grow with every new key until someone calls `retain_recent`; a flood of distinct
//! keys (spoofed headers, an IPv6 range) would grow them without bound. This store keeps at most `max_keys`
//! entries and, when full, forgets the least recently seen key in O(1). Forgetting a key whose budget has
//! refilled loses nothing: GCRA treats an unknown key exactly like one with a full burst.
//!
//! Keys arrive pre-hashed (a keyed SipHash of the user's key, see the service), so every entry has the same
//! small size whatever the key was, and the maps below need no hashing of their own.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex, PoisonError};

use governor::nanos::Nanos;
use governor::state::StateStore;

/// Shards cut lock contention between cores; each holds a fixed share of the cap.
const MAX_SHARDS: usize = 16;
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
    tat: u64,
    prev: u32,
    next: u32,
}

/// One shard: a hash index into a slab of slots threaded on a recency list (head = most recent).
struct Shard {
    index: HashMap<u64, u32, BuildHasherDefault<PreHashed>>,
    slots: Vec<Slot>,
    head: u32,
    tail: u32,
    cap: usize,
}

impl Shard {
    fn new(cap: usize) -> Self {
        Shard {
            index: HashMap::default(),
            slots: Vec::new(),
            head: NIL,
            tail: NIL,
            cap,
        }
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

    fn insert(&mut self, key: u64, tat: u64) {
        let i = if self.slots.len() < self.cap {
            self.slots.push(Slot {
                key,
                tat,
                prev: NIL,
                next: NIL,
            });
            (self.slots.len() - 1) as u32
        } else {
            let i = self.tail;
            self.unlink(i);
            let slot = &mut self.slots[i as usize];
            self.index.remove(&slot.key);
            slot.key = key;
            slot.tat = tat;
            i
        };
        self.index.insert(key, i);
        self.push_front(i);
    }
}

/// The capped store: `max_keys` entries at most, spread over up to 16 shards whose caps add up to exactly
/// `max_keys`. Clones share the shards (the limiter owns one, the snapshot side another).
#[derive(Clone)]
pub(crate) struct BoundedStore {
    shards: Arc<[Mutex<Shard>]>,
}

impl BoundedStore {
    /// `max_keys` must be at least 1 and fit in a `u32` per shard (the builder checks).
    pub(crate) fn new(max_keys: usize) -> Self {
        let n = max_keys.clamp(1, MAX_SHARDS);
        let shards = (0..n)
            .map(|i| Mutex::new(Shard::new(max_keys / n + usize::from(i < max_keys % n))))
            .collect();
        BoundedStore { shards }
    }

    fn shard(&self, key: u64) -> &Mutex<Shard> {
        // The high bits pick the shard; the index inside uses all of them, which is fine: they are uniform.
        let i = ((key >> 32) as usize) % self.shards.len();
        &self.shards[i]
    }

    /// Keys tracked now (locks each shard in turn: for snapshots, not the request path).
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).index.len())
            .sum()
    }
}

impl StateStore for BoundedStore {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        // A panic while holding the lock cannot leave a shard half-updated (the list is relinked before any
        // user code runs, and governor's closure does not panic), so a poisoned lock is still usable.
        let mut shard = self
            .shard(*key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
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
                shard.insert(*key, tat.as_u64());
                Ok(value)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(store: &BoundedStore, key: u64) {
        store
            .measure_and_replace(&key, |_| Ok::<_, ()>(((), Nanos::from(1))))
            .unwrap();
    }

    #[test]
    fn caps_add_up_to_max_keys() {
        for max in [1, 3, 15, 16, 17, 1000] {
            let store = BoundedStore::new(max);
            let total: usize = store.shards.iter().map(|s| s.lock().unwrap().cap).sum();
            assert_eq!(total, max);
        }
    }

    #[test]
    fn a_full_store_replaces_instead_of_growing() {
        let store = BoundedStore::new(1);
        admit(&store, 1);
        admit(&store, 2);
        assert_eq!(store.len(), 1);
        let shard = store.shards[0].lock().unwrap();
        assert!(shard.index.contains_key(&2));
        assert_eq!(shard.slots.len(), 1);
    }

    #[test]
    fn recency_order_decides_the_victim() {
        let mut shard = Shard::new(3);
        shard.insert(1, 0);
        shard.insert(2, 0);
        shard.insert(3, 0);
        let one = shard.index[&1];
        shard.touch(one);
        shard.insert(4, 0);
        assert!(shard.index.contains_key(&1));
        assert!(
            !shard.index.contains_key(&2),
            "2 was the least recently seen"
        );
        assert_eq!(shard.index.len(), 3);
        assert_eq!(shard.slots.len(), 3);
    }

    #[test]
    fn refused_keys_stay_fresh() {
        // 32 keys over 16 shards: two per shard; small keys all land in shard 0.
        let store = BoundedStore::new(32);
        admit(&store, 1);
        admit(&store, 2);
        // Key 1 is refused (still throttled): that counts as being seen.
        let refused = store.measure_and_replace(&1, |_| Err::<((), Nanos), ()>(()));
        assert_eq!(refused, Err(()));
        admit(&store, 3);
        let shard = store.shards[0].lock().unwrap();
        assert!(
            shard.index.contains_key(&1),
            "the throttled key kept its state"
        );
        assert!(!shard.index.contains_key(&2));
    }

    proptest::proptest! {
        /// The slab and its recency list agree with a plain model LRU under any sequence of admissions and
        /// refusals.
        #[test]
        fn matches_a_model_lru(cap in 1usize..6, ops in proptest::collection::vec((0u64..10, proptest::bool::ANY), 0..200)) {
            let mut shard = Shard::new(cap);
            let mut model: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
            for (key, refuse) in ops {
                match shard.index.get(&key).copied() {
                    Some(i) => shard.touch(i),
                    None if refuse => continue,
                    None => shard.insert(key, 0),
                }
                if let Some(pos) = model.iter().position(|&k| k == key) {
                    model.remove(pos);
                } else if model.len() == cap {
                    model.pop_back();
                }
                model.push_front(key);

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
                proptest::prop_assert_eq!(&order, &model.iter().copied().collect::<Vec<_>>());
                proptest::prop_assert_eq!(&backwards, &order);
                proptest::prop_assert_eq!(shard.index.len(), model.len());
                for (k, &i) in &shard.index {
                    proptest::prop_assert_eq!(shard.slots[i as usize].key, *k);
                }
            }
        }
    }
}
