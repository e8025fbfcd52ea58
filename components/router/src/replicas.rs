//! An index of this node's initialized replicas by key range, so finding
//! the local replica of a key costs one map lookup instead of a walk over
//! every replica's status. Rebuilt when the store's layout version moves
//! (a replica started, went, or changed its range).
//!
//! The index only routes: a replica found through a stale index is checked
//! again where it matters (the leader re-checks a request's keys against
//! its region after latching, a read after its barrier), so a wrong guess
//! costs a retry, never a wrong answer.

use std::collections::BTreeMap;

use parking_lot::RwLock;
use raftstore::{RegionHandle, Store};

#[derive(Default)]
struct Index {
    /// The layout version it was built at; `None` before the first build.
    version: Option<u64>,
    /// start key → (end key, region id).
    by_start: BTreeMap<Vec<u8>, (Vec<u8>, u64)>,
}

#[derive(Default)]
pub(crate) struct LocalReplicas {
    index: RwLock<Index>,
}

impl LocalReplicas {
    /// This node's initialized replica whose range holds `key`, if any.
    pub fn find(&self, store: &Store, key: &[u8]) -> Option<RegionHandle> {
        self.with_index(store, |index| lookup(index, key))
            .and_then(|id| store.region(id))
    }

    /// This node's initialized replica with the smallest start key, if any
    /// (the one whose raft state stands for the node's, see the server's
    /// `main_region_status`).
    pub fn first(&self, store: &Store) -> Option<RegionHandle> {
        self.with_index(store, |index| {
            index.by_start.values().next().map(|(_, id)| *id)
        })
        .and_then(|id| store.region(id))
    }

    /// `f` of the index, rebuilt first if the store's layout moved.
    fn with_index<T>(&self, store: &Store, f: impl Fn(&Index) -> T) -> T {
        let version = store.layout_version();
        {
            let index = self.index.read();
            if index.version == Some(version) {
                return f(&index);
            }
        }
        let mut index = self.index.write();
        if index.version != Some(version) {
            index.by_start = store
                .regions()
                .into_iter()
                .map(|h| {
                    let r = h.status().region;
                    (r.start_key, (r.end_key, r.id))
                })
                .collect();
            index.version = Some(version);
        }
        f(&index)
    }
}

fn lookup(index: &Index, key: &[u8]) -> Option<u64> {
    let (_, (end, id)) = index.by_start.range(..=key.to_vec()).next_back()?;
    (end.is_empty() || key < end.as_slice()).then_some(*id)
}
