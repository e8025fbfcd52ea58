//! Key latches of a region leader: a write holds them from evaluation until
//! its outcome is known (its entry applied, or certainly never to apply),
//! so no other write can evaluate against a state its own change is about
//! to replace. The guard is owned ([`LatchGuard`]) and travels with the
//! raft proposal, not with the client's request.
//!
//! Writes that touch only single keys latch hashed slots under a shared
//! region latch; writes that touch a key range take the region latch
//! exclusively. Slots are locked in ascending order, so two writers never
//! wait on each other in a cycle.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use mvcc::KeyRange;
use tokio::sync::{Mutex, OwnedMutexGuard, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

const SLOTS: usize = 2048;

pub struct Latches {
    region: Arc<RwLock<()>>,
    slots: Vec<Arc<Mutex<()>>>,
}

/// What a write needs latched.
pub enum LatchSet {
    Keys(Vec<Vec<u8>>),
    Everything,
}

impl LatchSet {
    /// What a request touching `spans` needs: its keys if every span is a
    /// single key, the whole region otherwise.
    pub fn of(spans: &[KeyRange]) -> LatchSet {
        if spans.iter().all(|s| s.end.is_none()) {
            LatchSet::Keys(spans.iter().map(|s| s.start.clone()).collect())
        } else {
            LatchSet::Everything
        }
    }
}

#[allow(dead_code)] // the guards are held for their Drop
pub enum LatchGuard {
    Keys(OwnedRwLockReadGuard<()>, Vec<OwnedMutexGuard<()>>),
    Everything(OwnedRwLockWriteGuard<()>),
}

impl Default for Latches {
    fn default() -> Self {
        Latches {
            region: Arc::new(RwLock::new(())),
            slots: (0..SLOTS).map(|_| Arc::new(Mutex::new(()))).collect(),
        }
    }
}

impl Latches {
    pub async fn acquire(&self, set: LatchSet) -> LatchGuard {
        match set {
            LatchSet::Everything => LatchGuard::Everything(self.region.clone().write_owned().await),
            LatchSet::Keys(keys) => {
                let shared = self.region.clone().read_owned().await;
                let mut slots: Vec<usize> = keys.iter().map(|k| slot(k)).collect();
                slots.sort_unstable();
                slots.dedup();
                let mut guards = Vec::with_capacity(slots.len());
                for s in slots {
                    guards.push(self.slots[s].clone().lock_owned().await);
                }
                LatchGuard::Keys(shared, guards)
            }
        }
    }
}

fn slot(key: &[u8]) -> usize {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() as usize) % SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(k: &str) -> KeyRange {
        KeyRange::from_etcd(k.as_bytes(), b"")
    }

    fn range(a: &str, b: &str) -> KeyRange {
        KeyRange::from_etcd(a.as_bytes(), b.as_bytes())
    }

    async fn blocks(latches: &Latches, set: LatchSet) -> bool {
        tokio::time::timeout(Duration::from_millis(50), latches.acquire(set))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn a_key_is_held_until_its_guard_goes_wherever_it_went() {
        let latches = Latches::default();
        let guard = latches.acquire(LatchSet::of(&[key("a")])).await;
        assert!(blocks(&latches, LatchSet::of(&[key("a")])).await);
        assert!(!blocks(&latches, LatchSet::of(&[key("b")])).await);
        assert!(blocks(&latches, LatchSet::of(&[range("0", "z")])).await);
        // The guard outlives the task that took it (it travels with the
        // proposal): only dropping it releases the key.
        let moved = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(guard);
        });
        assert!(blocks(&latches, LatchSet::of(&[key("a")])).await);
        moved.await.unwrap();
        assert!(!blocks(&latches, LatchSet::of(&[key("a")])).await);
    }

    #[tokio::test]
    async fn a_range_latches_the_whole_region() {
        let latches = Latches::default();
        assert!(matches!(
            LatchSet::of(&[key("a"), range("b", "c")]),
            LatchSet::Everything
        ));
        let guard = latches.acquire(LatchSet::of(&[range("b", "c")])).await;
        assert!(blocks(&latches, LatchSet::of(&[key("zzz")])).await);
        drop(guard);
        // Keys that share a slot, or repeat, do not deadlock their writer.
        let _g = latches
            .acquire(LatchSet::of(&[key("x"), key("x"), key("y")]))
            .await;
    }
}
