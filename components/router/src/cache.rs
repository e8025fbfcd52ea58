//! The router's cache of regions this node has no replica of: start key →
//! region meta and the node of its leader, so a request for such a region
//! does not ask PD each time.
//!
//! Contract of [`RegionCache`]:
//! * `lookup(key)`: the cached region owning `key`, if any. Entries may be
//!   stale; a stale one is corrected by the error it causes (the leader's
//!   node refuses a request for a region it does not serve as addressed);
//! * `insert(region, leader)`: caches a region learnt from PD or from a
//!   region error, replacing every cached region it overlaps whose epoch
//!   `version` is not newer (an older answer never replaces a newer split);
//! * `remove(region_id)`: drops a region (not found where it was sought,
//!   its leader unreachable, or no leader known): the next request asks PD
//!   again.

use std::collections::BTreeMap;

use parking_lot::RwLock;
use proto::metapb;

/// A cached region and the node its leader was last known on.
#[derive(Clone, Debug)]
pub(crate) struct Cached {
    pub region: metapb::Region,
    pub leader_node: Option<u64>,
}

#[derive(Default)]
pub(crate) struct RegionCache {
    by_start: RwLock<BTreeMap<Vec<u8>, Cached>>,
}

impl RegionCache {
    /// The cached region owning `key`.
    pub fn lookup(&self, key: &[u8]) -> Option<Cached> {
        let map = self.by_start.read();
        let (_, c) = map.range(..=key.to_vec()).next_back()?;
        let end = &c.region.end_key;
        (end.is_empty() || key < end.as_slice()).then(|| c.clone())
    }

    /// Caches `region` (see the contract).
    pub fn insert(&self, region: metapb::Region, leader_node: Option<u64>) {
        let version = |r: &metapb::Region| r.region_epoch.unwrap_or_default().version;
        let mut map = self.by_start.write();
        let overlapping: Vec<Vec<u8>> = map
            .iter()
            .filter(|(_, c)| overlaps(&c.region, &region))
            .map(|(k, _)| k.clone())
            .collect();
        if overlapping.iter().any(|k| {
            map.get(k)
                .is_some_and(|c| version(&c.region) > version(&region))
        }) {
            return;
        }
        for k in overlapping {
            map.remove(&k);
        }
        map.insert(
            region.start_key.clone(),
            Cached {
                region,
                leader_node,
            },
        );
    }

    /// Drops region `region_id` (see the contract).
    pub fn remove(&self, region_id: u64) {
        self.by_start
            .write()
            .retain(|_, c| c.region.id != region_id);
    }
}

fn overlaps(a: &metapb::Region, b: &metapb::Region) -> bool {
    let below = |start: &[u8], end: &[u8]| end.is_empty() || start < end;
    below(&a.start_key, &b.end_key) && below(&b.start_key, &a.end_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(id: u64, start: &str, end: &str, version: u64) -> metapb::Region {
        metapb::Region {
            id,
            start_key: start.into(),
            end_key: end.into(),
            region_epoch: Some(metapb::RegionEpoch {
                conf_ver: 1,
                version,
            }),
            peers: Vec::new(),
        }
    }

    fn id_at(c: &RegionCache, key: &str) -> Option<u64> {
        c.lookup(key.as_bytes()).map(|c| c.region.id)
    }

    #[test]
    fn lookup_insert_and_split() {
        let c = RegionCache::default();
        assert_eq!(id_at(&c, "a"), None);
        c.insert(region(1, "", "", 1), Some(7));
        assert_eq!(id_at(&c, "a"), Some(1));
        assert_eq!(c.lookup(b"a").and_then(|c| c.leader_node), Some(7));
        // A split learnt later replaces the old whole-keyspace region.
        c.insert(region(2, "m", "", 2), None);
        assert_eq!(id_at(&c, "a"), None);
        assert_eq!(id_at(&c, "m"), Some(2));
        assert_eq!(id_at(&c, "z"), Some(2));
        c.insert(region(1, "", "m", 2), None);
        assert_eq!(id_at(&c, "a"), Some(1));
        assert_eq!(id_at(&c, "l"), Some(1));
        // A stale answer does not undo the split.
        c.insert(region(1, "", "", 1), None);
        assert_eq!(id_at(&c, "z"), Some(2));
        c.remove(2);
        assert_eq!(id_at(&c, "z"), None);
        assert_eq!(id_at(&c, "a"), Some(1));
    }
}
